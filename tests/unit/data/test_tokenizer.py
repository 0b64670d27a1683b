"""Locally trained byte-level BPE tokenizer: coverage, digits, chat template, save/reload."""

import pytest
from transformers import AutoTokenizer

from egspo.data import SPECIAL_TOKENS, SyntheticArithmetic, build_tokenizer, synthetic_tokenizer
from egspo.data.tokenizer import MIN_VOCAB_SIZE

TEXTS = [
    "Mia has 47 marbles. She finds 18 more, then loses 25.",
    "47 + 18 = 65\n65 - 25 = 40\n#### 40",
    "Unicode: héllo wörld — ∑ 😀 中文 \t tabs\r\n and \x00 control",
    r"LaTeX: $\boxed{\frac{\sqrt{2}}{2}}$ and \left( 3, \frac{\pi}{2} \right)",
    "   leading and trailing spaces   ",
]


def test_round_trip_any_text(tiny_tokenizer):
    vocab_size = len(tiny_tokenizer)
    for text in TEXTS:
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert all(0 <= i < vocab_size for i in ids)
        assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.unk_token is None


def test_digits_are_single_tokens(tiny_tokenizer):
    tokens = tiny_tokenizer.tokenize("x 1234567890 y")
    assert [t for t in tokens if any(c.isdigit() for c in t)] == list("1234567890")


def test_special_tokens_and_padding(tiny_tokenizer):
    assert tiny_tokenizer.pad_token == "<|endoftext|>"
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    for token in SPECIAL_TOKENS:
        assert tiny_tokenizer.tokenize(token) == [token]
    ids = tiny_tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tiny_tokenizer.eos_token_id
    batch = tiny_tokenizer(["a", "a longer text"], padding=True)
    assert tiny_tokenizer.padding_side == "left"
    assert batch["input_ids"][0][0] == tiny_tokenizer.pad_token_id
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1


def test_chat_template(tiny_tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        tiny_tokenizer.apply_chat_template(messages[1:], tokenize=False) == "<|im_start|>user\nU<|im_end|>\n"
    )


def test_save_and_reload_offline(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert reloaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert reloaded.chat_template == tiny_tokenizer.chat_template
    assert (reloaded.pad_token, reloaded.eos_token, reloaded.padding_side) == (
        "<|endoftext|>",
        "<|im_end|>",
        "left",
    )
    assert reloaded.get_vocab() == tiny_tokenizer.get_vocab()


def test_build_is_deterministic_and_respects_vocab_size():
    corpus = [e.prompt + "\n" + e.response for e in SyntheticArithmetic(seed=5).generate(500)]
    first = build_tokenizer(corpus, vocab_size=300)
    assert len(first) <= 300
    assert build_tokenizer(corpus, vocab_size=300).get_vocab() == first.get_vocab()
    with pytest.raises(ValueError, match=f">= {MIN_VOCAB_SIZE}"):
        build_tokenizer(corpus, vocab_size=100)


def test_synthetic_tokenizer_cache(tmp_path):
    task = SyntheticArithmetic(seed=2)
    built = synthetic_tokenizer(task, vocab_size=400, corpus_size=500, cache_dir=tmp_path)
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1 and (folders[0] / "tokenizer.json").is_file()
    cached = synthetic_tokenizer(task, vocab_size=400, corpus_size=500, cache_dir=tmp_path)
    assert cached.get_vocab() == built.get_vocab()
    synthetic_tokenizer(task, vocab_size=380, corpus_size=500, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2  # other settings, other folder
    # The synthetic task's text is compact: words are single tokens after training.
    assert len(built.tokenize(" marbles")) == 1
