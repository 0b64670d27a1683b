"""End-to-end `fit` through the CLI: a tiny model, every method, real rollouts and rewards."""

from pathlib import Path

import pytest
import torch
from tiny_model import tiny_qwen2_json

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["grpo", "dapo", "chord_phi", "ce_gppo", "espo", "egspo", "egspo_mu", "papo", "oger", "uec_rl"]
METHODS += ["gspo", "cispo", "clip_cov", "kl_cov", "top_entropy", "dr_grpo"]
TINY_MODEL = tiny_qwen2_json(max_position_embeddings=512)

pytestmark = pytest.mark.slow


def tiny_args(tmp_path: Path, *configs: str, sft: int = 2, rl: int = 2) -> list[str]:
    args = ["fit"]
    for config in configs:
        args += ["--config", str(ROOT / config)]
    return [
        *args,
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--model.sft_iterations={sft}",
        f"--model.rl_iterations={rl}",
        "--model.rollout.num_generations=4",
        "--model.rollout.max_completion_length=12",
    ]


def _fit(tmp_path: Path, *configs: str, extra: tuple[str, ...] = (), sft: int = 2, rl: int = 2):
    from egspo.cli import run

    cli = run(tiny_args(tmp_path, *configs, sft=sft, rl=rl) + list(extra), run=False)
    cli.model.configure_model()
    before = {k: v.detach().clone() for k, v in cli.model.policy.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, before


DEMO_SMALL = (
    "--data.prompts_per_step=2",
    "--data.expert_per_step=4",
    "--data.eval_size=8",
    "--data.eval_batch_size=8",
)


@pytest.mark.parametrize("method", METHODS)
def test_fit_every_method_switches_phase_and_learns(tmp_path, method):
    cli, before = _fit(tmp_path, "configs/demo.yaml", f"configs/method/{method}.yaml", extra=DEMO_SMALL)
    module = cli.model
    assert module.iteration == 4 and module.phase == "rl"
    metrics = cli.trainer.logged_metrics
    for key in ("train/sft_loss", "train/rl_loss", "reward", "entropy"):
        assert key in metrics, key
        assert torch.isfinite(metrics[key]), key
    assert set(module.summary.phases) == {"sft", "rl"}
    if method == "egspo":  # the demo's GateScheduler ramps the quantile to 0.8 by the last RL iteration
        assert module.policy_loss.gate.value == pytest.approx(0.8)
    after = module.policy.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no weight changed"
    summary = Path(module.trainer.log_dir) / "summary.json"
    assert summary.is_file()
    import json

    data = json.loads(summary.read_text())
    assert 0.0 <= data["sft"]["accuracy"] <= 1.0 and 0.0 <= data["rl"]["accuracy"] <= 1.0
    assert data["run_dir"] == str(summary.parent)


def test_method_overlay_selects_its_loss(tmp_path):
    from egspo.cli import run
    from egspo.losses import (
        CEGPPOLoss,
        ChordPhiLoss,
        CISPOLoss,
        ClipCovLoss,
        EGSPOLoss,
        ESPOLoss,
        GSPOLoss,
        KLCovLoss,
        NLLLoss,
        PAPOLoss,
        PPOClipLoss,
    )

    expected = {
        "grpo": (PPOClipLoss, 0.2, 0.0),
        "dapo": (PPOClipLoss, 0.28, 0.0),
        "chord_phi": (PPOClipLoss, 0.2, 0.1),
        "ce_gppo": (CEGPPOLoss, 0.2, 0.0),
        "espo": (ESPOLoss, None, 0.0),
        "egspo": (EGSPOLoss, 0.2, 0.0),
        "egspo_mu": (EGSPOLoss, 0.2, 0.1),
        "papo": (PAPOLoss, 0.2, 0.0),
        "oger": (PPOClipLoss, 0.2, 0.0),
        "uec_rl": (PPOClipLoss, 0.2, 0.0),
        "gspo": (GSPOLoss, 4e-4, 0.0),
        "cispo": (CISPOLoss, 4.0, 0.0),
        "clip_cov": (ClipCovLoss, 0.2, 0.0),
        "kl_cov": (KLCovLoss, None, 0.0),
        "top_entropy": (EGSPOLoss, 0.2, 0.0),
        "dr_grpo": (PPOClipLoss, 0.2, 0.0),
    }
    for method, (cls, clip_high, mu) in expected.items():
        cli = run(tiny_args(tmp_path, "configs/demo.yaml", f"configs/method/{method}.yaml"), run=False)
        loss = cli.model.policy_loss
        assert type(loss) is cls, method
        if clip_high is not None:
            assert loss.clip_high == clip_high, method
        assert cli.model.mu(0) == mu, method
        # The CHORD overlay changes the loss mixed into RL, never the warm-up's.
        assert isinstance(cli.model.policy_update.mix_loss, ChordPhiLoss) == (
            method in ("chord_phi", "egspo_mu")
        )
        plugins = [type(m).__name__ for m in cli.model.methods]
        assert plugins == {"oger": ["OGER"], "uec_rl": ["UECRL"]}.get(method, [])
        assert type(cli.model.policy_update.warmup_loss) is NLLLoss
        if method == "top_entropy":  # the 80/20 selection: EGSPO with phi = 0
            assert loss.low_entropy_weight == 0.0
        if method == "dr_grpo":
            assert loss.loss_agg_mode == "seq-mean-token-sum-norm"
            assert cli.model.experience_builder.config.advantage_scale == "none"
