import torch
from tiny_model import tiny_qwen2

from egspo.model import PolicyConfig, load_policy, load_tokenizer
from egspo.scoring import position_ids_from_mask, token_logprobs

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
    logp, ent = token_logprobs(model, ids, torch.ones_like(ids), score, temperature=temperature, chunk_size=3)

    with torch.no_grad():
        logits = model(input_ids=ids).logits.float() / temperature
    full = torch.log_softmax(logits[:, :-1], -1)
    expected = full.gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected_ent = -(full.exp() * full).sum(-1)
    assert torch.allclose(logp[:, 5:], expected[:, 4:], atol=1e-5)
    assert torch.allclose(ent[:, 5:], expected_ent[:, 4:], atol=1e-5)
    assert torch.all(logp[:, :5] == 0) and torch.all(ent[:, :5] == 0)

    score_padded = torch.cat([torch.zeros(1, 4), score], dim=1)
    logp_pad, ent_pad = token_logprobs(model, padded, pad_mask, score_padded, temperature=temperature)
    assert torch.allclose(logp_pad[:, 4:], logp, atol=1e-5)
    assert torch.allclose(ent_pad[:, 4:], ent, atol=1e-5)


def test_gradient_flows_through_logprobs_only():
    model = _model().train()
    ids = torch.randint(3, 300, (2, 6))
    score = torch.ones(2, 6)
    logp, ent = token_logprobs(model, ids, torch.ones_like(ids), score)
    assert logp.requires_grad and not ent.requires_grad
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
    one, ent_one = token_logprobs(model, ids, mask, score, buckets=1, temperature=0.7)
    bucketed, ent_bucketed = token_logprobs(model, ids, mask, score, buckets=3, temperature=0.7)
    assert torch.allclose(one, bucketed, atol=1e-5) and torch.allclose(ent_one, ent_bucketed, atol=1e-5)
    assert torch.all(bucketed[score == 0] == 0)
