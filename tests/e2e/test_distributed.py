"""Training in two processes on CPU (gloo): FSDP2 (ModelParallelStrategy) and DDP.

This file is also the training script the tests launch (`python tests/test_distributed.py ...`):
Lightning's launcher starts the second process by running the same command again.

Three runs see the same data:
- FSDP2, 2 processes x k prompts, sampling for real; each rank records its rollouts;
- DDP, 2 processes x k prompts, replaying those rollouts rank by rank;
- one process x 2k prompts, replaying both ranks' rollouts.
Generation is the only step whose random stream depends on the process layout, so replaying
it makes the data identical while rewards, advantages, scoring, the gate and the updates run.
Gradient clipping binds in every run (`MAX_GRAD_NORM` is below the gradients' norm), so the
weights also check that the norm is the global one: a norm over one rank's shard would scale
each shard by a different factor. Lightning's `FSDPStrategy` (FSDP1) is refused: it runs
`training_step` inside the FSDP1 root's forward, where egspo's update cannot call backward
(Lightning issues #19626, #19685).

What matches, and why: the loss is `seq-mean-token-mean`, and every rank holds the same number of
sequences, so the mean of the ranks' losses (and of their gradients, which DDP and FSDP average)
is the single-process loss (and gradient). The gate threshold is a quantile over the tokens
of all ranks, hence the same everywhere. Equal up to float summation order (prompts are
left-padded to different widths, reductions run in a different order): compared within 1e-5.
With `token-mean`, ranks whose token counts differ would weigh tokens differently from one
process, so such a comparison would only hold approximately.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_model import tiny_qwen2

from egspo.losses import EGSPOLoss, LossOutput

ROOT = Path(__file__).resolve().parents[2]
TINY = tiny_qwen2(tie_word_embeddings=True)
PROMPTS_PER_RANK = 2
GENERATIONS = 4
RL_ITERATIONS = 2
MAX_GRAD_NORM = 0.05  # below the tiny model's gradient norms (~0.1-1): clipping binds


# ---------------------------------------------------------------------- the training script
def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class LengthReward:
    """Reward = completion length / 16, capped at 1: varied within every group of a random model."""

    def __call__(self, completions, answers):
        from egspo.rewards import RewardOutput

        rewards = torch.tensor([min(len(c), 16) / 16 for c in completions], dtype=torch.float32)
        return RewardOutput(rewards=rewards)

    def close(self) -> None:
        pass


class NaNOnRank(EGSPOLoss):
    """EGSPO whose loss *value* is NaN on one rank in the first iteration; its gradient stays finite.

    A NaN gradient would reach every rank through DDP's gradient all-reduce, and each rank would
    skip on its own NaN norm: that would not show the decision is shared. Adding a NaN constant
    leaves the gradient (and so every rank's norm) finite, so only rank `rank` sees a non-finite
    value, and the other skips only if the decision is all-reduced.
    """

    def __init__(self, rank: int) -> None:
        super().__init__(loss_agg_mode="seq-mean-token-mean")
        self.rank, self.calls = rank, 0

    def __call__(self, batch):
        out = super().__call__(batch)
        self.calls += 1
        if _rank() == self.rank and self.calls == 1:
            return LossOutput(loss=out.loss + torch.tensor(float("nan")), metrics=out.metrics)
        return out


class RecordingEngine:
    """Samples with the module's engine and saves each call's completions and entropies of this rank."""

    def __init__(self, inner, out: Path) -> None:
        self.inner, self.out, self.calls = inner, out, 0

    def generate(self, model, input_ids, attention_mask, params):
        rollout = self.inner.generate(model, input_ids, attention_mask, params)
        recorded = {"completions": rollout.completion_ids.cpu(), "entropy": rollout.entropy.cpu()}
        torch.save(recorded, self.out / f"rollout_it{self.calls}_rank{_rank()}.pt")
        self.calls += 1
        return rollout


class ReplayEngine:
    """Returns recorded completions and entropies (of one rank, or of several concatenated)."""

    def __init__(self, source: Path, ranks: list[int] | None) -> None:
        self.source, self.ranks, self.calls = source, ranks, 0

    def generate(self, model, input_ids, attention_mask, params):
        from egspo.rollout import Rollout, completion_mask_from_eos

        ranks = self.ranks if self.ranks is not None else [_rank()]
        parts = [torch.load(self.source / f"rollout_it{self.calls}_rank{r}.pt") for r in ranks]
        width = max(p["completions"].shape[1] for p in parts)

        def padded(key: str, value: float) -> torch.Tensor:
            pads = [torch.nn.functional.pad(p[key], (0, width - p[key].shape[1]), value=value) for p in parts]
            return torch.cat(pads).to(input_ids.device)

        completions = padded("completions", params.pad_token_id)
        self.calls += 1
        mask, truncated = completion_mask_from_eos(completions, list(params.stop_token_ids))
        prompt_mask = attention_mask.repeat_interleave(params.num_samples, dim=0)
        return Rollout(
            input_ids=torch.cat([input_ids.repeat_interleave(params.num_samples, dim=0), completions], dim=1),
            attention_mask=torch.cat([prompt_mask, mask], dim=1),
            completion_mask=mask,
            truncated=truncated,
            prompt_length=input_ids.shape[1],
            entropy=padded("entropy", 0.0) * mask,
        )


def train(args: argparse.Namespace) -> None:
    """One tiny RL run; writes per-rank records (losses, thresholds, entropies, final weights)."""
    from functools import partial

    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from egspo.cli import TRAINER_DEFAULTS
    from egspo.config import PromptConfig, RolloutConfig, UpdateConfig
    from egspo.data import HybridDataModule
    from egspo.data.synthetic import SyntheticArithmetic
    from egspo.distributed import full_state_dict, is_sharded
    from egspo.model import PolicyConfig
    from egspo.module import HybridRLModule

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(0)
    loss = (
        NaNOnRank(args.nan_rank)
        if args.nan_rank is not None
        else EGSPOLoss(loss_agg_mode="seq-mean-token-mean")
    )
    rollout = RolloutConfig(num_generations=GENERATIONS, max_completion_length=8)
    if args.replay:
        ranks = None if args.devices > 1 else list(range(args.replay_ranks))
        rollout.engine = ReplayEngine(Path(args.replay), ranks)
    else:
        rollout.engine = RecordingEngine(rollout.engine, out)
    module = HybridRLModule(
        policy=PolicyConfig(config=TINY, tokenizer="synthetic"),
        policy_loss=loss,
        reward=LengthReward(),
        sft_iterations=0,
        rl_iterations=RL_ITERATIONS,
        prompt=PromptConfig(max_prompt_length=64),
        rollout=rollout,
        update=UpdateConfig(max_grad_norm=MAX_GRAD_NORM),
        optimizer=partial(torch.optim.SGD, lr=0.5),
    )
    data = HybridDataModule(
        synthetic=SyntheticArithmetic(seed=0, train_size=64, test_size=8),
        rl_iterations=RL_ITERATIONS,
        prompts_per_step=args.prompts,
        expert_per_step=0,
        seed=0,
    )

    class Record(Callback):
        def __init__(self) -> None:
            self.rows: list[dict] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            exp = batch.experience
            metrics = trainer.callback_metrics
            self.rows.append(
                {
                    "loss": float(metrics["train/rl_loss"]),
                    "grad_norm": float(metrics["rl/grad_norm"]),
                    "threshold": float(outputs["gate_threshold"]),
                    "reward": float(metrics["reward"]),
                    "entropy": exp.entropy[exp.completion_mask.bool()].tolist(),
                    "sharded": is_sharded(pl_module.policy),
                    "skipped": pl_module.policy_update.skipped_updates,
                }
            )

        def on_train_start(self, trainer, pl_module) -> None:
            state = full_state_dict(pl_module.policy)
            if trainer.global_rank == 0:
                torch.save(state, out / "initial_weights.pt")

        def on_train_end(self, trainer, pl_module) -> None:
            rank = trainer.global_rank
            torch.save(full_state_dict(pl_module.policy), out / f"weights_rank{rank}.pt")
            (out / f"records_rank{rank}.json").write_text(json.dumps(self.rows))

    strategy = {
        "ddp": lambda: DDPStrategy(process_group_backend="gloo"),
        "fsdp": lambda: ModelParallelStrategy(),
        "single": lambda: "auto",
    }[args.strategy]()
    trainer = Trainer(
        **TRAINER_DEFAULTS,
        max_epochs=1,  # one phase: RL
        limit_val_batches=0,
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
    )
    trainer.fit(module, datamodule=data)
    if args.strategy == "fsdp":  # a sharded checkpoint folder, one file per rank
        trainer.save_checkpoint(out / "last.ckpt")


# ---------------------------------------------------------------------- the tests


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # The script imports the tests' helpers (tiny_model, ports) from the tests folder.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def _launch(
    out: Path,
    strategy: str,
    devices: int,
    prompts: int,
    replay: Path | None = None,
    nan_rank: int | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, __file__, "--out", str(out), "--strategy", strategy]
    cmd += ["--devices", str(devices), "--prompts", str(prompts)]
    if nan_rank is not None:
        cmd += ["--nan-rank", str(nan_rank)]
    if replay is not None:
        cmd += ["--replay", str(replay), "--replay-ranks", "2"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _records(out: Path, rank: int) -> list[dict]:
    return json.loads((out / f"records_rank{rank}.json").read_text())


def _weights(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"weights_rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """FSDP2 (sampling, recorded), then DDP and one process replaying the same rollouts."""
    base = tmp_path_factory.mktemp("distributed")
    paths = {name: base / name for name in ("fsdp", "ddp", "single")}
    _launch(paths["fsdp"], "fsdp", 2, PROMPTS_PER_RANK)
    _launch(paths["ddp"], "ddp", 2, PROMPTS_PER_RANK, replay=paths["fsdp"])
    _launch(paths["single"], "single", 1, 2 * PROMPTS_PER_RANK, replay=paths["fsdp"])
    return paths


def _assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_processes_match_one_process(runs, strategy):
    out, single = runs[strategy], runs["single"]
    rows = [_records(out, 0), _records(out, 1)]
    reference = _records(single, 0)
    assert len(rows[0]) == len(rows[1]) == len(reference) == RL_ITERATIONS
    assert all(r["sharded"] for r in rows[0]) == (strategy != "ddp")
    # Both ranks end with the same weights, and they are those of one process on the same data.
    w0, w1 = _weights(out, 0), _weights(out, 1)
    _assert_same_weights(w0, w1, atol=0)
    ws = _weights(single, 0)
    _assert_same_weights(w0, ws, atol=1e-5)
    initial = torch.load(out / "initial_weights.pt")
    assert any(not torch.equal(initial[k], w0[k]) for k in w0), "no weight changed"
    for it in range(RL_ITERATIONS):
        local = [rows[0][it]["loss"], rows[1][it]["loss"]]
        assert local[0] != local[1]  # the ranks had different data
        assert sum(local) / 2 == pytest.approx(reference[it]["loss"], abs=1e-5)
        # Metrics are over both ranks: the logged reward is the single-process one.
        assert rows[0][it]["reward"] == pytest.approx(reference[it]["reward"], abs=1e-6)
        assert rows[1][it]["reward"] == pytest.approx(reference[it]["reward"], abs=1e-6)
        # Clipping bound, with the norm of the whole gradient (a shard's norm would differ by rank).
        assert reference[it]["grad_norm"] > MAX_GRAD_NORM
        for rank in (0, 1):
            assert rows[rank][it]["grad_norm"] == pytest.approx(reference[it]["grad_norm"], rel=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_gate_threshold_is_the_quantile_of_all_ranks_tokens(runs, strategy):
    from egspo.losses.gate import EntropyGate

    out = runs[strategy]
    rows = [_records(out, 0), _records(out, 1)]
    reference = _records(runs["single"], 0)
    gate = EntropyGate()
    for it in range(RL_ITERATIONS):
        union = torch.tensor(rows[0][it]["entropy"] + rows[1][it]["entropy"])
        expected = float(gate.threshold(union, torch.ones_like(union)))
        own = [torch.tensor(r[it]["entropy"]) for r in rows]
        per_rank = [float(gate.threshold(v, torch.ones_like(v))) for v in own]
        assert rows[0][it]["threshold"] == rows[1][it]["threshold"]
        assert rows[0][it]["threshold"] == pytest.approx(expected, abs=1e-6)
        assert per_rank[0] != per_rank[1]  # a per-rank quantile would have differed
        assert reference[it]["threshold"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.distributed
def test_a_nonfinite_loss_on_one_rank_skips_the_update_on_every_rank(tmp_path):
    _launch(tmp_path, "ddp", 2, PROMPTS_PER_RANK, nan_rank=1)
    rows = [_records(tmp_path, 0), _records(tmp_path, 1)]
    # Rank 1's NaN loss value in the first iteration (its gradient, and so every rank's gradient
    # norm, finite) skipped that update on rank 0 too: no rank steps alone and drifts.
    assert [r["skipped"] for r in rows[0]] == [r["skipped"] for r in rows[1]] == [1, 1]
    assert all(torch.isfinite(torch.tensor(r["grad_norm"])) for r in rows[0] + rows[1])
    _assert_same_weights(_weights(tmp_path, 0), _weights(tmp_path, 1), atol=0)
    initial = torch.load(tmp_path / "initial_weights.pt")
    assert any(not torch.equal(initial[k], v) for k, v in _weights(tmp_path, 0).items())  # 2nd step ran


def test_fsdp1_is_refused_in_one_line_naming_fsdp2(tmp_path, capsys):
    from egspo.cli import main

    args = ["fit", "--config", str(ROOT / "configs/demo.yaml"), "--trainer.strategy=fsdp"]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.devices=1"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "FSDPStrategy" in error[0] and "ModelParallelStrategy" in error[0]


@pytest.mark.distributed
def test_export_reads_a_sharded_fsdp_checkpoint(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from egspo.export import export

    checkpoint = runs["fsdp"] / "last.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2
    model = AutoModelForCausalLM.from_pretrained(export(checkpoint, tmp_path / "hf"))
    trained = _weights(runs["fsdp"], 0)
    exported = model.state_dict()
    for key, value in trained.items():
        assert torch.equal(exported[key], value), key


def test_fsdp_multinode_config_selects_model_parallel_with_bf16_compute():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from egspo.cli import run

    cli = run(
        args=[
            "--config",
            str(ROOT / "configs/fsdp_multinode.yaml"),
            "--model.policy.name_or_path=null",  # the recipe's hub model, replaced by a tiny one built here
            f"--model.policy.config={json.dumps(tiny_qwen2())}",
            "--model.policy.tokenizer=synthetic",
            "--trainer.accelerator=cpu",
            "--trainer.num_nodes=1",
            "--trainer.devices=1",
            "--trainer.strategy.init_args.tensor_parallel_size=1",
        ],
        run=False,
    )
    assert isinstance(cli.trainer.strategy, ModelParallelStrategy)
    assert cli.model.fsdp_config.param_dtype == "bfloat16"
    assert cli.model.fsdp_config.reduce_dtype == "float32"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", choices=["ddp", "fsdp", "single"], default="single")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=PROMPTS_PER_RANK)
    parser.add_argument("--replay", default=None)
    parser.add_argument("--replay-ranks", type=int, default=2)
    parser.add_argument("--nan-rank", type=int, default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    train(_parse(sys.argv[1:]))
