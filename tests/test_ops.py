import pytest
import torch

from egspo.ops import fused_logprobs_entropy
from egspo.ops.fused_logprobs import default_chunk_size

N, D, V = 23, 16, 40


def reference(hidden, weight, targets, temperature=1.0):
    logp = torch.log_softmax((hidden @ weight.t()) / temperature, dim=-1)
    logprobs = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy.detach()


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
    logprobs, entropy = fn(h, w, targets, **kwargs)
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
    logprobs, _ = fused_logprobs_entropy(hidden, w, targets, chunk_size=7)
    (logprobs * upstream).sum().backward()
    _, _, _, gw_ref = grads(reference, hidden, weight, targets, upstream)
    torch.testing.assert_close(w.grad, gw_ref, rtol=0, atol=1e-5)
    with torch.no_grad():
        lp, ent = fused_logprobs_entropy(hidden.requires_grad_(), weight, targets, chunk_size=7)
    assert not lp.requires_grad and not ent.requires_grad
    torch.testing.assert_close(lp, reference(hidden.detach(), weight, targets)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("weight_grad", [True, False])
def test_gradcheck_float64(weight_grad):
    hidden, weight, targets, _ = make(n=5, d=3, v=7, dtype=torch.float64, seed=3)
    hidden.requires_grad_(True)
    weight.requires_grad_(weight_grad)
    lp, ent = fused_logprobs_entropy(hidden, weight, targets, temperature=0.9, chunk_size=2)
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
    lp, _ = fused_logprobs_entropy(hidden_nc, weight_nc, targets, chunk_size=6)
    (lp * upstream).sum().backward()
    lp_ref, _, gh_ref, gw_ref = grads(reference, hidden, weight, targets, upstream)
    torch.testing.assert_close(lp.detach(), lp_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded.grad[..., 0], gh_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(weight_nc.grad, gw_ref, rtol=0, atol=1e-5)


def test_empty_input():
    hidden, weight, _, _ = make()
    h = hidden[:0].clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lp, ent = fused_logprobs_entropy(h, w, torch.zeros(0, dtype=torch.long))
    assert lp.shape == ent.shape == (0,)
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
