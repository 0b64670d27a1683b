"""What a weight sync streams into vLLM: the policy's full weights under the base model's names.

vLLM holds a plain copy of the base model. The trainer's policy may be wrapped (peft LoRA, 4-bit
QLoRA base weights, FSDP2 shards); this turns it into the (name, tensor) pairs a checkpoint of the
base model would hold, one tensor at a time, so that no rank ever holds the whole model twice.
FSDP2 parameters are gathered one at a time (`DTensor.full_tensor`, a collective every rank joins,
as every rank syncs at the same point of the step).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from egspo.hf_names import unwrap_causal_lm


def named_weights(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The policy's weights under the base model's checkpoint names, one tensor at a time.

    - peft LoRA: for each adapted layer, `W + sum_a scaling_a * B_a @ A_a` over the active
      adapters (`W^T`-layout layers transposed back), named `<layer>.weight`; the adapter tensors
      themselves are not sent. A 4-bit (QLoRA) base weight is dequantised first
      (`bitsandbytes.functional.dequantize_4bit`): vLLM receives the merged weights in full precision.
    - FSDP2: each `DTensor` is gathered on its own (`full_tensor()`), sent, and dropped.
    - A tied weight is sent under each of its names (vLLM holds tied embeddings untied).
    """
    yield from _module_weights(unwrap_causal_lm(model), "")


def _module_weights(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, Tensor]]:
    if _is_lora_layer(module):
        yield from _merged_lora_weights(module, prefix)
        return
    for name, param in module.named_parameters(recurse=False):
        yield prefix + name, _dense(param)
    for name, child in module.named_children():
        yield from _module_weights(child, f"{prefix}{name}.")


def _is_lora_layer(module: torch.nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, LoraLayer)


def _merged_lora_weights(module: Any, prefix: str) -> Iterator[tuple[str, Tensor]]:
    base = module.get_base_layer()
    weight = _dense(base.weight)
    if not module.disable_adapters and not module.merged:
        weight = weight.clone()
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if module.use_dora.get(adapter, False):
                raise NotImplementedError(
                    "VLLMEngine: DoRA adapters cannot be merged for vLLM; use plain LoRA"
                )
            a = _dense(module.lora_A[adapter].weight).to(weight.dtype)
            b = _dense(module.lora_B[adapter].weight).to(weight.dtype)
            delta = (b @ a) * module.scaling[adapter]
            weight += delta.T if getattr(module, "fan_in_fan_out", False) else delta
    yield prefix + "weight", weight
    if getattr(base, "bias", None) is not None:
        yield prefix + "bias", _dense(base.bias)


def _dense(tensor: Tensor) -> Tensor:
    """A plain tensor of the full parameter: FSDP2 shards gathered, 4-bit weights dequantised."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    quant_state = getattr(tensor, "quant_state", None)
    if quant_state is not None:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(tensor.data, quant_state)
    return tensor.detach()
