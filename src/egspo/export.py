"""`python -m egspo export`: a training checkpoint to a standalone Hugging Face model.

The policy is rebuilt from the run's `PolicyConfig` (stored in the checkpoint's egspo state, or
read from the run's `config.yaml`), the trained weights are loaded into it, LoRA adapters
are merged into the base weights, and the result is written with `save_pretrained`
(safetensors) next to the tokenizer, ready for `AutoModelForCausalLM.from_pretrained`.

A QLoRA run merges its adapters into the original base weights in `policy.dtype`, not into
the 4-bit ones: the base is loaded again from `policy.name_or_path`.
Checkpoints saved sharded by `ModelParallelStrategy` (a folder) are read as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from egspo.hf_names import DTYPES
from egspo.model import LoRAConfig, PolicyConfig, load_policy, load_tokenizer

_PREFIX = "policy."


def read_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint file, or a sharded checkpoint folder consolidated in memory."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    if not (path / "meta.pt").is_file():
        raise FileNotFoundError(f"{path}: neither a checkpoint file nor a sharded checkpoint folder")
    with tempfile.TemporaryDirectory() as tmp:
        consolidated = Path(tmp) / "full.ckpt"
        dcp_to_torch_save(path, consolidated)
        state = torch.load(consolidated, map_location="cpu", weights_only=False)
    meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    return {**meta, "state_dict": state["state_dict"]}


def policy_spec(checkpoint: dict, config: str | Path | None = None) -> PolicyConfig:
    """The run's `PolicyConfig`: from `config` (the run's YAML) when given, else the checkpoint."""
    if config is not None:
        tree = yaml.safe_load(Path(config).read_text()) or {}
        raw = (tree.get("model") or {}).get("policy")
        if raw is None:
            raise ValueError(f"{config}: no `model.policy` section")
        raw = dict(raw)
        if raw.get("lora") is not None:
            raw["lora"] = LoRAConfig(**raw["lora"])
        return PolicyConfig(**raw)
    spec = checkpoint.get("egspo", {}).get("policy")
    if not isinstance(spec, dict):
        raise ValueError("the checkpoint holds no egspo `policy` settings: pass the run's --config")
    return PolicyConfig(**{**spec, "lora": LoRAConfig(**spec["lora"]) if spec.get("lora") else None})


def export(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    *,
    config: str | Path | None = None,
    dtype: str | None = None,
) -> Path:
    """Write the trained policy of `checkpoint_path` as a merged Hugging Face model to `out_dir`."""
    checkpoint = read_checkpoint(checkpoint_path)
    spec = policy_spec(checkpoint, config)
    four_bit = spec.load_in_4bit
    # Rebuild in full precision: a QLoRA run's adapters are merged into the original base.
    spec = dataclasses.replace(spec, load_in_4bit=False, gradient_checkpointing=False)
    tokenizer = load_tokenizer(spec)
    policy = load_policy(spec, tokenizer)

    trained = {k[len(_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(_PREFIX)}
    if not trained:
        raise ValueError(f"{checkpoint_path}: no `policy.*` weights in the checkpoint")
    if four_bit:  # only the adapters were trained; the 4-bit base stays behind
        trained = {k: v for k, v in trained.items() if "lora_" in k}
        expected = {k for k in policy.state_dict() if "lora_" in k}
        missing = expected - trained.keys()
        if missing:
            raise ValueError(f"{checkpoint_path}: adapter weights missing, e.g. {sorted(missing)[0]}")
        policy.load_state_dict(trained, strict=False)
    else:
        policy.load_state_dict(trained, strict=True)

    if hasattr(policy, "merge_and_unload"):
        policy = policy.merge_and_unload()
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"--dtype: {dtype!r} is not one of {sorted(DTYPES)}")
        policy = policy.to(DTYPES[dtype])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m egspo export",
        description="Write a training checkpoint's policy as a merged Hugging Face model (safetensors).",
    )
    parser.add_argument("checkpoint", help="a .ckpt file, or a sharded checkpoint folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config", default=None, help="the run's config.yaml (default: from the checkpoint)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: policy.dtype)")
    args = parser.parse_args(argv)
    out = export(args.checkpoint, args.out, config=args.config, dtype=args.dtype)
    print(f"exported to {out}")
    return out
