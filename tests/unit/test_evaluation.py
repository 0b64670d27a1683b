"""Held-out evaluation through Lightning's validation loop: every metric per eval set, the training
run's random streams untouched, the greedy answer as the headline."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_model import tiny_qwen2_json

TINY_MODEL = tiny_qwen2_json(max_position_embeddings=512)


def _tiny_cli(tmp_path, *extra: str):
    from egspo.cli import run

    root = os.path.join(os.path.dirname(__file__), "../..")
    args = [
        "--config",
        os.path.join(root, "configs", "demo.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        f"--model.policy.config={TINY_MODEL}",
        "--model.sft_iterations=1",
        "--model.rl_iterations=0",
        "--model.rollout.max_completion_length=8",
        "--data.eval_size=6",
        "--data.eval_batch_size=4",
        *extra,
    ]
    return run(args, run=False)


@pytest.mark.slow
def test_validate_logs_every_metric_per_eval_set_and_keeps_the_rng(tmp_path):
    from egspo.evaluation import eval_seed

    cli = _tiny_cli(tmp_path, "--model.evaluation.num_samples=4", "--model.evaluation.pass_k=[1,2,4]")
    cli.model.configure_model()  # building the model draws its random weights
    torch.manual_seed(123)
    [logged] = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    after_eval = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after_eval, torch.rand(1)), "evaluation moved the global RNG"
    keys = {"accuracy", "pass@1", "pass@2", "pass@4", "maj@2", "maj@4", "response_length", "truncation_rate"}
    assert {k.removeprefix("val/synthetic/") for k in logged} == keys
    assert (
        0
        <= logged["val/synthetic/pass@1"]
        <= logged["val/synthetic/pass@2"]
        <= logged["val/synthetic/pass@4"]
    )
    assert 1 <= logged["val/synthetic/response_length"] <= 8
    # an untrained model rarely stops: most samples hit the 8-token limit
    assert 0 <= logged["val/synthetic/truncation_rate"] <= 1

    # the same numbers from the plain Evaluator, outside Lightning's loop (seeded per batch)
    evaluator, metrics = cli.model.evaluator, cli.model.evaluator.new_metrics()
    for i, batch in enumerate(cli.datamodule.val_dataloader()[0]):
        evaluator.update(cli.model.policy, batch["prompts"], batch["answers"], metrics, eval_seed(0, i))
    plain = {k: float(v) for k, v in metrics.compute().items()}
    assert plain == pytest.approx({k.removeprefix("val/synthetic/"): v for k, v in logged.items()})


@pytest.mark.slow
def test_one_sample_reports_the_greedy_answer(tmp_path):
    cli = _tiny_cli(tmp_path, "--model.evaluation.num_samples=1")
    [logged] = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert set(logged) == {
        f"test/synthetic/{k}" for k in ("accuracy", "pass@1", "response_length", "truncation_rate")
    }
    assert logged["test/synthetic/pass@1"] == logged["test/synthetic/accuracy"]
