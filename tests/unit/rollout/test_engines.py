"""Rollout engines: the shared types, and that every engine samples exactly what the loss scores.

The engines are checked against each other (greedy decoding token for token), against the model
(log-probs and entropies of the sampled tokens under `softmax(logits / T)`), against the formula
(the empirical distribution of first tokens), and against a model whose own `generation_config`
asks for processors the loss does not score.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from tiny_model import padded_prompts, stop_ids, tiny_qwen2
from transformers import AutoConfig, AutoModelForCausalLM

from egspo.rollout import (
    ContinuousBatchingEngine,
    HFGenerateEngine,
    Rollout,
    RolloutEngine,
    SamplingParams,
    SharedPrefillEngine,
    completion_mask_from_eos,
)
from egspo.scoring import position_ids_from_mask, token_logprobs

# Small paged cache: the automatic sizing is meant for a GPU's memory.
CB_OPTIONS = {"num_blocks": 32, "max_batch_tokens": 256}


def _engines() -> list:
    return [
        HFGenerateEngine(),
        SharedPrefillEngine(),
        SharedPrefillEngine(compact_threshold=0.5, sync_every=3),
    ]


def _ids(engine) -> str:
    options = ",".join(f"{k}={v}" for k, v in vars(engine).items() if k != "options")
    return f"{type(engine).__name__}({options})"


ENGINES = _engines()
ENGINE_IDS = [_ids(e) for e in ENGINES]


def _model(vocab_size: int, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**tiny_qwen2(vocab_size=vocab_size, **overrides))
    return AutoModelForCausalLM.from_config(config).float()


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return _model(len(tiny_tokenizer))


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    return padded_prompts(tiny_tokenizer)


def _tempered_scores(model, rollout: Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each completion token and the entropy it was drawn with, from one plain forward."""
    p = rollout.prompt_length
    with torch.no_grad():
        logits = model(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            position_ids=position_ids_from_mask(rollout.attention_mask),
        ).logits.float()
    logp = torch.log_softmax(logits[:, p - 1 : -1] / temperature, dim=-1)
    token_logp = logp.gather(2, rollout.completion_ids[..., None]).squeeze(2)
    entropy = -(logp.exp() * logp).sum(-1)
    valid = rollout.completion_mask.bool()
    return token_logp.masked_fill(~valid, 0.0), entropy.masked_fill(~valid, 0.0)


def _check_layout(rollout: Rollout, params: SamplingParams, prompts: int) -> None:
    """Rows grouped per prompt; padding after the stop token; masks, flags and recorded values agree."""
    n, width = rollout.completion_mask.shape
    assert n == prompts * params.num_samples
    assert width <= params.max_new_tokens
    completion = rollout.completion_ids
    stops = torch.isin(completion, torch.tensor(params.stop_token_ids, dtype=torch.long))
    lengths = rollout.completion_mask.sum(1)
    for row in range(n):
        length = int(lengths[row])
        assert rollout.completion_mask[row, :length].all() and not rollout.completion_mask[row, length:].any()
        assert (completion[row, length:] == params.pad_token_id).all()
        if rollout.truncated[row]:
            assert length == params.max_new_tokens and not stops[row].any()
        else:
            assert stops[row, length - 1] and not stops[row, : length - 1].any()
    assert int(lengths.max()) == width, "no all-padding completion columns"
    assert torch.equal(rollout.attention_mask[:, rollout.prompt_length :], rollout.completion_mask)
    for recorded in (rollout.entropy, rollout.logprobs):
        if recorded is not None:
            assert recorded.dtype == torch.float32
            assert (recorded[rollout.completion_mask == 0] == 0).all()


# --- shared types -------------------------------------------------------------------------------


def test_completion_mask_stops_after_first_eos_and_flags_truncation():
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 9], [5, 6, 7, 8, 9]])
    mask, truncated = completion_mask_from_eos(ids, 2)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_completion_mask_accepts_several_or_no_eos_ids():
    ids = torch.tensor([[5, 3, 7], [4, 4, 1]])
    mask, truncated = completion_mask_from_eos(ids, [1, 3])
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert truncated.tolist() == [False, False]
    mask, truncated = completion_mask_from_eos(ids, ())
    assert mask.tolist() == [[1, 1, 1], [1, 1, 1]] and truncated.all()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("num_samples", 0),
        ("temperature", 0.0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("pad_token_id", -1),
        ("stop_token_ids", (3, -2)),
    ],
)
def test_sampling_params_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{"max_new_tokens": 4, field: value})


def test_sampling_params_store_stop_ids_as_a_tuple():
    params = SamplingParams(max_new_tokens=4, stop_token_ids=[2, 7])
    assert params.stop_token_ids == (2, 7)
    assert not params.truncates and SamplingParams(max_new_tokens=4, top_k=5).truncates


def test_rollout_from_completions_repeats_prompts_and_zeroes_values_past_the_stop():
    params = SamplingParams(max_new_tokens=3, num_samples=2, stop_token_ids=(9,), pad_token_id=0)
    prompt = torch.tensor([[0, 4], [5, 6]])
    prompt_mask = torch.tensor([[0, 1], [1, 1]])
    completion = torch.tensor([[9, 0, 0], [7, 8, 1], [7, 9, 0], [3, 3, 3]])
    values = torch.ones(4, 3)
    rollout = Rollout.from_completions(
        prompt, prompt_mask, completion, params, entropy=values, logprobs=-values
    )
    assert rollout.prompt_length == 2
    assert rollout.input_ids[:, :2].tolist() == [[0, 4], [0, 4], [5, 6], [5, 6]]
    assert torch.equal(rollout.completion_ids, completion)
    assert rollout.completion_mask.tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]]
    assert rollout.truncated.tolist() == [False, True, False, True]
    assert rollout.attention_mask[0].tolist() == [0, 1, 1, 0, 0]
    assert rollout.entropy.tolist()[0] == [1.0, 0.0, 0.0] and rollout.logprobs.tolist()[2] == [
        -1.0,
        -1.0,
        0.0,
    ]


@pytest.mark.parametrize("engine", [*_engines(), ContinuousBatchingEngine(CB_OPTIONS)], ids=_ids)
def test_engines_implement_the_protocol(engine):
    assert isinstance(engine, RolloutEngine)


def test_engine_options_are_validated():
    with pytest.raises(ValueError, match="compact_threshold"):
        SharedPrefillEngine(compact_threshold=1.0)
    with pytest.raises(ValueError, match="sync_every"):
        SharedPrefillEngine(sync_every=0)
    with pytest.raises(ValueError, match="return_logprobs"):
        ContinuousBatchingEngine({"return_logprobs": True})
    with pytest.raises(TypeError):
        ContinuousBatchingEngine({"no_such_option": 1})


# --- greedy: every engine decodes the same tokens -------------------------------------------------


def _greedy_params(model, prompts, pad_token_id: int) -> SamplingParams:
    """Stop tokens chosen from greedy outputs so that some rows stop early and one runs to the limit."""
    free = HFGenerateEngine().generate(model, *prompts, SamplingParams(max_new_tokens=12, greedy=True))
    out = free.completion_ids
    last = set(out[3].tolist())
    stops = [t for t in (out[0, 2].item(), out[1, 6].item(), out[2, 4].item()) if t not in last]
    assert stops, "pick other prompts: every candidate stop token occurs in the last row"
    return SamplingParams(
        max_new_tokens=12, greedy=True, stop_token_ids=tuple(stops), pad_token_id=pad_token_id
    )


@pytest.mark.parametrize("engine", ENGINES[1:], ids=ENGINE_IDS[1:])
def test_greedy_equals_hf_greedy_token_for_token(model, prompts, tiny_tokenizer, engine):
    params = _greedy_params(model, prompts, tiny_tokenizer.pad_token_id)
    expected = HFGenerateEngine().generate(model, *prompts, params)
    got = engine.generate(model, *prompts, params)
    assert expected.truncated.any() and not expected.truncated.all(), "want early stops and a full-length row"
    _check_layout(got, params, prompts=4)
    assert torch.equal(got.input_ids, expected.input_ids)
    assert torch.equal(got.attention_mask, expected.attention_mask)
    assert torch.equal(got.completion_mask, expected.completion_mask)
    assert torch.equal(got.truncated, expected.truncated)
    torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.entropy, expected.entropy, atol=1e-5, rtol=0)


def test_greedy_without_padding_or_stop_tokens(model, tiny_tokenizer):
    ids = tiny_tokenizer(["1 + 1 =", "9 - 4 ="], return_tensors="pt")  # same length: no padding
    assert bool(ids.attention_mask.all())
    params = SamplingParams(max_new_tokens=6, greedy=True, temperature=0.5)
    expected = HFGenerateEngine().generate(model, ids.input_ids, ids.attention_mask, params)
    got = SharedPrefillEngine().generate(model, ids.input_ids, ids.attention_mask, params)
    assert torch.equal(got.input_ids, expected.input_ids)
    assert got.truncated.all() and got.completion_mask.shape == (2, 6)
    # Greedy ignores the temperature for the choice, not for what it records.
    scored, entropy = _tempered_scores(model, got, temperature=0.5)
    torch.testing.assert_close(got.logprobs, scored, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.entropy, entropy, atol=1e-5, rtol=0)


# --- sampling: what is drawn is what the loss scores ----------------------------------------------


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 40, 0.9)])
@pytest.mark.parametrize("engine", ENGINES, ids=ENGINE_IDS)
def test_recorded_logprobs_and_entropy_equal_the_scored_ones(
    model, prompts, tiny_tokenizer, engine, temperature, top_k, top_p
):
    params = SamplingParams(
        max_new_tokens=16,
        num_samples=3,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_token_ids=stop_ids(len(tiny_tokenizer)),
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    rollout = engine.generate(model, *prompts, params)
    _check_layout(rollout, params, prompts=4)
    assert rollout.truncated.any() and not rollout.truncated.all(), "want varied lengths"
    direct_logp, direct_entropy = _tempered_scores(model, rollout, temperature)
    p = rollout.prompt_length
    score_mask = torch.cat([torch.zeros_like(rollout.input_ids[:, :p]), rollout.completion_mask], dim=1)
    scores = token_logprobs(
        model, rollout.input_ids, rollout.attention_mask, score_mask, temperature=temperature
    )
    scored_logp, scored_entropy = scores[0][:, p:].detach(), scores[1][:, p:]
    torch.testing.assert_close(scored_logp, direct_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.logprobs, direct_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.entropy, direct_entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(scored_entropy, direct_entropy, atol=1e-5, rtol=0)
    if top_k:  # every sampled token survived the truncation
        assert torch.isfinite(rollout.logprobs).all()


@pytest.mark.parametrize("engine", ENGINES, ids=ENGINE_IDS)
def test_model_generation_config_changes_nothing(prompts, tiny_tokenizer, engine):
    """A checkpoint's generation_config (penalties, min_p, top_k=50 default, ...) must not reach sampling."""
    model = _model(len(tiny_tokenizer))
    params = SamplingParams(
        max_new_tokens=10,
        num_samples=2,
        temperature=0.8,
        stop_token_ids=stop_ids(len(tiny_tokenizer)),
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(3)
    plain = engine.generate(model, *prompts, params)
    original = model.generation_config
    for name, value in {
        "repetition_penalty": 1.8,
        "no_repeat_ngram_size": 1,
        "min_p": 0.3,
        "temperature": 0.2,
        "top_k": 3,
        "top_p": 0.5,
        "suppress_tokens": list(range(100)),
        "eos_token_id": [5, 6],
        "max_new_tokens": 2,
    }.items():
        setattr(model.generation_config, name, value)
    torch.manual_seed(3)
    loaded = engine.generate(model, *prompts, params)
    assert torch.equal(loaded.input_ids, plain.input_ids)
    assert torch.equal(loaded.logprobs, plain.logprobs)
    assert model.generation_config is original and model.generation_config.min_p == 0.3


@pytest.mark.parametrize("engine", ENGINES, ids=ENGINE_IDS)
def test_same_seed_same_samples_and_training_mode_restored(model, prompts, engine):
    params = SamplingParams(max_new_tokens=8, num_samples=2, stop_token_ids=(7,))
    model.train()
    torch.manual_seed(5)
    first = engine.generate(model, *prompts, params)
    assert model.training
    torch.manual_seed(5)
    second = engine.generate(model, *prompts, params)
    assert torch.equal(first.input_ids, second.input_ids)
    model.eval()


def _expected_first_token_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """softmax(logits / T) cut to the top-k, then to the smallest set of mass >= top_p, renormalised."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = probs.argsort(descending=True)
    sorted_probs = probs[order]
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
    if top_p < 1.0:
        kept = sorted_probs * keep
        kept = kept / kept.sum()
        mass_before = kept.cumsum(0) - kept
        keep &= mass_before < top_p
    out = torch.zeros_like(probs)
    out[order[keep]] = sorted_probs[keep]
    return out / out.sum()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.6, 0, 1.0), (1.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 6, 0.8)]
)
@pytest.mark.parametrize("engine", ENGINES[:2], ids=ENGINE_IDS[:2])
def test_first_token_frequencies_match_the_tempered_truncated_softmax(engine, temperature, top_k, top_p):
    vocab, samples = 16, 12000
    model = _model(vocab, seed=2, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(15.0)  # a peaked distribution, so that T and the cut matter
    prompt = torch.tensor([[3]])
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        logits = model(input_ids=prompt, attention_mask=mask).logits[0, -1]
    expected = _expected_first_token_distribution(logits, temperature, top_k, top_p)
    assert (expected > 0).sum() >= 4 and expected.max() < 0.8, "the test needs a spread distribution"
    params = SamplingParams(
        max_new_tokens=1, num_samples=samples, temperature=temperature, top_k=top_k, top_p=top_p
    )
    torch.manual_seed(11)
    rollout = engine.generate(model, prompt, mask, params)
    counts = torch.bincount(rollout.completion_ids[:, 0], minlength=vocab).double()
    assert counts[expected == 0].sum() == 0, "a token outside top-k / top-p was drawn"
    support = expected > 0
    expected_counts = expected[support] * samples
    chi2 = float(((counts[support] - expected_counts) ** 2 / expected_counts).sum())
    dof = int(support.sum()) - 1
    # The chi-square statistic of a correct sampler stays below dof + 6 sqrt(2 dof) with near certainty.
    assert chi2 < dof + 6 * math.sqrt(2 * dof), f"chi2={chi2:.1f} with {dof} degrees of freedom"


# --- continuous batching (correctness only: on CPU it is slow by design) --------------------------


def test_continuous_batching_greedy_equals_hf_greedy(model, prompts, tiny_tokenizer):
    params = _greedy_params(model, prompts, tiny_tokenizer.pad_token_id)
    expected = HFGenerateEngine().generate(model, *prompts, params)
    got = ContinuousBatchingEngine(CB_OPTIONS).generate(model, *prompts, params)
    _check_layout(got, params, prompts=4)
    assert torch.equal(got.input_ids, expected.input_ids)
    assert torch.equal(got.truncated, expected.truncated)
    torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    assert got.entropy is None
    assert model.config._attn_implementation == "sdpa", "the attention implementation was not restored"


def test_continuous_batching_samples_score_as_the_tempered_softmax(prompts, tiny_tokenizer):
    model = _model(len(tiny_tokenizer))
    model.generation_config.repetition_penalty = 2.0  # must not reach the sampler
    model.train()
    params = SamplingParams(
        max_new_tokens=12,
        num_samples=3,
        temperature=0.7,
        stop_token_ids=stop_ids(len(tiny_tokenizer)),
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    rollout = ContinuousBatchingEngine(CB_OPTIONS).generate(model, *prompts, params)
    assert model.training
    _check_layout(rollout, params, prompts=4)
    direct_logp, _ = _tempered_scores(model, rollout, 0.7)
    torch.testing.assert_close(rollout.logprobs, direct_logp, atol=1e-5, rtol=0)
    # With top-k, generate_batch's log-probs are those of the cut distribution: not reported.
    truncated = SamplingParams(**{**vars(params), "top_k": 20, "max_new_tokens": 4})
    assert ContinuousBatchingEngine(CB_OPTIONS).generate(model, *prompts, truncated).logprobs is None


# --- the benchmark script ------------------------------------------------------------------------


@pytest.mark.slow
def test_generation_benchmark_appends_its_table(tmp_path, monkeypatch):
    path = Path(__file__).resolve().parents[3] / "scripts" / "bench_generation.py"
    spec = importlib.util.spec_from_file_location("egspo_bench_generation", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    output = tmp_path / "BENCHMARKS.md"
    output.write_text("# Benchmarks\n")
    args = "--prompts 2 --samples 2 --max-new-tokens 8 --min-prompt 3 --max-prompt 6 --stop-prob 0.2"
    argv = ["bench_generation.py", *args.split(), "--repeats", "2", "--threads", "0", "--output", str(output)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    text = output.read_text()
    assert text.startswith("# Benchmarks\n\n## Generation: SharedPrefillEngine vs HF generate")
    assert "| **`SharedPrefillEngine` / HF generate** | **" in text
