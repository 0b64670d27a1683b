"""Config errors are one line naming the option, and come before any tokenizer or model loads."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

# egspo.cli is imported here, not in a test: Lightning's log handler binds to the stderr of the
# moment it is imported, and a test's captured stderr is closed once that test ends.
from egspo.cli import main
from egspo.validation import validate_fit_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if anything starts building the policy: validation must come first."""
    import egspo.module

    def refuse(*args, **kwargs):
        raise AssertionError("a tokenizer or model was loaded before the config was validated")

    monkeypatch.setattr(egspo.module, "load_tokenizer", refuse)
    monkeypatch.setattr(egspo.module, "load_policy", refuse)


def _fit_error(capsys, *args: str) -> str:
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/demo.yaml"), *args])
    assert exit_info.value.code == 2
    assert time.perf_counter() - start < 30
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [
                "--model.update.mini_batch_size=6",
                "--model.rollout.num_generations=4",
                "--data.prompts_per_step=4",
            ],
            "error: model.update.mini_batch_size=6 does not divide data.prompts_per_step (4) x "
            "model.rollout.num_generations (4) = 16\n",
        ),
        (
            ["--model.rollout.num_generations=1"],
            "error: model.rollout.num_generations=1: group-relative advantages need at least 2 samples per prompt\n",
        ),
        (
            ["--trainer.callbacks=[]", "--model.policy_loss.init_args.gate.value=1.5"],
            "error: model.policy_loss.init_args.gate.value=1.5: the quantile gate takes a value in [0, 1]\n",
        ),
        (
            ["--trainer.callbacks=[]", "--model.policy_loss.init_args.gate.value=-0.1"],
            "error: model.policy_loss.init_args.gate.value=-0.1: the quantile gate takes a value in [0, 1]\n",
        ),
        (
            [
                "--data.synthetic=null",
                "--data.prompts.path=/no/such/prompts.jsonl",
                "--data.expert_per_step=0",
                "--model.sft_iterations=0",
            ],
            "error: data.prompts.path=/no/such/prompts.jsonl: file not found\n",
        ),
    ],
    ids=["mini_batch", "num_generations", "gate_above_1", "gate_below_0", "missing_file"],
)
def test_invalid_option_is_one_line_naming_it(capsys, no_model, args, message):
    err = _fit_error(capsys, *args)
    assert err.endswith(message)
    assert err.count("error:") == 1


def test_every_problem_is_reported_at_once(capsys, no_model):
    err = _fit_error(
        capsys, "--model.rollout.num_generations=1", "--model.policy_loss.init_args.gate.value=2"
    )
    assert "model.rollout.num_generations=1" in err and "the quantile gate takes a value in [0, 1]" in err
    assert "trainer.callbacks[1] (GateScheduler) sets the gate's value" in err
    assert err.count("error:") == 3


def test_a_gate_value_has_one_writer(capsys, no_model):
    """A gate value set in the loss and a GateScheduler that would overwrite it: refused in one line."""
    err = _fit_error(capsys, "--model.policy_loss.init_args.gate.value=0.7")
    assert err == (
        "error: model.policy_loss.init_args.gate.value=0.7: trainer.callbacks[1] (GateScheduler) sets "
        "the gate's value every RL iteration; leave the value out of the gate (one writer per value)\n"
    )


def test_gate_schedule_outside_the_unit_interval(capsys, no_model):
    callbacks = "[{class_path: egspo.callbacks.GateScheduler, init_args: {start: 0.5, end: 1.2}}]"
    err = _fit_error(capsys, f"--trainer.callbacks={callbacks}")
    assert err.endswith(
        "error: trainer.callbacks[0].init_args.end=1.2: GateScheduler drives a quantile gate, "
        "whose value must be in [0, 1]\n"
    )


def test_unknown_loss_class_is_rejected_by_the_parser(capsys, no_model):
    err = _fit_error(capsys, '--model.policy_loss={"class_path": "egspo.losses.NoSuchLoss"}')
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "model.policy_loss" in error_lines[0]
    assert "NoSuchLoss" in err


def test_hub_dataset_ids_are_not_mistaken_for_missing_files():
    config = {
        "model": {"rollout": {"num_generations": 4}, "rl_iterations": 1},
        "data": {"prompts": {"path": "openai/gsm8k"}, "expert_per_step": 0},
    }
    assert validate_fit_config(config) == []


@pytest.mark.parametrize("name", ["demo.yaml", "qwen_math.yaml"])
def test_shipped_configs_pass(name):
    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    assert validate_fit_config(config) == []
