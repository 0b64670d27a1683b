"""SharedPrefillEngine: one prefill per prompt, decode steps only for live rows, LoRA applied; its
sampling law and greedy equality with HF generate are checked with every engine in test_engines.py."""

from __future__ import annotations

import pytest
import torch

# The engines' test module holds the model and prompt fixtures (and their helpers) that these tests share.
from test_engines import _model, model, prompts  # noqa: F401
from tiny_model import stop_ids

from egspo.rollout import HFGenerateEngine, SamplingParams, SharedPrefillEngine


def test_shared_prefill_prefills_once_per_prompt_and_steps_only_live_rows(model, prompts, tiny_tokenizer):  # noqa: F811
    params = SamplingParams(
        max_new_tokens=16,
        num_samples=4,
        stop_token_ids=stop_ids(len(tiny_tokenizer), count=40),
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    calls: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        torch.manual_seed(0)
        rollout = SharedPrefillEngine().generate(model, *prompts, params)
    finally:
        hook.remove()
    prefill, *decode = calls
    assert prefill[0] == 4, "one prefill row per prompt, not per sample"
    assert all(width == 1 for _, width in decode)
    lengths = rollout.completion_mask.sum(1)
    assert lengths.min() < lengths.max(), "want varied lengths"
    # A row of length L is fed back L - 1 times; a finished row never again.
    assert sum(rows for rows, _ in decode) == int((lengths - 1).sum())


def test_shared_prefill_rejects_right_padded_prompts(model):  # noqa: F811
    ids = torch.tensor([[5, 6, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        SharedPrefillEngine().generate(
            model, ids, torch.tensor([[1, 1, 0]]), SamplingParams(max_new_tokens=2)
        )


def test_shared_prefill_applies_lora_adapters(prompts, tiny_tokenizer):  # noqa: F811
    peft = pytest.importorskip("peft")
    base = _model(len(tiny_tokenizer))
    lora = peft.get_peft_model(
        base,
        peft.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    params = SamplingParams(max_new_tokens=8, greedy=True, pad_token_id=tiny_tokenizer.pad_token_id)
    expected = HFGenerateEngine().generate(lora, *prompts, params)
    got = SharedPrefillEngine().generate(lora, *prompts, params)
    assert torch.equal(got.input_ids, expected.input_ids)
    torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    with lora.disable_adapter():
        without = SharedPrefillEngine().generate(lora, *prompts, params)
    assert not torch.equal(without.logprobs, got.logprobs), "the adapters had no effect"
