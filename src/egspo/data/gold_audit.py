"""The gold-answer audit of the data module's sets: run it once, report it in the log and the loggers."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from egspo.data.records import Example
from egspo.rewards import GoldAudit, MathReward, audit_golds


def run_audits(sets: dict[str, list[Example]], reward: object | None) -> dict[str, GoldAudit]:
    """Each set's gold audit, with `reward` when it is a `MathReward` (else a fresh one, closed after)."""
    own = not isinstance(reward, MathReward)
    reward = MathReward() if own else reward
    try:
        return {name: audit_golds([e.answer for e in examples], reward) for name, examples in sets.items()}
    finally:
        if own:
            reward.close()


def report_audit(trainer, name: str, summary: str, audit: GoldAudit, dropped: int | None) -> None:
    """The counts and examples in the log (rank zero) and in the trainer's loggers."""
    if dropped is not None:
        summary += f"\n  dropped {dropped} of {len(audit.flags)} (data.gold_audit=drop)"
    (rank_zero_warn if audit.unparsable or audit.lossy else rank_zero_info)(summary)
    if trainer is None or not trainer.is_global_zero:
        return
    metrics = {
        f"data/{name}/unparsable_golds": float(audit.unparsable),
        f"data/{name}/lossy_golds": float(audit.lossy),
    }
    if dropped is not None:
        metrics[f"data/{name}/dropped_prompts"] = float(dropped)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        add_text = getattr(logger.experiment, "add_text", None)  # TensorBoard's SummaryWriter
        if callable(add_text):
            text = "\n".join(f"    {line}" for line in summary.splitlines())  # markdown: verbatim
            add_text(f"data/{name}/gold_audit", text, trainer.global_step)
