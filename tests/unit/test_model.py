import time

import pytest
import torch
from tiny_model import tiny_qwen2

from egspo.model import (
    HubUnreachableError,
    LoRAConfig,
    PolicyConfig,
    load_policy,
    load_tokenizer,
    stop_token_ids,
)

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


# ---------------------------------------------------------------------- stop tokens
def _saved_model(path, eos_token_id) -> PolicyConfig:
    """A tiny model saved like a hub checkpoint whose generation_config has its own `eos_token_id`."""
    spec = PolicyConfig(config=TINY, tokenizer="synthetic")
    tok = load_tokenizer(spec)
    model = load_policy(spec, tok)
    model.generation_config.eos_token_id = eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return PolicyConfig(name_or_path=str(path))


def test_generation_config_eos_list_survives_loading_and_every_entry_stops(tmp_path):
    """Chat models list their end-of-turn token next to EOS; loading must not replace that list
    with the tokenizer's single EOS, and sampling stops at all of them."""
    tok = load_tokenizer(PolicyConfig(config=TINY, tokenizer="synthetic"))
    end_of_text, im_start = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>"])
    assert tok.eos_token_id not in (end_of_text, im_start)
    spec = _saved_model(tmp_path, [end_of_text, im_start])
    tokenizer = load_tokenizer(spec)
    model = load_policy(spec, tokenizer)
    assert model.generation_config.eos_token_id == [end_of_text, im_start]
    assert stop_token_ids(tokenizer, model) == sorted({tokenizer.eos_token_id, end_of_text, im_start})


def test_a_single_generation_eos_id_and_lora_wrapping(tmp_path):
    tok = load_tokenizer(PolicyConfig(config=TINY, tokenizer="synthetic"))
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    spec = _saved_model(tmp_path, im_start)
    spec.lora = LoRAConfig(r=2, alpha=4, target_modules=["q_proj"])
    tokenizer = load_tokenizer(spec)
    model = load_policy(spec, tokenizer)  # a peft model: its generation_config is the base model's
    assert stop_token_ids(tokenizer, model) == sorted({tokenizer.eos_token_id, im_start})


# ---------------------------------------------------------------------- Dr.GRPO's constant
def _experience(completion_lengths: list[int], width: int, prompt_length: int = 3, seed: int = 0):
    """A hand-made experience: completions of the given lengths, right-padded to `width` columns."""
    from egspo.rollout.experience import Experience

    g = torch.Generator().manual_seed(seed)
    n = len(completion_lengths)
    completion_mask = torch.zeros(n, width)
    for i, length in enumerate(completion_lengths):
        completion_mask[i, :length] = 1
    ids = torch.randint(3, 200, (n, prompt_length + width), generator=g)
    return Experience(
        input_ids=ids,
        attention_mask=torch.cat([torch.ones(n, prompt_length), completion_mask], 1).long(),
        completion_mask=completion_mask,
        entropy=torch.rand(n, width, generator=g),
        advantages=torch.tensor([1.0, -0.5, 0.25, -0.75][:n]),
        rewards=torch.zeros(n),
        truncated=torch.zeros(n, dtype=torch.bool),
        prompt_length=prompt_length,
    )


def _widened(experience, extra: int):
    """The same rollouts with `extra` more padding columns (a batch whose longest answer is longer)."""
    import dataclasses

    def pad(x, value=0):
        return torch.nn.functional.pad(x, (0, extra), value=value)

    return dataclasses.replace(
        experience,
        input_ids=pad(experience.input_ids, 1),
        attention_mask=pad(experience.attention_mask),
        completion_mask=pad(experience.completion_mask),
        entropy=pad(experience.entropy),
    )


def test_dr_grpo_constant_defaults_to_max_completion_length_and_ignores_padding_width():
    from egspo.config import RolloutConfig, UpdateConfig
    from egspo.losses import PPOClipLoss
    from egspo.module import HybridRLModule
    from egspo.update import PolicyUpdate

    module = HybridRLModule(
        policy=PolicyConfig(config=TINY, tokenizer="synthetic"),
        policy_loss=PPOClipLoss(loss_agg_mode="seq-mean-token-sum-norm"),
        rollout=RolloutConfig(num_generations=2, max_completion_length=24),
    )
    assert module.policy_loss.norm_constant is None
    module.configure_model()
    assert module.policy_loss.norm_constant == 24.0

    def loss_of(experience) -> float:
        update = PolicyUpdate(
            module.policy_loss,
            module.policy_update.warmup_loss,
            module.policy_update.mix_loss,
            UpdateConfig(),
            temperature=1.0,
        )
        optimizer = torch.optim.SGD(module.policy.parameters(), lr=0.0)
        [step] = update.rl_update(module.policy, optimizer, experience, threshold=None)
        return step["loss"]

    narrow = _experience([2, 5, 7, 4], width=7)
    expected = -(2 * 1.0 + 5 * -0.5 + 7 * 0.25 + 4 * -0.75) / 24 / 4  # ratio 1: -mean_i (n_i A_i / C)
    assert loss_of(narrow) == pytest.approx(expected, abs=1e-6)
    assert loss_of(_widened(narrow, 9)) == pytest.approx(expected, abs=1e-6)
