"""GateScheduler: the gate's value as a function of the RL iteration, set on RL batches only."""

from __future__ import annotations

import pytest
from tiny_model import tiny_qwen2

from egspo.callbacks import GateScheduler
from egspo.data.batches import IterationBatch
from egspo.losses import EGSPOLoss, EntropyGate, PPOClipLoss
from egspo.model import PolicyConfig
from egspo.module import HybridRLModule


def test_gate_scheduler_spans_the_rl_phase():
    sched = GateScheduler(start=0.5, end=0.8)
    assert sched.value_at(0, 11) == 0.5
    assert sched.value_at(10, 11) == pytest.approx(0.8)
    assert sched.value_at(5, 11) == pytest.approx(0.65)
    cosine = GateScheduler(start=0.5, end=0.8, schedule="cosine")
    assert cosine.value_at(2, 11) < sched.value_at(2, 11)


def _batch(iteration: int, phase: str) -> IterationBatch:
    return IterationBatch(iteration, phase, ["q"], ["1"], [], [])


@pytest.mark.parametrize("loss", [EGSPOLoss(gate=EntropyGate()), PPOClipLoss()], ids=["gated", "ungated"])
def test_the_schedule_writes_the_gate_on_rl_batches_only(loss):
    module = HybridRLModule(
        policy=PolicyConfig(config=tiny_qwen2(), tokenizer="synthetic"),
        policy_loss=loss, sft_iterations=2, rl_iterations=5,
    )  # fmt: skip
    sched = GateScheduler(start=0.5, end=0.9)
    gate = getattr(loss, "gate", None)
    module.iteration = 1
    sched.on_train_batch_start(None, module, _batch(1, "sft"), 0)
    assert gate is None or gate.value == 0.8  # the warm-up leaves the gate alone
    module.iteration = 4  # RL iteration 2 of 5
    sched.on_train_batch_start(None, module, _batch(4, "rl"), 0)
    assert gate is None or gate.value == pytest.approx(0.7)
