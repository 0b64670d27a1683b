"""`PromptEncoder`: BOS as the tokenizer expects it, prompts cut from the left, demonstrations cut to fit.

The tokenizers are built here with the `tokenizers` library (word-level, no download), one per
convention a real model follows:
- Llama-style: the post-processor puts `<s>` in front of every text;
- Qwen-style: no BOS at all (`bos_token` is None), or one that is declared but never added;
- a chat template that writes `{{ bos_token }}` itself (Llama-3 style), with and without a
  post-processor that adds one too.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from egspo.config import PromptConfig
from egspo.data.encoding import PromptEncoder

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
WORDS = [f"w{i}" for i in range(40)] + ["Question", "Answer", ":", "user", "assistant", "|"]
VOCAB = {token: i for i, token in enumerate([BOS, EOS, PAD, UNK, *WORDS])}
BOS_ID, EOS_ID = VOCAB[BOS], VOCAB[EOS]
# One user turn; `|` closes a turn, `assistant :` opens the response.
TURNS = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} | {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def make_tokenizer(
    *, adds_bos: bool, bos_token: str | None = BOS, template_bos: bool | None = None
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer; `template_bos`: None no chat template, else one that writes BOS or not."""
    core = Tokenizer(models.WordLevel(VOCAB, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
        )
    template = None if template_bos is None else ("{{ bos_token }}" if template_bos else "") + TURNS
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos_token,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=template,
        padding_side="left",
    )


def question(n: int, start: int = 0) -> str:
    """`n` distinct words: the position of every token in a cut prompt is known."""
    return " ".join(f"w{start + i}" for i in range(n))


def rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """The real tokens of each left-padded row."""
    return [ids[i][mask[i].bool()].tolist() for i in range(len(ids))]


TOKENIZERS = {
    # name: (tokenizer factory, BOS expected at the start of every prompt)
    "llama": (lambda: make_tokenizer(adds_bos=True), True),
    "qwen": (lambda: make_tokenizer(adds_bos=False, bos_token=None), False),
    "declared-not-added": (lambda: make_tokenizer(adds_bos=False), False),
    "llama-chat-template-writes-bos": (lambda: make_tokenizer(adds_bos=True, template_bos=True), True),
    "chat-template-writes-bos-only": (lambda: make_tokenizer(adds_bos=False, template_bos=True), True),
    "llama-chat-template-without-bos": (lambda: make_tokenizer(adds_bos=True, template_bos=False), True),
    "qwen-chat-template": (lambda: make_tokenizer(adds_bos=False, bos_token=None, template_bos=False), False),
}


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_prompts_and_demonstrations_start_with_one_bos_exactly_when_expected(name):
    make, expected = TOKENIZERS[name]
    encoder = PromptEncoder(make(), PromptConfig(max_prompt_length=64, max_sft_length=128))
    questions = [question(3), question(7, start=10)]
    prompts = encoder.prompts(questions)
    demos = encoder.demonstrations(questions, ["w30 w31", "w32"])
    for row in rows(prompts.input_ids, prompts.attention_mask) + rows(demos.input_ids, demos.attention_mask):
        assert row.count(BOS_ID) == int(expected), row  # never two, none when not expected
        assert (row[0] == BOS_ID) == expected
    assert prompts.over_length == demos.over_length == 0


def test_the_bos_probe_reads_the_tokenizer_not_its_name():
    assert PromptEncoder(make_tokenizer(adds_bos=True), PromptConfig()).bos_token_id == BOS_ID
    assert PromptEncoder(make_tokenizer(adds_bos=False), PromptConfig()).bos_token_id is None
    assert PromptEncoder(make_tokenizer(adds_bos=False, bos_token=None), PromptConfig()).bos_token_id is None


@pytest.mark.parametrize("name", ["llama", "qwen", "chat-template-writes-bos-only"])
def test_a_long_prompt_keeps_its_end_and_its_bos(name):
    """Cut from the left: the question's end and the generation prompt stay, so does the BOS."""
    make, expected = TOKENIZERS[name]
    tokenizer = make()
    limit = 8
    encoder = PromptEncoder(tokenizer, PromptConfig(max_prompt_length=limit))
    long_q, short_q = question(20), question(2, start=30)
    prompts = encoder.prompts([long_q, short_q])
    assert prompts.over_length == 1
    assert prompts.input_ids.shape[1] <= limit
    long_row, short_row = rows(prompts.input_ids, prompts.attention_mask)
    full = tokenizer(encoder.format(long_q), add_special_tokens=False)["input_ids"]
    body = full[1:] if full[:1] == [BOS_ID] else full
    assert len(long_row) == limit
    assert long_row == ([BOS_ID] if expected else []) + body[-(limit - int(expected)) :]
    assert long_row.count(BOS_ID) == int(expected)
    short = tokenizer(encoder.format(short_q), add_special_tokens=False)["input_ids"]
    assert short_row == ([BOS_ID] if expected else []) + [t for t in short if t != BOS_ID]


def test_demonstrations_cut_the_prompt_from_the_left_and_the_sequence_from_the_right():
    """Each row is `[prompt | response EOS]`; its score mask has the row's width and marks the response."""
    tokenizer = make_tokenizer(adds_bos=True)
    config = PromptConfig(max_prompt_length=8, max_sft_length=14)
    encoder = PromptEncoder(tokenizer, config)
    questions = [question(2), question(20), question(2, start=20), question(20)]
    responses = ["w30 w31", "w32", "w33 " * 20, "w34 " * 20]
    demos = encoder.demonstrations(questions, responses)
    assert demos.input_ids.shape == demos.attention_mask.shape == demos.score_mask.shape
    assert demos.input_ids.shape[1] <= config.max_sft_length
    assert demos.over_length == 3  # rows 1 (prompt), 2 (response) and 3 (both) were cut
    ids, attention, score = demos.input_ids, demos.attention_mask.bool(), demos.score_mask.bool()
    assert not (score & ~attention).any(), "response tokens are real tokens"
    prompts = rows(*_prompts(encoder, questions))
    for i, prompt in enumerate(prompts):
        row, on_response = ids[i][attention[i]].tolist(), score[i][attention[i]].tolist()
        response = tokenizer(responses[i], add_special_tokens=False)["input_ids"] + [EOS_ID]
        assert row[0] == BOS_ID and row.count(BOS_ID) == 1
        assert row[: len(prompt)] == prompt  # the prompt as the sampler sees it (cut from the left)
        kept = min(len(response), config.max_sft_length - len(prompt))
        assert row[len(prompt) :] == response[:kept]  # the response, cut from the right
        assert on_response == [False] * len(prompt) + [True] * kept
    # A cut response loses its EOS (the model must not learn to stop there); whole ones keep it.
    assert ids[0, -1] == EOS_ID and ids[1, -1] == EOS_ID
    assert ids[2, -1] != EOS_ID and ids[3, -1] != EOS_ID


def test_a_prompt_that_fills_the_sequence_leaves_a_row_without_loss_and_counted():
    encoder = PromptEncoder(
        make_tokenizer(adds_bos=True), PromptConfig(max_prompt_length=12, max_sft_length=9)
    )
    demos = encoder.demonstrations([question(20), question(1)], ["w30", "w31"])
    assert demos.score_mask.shape == demos.input_ids.shape
    assert demos.score_mask[0].sum() == 0 and demos.score_mask[1].sum() == 2  # w31 and EOS
    assert demos.over_length == 1


def test_selecting_rows_keeps_masks_aligned():
    encoder = PromptEncoder(
        make_tokenizer(adds_bos=True), PromptConfig(max_prompt_length=8, max_sft_length=14)
    )
    demos = encoder.demonstrations([question(2), question(20), question(3)], ["w30", "w31 " * 9, "w32 w33"])
    part = demos.select(torch.tensor([0, 2]))
    assert part.input_ids.shape == part.attention_mask.shape == part.score_mask.shape
    assert part.input_ids.shape[1] == int(part.attention_mask.sum(1).max())
    for j, i in enumerate([0, 2]):
        assert part.input_ids[j][part.attention_mask[j].bool()].tolist() == (
            demos.input_ids[i][demos.attention_mask[i].bool()].tolist()
        )
        assert part.score_mask[j].sum() == demos.score_mask[i].sum()


def _prompts(encoder: PromptEncoder, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = encoder.prompts(questions)
    return encoded.input_ids, encoded.attention_mask


@pytest.mark.parametrize("name", ["llama", "qwen", "llama-chat-template-writes-bos"])
def test_bos_handling_survives_saving_and_loading_like_a_hub_tokenizer(name, tmp_path):
    """Through `egspo.model.load_tokenizer` from a local folder, as a real model's tokenizer loads."""
    from egspo.model import PolicyConfig, load_tokenizer

    make, expected = TOKENIZERS[name]
    make().save_pretrained(tmp_path)
    tokenizer = load_tokenizer(PolicyConfig(name_or_path=str(tmp_path)))
    encoder = PromptEncoder(tokenizer, PromptConfig(max_prompt_length=8))
    prompts = encoder.prompts([question(2), question(20)])
    for row in rows(prompts.input_ids, prompts.attention_mask):
        assert row.count(BOS_ID) == int(expected) and (row[0] == BOS_ID) == expected
    assert prompts.over_length == 1
