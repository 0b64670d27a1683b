"""Loading the policy: a Hugging Face causal LM with optional LoRA, 4-bit weights and checkpointing.

A policy comes from one of three places, named in YAML:
- a hub id or a local directory (`name_or_path`), loaded with `AutoModelForCausalLM`;
- a `transformers` config (`config: {model_type: qwen2, hidden_size: 128, ...}`) with random
  weights, for tiny runs that download nothing.

Hub access fails fast: a model that is neither a local path nor in the local cache is only
fetched when the hub answers within a few seconds, so a machine without network gets a clear
message instead of a retry loop.
"""

from __future__ import annotations

import copy
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from egspo.data.tokenizer import synthetic_tokenizer
from egspo.distributed import is_sharded
from egspo.hf_names import DTYPES, looks_local, unwrap_causal_lm

SYNTHETIC_TOKENIZER = "synthetic"


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft). The frozen base doubles as the KL reference policy."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class PolicyConfig:
    """Where the policy and its tokenizer come from and how they are held in memory.

    Args:
        name_or_path: hub id or local directory of a pretrained causal LM.
        config: keyword arguments of a `transformers` config (with `model_type`) for a randomly
            initialised model; used when `name_or_path` is not given.
        tokenizer: hub id or local directory of the tokenizer (default: `name_or_path`), or
            "synthetic" for the locally built tokenizer of the synthetic arithmetic task.
        dtype: parameter dtype: float32, bfloat16 or float16.
        lora: low-rank adapters; the base weights are frozen.
        load_in_4bit: QLoRA-style 4-bit NF4 base weights (bitsandbytes; needs `lora`).
        gradient_checkpointing: recompute activations in backward to save memory.
        trust_remote_code: allow model code shipped with a checkpoint; off unless asked for.
        attn_implementation: e.g. "sdpa", "flash_attention_2", "eager".
    """

    name_or_path: str | None = None
    # dict[str, Any], not dict: jsonargparse then reads `--model.policy.config.hidden_size=64` as an int
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    lora: LoRAConfig | None = None
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError(
                "model.policy: give exactly one of `name_or_path` (pretrained) or `config` (random init)"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"model.policy.dtype={self.dtype}: not one of {', '.join(DTYPES)}")
        if self.load_in_4bit and self.lora is None:
            raise ValueError(
                "model.policy.load_in_4bit=true: 4-bit base weights cannot be trained; add `model.policy.lora`"
            )
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.policy.config: needs `model_type` (e.g. qwen2, llama)")
        if self.tokenizer is None and self.name_or_path is None:
            raise ValueError(
                "model.policy.tokenizer: a model built from `config` needs a tokenizer path or 'synthetic'"
            )


class HubUnreachableError(OSError):
    """A hub id was named, it is not cached locally, and the hub cannot be reached."""


class ModelLoadError(ValueError):
    """A model or tokenizer the config names exists but cannot be loaded (no weights, a corrupt
    file, a folder of the wrong kind); the message names the option and the cause in one line."""


# Proxy variables that route the hub's HTTPS traffic (requests/httpx read them too).
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub (or the proxy to it) opens within `timeout` seconds.

    The name lookup is bounded too: it runs in a thread, since `create_connection`'s timeout
    does not cover the resolver, which retries for 10 s or more on a machine without network."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    proxy = next((os.environ[v] for v in _PROXY_VARIABLES if os.environ.get(v)), None)
    url = urlparse(proxy if proxy else endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    opened: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def hub_unreachable_reason() -> str | None:
    """Why nothing can be downloaded from the hub now (`HF_HUB_OFFLINE` set, or no answer within
    3 s), as the end of a sentence, or None when it answers."""
    if _offline():
        return (
            f"HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']} forbids downloads; check the name, pass a local "
            "path, or download it beforehand (unset HF_HUB_OFFLINE to let egspo download it)"
        )
    if not _hub_reachable():
        endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
        return f"the hub ({endpoint}) does not answer (no network?); check the name, or pass a local path"
    return None


def _load(loader, name: str, option: str, **kwargs):
    """`loader.from_pretrained(name)`, its failure as one line naming `option`."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except HubUnreachableError:
        raise
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        what = "tokenizer" if loader is AutoTokenizer else "model"
        text = " ".join(str(error).split()) or type(error).__name__
        if "trust_remote_code" in text:  # the fix, not the library's paragraph about it
            raise ModelLoadError(
                f"{option}={name}: the {what} ships its own code; set model.policy.trust_remote_code=true "
                "to run it (only for code you trust)"
            ) from error
        if len(text) > 300:
            text = text[:297].rstrip() + "..."
        raise ModelLoadError(f"{option}={name}: cannot load the {what}: {text}") from error


def resolve_pretrained(loader, name: str, option: str = "model.policy.name_or_path", **kwargs):
    """Call `loader.from_pretrained(name)`, from a local path or cache first, the hub only if it answers.
    Errors name `option`, the config option that gave `name`."""
    if looks_local(name):
        if not Path(name).expanduser().exists():
            raise FileNotFoundError(f"{option}={name}: no such file or folder")
        return _load(loader, str(Path(name).expanduser()), option, **kwargs)
    try:
        return loader.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError:
        pass
    reason = hub_unreachable_reason()
    if reason:
        raise HubUnreachableError(
            f"{option}={name}: not a local folder, not in the Hugging Face cache, and {reason}"
        )
    return _load(loader, name, option, **kwargs)


def load_tokenizer(spec: PolicyConfig) -> PreTrainedTokenizerBase:
    """The tokenizer, left-padded for batched generation, with a pad token."""
    name = spec.tokenizer or spec.name_or_path
    if name == SYNTHETIC_TOKENIZER:
        tokenizer = synthetic_tokenizer()
    else:
        option = "model.policy.tokenizer" if spec.tokenizer else "model.policy.name_or_path"
        tokenizer = resolve_pretrained(AutoTokenizer, name, option, trust_remote_code=spec.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(spec: PolicyConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Build or load the causal LM described by `spec`, ready to train."""
    dtype = DTYPES[spec.dtype]
    kwargs = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.config is not None:
        config_kwargs = dict(spec.config)
        config_kwargs.setdefault("vocab_size", len(tokenizer))
        if config_kwargs["vocab_size"] < len(tokenizer):
            raise ValueError(
                f"model.policy.config.vocab_size={config_kwargs['vocab_size']} is smaller than the "
                f"tokenizer's {len(tokenizer)} tokens"
            )
        config_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        config_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
        config = AutoConfig.for_model(**config_kwargs)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        if spec.load_in_4bit:
            kwargs["quantization_config"] = _four_bit_config(dtype)
        model = resolve_pretrained(AutoModelForCausalLM, spec.name_or_path, **kwargs)
    model.train()  # from_pretrained returns a model in eval mode; training starts in train mode
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    if spec.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        _keep_4bit_trainable_on_cpu(model)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=spec.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if spec.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = spec.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
        if spec.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def _four_bit_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _keep_4bit_trainable_on_cpu(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On a CPU with AVX512-BF16, a `Linear4bit` in eval mode repacks its weight into a layout
    whose matmul has no backward; rollouts run in eval mode, so the next update would fail
    ("a view of a leaf Variable ... in-place operation"). The unpacked kernel serves both.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


class KLReference:
    """The KL reference policy of a policy, as a context: ``with reference(policy) as ref_model:``.

    A LoRA policy's reference is the same model with its adapters switched off (no copy). A fully
    fine-tuned policy's is a frozen copy taken the first time it is asked for (the first RL
    iteration: the policy after the warm-up), as verl and TRL keep one: one more copy of the
    weights (no gradients, no optimizer state), part of the run state (`state_dict`), so a resumed
    run keeps the same reference.
    """

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None

    @contextmanager
    def __call__(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        if callable(getattr(policy, "disable_adapter", None)):
            with policy.disable_adapter():
                yield policy
            return
        if self.model is None:
            if is_sharded(policy):
                raise ValueError(
                    "policy_loss.beta > 0 under FSDP needs `policy.lora` (the reference is then the base "
                    "with adapters disabled); a frozen copy of a sharded model is not supported"
                )
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)
        yield self.model

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The frozen copy's weights (None: no copy, a LoRA policy or not taken yet)."""
        return (
            None if self.model is None else {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        )

    def load_state_dict(self, state: dict[str, torch.Tensor] | None, policy: torch.nn.Module) -> None:
        if state is None:
            return
        self.model = copy.deepcopy(policy).eval().requires_grad_(False)
        self.model.load_state_dict(state)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> list[int]:
    """Tokens that end a sample: the tokenizer's EOS and every `eos_token_id` of the model's
    generation_config (chat models list their end-of-turn token there, e.g. `<|im_end|>`)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(unwrap_causal_lm(model).generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return sorted({int(i) for i in ids if i is not None})
