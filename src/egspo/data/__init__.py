"""Data: record loading, the synthetic task, tokenizers, prompt formats, the DataModule."""

from egspo.data.batches import EpochSampler, IterationDataset
from egspo.data.datamodule import HybridDataModule
from egspo.data.prompts import BOXED_INSTRUCTION, DEFAULT_INSTRUCTION, format_prompt
from egspo.data.records import (
    DataError,
    DataSource,
    Example,
    gsm8k_final_answer,
    load_examples,
    split_math_solution,
)
from egspo.data.synthetic import SyntheticArithmetic
from egspo.data.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer, synthetic_tokenizer

__all__ = [
    "BOXED_INSTRUCTION",
    "CHAT_TEMPLATE",
    "DEFAULT_INSTRUCTION",
    "SPECIAL_TOKENS",
    "DataError",
    "DataSource",
    "EpochSampler",
    "Example",
    "HybridDataModule",
    "IterationDataset",
    "SyntheticArithmetic",
    "build_tokenizer",
    "format_prompt",
    "gsm8k_final_answer",
    "load_examples",
    "split_math_solution",
    "synthetic_tokenizer",
]
