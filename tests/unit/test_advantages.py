import math

import pytest
import torch

from egspo.advantages import group_advantages


def test_group_scale_matches_hand_computation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    adv = group_advantages(rewards, group_size=4, scale="group", eps=0.0)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    first = torch.tensor([0.5, -0.5, -0.5, 0.5]) / std
    second = torch.tensor([0.25, 0.25, -0.75, 0.25]) / math.sqrt(0.25)  # std of [1, 1, 0, 1] = 0.5
    torch.testing.assert_close(adv, torch.cat([first, second]))


def test_batch_scale_divides_by_batch_std():
    rewards = torch.tensor([2.0, 0.0, 1.0, 3.0])
    adv = group_advantages(rewards, group_size=2, scale="batch", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, -1.0, 1.0]) / rewards.std())


def test_none_scale_is_mean_centred_only():
    rewards = torch.tensor([3.0, 1.0, 0.5, 0.5, 0.0, 2.0])
    adv = group_advantages(rewards, group_size=2, scale="none")
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 0.0, -1.0, 1.0]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_constant_group_gets_exact_zero(scale):
    # 0.1 is not representable: the group mean differs from the rewards by rounding noise,
    # which must not turn into a non-zero advantage.
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.0], dtype=torch.float32)
    adv = group_advantages(rewards, group_size=3, scale=scale)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert (adv[3] > 0).item() and (adv[4:] < 0).all().item()
    assert torch.isfinite(adv).all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_equal_batch_is_zero_not_nan(scale):
    adv = group_advantages(torch.full((8,), 0.7), group_size=4, scale=scale)
    assert torch.equal(adv, torch.zeros(8))


def test_advantages_sum_to_zero_per_group_and_keep_dtype():
    rewards = torch.rand(5 * 6, dtype=torch.float64)
    adv = group_advantages(rewards, group_size=6)
    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv.view(5, 6).sum(1), torch.zeros(5, dtype=torch.float64))
    # unit (unbiased) std within each group, up to eps
    torch.testing.assert_close(adv.view(5, 6).std(1), torch.ones(5, dtype=torch.float64), rtol=1e-4, atol=0)


def test_validation_errors_name_num_generations():
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), group_size=2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), group_size=2, scale="std")  # type: ignore[arg-type]
