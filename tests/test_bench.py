"""The benchmark harness: its EGSPO-vs-GRPO case compares the two losses on identical rollouts."""

import importlib.util
import sys
from pathlib import Path

import pytest
from tiny_model import tiny_qwen2

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_qwen2(max_position_embeddings=512)

pytestmark = pytest.mark.slow


def _bench():
    spec = importlib.util.spec_from_file_location("egspo_bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_overhead_case_alternates_losses_on_identical_rollouts():
    out = _bench().worker_overhead(
        {"pairs": 2, "prompts_per_step": 2, "max_completion_length": 6, "micro_repeats": 2, "config": TINY}
    )
    # Same weights, prompts and seed every iteration: only the loss differs between the two sides.
    assert out["identical_rollouts"]
    assert out["tokens"] > 0
    assert len(out["egspo"]) == len(out["grpo"]) == 2
    assert all(t > 0 for t in out["egspo"] + out["grpo"])
    for side in ("egspo", "grpo"):
        assert {"time/generation", "time/reward", "time/scoring", "time/update"} <= set(out["phases"][side])
    assert out["loss_egspo"] > 0 and out["loss_grpo"] > 0
