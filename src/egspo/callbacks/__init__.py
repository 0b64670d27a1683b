"""Callbacks: rollouts, entropy statistics and diagnostics, gate schedule, checkpoints, adapters, progress bar,
thread count."""

from egspo.callbacks.adapters import AdapterExport
from egspo.callbacks.checkpointing import IterationCheckpoint
from egspo.callbacks.diagnostics import EntropyDiagnostics
from egspo.callbacks.entropy_stats import EntropyStatsLogger
from egspo.callbacks.gate_scheduler import GateScheduler
from egspo.callbacks.progress import PhaseRichProgressBar, PhaseTQDMProgressBar, phase_progress_bar
from egspo.callbacks.rollout import RolloutCallback
from egspo.callbacks.threads import AdaptiveThreads

__all__ = [
    "AdapterExport",
    "AdaptiveThreads",
    "EntropyDiagnostics",
    "EntropyStatsLogger",
    "GateScheduler",
    "IterationCheckpoint",
    "PhaseRichProgressBar",
    "PhaseTQDMProgressBar",
    "RolloutCallback",
    "phase_progress_bar",
]
