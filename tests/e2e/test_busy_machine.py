"""OpenMP's waiting policy on a machine whose cores other processes want (issue 20, section 4).

`python -m egspo` (and the `egspo` script) set OMP_WAIT_POLICY=PASSIVE before torch loads its
OpenMP runtime, unless the user chose a waiting policy: idle threads then sleep instead of
spinning on a core that a busy process, or the reward's verifier processes, need. What the
runtime actually uses is read from its own report (OMP_DISPLAY_ENV=VERBOSE: libgomp prints its
settings when torch loads it; GOMP_SPINCOUNT 0 is PASSIVE, 300000 its default). The speed
itself is measured by scripts/bench_threads.py (README "On a busy machine").
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_DISPLAY_ENV")

pytestmark = pytest.mark.skipif(
    "OpenMP" not in torch.__config__.parallel_info(), reason="torch was built without OpenMP"
)


def _python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in KNOBS}
    environ.update(HF_HUB_OFFLINE="1", OMP_DISPLAY_ENV="VERBOSE", **env)
    command = [sys.executable, *(["-c", code] if code else []), *args]
    return subprocess.run(command, env=environ, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _spin_count(stderr: str) -> str | None:
    """libgomp's GOMP_SPINCOUNT as it reports it (None: not libgomp, e.g. Intel OpenMP)."""
    match = re.search(r"GOMP_SPINCOUNT = '(\d+)'", stderr)
    return match[1] if match else None


def test_the_cli_makes_idle_openmp_threads_sleep():
    result = _python("", "-m", "egspo", "fit", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    count = _spin_count(result.stderr)
    if count is None:
        pytest.skip("not GNU OpenMP: no GOMP_SPINCOUNT in its report")
    assert count == "0"
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in result.stderr


def test_without_the_cli_the_runtime_spins():
    """The control: torch alone, no policy set, spins 300000 rounds (what made the demo crawl)."""
    result = _python("import torch")
    count = _spin_count(result.stderr)
    if count is None:
        pytest.skip("not GNU OpenMP: no GOMP_SPINCOUNT in its report")
    assert count != "0"


@pytest.mark.parametrize(
    ("knob", "value", "spin_count"),
    [
        ("OMP_WAIT_POLICY", "ACTIVE", "30000000000"),
        ("GOMP_SPINCOUNT", "1000", "1000"),
        ("KMP_BLOCKTIME", "5", None),
    ],
)
def test_a_policy_the_user_chose_is_kept(knob, value, spin_count):
    code = "import os, egspo.cli; print(os.environ.get('OMP_WAIT_POLICY'))"
    # one thread: no idle thread to spin (ACTIVE on a busy machine would crawl), the same report
    result = _python(code, OMP_NUM_THREADS="1", **{knob: value})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == (value if knob == "OMP_WAIT_POLICY" else "None")
    if spin_count is not None and _spin_count(result.stderr) is not None:
        assert _spin_count(result.stderr) == spin_count


def test_child_processes_inherit_it():
    """The reward's verifier workers start with the CLI's environment (`VerifierPool`)."""
    code = (
        "import subprocess, sys, egspo.cli; "
        "print(subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"OMP_WAIT_POLICY\"))'], "
        "capture_output=True, text=True).stdout.strip())"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "PASSIVE"
