import pytest
import torch
from tiny_model import tiny_qwen2
from transformers import AutoConfig, AutoModelForCausalLM

from egspo.model import PolicyConfig, load_policy, load_tokenizer
from egspo.scoring import TokenScores, position_ids_from_mask, token_logprobs

TINY = tiny_qwen2(max_position_embeddings=128)


def _model():
    torch.manual_seed(0)
    spec = PolicyConfig(config=TINY, tokenizer="synthetic")
    return load_policy(spec, load_tokenizer(spec)).eval()


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_token_logprobs_match_full_logits_and_ignore_left_padding():
    model = _model()
    ids = torch.randint(3, 300, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    pad_mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    score = torch.zeros(1, 9)
    score[:, 5:] = 1
    temperature = 0.7
    logp, ent = token_logprobs(
        model, ids, torch.ones_like(ids), score, temperature=temperature, chunk_size=3
    )[:2]

    with torch.no_grad():
        logits = model(input_ids=ids).logits.float() / temperature
    full = torch.log_softmax(logits[:, :-1], -1)
    expected = full.gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected_ent = -(full.exp() * full).sum(-1)
    assert torch.allclose(logp[:, 5:], expected[:, 4:], atol=1e-5)
    assert torch.allclose(ent[:, 5:], expected_ent[:, 4:], atol=1e-5)
    assert torch.all(logp[:, :5] == 0) and torch.all(ent[:, :5] == 0)

    score_padded = torch.cat([torch.zeros(1, 4), score], dim=1)
    logp_pad, ent_pad = token_logprobs(model, padded, pad_mask, score_padded, temperature=temperature)[:2]
    assert torch.allclose(logp_pad[:, 4:], logp, atol=1e-5)
    assert torch.allclose(ent_pad[:, 4:], ent, atol=1e-5)


def test_gradient_flows_through_logprobs_only():
    model = _model().train()
    ids = torch.randint(3, 300, (2, 6))
    score = torch.ones(2, 6)
    logp, ent, polarity = token_logprobs(model, ids, torch.ones_like(ids), score, with_polarity=True)
    assert logp.requires_grad and not ent.requires_grad and not polarity.requires_grad
    logp.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_length_buckets_match_one_padded_pass():
    model = _model()
    batch, prompt, completion = 6, 7, 9
    ids = torch.randint(3, 300, (batch, prompt + completion))
    mask = torch.ones_like(ids)
    for i, (p, c) in enumerate(zip([7, 3, 5, 1, 6, 2], [9, 2, 5, 9, 1, 0], strict=True)):
        mask[i, : prompt - p] = 0
        mask[i, prompt + c :] = 0
    score = torch.zeros(batch, prompt + completion)
    score[:, prompt:] = mask[:, prompt:].float()
    one = token_logprobs(model, ids, mask, score, buckets=1, temperature=0.7, with_polarity=True)
    bucketed = token_logprobs(model, ids, mask, score, buckets=3, temperature=0.7, with_polarity=True)
    for name, a, b in zip(TokenScores._fields, one, bucketed, strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
        assert torch.all(b[score == 0] == 0), name
    assert token_logprobs(model, ids, mask, score, buckets=3).polarity is None


SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 97,
    "max_position_embeddings": 64,
}
# Values far from each family's default, so that a transform left out changes the scores.
HEADS = {
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 0.8},
    "gemma3_text": {"head_dim": 8, "final_logit_softcapping": 0.8},
    "cohere": {"logit_scale": 4.0},
    "cohere2": {"logit_scale": 4.0},
    "granite": {"logits_scaling": 0.25},
    "granitemoe": {"logits_scaling": 0.25, "num_local_experts": 2, "num_experts_per_tok": 1},
    "phi": {},  # lm_head with a bias
    "qwen2-bias": {},
}


def _family(name: str) -> torch.nn.Module:
    model_type = name.removesuffix("-bias")
    config = AutoConfig.for_model(model_type, **SMALL, **HEADS[name])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    head = model.get_output_embeddings()
    if name.endswith("-bias"):
        head.bias = torch.nn.Parameter(torch.randn(SMALL["vocab_size"]))
    elif head.bias is not None:
        torch.nn.init.normal_(head.bias)  # zero-initialised: make it count
    return model


@pytest.mark.parametrize("name", HEADS)
def test_scores_are_those_of_the_models_own_logits(name):
    """lm_head bias, soft-capping and logit scales are applied exactly as the model's forward does."""
    model = _family(name)
    ids = torch.randint(1, SMALL["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(1))
    score = torch.zeros(2, 8)
    score[:, 3:] = 1
    temperature = 0.7
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    full = torch.log_softmax(out.logits[:, :-1].float() / temperature, -1)
    expected = full.gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected_ent = -(full.exp() * full).sum(-1)
    # the test is not vacuous: plain `W h` would score another distribution
    plain = out.hidden_states[-1][:, :-1] @ model.get_output_embeddings().weight.t() / temperature
    plain = torch.log_softmax(plain, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert (plain - expected).abs().max() > 1e-2
    scores = token_logprobs(model, ids, torch.ones_like(ids), score, temperature=temperature, chunk_size=5)
    torch.testing.assert_close(scores.logprobs[:, 3:], expected[:, 2:], rtol=0, atol=1e-5)
    torch.testing.assert_close(scores.entropy[:, 3:], expected_ent[:, 2:], rtol=0, atol=1e-5)
    scores.logprobs.sum().backward()
    head = model.get_output_embeddings()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    if head.bias is not None:
        assert head.bias.grad is not None and head.bias.grad.abs().sum() > 0


def test_unknown_logit_transform_is_refused_naming_model_and_field():
    config = AutoConfig.for_model("qwen2", **SMALL)
    config.logits_scaling = 2.0  # a field Qwen2's forward ignores, but a family egspo does not know may use
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"Qwen2ForCausalLM.*config\.logits_scaling=2\.0"):
        token_logprobs(model, ids, torch.ones_like(ids), torch.ones(1, 4))
