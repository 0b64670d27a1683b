"""Soak test: many RL iterations of the demo model, resident memory (RSS) after each one.

A leak in the rollout path (kept experiences, growing caches, logged tensors holding graphs)
shows as RSS that keeps rising after warm-up. This runs RL on the demo config with small
batches and reports the growth after the first `--warmup` iterations:

    python scripts/soak.py --iterations 200 --out runs/soak

It prints one line per `--print_every` iterations and, at the end, the growth in percent of
the trainer process and of the trainer plus its verifier worker processes, and writes
`rss.csv` and `soak.json` to `--out`. Target: growth < 10%.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import psutil
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]


class RSSMonitor(Callback):
    """Records the RSS of this process (and with its children) at the end of every iteration."""

    def __init__(self, print_every: int) -> None:
        self.print_every = print_every
        self.process = psutil.Process()
        self.rows: list[tuple[int, float, float, float]] = []
        self.start = time.perf_counter()

    def _rss_mib(self) -> tuple[float, float]:
        own = self.process.memory_info().rss
        children = 0
        for child in self.process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                children += child.memory_info().rss
        return own / 2**20, (own + children) / 2**20

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        own, total = self._rss_mib()
        elapsed = time.perf_counter() - self.start
        self.rows.append((pl_module.iteration, own, total, elapsed))
        if pl_module.iteration % self.print_every == 0:
            print(
                f"iteration {pl_module.iteration:4d}  rss {own:8.1f} MiB  with workers {total:8.1f} MiB  {elapsed:6.0f} s"
            )


def growth(rows: list[tuple[int, float, float, float]], warmup: int, column: int) -> float:
    """Percent change of `column` from the end of warm-up to the last iteration."""
    base = next(r[column] for r in rows if r[0] >= warmup)
    return 100.0 * (rows[-1][column] - base) / base


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=200, help="RL iterations")
    parser.add_argument("--warmup", type=int, default=20, help="iterations before the baseline")
    parser.add_argument("--prompts_per_step", type=int, default=4)
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--max_completion_length", type=int, default=32)
    parser.add_argument("--print_every", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "soak")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from egspo.cli import run

    cli = run(
        run=False,
        args=[
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            f"--trainer.default_root_dir={args.out}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.logger=false",
            "--trainer.callbacks=[{class_path: egspo.callbacks.GateScheduler}]",
            "--model.sft_iterations=0",
            f"--model.rl_iterations={args.iterations}",
            f"--model.rollout.num_generations={args.num_generations}",
            f"--model.rollout.max_completion_length={args.max_completion_length}",
            "--trainer.limit_val_batches=0",
            f"--data.prompts_per_step={args.prompts_per_step}",
        ],
    )
    monitor = RSSMonitor(args.print_every)
    cli.trainer.callbacks.append(monitor)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    rows = monitor.rows
    result = {
        "iterations": len(rows),
        "warmup": args.warmup,
        "rss_mib_after_warmup": next(r[1] for r in rows if r[0] >= args.warmup),
        "rss_mib_final": rows[-1][1],
        "rss_growth_percent": growth(rows, args.warmup, 1),
        "rss_with_workers_growth_percent": growth(rows, args.warmup, 2),
        "seconds": rows[-1][3],
        "command": " ".join([sys.executable, *sys.argv]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "rss.csv", "w") as f:
        f.write("iteration,rss_mib,rss_with_workers_mib,seconds\n")
        f.writelines(f"{i},{own:.2f},{total:.2f},{t:.2f}\n" for i, own, total, t in rows)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    print(
        f"\nRSS after {args.warmup} iterations {result['rss_mib_after_warmup']:.1f} MiB, after "
        f"{len(rows)} {result['rss_mib_final']:.1f} MiB: growth {result['rss_growth_percent']:+.2f}% "
        f"(with verifier workers {result['rss_with_workers_growth_percent']:+.2f}%) in {result['seconds']:.0f} s"
    )
    return result


if __name__ == "__main__":
    main()
