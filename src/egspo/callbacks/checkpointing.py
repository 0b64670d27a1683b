"""Checkpoints a run resumes from exactly: every N iterations, at the end of each phase, on SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from egspo.checkpoint_io import AtomicCheckpointIO

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
LAST = "last.ckpt"


class IterationCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_iterations` iterations, at the end of each phase, and on SIGTERM.

    Resume with `python -m egspo fit ... --ckpt_path last`: the run continues at the next
    iteration with the same phase, learning rate, schedules, data position and RNG streams.
    After a SIGKILL it replays from the last periodic checkpoint, to the same result.

    It is a `ModelCheckpoint` so that Lightning adds no default one beside it, but it saves by
    iteration (one training batch), not by optimizer step or validation metric, with the
    trainer's public `save_checkpoint`. On SIGTERM (pre-emption, `scancel`) Lightning only
    records a flag; this callback saves once the running iteration ends and exits with 143.
    Checkpoints are written atomically (`egspo.checkpoint_io.AtomicCheckpointIO`).

    Args:
        every_n_iterations: save period in iterations (0: only at phase ends and on SIGTERM).
        dirpath: checkpoint folder (default: `<trainer.default_root_dir>/checkpoints`, the same
            for every run of that root, so that `--ckpt_path last` finds it).
        keep_numbered: also keep a copy `iteration=N.ckpt` of every periodic save.
    """

    def __init__(
        self, every_n_iterations: int = 25, dirpath: str | None = None, keep_numbered: bool = False
    ) -> None:
        if every_n_iterations < 0:
            raise ValueError(f"every_n_iterations must be >= 0, got {every_n_iterations}")
        super().__init__(dirpath=dirpath, save_last=False, save_top_k=0)
        self.every_n_iterations = every_n_iterations
        self.keep_numbered = keep_numbered
        self._saved_at: int | None = None

    @staticmethod
    def default_dirpath(default_root_dir: str | Path) -> Path:
        return Path(default_root_dir) / "checkpoints"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(self.default_dirpath(trainer.default_root_dir).resolve())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.fast_dev_run:
            return
        iteration = int(pl_module.iteration)
        stop = trainer.strategy.reduce_boolean_decision(bool(trainer.received_sigterm), all=False)
        due = self.every_n_iterations > 0 and iteration % self.every_n_iterations == 0
        if due or stop or _ends_phase(pl_module):
            self.save(trainer, iteration, numbered=due and self.keep_numbered)
        if stop:
            rank_zero_info(
                f"SIGTERM: saved {self.last_model_path} after iteration {iteration}; resume with --ckpt_path last"
            )
            raise SIGTERMException(SIGTERM_EXIT_CODE)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Saved at the phase's last iteration already: a checkpoint from inside the epoch lets a
        resumed run with a longer phase train on, where an end-of-epoch one would not."""

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """At a phase end, save again so that the checkpoint holds the phase's evaluation."""
        if trainer.state.fn == "fit" and not trainer.sanity_checking and _ends_phase(pl_module):
            self._saved_at = None
            self.save(trainer, int(pl_module.iteration))

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # Written at a phase's last batch, the loop state says "last batch of the epoch", and a
        # resumed epoch with that flag ends at once even when the phase was made longer. egspo's
        # loaders know the phase length themselves, so the flag is dropped (one comment, one line).
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
        if isinstance(progress, dict) and "is_last_batch" in progress:
            progress["is_last_batch"] = False

    def save(self, trainer: Trainer, iteration: int, numbered: bool = False) -> None:
        """Write `last.ckpt` (and `iteration=N.ckpt` when `numbered`) now, between two iterations."""
        if self._saved_at == iteration and not numbered:
            return
        last = str(Path(self.dirpath) / LAST)
        trainer.save_checkpoint(last, weights_only=False)
        if numbered:
            trainer.save_checkpoint(
                str(Path(self.dirpath) / f"iteration={iteration}.ckpt"), weights_only=False
            )
        self.last_model_path = last
        self._saved_at = iteration


def _ends_phase(pl_module: LightningModule) -> bool:
    return pl_module.iteration in (pl_module.sft_iterations, pl_module.total_iterations)
