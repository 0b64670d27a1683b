"""The benchmark harness: what makes its comparisons fair is tested here, not assumed.

- `SharedPrefillEngine` samples what `generate` samples from the same seed (the RL row's sides
  must generate the same tokens);
- the stop feature written into a saved model makes samples stop at about the asked rate;
- egspo (both engines) and TRL, run through the workers, sample identical completions, and every
  round reports the figures the tables need;
- the EGSPO-vs-GRPO case compares the two losses on identical rollouts;
- `scripts/bench.py` keeps its command line, refuses bad options before any work, and rewrites
  BENCHMARKS.md's sections while keeping the hand-written notes;
- the few egspo internals the workers hook into (`bench_egspo.py`) still exist.
"""

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_model import tiny_qwen2
from transformers import AutoConfig, AutoModelForCausalLM

from egspo.losses import PPOClipLoss
from egspo.rollout import HFGenerateEngine, RolloutEngine, SamplingParams, SharedPrefillEngine

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # bench_* import each other
import bench_common
import bench_egspo
import bench_rl
import bench_sections

ROOT = Path(__file__).resolve().parents[2]
TINY = tiny_qwen2(max_position_embeddings=512)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"egspo_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("bench")


def _model(vocab: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    return (
        AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_qwen2(vocab_size=vocab))).float().eval()
    )


def _left_padded(rows: int, vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (rows,), generator=g)
    width = int(lengths.max())
    mask = (torch.arange(width)[None] >= width - lengths[:, None]).long()
    return torch.randint(3, vocab, (rows, width), generator=g).masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 10, 0.9)])
@pytest.mark.parametrize(
    "engine", [SharedPrefillEngine(), SharedPrefillEngine(compact_threshold=0.5, sync_every=3)]
)
def test_shared_prefill_samples_what_generate_samples_from_the_same_seed(engine, temperature, top_k, top_p):
    model = _model()
    prompts = _left_padded(6, 64)
    params = SamplingParams(
        max_new_tokens=40,
        num_samples=4,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_token_ids=tuple(range(40, 48)),
        pad_token_id=0,
    )
    torch.manual_seed(5)
    expected = HFGenerateEngine().generate(model, *prompts, params)
    torch.manual_seed(5)
    got = engine.generate(model, *prompts, params)
    lengths = expected.completion_mask.sum(1)
    assert lengths.min() < lengths.max(), "want rows that finish at different steps"
    assert torch.equal(got.input_ids, expected.input_ids)
    torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-5, rtol=0)


def test_own_draws_sample_the_same_distribution_not_the_same_tokens():
    model = _model()
    prompts = _left_padded(4, 64)
    params = SamplingParams(max_new_tokens=30, num_samples=4, stop_token_ids=(40, 41), pad_token_id=0)
    torch.manual_seed(5)
    expected = HFGenerateEngine().generate(model, *prompts, params)
    torch.manual_seed(5)
    got = SharedPrefillEngine(same_draws_as_generate=False).generate(model, *prompts, params)
    assert not torch.equal(got.input_ids, expected.input_ids)


def test_stop_feature_sets_the_stop_rate_and_keeps_other_tokens_odds():
    model = bench_common.build_model(bench_common.QWEN2_QUICK, vocab_size=96, eos=2, pad=0)
    ids = torch.randint(3, 96, (4, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = torch.log_softmax(model(input_ids=ids).logits, -1)
    measured = bench_common.add_stop_feature(model, eos=2, stop_prob=0.05)
    assert 0.03 < measured < 0.08
    with torch.no_grad():
        after = torch.log_softmax(model(input_ids=ids).logits, -1)
    # Only EOS moved against the rest: differences between two other tokens barely change.
    drift = (after[..., 5] - after[..., 9]) - (before[..., 5] - before[..., 9])
    assert drift.abs().max() < 0.5
    assert float(after[..., 2].exp().mean()) > 3 * float(before[..., 2].exp().mean())


def test_completion_rows_cut_at_the_first_stop_token():
    ids = torch.tensor([[5, 2, 7, 2], [4, 4, 4, 4]])
    assert bench_common.completion_rows(ids, [2]) == [[5, 2], [4, 4, 4, 4]]
    assert bench_common.digest([[5, 2]]) == bench_common.digest([[5, 2]]) != bench_common.digest([[5, 3]])


def test_micro_batches_give_both_sides_the_same_rows_per_pass():
    setup = bench_common.RLSetup(max_completion_length=64, micro_batch_size=16)
    # egspo's budget: TRL's 16 padded rows at the longest prompt (128) and completion (64).
    assert setup.egspo_token_budget() == 16 * (128 + 64)
    assert "--model.update.ppo_max_token_len_per_gpu=3072" in bench_egspo.rl_args(setup, "some.Engine")
    whole = bench_common.RLSetup(max_completion_length=64)
    assert whole.egspo_token_budget() is None
    assert not any("ppo_max_token_len_per_gpu" in a for a in bench_egspo.rl_args(whole, "some.Engine"))


@pytest.fixture(scope="module")
def rl_runs(bench, tmp_path_factory) -> tuple[dict[str, dict], dict]:
    """egspo's RL worker with each engine on one saved model that stops at about 0.2 per token."""
    path = tmp_path_factory.mktemp("rl") / "model"
    bench_common.save_model(bench_common.QWEN2_QUICK, path, stop_prob=0.2)
    setup = bench_common.RLSetup(max_completion_length=8, prompts_per_step=2, num_generations=4, rounds=1)
    spec = {"model": str(path), "setup": dataclasses.asdict(setup)}
    egspo_sides = {name: side for name, side in bench_common.SIDES.items() if name != "trl"}
    runs = {
        name: bench.WORKERS[kind]({**spec, "kind": kind, "engine": engine})
        for name, (_, kind, engine) in egspo_sides.items()
    }
    return runs, spec


def _assert_round_figures(name: str, run: dict) -> None:
    (round_,) = run["rounds"]
    assert {"generation_s", "update_s", "seconds", "tokens", "digest"} <= set(round_), name
    assert 0 < round_["generation_s"] + round_["update_s"] < round_["seconds"], name
    # CPU time over wall time of this process: at most its intra-op threads (plus slack).
    assert 0 < run["cpu_share"] <= torch.get_num_threads() + 0.5, name


@pytest.mark.slow
def test_egspo_rl_workers_sample_identical_completions_with_both_engines(bench, rl_runs):
    runs, spec = rl_runs
    for name, run in runs.items():
        _assert_round_figures(name, run)
    identical, counts_agree, _ = bench_rl.same_tokens(runs["egspo"], runs["egspo-hf"])
    assert identical and counts_agree
    assert runs["egspo-hf"]["rounds"][0]["tokens"] < 2 * 4 * 8, "the stop feature should end some samples"
    # With the update in micro-batches (TRL's 2 padded rows of tokens each): the same completions.
    _, kind, engine = bench_common.SIDES["egspo"]
    micro = {**spec, "setup": {**spec["setup"], "micro_batch_size": 2}}
    split = bench.WORKERS[kind]({**micro, "kind": kind, "engine": engine})
    _assert_round_figures("egspo, micro-batches", split)
    assert bench_rl.same_tokens(split, runs["egspo"])[:2] == (True, True)
    # The MFU arithmetic, as the GPU row does it (a made-up device name with a known peak).
    shape = {**bench_common.QWEN2_QUICK, "vocab_size": 443}
    mfu = bench_sections.update_mfu({**runs["egspo"], "device_name": "H100"}, shape)
    assert mfu is not None and 0 < mfu < 1e-3


@pytest.mark.slow
def test_trl_rl_worker_samples_the_completions_egspo_samples(bench, rl_runs):
    pytest.importorskip("trl")
    runs, spec = rl_runs
    _, kind, engine = bench_common.SIDES["trl"]
    trl = bench.WORKERS[kind]({**spec, "kind": kind, "engine": engine})
    _assert_round_figures("trl", trl)
    for name, run in runs.items():
        identical, counts_agree, _ = bench_rl.same_tokens(run, trl)
        assert identical and counts_agree, name
    # In micro-batches of 2 rows (4 per optimizer step): the same completions, one update per round
    # that spans every micro-batch (not only the last one's).
    micro = {**spec, "setup": {**spec["setup"], "micro_batch_size": 2}}
    split = bench.WORKERS[kind]({**micro, "kind": kind, "engine": engine})
    _assert_round_figures("trl, micro-batches", split)
    identical, counts_agree, _ = bench_rl.same_tokens(split, trl)
    assert identical and counts_agree
    (round_,) = split["rounds"]
    assert round_["scoring_s"] < round_["update_s"] / 2  # no micro-batch counted as scoring


@pytest.mark.slow
def test_overhead_case_alternates_losses_on_identical_rollouts():
    out = bench_egspo.worker_overhead(
        {"pairs": 2, "prompts_per_step": 2, "max_completion_length": 6, "micro_repeats": 2, "config": TINY}
    )
    # Same weights, prompts and seed every iteration: only the loss differs between the two sides.
    assert out["identical_rollouts"]
    assert out["tokens"] > 0
    assert len(out["egspo"]) == len(out["grpo"]) == 2
    assert all(t > 0 for t in out["egspo"] + out["grpo"])
    for side in ("egspo", "grpo"):
        assert {"time/generation", "time/update"} <= set(out["phases"][side])
    assert out["loss_egspo"] > 0 and out["loss_grpo"] > 0


def test_generation_benchmark_counts_the_bytes_decoding_must_read():
    gen = _load("bench_generation")
    model = _model(vocab=32)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])  # prompts of 2 and 3 tokens
    lengths = torch.tensor([2, 1, 4, 1])  # 2 samples per prompt
    config = model.config
    weights = sum(p.numel() * 4 for p in model.parameters())
    kv_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * 4 * (32 // 4)
    # Steps read the weights once each (4 steps) and, per row, the cache at each of its steps.
    cached = (2 + 3) + 2 + (3 + 4 + 5 + 6) + 3
    assert gen.decode_bytes(model, mask, lengths, samples=2) == 4 * weights + cached * kv_per_token


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--rows=fused,bogus", "unknown rows: ['bogus']"),
        ("--rl-cases=h256-L4-64,huge", "unknown RL sizes: ['huge']"),
        ("--lengths=varied,short", "unknown lengths: ['short']"),
    ],
)
def test_bench_refuses_a_bad_option_in_one_line_before_any_work(option, message):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), option, "--output", "/nonexistent/out.md"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(f"error: {message}")
    assert done.stdout == "" and "row " not in done.stderr


def test_bench_help_lists_every_option_of_the_documented_command_lines():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0
    for option in ("--quick", "--device", "--rows", "--repeats", "--rounds", "--rl-cases", "--lengths"):
        assert option in done.stdout
    for option in ("--max-load", "--fused-quick", "--threads", "--output", "--replace-all"):
        assert option in done.stdout


def test_every_worker_a_row_runs_is_dispatched(bench):
    kinds = {kind for _, kind, _ in bench_common.SIDES.values()} | {"egspo_sft", "trl_sft", "overhead"}
    assert set(bench.WORKERS) == kinds


def test_write_output_replaces_its_sections_and_keeps_the_others_and_the_notes(bench, tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    notes = f"{bench.NOTES_MARKER}\n\nA hand-written profile.\n"
    path.write_text(
        "# Benchmarks\n\nLast produced by `old`.\n\n## 1. Fused: old table\n\nfused rows\n\n"
        f"## 3. RL throughput: egspo vs TRL\n\nold RL rows\n\n{notes}"
    )
    new_rl = "## 3. RL throughput: egspo vs TRL GRPOTrainer\n\nnew RL rows"
    gpu = "## 5. GPU: new\n\ngpu rows"
    bench.write_output(path, "# Benchmarks\n\nLast produced by `new`.", [new_rl, gpu])
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nLast produced by `new`.\n\n## 1. Fused: old table\n\nfused rows")
    assert "old RL rows" not in text
    assert text.index("fused rows") < text.index("new RL rows") < text.index("gpu rows")
    assert text.endswith("gpu rows\n\n" + notes)
    bench.write_output(path, "# Benchmarks", [gpu], keep_others=False)  # --replace-all
    assert path.read_text() == f"# Benchmarks\n\n{gpu}\n\n{notes}"


def test_the_egspo_internals_the_workers_hook_into_still_exist(tmp_path):
    """`bench_egspo.py`'s "egspo internals" section against src/egspo: where a rename shows first."""
    sft, rl = bench_egspo.egspo_batches("sft", 2, 3), bench_egspo.egspo_batches("rl", 2, 3)
    assert [len(b["expert_prompts"]) for b in sft] == [3, 3] == [len(b["expert_responses"]) for b in sft]
    assert [len(b["prompts"]) for b in rl] == [3, 3] == [len(b["answers"]) for b in rl]
    assert sft[0]["expert_prompts"] != sft[1]["expert_prompts"]
    cli = bench_egspo.egspo_cli(
        bench_egspo.egspo_args(str(tmp_path), "cpu", "--model.sft_iterations=1", "--model.rl_iterations=1")
    )
    module, seen = cli.model, {}
    bench_egspo.wrap_engine(module, lambda engine: seen.setdefault("engine", engine))
    bench_egspo.wrap_rl_update(module, lambda update: seen.setdefault("update", update))
    assert isinstance(seen["engine"], RolloutEngine) and callable(seen["update"])
    loss = PPOClipLoss()
    bench_egspo.set_policy_loss(module, loss)
    assert module.policy_loss is loss
    one = bench_egspo.demonstration_tokens(
        module,
        {
            **sft[0],
            "expert_prompts": sft[0]["expert_prompts"][:1],
            "expert_responses": sft[0]["expert_responses"][:1],
        },
    )
    assert 0 < one < bench_egspo.demonstration_tokens(module, sft[0])
