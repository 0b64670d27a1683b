"""Callbacks: rollout generation, entropy statistics, gate-threshold schedule, progress bar."""

from egspo.callbacks.entropy_stats import EntropyStatsLogger
from egspo.callbacks.gate_scheduler import GateScheduler
from egspo.callbacks.progress import PhaseRichProgressBar, PhaseTQDMProgressBar, phase_progress_bar
from egspo.callbacks.rollout import RolloutCallback

__all__ = [
    "EntropyStatsLogger",
    "GateScheduler",
    "PhaseRichProgressBar",
    "PhaseTQDMProgressBar",
    "RolloutCallback",
    "phase_progress_bar",
]
