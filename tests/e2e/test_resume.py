"""Kill a run during RL (SIGTERM, SIGKILL) and resume with `--ckpt_path last`: same result.

The interrupted runs are real `python -m egspo fit` processes that signal themselves in the
middle of an optimizer step of a randomly chosen RL iteration. Every iteration of every run
records its phase, learning rate, SFT-mixing coefficient, gate value, prompts, RNG state and
a weight checksum, so a resumed run is compared with an uninterrupted one step by step.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from tiny_model import tiny_qwen2_json

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = tiny_qwen2_json(max_position_embeddings=512)
SFT, RL, EVERY = 1, 5, 2
TOTAL = SFT + RL

pytestmark = pytest.mark.slow


class Recorder(Callback):
    """Appends one JSON line per finished iteration: everything a resume must continue."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        index = pl_module.iteration - 1
        rl_index = index - pl_module.sft_iterations
        params = torch.cat([p.detach().flatten() for p in pl_module.policy.parameters()])
        record = {
            "iteration": index,
            "batch_idx": batch_idx,
            "phase": "sft" if rl_index < 0 else "rl",
            "lr": pl_module.optimizers().optimizer.param_groups[0]["lr"],
            "mu": float(pl_module.mu(rl_index)) if rl_index >= 0 else None,
            "gate": float(gate.value) if (gate := getattr(pl_module.policy_loss, "gate", None)) else None,
            "prompts": batch.prompts,
            "completions": batch.experience.completions if rl_index >= 0 else None,
            "rng": hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest(),
            "checksum": float(params.double().abs().sum()),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class SignalAt(Callback):
    """Sends `signum` to this process during the first optimizer step of `iteration`."""

    def __init__(self, iteration: int, signum: int) -> None:
        self.iteration, self.signum, self.sent = iteration, signum, False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if pl_module.iteration == self.iteration and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def _args(root: Path, records: Path, *extra_callbacks: dict) -> list[str]:
    callbacks = [
        {"class_path": "egspo.callbacks.GateScheduler", "init_args": {"start": 0.5, "end": 0.8}},
        {
            "class_path": "egspo.callbacks.checkpointing.IterationCheckpoint",
            "init_args": {"every_n_iterations": EVERY},
        },
        {"class_path": "test_resume.Recorder", "init_args": {"path": str(records)}},
        *extra_callbacks,
    ]
    return [
        "fit",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.deterministic=true",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        f"--model.policy.config={TINY_MODEL}",
        f"--model.sft_iterations={SFT}",
        f"--model.rl_iterations={RL}",
        "--model.rollout.num_generations=4",
        "--model.rollout.max_completion_length=8",
        "--model.reward.init_args.num_workers=1",
        '--model.mu={"class_path": "egspo.schedules.ChordMuSchedule", "init_args": {"peak": 0.5, "warmup_iterations": 2, "decay_iterations": 3}}',
        '--model.lr_scheduler={"class_path": "torch.optim.lr_scheduler.LinearLR", "init_args": {"start_factor": 1.0, "end_factor": 0.2, "total_iters": 6}}',
        '--model.rl_lr_scheduler={"class_path": "torch.optim.lr_scheduler.LinearLR", "init_args": {"start_factor": 1.0, "end_factor": 0.1, "total_iters": 5}}',
        "--data.prompts_per_step=2",
        "--data.expert_per_step=2",
        "--data.eval_size=4",
        "--data.eval_batch_size=4",
    ]


def _read(records: Path) -> list[dict]:
    return [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []


def _weights(cli) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.policy.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same run, never stopped."""
    from egspo.cli import main

    root = tmp_path_factory.mktemp("uninterrupted")
    records = root / "records.jsonl"
    sys.path.insert(0, str(Path(__file__).parent))
    cli = main(_args(root, records))
    assert cli.model.iteration == TOTAL
    return _read(records), _weights(cli)


def _interrupted_run(
    root: Path, records: Path, iteration: int, signum: int, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    killer = {
        "class_path": "test_resume.SignalAt",
        "init_args": {"iteration": iteration, "signum": int(signum)},
    }
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
        ),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [sys.executable, "-m", "egspo", *_args(root, records, killer), *extra],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _resume(root: Path, records: Path, extra: tuple[str, ...] = ()):
    from egspo.cli import main

    return main([*_args(root, records), *extra, "--ckpt_path", "last"])


def _assert_same(resumed: list[dict], reference: list[dict]) -> None:
    assert [r["iteration"] for r in resumed] == [r["iteration"] for r in reference]
    for got, want in zip(resumed, reference, strict=True):
        for key in ("batch_idx", "phase", "lr", "mu", "gate", "prompts", "completions", "rng"):
            assert got[key] == want[key], (got["iteration"], key)
        assert got["checksum"] == pytest.approx(want["checksum"], rel=1e-6, abs=1e-6), got["iteration"]


def _assert_same_weights(cli, weights: dict[str, torch.Tensor]) -> None:
    assert cli.model.iteration == TOTAL and cli.model.phase == "rl"
    for name, value in _weights(cli).items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=1e-6, msg=name)


def test_sigterm_mid_iteration_saves_at_its_end_and_resumes_to_the_same_weights(tmp_path, uninterrupted):
    reference, weights = uninterrupted
    seed = random.SystemRandom().randrange(2**32)
    stop_at = random.Random(seed).randrange(SFT, TOTAL - 1)  # an RL iteration with work left after it
    records = tmp_path / "records.jsonl"

    proc = _interrupted_run(tmp_path, records, stop_at, signal.SIGTERM)
    assert proc.returncode == 143, (seed, proc.stderr[-3000:])
    assert "SIGTERM: saved" in proc.stderr + proc.stdout
    before = _read(records)
    # the signalled iteration ran to its end, and the checkpoint holds it
    assert [r["iteration"] for r in before] == list(range(stop_at + 1)), seed
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["egspo"]["iteration"] == stop_at + 1

    cli = _resume(tmp_path, records)
    after = _read(records)[len(before) :]
    assert after[0]["iteration"] == stop_at + 1, seed
    _assert_same(before + after, reference)
    _assert_same_weights(cli, weights)


def test_sigkill_mid_iteration_replays_from_the_periodic_checkpoint(tmp_path, uninterrupted):
    reference, weights = uninterrupted
    seed = random.SystemRandom().randrange(2**32)
    kill_at = random.Random(seed).randrange(EVERY, TOTAL)  # at least one periodic save before it
    records = tmp_path / "records.jsonl"

    proc = _interrupted_run(tmp_path, records, kill_at, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, (seed, proc.stderr[-3000:])
    before = _read(records)
    assert [r["iteration"] for r in before] == list(range(kill_at)), seed
    saved = (kill_at // EVERY) * EVERY
    assert (
        torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["egspo"]["iteration"] == saved
    )

    cli = _resume(tmp_path, records)
    replayed = _read(records)[len(before) :]
    assert replayed[0]["iteration"] == saved, seed
    _assert_same(replayed, reference[saved:])
    _assert_same_weights(cli, weights)


# Clip-Cov's random choice is state of the loss: every loss call draws from its generator. With the
# window (-100, 100) every token is a candidate and p = 0.3, so where advantages are non-zero a
# resume that did not restore the generator would detach other tokens; and its generator would end
# in another state (it would have drawn fewer times since its seed).
CLIP_COV = (
    "--config",
    str(ROOT / "configs/method/clip_cov.yaml"),
    "--model.policy_loss.init_args.clip_cov_ratio=0.3",
    "--model.policy_loss.init_args.clip_cov_lb=-100.0",
    "--model.policy_loss.init_args.clip_cov_ub=100.0",
)


def test_clip_cov_generator_is_restored_on_resume(tmp_path):
    from egspo.cli import main

    sys.path.insert(0, str(Path(__file__).parent))
    reference_root = tmp_path / "uninterrupted"
    reference_records = reference_root / "records.jsonl"
    reference_cli = main([*_args(reference_root, reference_records), *CLIP_COV])
    loss = reference_cli.model.policy_loss
    assert type(loss).__name__ == "ClipCovLoss" and 0 < loss.select_prob <= 0.5
    assert not torch.equal(loss.generator.get_state(), torch.Generator().manual_seed(0).get_state())

    stop_at = SFT + 1  # the second RL iteration: the generator has drawn for one already
    root, records = tmp_path / "resumed", tmp_path / "resumed" / "records.jsonl"
    proc = _interrupted_run(root, records, stop_at, signal.SIGTERM, CLIP_COV)
    assert proc.returncode == 143, proc.stderr[-3000:]
    saved = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["egspo"]["policy_loss"]
    assert saved["class"] == "ClipCovLoss" and saved["state"]["generator"].dtype == torch.uint8
    before = _read(records)
    cli = _resume(root, records, CLIP_COV)
    _assert_same(before + _read(records)[len(before) :], _read(reference_records))
    _assert_same_weights(cli, _weights(reference_cli))
    assert torch.equal(cli.model.policy_loss.generator.get_state(), loss.generator.get_state())
