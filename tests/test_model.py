import time

import pytest
import torch
from tiny_model import tiny_qwen2

from egspo.model import HubUnreachableError, LoRAConfig, PolicyConfig, load_policy, load_tokenizer

TINY = tiny_qwen2()


def test_policy_from_config_matches_tokenizer_vocab_and_generation_ids():
    spec = PolicyConfig(config=TINY, tokenizer="synthetic")
    tok = load_tokenizer(spec)
    model = load_policy(spec, tok)
    assert model.config.vocab_size == len(tok)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert tok.padding_side == "left" and tok.pad_token is not None


def test_lora_freezes_base_and_trains_adapters_only():
    spec = PolicyConfig(
        config=TINY, tokenizer="synthetic", lora=LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    )
    model = load_policy(spec, load_tokenizer(spec))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert callable(model.disable_adapter)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"name_or_path": "x", "config": TINY}, "exactly one"),
        ({"config": {"hidden_size": 8}, "tokenizer": "synthetic"}, "model_type"),
        ({"config": TINY, "tokenizer": "synthetic", "dtype": "fp8"}, "policy.dtype"),
        ({"config": TINY, "tokenizer": "synthetic", "load_in_4bit": True}, "policy.lora"),
        ({"config": TINY}, "policy.tokenizer"),
    ],
)
def test_policy_config_errors_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyConfig(**kwargs)


def test_unreachable_hub_id_fails_fast_with_guidance(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = PolicyConfig(name_or_path="egspo-tests/definitely-not-cached-model")
    start = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="local path"):
        load_tokenizer(spec)
    assert time.perf_counter() - start < 10


def test_saved_policy_reloads_from_local_path(tmp_path):
    spec = PolicyConfig(config=TINY, tokenizer="synthetic")
    tok = load_tokenizer(spec)
    model = load_policy(spec, tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = PolicyConfig(name_or_path=str(tmp_path))
    reloaded = load_policy(again, load_tokenizer(again))
    for (n, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
