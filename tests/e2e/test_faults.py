"""Faults a long run meets: kills during a save, non-finite losses, hostile completions, bad data, remote code."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from tiny_model import tiny_qwen2_json

from egspo.data.records import DataError, DataSource
from egspo.losses import EGSPOLoss, LossOutput, TokenBatch
from egspo.rewards import MathReward
from egspo.update import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = tiny_qwen2_json(max_position_embeddings=512)


# --- atomic checkpoints --------------------------------------------------------------------


# --- non-finite losses -----------------------------------------------------------------------


class NaNOnCalls(EGSPOLoss):
    """EGSPO whose loss (`"loss"`) or gradient (`"grad"`) is NaN on chosen calls."""

    def __init__(self, faults: dict[int, str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.faults, self.calls = faults, 0

    def __call__(self, batch: TokenBatch) -> LossOutput:
        out = super().__call__(batch)
        fault, self.calls = self.faults.get(self.calls), self.calls + 1
        if fault == "loss":
            return LossOutput(loss=out.loss * float("nan"), metrics=out.metrics)
        if fault == "grad":  # finite value, NaN gradient: d sqrt(x)/dx at 0 is inf, times 0
            return LossOutput(loss=out.loss + (batch.logprobs.sum() * 0).sqrt(), metrics=out.metrics)
        return out


class StepWatcher(Callback):
    """Per iteration: optimizer steps taken, whether any weight changed, the logged skip counters."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, bool, float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step
        self.before = [p.detach().clone() for p in pl_module.policy.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        params = pl_module.policy.parameters()
        changed = any(not torch.equal(a, p) for a, p in zip(self.before, params, strict=True))
        metrics = trainer.callback_metrics
        streak, skipped = metrics["train/nonfinite_streak"], metrics["train/skipped_updates"]
        self.rows.append((trainer.global_step - self.step, changed, float(streak), float(skipped)))


def _tiny_cli(tmp_path: Path, *extra: str):
    from egspo.cli import run

    return run(
        run=False,
        args=[
            "--config",
            str(ROOT / "configs/demo.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.logger=false",
            "--trainer.callbacks=[{class_path: egspo.callbacks.GateScheduler}]",
            f"--model.policy.config={TINY_MODEL}",
            "--model.sft_iterations=0",
            "--model.rollout.num_generations=4",
            "--model.rollout.max_completion_length=8",
            "--trainer.limit_val_batches=0",
            "--model.reward.init_args.num_workers=1",
            "--data.prompts_per_step=2",
            *extra,
        ],
    )


def test_nonfinite_updates_are_skipped_counted_and_stop_the_run(tmp_path):
    cli = _tiny_cli(tmp_path, "--model.rl_iterations=8", "--model.update.max_nonfinite_updates=2")
    faults = {1: "loss", 3: "grad", 5: "loss", 6: "grad"}
    cli.model.policy_update.policy_loss = NaNOnCalls(faults, gate=cli.model.policy_loss.gate)
    watcher = StepWatcher()
    cli.trainer.callbacks.append(watcher)
    with pytest.raises(NonFiniteLossError, match=r"2 updates in a row .*max_nonfinite_updates=2"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # iteration 6 raised before its end; 0..5 finished, the faulty ones without an update
    assert [row[0] for row in watcher.rows] == [1, 0, 1, 0, 1, 0]  # optimizer steps
    assert not any(row[1] for row in watcher.rows if row[0] == 0)  # skipped: weights untouched
    assert [row[2] for row in watcher.rows] == [0, 1, 0, 1, 0, 1]  # streak
    assert [row[3] for row in watcher.rows] == [0, 1, 1, 2, 2, 3]  # total skipped
    assert cli.model.iteration == 6


# --- rewards under attack -----------------------------------------------------------------------

ATTACKS = [
    "The answer is " + "1234567890 " * 100_000,  # 1 MB
    "\\boxed{" + "\\frac{" * 80 + "1}{2}" * 80 + "}",  # deep LaTeX
    "\\boxed{" + "{" * 450 + "1" + "}" * 450 + "}",
    "\\boxed{9^{9^{9^{9}}}}",  # huge exponent
    "#### 9**9**9**9**9",
    bytes(range(256)).decode("latin-1") * 40,  # junk
    "\\boxed{__import__('os').system('touch PWNED')}",  # code, never evaluated
    "The final answer is __import__('os').system('touch PWNED') I hope",
]


def test_a_batch_of_attacks_scores_zero_in_bounded_time_and_honest_answers_still_count(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reward = MathReward(timeout_seconds=1.0, num_workers=2)
    try:
        completions = [c for attack in ATTACKS for c in (attack, "so \\boxed{5}")]
        start = time.perf_counter()
        out = reward(completions, ["5"] * len(completions))
        seconds = time.perf_counter() - start
    finally:
        reward.close()
    assert out.rewards.tolist() == [0.0, 1.0] * len(ATTACKS)
    # each sample has a 1 s deadline on one of 2 workers; restarts included
    assert seconds < 2.0 * len(ATTACKS) + 10, seconds
    counted = sum(
        out.metrics[f"reward/{k}"] for k in ("verify_timeouts", "verify_errors", "extraction_failures")
    )
    assert counted >= 1
    assert out.metrics["reward/verify_timeouts"] >= 1
    assert not (tmp_path / "PWNED").exists()


# --- data -----------------------------------------------------------------------------------


def test_prompts_over_max_length_are_warned_and_counted(tmp_path):
    cli = _tiny_cli(tmp_path, "--model.rl_iterations=2", "--model.prompt.max_prompt_length=8")
    with pytest.warns(UserWarning, match=r"2 of 2 prompts exceed model.prompt.max_prompt_length=8"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.logged_metrics
    assert float(metrics["data/prompts_over_length"]) == 2
    assert float(metrics["data/prompts_over_length_total"]) == 4


def test_empty_split_is_an_error_naming_the_file(tmp_path):
    from egspo.data import HybridDataModule

    empty = tmp_path / "train.jsonl"
    empty.write_text("\n")
    dm = HybridDataModule(prompts=DataSource(path=str(empty)), expert_per_step=0, rl_iterations=2)
    with pytest.raises(DataError, match=f"{empty}.*no records"):
        dm.setup("fit")


# --- remote code ------------------------------------------------------------------------------


def _remote_code_checkpoint(folder: Path, marker: Path) -> None:
    folder.mkdir()
    config = {
        "model_type": "egspo_probe",
        "auto_map": {"AutoConfig": "probe.ProbeConfig", "AutoModelForCausalLM": "probe.ProbeModel"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "probe.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            from transformers import PretrainedConfig
            Path({str(marker)!r}).write_text("ran")

            class ProbeConfig(PretrainedConfig):
                model_type = "egspo_probe"
            """
        )
    )


def test_remote_code_runs_only_when_the_config_allows_it(tmp_path, tiny_tokenizer, monkeypatch):
    from egspo.model import PolicyConfig, load_policy

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "marker"
    _remote_code_checkpoint(tmp_path / "ckpt", marker)
    spec = PolicyConfig(name_or_path=str(tmp_path / "ckpt"), tokenizer="synthetic")
    assert spec.trust_remote_code is False
    with pytest.raises(Exception, match="trust_remote_code"):
        load_policy(spec, tiny_tokenizer)
    assert not marker.exists()

    spec = PolicyConfig(name_or_path=str(tmp_path / "ckpt"), tokenizer="synthetic", trust_remote_code=True)
    with pytest.raises(Exception):  # noqa: B017 - the probe is no model; it only proves the code ran
        load_policy(spec, tiny_tokenizer)
    assert marker.read_text() == "ran"
