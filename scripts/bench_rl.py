"""Section 3 of BENCHMARKS.md: RL throughput of egspo (SharedPrefillEngine and HF generate) vs TRL's
GRPOTrainer, every side in a fresh process per repetition, sides interleaved (A B C, then C B A).

Each repetition is checked before it counts: the sides must have sampled the same prompts and
completion token counts within `TOKEN_TOLERANCE` (else it is void), and the load average around it
must stay under `--max-load` (else it is flagged). Medians and ranges are over the repetitions
left; the ratio of a repetition is egspo's tokens/s over TRL's.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import bench_common
from bench_common import (
    QUICK_CASE,
    RL_CASES,
    SIDES,
    TOKEN_TOLERANCE,
    RLCase,
    RLSetup,
    load_average,
    ratio_range,
    run_worker,
    save_model,
)


def rl_repetition(case: RLCase, model_dir: str, setup: RLSetup, reverse: bool) -> dict[str, dict]:
    """Every side once, in a fresh process each, in order or reversed; load average around it all."""
    names = list(SIDES)[::-1] if reverse else list(SIDES)
    results: dict[str, dict] = {"load": {"before": load_average()}}
    for name in names:
        _label, kind, engine = SIDES[name]
        spec = {"kind": kind, "model": model_dir, "setup": asdict(setup), "engine": engine}
        results[name] = run_worker(spec)
        r = results[name]
        print(
            f"  {case.name} {name}: {sum(x['tokens'] for x in r['rounds'])} tokens, "
            f"{sum(x['seconds'] for x in r['rounds']):.1f} s, CPU share {r['cpu_share']:.2f}",
            file=sys.stderr,
        )
    results["load"]["after"] = load_average()
    return results


@dataclass
class SideStats:
    """Medians over repetitions of one side's per-round figures."""

    tokens: float
    tokens_per_s: float
    generation_s: float
    update_s: float
    other_s: float
    cpu_share: float
    peak_rss_mb: float

    @classmethod
    def of(cls, runs: list[dict]) -> SideStats:
        def med(f) -> float:
            return statistics.median(statistics.median(f(x) for x in r["rounds"]) for r in runs)

        return cls(
            tokens=med(lambda x: x["tokens"]),
            tokens_per_s=statistics.median(throughput(r) for r in runs),
            generation_s=med(lambda x: x["generation_s"]),
            update_s=med(lambda x: x["update_s"]),
            other_s=med(lambda x: x["seconds"] - x["generation_s"] - x["update_s"]),
            cpu_share=min(r["cpu_share"] for r in runs),
            peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in runs),
        )


def throughput(run: dict) -> float:
    """Completion tokens per second over a worker's timed rounds."""
    return sum(x["tokens"] for x in run["rounds"]) / sum(x["seconds"] for x in run["rounds"])


def same_tokens(a: dict, b: dict) -> tuple[bool, bool, float]:
    """Whether two workers sampled identical completions, whether their counts agree, the gap."""
    ta, tb = (sum(x["tokens"] for x in r["rounds"]) for r in (a, b))
    identical = [x["digest"] for x in a["rounds"]] == [x["digest"] for x in b["rounds"]]
    gap = abs(ta - tb) / max(tb, 1)
    return identical, gap <= TOKEN_TOLERANCE, gap


def rl_case(args, case: RLCase, lengths: str, tmp: Path) -> dict:
    """All repetitions of one size and length regime; the figures of its tables."""
    setup = RLSetup(max_completion_length=case.max_completion_length, rounds=args.rounds)
    if args.quick:
        setup.prompts_per_step, setup.rounds = 4, 1
    model_dir = tmp / f"{case.name}-{lengths}"
    stop_prob = 2 / case.max_completion_length if lengths == "varied" else None
    measured_stop = save_model(case.shape, model_dir, stop_prob)
    reps = [rl_repetition(case, str(model_dir), setup, reverse=r % 2 == 1) for r in range(args.repeats)]
    quiet, valid, notes = [], [], []
    for i, rep in enumerate(reps):
        load = max(rep["load"].values())
        checks = {name: same_tokens(rep[name], rep["trl"]) for name in ("egspo", "egspo-hf")}
        prompts = {tuple(x["prompt_digest"] for x in rep[name]["rounds"]) for name in SIDES}
        ok = all(c[1] for c in checks.values()) and len(prompts) == 1
        quiet.append(load <= args.max_load)
        valid.append(ok)
        if not ok:
            gaps = ", ".join(f"{n} {c[2]:.1%}" for n, c in checks.items())
            notes.append(
                f"repetition {i + 1} void: token counts differ from TRL's ({gaps}) or prompts differ"
            )
    used = [rep for rep, q, v in zip(reps, quiet, valid, strict=True) if q and v]
    stats = {name: SideStats.of([rep[name] for rep in used]) for name in SIDES} if used else {}
    ratios = {
        name: [throughput(rep[name]) / throughput(rep["trl"]) for rep in used]
        for name in ("egspo", "egspo-hf")
    }
    return {
        "case": case,
        "lengths": lengths,
        "setup": setup,
        "stop_prob": measured_stop,
        "reps": reps,
        "quiet": quiet,
        "valid": valid,
        "notes": notes,
        "stats": stats,
        "ratios": ratios,
        "identical": sum(
            same_tokens(rep["egspo"], rep["trl"])[0] and same_tokens(rep["egspo-hf"], rep["trl"])[0]
            for rep in reps
        ),
    }


def rl_case_table(res: dict, args) -> list[str]:
    """The detailed table of one size and length regime."""
    case, stats, setup = res["case"], res["stats"], res["setup"]
    regime = (
        "random weights as saved (almost every sample reaches the limit)"
        if res["lengths"] == "limit"
        else f"stop feature, P(EOS) about {res['stop_prob']:.3f} per token"
    )
    lines = [f"### {case.name} ({res['lengths']}): {case.describe()}; {regime}", ""]
    if not stats:
        return [*lines, "No repetition was both quiet and valid: no figures. " + " ".join(res["notes"]), ""]
    rows = setup.prompts_per_step * setup.num_generations
    lines += [
        "| side | tokens/s | generation s | update s | other s | generation tokens/s | min CPU share "
        "| peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (label, _, _) in SIDES.items():
        s = stats[name]
        lines.append(
            f"| {label} | {s.tokens_per_s:.0f} | {s.generation_s:.2f} | {s.update_s:.2f} | {s.other_s:.2f} | "
            f"{s.tokens / s.generation_s:.0f} | {s.cpu_share:.2f} | {s.peak_rss_mb:.0f} |"
        )
    trl = stats["trl"]
    for name in ("egspo", "egspo-hf"):
        s, r = stats[name], res["ratios"][name]
        lines.append(
            f"| **{SIDES[name][0]} / TRL** | **{statistics.median(r):.2f}x** ({ratio_range(r)}) | "
            f"{trl.generation_s / s.generation_s:.2f}x | {trl.update_s / s.update_s:.2f}x | | | | |"
        )
    used = sum(q and v for q, v in zip(res["quiet"], res["valid"], strict=True))
    loads = ", ".join(f"{r['load']['before']:.1f}/{r['load']['after']:.1f}" for r in res["reps"])
    lines += [
        "",
        f"Seconds per round (medians). Ratio rows: throughput ratio, then TRL's time / this side's. "
        f"{stats['trl'].tokens:.0f} completion tokens per round (median; {stats['trl'].tokens / rows:.1f} per "
        f"sample); identical completions on all sides in {res['identical']} of {len(res['reps'])} repetitions; "
        f"{used} of {len(res['reps'])} repetitions used (quiet and valid); load average before/after each: "
        f"{loads} (limit {args.max_load}). " + " ".join(res["notes"]),
        "",
    ]
    return lines


def row_rl(args) -> str:
    cases = [QUICK_CASE] if args.quick else [c for c in RL_CASES if c.name in args.rl_cases]
    regimes = args.lengths
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            for lengths in regimes:
                print(f"rl {case.name} ({lengths}) ...", file=sys.stderr)
                results.append(rl_case(args, case, lengths, Path(tmp)))
    setup = results[0]["setup"]
    n = setup.prompts_per_step * setup.num_generations
    lines = [
        "## 3. RL throughput: egspo vs TRL GRPOTrainer",
        "",
        "Each size: a random-weight Qwen2 saved once (seed 0, synthetic tokenizer, tied embeddings) that "
        f"every side loads; the same "
        f"{setup.prompts_per_step} synthetic prompts per round in the same order x {setup.num_generations} "
        f"samples ({n} completions), one optimizer step per round (TRL per_device_train_batch_size={n}, "
        "steps_per_generation=1, num_iterations=1; egspo ppo_epochs=1, one mini-batch), EOS stopping, "
        "temperature 1, no top-k / top-p, beta 0, clip 0.2 / 0.2, token-mean loss (TRL loss_type=dapo; egspo "
        "PPOClipLoss), group-scaled advantages, MathReward on both, AdamW lr 1e-6 without weight decay, "
        "grad-norm clip 1, fp32, sdpa, no gradient checkpointing on either side, no logging / eval / "
        f"checkpoints. Torch reseeded before every generation round on every side, so the sides sample "
        f"the same completions (counts must agree within {TOKEN_TOLERANCE:.0%}). Each worker: "
        f"{setup.warmup} untimed then {setup.rounds} timed rounds in a fresh process, {bench_common.THREADS or 'default'} "
        f"thread(s); sides interleaved (A B C, C B A, ...), {args.repeats} repetitions. tokens/s = "
        "completion tokens (EOS included) / wall time of the timed rounds; generation = the engine / "
        "`generate` call; update = loss, backward, clipping and optimizer step; other = the rest "
        "(decoding, rewards, advantages, the frameworks' own work). Ratios: medians (ranges) of the "
        "per-repetition ratios.",
        "",
        "| size | lengths | egspo / TRL | egspo (HF generate) / TRL | generation: SharedPrefillEngine / HF generate "
        "| target 2x |",
        "|---|---|---|---|---|---|",
    ]
    for res in results:
        if not res["stats"]:
            lines.append(f"| {res['case'].name} | {res['lengths']} | not measured (see below) | | | |")
            continue
        r, rh = res["ratios"]["egspo"], res["ratios"]["egspo-hf"]
        gen = res["stats"]["egspo-hf"].generation_s / res["stats"]["egspo"].generation_s
        met = "met" if statistics.median(r) >= 2.0 else "missed"
        lines.append(
            f"| {res['case'].name} | {res['lengths']} | **{statistics.median(r):.2f}x** ({ratio_range(r)}) | "
            f"{statistics.median(rh):.2f}x ({ratio_range(rh)}) | {gen:.2f}x | {met} |"
        )
    lines.append("")
    for res in results:
        lines += rl_case_table(res, args)
    return "\n".join(lines).rstrip()
