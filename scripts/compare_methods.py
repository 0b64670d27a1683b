"""Compare RL methods (or variants of one) from one shared SFT warm-up, several seeds each, equal budgets.

    python scripts/compare_methods.py                      # the full comparison (see --help)
    python scripts/compare_methods.py --quick              # a tiny smoke run (about a minute)
    python scripts/compare_methods.py --arm lr_half=egspo:--model.update.rl_learning_rate=1e-4

1. Warm-up: `--config` (default configs/demo.yaml) is trained with `rl_iterations=0`; its policy
   and tokenizer are saved as a Hugging Face folder (`<work>/sft/policy`). `--reuse` skips this
   when the folder exists.
2. RL: every arm x seed starts from that folder (`model.policy.name_or_path`) with
   `sft_iterations=0` and the same budget: RL iterations, prompts (`data.seed` = seed, so all
   arms see the same prompts for a given seed), generations, evaluation set. An arm is a method
   overlay (`configs/method/<m>.yaml`) plus CLI overrides. Updates are off-policy by default
   (`--steps-per-batch 2`: two optimizer steps per rollout batch), so that the clip-based methods
   differ; with one step per batch every ratio is 1 and GRPO, DAPO and CE-GPPO coincide. Each run
   is a subprocess; `--jobs` at a time, each with `--threads` torch threads.
3. Report: `<out>/compare.md` (held-out metrics, mean and 95% interval over seeds), `compare.json`,
   and plots per RL iteration, one line per arm: held-out accuracy, reward, token entropy, and the
   fraction of all-equal groups (groups whose samples all score alike carry no signal).
4. Paired tests (`--paired A:B`, repeatable): arm A against arm B seed by seed (the same seed gives
   both the same prompts): the differences A - B of the held-out metrics, their mean with a 95%
   interval (Student's t) and the two-sided sign test, in `compare.md` and `compare.json`. The arms
   of the pairs are run when `--methods` is not given. With `--reuse` an interrupted run resumes:

       python scripts/compare_methods.py --reuse --seeds $(seq 0 19) --paired egspo_mu:chord_phi \
           --paired egspo:grpo --paired top_entropy:grpo --out results/paired

   Where the run folders are gone (another machine, a clean checkout), `--earlier compare.json`
   takes the runs an earlier report holds, if it used the same protocol and its warm-up measured
   the same held-out metrics as this one's; the report says which runs came from it.
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


@dataclass(frozen=True)
class Arm:
    """One thing to compare: a method overlay (or none) and extra CLI overrides."""

    name: str
    label: str
    overlay: str | None = None  # configs/method/<overlay>.yaml
    overrides: tuple[str, ...] = ()


METHODS = {
    arm.name: arm
    for arm in (
        Arm("grpo", "GRPO", "grpo"),
        Arm("dapo", "DAPO", "dapo"),
        Arm("chord_phi", "CHORD-phi", "chord_phi"),
        Arm("ce_gppo", "CE-GPPO", "ce_gppo"),
        Arm("espo", "ESPO", "espo"),
        Arm("egspo", "EGSPO", "egspo"),
        Arm("egspo_mu", "EGSPO + mu", "egspo_mu"),
        Arm("papo", "PAPO", "papo"),
        Arm("oger", "OGER", "oger"),
        Arm("uec_rl", "UEC-RL", "uec_rl"),
        Arm("gspo", "GSPO", "gspo"),
        Arm("cispo", "CISPO", "cispo"),
        Arm("clip_cov", "Clip-Cov", "clip_cov"),
        Arm("kl_cov", "KL-Cov", "kl_cov"),
        Arm("top_entropy", "top-entropy (80/20)", "top_entropy"),
    )
}
DEFAULT_METHODS = list(METHODS)
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
CURVES = {
    "accuracy": "held-out accuracy (greedy)",
    "reward": "rollout reward",
    "entropy": "mean token entropy (nats)",
    "rollout/all_equal_groups": "fraction of all-equal groups",
}


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
    curves: dict[str, dict[int, float]] = field(default_factory=dict)  # per RL iteration
    earlier: str = ""  # the compare.json this result was taken from (--earlier), else ""


# ----------------------------------------------------------------------------- warm-up
def warm_up(
    config: Path, overrides: list[str], work: Path, threads: int
) -> tuple[Path, dict[str, float], float]:
    """Train the SFT warm-up in this process; save its policy + tokenizer as a HF folder."""
    import torch

    from egspo.cli import run

    torch.set_num_threads(threads)
    start = time.perf_counter()
    args = ["--config", str(config), *overrides, "--model.rl_iterations=0"]
    args += [f"--trainer.default_root_dir={work / 'sft'}", "--trainer.enable_progress_bar=false"]
    cli = run(args, run=False)
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
    config: Path, arm: Arm, seed: int, policy_dir: Path, run_dir: Path, overrides: list[str]
) -> list[str]:
    overlay = ["--config", str(ROOT / "configs" / "method" / f"{arm.overlay}.yaml")] if arm.overlay else []
    return [
        sys.executable,
        "-m",
        "egspo",
        "fit",
        "--config",
        str(config),
        *overlay,
        *overrides,
        *arm.overrides,
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
    (run_dir / "wall_time.json").write_text(json.dumps({"wall_time_s": result.wall_time}))
    return collect(result)


def finished(result: RunResult) -> RunResult | None:
    """The run's results when an earlier invocation completed it (`--reuse`), else None."""
    marker = Path(result.run_dir) / "wall_time.json"
    if not marker.is_file():
        return None
    result.wall_time = json.loads(marker.read_text())["wall_time_s"]
    collected = collect(result)
    return collected if collected.ok else None


# What must match for an earlier report's runs to stand beside this invocation's.
EARLIER_SETTINGS = (
    "config",
    "rl_iterations",
    "prompts_per_step",
    "num_generations",
    "max_completion_length",
    "optimizer_steps_per_rollout_batch",
    "eval_num_samples",
    "eval_every",
    "quick",
    "threads",
    "overrides",
)


def load_earlier(
    path: Path, settings: dict[str, object], sft: dict[str, float]
) -> dict[tuple[str, int], RunResult]:
    """The finished runs of an earlier report (`--earlier`), by (arm, seed).

    They stand in for run folders that are gone (another machine, a clean checkout) only when the
    earlier report used the same protocol and its warm-up measured the same held-out metrics as
    this one's: otherwise the arms would not start from the same policy. Exits with one line if not.
    """
    try:
        payload = json.loads(path.read_text())
        earlier_settings, earlier_sft, runs = payload["settings"], payload["sft"], payload["runs"]
    except (OSError, ValueError, KeyError) as error:
        sys.exit(f"--earlier {path}: not a compare.json this script wrote ({error})")
    for key in EARLIER_SETTINGS:
        if str(earlier_settings.get(key)) != str(settings.get(key)):
            sys.exit(
                f"--earlier {path}: {key} was {earlier_settings.get(key)!r}, this run has {settings.get(key)!r}"
            )
    for key in sorted(set(sft) | set(earlier_sft)):
        if not math.isclose(sft.get(key, math.nan), earlier_sft.get(key, math.nan), abs_tol=1e-9):
            sys.exit(
                f"--earlier {path}: its warm-up measured {key}={earlier_sft.get(key)}, this one "
                f"{sft.get(key)}: the runs would not start from the same policy"
            )
    found = {}
    for run in runs:
        if not run.get("ok"):
            continue
        curves = {name: {int(it): v for it, v in curve.items()} for name, curve in run["curves"].items()}
        result = RunResult(**{**run, "curves": curves, "earlier": str(path)})
        found[result.method, result.seed] = result
    return found


def collect(result: RunResult) -> RunResult:
    """Fill `final` and `curves` from the run's summary.json and event file."""
    run_dir = Path(result.run_dir)
    summaries = sorted(run_dir.rglob("summary.json"), key=lambda p: p.stat().st_mtime)
    if not summaries:
        result.error = f"no summary.json under {run_dir}"
        return result
    summary = json.loads(summaries[-1].read_text())
    final = _headline_metrics(summary.get("rl", {}).get("metrics", {}))
    scalars = load_scalars(summaries[-1].parent)
    result.curves = {key: scalars.get(key, {}) for key in CURVES if key != "accuracy"}
    result.curves["accuracy"] = _mean_over_sets(scalars, "accuracy")  # the warm-up's is the point at 0
    for key, name in (("entropy", "final_entropy"), ("rollout/all_equal_groups", "final_all_equal")):
        values = [v for _it, v in sorted(result.curves[key].items())]
        final[name] = statistics.fmean(values[-5:]) if values else math.nan
    result.final = final
    result.ok = True
    return result


def _mean_over_sets(scalars: dict[str, dict[int, float]], metric: str) -> dict[int, float]:
    tags = [t for t in scalars if t.startswith("val/") and t.endswith(f"/{metric}")]
    iterations = sorted(set.intersection(*(set(scalars[t]) for t in tags))) if tags else []
    return {it: statistics.fmean(scalars[t][it] for t in tags) for it in iterations}


# ----------------------------------------------------------------------------- aggregation
# 97.5% quantiles of Student's t for n - 1 = 1..30 degrees of freedom (two-sided 95% intervals).
_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
    20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
    29: 2.045, 30: 2.042,
}  # fmt: skip


def mean_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval over seeds (Student's t); NaN for none."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], 0.0
    t = _T975.get(len(values) - 1, 1.96)
    return statistics.fmean(values), t * statistics.stdev(values) / math.sqrt(len(values))


def aggregate(results: list[RunResult]) -> dict[str, dict[str, tuple[float, float]]]:
    """`{arm: {metric: (mean, 95% half-width over seeds)}}` of the final metrics and wall time."""
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method and r.ok]
        keys = sorted({k for r in runs for k in r.final})
        row = {k: mean_interval([r.final.get(k, math.nan) for r in runs]) for k in keys}
        row["wall_time"] = mean_interval([r.wall_time for r in runs])
        row["seeds"] = (float(len(runs)), 0.0)
        table[method] = row
    return table


def sign_test(differences: list[float]) -> float:
    """Two-sided exact sign test: p-value of as lopsided a split of signs under p = 1/2 (ties dropped)."""
    signs = [d for d in differences if d != 0 and not math.isnan(d)]
    n, k = len(signs), sum(d > 0 for d in signs)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


PAIRED_METRICS = ("accuracy", "pass@1", "final_entropy")


def paired(results: list[RunResult], first: str, second: str) -> dict[str, dict[str, object]]:
    """Arm `first` minus arm `second`, seed by seed (seeds both finished), per metric: the differences,
    their mean with a 95% interval, the wins/losses/ties and the sign test's p-value."""
    by_seed = {(r.method, r.seed): r for r in results if r.ok}
    seeds = sorted(s for m, s in by_seed if m == first and (second, s) in by_seed)
    out: dict[str, dict[str, object]] = {}
    for metric in PAIRED_METRICS:
        diffs = [
            by_seed[first, s].final.get(metric, math.nan) - by_seed[second, s].final.get(metric, math.nan)
            for s in seeds
        ]
        mean, half = mean_interval(diffs)
        out[metric] = {
            "seeds": seeds,
            "differences": diffs,
            "mean": mean,
            "half_width": half,
            "wins": sum(d > 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs),
            "ties": sum(d == 0 for d in diffs),
            "sign_test_p": sign_test(diffs),
        }
    return out


def format_paired(tests: dict[str, dict[str, dict[str, object]]], labels: dict[str, str]) -> str:
    """Markdown table of the paired tests: one row per pair and metric."""
    head = [
        "A - B",
        "metric",
        "seeds",
        "mean difference (95% interval)",
        "A better / worse / tie",
        "sign test p",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pair, metrics in tests.items():
        first, second = pair.split(":")
        name = f"{labels.get(first, first)} - {labels.get(second, second)}"
        for metric, t in metrics.items():
            lo, hi = t["mean"] - t["half_width"], t["mean"] + t["half_width"]
            lines.append(
                f"| {name} | {metric} | {len(t['seeds'])} | {t['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                f"{t['wins']} / {t['losses']} / {t['ties']} | {t['sign_test_p']:.3f} |"
            )
    return "\n".join(lines)


def parse_pair(text: str) -> tuple[str, str]:
    """`A:B` (two known arm names) as a pair."""
    first, sep, second = text.partition(":")
    if not sep or first not in METHODS or second not in METHODS or first == second:
        raise argparse.ArgumentTypeError(
            f"--paired {text!r}: expected A:B, two different arms of {list(METHODS)}"
        )
    return first, second


def band(curves: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Iterations every curve has, and the mean, lowest and highest value over curves at each."""
    if not curves:
        return [], [], [], []
    common = sorted(set.intersection(*(set(c) for c in curves)))
    values = [[c[it] for c in curves] for it in common]
    return common, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def smooth(curve: dict[int, float], window: int) -> dict[int, float]:
    """Trailing moving average over `window` points (per-iteration rollout statistics are noisy)."""
    its = sorted(curve)
    return {
        it: statistics.fmean(curve[j] for j in its[max(0, i - window + 1) : i + 1])
        for i, it in enumerate(its)
    }


def _cell(stat: tuple[float, float] | None, digits: int = 3) -> str:
    if stat is None or math.isnan(stat[0]):
        return "-"
    mean, half = stat
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def format_table(
    table: dict[str, dict[str, tuple[float, float]]],
    labels: dict[str, str],
    sft: dict[str, float] | None = None,
) -> str:
    """The Markdown results table: one row per arm (+ the SFT warm-up), mean ± 95% interval over seeds."""
    extra = sorted(
        {k for row in table.values() for k in row if k.startswith(("pass@", "maj@"))},
        key=lambda k: (k.split("@")[0] != "pass", int(k.split("@")[1])),
    )
    head = ["method", "held-out accuracy", *extra, "final entropy (nats)", "final all-equal share"]
    head += ["wall time / run (s)", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if sft:
        cells = ["SFT warm-up", f"{sft.get('accuracy', math.nan):.3f}"]
        cells += [f"{sft[k]:.3f}" if k in sft else "-" for k in extra]
        lines.append("| " + " | ".join([*cells, "-", "-", "-", "-"]) + " |")
    for method, row in table.items():
        cells = [labels.get(method, method), _cell(row.get("accuracy"))]
        cells += [_cell(row.get(k)) for k in extra]
        cells += [_cell(row.get("final_entropy")), _cell(row.get("final_all_equal"))]
        cells += [_cell(row.get("wall_time"), 0), f"{int(row['seeds'][0])}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_bands(results: list[RunResult], labels: dict[str, str], sft: dict[str, float], path: Path) -> Path:
    """One panel per curve (accuracy, reward, entropy, all-equal groups), one line per arm: the mean
    over seeds, and a band from the lowest to the highest seed. Rollout statistics are per
    iteration and noisy: shown as a moving average over 10 iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    for ax, (key, ylabel) in zip(axes.flat, CURVES.items(), strict=True):
        for method in dict.fromkeys(r.method for r in results):
            curves = [r.curves.get(key, {}) for r in results if r.method == method and r.ok]
            curves = [{int(k): v for k, v in c.items()} for c in curves if c]
            if key == "accuracy" and "accuracy" in sft:  # every run starts from the warm-up
                curves = [{0: sft["accuracy"], **c} for c in curves]
            elif key != "accuracy":
                curves = [smooth(c, 10) for c in curves]
            xs, means, lo, hi = band(curves)
            if not xs:
                continue
            style = {"marker": "o", "markersize": 3} if len(xs) <= 15 else {}
            (line,) = ax.plot(xs, means, label=labels.get(method, method), linewidth=1.5, **style)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12, linewidth=0)
        if key == "accuracy" and "accuracy" in sft:
            ax.axhline(sft["accuracy"], color="black", linestyle=":", linewidth=1, label="SFT warm-up")
        ax.set_xlabel("RL iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7.5, ncol=2)
    seeds = len({r.seed for r in results})
    fig.suptitle(f"mean over {seeds} seeds; bands: lowest to highest seed", fontsize=10)
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
    labels: dict[str, str],
    pairs: list[tuple[str, str]] = (),
) -> Path:
    """compare.md, compare.json and the curves' plot (+ the paired tests of `pairs`)."""
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(results)
    tests = {f"{a}:{b}": paired(results, a, b) for a, b in pairs}
    failed = [r for r in results if not r.ok]
    lines = [
        "# Method comparison",
        "",
        "Every arm starts from the same SFT warm-up checkpoint and gets the same RL budget "
        "(iterations, prompts per iteration, generations per prompt); held-out metrics are on the "
        "same eval set, after RL: mean ± half-width of the 95% interval over seeds (Student's t). "
        "`accuracy` is the greedy answer's; pass@k and maj@k use sampled answers at the training "
        "temperature. Final entropy and all-equal share: mean token entropy of the rollouts, and the "
        "fraction of groups whose samples all got the same reward, over the last 5 RL iterations.",
        "",
        format_table(table, labels, sft),
        "",
        "Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()),
        "",
        "![curves](compare_curves.png)",
    ]
    if tests:
        lines += [
            "",
            "## Paired tests",
            "",
            "A - B per seed (the same seed gives both arms the same prompts); mean with the 95% interval "
            "(Student's t), and the two-sided exact sign test on the signs of the differences (ties "
            "dropped). An interval that holds 0 does not resolve the difference.",
            "",
            format_paired(tests, labels),
        ]
    reused = [r for r in results if r.earlier]
    if reused:
        sources = ", ".join(sorted({r.earlier for r in reused}))
        which = "; ".join(
            f"{labels.get(m, m)} seeds {' '.join(str(r.seed) for r in reused if r.method == m)}"
            for m in dict.fromkeys(r.method for r in reused)
        )
        lines += [
            "",
            f"{len(reused)} of the {len(results)} runs are taken from an earlier report ({sources}: same "
            f"protocol, its warm-up measured the same held-out metrics): {which}.",
        ]
    if failed:
        lines += ["", "Failed runs:", *(f"- {r.method} seed {r.seed}: {r.error}" for r in failed)]
    path = out / "compare.md"
    path.write_text("\n".join(lines) + "\n")
    payload = {"settings": settings, "sft": sft, "paired": tests, "runs": [asdict(r) for r in results]}
    (out / "compare.json").write_text(json.dumps(payload, indent=1))
    plot_bands(results, labels, sft, out / "compare_curves.png")
    return path


# ----------------------------------------------------------------------------- main
def parse_arm(text: str) -> Arm:
    """`name=overlay:--opt=value:--opt=value` (overlay may be empty) as an `Arm`."""
    name, _, spec = text.partition("=")
    overlay, *overrides = spec.split(":")
    return Arm(name, name, overlay or None, tuple(overrides))


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
    parser.add_argument("--methods", nargs="*", default=None, choices=list(METHODS), help="default: all")
    parser.add_argument("--arm", action="append", default=[], type=parse_arm, help="name=overlay:--opt=v:...")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rl-iterations", type=int, default=None, help="default: the config's")
    parser.add_argument("--steps-per-batch", type=int, default=2, help="optimizer steps per rollout batch")
    parser.add_argument("--eval-every", type=int, default=None, help="held-out eval every n RL iterations")
    parser.add_argument("--eval-samples", type=int, default=4, help="samples per eval prompt (pass@k, maj@k)")
    parser.add_argument("--jobs", type=int, default=2, help="RL runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per RL run")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "compare", help="run folders")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="report and plots")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse <work>/sft/policy and RL runs an earlier invocation finished",
    )
    parser.add_argument(
        "--paired",
        action="append",
        default=[],
        type=parse_pair,
        metavar="A:B",
        help="paired test of arm A against arm B over the seeds (repeatable); runs their arms",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the runs an earlier invocation finished; train nothing",
    )
    parser.add_argument(
        "--earlier",
        type=Path,
        default=None,
        metavar="COMPARE_JSON",
        help="take runs whose folders are gone from an earlier report (same protocol and warm-up metrics)",
    )
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
    if args.quick:
        overrides = QUICK_OVERRIDES + overrides
    budget = config_budget(args.config, overrides)
    rl_iterations = args.rl_iterations or (QUICK_RL_ITERATIONS if args.quick else budget["rl_iterations"])
    budget["rl_iterations"] = rl_iterations
    rollout_batch = budget["prompts_per_step"] * budget["num_generations"]
    if args.methods is not None:
        names = args.methods
    elif args.paired:
        names = list(dict.fromkeys(m for pair in args.paired for m in pair))
    else:
        names = [] if args.arm else DEFAULT_METHODS
    missing = sorted({m for pair in args.paired for m in pair} - set(names))
    if missing:
        print(f"--paired: arms {missing} are not among --methods", file=sys.stderr)
        sys.exit(2)
    arms = [METHODS[m] for m in names]
    arms += args.arm
    labels = {arm.name: arm.label for arm in arms}
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    eval_overrides = [f"--model.evaluation.num_samples={args.eval_samples}"]

    policy_dir = work / "sft" / "policy"
    metrics_file = work / "sft" / "metrics.json"
    if args.report_only and not metrics_file.is_file():
        print(f"--report-only: no finished warm-up in {work / 'sft'}", file=sys.stderr)
        sys.exit(2)
    if (args.reuse or args.report_only) and (policy_dir / "config.json").is_file() and metrics_file.is_file():
        sft, sft_time = json.loads(metrics_file.read_text()), 0.0
        print(f"reusing the warm-up in {policy_dir}")
    else:
        print("SFT warm-up ...", flush=True)
        threads = max(args.jobs * args.threads, 1)
        policy_dir, sft, sft_time = warm_up(args.config, overrides + eval_overrides, work, threads)
        print(
            f"SFT warm-up: {sft_time:.0f} s, held-out accuracy {sft.get('accuracy', math.nan):.3f}",
            flush=True,
        )

    eval_every = args.eval_every or rl_iterations
    rl_overrides = [
        *overrides,
        *eval_overrides,
        f"--model.rl_iterations={rl_iterations}",
        f"--trainer.val_check_interval={eval_every}",
        f"--model.update.mini_batch_size={rollout_batch // args.steps_per_batch}",
    ]
    settings = {
        "config": os.path.relpath(args.config, ROOT),
        **budget,
        "optimizer_steps_per_rollout_batch": args.steps_per_batch,
        "seeds": " ".join(map(str, args.seeds)),
        "eval_num_samples": args.eval_samples,
        "eval_every": eval_every,
        "quick": args.quick,
        "sft_time_s": round(sft_time),
        "rl_time_s": 0,
        "jobs": args.jobs,
        "threads": args.threads,
        "overrides": " ".join(args.overrides) or "none",
    }
    earlier = load_earlier(args.earlier, settings, sft) if args.earlier else {}
    jobs = []
    for seed in args.seeds:  # seed-major: partial results cover every arm early
        for arm in arms:
            run_dir = work / arm.name / f"seed{seed}"
            command = rl_command(args.config, arm, seed, policy_dir, run_dir, rl_overrides)
            jobs.append((command, RunResult(method=arm.name, seed=seed, run_dir=str(run_dir))))
    start = time.perf_counter()
    done: list[RunResult] = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = []
        for command, result in jobs:
            done_before = finished(result) if args.reuse or args.report_only else None
            done_before = done_before or earlier.get((result.method, result.seed))
            if done_before is None and args.report_only:
                print(f"not run yet: {result.method} seed {result.seed}")
                continue
            futures.append(done_before or pool.submit(run_one, command, result, args.threads))
        for future in futures:
            result = future if isinstance(future, RunResult) else future.result()
            done.append(result)
            status = f"accuracy {result.final.get('accuracy', math.nan):.3f}" if result.ok else result.error
            eta = (time.perf_counter() - start) / len(done) * (len(futures) - len(done))
            print(
                f"[{len(done)}/{len(futures)}] {result.method} seed {result.seed}: {result.wall_time:.0f} s, "
                f"{status} (about {eta / 60:.0f} min left)",
                flush=True,
            )
    settings["rl_time_s"] = round(time.perf_counter() - start)
    if earlier:
        settings["earlier"] = os.path.relpath(args.earlier, ROOT)
    report = write_report(done, sft, args.out, settings, labels, args.paired)
    print(f"wrote {report}")
    return report


if __name__ == "__main__":
    main()
