"""The tiny Qwen2-architecture model the tests build from its config (random weights, trains in seconds)."""

import json

import torch


def tiny_qwen2(**overrides) -> dict:
    """Keyword arguments of the config; `overrides` change or add fields."""
    return {
        "model_type": "qwen2",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **overrides,
    }


def tiny_qwen2_json(**overrides) -> str:
    """The config as a CLI value: `--model.policy.config=<this>`."""
    return json.dumps(tiny_qwen2(**overrides))


# Four prompts of different lengths: left-padded together, they need padding.
PROMPT_TEXTS = [
    "What is 2 + 3?",
    "Tom has 4 apples and buys 7 more. How many now?",
    "7 * 8 =",
    "Add 12 and 30.",
]


def padded_prompts(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """`PROMPT_TEXTS` left-padded: (input_ids, attention_mask)."""
    batch = tokenizer(PROMPT_TEXTS, padding=True, return_tensors="pt")
    assert (batch.attention_mask == 0).any(), "the prompts should need padding"
    return batch.input_ids, batch.attention_mask


def stop_ids(vocab_size: int, count: int = 24) -> tuple[int, ...]:
    """Enough stop tokens that a random model stops after ~vocab/count steps: lengths vary."""
    return tuple(torch.randperm(vocab_size, generator=torch.Generator().manual_seed(1))[:count].tolist())
