"""The random streams a checkpoint carries, and the snapshot that evaluation restores."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from egspo.rng import capture_rng_states, restore_rng_snapshot, restore_rng_states, rng_snapshot


def _draws() -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)])


def test_restored_streams_draw_what_the_captured_ones_drew():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    _draws()  # move every stream away from its seed
    states = capture_rng_states()
    expected = _draws()
    _draws()
    restore_rng_states(states)
    assert _draws() == expected


def test_states_survive_a_weights_only_load(tmp_path):
    torch.manual_seed(5)
    states = capture_rng_states()
    torch.save(states, tmp_path / "rng.pt")
    expected = _draws()
    restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def test_a_rank_without_saved_state_is_an_error():
    with pytest.raises(ValueError, match="same number of processes"):
        restore_rng_states(capture_rng_states(), rank=1)


def test_snapshot_puts_the_torch_stream_back():
    torch.manual_seed(7)
    snapshot = rng_snapshot()
    expected = torch.rand(4)
    torch.rand(100)
    restore_rng_snapshot(snapshot)
    assert torch.equal(torch.rand(4), expected)
