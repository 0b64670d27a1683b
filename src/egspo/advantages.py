"""Group-relative advantages (GRPO family).

Rewards come ordered group by group: the ``group_size`` (TRL: ``num_generations``) samples of
one prompt are consecutive. For sample i of group g::

    A_gi = (r_gi - mean_g(r)) / (sigma + eps)

with ``sigma`` chosen by ``scale``:

- ``"group"``: the standard deviation of group g's rewards (GRPO);
- ``"batch"``: the standard deviation of all rewards in the batch (more robust with few samples
  per group);
- ``"none"``: no division, A = r - mean (Dr. GRPO: the std term biases updates towards groups
  that are almost all right or almost all wrong).

Standard deviations are unbiased (Bessel-corrected, ``correction=1``), as ``torch.std`` computes
them by default and as TRL's ``GRPOTrainer`` uses them, so advantages match TRL's for the same
rewards up to ``eps`` (TRL adds 1e-4).

A group whose rewards are all equal carries no learning signal: its advantages are exactly 0,
whatever the scale, never NaN and never amplified rounding noise.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Scale = Literal["group", "batch", "none"]


def group_advantages(rewards: Tensor, group_size: int, scale: Scale = "group", eps: float = 1e-6) -> Tensor:
    """Advantages ``[B * G]`` from rewards ``[B * G]`` ordered by group of ``group_size``."""
    if group_size < 2:
        raise ValueError(
            f"group_size (num_generations) must be >= 2 for group-relative advantages, got {group_size}"
        )
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B * num_generations], got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) is not a multiple of num_generations ({group_size})"
        )
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return centred.masked_fill(constant, 0.0).view(-1)


def indexed_group_advantages(
    rewards: Tensor, group: Tensor, scale: Scale = "group", eps: float = 1e-6
) -> Tensor:
    """Advantages ``[N]`` of rows whose groups are named by ``group`` ``[N]`` (any sizes >= 1, any order).

    The formula of :func:`group_advantages` (Bessel std per group, ``eps``, all-equal groups exactly
    0; ``"batch"`` divides by the std of all N rewards), for batches where a method added rows to
    some groups (UEC-RL's joint groups) so that groups differ in size.
    """
    if rewards.dim() != 1 or group.shape != rewards.shape:
        raise ValueError(
            f"rewards and group must both be [N], got {tuple(rewards.shape)} and {tuple(group.shape)}"
        )
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    ids, index = torch.unique(group, return_inverse=True)
    k = len(ids)
    count = torch.zeros(k, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, index, torch.ones_like(rewards)
    )
    mean = torch.zeros_like(count).index_add_(0, index, rewards) / count
    centred = rewards - mean[index]
    if scale == "group":
        variance = torch.zeros_like(count).index_add_(0, index, centred.square()) / (count - 1).clamp(min=1)
        centred = centred / (variance.sqrt()[index] + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    high = torch.full_like(count, -torch.inf).scatter_reduce(0, index, rewards, "amax")
    low = torch.full_like(count, torch.inf).scatter_reduce(0, index, rewards, "amin")
    return centred.masked_fill((high == low)[index], 0.0)
