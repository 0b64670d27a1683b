"""What makes a run resumable exactly: the module's run state, RNG streams of every process, and
checkpoints written atomically.

- `run_state` / `restore_run_state`: what a checkpoint holds beyond weights and optimizer (the
  iteration, summaries, counters, loss controller, learning-rate schedule, KL reference, replay
  buffer, RNG streams), and the one-line checks that a run can continue from it.

- `capture_rng_states` / `restore_rng_states` carry the torch, CUDA, numpy and python RNG
  streams of every rank as tensors and plain lists, which `torch.load(weights_only=True)` reads.
- `atomic_torch_save` (and `AtomicCheckpointIO`, the same as a Lightning checkpoint writer)
  writes to a temporary file beside the target, fsyncs it and renames it over the target: a
  kill during a save leaves the previous checkpoint intact, never a truncated one.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from egspo.distributed import gather_objects
from egspo.model import FrozenReference

if TYPE_CHECKING:
    from egspo.module import HybridRLModule


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `torch.save` checkpoint writer, made atomic for local paths.

    Lightning's own writer serialises to memory first but then writes the bytes over the
    target in place, so a kill in the middle of the write can leave a truncated `last.ckpt`.
    A rename within one directory is atomic on POSIX. Remote paths use Lightning's writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or type(get_filesystem(path)).__name__ != "LocalFileSystem":
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, Path(path))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save(obj, path)` such that `path` is always either its old or its new content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (the directory entry), where the OS allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def run_state(module: HybridRLModule) -> dict:
    """What a resumed run needs beyond weights and optimizer, as plain types and tensors (the
    checkpoint loads with `torch.load(weights_only=True)`)."""
    loss = module.policy_loss
    return {
        "iteration": module.iteration,
        "sft_iterations": module.sft_iterations,
        "policy": dataclasses.asdict(module.policy_spec),
        "summary": module.summary.state_dict(),
        "update": module.update.state_dict(),
        "policy_loss": {"class": type(loss).__name__, "state": loss.state_dict()},
        "prompts_over_length": module.experience_builder.prompts_over_length,
        "learning_rates": module.learning_rates.state_dict(),
        "reference": module.reference.state_dict() if isinstance(module.reference, FrozenReference) else None,
        "replay": gather_objects(module.replay.state_dict()) if module.replay is not None else None,
        "rng": capture_rng_states(),
    }


def restore_run_state(module: HybridRLModule, checkpoint: dict) -> None:
    """Put back what `run_state` saved; the RNG streams wait for the training loop to start."""
    state = checkpoint.get("egspo")
    if state is None:
        raise ValueError("the checkpoint was not written by egspo (no 'egspo' state): cannot resume from it")
    check_resume(checkpoint, module, state)
    module.iteration = state["iteration"]
    module.summary.load_state_dict(state["summary"])
    module.update.load_state_dict(state["update"])
    if state["policy_loss"]["class"] == type(module.policy_loss).__name__:  # a new loss starts fresh
        module.policy_loss.load_state_dict(state["policy_loss"]["state"])
    module.experience_builder.prompts_over_length = state["prompts_over_length"]
    module.learning_rates.load_state_dict(state["learning_rates"])
    if isinstance(module.reference, FrozenReference):
        module.reference.load_state_dict(state.get("reference"), module.policy)
    if module.replay is not None and state.get("replay") is not None:
        module.replay.load_state_dict(state["replay"][module.global_rank])
    module.rng_to_restore = state["rng"]


def check_resume(checkpoint: dict, module: HybridRLModule, state: dict) -> None:
    """One-line errors for a checkpoint this run cannot continue from (config and CLI win otherwise)."""
    if state["sft_iterations"] != module.sft_iterations and state["iteration"] > min(
        state["sft_iterations"], module.sft_iterations
    ):
        raise ValueError(
            f"model.sft_iterations={module.sft_iterations}, but the checkpoint was written at iteration "
            f"{state['iteration']} of a run with {state['sft_iterations']}: the warm-up cannot change once passed"
        )
    if state["iteration"] > module.total_iterations:
        raise ValueError(
            f"the checkpoint is at iteration {state['iteration']}, beyond this run's "
            f"{module.total_iterations} (model.sft_iterations + model.rl_iterations)"
        )
    weights = checkpoint.get("state_dict", {})
    own = module.state_dict()
    for name, tensor in weights.items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"the checkpoint's {name} has shape {tuple(tensor.shape)}, this model's {tuple(own[name].shape)}: "
                "model.policy differs from the run that wrote it"
            )
    missing = [k for k in own if k not in weights]
    if weights and missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} of this model's weights (first: {missing[0]}): "
            "model.policy differs from the run that wrote it"
        )
