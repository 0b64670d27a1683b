import itertools

import pytest
import torch

from egspo.ops import TokenScores, fused_logprobs_entropy
from egspo.ops.fused_logprobs import default_chunk_size

N, D, V = 23, 16, 40


def reference(hidden, weight, targets, temperature=1.0, bias=None, logit_scale=1.0, softcap=None):
    """Dense computation of what the fused op returns, from full [N, V] logits."""
    raw = hidden @ weight.t() + (0.0 if bias is None else bias)
    logits = logit_scale * raw if softcap is None else softcap * torch.tanh(logit_scale * raw / softcap)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    p = logp.exp()
    logprobs = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    entropy = -(p * logp).sum(-1)
    centred = logp + entropy.unsqueeze(1)  # log p_v + H
    polarity = logprobs.exp() * centred.gather(1, targets.unsqueeze(1)).squeeze(1) - (p * p * centred).sum(-1)
    return TokenScores(logprobs, entropy.detach(), polarity.detach())


def make(n=N, d=D, v=V, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=dtype)
    weight = torch.randn(v, d, generator=gen, dtype=dtype) * 0.7
    targets = torch.randint(0, v, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen, dtype=torch.float32)
    return hidden, weight, targets, upstream


def grads(fn, hidden, weight, targets, upstream, weight_grad=True, **kwargs):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(weight_grad)
    logprobs, entropy = fn(h, w, targets, **kwargs)[:2]
    (logprobs * upstream).sum().backward()
    return logprobs.detach(), entropy, h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [1, 5, 23, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_matches_full_logits_values_and_grads(chunk_size, temperature):
    hidden, weight, targets, upstream = make()
    lp, ent, gh, gw = grads(
        fused_logprobs_entropy,
        hidden,
        weight,
        targets,
        upstream,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    lp_ref, ent_ref, gh_ref, gw_ref = grads(
        reference, hidden, weight, targets, upstream, temperature=temperature
    )
    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ent_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gh, gh_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=0, atol=1e-5)
    assert not ent.requires_grad


@pytest.mark.parametrize("chunk_size", [4, 100])
def test_frozen_weight_gets_no_grad_and_hidden_grad_matches(chunk_size):
    hidden, weight, targets, upstream = make(seed=1)
    lp, ent, gh, gw = grads(
        fused_logprobs_entropy,
        hidden,
        weight,
        targets,
        upstream,
        weight_grad=False,
        temperature=0.8,
        chunk_size=chunk_size,
    )
    lp_ref, ent_ref, gh_ref, _ = grads(
        reference, hidden, weight, targets, upstream, weight_grad=False, temperature=0.8
    )
    assert gw is None
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ent_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gh, gh_ref, rtol=0, atol=1e-5)


def test_weight_only_grad_and_no_grad_mode():
    hidden, weight, targets, upstream = make(seed=2)
    w = weight.clone().requires_grad_(True)
    logprobs = fused_logprobs_entropy(hidden, w, targets, chunk_size=7).logprobs
    (logprobs * upstream).sum().backward()
    _, _, _, gw_ref = grads(reference, hidden, weight, targets, upstream)
    torch.testing.assert_close(w.grad, gw_ref, rtol=0, atol=1e-5)
    with torch.no_grad():
        lp, ent, polarity = fused_logprobs_entropy(hidden.requires_grad_(), weight, targets, chunk_size=7)
    assert not lp.requires_grad and not ent.requires_grad and polarity is None
    torch.testing.assert_close(lp, reference(hidden.detach(), weight, targets)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("weight_grad", [True, False])
def test_gradcheck_float64(weight_grad):
    hidden, weight, targets, _ = make(n=5, d=3, v=7, dtype=torch.float64, seed=3)
    hidden.requires_grad_(True)
    weight.requires_grad_(weight_grad)
    lp, ent, _ = fused_logprobs_entropy(hidden, weight, targets, temperature=0.9, chunk_size=2)
    assert lp.dtype == ent.dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda h, w: fused_logprobs_entropy(h, w, targets, temperature=0.9, chunk_size=2)[0], (hidden, weight)
    )


def test_non_contiguous_inputs():
    hidden, weight, targets, upstream = make(seed=4)
    padded = torch.stack([hidden, torch.zeros_like(hidden)], dim=2).requires_grad_(True)  # [N, D, 2]
    hidden_nc = padded[..., 0]  # same values, stride 2
    weight_nc = weight.t().contiguous().t().requires_grad_(True)  # column-major
    assert not hidden_nc.is_contiguous() and not weight_nc.is_contiguous()
    lp = fused_logprobs_entropy(hidden_nc, weight_nc, targets, chunk_size=6).logprobs
    (lp * upstream).sum().backward()
    lp_ref, _, gh_ref, gw_ref = grads(reference, hidden, weight, targets, upstream)
    torch.testing.assert_close(lp.detach(), lp_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded.grad[..., 0], gh_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(weight_nc.grad, gw_ref, rtol=0, atol=1e-5)


def test_empty_input():
    hidden, weight, _, _ = make()
    h = hidden[:0].clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lp, ent, polarity = fused_logprobs_entropy(h, w, torch.zeros(0, dtype=torch.long), with_polarity=True)
    assert lp.shape == ent.shape == polarity.shape == (0,)
    lp.sum().backward()
    assert h.grad.shape == (0, D) and torch.equal(w.grad, torch.zeros_like(w))


def test_bf16_close_to_fp32_reference():
    hidden, weight, targets, upstream = make(n=40, d=32, v=300, seed=5)
    lp, ent, gh, gw = grads(
        fused_logprobs_entropy,
        hidden.bfloat16(),
        weight.bfloat16(),
        targets,
        upstream,
        temperature=0.7,
        chunk_size=16,
    )
    lp_ref, ent_ref, gh_ref, gw_ref = grads(reference, hidden, weight, targets, upstream, temperature=0.7)
    assert lp.dtype == ent.dtype == torch.float32
    assert gh.dtype == gw.dtype == torch.bfloat16
    # bf16 rounds inputs and logits to ~3 significant digits; logits here reach ~|20|.
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=0.5)
    torch.testing.assert_close(ent, ent_ref, rtol=0, atol=0.2)
    assert (lp - lp_ref).abs().mean() < 0.1
    for got, ref in ((gh, gh_ref), (gw, gw_ref)):
        assert (got.float() - ref).norm() / ref.norm() < 0.05


def test_rejects_bad_targets_and_shapes():
    hidden, weight, targets, _ = make()
    with pytest.raises(ValueError, match="-100"):
        fused_logprobs_entropy(hidden, weight, targets.clone().fill_(-100))
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        fused_logprobs_entropy(hidden, weight, torch.full_like(targets, V))
    with pytest.raises(ValueError, match="weight"):
        fused_logprobs_entropy(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="targets"):
        fused_logprobs_entropy(hidden, weight, targets[:3])


def test_default_chunk_size_bounds_block_memory():
    assert default_chunk_size(151936) == 384
    assert default_chunk_size(32000) == 2048
    assert default_chunk_size(10**8) == 64


HEADS = {
    "bias": {"bias": True},
    "scale": {"logit_scale": 0.3},
    "softcap": {"softcap": 1.5},
    "all": {"bias": True, "logit_scale": 2.0, "softcap": 2.5},
}


def head_kwargs(spec, v=V, dtype=torch.float32, seed=11):
    kwargs = dict(spec)
    if kwargs.pop("bias", False):
        kwargs["bias"] = torch.randn(v, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return kwargs


@pytest.mark.parametrize("weight_grad", [True, False], ids=["weight-grad", "frozen-weight"])
@pytest.mark.parametrize("chunk_size", [3, 64])
@pytest.mark.parametrize("spec", HEADS.values(), ids=HEADS.keys())
def test_bias_scale_and_softcap_match_dense_values_and_grads(spec, chunk_size, weight_grad):
    hidden, weight, targets, upstream = make(seed=6)
    kwargs = head_kwargs(spec)
    results = []
    for fn in (fused_logprobs_entropy, reference):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(weight_grad)
        extra = dict(kwargs)
        if "bias" in extra:
            extra["bias"] = extra["bias"].clone().requires_grad_(weight_grad)
        if fn is fused_logprobs_entropy:
            extra.update(chunk_size=chunk_size, with_polarity=True)
        scores = fn(h, w, targets, temperature=0.8, **extra)
        (scores.logprobs * upstream).sum().backward()
        bias_grad = extra["bias"].grad if "bias" in extra else None
        results.append((scores.logprobs.detach(), scores.entropy, scores.polarity, h.grad, w.grad, bias_grad))
    for name, got, want in zip(["logprobs", "entropy", "polarity", "h", "w", "b"], *results, strict=True):
        if want is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("weight_grad", [True, False])
def test_gradcheck_float64_with_bias_scale_and_softcap(weight_grad):
    hidden, weight, targets, _ = make(n=5, d=3, v=7, dtype=torch.float64, seed=8)
    bias = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hidden.requires_grad_(True)
    weight.requires_grad_(weight_grad)
    bias.requires_grad_(weight_grad)

    def logprobs(h, w, b):
        return fused_logprobs_entropy(
            h, w, targets, bias=b, logit_scale=1.7, softcap=2.0, temperature=0.9, chunk_size=2
        ).logprobs

    assert torch.autograd.gradcheck(logprobs, (hidden, weight, bias))


def test_bf16_with_head_transforms_close_to_fp32_reference():
    hidden, weight, targets, _ = make(n=40, d=32, v=300, seed=9)
    kwargs = head_kwargs(HEADS["all"], v=300)
    got = fused_logprobs_entropy(
        hidden.bfloat16(), weight.bfloat16(), targets, temperature=0.7, chunk_size=16, **kwargs
    )
    want = reference(hidden, weight, targets, temperature=0.7, **kwargs)
    # the soft-cap bounds the logits (|z| <= 2.5), so bf16 rounding of inputs moves them little
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=0.05)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=0, atol=0.05)


def test_polarity_matches_dense_reference_and_carries_no_gradient():
    hidden, weight, targets, _ = make(seed=10)
    h = hidden.clone().requires_grad_(True)
    scores = fused_logprobs_entropy(h, weight, targets, temperature=1.3, chunk_size=5, with_polarity=True)
    assert scores.logprobs.requires_grad
    assert not scores.entropy.requires_grad and not scores.polarity.requires_grad
    assert scores.polarity.dtype == torch.float32
    torch.testing.assert_close(
        scores.polarity, reference(hidden, weight, targets, temperature=1.3).polarity, rtol=0, atol=1e-6
    )
    assert fused_logprobs_entropy(hidden, weight, targets).polarity is None


def _logit_rows(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> TokenScores:
    """Scores of given logit rows: identity weight, so the op's raw logits are the rows themselves."""
    v = logits.shape[1]
    eye = torch.eye(v, dtype=logits.dtype)
    return fused_logprobs_entropy(logits, eye, targets, temperature=temperature, with_polarity=True)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_polarity_is_first_order_entropy_change_of_one_sgd_step(temperature):
    """A step ``z += eta * A * d logp_a / dz`` changes the entropy by ``-eta * A * P / T^2 + O(eta^2)``."""
    gen = torch.Generator().manual_seed(12)
    for trial in range(5):
        z = torch.randn(1, 17, generator=gen, dtype=torch.float64) * 2
        a = torch.randint(0, 17, (1,), generator=gen)
        advantage = 1.0 if trial % 2 else -0.6
        polarity = _logit_rows(z, a, temperature).polarity.item()
        assert abs(polarity) > 1e-4  # the check is not vacuous
        errors = []
        for eta in (1e-3, 1e-4, 1e-5, 1e-6):
            logits = z.clone().requires_grad_(True)
            logp = torch.log_softmax(logits / temperature, -1)[0, a]
            (grad,) = torch.autograd.grad(logp.sum(), logits)
            stepped = z + eta * advantage * grad

            def entropy(x):
                logq = torch.log_softmax(x / temperature, -1)
                return -(logq.exp() * logq).sum().item()

            observed = entropy(stepped) - entropy(z)
            predicted = -eta * advantage * polarity / temperature**2
            errors.append(abs(observed / predicted - 1))
        # the relative error is the second-order term: it shrinks like eta
        for big, small in itertools.pairwise(errors[:3]):
            assert 5 < big / small < 20
        assert errors[-1] < 1e-4


def test_polarity_has_zero_mean_under_the_policy_and_vanishes_for_uniform():
    gen = torch.Generator().manual_seed(13)
    v = 23
    for temperature in (1.0, 0.6):
        z = torch.randn(1, v, generator=gen, dtype=torch.float64) * 3
        every_target = _logit_rows(z.expand(v, v), torch.arange(v), temperature)
        p = every_target.logprobs.exp()
        assert every_target.polarity.abs().max() > 1e-3
        assert abs((p * every_target.polarity).sum().item()) < 1e-12
    uniform = _logit_rows(torch.zeros(v, v, dtype=torch.float64), torch.arange(v))
    assert uniform.polarity.abs().max().item() < 1e-12


def test_rejects_bad_head_options():
    hidden, weight, targets, _ = make()
    with pytest.raises(ValueError, match="bias"):
        fused_logprobs_entropy(hidden, weight, targets, bias=torch.zeros(V + 1))
    with pytest.raises(ValueError, match="logit_scale"):
        fused_logprobs_entropy(hidden, weight, targets, logit_scale=0.0)
    with pytest.raises(ValueError, match="softcap"):
        fused_logprobs_entropy(hidden, weight, targets, softcap=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        fused_logprobs_entropy(hidden, weight, targets, temperature=0.0)
