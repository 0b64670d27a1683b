import math

import pytest

from egspo.schedules import ChordMuSchedule, ConstantMu, ramp


def test_chord_mu_warms_up_linearly_then_decays_by_cosine_to_valley():
    mu = ChordMuSchedule(peak=0.9, valley=0.05, warmup_iterations=10, decay_iterations=100)
    assert mu(0) == 0.0
    assert mu(5) == pytest.approx(0.45)
    assert mu(10) == pytest.approx(0.9)
    assert mu(60) == pytest.approx(0.05 + 0.85 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert mu(110) == pytest.approx(0.05)
    assert mu(10_000) == pytest.approx(0.05)


def test_constant_mu_validates_range():
    assert ConstantMu(0.1)(123) == 0.1
    with pytest.raises(ValueError, match="mu must be in"):
        ConstantMu(1.5)


def test_ramp_linear_and_cosine_hit_endpoints_and_midpoint():
    assert ramp(0.5, 0.8, 0.0) == 0.5
    assert ramp(0.5, 0.8, 1.0) == pytest.approx(0.8)
    assert ramp(0.5, 0.8, 0.5) == pytest.approx(0.65)
    assert ramp(0.5, 0.8, 0.5, "cosine") == pytest.approx(0.65)
    assert ramp(0.5, 0.8, 0.25, "cosine") < ramp(0.5, 0.8, 0.25, "linear")
    with pytest.raises(ValueError):
        ramp(0, 1, 0.5, "step")
