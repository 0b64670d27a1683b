"""Benchmark fused chunked log-prob + entropy against the plain full-logits computation.

Both variants compute, for N tokens, the log-prob of the target and the entropy of
softmax(hidden @ W.T / T), then backpropagate a random upstream gradient on the log-probs
to the hidden states and to W. The plain variant materialises [N, V] fp32 logits.

Time: median of interleaved repetitions (fused, plain, fused, plain, ...), reported as the
ratio fused / plain, since absolute times on a shared machine are noise.
Peak memory: one fresh subprocess per variant and case; peak minus the baseline taken after the
inputs exist (CPU: peak RSS, VmHWM after a reset or ru_maxrss; CUDA: max_memory_allocated).

    python scripts/bench_fused.py              # full sizes (minutes on a CPU)
    python scripts/bench_fused.py --quick      # small sizes, seconds
    python scripts/bench_fused.py --output results.md
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from egspo.ops import fused_logprobs_entropy

FULL_CASES = [(4096, 896, 151936), (8192, 896, 32000)]
QUICK_CASES = [(1024, 128, 32000), (2048, 128, 8192)]


def plain_logprobs_entropy(hidden, weight, targets, temperature: float):
    logits = (hidden @ weight.t()).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    logprobs = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


def make_inputs(n: int, d: int, v: int, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(v, d, generator=gen) * d**-0.5).to(device, dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    upstream = torch.randn(n, generator=gen).to(device)
    return hidden, weight, targets, upstream


def step(variant: str, inputs, temperature: float, chunk_size: int | None) -> None:
    hidden, weight, targets, upstream = inputs
    hidden.grad = None
    weight.grad = None
    if variant == "fused":
        kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
        logprobs = fused_logprobs_entropy(hidden, weight, targets, temperature=temperature, **kwargs).logprobs
    else:
        logprobs, _ = plain_logprobs_entropy(hidden, weight, targets, temperature)
    (logprobs * upstream).sum().backward()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_peak(args, case, variant: str) -> float:
    """Peak memory in MB of one forward+backward, in a fresh interpreter."""
    cmd = [
        sys.executable,
        __file__,
        "--_peak",
        variant,
        "--_case",
        ",".join(map(str, case)),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--temperature",
        str(args.temperature),
    ]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_rss_reset_peak() -> int:
    """Current RSS in kB, with the process's peak RSS reset to it where Linux allows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS") or 0
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def cpu_peak_rss() -> int:
    """Peak RSS in kB since the last reset (VmHWM), else since process start (ru_maxrss)."""
    return _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_child(args) -> None:
    n, d, v = map(int, args._case.split(","))
    inputs = make_inputs(n, d, v, args.device, getattr(torch, args.dtype))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(args._peak, inputs, args.temperature, args.chunk_size)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = cpu_rss_reset_peak()
        step(args._peak, inputs, args.temperature, args.chunk_size)
        peak = (cpu_peak_rss() - base) / 1024
    print(json.dumps({"peak_mb": peak}))


def time_ratio(args, case) -> tuple[float, float, float]:
    inputs = make_inputs(*case, args.device, getattr(torch, args.dtype))
    times: dict[str, list[float]] = {"fused": [], "plain": []}
    for variant in times:  # warm-up
        step(variant, inputs, args.temperature, args.chunk_size)
    for _ in range(args.repeats):
        for variant in times:
            sync(args.device)
            t0 = time.perf_counter()
            step(variant, inputs, args.temperature, args.chunk_size)
            sync(args.device)
            times[variant].append(time.perf_counter() - t0)
    fused, plain = statistics.median(times["fused"]), statistics.median(times["plain"])
    return fused / plain, fused, plain


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a sanity check")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the op's default")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per variant")
    parser.add_argument("--output", default=None, help="append the markdown section to this file")
    parser.add_argument("--_peak", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._peak:
        peak_child(args)
        return
    if args.repeats is None:
        args.repeats = 5 if args.quick else 3
    cases = QUICK_CASES if args.quick else FULL_CASES
    threads = torch.get_num_threads()
    lines = [
        f"### fused_logprobs_entropy vs plain ({args.device}, {args.dtype}, {threads} threads, "
        f"T={args.temperature}, chunk_size={args.chunk_size or 'default'})",
        "",
        "| case (N, D, V) | plain peak MB | fused peak MB | memory ratio | time ratio fused/plain |",
        "|---|---|---|---|---|",
    ]
    for case in cases:
        plain_mb = measure_peak(args, case, "plain")
        fused_mb = measure_peak(args, case, "fused")
        ratio, fused_s, plain_s = time_ratio(args, case)
        print(f"{case}: fused {fused_s:.3f}s plain {plain_s:.3f}s (median)", file=sys.stderr)
        lines.append(
            f"| {case} | {plain_mb:.0f} | {fused_mb:.0f} | {plain_mb / max(fused_mb, 1e-9):.1f}x | {ratio:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        with open(args.output, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
