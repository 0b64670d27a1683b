"""Token-level entropy pictures of a few rollouts: where the gate puts its full updates."""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from egspo.callbacks.run_dir import run_dir
from egspo.data.batches import IterationBatch
from egspo.rollout import Experience

# Low entropy pale, high entropy saturated: dark text stays readable on every shade.
_COLOR_STOPS = (
    (0.0, (247, 251, 255)),
    (0.35, (198, 219, 239)),
    (0.65, (253, 174, 107)),
    (1.0, (215, 48, 39)),
)
_NEWLINE = "\u21b5"
_EOS = "\u27e8eos\u27e9"
_MONO_ADVANCE = 0.602  # character advance of DejaVu Sans Mono, in em


@dataclass
class TokenRow:
    """One rollout to draw: its question, response tokens with entropies, and verdict."""

    question: str
    tokens: list[str]
    entropy: list[float]
    correct: bool
    reward: float
    truncated: bool


def entropy_color(value: float, vmax: float) -> tuple[int, int, int]:
    """RGB of an entropy on the shared scale ``[0, vmax]`` (piecewise-linear colour map)."""
    x = min(max(value / vmax, 0.0), 1.0) if vmax > 0 else 0.0
    for (x0, c0), (x1, c1) in pairwise(_COLOR_STOPS):
        if x <= x1:
            t = (x - x0) / (x1 - x0)
            return tuple(round(a + (b - a) * t) for a, b in zip(c0, c1, strict=True))
    return _COLOR_STOPS[-1][1]


def _printable(token: str) -> str:
    """A token as it can be drawn: newlines as an arrow, other control characters escaped."""
    token = token.replace("\n", _NEWLINE)
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in token)


def _spread(indices: list[int], count: int) -> list[int]:
    """Up to `count` of `indices`, evenly spaced (rollouts are grouped by prompt: take several prompts)."""
    if len(indices) <= count:
        return indices
    step = len(indices) / count
    return [indices[int(i * step)] for i in range(count)]


def collect_rows(
    experience: Experience, tokenizer, num_examples: int, questions: list[str] | None = None
) -> tuple[list[TokenRow], list[TokenRow]]:
    """Up to `num_examples` correct and `num_examples` incorrect rollouts of an experience batch."""
    n = len(experience)
    correct = (
        experience.correct.bool().tolist()
        if experience.correct is not None
        else [r >= 1 for r in experience.rewards]
    )
    group = n // len(questions) if questions else 0
    special = set(tokenizer.all_special_ids)
    completion = experience.input_ids[:, experience.prompt_length :].tolist()
    mask = experience.completion_mask.bool().tolist()
    entropy = experience.entropy.float().tolist()

    def row(i: int) -> TokenRow:
        ids = [t for t, m in zip(completion[i], mask[i], strict=True) if m]
        tokens = [_EOS if t in special else _printable(tokenizer.decode([t])) for t in ids]
        prompt_ids = experience.input_ids[i, : experience.prompt_length][
            experience.attention_mask[i, : experience.prompt_length].bool()
        ]
        question = questions[i // group] if group else tokenizer.decode(prompt_ids, skip_special_tokens=True)
        return TokenRow(
            question=question,
            tokens=tokens,
            entropy=[h for h, m in zip(entropy[i], mask[i], strict=True) if m],
            correct=correct[i],
            reward=float(experience.rewards[i]),
            truncated=bool(experience.truncated[i]),
        )

    right = _spread([i for i in range(n) if correct[i]], num_examples)
    wrong = _spread([i for i in range(n) if not correct[i]], num_examples)
    return [row(i) for i in right], [row(i) for i in wrong]


def _css_rgb(value: float, vmax: float) -> str:
    r, g, b = entropy_color(value, vmax)
    return f"rgb({r},{g},{b})"


def render_html(
    correct: list[TokenRow], incorrect: list[TokenRow], threshold: float | None, vmax: float, title: str
) -> str:
    """A standalone page: correct and incorrect rollouts side by side, tokens coloured by entropy.

    Tokens at or above the gate threshold (the ones with a full update) are outlined; hovering a
    token shows its entropy.
    """
    stops = ", ".join(f"{_css_rgb(vmax * x, vmax)} {100 * x:.0f}%" for x, _ in _COLOR_STOPS)
    marker = ""
    gate_note = "no entropy gate in this loss"
    if threshold is not None:
        left = 100 * min(max(threshold / vmax, 0.0), 1.0) if vmax > 0 else 0.0
        marker = f'<div class="tau" style="left:{left:.1f}%"><span>&tau; = {threshold:.3f}</span></div>'
        gate_note = (
            f"outlined: H &ge; &tau; = {threshold:.3f} nats (full update); the rest get the attenuated one"
        )

    def card(r: TokenRow) -> str:
        spans = "".join(
            f'<span class="t{" hi" if threshold is not None and h >= threshold else ""}" '
            f'style="background:{_css_rgb(h, vmax)}" title="H = {h:.3f} nats">{html.escape(tok)}</span>'
            for tok, h in zip(r.tokens, r.entropy, strict=True)
        )
        flags = f"reward {r.reward:.2f}" + (" &middot; truncated" if r.truncated else "")
        return (
            f'<div class="card"><div class="q">{html.escape(r.question)}</div>'
            f'<div class="meta">{flags} &middot; {len(r.tokens)} tokens</div><div class="resp">{spans}</div></div>'
        )

    def column(name: str, rows: list[TokenRow]) -> str:
        body = "".join(card(r) for r in rows) or '<p class="meta">none in this batch</p>'
        return f'<div class="col"><h2>{name} ({len(rows)} shown)</h2>{body}</div>'

    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body {{ font-family: sans-serif; margin: 16px; color: #222; }}
h1 {{ font-size: 18px; margin: 0 0 8px; }} h2 {{ font-size: 15px; margin: 8px 0; }}
.legend {{ position: relative; width: 420px; height: 14px; background: linear-gradient(to right, {stops});
  border: 1px solid #999; margin: 26px 0 24px; }}
.legend .lo, .legend .hi {{ position: absolute; top: 16px; font-size: 12px; }}
.legend .lo {{ left: 0; }} .legend .hi {{ right: 0; }}
.tau {{ position: absolute; top: -4px; height: 22px; border-left: 2px solid #000; }}
.tau span {{ position: absolute; top: -18px; left: -24px; font-size: 12px; white-space: nowrap; }}
.cols {{ display: flex; gap: 16px; align-items: flex-start; }} .col {{ flex: 1; min-width: 0; }}
.card {{ border: 1px solid #ddd; border-radius: 4px; padding: 8px; margin-bottom: 10px; }}
.q {{ color: #555; font-size: 13px; white-space: pre-wrap; }} .meta {{ color: #777; font-size: 12px; margin: 4px 0; }}
.resp {{ font-family: monospace; font-size: 14px; line-height: 1.9; white-space: pre-wrap; word-break: break-all; }}
.t {{ padding: 1px 0; border-radius: 2px; box-shadow: inset -1px 0 0 #fff; }} .t.hi {{ outline: 2px solid #000; outline-offset: -1px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="meta">token colour = predictive entropy of the sampling policy (nats); {gate_note}</div>
<div class="legend"><span class="lo">0</span><span class="hi">{vmax:.2f}</span>{marker}</div>
<div class="cols">{column("correct", correct)}{column("incorrect", incorrect)}</div>
</body></html>
"""


def render_png(
    correct: list[TokenRow],
    incorrect: list[TokenRow],
    threshold: float | None,
    vmax: float,
    title: str,
    batch_entropy: dict[str, list[float]],
    path: Path,
    line_chars: int = 90,
):
    """The same picture with matplotlib (plus the batch's entropy histogram); returns the figure's RGB array.

    Long: one matplotlib figure drawn top to bottom (tokens, gate line, histogram), a plotting script more than logic.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    from matplotlib.patches import Rectangle

    cmap = LinearSegmentedColormap.from_list(
        "entropy", [(x, tuple(c / 255 for c in rgb)) for x, rgb in _COLOR_STOPS]
    )

    def layout(r: TokenRow) -> list[tuple[int, int, str, float]]:
        """(line, column, text, entropy) per token, wrapped at `line_chars` characters."""
        placed, line, col = [], 0, 0
        for tok, h in zip(r.tokens, r.entropy, strict=True):
            width = max(len(tok), 1)
            if col + width > line_chars and col > 0:
                line, col = line + 1, 0
            placed.append((line, col, tok, h))
            col += width
        return placed

    def block_lines(r: TokenRow) -> int:
        placed = layout(r)
        return 2 + (placed[-1][0] + 1 if placed else 1) + 1  # header, tokens, gap

    heights = [sum(block_lines(r) for r in rows) + 1 for rows in (correct, incorrect)]
    lines = max(max(heights), 4)
    fig = plt.figure(figsize=(16, 2.6 + 0.22 * lines))
    grid = fig.add_gridspec(2, 2, height_ratios=[0.22 * lines, 2.0], hspace=0.25, wspace=0.05)
    fig.suptitle(title, fontsize=12)
    for c, (name, rows) in enumerate((("correct", correct), ("incorrect", incorrect))):
        ax = fig.add_subplot(grid[0, c])
        ax.set_xlim(0, line_chars)
        # One x unit = one character: the monospace font size whose advance (0.6 em) fills it.
        char_points = ax.get_position().width * fig.get_figwidth() * 72 / line_chars
        token_size = char_points / _MONO_ADVANCE
        ax.set_ylim(lines, 0)
        ax.axis("off")
        ax.set_title(f"{name} ({len(rows)} shown)", fontsize=11, loc="left")
        y = 0.5
        for r in rows:
            header = (
                r.question if len(r.question) <= 2 * line_chars else r.question[: 2 * line_chars - 3] + "..."
            )
            meta = f"reward {r.reward:.2f}" + (", truncated" if r.truncated else "")
            ax.text(0, y, header.replace("\n", " "), fontsize=8, color="#555", va="center", wrap=False)
            ax.text(0, y + 1, meta, fontsize=7.5, color="#888", va="center")
            y += 2
            placed = layout(r)
            for line, col, tok, h in placed:
                width = max(len(tok), 1)
                high = threshold is not None and h >= threshold
                ax.add_patch(
                    Rectangle(
                        (col, y + line - 0.45),
                        width,
                        0.9,
                        facecolor=cmap(min(h / vmax, 1.0) if vmax > 0 else 0.0),
                        edgecolor="black" if high else "none",
                        linewidth=1.2 if high else 0,
                    )
                )
                ax.text(
                    col, y + line, tok, fontsize=token_size, family="DejaVu Sans Mono", va="center", ha="left"
                )
            y += (placed[-1][0] + 1 if placed else 1) + 1
        if not rows:
            ax.text(0, 1, "none in this batch", fontsize=9, color="#888")

    ax = fig.add_subplot(grid[1, :])
    bins = np.linspace(0, vmax, 41)
    for name, color in (("correct", "#2171b5"), ("incorrect", "#cb181d")):
        values = np.clip(np.asarray(batch_entropy.get(name, []), dtype=float), 0, vmax)
        if values.size:
            ax.hist(
                values,
                bins=bins,
                histtype="step",
                linewidth=1.6,
                color=color,
                label=f"tokens of {name} rollouts ({values.size})",
            )
    if threshold is not None:
        ax.axvline(
            threshold,
            color="black",
            linewidth=1.5,
            linestyle="--",
            label=f"gate threshold τ = {threshold:.3f}",
        )
    ax.set_xlim(0, vmax)
    ax.set_yscale("log")
    ax.set_ylabel("tokens in the batch")
    ax.legend(fontsize=8, loc="upper center")
    bar = fig.colorbar(
        ScalarMappable(norm=Normalize(0, vmax), cmap=cmap),
        ax=ax,
        orientation="horizontal",
        fraction=0.08,
        pad=0.25,
    )
    bar.set_label("token entropy (nats): box colour above; outlined boxes have H ≥ τ (full update)")
    if threshold is not None:
        bar.ax.axvline(threshold, color="black", linewidth=2)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=60, bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    return plt.imread(buffer)[..., :3]


class EntropyDiagnostics(Callback):
    """Every `every_n_iterations` RL iterations, pictures of a few of that iteration's rollouts.

    Writes ``<log_dir>/diagnostics/iter_XXXX.html`` (and ``.png`` unless ``png=False``;
    the PNG also goes to TensorBoard): `num_examples` correct and `num_examples` incorrect
    responses side by side, each token coloured by its entropy under the rollout policy, the
    tokens at or above the iteration's gate threshold outlined. XXXX is the iteration count
    (the `iteration` metric). The colour scale tops out at the batch's 99th entropy percentile.
    Rank zero only.
    """

    def __init__(self, every_n_iterations: int = 10, num_examples: int = 3, png: bool = True) -> None:
        if every_n_iterations < 1 or num_examples < 1:
            raise ValueError("every_n_iterations and num_examples must be >= 1")
        self.every_n_iterations = every_n_iterations
        self.num_examples = num_examples
        self.png = png

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch: IterationBatch, batch_idx: int
    ) -> None:
        experience = batch.experience
        done = pl_module.rl_iteration  # RL iterations completed, counting this one
        if experience is None or (done - 1) % self.every_n_iterations:
            return
        out_dir = run_dir(trainer) / "diagnostics"  # every rank: a collective under several processes
        if not trainer.is_global_zero:
            return
        threshold = (outputs or {}).get("gate_threshold")
        self.write(trainer, out_dir, pl_module, experience, batch.prompts, threshold)

    def write(
        self,
        trainer: Trainer,
        out_dir: Path,
        pl_module: LightningModule,
        experience: Experience,
        questions: list[str] | None,
        threshold: float | None = None,
    ) -> Path:
        """Draw `experience` into `out_dir` now, the tokens at or above `threshold` (the gate's)
        outlined; returns the HTML path."""
        threshold = float(threshold) if threshold is not None else None
        mask = experience.completion_mask.bool()
        values = experience.entropy.float()[mask]
        vmax = float(torch.quantile(values, 0.99)) if values.numel() else 1.0
        vmax = max(vmax, threshold * 1.1 if threshold is not None else 0.0, 1e-3)
        correct, incorrect = collect_rows(experience, pl_module.tokenizer, self.num_examples, questions)
        done, total = pl_module.rl_iteration, pl_module.rl_iterations
        right = int(experience.correct.sum()) if experience.correct is not None else 0
        title = (
            f"RL iteration {done}/{total} (iteration {pl_module.iteration}) - {right}/{len(experience)} "
            f"rollouts correct - {type(pl_module.policy_loss).__name__}"
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = out_dir / f"iter_{pl_module.iteration:04d}"
        html_path = stem.with_suffix(".html")
        html_path.write_text(render_html(correct, incorrect, threshold, vmax, title), encoding="utf-8")
        if self.png:
            self._write_png(trainer, pl_module, experience, correct, incorrect, threshold, vmax, title, stem)
        return html_path

    def _write_png(
        self, trainer, pl_module, experience, correct, incorrect, threshold, vmax, title, stem
    ) -> None:
        per_token_correct = (
            experience.correct.bool()[:, None].expand_as(experience.completion_mask)
            if experience.correct is not None
            else torch.zeros_like(experience.completion_mask, dtype=torch.bool)
        )
        mask = experience.completion_mask.bool()
        batch_entropy = {
            "correct": experience.entropy[mask & per_token_correct].float().tolist(),
            "incorrect": experience.entropy[mask & ~per_token_correct].float().tolist(),
        }
        image = render_png(
            correct, incorrect, threshold, vmax, title, batch_entropy, stem.with_suffix(".png")
        )
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(
                    "diagnostics/token_entropy", image, global_step=pl_module.iteration, dataformats="HWC"
                )


__all__ = ["EntropyDiagnostics", "TokenRow", "collect_rows", "entropy_color", "render_html", "render_png"]
