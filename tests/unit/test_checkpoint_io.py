"""Checkpoints written atomically: a kill or a failure during a save never leaves an unreadable file."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from egspo.checkpoint_io import AtomicCheckpointIO, atomic_torch_save

SAVER = textwrap.dedent(
    """
    import sys, torch
    from egspo.checkpoint_io import AtomicCheckpointIO
    io, path = AtomicCheckpointIO(), sys.argv[1]
    for version in range(1, 10**6):
        io.save_checkpoint({"version": version, "weights": torch.full((2_000_000,), float(version))}, path)
        print(version, flush=True)
    """
)


def test_sigkill_during_saves_never_leaves_last_unreadable(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"version": 0, "weights": torch.zeros(2_000_000)}, path)
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one full save done, the next one under way
        time.sleep(random.uniform(0.0, 0.3))  # land somewhere inside a later write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = torch.load(path, weights_only=True)
    assert state["version"] >= 1
    assert torch.equal(state["weights"], torch.full((2_000_000,), float(state["version"])))  # not a mix
    assert not list(tmp_path.glob("last*.ckpt.*")), "temporary files must not look like checkpoints"


def test_failure_between_write_and_rename_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"version": 1}, path)

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        AtomicCheckpointIO().save_checkpoint({"version": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left behind
