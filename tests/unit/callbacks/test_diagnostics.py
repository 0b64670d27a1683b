"""EntropyDiagnostics: token colouring, gate marking, correct/incorrect columns, files on disk."""

import re
from pathlib import Path

import pytest
import torch
from tiny_model import tiny_qwen2_json

from egspo.callbacks.diagnostics import collect_rows, entropy_color, render_html, render_png
from egspo.rollout import Experience

ROOT = Path(__file__).resolve().parents[3]


def make_experience(tokenizer) -> tuple[Experience, list[str]]:
    """Two prompts x two samples; sample texts with known answers, entropies 0.1 * position."""
    questions = ["What is 2 + 3?", "What is 7 - 4?"]
    completions = ["2 + 3 = 5\n#### 5", "2 + 3 = 6\n#### 6", "7 - 4 = 3\n#### 3", "7 - 4 = <1>\n#### 1"]
    prompt = tokenizer(["Q"] * 4, add_special_tokens=False)["input_ids"]
    bodies = [
        tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in completions
    ]
    width = max(len(b) for b in bodies) + 2  # padding columns after EOS
    completion = torch.full((4, width), tokenizer.pad_token_id)
    mask = torch.zeros(4, width)
    for i, b in enumerate(bodies):
        completion[i, : len(b)] = torch.tensor(b)
        mask[i, : len(b)] = 1
    prompt_ids = torch.tensor(prompt)
    entropy = 0.1 * torch.arange(width, dtype=torch.float32).expand(4, width).clone()
    experience = Experience(
        input_ids=torch.cat([prompt_ids, completion], dim=1),
        attention_mask=torch.cat([torch.ones_like(prompt_ids), mask.long()], dim=1),
        completion_mask=mask,
        old_logprobs=None,
        entropy=entropy,
        advantages=torch.zeros(4),
        rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]),
        truncated=torch.zeros(4, dtype=torch.bool),
        prompt_length=prompt_ids.shape[1],
        correct=torch.tensor([True, False, True, False]),
        completions=completions,
    )
    return experience, questions


def test_colour_map_runs_from_pale_to_red():
    assert entropy_color(0.0, 2.0) == (247, 251, 255)
    assert entropy_color(2.0, 2.0) == (215, 48, 39)
    assert entropy_color(5.0, 2.0) == (215, 48, 39)  # clipped at the top of the scale
    reds_minus_blues = [entropy_color(h, 1.0)[0] - entropy_color(h, 1.0)[2] for h in (0.0, 0.5, 0.8, 1.0)]
    assert reds_minus_blues == sorted(reds_minus_blues)


def test_rows_split_by_correctness_and_keep_only_response_tokens(tiny_tokenizer):
    experience, questions = make_experience(tiny_tokenizer)
    right, wrong = collect_rows(experience, tiny_tokenizer, num_examples=5, questions=questions)
    assert [r.question for r in right] == questions and [r.question for r in wrong] == questions
    assert all(r.correct for r in right) and not any(r.correct for r in wrong)
    for row, i in zip(right + wrong, [0, 2, 1, 3], strict=True):
        n = int(experience.completion_mask[i].sum())
        assert len(row.tokens) == len(row.entropy) == n  # padding after EOS left out
        assert row.tokens[-1] == "\u27e8eos\u27e9"
        assert "".join(row.tokens[:-1]).replace("\u21b5", "\n") == experience.completions[i]
        assert row.entropy == pytest.approx([0.1 * t for t in range(n)])
    only_one, _ = collect_rows(experience, tiny_tokenizer, num_examples=1, questions=questions)
    assert len(only_one) == 1


def test_html_outlines_exactly_the_tokens_at_or_above_the_threshold(tiny_tokenizer):
    experience, questions = make_experience(tiny_tokenizer)
    right, wrong = collect_rows(experience, tiny_tokenizer, num_examples=2, questions=questions)
    threshold = 0.55
    page = render_html(right, wrong, threshold=threshold, vmax=1.5, title="RL iteration 1 <test>")
    spans = re.findall(
        r'<span class="t( hi)?" style="background:rgb\(\d+,\d+,\d+\)" title="H = ([\d.]+) nats">', page
    )
    assert len(spans) == sum(len(r.tokens) for r in right + wrong)
    for outlined, value in spans:
        assert bool(outlined) == (float(value) >= threshold)
    assert "RL iteration 1 &lt;test&gt;" in page  # escaped
    contents = re.findall(r'nats">([^<]*)</span>', page)  # token text holds no raw "<"
    assert len(contents) == len(spans) and "&lt;" in "".join(contents)
    assert page.index("<h2>correct (2 shown)") < page.index("<h2>incorrect (2 shown)")
    assert "&tau; = 0.550" in page

    ungated = render_html(right, [], threshold=None, vmax=1.5, title="t")
    assert ' hi"' not in ungated and "no entropy gate" in ungated and "none in this batch" in ungated


def test_png_is_written(tiny_tokenizer, tmp_path):
    experience, questions = make_experience(tiny_tokenizer)
    right, wrong = collect_rows(experience, tiny_tokenizer, num_examples=2, questions=questions)
    image = render_png(
        right, wrong, 0.55, 1.5, "t", {"correct": [0.1, 0.9], "incorrect": [0.5]}, tmp_path / "a.png"
    )
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    assert image.ndim == 3 and image.shape[2] == 3


@pytest.mark.slow
def test_callback_writes_pages_every_n_rl_iterations(tmp_path):
    from egspo.cli import run

    tiny = tiny_qwen2_json(max_position_embeddings=512)
    callbacks = (
        '[{"class_path": "egspo.callbacks.EntropyDiagnostics",'
        ' "init_args": {"every_n_iterations": 2, "num_examples": 2, "png": false}}]'
    )
    cli = run(
        args=[
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.callbacks={callbacks}",
            f"--model.policy.config={tiny}",
            "--model.sft_iterations=1",
            "--model.rl_iterations=3",
            "--model.rollout.num_generations=2",
            "--model.rollout.max_completion_length=6",
            "--trainer.limit_val_batches=0",
            "--data.prompts_per_step=2",
            "--data.expert_per_step=2",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    pages = sorted(p.name for p in (Path(cli.trainer.log_dir) / "diagnostics").iterdir())
    # RL iterations 1 and 3 of 3, i.e. iterations 2 and 4 (the `iteration` metric)
    assert pages == ["iter_0002.html", "iter_0004.html"]
    page = (Path(cli.trainer.log_dir) / "diagnostics" / "iter_0004.html").read_text()
    threshold = float(cli.trainer.logged_metrics["rl/gate_threshold"])
    assert f"&tau; = {threshold:.3f}" in page  # the threshold the loss used in that iteration
    assert "RL iteration 3/3 (iteration 4)" in page
