"""Compare the RL methods from one shared SFT warm-up, several seeds each, on equal budgets.

    python scripts/compare_methods.py                      # the full comparison (see --help)
    python scripts/compare_methods.py --quick              # a tiny smoke run (about a minute)

1. Warm-up: `--config` (default configs/demo.yaml) is trained with `rl_iterations=0`; its
   policy and tokenizer are saved as a Hugging Face folder (`<work>/sft/policy`), and its
   Lightning checkpoint stays under `<work>/sft`. `--reuse` skips this when the folder exists.
2. RL: every method overlay (`configs/method/<m>.yaml`) x seed starts from that folder
   (`model.policy.name_or_path`) with `sft_iterations=0`, the same RL iterations, prompts
   (`data.seed` = seed, so all methods see the same prompts for a given seed), generations,
   evaluation set and callbacks. Each run is a subprocess; `--jobs` of them at a time, each
   with `--threads` torch threads. The demo's gate-threshold schedule is left out so that each
   method is exactly its overlay.
3. Report: `<out>/compare.md` (held-out accuracy mean +- std over seeds, pass@k, maj@k, final
   token entropy, wall time), `<out>/compare.json`, and plots `<out>/compare_accuracy.png`,
   `<out>/compare_reward.png`, `<out>/compare_entropy.png` (mean over seeds, band = +-1 std).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot_run import load_scalars  # noqa: E402

METHODS = {
    "grpo": "GRPO",
    "dapo": "DAPO",
    "chord_phi": "CHORD-phi",
    "ce_gppo": "CE-GPPO",
    "espo": "ESPO",
    "egspo": "EGSPO",
}
# The RL runs' callbacks: entropy statistics only (no gate schedule, no checkpoints).
RL_CALLBACKS = (
    '[{"class_path": "egspo.callbacks.EntropyStatsLogger", "init_args": {"histogram_every": 1000}}]'
)
QUICK_MODEL = (
    '{"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,'
    ' "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}'
)
# --quick: a tiny model and budget, to check the pipeline end to end.
QUICK_OVERRIDES = [
    f"--model.policy.config={QUICK_MODEL}",
    "--model.sft_iterations=3",
    "--model.rollout.num_generations=4",
    "--model.rollout.max_completion_length=12",
    "--model.evaluation.max_completion_length=12",
    "--data.prompts_per_step=2",
    "--data.expert_per_step=4",
    "--data.eval_size=8",
    "--data.eval_batch_size=8",
]
QUICK_RL_ITERATIONS = 2


@dataclass
class RunResult:
    """One RL run: where it is, what it measured, how long it took."""

    method: str
    seed: int
    run_dir: str
    wall_time: float = math.nan
    ok: bool = False
    error: str = ""
    final: dict[str, float] = field(default_factory=dict)  # headline metrics after RL (mean over eval sets)
    curves: dict[str, dict[int, float]] = field(
        default_factory=dict
    )  # reward, entropy, accuracy per iteration


# ----------------------------------------------------------------------------- warm-up
def warm_up(
    config: Path, overrides: list[str], work: Path, threads: int
) -> tuple[Path, dict[str, float], float]:
    """Train the SFT warm-up in this process; save its policy + tokenizer as a HF folder."""
    import torch

    from egspo.cli import run

    torch.set_num_threads(threads)
    start = time.perf_counter()
    cli = run(
        args=[
            "--config",
            str(config),
            *overrides,
            "--model.rl_iterations=0",
            f"--trainer.default_root_dir={work / 'sft'}",
            "--trainer.enable_progress_bar=false",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    target = work / "sft" / "policy"
    cli.model.policy.save_pretrained(target)
    cli.model.tokenizer.save_pretrained(target)
    metrics = _headline_metrics(cli.model.summary.phases.get("sft", {}))
    (work / "sft" / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return target, metrics, time.perf_counter() - start


def _headline_metrics(per_set: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over the eval sets."""
    keys = sorted({k for values in per_set.values() for k in values})
    return {k: statistics.fmean(v[k] for v in per_set.values() if k in v) for k in keys}


# ----------------------------------------------------------------------------- RL runs
def rl_command(
    config: Path, method: str, seed: int, policy_dir: Path, run_dir: Path, overrides: list[str]
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "egspo",
        "fit",
        "--config",
        str(config),
        "--config",
        str(ROOT / "configs" / "method" / f"{method}.yaml"),
        *overrides,
        "--model.sft_iterations=0",
        f"--model.policy.name_or_path={policy_dir}",
        "--model.policy.config=null",
        "--model.policy.tokenizer=null",
        f"--seed_everything={seed}",
        f"--data.seed={seed}",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.callbacks={RL_CALLBACKS}",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def run_one(command: list[str], result: RunResult, threads: int) -> RunResult:
    """Run one RL job to completion and read back its summary and curves."""
    run_dir = Path(result.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["TOKENIZERS_PARALLELISM"] = "false"
    start = time.perf_counter()
    with (run_dir / "stdout.log").open("w") as log:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    result.wall_time = time.perf_counter() - start
    if code != 0:
        result.error = f"exit code {code}, see {run_dir / 'stdout.log'}"
        return result
    return collect(result)


def collect(result: RunResult) -> RunResult:
    """Fill `final` and `curves` from the run's summary.json and event file."""
    run_dir = Path(result.run_dir)
    summaries = sorted(run_dir.rglob("summary.json"), key=lambda p: p.stat().st_mtime)
    if not summaries:
        result.error = f"no summary.json under {run_dir}"
        return result
    summary = json.loads(summaries[-1].read_text())
    final = _headline_metrics(summary.get("rl", {}).get("metrics", {}))
    if not final and "rl" in summary:
        final = {"accuracy": summary["rl"]["accuracy"]}
    scalars = load_scalars(summaries[-1].parent)
    accuracy = _mean_over_sets(scalars, "accuracy")
    result.curves = {
        "reward": scalars.get("reward", {}),
        "entropy": scalars.get("entropy", {}),
        "accuracy": accuracy,  # every run starts from the warm-up: its accuracy is the point at 0
    }
    entropy = [v for _it, v in sorted(result.curves["entropy"].items())]
    final["final_entropy"] = statistics.fmean(entropy[-5:]) if entropy else math.nan
    result.final = final
    result.ok = True
    return result


def _mean_over_sets(scalars: dict[str, dict[int, float]], metric: str) -> dict[int, float]:
    tags = [t for t in scalars if t.startswith("val/") and t.endswith(f"/{metric}")]
    iterations = sorted(set.intersection(*(set(scalars[t]) for t in tags))) if tags else []
    return {it: statistics.fmean(scalars[t][it] for t in tags) for it in iterations}


# ----------------------------------------------------------------------------- aggregation
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for none."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[RunResult]) -> dict[str, dict[str, tuple[float, float]]]:
    """`{method: {metric: (mean, std over seeds)}}` of the final metrics and wall time."""
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method and r.ok]
        keys = sorted({k for r in runs for k in r.final})
        row = {k: mean_std([r.final.get(k, math.nan) for r in runs]) for k in keys}
        row["wall_time"] = mean_std([r.wall_time for r in runs])
        row["seeds"] = (float(len(runs)), 0.0)
        table[method] = row
    return table


def band(curves: list[dict[int, float]]) -> tuple[list[int], list[float], list[float]]:
    """Iterations every curve has, and the mean and std (over curves) at each of them."""
    if not curves:
        return [], [], []
    common = sorted(set.intersection(*(set(c) for c in curves)))
    means, stds = [], []
    for it in common:
        mean, std = mean_std([c[it] for c in curves])
        means.append(mean)
        stds.append(std)
    return common, means, stds


def _cell(stat: tuple[float, float] | None, digits: int = 3) -> str:
    if stat is None or math.isnan(stat[0]):
        return "-"
    mean, std = stat
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_table(
    table: dict[str, dict[str, tuple[float, float]]], sft: dict[str, float] | None = None
) -> str:
    """The Markdown results table: one row per method (+ the SFT warm-up), mean ± std over seeds."""
    extra = sorted(
        {k for row in table.values() for k in row if k.startswith(("pass@", "maj@"))},
        key=lambda k: (k.split("@")[0] != "pass", int(k.split("@")[1])),
    )
    head = ["method", "held-out accuracy", *extra, "final entropy (nats)", "wall time / run (s)", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if sft:
        cells = ["SFT warm-up", f"{sft.get('accuracy', math.nan):.3f}"]
        cells += [f"{sft[k]:.3f}" if k in sft else "-" for k in extra]
        lines.append("| " + " | ".join([*cells, "-", "-", "-"]) + " |")
    for method, row in table.items():
        cells = [METHODS.get(method, method), _cell(row.get("accuracy"))]
        cells += [_cell(row.get(k)) for k in extra]
        cells += [_cell(row.get("final_entropy")), _cell(row.get("wall_time"), 0), f"{int(row['seeds'][0])}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_bands(
    results: list[RunResult], key: str, ylabel: str, path: Path, sft_value: float | None = None
) -> Path:
    """One line per method (mean over seeds) with a +-1 std band, against the RL iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method in dict.fromkeys(r.method for r in results):
        curves = [r.curves.get(key, {}) for r in results if r.method == method and r.ok]
        xs, means, stds = band([c for c in curves if c])
        if not xs:
            continue
        style = {"marker": "o", "markersize": 3.5} if len(xs) <= 15 else {}
        (line,) = ax.plot(xs, means, label=METHODS.get(method, method), linewidth=1.6, **style)
        lo = [m - s for m, s in zip(means, stds, strict=True)]
        hi = [m + s for m, s in zip(means, stds, strict=True)]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    if sft_value is not None and not math.isnan(sft_value):
        ax.axhline(sft_value, color="black", linestyle=":", linewidth=1, label="SFT warm-up")
    ax.set_xlabel("RL iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    seeds = len({r.seed for r in results})
    ax.set_title(f"{ylabel}: mean over {seeds} seeds, band = ±1 std", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    results: list[RunResult],
    sft: dict[str, float],
    out: Path,
    settings: dict[str, object],
) -> Path:
    """compare.md, compare.json and the three plots."""
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(results)
    failed = [r for r in results if not r.ok]
    lines = [
        "# Method comparison",
        "",
        "Every method starts from the same SFT warm-up checkpoint and gets the same RL budget "
        "(iterations, prompts per iteration, generations per prompt); held-out metrics are on the "
        "same eval set, after RL, mean ± std over seeds. `accuracy` is the greedy answer's; "
        "pass@k and maj@k use sampled answers at the training temperature. Final entropy: mean "
        "token entropy of the rollouts over the last 5 RL iterations.",
        "",
        format_table(table, sft),
        "",
        "Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()),
        "",
        "![held-out accuracy](compare_accuracy.png)",
        "",
        "![reward](compare_reward.png) ![entropy](compare_entropy.png)",
    ]
    if failed:
        lines += ["", "Failed runs:", *(f"- {r.method} seed {r.seed}: {r.error}" for r in failed)]
    path = out / "compare.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(
        json.dumps({"settings": settings, "sft": sft, "runs": [asdict(r) for r in results]}, indent=1)
    )
    plot_bands(
        results, "accuracy", "held-out accuracy (greedy)", out / "compare_accuracy.png", sft.get("accuracy")
    )
    plot_bands(results, "reward", "rollout reward", out / "compare_reward.png")
    plot_bands(results, "entropy", "mean token entropy (nats)", out / "compare_entropy.png")
    return path


# ----------------------------------------------------------------------------- main
def config_budget(config: Path, overrides: list[str]) -> dict[str, object]:
    """The RL budget every run gets: the config's values, with `--key=value` overrides applied."""
    import yaml

    tree = yaml.safe_load(config.read_text()) or {}
    keys = {
        "rl_iterations": "model.rl_iterations",
        "prompts_per_step": "data.prompts_per_step",
        "num_generations": "model.rollout.num_generations",
        "max_completion_length": "model.rollout.max_completion_length",
    }
    budget: dict[str, object] = {}
    for name, dotted in keys.items():
        node = tree
        for part in dotted.split("."):
            node = (node or {}).get(part)
        budget[name] = node
        for override in overrides:
            if override.startswith(f"--{dotted}="):
                budget[name] = yaml.safe_load(override.split("=", 1)[1])
    return budget


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rl-iterations", type=int, default=None, help="default: the config's")
    parser.add_argument("--eval-every", type=int, default=10, help="held-out eval every n RL iterations")
    parser.add_argument("--eval-samples", type=int, default=4, help="samples per eval prompt (pass@k, maj@k)")
    parser.add_argument("--jobs", type=int, default=2, help="RL runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per RL run")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "compare", help="run folders")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="report and plots")
    parser.add_argument("--reuse", action="store_true", help="reuse <work>/sft/policy if it exists")
    parser.add_argument("--quick", action="store_true", help="tiny model and budget: a smoke test")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra CLI override for every run, e.g. --set model.rollout.max_completion_length=32",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    overrides = [f"--{o.lstrip('-')}" for o in args.overrides]
    rl_iterations = args.rl_iterations
    eval_every = args.eval_every
    if args.quick:
        overrides = QUICK_OVERRIDES + overrides
        rl_iterations = rl_iterations or QUICK_RL_ITERATIONS
        eval_every = rl_iterations
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    eval_overrides = [f"--model.evaluation.num_samples={args.eval_samples}"]

    policy_dir = work / "sft" / "policy"
    metrics_file = work / "sft" / "metrics.json"
    if args.reuse and (policy_dir / "config.json").is_file() and metrics_file.is_file():
        sft, sft_time = json.loads(metrics_file.read_text()), 0.0
        print(f"reusing the warm-up in {policy_dir}")
    else:
        print("SFT warm-up ...", flush=True)
        policy_dir, sft, sft_time = warm_up(
            args.config, overrides + eval_overrides, work, threads=max(args.jobs * args.threads, 1)
        )
        print(
            f"SFT warm-up: {sft_time:.0f} s, held-out accuracy {sft.get('accuracy', math.nan):.3f}",
            flush=True,
        )

    rl_overrides = [*overrides, *eval_overrides, f"--trainer.val_check_interval={eval_every}"]
    if rl_iterations is not None:
        rl_overrides.append(f"--model.rl_iterations={rl_iterations}")
    jobs = []
    for seed in args.seeds:  # seed-major: partial results cover every method early
        for method in args.methods:
            run_dir = work / method / f"seed{seed}"
            command = rl_command(args.config, method, seed, policy_dir, run_dir, rl_overrides)
            jobs.append((command, RunResult(method=method, seed=seed, run_dir=str(run_dir))))
    start = time.perf_counter()
    done: list[RunResult] = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, command, result, args.threads) for command, result in jobs]
        for future in futures:
            result = future.result()
            done.append(result)
            status = f"accuracy {result.final.get('accuracy', math.nan):.3f}" if result.ok else result.error
            eta = (time.perf_counter() - start) / len(done) * (len(jobs) - len(done))
            print(
                f"[{len(done)}/{len(jobs)}] {result.method} seed {result.seed}: {result.wall_time:.0f} s, "
                f"{status} (about {eta / 60:.0f} min left)",
                flush=True,
            )
    budget = config_budget(args.config, overrides)
    if rl_iterations is not None:
        budget["rl_iterations"] = rl_iterations
    settings = {
        "config": os.path.relpath(args.config, ROOT),
        **budget,
        "seeds": " ".join(map(str, args.seeds)),
        "eval_num_samples": args.eval_samples,
        "eval_every": args.eval_every,
        "quick": args.quick,
        "sft_time_s": round(sft_time),
        "rl_time_s": round(time.perf_counter() - start),
        "jobs": args.jobs,
        "overrides": " ".join(args.overrides) or "none",
    }
    report = write_report(done, sft, args.out, settings)
    print(f"wrote {report}")
    return report


if __name__ == "__main__":
    main()
