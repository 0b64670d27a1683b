"""Sections 1, 2, 4 and 5 of BENCHMARKS.md (section 3, the RL comparison, is `bench_rl.py`):

1. the fused log-prob + entropy op and the generation engines, from `bench_fused.py` and
   `bench_generation.py` (their tables as they print them);
2. EGSPO's overhead over GRPO on identical rollouts (`bench_egspo.worker_overhead`);
4. SFT throughput vs TRL's SFTTrainer;
5. on a GPU: generation against the decode roofline, an RL iteration's time split and update MFU.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path

import bench_common
from bench_common import (
    GPU_SHAPES,
    QWEN2_H256,
    QWEN2_QUICK,
    SIDES,
    RLSetup,
    SFTSetup,
    ratio_range,
    run_script,
    run_worker,
    save_model,
)

GPU_SHAPE = "Qwen2.5-1.5B"
GPU_LENGTHS = (512, 1024)
# Dense bf16 peak FLOP/s by device name fragment, for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}  # fmt: skip


# =========================================================================== 1: fused op, generation
def row_fused(args) -> str:
    """`scripts/bench_fused.py` (its quick sizes with `--fused-quick`), its table as is."""
    options = ["--device", args.device] + (["--quick"] if args.quick or args.fused_quick else [])
    return (
        "## 1. Fused log-prob + entropy vs plain full logits\n\n"
        f"From `python scripts/bench_fused.py {' '.join(options)}` (forward + backward, medians of "
        "interleaved repetitions; peak memory of one step in a fresh process).\n\n"
        + run_script("bench_fused.py", *options).strip()
    )


def row_generation(args) -> str:
    """`scripts/bench_generation.py` at its defaults (CPU), its table as is."""
    options = ["--quick"] if args.quick else ["--repeats", str(max(args.repeats, 2))]
    return run_script("bench_generation.py", "--threads", str(bench_common.THREADS), *options).strip()


# =========================================================================== 2: EGSPO vs GRPO
def row_overhead(args) -> str:
    """EGSPO vs GRPO on identical rollouts (`bench_egspo.worker_overhead`): whole iterations and the gate."""
    spec = {
        "kind": "overhead",
        "pairs": 2 if args.quick else 10,
        "prompts_per_step": 4 if args.quick else 16,
        "max_completion_length": 16 if args.quick else 48,
        "micro_repeats": 5 if args.quick else 30,
        "config": None,
    }
    out = run_worker(spec)
    pair_ratios = [e / g for e, g in zip(out["egspo"], out["grpo"], strict=True)]
    ratio = statistics.median(pair_ratios)
    iteration = statistics.median(out["grpo"])
    gate_share = (out["loss_egspo"] - out["loss_grpo"]) / iteration
    lines = [
        "## 2. EGSPO's overhead over GRPO (whole RL iteration, demo model)",
        "",
        f"Demo model (configs/demo.yaml), {spec['prompts_per_step']} prompts x 8 samples, "
        f"max_completion_length={spec['max_completion_length']}, {spec['pairs']} ABBA pairs after a warm-up of "
        "each, every iteration from the same weights, optimizer state, prompts and RNG seed "
        f"(identical rollouts: {out['identical_rollouts']}, {out['tokens']} completion tokens each).",
        "",
        "| measure | EGSPO | GRPO | EGSPO / GRPO |",
        "|---|---|---|---|",
        f"| RL iteration, median of pair ratios | | | **{ratio:.3f}** |",
    ]
    for key in sorted(out["phases"]["grpo"]):
        e, g = out["phases"]["egspo"].get(key), out["phases"]["grpo"][key]
        if e is not None and g:
            lines.append(
                f"| {key}, share of the median GRPO iteration | {e / iteration:.1%} | {g / iteration:.1%} | {e / g:.3f} |"
            )
    lines += [
        f"| gate threshold + loss fwd/bwd (isolated, interleaved), share of one iteration | "
        f"{out['loss_egspo'] / iteration:.3%} | {out['loss_grpo'] / iteration:.3%} | difference {gate_share:+.3%} |",
        "",
        f"Target: EGSPO costs at most 1% more than GRPO. Isolated cost of the gate: {gate_share:+.3%} of an "
        f"iteration; whole-iteration ratio {ratio:.3f} (within the noise of this machine when |ratio - 1| is "
        f"below the spread of the pair ratios: {ratio_range(pair_ratios)}).",
    ]
    return "\n".join(lines)


# =========================================================================== 4: SFT vs TRL
def row_sft(args) -> str:
    """egspo's SFT warm-up vs TRL's SFTTrainer on the same saved model and demonstrations, ABBA."""
    setup = SFTSetup(batch_size=8, rounds=2) if args.quick else SFTSetup()
    model_dir = Path(tempfile.mkdtemp()) / "sft-model"
    save_model(QWEN2_QUICK if args.quick else QWEN2_H256, model_dir)
    tps: dict[str, list[float]] = {"egspo": [], "trl": []}
    rss: dict[str, list[float]] = {"egspo": [], "trl": []}
    for r in range(args.repeats):
        for name in ("egspo", "trl") if r % 2 == 0 else ("trl", "egspo"):
            out = run_worker({"kind": f"{name}_sft", "model": str(model_dir), "setup": asdict(setup)})
            tps[name].append(out["tokens"] / out["seconds"])
            rss[name].append(out["peak_rss_mb"])
    ratios = [a / b for a, b in zip(tps["egspo"], tps["trl"], strict=True)]
    ratio = statistics.median(ratios)
    return "\n".join(
        [
            "## 4. SFT throughput: egspo vs TRL SFTTrainer",
            "",
            f"A random-weight Qwen2 ({QWEN2_QUICK if args.quick else QWEN2_H256}, no stop feature); the same "
            "synthetic demonstrations in the same "
            "order (TRL: prompt-completion dataset of the same formatted prompts, sequential sampler), "
            f"batch {setup.batch_size}, no packing, padding to the longest in the batch, loss on the completion "
            f"only, max_length={setup.max_length}, AdamW lr 1e-5, fp32, sdpa. {setup.warmup} untimed then "
            f"{setup.rounds} timed steps per fresh process, ABBA, {args.repeats} repetitions.",
            "",
            "| side | tokens/s (prompt + response, no padding) (median) | peak RSS MB (median) |",
            "|---|---|---|",
            *(
                f"| {n} | {statistics.median(tps[n]):.0f} | {statistics.median(rss[n]):.0f} |"
                for n in ("egspo", "trl")
            ),
            f"| **egspo / trl** | **{ratio:.2f}x** ({ratio_range(ratios)}) | |",
            "",
            f"Target: at least parity. Measured: {ratio:.2f}x ({'met' if ratio >= 1.0 else 'missed'}).",
        ]
    )


# =========================================================================== 5: GPU
def update_mfu(out: dict, shape: dict) -> float | None:
    """Model FLOPs utilisation of the update: 6 x decoder parameters x attended tokens, plus the
    (tied) lm_head on completion tokens only, over the device's dense bf16 peak."""
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in out["device_name"]), None)
    if peak is None:
        return None
    head = shape["vocab_size"] * shape["hidden_size"]
    rounds = out["rounds"]
    attended = statistics.median(r["attended"] for r in rounds)
    completion = statistics.median(r["tokens"] for r in rounds)
    flops = 6 * ((out["params"] - head) * attended + head * completion)
    return flops / statistics.median(r["update_s"] for r in rounds) / peak


def row_gpu(args) -> str:
    """Generation engines against the decode roofline, then an RL iteration's split and MFU (GPU only)."""
    import torch

    lines = [
        f"## 5. GPU: {GPU_SHAPE} shape, random weights, bf16",
        "",
        "Generation: `scripts/bench_generation.py` (16 prompts x 8 samples, stop probability 2 / length "
        "per token, bf16 weights): HF generate vs SharedPrefillEngine vs continuous batching, against the "
        "decode roofline (memory bandwidth / the bytes decoding must read: the weights once per step, each "
        "live row's KV cache). RL iteration: the egspo CLI with SharedPrefillEngine, fp32 master weights "
        "and bf16 autocast, GRPO clipped loss, one update per round (no stop feature: random weights).",
        "",
    ]
    if args.device != "cuda" or not torch.cuda.is_available():
        lines += [
            "| completion tokens | generation | RL iteration split | update MFU |",
            "|---|---|---|---|",
            *(f"| {n} | not measured (no GPU in this run) | | |" for n in GPU_LENGTHS),
        ]
        return "\n".join(lines)
    for length in GPU_LENGTHS:
        options = [
            *("--device", "cuda", "--dtype", "bfloat16", "--shape", GPU_SHAPE, "--engines", "hf,shared,cb"),
            *("--max-new-tokens", str(length), "--stop-prob", f"{2 / length:.5f}"),
            *("--repeats", "2" if args.quick else "4"),
        ]
        lines += [run_script("bench_generation.py", *options).strip(), ""]
    lines += [
        "| completion tokens | generation s | update s | round s | update MFU | peak GB |",
        "|---|---|---|---|---|---|",
    ]
    shape = GPU_SHAPES[GPU_SHAPE]
    for length in GPU_LENGTHS:
        setup = RLSetup(max_completion_length=length, rounds=1 if args.quick else 3)
        spec = {"kind": "egspo_rl", "shape": shape, "device": "cuda", "engine": SIDES["egspo"][2]}
        # 128 sequences of up to ~1200 tokens do not fit one backward: micro-batches of 8192 tokens.
        spec["extra"] = ["--model.update.ppo_max_token_len_per_gpu=8192"]
        out = run_worker({**spec, "setup": asdict(setup)})
        mfu = update_mfu(out, shape)

        def med(key: str, rounds: list[dict] = out["rounds"]) -> float:
            return statistics.median(r[key] for r in rounds)

        lines.append(
            f"| {length} | {med('generation_s'):.1f} | {med('update_s'):.1f} | {med('seconds'):.1f} | "
            f"{'n/a' if mfu is None else f'{mfu:.1%}'} | {out['peak_gpu_gb']:.1f} |"
        )
    lines.append(f"\nDevice: {out['device_name']}.")
    return "\n".join(lines)
