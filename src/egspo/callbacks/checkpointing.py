"""Checkpoints a run can resume from exactly: per-iteration saves, SIGTERM saves, atomic writes, RNG streams.

An RL run is long and gets pre-empted. Three things make its checkpoints trustworthy:

- `IterationCheckpoint` saves `last.ckpt` every `every_n_iterations` iterations (Lightning's
  `every_n_train_steps` counts optimizer steps, which vary per iteration) and, when the process
  receives SIGTERM, at the end of the running iteration before it exits.
- `AtomicCheckpointIO` writes each checkpoint to a temporary file in the same directory, fsyncs
  it and renames it over the target, so a kill during a save leaves the previous file intact.
- `capture_rng_states` / `restore_rng_states` carry the torch, CUDA, numpy and python RNG
  streams of every rank as tensors and plain lists, which `torch.load(weights_only=True)` reads.
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to a temporary file beside the target, fsync, then `os.replace`.

    Lightning's own writer serialises to memory first but then writes the bytes over the
    target in place (or moves a file across devices), so a kill in the middle of the write can
    leave a truncated `last.ckpt`. A rename within one directory is atomic on POSIX, so readers
    see the old checkpoint or the new one, never a mix. Remote paths use Lightning's writer.
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


# --------------------------------------------------------------------- RNG streams
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


# --------------------------------------------------------------------- the callback
class IterationCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_iterations` iterations, at the end, and on SIGTERM.

    Resume with `python -m egspo fit ... --ckpt_path last`: the run continues at the next
    iteration with the same phase, learning rate, schedules, data position and RNG streams.
    After a SIGKILL it replays from the last periodic checkpoint, to the same result.

    On SIGTERM (pre-emption, `scancel`, `kill`), Lightning only records a flag; this callback
    saves `last.ckpt` once the running iteration ends and exits with status 143.

    Args:
        every_n_iterations: save period in iterations (0: only at the end and on SIGTERM).
        dirpath: checkpoint folder (default: `<trainer.default_root_dir>/checkpoints`, the same
            for every run of that root, so that `--ckpt_path last` finds it).
        filename, save_top_k: numbered copies (`iteration=N.ckpt`); none by default.
        enable_version_counter: off, so `last.ckpt` is always the same file, replaced atomically.
        **kwargs: other `ModelCheckpoint` arguments (`save_top_k` > 0 also keeps numbered copies).
    """

    def __init__(
        self,
        every_n_iterations: int = 25,
        dirpath: str | None = None,
        filename: str = "{iteration:.0f}",
        save_top_k: int = 0,
        save_last: bool | Literal["link"] = True,
        enable_version_counter: bool = False,
        **kwargs: Any,
    ) -> None:
        if every_n_iterations < 0:
            raise ValueError(f"every_n_iterations must be >= 0, got {every_n_iterations}")
        if not save_last:
            raise ValueError("IterationCheckpoint: save_last must be on (resuming reads last.ckpt)")
        kwargs["save_on_train_epoch_end"] = True
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            save_top_k=save_top_k,
            save_last=save_last,
            enable_version_counter=enable_version_counter,
            **kwargs,
        )
        self.every_n_iterations = every_n_iterations
        self._last_iteration_saved: int | None = None

    def _resolve_dirpath(self, trainer: Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        self._resolve_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._resolve_dirpath(trainer)
        strategy = trainer.strategy
        if strategy._checkpoint_io is None or type(strategy._checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.fast_dev_run:
            return
        iteration = int(pl_module.iteration)
        stop = trainer.strategy.reduce_boolean_decision(bool(trainer.received_sigterm), all=False)
        due = self.every_n_iterations > 0 and iteration % self.every_n_iterations == 0
        if (due or stop) and self._last_iteration_saved != iteration and not trainer.sanity_checking:
            self.save_now(trainer)
        if stop:
            rank_zero_info(
                f"SIGTERM: saved {self.last_model_path} after iteration {iteration}; "
                "resume with `--ckpt_path last`"
            )
            raise SIGTERMException(SIGTERM_EXIT_CODE)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.fast_dev_run and self._last_iteration_saved != int(pl_module.iteration):
            self.save_now(trainer)

    def save_now(self, trainer: Trainer) -> None:
        """Save the top-k copy (if any) and `last.ckpt` now, between two iterations."""
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        self._last_iteration_saved = int(trainer.lightning_module.iteration)
