"""Training curves of one run: `python scripts/plot_run.py RUN_DIR [--out DIR]`.

Reads the TensorBoard event files under RUN_DIR (a run's `lightning_logs/version_N`, or any
folder above it: the newest event file wins), puts every scalar on the iteration axis (the
`iteration` metric; Lightning's step counts optimizer steps), and writes

- `<out>/scalars.csv`: one row per iteration, one column per logged scalar;
- `<out>/curves.png`: reward, accuracy, entropy, gate fractions, clip fractions, learning
  rate and mu against the iteration, the SFT -> RL switch marked.

`<out>` defaults to `<run dir>/plots`. Needs matplotlib (`pip install egspo[plots]`).
"""

from __future__ import annotations

import argparse
import bisect
import csv
import math
from collections import defaultdict
from pathlib import Path

# Panels of curves.png: title -> scalar tags (a tag ending in "/" matches every tag under it).
PANELS: dict[str, list[str]] = {
    "reward": ["reward", "train/accuracy"],
    "held-out accuracy": ["val/"],
    "token entropy (nats)": [
        "entropy",
        "entropy/q50",
        "entropy/q80",
        "entropy/correct_mean",
        "entropy/incorrect_mean",
    ],
    "gate": ["rl/gate_frac_high", "rl/gate_weight_mean", "gate/value"],
    "gate threshold (nats)": ["rl/gate_threshold"],
    "clip fractions": ["rl/clip_frac_low", "rl/clip_frac_high", "rl/clip_frac_dual"],
    "loss": ["train/sft_loss", "train/rl_loss"],
    "learning rate": ["train/lr"],
    "mu (SFT mixing)": ["train/mu"],
    "response length (tokens)": ["train/response_length"],
}
# A prefix pattern ("val/") takes the tags under it that are fractions: accuracy, pass@k, maj@k.
_VAL_RATES = ("/accuracy", "/pass@", "/maj@")


def find_event_file(run_dir: Path) -> Path:
    """The newest TensorBoard event file at or under `run_dir`."""
    files = sorted(Path(run_dir).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard event file (events.out.tfevents.*) under it")
    return files[-1]


def read_events(path: Path) -> dict[str, list[tuple[int, float, float]]]:
    """`{tag: [(step, wall_time, value), ...]}` of every scalar in one event file."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})
    accumulator.Reload()
    return {
        tag: [(e.step, e.wall_time, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def by_iteration(events: dict[str, list[tuple[int, float, float]]]) -> dict[str, dict[int, float]]:
    """Every scalar keyed by iteration instead of optimizer step.

    A value's iteration is the `iteration` value logged at the same step closest in wall time
    (the module logs `iteration` in the same call as each batch of metrics; one step can carry
    two iterations, e.g. an evaluation before an update). Steps without one take the last one
    before them. Several values of a tag at the same iteration: the last wins.
    """
    marks: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for step, wall, value in events.get("iteration", []):
        marks[step].append((wall, value))
    ordered = sorted(marks)
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for tag, points in events.items():
        if tag in ("iteration", "epoch", "hp_metric"):
            continue
        for step, wall, value in sorted(points, key=lambda p: (p[0], p[1])):
            it = _iteration_at(step, wall, marks, ordered)
            if it is not None:
                out[tag][it] = value
    return dict(out)


def _iteration_at(
    step: int, wall: float, marks: dict[int, list[tuple[float, float]]], ordered: list[int]
) -> int | None:
    if step in marks:
        return int(min(marks[step], key=lambda m: abs(m[0] - wall))[1])
    i = bisect.bisect_right(ordered, step)
    return int(max(v for _w, v in marks[ordered[i - 1]])) if i else None


def load_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """`{tag: {iteration: value}}` of the run's newest event file."""
    return by_iteration(read_events(find_event_file(run_dir)))


def write_csv(scalars: dict[str, dict[int, float]], path: Path) -> None:
    """One row per iteration, one column per tag; empty where a tag was not logged."""
    tags = sorted(scalars)
    iterations = sorted({it for values in scalars.values() for it in values})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", *tags])
        for it in iterations:
            writer.writerow([it, *(_fmt(scalars[t].get(it)) for t in tags)])


def read_csv(path: Path) -> dict[str, dict[int, float]]:
    """The inverse of `write_csv`."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            it = int(row.pop("iteration"))
            for tag, value in row.items():
                if value != "":
                    out[tag][it] = float(value)
    return dict(out)


def _fmt(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def panel_tags(scalars: dict[str, dict[int, float]], patterns: list[str]) -> list[str]:
    """Tags present in the run for one panel, in the panel's order."""
    tags: list[str] = []
    for pattern in patterns:
        if pattern.endswith("/"):
            tags += sorted(t for t in scalars if _val_rate(t, pattern))
        elif pattern in scalars:
            tags.append(pattern)
    return list(dict.fromkeys(tags))


def _val_rate(tag: str, prefix: str) -> bool:
    return tag.startswith(prefix) and any(marker in tag for marker in _VAL_RATES)


def plot_curves(
    scalars: dict[str, dict[int, float]], path: Path, title: str, rl_start: int | None = None
) -> Path:
    """The panels of `PANELS` that have data, in a grid, into `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, panel_tags(scalars, patterns)) for name, patterns in PANELS.items()]
    panels = [(name, tags) for name, tags in panels if tags]
    if not panels:
        raise ValueError("no known scalar in this run (is it an egspo run?)")
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.3 * rows), squeeze=False)
    for ax, (name, tags) in zip(axes.flat, panels, strict=False):
        for tag in tags:
            points = sorted(scalars[tag].items())
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            style = {"marker": "o", "markersize": 3} if len(xs) < 30 else {}
            ax.plot(xs, ys, label=tag, linewidth=1.3, **style)
        if rl_start is not None:
            ax.axvline(rl_start, color="grey", linestyle=":", linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        if name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title + ("   (dotted line: SFT -> RL)" if rl_start is not None else ""), fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def rl_start_iteration(scalars: dict[str, dict[int, float]]) -> int | None:
    """The first iteration with an RL metric, when the run also has SFT iterations before it."""
    rl = scalars.get("train/rl_loss") or scalars.get("reward")
    sft = scalars.get("train/sft_loss")
    if not rl or not sft:
        return None
    return min(rl) - 1


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (lightning_logs/version_N or above it)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run dir>/plots)")
    args = parser.parse_args(argv)
    event_file = find_event_file(args.run_dir)
    scalars = by_iteration(read_events(event_file))
    out = args.out or event_file.parent / "plots"
    write_csv(scalars, out / "scalars.csv")
    png = plot_curves(
        scalars, out / "curves.png", title=str(event_file.parent), rl_start=rl_start_iteration(scalars)
    )
    print(f"wrote {out / 'scalars.csv'} and {png}")
    return png


if __name__ == "__main__":
    main()
