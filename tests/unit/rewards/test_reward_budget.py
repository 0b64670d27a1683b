"""The per-call verification budget: pathological answers cannot stall a training step."""

import time

from egspo.rewards import MathReward, VerifierPool

# Towers such as 3^{3^{3^{3}}}: sympy evaluates them inside one C call that no signal stops,
# so each costs a full per-sample timeout and a worker restart. All distinct: no cache hits.
PATHOLOGICAL = [f"\\boxed{{{k}^{{{k}^{{{k}^{{{k}}}}}}}}}" for k in range(3, 66)]


def test_batch_budget_bounds_a_batch_of_pathological_answers():
    budget = 3.0
    reward = MathReward(timeout_seconds=1.0, num_workers=2, batch_timeout_seconds=budget)
    try:
        reward([r"\boxed{\sqrt{4}}"], ["2"])  # start the workers outside the timed call
        start = time.perf_counter()
        out = reward([*PATHOLOGICAL, r"\boxed{5}", "#### 7"], ["5"] * len(PATHOLOGICAL) + ["5", "7"])
        seconds = time.perf_counter() - start
        # the workers busy at the deadline were replaced: the next call verifies normally
        after = reward([r"\boxed{\frac{\sqrt{2}}{2}}"], [r"\frac{1}{\sqrt{2}}"])
    finally:
        reward.close()
    print(
        f"{len(PATHOLOGICAL)} pathological answers with a {budget} s budget: {seconds:.1f} s, {out.metrics}"
    )
    assert seconds < budget + 1.5
    assert out.rewards.tolist() == [0.0] * len(PATHOLOGICAL) + [1.0, 1.0]  # plain numbers never wait
    exhausted, timeouts = out.metrics["reward/budget_exhausted"], out.metrics["reward/verify_timeouts"]
    assert exhausted >= len(PATHOLOGICAL) // 2
    assert exhausted + timeouts == len(PATHOLOGICAL)
    assert after.rewards.tolist() == [1.0] and after.metrics["reward/budget_exhausted"] == 0


def test_pool_marks_what_the_budget_left_and_caches_nothing_of_it():
    pool = VerifierPool(num_workers=1, timeout_seconds=2.0)
    try:
        results = pool.run([("9^{9^{9^{9}}}", "7"), ("2", "2"), ("3", "3")], budget_seconds=0.5)
    finally:
        pool.close()
    assert [r.status for r in results] == ["budget"] * 3
    assert not any(r.correct for r in results)

    reward = MathReward(timeout_seconds=2.0, num_workers=1, batch_timeout_seconds=0.5)
    try:
        out = reward([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{x = 3}"], ["7", "3"])
        assert out.metrics["reward/budget_exhausted"] == 2
        reward.batch_timeout_seconds = None  # a spent budget is not an answer: nothing was cached
        assert reward([r"\boxed{x = 3}"], ["3"]).rewards.tolist() == [1.0]
    finally:
        reward.close()
