"""The real-model recipes as shipped: their precision, dtype, optimizer, budgets and engine.

Only what cannot run here is replaced: the hub model by a tiny one of the same architecture
saved to disk (weights initialised like a real model's, std 0.02), the hub data by the local
GSM8K files, the GPU by the CPU. Everything else is the YAML a user runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_model import tiny_qwen2

from egspo.model import PolicyConfig, load_policy, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ["qwen_math.yaml", "qwen_math_lora.yaml", "qwen_math_qlora.yaml"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 saved like a hub checkpoint, with its tokenizer."""
    path = tmp_path_factory.mktemp("base")
    spec = PolicyConfig(config=tiny_qwen2(max_position_embeddings=2048), tokenizer="synthetic")
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(0)
    load_policy(spec, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _recipe_args(
    recipe: str, tmp_path: Path, base_dir: Path, gsm8k_train: Path, gsm8k_test: Path
) -> list[str]:
    """The shipped recipe, with the model, the data and the accelerator replaced by local ones."""
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / recipe),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false",
        "--trainer.val_check_interval=1.0",
        f"--model.policy.name_or_path={base_dir}",
        "--model.reward.init_args.num_workers=1",
        f"--data.expert={{'path': '{gsm8k_train}', 'layout': 'gsm8k'}}",
        f"--data.prompts={{'path': '{gsm8k_train}', 'layout': 'gsm8k'}}",
        f"--data.eval_sets={{'gsm8k': {{'path': '{gsm8k_test}', 'layout': 'gsm8k'}}}}",
        "--data.eval_size=4",
        "--data.eval_batch_size=4",
    ]


def _sft_update(args: list[str], *extra: str) -> dict[str, torch.Tensor]:
    """Trainable weights' change over three warm-up optimizer steps."""
    from egspo.cli import run

    cli = run([*args, *extra], run=False)
    cli.model.configure_model()
    trainable = {n: p for n, p in cli.model.policy.named_parameters() if p.requires_grad}
    before = {n: p.detach().float().clone() for n, p in trainable.items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3
    return {n: p.detach().float() - before[n] for n, p in trainable.items()}


def _projection(realised: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """How much of the reference (fp32) update the realised one carries: <d, d_ref> / |d_ref|^2."""
    dot = sum(float((realised[n] * reference[n]).sum()) for n in reference)
    norm = sum(float(reference[n].square().sum()) for n in reference)
    return dot / norm


@pytest.mark.parametrize("recipe", RECIPES)
def test_tiny_learning_rates_are_not_rounded_away(
    recipe, tmp_path, base_dir, gsm8k_train_path, gsm8k_test_path
):
    """Three steps at lr 1e-6 with the recipe's precision and dtype realise >= 80% of the fp32 update."""
    args = _recipe_args(recipe, tmp_path, base_dir, gsm8k_train_path, gsm8k_test_path)
    three_steps = [
        "--model.sft_iterations=3",
        "--model.rl_iterations=0",
        "--model.optimizer.init_args.lr=1e-6",
        "--data.expert_per_step=8",
        "--model.update.sft_batch_size=8",
        "--trainer.limit_val_batches=0",
    ]
    realised = _sft_update(args, *three_steps)
    reference = _sft_update(args, *three_steps, "--trainer.precision=32-true", "--model.policy.dtype=float32")
    share = _projection(realised, reference)
    assert share >= 0.8, f"{recipe}: the recipe realises {share:.1%} of the fp32 update"
    if recipe == "qwen_math.yaml":  # the test has teeth: pure-bf16 weights lose most of the update
        pure_bf16 = _sft_update(
            args, *three_steps, "--trainer.precision=bf16-true", "--model.policy.dtype=bfloat16"
        )
        assert _projection(pure_bf16, reference) < 0.5


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_sft_then_rl_as_shipped(recipe, tmp_path, base_dir, gsm8k_train_path, gsm8k_test_path):
    from egspo.cli import run

    args = _recipe_args(recipe, tmp_path, base_dir, gsm8k_train_path, gsm8k_test_path)
    cli = run([*args, "--model.sft_iterations=1", "--model.rl_iterations=1"], run=False)
    cli.model.configure_model()
    trainable = [p for p in cli.model.policy.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable), "trained weights must be fp32 master weights"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    module = cli.model
    assert module.iteration == 2
    assert set(module.summary.phases) == {"sft", "rl"}
    metrics = cli.trainer.logged_metrics
    assert torch.isfinite(metrics["train/rl_loss"]) and torch.isfinite(metrics["train/sft_loss"])
    # The rollout batch (16 or 8 prompts x 8) split into the recipe's mini-batches, each packed
    # under its token budget: more than one optimizer step per RL iteration.
    assert cli.trainer.global_step > 2
