"""Run the demo as a user would, on several seeds and under small changes, and tabulate the RL gain.

    python scripts/check_demo.py                 # seeds 0 1 2, then seed 0 with 1 thread, lr / 2, lr x 2
    python scripts/check_demo.py --only seeds    # the three seeds alone
    <vllm venv>/bin/python scripts/check_demo.py --only seeds --engine egspo.rollout.VLLMEngine

Each run is `python -m egspo fit --config configs/demo.yaml` in a fresh process with its own
root folder; the held-out greedy accuracy after the warm-up and after RL comes from its
summary.json, the wall time from the clock around the process. The runs go one after another
(the demo uses both cores), and `<out>/demo_check.md` and `demo_check.json` hold the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"


def variants(rl_lr: float) -> dict[str, tuple[str, list[str], int | None]]:
    """`name: (group, extra CLI options, torch threads)` of every run."""
    runs: dict[str, tuple[str, list[str], int | None]] = {
        f"seed {s}": ("seeds", [f"--seed_everything={s}", f"--data.seed={s}"], None) for s in (0, 1, 2)
    }
    runs["seed 0, 1 thread"] = ("changes", ["--seed_everything=0"], 1)
    runs[f"seed 0, RL lr {rl_lr / 2:g} (halved)"] = (
        "changes",
        ["--seed_everything=0", f"--model.update.rl_learning_rate={rl_lr / 2}"],
        None,
    )
    runs[f"seed 0, RL lr {rl_lr * 2:g} (doubled)"] = (
        "changes",
        ["--seed_everything=0", f"--model.update.rl_learning_rate={rl_lr * 2}"],
        None,
    )
    return runs


def run(name: str, extra: list[str], threads: int | None, work: Path) -> dict:
    """One demo run in a fresh process; its held-out accuracies after each phase and its wall time."""
    root = work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "egspo", "fit", "--config", str(CONFIG), *extra]
    command += [f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false"]
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    with (root / "stdout.log").open("w") as log:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    summaries = sorted(root.rglob("summary.json"), key=lambda p: p.stat().st_mtime)
    if code != 0 or not summaries:
        return {
            "name": name,
            "ok": False,
            "seconds": seconds,
            "error": f"exit {code}, see {root / 'stdout.log'}",
        }
    summary = json.loads(summaries[-1].read_text())
    sft, rl = summary["sft"], summary["rl"]
    return {
        "name": name,
        "ok": True,
        "seconds": seconds,
        "sft": sft["accuracy"],
        "rl": rl["accuracy"],
        "gain": rl["accuracy"] - sft["accuracy"],
        "sft_metrics": sft["metrics"],
        "rl_metrics": rl["metrics"],
    }


def table(results: list[dict]) -> str:
    lines = [
        "| run | held-out accuracy after the warm-up | after RL | gain | wall time |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if not r["ok"]:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | {r['seconds']:.0f} s |")
            continue
        minutes, seconds = divmod(round(r["seconds"]), 60)
        lines.append(
            f"| {r['name']} | {r['sft']:.3f} | {r['rl']:.3f} | **{r['gain']:+.3f}** | {minutes} min {seconds} s |"
        )
    seeds = [r for r in results if r["ok"] and r["name"].startswith("seed ") and "," not in r["name"]]
    if seeds:
        mean = {k: statistics.fmean(r[k] for r in seeds) for k in ("sft", "rl", "gain")}
        lines.append(
            f"| mean of seeds 0-2 | {mean['sft']:.3f} | {mean['rl']:.3f} | **{mean['gain']:+.3f}** | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["seeds", "changes"], default=None)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "demo_check")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument(
        "--engine", default=None, help="model.rollout.engine of every run (default: the demo's)"
    )
    args = parser.parse_args(argv)
    engine = [] if args.engine is None else [f"--model.rollout.engine={args.engine}"]
    suffix = "" if args.engine is None else "_" + args.engine.rsplit(".", 1)[-1]
    rl_lr = yaml.safe_load(CONFIG.read_text())["model"]["update"]["rl_learning_rate"]
    results = []
    for name, (group, extra, threads) in variants(rl_lr).items():
        if args.only not in (None, group):
            continue
        result = run(name, [*extra, *engine], threads, args.work / suffix.lstrip("_"))
        results.append(result)
        status = f"{result['sft']:.3f} -> {result['rl']:.3f}" if result["ok"] else result["error"]
        print(f"{name}: {status} ({result['seconds']:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"demo_check{suffix}.md"
    load = os.getloadavg()[0]
    path.write_text(
        "# The demo's RL gain: seeds and small changes\n\n"
        f"`python scripts/check_demo.py{'' if args.engine is None else ' --engine ' + args.engine}` "
        f"(`{CONFIG.relative_to(ROOT)}`; held-out greedy accuracy on the "
        "demo's eval set; load average at the end: "
        f"{load:.1f}).\n\n{table(results)}\n"
    )
    (args.out / f"demo_check{suffix}.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
