import pytest
import torch

from egspo.losses import CEGPPOLoss, PPOClipLoss, TokenBatch


def make_batch(ratios, adv, mask=None):
    ratios = torch.as_tensor(ratios, dtype=torch.float32)
    old = torch.full_like(ratios, -2.0)
    return TokenBatch(
        logprobs=(old + torch.log(ratios)).requires_grad_(),
        old_logprobs=old,
        advantages=torch.as_tensor(adv, dtype=torch.float32),
        entropy=torch.ones_like(old),
        mask=torch.ones_like(old) if mask is None else torch.as_tensor(mask, dtype=torch.float32),
    )


def grad_of(loss_fn, batch):
    out = loss_fn(batch)
    out.loss.backward()
    return out, batch.logprobs.grad


def test_identical_to_ppo_where_ppo_does_not_clip():
    gen = torch.Generator().manual_seed(0)
    inside = 0.85 + 0.3 * torch.rand(4, 16, generator=gen)  # r in [0.85, 1.15]
    adv = torch.randn(4, 16, generator=gen)
    # also PPO's unclipped outer regions: A > 0 with small r, A < 0 with large r (below dual clip)
    ratios = torch.cat([inside, torch.tensor([[0.3] * 8 + [1.7] * 8])])
    adv = torch.cat([adv, torch.tensor([[0.5] * 8 + [-0.5] * 8])])
    out, grad = grad_of(CEGPPOLoss(), make_batch(ratios, adv))
    ppo_out, ppo_grad = grad_of(PPOClipLoss(dual_clip=10.0), make_batch(ratios, adv))
    assert torch.equal(out.loss, ppo_out.loss)
    assert torch.equal(grad, ppo_grad)
    assert out.metrics["clip_frac_low"].item() == out.metrics["clip_frac_high"].item() == 0.0


def test_clipped_tokens_keep_a_bounded_gradient():
    # inside (A=1), low region (r<0.8, A=-2), high region (r>1.2, A=3), dual clip (r>10, A=-1)
    ratios, adv = [[1.0, 0.5, 1.5, 20.0]], [[1.0, -2.0, 3.0, -1.0]]
    out, grad = grad_of(CEGPPOLoss(beta_low=0.75, beta_high=1.0), make_batch(ratios, adv))
    _, ppo_grad = grad_of(PPOClipLoss(dual_clip=10.0), make_batch(ratios, adv))
    objectives = [1.0, 0.75 * 0.8 * -2.0, 1.0 * 1.2 * 3.0, 10.0 * -1.0]
    assert out.loss.item() == pytest.approx(-sum(objectives) / 4)
    # loss gradient wrt logp: -beta (1 -/+ eps) A / n_tokens outside the interval, where PPO's is 0
    expected = torch.tensor([[-1.0, 0.75 * 0.8 * 2.0, -1.0 * 1.2 * 3.0, 0.0]]) / 4
    torch.testing.assert_close(grad, expected)
    assert ppo_grad[0, 1].item() == ppo_grad[0, 2].item() == 0.0
    assert out.metrics["clip_frac_low"].item() == pytest.approx(0.25)
    assert out.metrics["clip_frac_high"].item() == pytest.approx(0.25)
    assert out.metrics["clip_frac_dual"].item() == pytest.approx(0.25)


def test_clipped_gradient_does_not_depend_on_ratio_size():
    far, near = [[0.1, 5.0]], [[0.7, 1.3]]
    adv = [[-1.0, 1.0]]
    _, grad_far = grad_of(CEGPPOLoss(dual_clip=None), make_batch(far, adv))
    _, grad_near = grad_of(CEGPPOLoss(dual_clip=None), make_batch(near, adv))
    torch.testing.assert_close(grad_far, grad_near)
    torch.testing.assert_close(grad_far, torch.tensor([[0.75 * 0.8, -1.2]]) / 2)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [({"beta_low": -0.1}, "beta_low"), ({"beta_high": -1.0}, "beta_high"), ({"dual_clip": 1.0}, "dual_clip")],
)
def test_invalid_arguments_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        CEGPPOLoss(**kwargs)
