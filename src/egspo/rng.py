"""The random streams of a run: captured per process for checkpoints, and snapshots around evaluation.

`capture_rng_states` / `restore_rng_states` carry the torch, CUDA, numpy and python RNG streams of
every rank as tensors and plain lists, which `torch.load(weights_only=True)` reads, so a resumed run
draws the same samples as the run that never stopped.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def _local_rng_state() -> dict[str, Any]:
    keys, pos, has_gauss, cached = np.random.get_state(legacy=True)[1:]
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [int(version), list(internal), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def capture_rng_states() -> list[dict[str, Any]]:
    """The RNG states of every rank, in rank order (a collective when distributed)."""
    state = _local_rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, _to_cpu(state))
    return gathered


def restore_rng_states(states: list[dict[str, Any]], rank: int = 0) -> None:
    """Set this process's RNG streams to the ones its rank saved."""
    if not states:
        return
    if rank >= len(states):
        raise ValueError(
            f"the checkpoint holds RNG states of {len(states)} processes; rank {rank} has none. "
            "Resume with the same number of processes to continue the same random streams."
        )
    state = states[rank]
    torch.set_rng_state(state["torch"].cpu())
    numpy = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _to_cpu(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_cpu(v) for v in state]
    return state


def rng_snapshot() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """This process's torch (and CUDA) RNG state, to put back with `restore_rng_snapshot`."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda


def restore_rng_snapshot(snapshot: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    cpu, cuda = snapshot
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
