"""The tiny Qwen2-architecture model the tests build from its config (random weights, trains in seconds)."""

import json


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
