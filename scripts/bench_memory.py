"""Peak memory of one RL update vs the mini-batch size, with and without a micro-batch token budget.

`model.update.ppo_max_token_len_per_gpu` packs each mini-batch into micro-batches of at most that
many tokens whose gradients accumulate to the mini-batch's (tests/unit/test_update.py checks they are
equal). Activations then scale with the budget, not with the mini-batch: this script measures it.

Each case is one `PolicyUpdate.rl_iteration` (one optimizer step on a mini-batch of N sequences,
EGSPO loss, SGD so that no optimizer state hides the activations) on a random-weight Qwen2, in a
fresh process:
- CPU: the peak resident set size of that process (`resource.getrusage`), and how much it rose
  during the update over the RSS after the model was built ("update MB");
- CUDA (`--device cuda`): `torch.cuda.max_memory_allocated` during the update, weights included.

With the budget, peak memory stays about flat as N grows; without it, it grows with N.

    python scripts/bench_memory.py                      # CPU defaults: about 5 minutes on 2 cores
    python scripts/bench_memory.py --quick              # seconds: a smoke test
    python scripts/bench_memory.py --device cuda --hidden 512 --layers 8 --seq-len 512 --budget 2048
    python scripts/bench_memory.py --append BENCHMARKS.md   # add the table at the end of the file
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import package_version  # shared with the other benchmarks

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- one case, in its own process
def model_config(args: argparse.Namespace) -> dict:
    """A Qwen2 of the requested size (random weights, tied embeddings like the small Qwen2.5s)."""
    heads = max(args.hidden // 64, 1)
    return {
        "model_type": "qwen2",
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 11 // 4,
        "num_hidden_layers": args.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(heads // 2, 1),
        "vocab_size": args.vocab,
        "max_position_embeddings": max(args.seq_len, 64),
        "tie_word_embeddings": True,
    }


def synthetic_experience(n: int, seq_len: int, vocab: int, device: str, seed: int = 0):
    """N rollouts of about `seq_len` tokens: a quarter prompt, completions of 1/2 to all of the rest."""
    import torch

    from egspo.rollout.experience import Experience

    g = torch.Generator().manual_seed(seed)
    prompt = max(seq_len // 4, 1)
    width = seq_len - prompt
    lengths = torch.randint(width // 2, width + 1, (n,), generator=g)
    completion_mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    ids = torch.randint(0, vocab, (n, prompt + width), generator=g)
    attention = torch.cat([torch.ones(n, prompt), completion_mask], dim=1).long()
    rewards = torch.randint(0, 2, (n,), generator=g).float()
    experience = Experience(
        input_ids=ids,
        attention_mask=attention,
        completion_mask=completion_mask,
        entropy=torch.rand(n, width, generator=g) * 3 * completion_mask,
        advantages=rewards - rewards.mean(),
        rewards=rewards,
        truncated=lengths == width,
        prompt_length=prompt,
    )
    return experience, int(attention.sum())


def run_case(spec: dict) -> dict:
    """Build the model, then one RL update; its peak memory (run in a fresh process per case)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from egspo.config import UpdateConfig
    from egspo.losses import EGSPOLoss, NLLLoss
    from egspo.update import PolicyUpdate

    device = spec["device"]
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    config = AutoConfig.for_model(**spec["model"])
    policy = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    experience, tokens = synthetic_experience(spec["n"], spec["seq_len"], config.vocab_size, device)
    experience = experience.select(torch.arange(spec["n"]))  # on the device, trimmed as the update does
    loss = EGSPOLoss()
    loss.setup(vocab_size=config.vocab_size, max_completion_length=spec["seq_len"])
    threshold = loss.prepare(experience.entropy[experience.loss_mask.bool()])
    update = PolicyUpdate(
        loss,
        NLLLoss(),
        NLLLoss(),
        UpdateConfig(ppo_max_token_len_per_gpu=spec["budget"]),
        temperature=1.0,
    )
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-6)
    micro = len(experience.microbatches(spec["budget"]))

    before = _rss_mb()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    start = time.perf_counter()
    [step] = update.rl_update(policy, optimizer, experience, threshold=threshold)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "n": spec["n"],
        "budget": spec["budget"],
        "tokens": tokens,
        "micro_batches": micro,
        "peak_mb": peak,
        "update_mb": peak - before,
        "seconds": time.perf_counter() - start,
        "loss": step["loss"],
    }


def _rss_mb() -> float:
    """Current resident set size (MB), from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------------- the driver
def measure(args: argparse.Namespace) -> list[dict]:
    """Every (mini-batch size, budget) case in its own process, the no-budget and budget runs
    of one size side by side."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    results = []
    for n in args.sizes:
        for budget in (None, args.budget):
            spec = {
                "device": args.device,
                "threads": args.threads,
                "model": model_config(args),
                "n": n,
                "seq_len": args.seq_len,
                "budget": budget,
            }
            print(f"mini-batch {n}, budget {budget} ...", file=sys.stderr, flush=True)
            done = subprocess.run(
                [sys.executable, __file__, "--_worker", json.dumps(spec)],
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(f"case n={n}, budget={budget} failed:\n{done.stderr[-4000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def table(args: argparse.Namespace, results: list[dict], seconds: float) -> str:
    """The markdown section: peak MB and ratio to the smallest mini-batch, per mode."""
    by = {(r["n"], r["budget"]): r for r in results}
    smallest = min(args.sizes)
    what = "peak RSS of the process" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    command = "python scripts/bench_memory.py " + " ".join(sys.argv[1:])
    lines = [
        f"## Peak memory of one RL update vs mini-batch size ({args.device})",
        "",
        f"From `{command}` ({seconds / 60:.1f} minutes). Machine: {machine(args)}.",
        "",
        f"Random-weight Qwen2 {json.dumps(model_config(args))}; sequences of about {args.seq_len} "
        "tokens (a quarter prompt, completions of half to all of the rest); one "
        "`PolicyUpdate.rl_iteration` = one optimizer step (EGSPO loss, SGD: no optimizer state) on "
        f"the whole mini-batch; each case in a fresh process. Peak: {what}"
        + (
            "; update MB: its rise during the update over the RSS after the model was built"
            if args.device == "cpu"
            else ""
        )
        + ".",
        "",
        f"| mini-batch (sequences) | tokens | no budget: peak MB | ratio | budget {args.budget} tokens: "
        "peak MB | ratio | micro-batches | update MB, no budget / budget |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in args.sizes:
        free, packed = by[(n, None)], by[(n, args.budget)]
        lines.append(
            f"| {n} | {free['tokens']} | {free['peak_mb']:.0f} | "
            f"{free['peak_mb'] / by[(smallest, None)]['peak_mb']:.2f}x | {packed['peak_mb']:.0f} | "
            f"{packed['peak_mb'] / by[(smallest, args.budget)]['peak_mb']:.2f}x | "
            f"{packed['micro_batches']} | {free['update_mb']:.0f} / {packed['update_mb']:.0f} |"
        )
    largest = max(args.sizes)
    growth_free = by[(largest, None)]["peak_mb"] / by[(smallest, None)]["peak_mb"]
    growth_packed = by[(largest, args.budget)]["peak_mb"] / by[(smallest, args.budget)]["peak_mb"]
    lines += [
        "",
        f"From {smallest} to {largest} sequences per mini-batch, peak memory grows {growth_free:.2f}x "
        f"without a budget and {growth_packed:.2f}x with `ppo_max_token_len_per_gpu={args.budget}` "
        "(the accumulated gradient is the single-pass one: tests/unit/test_update.py).",
    ]
    return "\n".join(lines) + "\n"


def machine(args: argparse.Namespace) -> str:
    where = f"{os.cpu_count()} cores, {args.threads or 'default'} thread(s) per case"
    if args.device == "cuda":
        import torch

        where = torch.cuda.get_device_name(0)
    return (
        f"{where}, load average {os.getloadavg()[0]:.1f} at the start; Python {platform.python_version()}, "
        f"torch {package_version('torch')}, transformers {package_version('transformers')}; "
        f"{datetime.date.today().isoformat()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a tiny model and short sequences: seconds")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence, prompt included")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64], help="mini-batch sizes")
    parser.add_argument(
        "--budget", type=int, default=1024, help="ppo_max_token_len_per_gpu of the budget runs"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="intra-op threads per case (0: torch's default)"
    )
    parser.add_argument("--output", default=None, help="write the markdown section to this file")
    parser.add_argument("--append", default=None, help="append the markdown section to this file")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        print(json.dumps(run_case(json.loads(args._worker))))
        return
    if args.quick:
        args.hidden, args.layers, args.vocab, args.seq_len = 64, 2, 4096, 64
        args.sizes, args.budget = [4, 8, 16], 128
    if args.budget < args.seq_len:
        parser.error(f"--budget {args.budget} is below --seq-len {args.seq_len}: every row alone exceeds it")
    start = time.perf_counter()
    results = measure(args)
    text = table(args, results, time.perf_counter() - start)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
