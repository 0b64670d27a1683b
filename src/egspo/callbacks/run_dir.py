"""The run's folder, where callbacks write what is not a checkpoint or a metric."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Trainer


def run_dir(trainer: Trainer) -> Path:
    """The logger's folder (`trainer.log_dir`), else `trainer.default_root_dir`.

    Under several processes `trainer.log_dir` is a broadcast from rank 0, a collective: every rank
    must ask at the same point, also when only rank 0 then writes (asked by rank 0 alone, it waits
    for the others forever).
    """
    return Path(trainer.log_dir or trainer.default_root_dir)
