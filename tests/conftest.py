"""Shared test set-up: offline hub settings, a local tokenizer, paths to the real data."""

import os

# Set before anything imports transformers / datasets / tokenizers: they read these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from pathlib import Path

import pytest

# The shared data folder sits next to the repository (override with EGSPO_DATA_DIR).
DATA_DIR = Path(os.environ.get("EGSPO_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _data_file(relative: str) -> Path:
    path = DATA_DIR / relative
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent (set EGSPO_DATA_DIR to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def gsm8k_train_path() -> Path:
    return _data_file("gsm8k/train.jsonl")


@pytest.fixture(scope="session")
def gsm8k_test_path() -> Path:
    return _data_file("gsm8k/test.jsonl")


@pytest.fixture(scope="session")
def math500_path() -> Path:
    return _data_file("math500/test.jsonl")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """Byte-level BPE tokenizer of the synthetic task (vocab <= 512), built locally once."""
    from egspo.data.tokenizer import synthetic_tokenizer

    return synthetic_tokenizer(cache_dir=tmp_path_factory.mktemp("tokenizer"))
