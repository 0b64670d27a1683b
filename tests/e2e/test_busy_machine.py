"""Torch's thread count on a machine whose cores other processes want (issue 20, section 4).

`python -m egspo fit` adds `egspo.callbacks.AdaptiveThreads`, which sets torch's intra-op thread
count to the cores other processes leave free (`egspo.threads`). Here: the decision rule, the
measurement against real busy processes (a spinning process that is not ours is counted as
another's, one that is ours as ours), and the CLI's default. The speed itself is measured by
scripts/bench_threads.py (README "On a busy machine").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from egspo.cli import run
from egspo.threads import ThreadGovernor, fitted_threads, system_jiffies, tree_jiffies

ROOT = Path(__file__).resolve().parents[2]
SPIN = "while True: pass"

pytestmark = pytest.mark.skipif(system_jiffies() is None, reason="no /proc/stat: not Linux")


@pytest.mark.parametrize(
    ("current", "free", "maximum", "expected"),
    [
        (2, 1.95, 2, 2),  # quiet: torch's own count
        (2, 1.0, 2, 1),  # one busy process on 2 cores
        (2, 0.1, 2, 1),  # never below one
        (2, 1.5, 2, 2),  # half a core of background: within the margin, no flip
        (1, 1.5, 2, 1),  # ... from either side
        (1, 1.98, 2, 2),  # the busy process ended: back up
        (8, 3.2, 8, 3),
        (3, 7.9, 8, 8),
        (4, 15.0, 8, 8),  # never above torch's own count
    ],
)
def test_the_count_follows_the_free_cores(current, free, maximum, expected):
    assert fitted_threads(current, free, maximum) == expected


def _detached_spinner() -> int:
    """A busy process that is not this one's descendant (its parent exits at once): another's."""
    code = (
        "import subprocess, sys; "
        f"print(subprocess.Popen([sys.executable, '-c', {SPIN!r}], start_new_session=True, "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"
    )  # the spinner must not hold the pipe open, or `run` waits for it to end
    return int(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )


def test_a_busy_process_of_another_takes_a_thread_away():
    start = torch.get_num_threads()
    if start < 2:
        pytest.skip("torch runs one thread here: nothing to take away")
    pid = _detached_spinner()
    governor = ThreadGovernor(interval_seconds=0.5)
    try:
        time.sleep(1.0)
        threads = governor.update()
        assert governor.other_cores >= 0.7  # the spinner's core (other load only adds to it)
        assert 1 <= threads <= start - 1
        assert torch.get_num_threads() == threads
    finally:
        os.kill(pid, signal.SIGKILL)
        governor.restore()
    assert torch.get_num_threads() == start


def test_a_child_process_counts_as_this_runs_work():
    """The reward's verifier workers are children: their CPU time is the run's, not another's."""
    child = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        before = tree_jiffies(os.getpid())
        time.sleep(1.0)
        used = (tree_jiffies(os.getpid()) - before) / os.sysconf("SC_CLK_TCK")
    finally:
        child.kill()
        child.wait()
    assert used >= 0.5  # the child spun (nearly) the whole second


def test_the_governor_measures_at_most_every_interval():
    governor = ThreadGovernor(interval_seconds=60.0)
    before = governor.other_cores
    governor.update()
    assert governor.other_cores == before and governor.threads == torch.get_num_threads()


def _callbacks() -> list[str]:
    cli = run(["--config", str(ROOT / "configs" / "demo.yaml"), "--model.rl_iterations=0"], run=False)
    return [type(c).__name__ for c in cli.trainer.callbacks]


def test_the_cli_fits_the_thread_count_unless_the_user_fixed_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert "AdaptiveThreads" in _callbacks()
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    assert "AdaptiveThreads" not in _callbacks()
