"""Benchmarks of egspo against plain baselines, measured side by side: the tables of BENCHMARKS.md.

Rows (`--rows`, each a section of BENCHMARKS.md):

1. fused: fused log-prob + entropy vs plain full logits (`scripts/bench_fused.py`, run as is).
2. overhead: EGSPO vs GRPO, one `fit` whose iterations alternate the two losses (ABBA) from the
   same weights, prompts and seed; whole iterations and the isolated gate + loss cost.
3. rl: RL throughput vs TRL `GRPOTrainer` at three sizes (hidden 256 x 4 layers x 64 new tokens,
   512 x 8 x 128, 256 x 4 x 256); egspo with `SharedPrefillEngine` and with HF generate.
   generation: `scripts/bench_generation.py` on CPU (256 new tokens, 16 prompts x 8 samples, varied
   lengths): SharedPrefillEngine vs HF generate on the same samples.
4. sft: SFT throughput vs TRL `SFTTrainer`.
5. gpu (`--device cuda`): Qwen2.5-1.5B-shaped random weights in bf16 at 512 and 1024 new
   tokens: HF generate vs SharedPrefillEngine vs continuous batching against the decode roofline
   (`scripts/bench_generation.py`), and an RL iteration's time split and update MFU.

What makes the RL ratios mean something:

- the same saved random-weight Qwen2 directory, tokenizer, prompts in the same order, sampling
  (temperature 1, no top-k / top-p), max completion length with EOS stopping, fp32, sdpa
  attention, one optimizer step per generation round, a token-mean clipped loss (TRL
  `loss_type="dapo"`; egspo `PPOClipLoss`, clip 0.2 / 0.2, the same surrogate), AdamW lr 1e-6
  without weight decay, grad-norm clip 1, and no gradient checkpointing on either side (TRL's
  default turns it on);
- the same completions: every side reseeds torch right before each generation round
  (`SEED + round`). TRL and egspo's `HFGenerateEngine` both call `generate`, and
  `SharedPrefillEngine` draws `generate`'s noise (`same_draws_as_generate`), so all sides sample
  the same tokens, up to float rounding; each worker reports its completions' digest and token
  count per round, and a repetition whose counts differ by more than 1% is void;
- a fresh process per measurement, sides interleaved (A B C, then C B A), at least 5 repetitions:
  medians and ranges of the per-repetition ratios;
- a quiet machine: the 1-minute load average before and after each repetition (`--max-load`)
  and each worker's CPU share (CPU time / wall time; 1 thread per worker) are recorded; loaded
  repetitions are flagged and left out of the medians.

Lengths (`--lengths`): `limit` samples from the random weights as saved, where almost every
sample runs to the length limit (as in the audit); `varied` gives the saved model a stop feature
(`add_stop_feature`: one constant residual dimension whose lm_head weight raises the EOS logit)
so that each token ends the sample with probability about 2 / max_completion_length, as a
trained policy's lengths vary (about 13% of samples reach the limit). Both sides load the same
weights, so both stop alike.

Layout: this file is the entry point (options, the BENCHMARKS.md writer, worker dispatch);
`bench_common.py` the shared settings and helpers; `bench_egspo.py` and `bench_trl.py` the two
sides' workers; `bench_rl.py` section 3; `bench_sections.py` sections 1, 2, 4 and 5;
`bench_rl_vllm.py` (its own entry point) section 7's whole RL iteration with vLLM, each side
running these workers in its own environment.

    pip install -e ".[bench]"
    python scripts/bench.py --quick --output /tmp/BENCHMARKS.quick.md   # smoke run of every CPU row (minutes)
    python scripts/bench.py --rows rl --lengths varied --output BENCHMARKS.md   # about 70 minutes on 2 cores
    python scripts/bench.py --lengths limit,varied --fused-quick --replace-all --output BENCHMARKS.md  # about 3 hours
    python scripts/bench.py --device cuda --rows gpu --output BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other bench_* modules, however loaded
import bench_common
import bench_egspo
import bench_rl
import bench_sections
import bench_trl
from bench_common import RL_CASES, cpu_name, load_average, package_version

ROWS = ("fused", "overhead", "rl", "generation", "sft", "gpu")
# Hand-written notes (profiles, fixes) from this heading on survive a rewrite of the tables.
NOTES_MARKER = "## Where the time goes"
# What `--_worker` runs in a fresh process: egspo's side and TRL's side of each comparison.
WORKERS = {**bench_egspo.WORKERS, **bench_trl.WORKERS}


def machine() -> str:
    """CPU, threads, software versions, date: the context every table is read in."""
    v = package_version
    return (
        f"{cpu_name()}, {os.cpu_count()} cores ({bench_common.THREADS or 'default'} intra-op thread(s) per "
        f"worker), load average {load_average():.1f} at the start; Python {platform.python_version()}; "
        f"torch {v('torch')}, transformers {v('transformers')}, trl {v('trl')}, lightning {v('lightning')}; "
        f"{datetime.date.today().isoformat()}"
    )


def heading(section: str) -> str:
    """A section's key: its `## ` heading up to the first colon ("## 3. RL throughput")."""
    return section.split("\n", 1)[0].split(":", 1)[0].strip()


def write_output(path: Path, header: str, sections: list[str], keep_others: bool = True) -> None:
    """Replace the sections this run produced, keep the others (unless told not to) and the notes
    (from `NOTES_MARKER` on). So a GPU run (`--device cuda --rows gpu`) updates its section of a
    CPU run's file.
    """
    old = path.read_text() if path.exists() else ""
    notes = old[old.index(NOTES_MARKER) :] if NOTES_MARKER in old else ""
    body = old[: old.index(NOTES_MARKER)] if notes else old
    kept = ["## " + part.strip() for part in body.split("\n## ")[1:]] if keep_others else []
    new = {heading(s): s for s in sections}
    merged = [new.pop(heading(s), s) for s in kept] + list(new.values())
    path.write_text("\n\n".join([header, *merged]) + "\n" + ("\n" + notes if notes else ""))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a smoke run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions (fresh processes) per comparison")
    parser.add_argument("--rounds", type=int, default=1, help="timed RL rounds per worker (after 1 warm-up)")
    parser.add_argument(
        "--rl-cases", default=",".join(c.name for c in RL_CASES), help="comma-separated RL sizes to run"
    )
    parser.add_argument(
        "--lengths", default="limit", help="comma-separated: limit, varied (see the docstring)"
    )
    parser.add_argument(
        "--max-load",
        type=float,
        default=1.5,
        help="1-minute load average above which a repetition is flagged and left out (a worker counts ~1)",
    )
    parser.add_argument("--fused-quick", action="store_true", help="row 1 at bench_fused.py's quick sizes")
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads per worker (0: torch default)"
    )
    parser.add_argument("--output", default=None, help="write the markdown here (default: stdout only)")
    parser.add_argument(
        "--replace-all", action="store_true", help="drop the output's sections this run does not produce"
    )
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rows = [r for r in args.rows.split(",") if r]
    args.rl_cases = [c for c in args.rl_cases.split(",") if c]
    args.lengths = [x for x in args.lengths.split(",") if x]
    unknown = (
        set(args.rows) - set(ROWS),
        set(args.rl_cases) - {c.name for c in RL_CASES},
        set(args.lengths) - {"limit", "varied"},
    )
    for what, bad in zip(("rows", "RL sizes", "lengths"), unknown, strict=True):
        if bad:
            parser.error(f"unknown {what}: {sorted(bad)}")
    if args.quick:
        args.repeats = 1
    return args


def main() -> None:
    args = parse_args()
    if args._worker:
        spec = json.loads(args._worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)))
        return
    bench_common.THREADS = args.threads if args.device == "cpu" else 0
    command = f"`python scripts/bench.py {' '.join(sys.argv[1:])}`"
    header = f"# Benchmarks\n\nLast produced by {command}.\n\nMachine: {machine()}."
    rows = {
        "fused": bench_sections.row_fused,
        "overhead": bench_sections.row_overhead,
        "rl": bench_rl.row_rl,
        "generation": bench_sections.row_generation,
        "sft": bench_sections.row_sft,
        "gpu": bench_sections.row_gpu,
    }
    sections = []
    for row in args.rows:
        print(f"row {row} ...", file=sys.stderr)
        sections.append(
            f"{rows[row](args)}\n\n(Section from {command}, {datetime.date.today().isoformat()}.)"
        )
    print("\n\n".join([header, *sections]))
    if args.output:
        write_output(Path(args.output), header, sections, keep_others=not args.replace_all)


if __name__ == "__main__":
    main()
