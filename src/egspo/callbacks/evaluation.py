"""Held-out evaluation around Lightning's validation and test loops."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from egspo.callbacks.run_dir import run_dir
from egspo.evaluation import Evaluator, RunSummary
from egspo.rng import restore_rng_snapshot, rng_snapshot


class HeldOutEvaluation(Callback):
    """Logs what the `Evaluator` measured in each validation or test epoch, and keeps the summary.

    `<stage>/<set>/<metric>`: greedy accuracy, pass@k, maj@k, length, truncation rate. The results
    at the end of each phase go into the `RunSummary`, written as `<run_dir>/summary.json` when the
    fit ends. Evaluating mid-fit must not move the training run's random streams: they are put
    back after every validation loop. The module supplies this callback itself.
    """

    def __init__(self, evaluator: Evaluator, summary: RunSummary) -> None:
        self.evaluator = evaluator
        self.summary = summary
        self.rng_before_eval: tuple | None = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rng_before_eval = rng_snapshot() if trainer.state.fn == "fit" else None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.rng_before_eval is not None:
            restore_rng_snapshot(self.rng_before_eval)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results = self.log_results(pl_module, "val")
        iteration, sft = pl_module.iteration, pl_module.sft_iterations
        if trainer.state.fn == "fit" and iteration in (sft, pl_module.total_iterations):
            phase = "sft" if iteration == sft else "rl"
            self.summary.record(phase, results)
            headline = self.summary.headline(phase)
            rank_zero_info(f"held-out accuracy after {phase} (iteration {iteration}): {headline:.3f}")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.log_results(pl_module, "test")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = run_dir(trainer)  # every rank: a collective under several processes
        if trainer.is_global_zero and self.summary.phases:
            path = self.summary.write(folder, pl_module.iteration)
            print(f"\n{self.summary.table()}\nsummary: {path}")

    def log_results(self, pl_module: LightningModule, stage: str) -> dict[str, dict[str, float]]:
        results = self.evaluator.results()
        pl_module.log_dict(
            {f"{stage}/{n}/{k}": v for n, m in results.items() for k, v in m.items()},
            add_dataloader_idx=False,
        )
        return results
