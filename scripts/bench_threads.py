"""The demo's speed beside busy processes, under the old and the new thread defaults.

    python scripts/bench_threads.py                          # README table: 3 interleaved repetitions
    python scripts/bench_threads.py --reps 1 --busy 0 1      # a quick look at the direction

Each run is `python -m egspo fit --config configs/demo.yaml` with `--iterations` SFT iterations,
`--rl` RL iterations (default none) and a small held-out set, in a fresh process; its wall time includes the start-up
(imports, building the tokenizer and model). "Busy" processes are single-threaded spinning
Python processes (`while True: pass`) started before the run and killed after it.

Variants (environment of the run; `cores` = the CPUs this process may use, torch's own count):
- `old`: torch's thread count fixed (OMP_NUM_THREADS=cores, which keeps egspo's CLI from fitting
  it) and libgomp's own waiting: idle OpenMP threads spin about 3 ms (GOMP_SPINCOUNT=300000)
  before they sleep. What egspo did before issue 20.
- `new`: nothing set: the CLI's default, `egspo.callbacks.AdaptiveThreads` (the thread count
  follows the cores other processes leave free, checked every second; libgomp's own waiting).
- `passive`: OMP_NUM_THREADS=cores and OMP_WAIT_POLICY=PASSIVE (idle threads sleep at once), the
  CLI's default for a while during issue 20.
- `1 thread`: OMP_NUM_THREADS=1.
- `spin 10k`, `spin 30k`: OMP_NUM_THREADS=cores and a shorter spin (libgomp only).

The repetitions are interleaved (every variant x load once, in a shuffled order, then again),
so that a change of the machine's background load spreads over all cells. The load average is
printed before and after: other work on the machine makes the "quiet" rows not quiet.
`<out>/bench_threads.json` holds every run and `<out>/bench_threads.md` the table
(median wall time; "vs quiet" divides by the same variant's quiet median, "vs old quiet" by the
old default's quiet median).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
# Environment variables that steer OpenMP's waiting; each run starts with none of them set.
OPENMP_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
CORES = str(len(os.sched_getaffinity(0)))
VARIANTS: dict[str, dict[str, str]] = {
    "old": {"OMP_NUM_THREADS": CORES, "MKL_NUM_THREADS": CORES},
    "new": {},
    "passive": {"OMP_NUM_THREADS": CORES, "MKL_NUM_THREADS": CORES, "OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "spin 10k": {"OMP_NUM_THREADS": CORES, "MKL_NUM_THREADS": CORES, "GOMP_SPINCOUNT": "10000"},
    "spin 30k": {"OMP_NUM_THREADS": CORES, "MKL_NUM_THREADS": CORES, "GOMP_SPINCOUNT": "30000"},
}
BUSY = "while True: pass"


def command(iterations: int, rl: int, root: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "egspo",
        "fit",
        "--config",
        str(CONFIG),
        f"--model.sft_iterations={iterations}",
        f"--model.rl_iterations={rl}",
        "--data.eval_size=16",
        "--data.eval_batch_size=16",
        "--model.evaluation.num_samples=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
    ]


def run_once(variant: str, busy: int, iterations: int, rl: int, work: Path, index: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_KNOBS}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **VARIANTS[variant])
    root = work / f"run{index:03d}"
    spinners = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0.0)  # the spinners hold their cores before the run starts
        start = time.perf_counter()
        with (work / f"run{index:03d}.log").open("w") as log:
            code = subprocess.run(
                command(iterations, rl, root), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            ).returncode
        seconds = time.perf_counter() - start
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    return {"variant": variant, "busy": busy, "seconds": seconds, "returncode": code, "load": os.getloadavg()}


def table(runs: list[dict], variants: list[str], loads: list[int]) -> str:
    ok = [r for r in runs if r["returncode"] == 0]

    def median(variant: str, busy: int) -> float | None:
        times = [r["seconds"] for r in ok if r["variant"] == variant and r["busy"] == busy]
        return statistics.median(times) if times else None

    base = median("old", 0) if "old" in variants else None
    lines = [
        "| beside the run | variant | wall time (median) | runs | vs quiet | vs old quiet |",
        "|---|---|---|---|---|---|",
    ]
    for busy in loads:
        for variant in variants:
            m = median(variant, busy)
            if m is None:
                continue
            quiet = median(variant, 0)
            n = sum(1 for r in ok if r["variant"] == variant and r["busy"] == busy)
            who = "nothing" if busy == 0 else f"{busy} busy process{'es' if busy > 1 else ''}"
            vs_quiet = f"{m / quiet:.2f}x" if quiet else "-"
            vs_old = f"{m / base:.2f}x" if base else "-"
            lines.append(f"| {who} | {variant} | {m:.1f} s | {n} | {vs_quiet} | {vs_old} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=60, help="SFT iterations per run")
    parser.add_argument(
        "--rl",
        type=int,
        default=0,
        help="RL iterations after them (the reward's verifier processes then run too)",
    )
    parser.add_argument(
        "--busy", type=int, nargs="+", default=[0, 1, 2], help="busy processes beside the run"
    )
    parser.add_argument(
        "--variants", nargs="+", default=["old", "new", "passive", "1 thread"], choices=list(VARIANTS)
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_threads")
    parser.add_argument("--seed", type=int, default=0, help="seeds the order of the interleaved runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    print(f"load average before: {os.getloadavg()}, cpus: {len(os.sched_getaffinity(0))}", flush=True)
    runs: list[dict] = []
    for rep in range(args.reps):
        cells = [(v, b) for v in args.variants for b in args.busy]
        rng.shuffle(cells)
        for variant, busy in cells:
            result = run_once(variant, busy, args.iterations, args.rl, args.out, len(runs))
            runs.append({**result, "rep": rep})
            print(
                f"rep {rep} {variant:>8} busy={busy}: {result['seconds']:.1f} s (exit {result['returncode']}, "
                f"load {result['load'][0]:.2f})",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()}")
    text = table(runs, args.variants, args.busy)
    print(text)
    (args.out / "bench_threads.json").write_text(json.dumps(runs, indent=1))
    (args.out / "bench_threads.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
