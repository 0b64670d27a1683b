"""Leaf helpers about Hugging Face models and names, imported by the loader, the engines and the
distributed code alike (so that none of them has to import another for them)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

# The dtype names a config may give (model.policy.dtype, fsdp.param_dtype, export --dtype).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".yaml", ".ckpt", ".safetensors")


def looks_local(path: str) -> bool:
    """A file or folder path rather than a Hugging Face hub id (`openai/gsm8k`, `Qwen/Qwen2.5-Math-1.5B`)."""
    return (
        path.endswith(LOCAL_SUFFIXES) or path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()
    )


def unwrap_causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The `transformers` model under peft wrappers (its decoder and lm_head are what we call)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
