import json
import math

import pytest
import torch

from egspo.losses import CEGPPOLoss, PPOClipLoss, TokenBatch, kl_penalty

OLD = -1.0
# Row 0: inside, clipped high (A>0, r>1.2), clipped low (A<0, r<0.8), inside.
# Row 1: A>0 with r<0.8 and A<0 with r>1.2 (PPO does not clip these), then padding.
RATIOS = [[1.0, 1.5, 0.5, 1.1], [0.5, 1.5, 1.0, 1.0]]
ADV = [[1.0, 1.0, -1.0, -2.0], [1.0, -1.0, 0.0, 0.0]]
MASK = [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]


def make_batch(ratios=RATIOS, adv=ADV, mask=MASK, ref=None):
    old = torch.full((len(ratios), len(ratios[0])), OLD)
    logprobs = (old + torch.log(torch.tensor(ratios))).requires_grad_()
    ref_logprobs = None if ref is None else torch.tensor(ref)
    return TokenBatch(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=torch.tensor(adv),
        entropy=torch.ones_like(old),
        mask=torch.tensor(mask),
        ref_logprobs=ref_logprobs,
    )


def run(loss_fn, batch):
    out = loss_fn(batch)
    out.loss.backward()
    return out, batch.logprobs.grad


def test_ppo_hand_values_and_gradients():
    out, grad = run(PPOClipLoss(), make_batch())
    objectives = [1.0, 1.2, -0.8, -2.2, 0.5, -1.5]
    assert out.loss.item() == pytest.approx(-sum(objectives) / 6)
    # d objective / d logp = r A where unclipped, 0 where clipped; loss = -sum / 6
    expected = torch.tensor([[-1.0, 0.0, 0.0, 2.2], [-0.5, 1.5, 0.0, 0.0]]) / 6
    torch.testing.assert_close(grad, expected)
    m = out.metrics
    assert m["clip_frac_low"].item() == pytest.approx(1 / 6)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 6)
    assert m["clip_frac_dual"].item() == 0.0
    assert m["ratio_mean"].item() == pytest.approx((1 + 1.5 + 0.5 + 1.1 + 0.5 + 1.5) / 6)
    log_r = [math.log(r) for r in (1, 1.5, 0.5, 1.1, 0.5, 1.5)]
    assert m["approx_kl"].item() == pytest.approx(sum(0.5 * x * x for x in log_r) / 6)
    assert m["pg_loss"].item() == pytest.approx(out.loss.item())
    assert "kl" not in m
    assert all(not v.requires_grad for v in m.values())


def test_dual_clip_bounds_negative_advantage_tokens():
    out, grad = run(PPOClipLoss(dual_clip=1.4), make_batch())
    objectives = [1.0, 1.2, -0.8, -2.2, 0.5, -1.4]  # r=1.5, A=-1: max(-1.5, 1.4 * -1)
    assert out.loss.item() == pytest.approx(-sum(objectives) / 6)
    assert grad[1, 1].item() == 0.0
    assert grad[0, 3].item() == pytest.approx(2.2 / 6)  # r=1.1 < c: untouched
    assert out.metrics["clip_frac_dual"].item() == pytest.approx(1 / 6)


def test_clip_high_dapo_widens_upper_range_only():
    batch_kwargs = {"ratios": [[1.25, 0.75]], "adv": [[1.0, -1.0]], "mask": [[1.0, 1.0]]}
    _, grpo = run(PPOClipLoss(), make_batch(**batch_kwargs))
    _, dapo = run(PPOClipLoss(clip_high=0.28), make_batch(**batch_kwargs))
    assert grpo[0, 0].item() == 0.0
    assert dapo[0, 0].item() == pytest.approx(-1.25 / 2)
    assert grpo[0, 1].item() == dapo[0, 1].item() == 0.0


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", 1.8 / 6),
        ("seq-mean-token-mean", (0.8 / 4 + 1.0 / 2) / 2),
        ("seq-mean-token-sum", (0.8 + 1.0) / 2),
        ("seq-mean-token-sum-norm", (0.8 / 8 + 1.0 / 8) / 2),
    ],
)
def test_ppo_aggregation_modes(mode, expected):
    out = PPOClipLoss(loss_agg_mode=mode, norm_constant=8.0 if mode.endswith("norm") else None)(make_batch())
    assert out.loss.item() == pytest.approx(expected)


def test_dr_grpo_constant_comes_from_setup_not_the_batch_width():
    loss_fn = PPOClipLoss(loss_agg_mode="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="setup"):
        loss_fn(make_batch())
    loss_fn.setup(vocab_size=100, max_completion_length=8)
    assert loss_fn.norm_constant == 8.0
    assert loss_fn(make_batch()).loss.item() == pytest.approx((0.8 / 8 + 1.0 / 8) / 2)
    explicit = PPOClipLoss(loss_agg_mode="seq-mean-token-sum-norm", norm_constant=2.0)
    explicit.setup(vocab_size=100, max_completion_length=8)
    assert explicit.norm_constant == 2.0  # an option set explicitly is kept


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"vocab_size": 1, "max_completion_length": 8}, "vocab_size"),
        ({"vocab_size": 10, "max_completion_length": 0}, "max_completion_length"),
        ({"vocab_size": 10.0, "max_completion_length": 8}, "vocab_size"),
    ],
)
def test_setup_validates_its_arguments(kwargs, option):
    with pytest.raises(ValueError, match=option):
        PPOClipLoss().setup(**kwargs)


def test_stateless_loss_state_dict_is_empty_and_strict():
    loss_fn = PPOClipLoss()
    assert loss_fn.state_dict() == {}
    loss_fn.load_state_dict({})
    with pytest.raises(ValueError, match="balance"):
        loss_fn.load_state_dict({"balance": 0.1})


def test_kl_term_is_added_with_beta():
    ref = [[-1.2, -0.9, -1.0, -1.0], [-1.0, -1.0, 5.0, 5.0]]
    batch = make_batch(ref=ref)
    out = PPOClipLoss(beta=0.1, kl_estimator="k2")(batch)
    kl = kl_penalty(batch.logprobs, batch.ref_logprobs, "k2")
    expected_kl = kl[batch.mask > 0].mean()
    torch.testing.assert_close(out.metrics["kl"], expected_kl.detach())
    assert out.loss.item() == pytest.approx(1.8 / 6 + 0.1 * expected_kl.item())


def test_kl_without_reference_raises():
    with pytest.raises(ValueError, match="ref_logprobs"):
        PPOClipLoss(beta=0.05)(make_batch())


def test_low_precision_inputs_give_float32_loss():
    batch = make_batch()
    batch.logprobs = batch.logprobs.detach().bfloat16().requires_grad_()
    out = PPOClipLoss()(batch)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert batch.logprobs.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"clip_low": 1.0}, "clip_low"),
        ({"clip_high": -0.1}, "clip_high"),
        ({"dual_clip": 0.9}, "dual_clip"),
        ({"loss_agg_mode": "mean"}, "loss_agg_mode"),
        ({"beta": -1.0}, "beta"),
        ({"kl_estimator": "k5"}, "kl_estimator"),
    ],
)
def test_invalid_arguments_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        PPOClipLoss(**kwargs)


def test_token_batch_checks_shapes():
    with pytest.raises(ValueError, match="advantages"):
        TokenBatch(
            logprobs=torch.zeros(2, 3),
            old_logprobs=torch.zeros(2, 3),
            advantages=torch.zeros(2),
            entropy=torch.zeros(2, 3),
            mask=torch.ones(2, 3),
        )


@pytest.mark.parametrize(
    ("class_path", "init_args"),
    [
        (
            "PPOClipLoss",
            {"clip_high": 0.28, "loss_agg_mode": "seq-mean-token-sum-norm", "norm_constant": 512},
        ),
        (
            "EGSPOLoss",
            {"clip_low": 0.1, "dual_clip": 3.0, "gate": {"value": 0.7}, "low_entropy_weight": "p(1-p)"},
        ),
        ("CEGPPOLoss", {"clip_high": 0.28, "beta_low": 0.5, "beta": 0.01, "kl_estimator": "k2"}),
        ("PAPOLoss", {"clip_high": 0.28, "gain": 2.0, "target_entropy": 0.6}),
        ("ESPOLoss", {"alpha": 0.05, "beta": 0.01}),
    ],
)
def test_yaml_init_args_name_every_option(class_path, init_args):
    """The losses are chosen by class_path in YAML; shared options reach the base through **kwargs."""
    jsonargparse = pytest.importorskip("jsonargparse")
    from egspo.losses import PolicyLoss

    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--loss", type=PolicyLoss)
    spec = {"class_path": f"egspo.losses.{class_path}", "init_args": init_args}
    loss = parser.instantiate(parser.parse_args([f"--loss={json.dumps(spec)}"])).loss
    assert type(loss).__name__ == class_path
    for name, value in init_args.items():
        if name == "gate":
            assert loss.gate.value == value["value"]
        else:
            assert getattr(loss, name) == value, name
    typo = {"class_path": spec["class_path"], "init_args": {"clip_hihg": 0.3}}
    with pytest.raises(jsonargparse.ArgumentError, match="clip_hihg"):
        parser.parse_args([f"--loss={json.dumps(typo)}"])


def test_cegppo_keeps_its_dual_clip_default():
    assert CEGPPOLoss().dual_clip == 10.0
    assert PPOClipLoss().dual_clip is None
