"""Small byte-level BPE tokenizers trained locally, so tests and the demo need no download."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from egspo.data.prompts import DEFAULT_INSTRUCTION
from egspo.data.synthetic import SyntheticArithmetic

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
# Byte-level BPE needs the 256 byte symbols plus the special tokens before any merge.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# ChatML as used by Qwen; unlike Qwen's, no default system message is inserted.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 512,
    *,
    min_frequency: int = 2,
    model_max_length: int = 2048,
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus``.

    Byte-level means any text encodes without an unknown token. Digits are split one per
    token before the byte-level step, so numbers are written digit by digit (what small
    models need to learn arithmetic). Special tokens: ``<|endoftext|>`` (padding),
    ``<|im_start|>``, ``<|im_end|>`` (end of sequence, closes a chat turn). Padding is on
    the left for batched generation; training code may switch ``padding_side``.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (bytes + special tokens), got {vocab_size}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side=padding_side,
    )


def synthetic_tokenizer(
    task=None,
    vocab_size: int = 512,
    *,
    corpus_size: int = 4000,
    cache_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """The default tokenizer for the synthetic arithmetic task, built deterministically.

    Trained on ``corpus_size`` train problems and solutions of ``task`` (a
    ``SyntheticArithmetic``; default settings when None) plus the prompt instructions.
    With ``cache_dir``, it is saved under a sub-folder keyed by these settings and
    reloaded from there on later calls.
    """
    task = task or SyntheticArithmetic()
    target: Path | None = None
    if cache_dir is not None:
        settings = json.dumps([task.config(), vocab_size, corpus_size], sort_keys=True)
        key = hashlib.sha256(settings.encode()).hexdigest()[:16]
        target = Path(cache_dir) / f"synthetic-{key}"
        if (target / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(target))

    def corpus() -> Iterable[str]:
        yield from task.corpus(corpus_size)
        yield DEFAULT_INSTRUCTION
        yield "system\nuser\nassistant\nQuestion:\nAnswer:\n"

    tokenizer = build_tokenizer(corpus(), vocab_size=vocab_size)
    if target is not None:
        _save_atomically(tokenizer, target)
    return tokenizer


def _save_atomically(tokenizer: PreTrainedTokenizerFast, target: Path) -> None:
    """Save to a private folder, then rename: concurrent ranks never see a half-written one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    tokenizer.save_pretrained(str(tmp))
    try:
        tmp.rename(target)
    except OSError:  # another process saved the same tokenizer first
        shutil.rmtree(tmp, ignore_errors=True)
