"""Evaluation metrics: hand-computed values, the unbiased pass@k estimator, ties, sharded reduction."""

import itertools
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port

from egspo.metrics import (
    EvalMetrics,
    MajorityAtK,
    PassAtK,
    ResponseLength,
    TruncationRate,
    answer_key,
    majority_vote_accuracy,
    pass_at_k,
    resolve_pass_k,
)


def brute_force_pass_at_k(flags: list[bool], k: int) -> float:
    """Fraction of all k-subsets of the samples that contain a correct one."""
    subsets = list(itertools.combinations(flags, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration_over_subsets(n):
    for c in range(n + 1):
        flags = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            got = float(pass_at_k(torch.tensor([c]), n, k)[0])
            assert got == pytest.approx(brute_force_pass_at_k(flags, k), abs=1e-12), (n, c, k)
            assert got == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_large_n_stays_finite_and_exact():
    n, c, k = 200, 3, 16
    got = float(pass_at_k(torch.tensor([c]), n, k)[0])
    assert got == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="k=5, n=4"):
        pass_at_k(torch.tensor([1]), 4, 5)


def test_pass_metric_hand_values():
    metric = PassAtK([1, 2, 4])
    # prompt 0: 1/4 correct; prompt 1: 0/4; prompt 2: 4/4
    correct = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    metric.update(correct)
    out = metric.compute()
    assert out["pass@1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert out["pass@2"] == pytest.approx((0.5 + 0 + 1) / 3)  # 1 - C(3,2)/C(4,2) = 1/2
    assert out["pass@4"] == pytest.approx((1 + 0 + 1) / 3)


def test_pass_metric_needs_enough_samples():
    with pytest.raises(ValueError, match="pass@4 needs at least 4"):
        PassAtK([1, 4]).update(torch.ones(2, 3, dtype=torch.bool))


def test_answer_key_normalises_numbers_and_extracts_the_final_answer():
    assert answer_key("3 + 4 = 7\n#### 7") == "7"
    assert answer_key("so the total is 1,000.0", number_fallback=True) == "1000"
    assert answer_key("so the total is 1,000.0") is None  # the last-number fallback is opt-in
    assert answer_key("\\boxed{\\frac{2}{4}}") == answer_key("#### 1/2") == "1/2"
    assert answer_key("no digits here") is None


def test_majority_vote_hand_values_and_ties():
    # clear majority, correct
    assert majority_vote_accuracy(["7", "7", "3", None], [True, True, False, False]) == 1.0
    # clear majority, wrong, even though one sample is right
    assert majority_vote_accuracy(["3", "3", "7", "7", "3"], [False, False, True, True, False]) == 0.0
    # two-way tie between a right and a wrong answer: expected correctness 1/2
    assert majority_vote_accuracy(["7", "3"], [True, False]) == 0.5
    # three-way tie with one right answer
    assert majority_vote_accuracy(["1", "2", "3"], [False, True, False]) == pytest.approx(1 / 3)
    # missing answers never win the vote; none at all scores 0
    assert majority_vote_accuracy([None, None, "7"], [False, False, True]) == 1.0
    assert majority_vote_accuracy([None, None], [False, False]) == 0.0


def test_majority_metric_votes_on_extracted_answers_of_the_first_k():
    metric = MajorityAtK([2, 4])
    completions = [
        ["#### 7", "so \\boxed{7}", "#### 3", "#### 3"],  # maj@2: 7 (right); maj@4: tie 7/3 -> 1/2
        ["#### 3", "#### 4", "#### 4", "#### 4"],  # maj@2: tie 3/4, 3 right -> 1/2; maj@4: 4 (wrong)
    ]
    correct = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    metric.update(completions, correct)
    out = metric.compute()
    assert out["maj@2"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["maj@4"] == pytest.approx((0.5 + 0.0) / 2)


def test_length_and_truncation_are_means_over_samples():
    length, trunc = ResponseLength(), TruncationRate()
    length.update(torch.tensor([[4, 6], [10, 12]]))
    length.update(torch.tensor([[8, 8]]))
    trunc.update(torch.tensor([[True, False], [False, False]]))
    assert length.compute() == pytest.approx(48 / 6)
    assert trunc.compute() == pytest.approx(0.25)


def test_eval_metrics_collection_reports_every_key():
    metrics = EvalMetrics(num_samples=4, pass_k=[1, 4])
    metrics.update(
        greedy_correct=torch.tensor([True, False]),
        correct=torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool),
        completions=[["#### 3", "#### 5", "#### 4", "#### 3"], ["#### 1"] * 4],
        lengths=torch.tensor([[3, 4, 5, 6], [7, 7, 7, 7]]),
        truncated=torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool),
    )
    out = {k: float(v) for k, v in metrics.compute().items()}
    assert out == pytest.approx(
        {
            "accuracy": 0.5,
            "pass@1": 0.25,
            "pass@4": 0.5,
            "maj@4": 0.5,
            "response_length": 46 / 8,
            "truncation_rate": 1 / 8,
        }
    )


def test_single_sample_reports_pass_at_1_only():
    assert set(EvalMetrics(num_samples=1).keys()) == {
        "accuracy",
        "pass",
        "response_length",
        "truncation_rate",
    }
    assert resolve_pass_k(4, None) == [1, 4]
    with pytest.raises(ValueError, match="eval_pass_k"):
        resolve_pass_k(2, [1, 4])


def _shards():
    generator = torch.Generator().manual_seed(0)
    correct = torch.rand(10, 4, generator=generator) < 0.4
    completions = [
        [f"#### {int(x)}" for x in row] for row in torch.randint(0, 3, (10, 4), generator=generator)
    ]
    lengths = torch.randint(1, 20, (10, 4), generator=generator)
    truncated = torch.rand(10, 4, generator=generator) < 0.2
    batch = {
        "greedy_correct": correct[:, 0],
        "correct": correct,
        "completions": completions,
        "lengths": lengths,
        "truncated": truncated,
    }
    # uneven shards: 3 prompts on one process, 7 on the other
    first = {k: v[:3] for k, v in batch.items()}
    second = {k: v[3:] for k, v in batch.items()}
    return batch, first, second


def test_sharded_states_merge_to_the_unsharded_result():
    whole, first, second = _shards()
    reference = EvalMetrics(4, [1, 2, 4])
    reference.update(**whole)
    expected = reference.compute()
    a, b = EvalMetrics(4, [1, 2, 4]), EvalMetrics(4, [1, 2, 4])
    a.update(**first)
    b.update(**second)
    for name, metric in a.items(keep_base=True):
        metric.merge_state(b[name])  # applies each state's dist_reduce_fx (sum)
    merged = a.compute()
    assert merged.keys() == expected.keys()
    for key in expected:
        assert torch.allclose(merged[key], expected[key]), key
    # sums are reduced, not per-shard means: with uneven shards the mean of means differs
    shard_means = []
    for shard in (first, second):
        alone = PassAtK([1])
        alone.update(shard["correct"])
        shard_means.append(float(alone.compute()["pass@1"]))
    assert sum(shard_means) / 2 != pytest.approx(float(expected["pass@1"]))


def _worker(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _whole, first, second = _shards()
        metrics = EvalMetrics(4, [1, 2, 4])
        metrics.update(**(first if rank == 0 else second))
        results[rank] = {k: float(v) for k, v in metrics.compute().items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_compute_across_two_processes_matches_one_process():
    whole, _first, _second = _shards()
    reference = EvalMetrics(4, [1, 2, 4])
    reference.update(**whole)
    expected = {k: float(v) for k, v in reference.compute().items()}
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(free_port(), results), nprocs=2, start_method="spawn")
    assert results[0] == pytest.approx(expected)
    assert results[1] == pytest.approx(expected)
