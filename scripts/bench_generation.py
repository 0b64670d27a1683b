"""Generation benchmark: HF generate vs egspo's SharedPrefillEngine (and continuous batching), side by side.

All engines sample the same left-padded prompts of varied lengths with the same sampling
parameters from the same random-weight model in one process; torch is reseeded before every call
(the same seed for every engine in a repeat); the engines alternate (ABBA order) over the
repeats, after one untimed warm-up each. `SharedPrefillEngine` draws `generate`'s noise, so in a
repeat it samples exactly HF generate's completions (reported: identical samples in k of n
repeats); continuous batching draws its own. Completion lengths vary as a trained policy's do: a
forward hook adds a bias to the EOS logit, set so that a sample stops at each step with
probability `--stop-prob` (about geometric lengths; a share of samples reaches the length limit).
Throughput is counted in completion tokens (up to and including EOS) per second. Reported:
tokens/s per engine (median over repeats), the ratio to HF generate of each interleaved pair
(median and range), the mean completion length, the truncated share, the load average before
and after (these machines are shared: ratios measured side by side are what to quote), and on a
GPU the decode roofline: the time to read, at the device's memory bandwidth, what decoding these
completions must read at least (the weights once per step, each live row's KV cache once per step).

    python scripts/bench_generation.py                          # CPU: 16 prompts x 8 samples, 256 tokens
    python scripts/bench_generation.py --quick                  # smoke run (seconds)
    python scripts/bench_generation.py --profile                # where the time goes, per engine
    python scripts/bench_generation.py --device cuda --shape Qwen2.5-1.5B --dtype bfloat16 --max-new-tokens 1024
    python scripts/bench_generation.py --output BENCHMARKS.md   # append the table to BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import GPU_SHAPES, TINY_QWEN2, cpu_name, package_version  # shared with the other benchmarks

from egspo.rollout import (
    ContinuousBatchingEngine,
    HFGenerateEngine,
    RolloutEngine,
    SamplingParams,
    SharedPrefillEngine,
)

SHAPES = {"tiny": {**TINY_QWEN2, "vocab_size": 512}, **GPU_SHAPES}
EOS, PAD = 2, 0
# Memory bandwidth (bytes/s) by device name fragment, first match wins: the decode roofline.
BANDWIDTH = {
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "H200": 4.8e12,
    "A100-SXM4-80GB": 2.04e12,
    "A100 80GB": 1.94e12,
    "A100": 1.56e12,
    "L40S": 0.864e12,
    "A10G": 0.6e12,
    "L4": 0.3e12,
}
ENGINE_NAMES = {
    "hf": "HF generate (`HFGenerateEngine`)",
    "shared": "`SharedPrefillEngine`",
    "cb": "continuous batching (`ContinuousBatchingEngine`)",
}


@dataclass
class Timings:
    """Per engine: one entry per timed repeat."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    mean_length: list[float] = field(default_factory=list)
    truncated: list[float] = field(default_factory=list)
    samples: list[torch.Tensor] = field(default_factory=list)  # each repeat's completions (CPU)
    min_bytes: list[float] = field(default_factory=list)  # what decoding them must read at least

    @property
    def tokens_per_s(self) -> list[float]:
        return [n / s for n, s in zip(self.tokens, self.seconds, strict=True)]


def build_model(shape: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A random-weight causal LM (seed 0) of the given shape."""
    kwargs = dict(shape)
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **kwargs, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


def make_prompts(
    count: int, min_len: int, max_len: int, vocab: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of lengths uniform in [min_len, max_len], left-padded; no EOS or PAD inside."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=g)
    width = int(lengths.max())
    ids = torch.randint(3, vocab, (count, width), generator=g)
    mask = (torch.arange(width)[None] >= width - lengths[:, None]).long()
    return ids.masked_fill(mask == 0, PAD).to(device), mask.to(device)


def bias_eos(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, stop_prob: float) -> float:
    """Add to the EOS logit the bias that makes P(EOS) about `stop_prob` at each step; returns it.

    Calibrated on the prompts' last positions: bias = log(p / (1 - p)) + mean logsumexp of the
    other logits - mean EOS logit.
    """
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, -1].float()
    others = torch.cat([logits[:, :EOS], logits[:, EOS + 1 :]], dim=1).logsumexp(-1)
    bias = float(torch.tensor(stop_prob / (1 - stop_prob)).log() + (others - logits[:, EOS]).mean())
    head = model.get_output_embeddings()

    def add_bias(_module, _inputs, output):
        output[..., EOS] += bias
        return output

    head.register_forward_hook(add_bias)
    return bias


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decode_bytes(
    model: torch.nn.Module, prompt_mask: torch.Tensor, lengths: torch.Tensor, samples: int
) -> float:
    """The least a decoder must read to generate completions of `lengths`, one step per token.

    Each step reads every weight once (shared by the rows stepped together) and each live row's
    KV cache (its real prompt tokens and the tokens generated so far); prefill is not counted.
    """
    config = model.config
    weights = sum(
        p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values()
    )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    kv_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * element
    prompt = prompt_mask.sum(1).repeat_interleave(samples).double().cpu()
    c = lengths.double().cpu()
    # Sum over a row's steps t = 0 .. c - 1 of (prompt + t) cached tokens.
    kv_tokens = float((prompt * c + c * (c - 1) / 2).sum())
    return float(lengths.max()) * weights + kv_tokens * kv_per_token


def run_once(
    engine: RolloutEngine, model, prompts, params: SamplingParams, device: str, seed: int, out: Timings | None
) -> float:
    """One timed call from `seed`; its figures go to `out` (None: a warm-up)."""
    torch.manual_seed(seed)
    sync(device)
    start = time.perf_counter()
    rollout = engine.generate(model, *prompts, params)
    sync(device)
    seconds = time.perf_counter() - start
    if out is not None:
        lengths = rollout.completion_mask.sum(1)
        out.seconds.append(seconds)
        out.tokens.append(int(lengths.sum()))
        out.mean_length.append(float(lengths.float().mean()))
        out.truncated.append(float(rollout.truncated.float().mean()))
        out.samples.append(rollout.input_ids.cpu())
        out.min_bytes.append(decode_bytes(model, prompts[1], lengths, params.num_samples))
    return seconds


def profile(engines: dict[str, RolloutEngine], model, prompts, params: SamplingParams, device: str) -> None:
    """cProfile (Python view) and torch.profiler (operator view) of one call of each engine."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for name, engine in engines.items():
        profiler = cProfile.Profile()
        torch.manual_seed(0)
        profiler.enable()
        engine.generate(model, *prompts, params)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        print(f"\n===== {name}: cProfile, top 15 by own time =====\n{text.getvalue()}")
        torch.manual_seed(0)
        with torch_profile(activities=activities) as prof:
            engine.generate(model, *prompts, params)
            sync(device)
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(f"===== {name}: torch.profiler, top 15 operators =====")
        print(prof.key_averages().table(sort_by=sort, row_limit=15))


def versions() -> str:
    v = package_version
    return f"Python {platform.python_version()}; torch {v('torch')}, transformers {v('transformers')}"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


def roofline(device: str, t: Timings) -> tuple[float, float] | None:
    """Roofline tokens/s of an engine's repeats (median), and the share of it reached; None off GPU."""
    name = device_name(device)
    bandwidth = next((v for k, v in BANDWIDTH.items() if k in name), None) if device == "cuda" else None
    if bandwidth is None:
        return None
    bound = statistics.median(n * bandwidth / b for n, b in zip(t.tokens, t.min_bytes, strict=True))
    return bound, statistics.median(t.tokens_per_s) / bound


def report(args, results: dict[str, Timings], bias: float, loads: tuple[float, float]) -> str:
    command = "python scripts/bench_generation.py " + " ".join(sys.argv[1:])
    shape = SHAPES[args.shape]
    threads = f", {torch.get_num_threads()} intra-op thread(s)" if args.device == "cpu" else ""
    hf = results["hf"]
    lines = [
        f"## Generation: SharedPrefillEngine vs HF generate ({args.device}, {args.shape}, {args.dtype})",
        "",
        f"From `{command}` on {device_name(args.device)}, {os.cpu_count()} cores{threads}; load average "
        f"{loads[0]:.1f} before, {loads[1]:.1f} after; {versions()}; {datetime.date.today().isoformat()}.",
        "",
        f"Random-weight model {json.dumps(shape)}; {args.prompts} prompts (lengths {args.min_prompt}-"
        f"{args.max_prompt} tokens, left-padded) x {args.samples} samples, max_new_tokens={args.max_new_tokens}, "
        f"temperature {args.temperature}, no top-k/top-p; EOS logit biased by {bias:+.2f} for a stop "
        f"probability of about {args.stop_prob} per token; {args.repeats} interleaved repeats (ABBA) after "
        "one warm-up per engine, torch reseeded (the same seed for every engine) before every call. Decode "
        "roofline (GPU): completion tokens / (bytes the decode steps must read / memory bandwidth).",
        "",
        "| engine | completion tokens/s (median) | s per call (median) | mean completion length | truncated "
        "| samples identical to HF generate's | decode roofline tokens/s (reached) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, t in results.items():
        same = sum(torch.equal(a, b) for a, b in zip(t.samples, hf.samples, strict=True))
        bound = roofline(args.device, t)
        lines.append(
            f"| {ENGINE_NAMES[key]} | {statistics.median(t.tokens_per_s):.0f} | "
            f"{statistics.median(t.seconds):.2f} | {statistics.mean(t.mean_length):.1f} | "
            f"{statistics.mean(t.truncated):.0%} | {same} of {len(t.samples)} | "
            f"{f'{bound[0]:.0f} ({bound[1]:.0%})' if bound else 'n/a'} |"
        )
    ratios = {
        key: [a / b for a, b in zip(t.tokens_per_s, hf.tokens_per_s, strict=True)]
        for key, t in results.items()
        if key != "hf"
    }
    for key, pairs in ratios.items():
        lines.append(
            f"| **{ENGINE_NAMES[key]} / HF generate** | **{statistics.median(pairs):.2f}x** "
            f"(pairs {min(pairs):.2f} to {max(pairs):.2f}: {', '.join(f'{p:.2f}' for p in pairs)}) | | | | | |"
        )
    lines += [
        "",
        "Target (CPU, 256 new tokens, 8 samples per prompt, varied lengths): SharedPrefillEngine at least "
        f"1.5x HF generate. Measured here: {statistics.median(ratios['shared']):.2f}x.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--min-prompt", type=int, default=24, help="shortest prompt, tokens")
    parser.add_argument("--max-prompt", type=int, default=128, help="longest prompt, tokens")
    parser.add_argument(
        "--stop-prob", type=float, default=0.01, help="per-token EOS probability to calibrate"
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=6, help="timed calls per engine, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (0: torch default)")
    parser.add_argument("--engines", default=None, help="comma-separated subset of hf,shared,cb")
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repeats: a smoke run")
    parser.add_argument("--profile", action="store_true", help="profile one call per engine, then stop")
    parser.add_argument("--output", default=None, help="append the markdown section to this file")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.samples, args.max_new_tokens, args.repeats = 4, 4, 48, 2
        args.min_prompt, args.max_prompt, args.stop_prob = 8, 32, 0.04
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    keys = (args.engines or ("hf,shared,cb" if args.device == "cuda" else "hf,shared")).split(",")
    engines: dict[str, RolloutEngine] = {
        "hf": HFGenerateEngine(),
        "shared": SharedPrefillEngine(),
        "cb": ContinuousBatchingEngine(),
    }
    engines = {k: engines[k] for k in keys}
    if "hf" not in engines or "shared" not in engines:
        parser.error("--engines must include hf and shared (the ratio is shared / hf)")

    loads = [os.getloadavg()[0]]
    model = build_model(SHAPES[args.shape], getattr(torch, args.dtype), args.device)
    prompts = make_prompts(
        args.prompts, args.min_prompt, args.max_prompt, model.config.vocab_size, args.device
    )
    bias = bias_eos(model, *prompts, args.stop_prob)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        num_samples=args.samples,
        temperature=args.temperature,
        stop_token_ids=(EOS,),
        pad_token_id=PAD,
    )
    if args.profile:
        profile(engines, model, prompts, params, args.device)
        return
    results = {key: Timings() for key in engines}
    for key, engine in engines.items():  # warm-up: first-call costs (allocator, lazy imports) untimed
        print(
            f"warm-up {key}: {run_once(engine, model, prompts, params, args.device, 0, None):.2f} s",
            file=sys.stderr,
        )
    for r in range(args.repeats):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        for key in order:
            seconds = run_once(engines[key], model, prompts, params, args.device, 100 + r, results[key])
            t = results[key]
            print(
                f"repeat {r} {key}: {seconds:.2f} s, {t.tokens[-1]} tokens, {t.tokens_per_s[-1]:.0f} tok/s, "
                f"mean length {t.mean_length[-1]:.1f}",
                file=sys.stderr,
            )
    loads.append(os.getloadavg()[0])
    text = report(args, results, bias, tuple(loads))
    print(text)
    if args.output:
        path = Path(args.output)
        old = path.read_text() if path.exists() else ""
        path.write_text(old.rstrip("\n") + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
