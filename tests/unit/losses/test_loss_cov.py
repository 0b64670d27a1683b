"""Clip-Cov and KL-Cov against plain references: the covariance, the token sets, values, gradients,
padding, micro-batching, the generator's resume, and the centring over all ranks (two gloo processes)."""

from dataclasses import fields, replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port

from egspo.losses import ClipCovLoss, KLCovLoss, PPOClipLoss, TokenBatch, aggregation_units

# Two responses of 4 and 3 valid tokens, one of 2: advantages per response.
OLD = [[-0.2, -3.0, -0.5, -2.5], [-4.0, -0.1, -1.0, 0.0], [-0.3, -2.0, 0.0, 0.0]]
ADV = [[1.5] * 4, [-1.0] * 4, [0.4] * 4]
MASK = [[1.0] * 4, [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
N = 9


def make_batch(log_r=None, old=OLD, adv=ADV, mask=MASK, pad_value=0.0) -> TokenBatch:
    old_t, mask_t = torch.tensor(old, dtype=torch.float64), torch.tensor(mask)
    log_r_t = torch.zeros_like(old_t) if log_r is None else torch.tensor(log_r, dtype=torch.float64)
    logprobs = torch.where(mask_t > 0, old_t + log_r_t, torch.full_like(old_t, pad_value))
    return TokenBatch(
        logprobs=logprobs.requires_grad_(),
        old_logprobs=old_t,
        advantages=torch.tensor(adv, dtype=torch.float64),
        entropy=torch.ones(old_t.shape),
        mask=mask_t,
    )


def valid_tokens(batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    valid = batch.mask > 0
    return batch.old_logprobs[valid], batch.advantages[valid]


def reference_covariance(batch: TokenBatch, rollout: TokenBatch | None = None) -> torch.Tensor:
    """Plain loops: (logp_t - mean logp)(A_t - mean A) over the valid tokens, 0 elsewhere; the means
    are the rollout batch's (its old log-probs), the log-prob is the current one."""
    lp, adv = valid_tokens(batch if rollout is None else rollout)
    lp_mean, adv_mean = sum(lp.tolist()) / len(lp), sum(adv.tolist()) / len(adv)
    cov = torch.zeros(batch.mask.shape, dtype=torch.float64)
    for i in range(cov.shape[0]):
        for t in range(cov.shape[1]):
            if batch.mask[i, t] > 0:
                cov[i, t] = (float(batch.logprobs[i, t].detach()) - lp_mean) * (
                    float(batch.advantages[i, t]) - adv_mean
                )
    return cov


def prepared(loss, batch):
    loss.prepare_rollout_tokens(*valid_tokens(batch))
    return loss


# ---------------------------------------------------------------------- the covariance
def test_covariance_is_centred_over_the_valid_tokens():
    batch = make_batch()
    loss = prepared(KLCovLoss(), batch)
    lp, adv = valid_tokens(batch)
    assert loss.num_tokens == N
    assert loss.logprob_mean == pytest.approx(float(lp.mean()))
    assert loss.advantage_mean == pytest.approx(float(adv.mean()))
    cov = loss.covariance(batch)
    torch.testing.assert_close(cov[batch.mask > 0], reference_covariance(batch)[batch.mask > 0])


def test_loss_before_prepare_names_the_call():
    for loss in (KLCovLoss(), ClipCovLoss()):
        with pytest.raises(ValueError, match="prepare_rollout_tokens"):
            loss(make_batch())


# ---------------------------------------------------------------------- KL-Cov
LOG_R = [[0.1, -0.2, 0.3, 0.05], [0.2, -0.1, 0.4, 0.0], [-0.3, 0.15, 0.0, 0.0]]


def kl_cov_reference(batch: TokenBatch, ratio: float, coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean of -(r A - coef |log r| [t in top k by covariance]); the top-k set."""
    rollout = make_batch()
    valid = batch.mask > 0
    k = max(1, int(ratio * N))
    top = reference_covariance(rollout)[valid].topk(k).values[-1]  # c_k: the rollout's k-th largest
    selected = valid & (reference_covariance(batch, rollout) >= top)  # Cov_t at the current log-prob
    log_r = batch.logprobs - batch.old_logprobs
    per_token = torch.exp(log_r) * batch.advantages - coef * torch.where(selected, log_r.abs(), 0.0)
    return -torch.where(valid, per_token, 0.0).sum() / N, selected


@pytest.mark.parametrize("ratio", [0.002, 0.25, 0.5])
def test_kl_cov_penalises_exactly_the_top_share_by_covariance(ratio):
    rollout = make_batch()
    batch = make_batch(LOG_R)
    loss = prepared(KLCovLoss(kl_cov_ratio=ratio, ppo_kl_coef=0.7), rollout)
    out = loss(batch)
    out.loss.backward()
    ref_batch = make_batch(LOG_R)
    ref, selected = kl_cov_reference(ref_batch, ratio, 0.7)
    ref.backward()
    # off-policy the set is Cov_t(current logp) >= c_k: here empty at k = 1 (that token moved down)
    assert int(selected.sum()) < N and (ratio < 0.1 or selected.any())
    assert out.metrics["kl_cov_frac"].item() == pytest.approx(float(selected.sum()) / N)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(batch.logprobs.grad, ref_batch.logprobs.grad, rtol=1e-5, atol=1e-7)
    # penalised tokens' gradient differs from plain r A by exactly coef * sign(log r) / N
    plain = -torch.exp(torch.tensor(LOG_R, dtype=torch.float64)) * batch.advantages / N
    diff = (batch.logprobs.grad - torch.where(batch.mask > 0, plain, 0.0)).abs() > 1e-4  # coef / N = 0.078
    assert torch.equal(diff, selected)


@pytest.mark.parametrize("ratio", [0.002, 0.25, 0.5])
def test_kl_cov_on_policy_selects_exactly_the_top_k(ratio):
    batch = make_batch()
    out = prepared(KLCovLoss(kl_cov_ratio=ratio), batch)(batch)
    cov = reference_covariance(batch)[batch.mask > 0]
    k = max(1, int(ratio * N))
    assert out.metrics["kl_cov_frac"].item() * N == pytest.approx(k)
    assert out.metrics["cov_threshold"].item() == pytest.approx(float(cov.topk(k).values[-1]), rel=1e-6)


def test_kl_cov_on_policy_is_reinforce():
    batch = make_batch()
    out = prepared(KLCovLoss(kl_cov_ratio=0.5), batch)(batch)
    out.loss.backward()
    adv, valid = batch.advantages, batch.mask > 0
    assert out.loss.item() == pytest.approx(float(-adv[valid].sum() / N))
    torch.testing.assert_close(batch.logprobs.grad, torch.where(valid, -adv / N, 0.0), rtol=1e-6, atol=1e-9)
    assert out.metrics["abs_log_ratio"].item() == 0.0


# ---------------------------------------------------------------------- Clip-Cov
def clip_cov_candidates(batch: TokenBatch, lb: float, ub: float, eps: float = 0.2) -> torch.Tensor:
    """Valid tokens with lb < Cov_t < ub whose PPO clip is not active."""
    cov = reference_covariance(batch)
    r = torch.exp(batch.logprobs.detach() - batch.old_logprobs)
    adv = batch.advantages
    ppo_clipped = ((adv > 0) & (r > 1 + eps)) | ((adv < 0) & (r < 1 - eps))
    return (batch.mask > 0) & ~ppo_clipped & (cov > lb) & (cov < ub)


def test_clip_cov_window_and_ppo_clip_name_the_candidates():
    rollout = make_batch()
    cov = reference_covariance(rollout)
    lb, ub = 0.3, 2.0
    window = (rollout.mask > 0) & (cov > lb) & (cov < ub)
    assert 2 <= int(window.sum()) < N  # the hand-made batch has a non-trivial window
    # clip_cov_ratio = 1: k = N >= C, so p = 1 and every candidate is detached.
    loss = prepared(ClipCovLoss(clip_cov_ratio=1.0, clip_cov_lb=lb, clip_cov_ub=ub), rollout)
    assert loss.select_prob == 1.0
    log_r = [[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # (0,0): PPO-clipped
    batch = make_batch(log_r)
    out = loss(batch)
    out.loss.backward()
    candidates = clip_cov_candidates(make_batch(log_r), lb, ub)
    detached = (batch.logprobs.grad == 0) & (batch.mask > 0)
    ppo_batch = make_batch(log_r)
    PPOClipLoss()(ppo_batch).loss.backward()
    ppo_zero = (ppo_batch.logprobs.grad == 0) & (batch.mask > 0)
    assert torch.equal(detached, candidates | ppo_zero)
    assert not torch.equal(candidates, window)  # (0,0) is in the window but PPO cut it already
    assert out.metrics["cov_clip_frac"].item() == pytest.approx(float(candidates.sum()) / N)
    # the value is PPO's: only gradients are cut
    assert out.loss.item() == pytest.approx(PPOClipLoss()(make_batch(log_r)).loss.item(), rel=1e-6)


def test_clip_cov_without_candidates_is_ppo():
    rollout = make_batch()
    loss = prepared(ClipCovLoss(clip_cov_lb=100.0, clip_cov_ub=200.0), rollout)
    assert loss.select_prob == 0.0
    batch, ppo_batch = make_batch(LOG_R), make_batch(LOG_R)
    out = loss(batch)
    out.loss.backward()
    PPOClipLoss()(ppo_batch).loss.backward()
    torch.testing.assert_close(batch.logprobs.grad, ppo_batch.logprobs.grad)


def test_clip_cov_select_probability_is_k_over_candidates():
    rollout = make_batch()
    cov = reference_covariance(rollout)
    candidates = int(((rollout.mask > 0) & (cov > 0.0) & (cov < 10.0)).sum())
    loss = prepared(ClipCovLoss(clip_cov_ratio=0.0002, clip_cov_lb=0.0, clip_cov_ub=10.0), rollout)
    assert loss.select_prob == pytest.approx(1 / candidates)  # k = max(1, floor(2e-4 * 9)) = 1


def test_clip_cov_random_share_is_seeded_and_resumes():
    rollout = make_batch()

    def make():
        return prepared(ClipCovLoss(clip_cov_ratio=0.3, clip_cov_lb=0.0, clip_cov_ub=10.0, seed=5), rollout)

    def detached(loss) -> torch.Tensor:
        batch = make_batch()
        loss(batch).loss.backward()
        return (batch.logprobs.grad == 0) & (batch.mask > 0)

    first, second = make(), make()
    assert 0 < first.select_prob < 1
    draws = [detached(first) for _ in range(6)]
    assert [torch.equal(a, b) for a, b in zip(draws, [detached(second) for _ in range(6)], strict=True)] == [
        True
    ] * 6
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 1  # the choice changes from call to call
    # Resume: a fresh loss loaded with the state after 3 calls draws what the original drew next.
    original = make()
    for _ in range(3):
        detached(original)
    state = original.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert [torch.equal(detached(original), detached(resumed)) for _ in range(3)] == [True] * 3
    fresh = make()
    assert not all(torch.equal(detached(fresh), d) for d in draws[3:6])
    with pytest.raises(ValueError, match="unknown keys"):
        resumed.load_state_dict({"generator": state["generator"], "other": 1})


def test_clip_cov_share_matches_the_probability():
    gen = torch.Generator().manual_seed(0)
    old = (-torch.rand(64, 16, generator=gen, dtype=torch.float64) * 4).tolist()
    adv = torch.randn(64, 1, generator=gen, dtype=torch.float64).expand(64, 16).tolist()
    mask = [[1.0] * 16] * 64
    rollout = make_batch(old=old, adv=adv, mask=mask)
    loss = prepared(ClipCovLoss(clip_cov_ratio=0.05, clip_cov_lb=0.5, clip_cov_ub=5.0), rollout)
    out = loss(make_batch(old=old, adv=adv, mask=mask))
    p, cand = loss.select_prob, out.metrics["cov_candidate_frac"].item()
    assert 0 < p < 1
    # selected ~ Binomial(C, p): mean k = 0.05 * 1024 = 51 tokens, sd ~ 6.5
    assert abs(out.metrics["cov_clip_frac"].item() * 1024 - p * cand * 1024) < 5 * 7


# ---------------------------------------------------------------------- padding, micro-batches
@pytest.mark.parametrize(
    "make_loss", [lambda: KLCovLoss(kl_cov_ratio=0.3), lambda: ClipCovLoss(clip_cov_lb=0.1)]
)
def test_padding_is_inert(make_loss):
    clean = make_batch(LOG_R)
    dirty = make_batch(LOG_R, pad_value=float("nan"))
    dirty.advantages[torch.tensor(MASK) == 0] = float("inf")
    a, b = prepared(make_loss(), make_batch()), prepared(make_loss(), make_batch())
    out_a, out_b = a(clean), b(dirty)
    out_a.loss.backward()
    out_b.loss.backward()
    assert out_b.loss.item() == pytest.approx(out_a.loss.item(), rel=1e-12)
    torch.testing.assert_close(dirty.logprobs.grad, clean.logprobs.grad)


def rows(batch: TokenBatch, index: list[int]) -> TokenBatch:
    picked = {
        f.name: getattr(batch, f.name)[index] for f in fields(batch) if getattr(batch, f.name) is not None
    }
    return replace(batch, **picked)


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: KLCovLoss(kl_cov_ratio=0.3, ppo_kl_coef=0.5),
        lambda: KLCovLoss(kl_cov_ratio=0.3, loss_agg_mode="seq-mean-token-mean"),
        lambda: ClipCovLoss(clip_cov_ratio=1.0, clip_cov_lb=0.1, clip_cov_ub=3.0),  # p = 1: no draw matters
    ],
    ids=["kl-cov", "kl-cov-seq-mean", "clip-cov"],
)
def test_micro_batches_add_up_to_the_single_pass(make_loss):
    """The centring is fixed by prepare_rollout_tokens, so a split of rows changes nothing."""
    loss = prepared(make_loss(), make_batch())
    full = make_batch(LOG_R)
    single = loss(full).loss
    (g_single,) = torch.autograd.grad(single, full.logprobs)
    mode = loss.loss_agg_mode
    total_units = float(aggregation_units(full.mask, mode))
    for split in ([[0], [1, 2]], [[2], [0], [1]]):
        batch = make_batch(LOG_R)
        summed = sum(
            float(aggregation_units(rows(batch, s).mask, mode)) / total_units * loss(rows(batch, s)).loss
            for s in split
        )
        (g_sum,) = torch.autograd.grad(summed, batch.logprobs)
        assert summed.item() == pytest.approx(single.item(), rel=1e-6)
        torch.testing.assert_close(g_sum, g_single, rtol=1e-5, atol=1e-8)
    # Centring each micro-batch on its own (verl) would give other covariances:
    own = prepared(make_loss(), rows(make_batch(), [1, 2]))
    assert own.logprob_mean != pytest.approx(loss.logprob_mean)


# ---------------------------------------------------------------------- all ranks
def _rank_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        batch = make_batch()
        part = rows(batch, [[0], [1, 2]][rank])  # rank 0 holds 4 valid tokens, rank 1 holds 5
        loss = KLCovLoss(kl_cov_ratio=0.3)
        loss.prepare_rollout_tokens(*valid_tokens(part))
        clip = ClipCovLoss(clip_cov_lb=0.0, clip_cov_ub=10.0)
        clip.prepare_rollout_tokens(*valid_tokens(part))
        state = [
            loss.num_tokens,
            loss.logprob_mean,
            loss.advantage_mean,
            loss.cov_threshold,
            clip.select_prob,
        ]
        torch.save(state, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_centring_and_selection_are_over_all_ranks(tmp_path):
    mp.spawn(_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    single = KLCovLoss(kl_cov_ratio=0.3)
    single.prepare_rollout_tokens(*valid_tokens(make_batch()))
    clip = ClipCovLoss(clip_cov_lb=0.0, clip_cov_ub=10.0)
    clip.prepare_rollout_tokens(*valid_tokens(make_batch()))
    expected = [single.num_tokens, single.logprob_mean, single.advantage_mean, single.cov_threshold]
    for rank in (0, 1):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        assert state[0] == N
        assert state[1:4] == pytest.approx(expected[1:], rel=1e-6)
        assert state[4] == pytest.approx(clip.select_prob)


def test_bad_options_name_themselves():
    for kwargs, name in (
        ({"clip_cov_ratio": 0.0}, "clip_cov_ratio"),
        ({"clip_cov_lb": 5.0, "clip_cov_ub": 1.0}, "clip_cov_lb"),
        ({"seed": -1}, "seed"),
        ({"clip_low": 1.0}, "clip_low"),
    ):
        with pytest.raises(ValueError, match=name):
            ClipCovLoss(**kwargs)
    for kwargs, name in (({"kl_cov_ratio": 1.5}, "kl_cov_ratio"), ({"ppo_kl_coef": -1.0}, "ppo_kl_coef")):
        with pytest.raises(ValueError, match=name):
            KLCovLoss(**kwargs)
    with pytest.raises(ValueError, match="same valid tokens"):
        KLCovLoss().prepare_rollout_tokens(torch.zeros(3), torch.zeros(4))


def test_defaults_are_the_papers():
    clip, kl = ClipCovLoss(), KLCovLoss()
    assert (clip.clip_cov_ratio, clip.clip_cov_lb, clip.clip_cov_ub) == (2e-4, 1.0, 5.0)
    assert (clip.clip_low, clip.clip_high, clip.loss_agg_mode) == (0.2, 0.2, "token-mean")
    assert (kl.kl_cov_ratio, kl.ppo_kl_coef, kl.loss_agg_mode) == (2e-3, 1.0, "token-mean")
