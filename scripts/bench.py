"""Benchmarks of egspo: fused op, EGSPO's overhead over GRPO, RL and SFT throughput vs TRL, GPU split.

Rows (each written as a table of BENCHMARKS.md):

1. fused log-prob + entropy vs the plain full-logits computation: `scripts/bench_fused.py`, run as is.
2. EGSPO vs GRPO: one Lightning `fit` on the demo model whose iterations alternate the two losses
   (ABBA order) from the same weights, prompts and RNG seed, so rollouts are identical and only the
   loss differs. Reported: median ratio of whole RL iterations (generation, rewards, scoring,
   update), and the isolated gate + loss cost (interleaved micro-benchmark) as a share of one.
3. RL throughput vs TRL `GRPOTrainer`: the same tiny Qwen2 model (same weights from one saved
   directory), tokenizer, prompts, sampling, batch and reward; each side runs k iterations after a
   warm-up in its own fresh subprocess, sides alternate (ABBA), repeated. Completion tokens per
   second of steady-state iterations; peak RSS of each subprocess.
4. SFT throughput vs TRL `SFTTrainer`: same model, same demonstrations in the same order, same batch.
5. GPU (`--device cuda`): Qwen2.5-0.5B- and 1.5B-shaped random-weight models in bf16, with and
   without LoRA: time split of an RL iteration, update-phase MFU, generation tokens/s, peak memory.

Timings are medians of interleaved repetitions and are reported as ratios: the machines this runs
on are shared and noisy, absolute CPU times mean little.

    pip install -e ".[bench]"
    python scripts/bench.py --quick                 # CI-speed sanity check (about two minutes)
    python scripts/bench.py --output BENCHMARKS.md  # full CPU rows (tens of minutes on 2 cores)
    python scripts/bench.py --device cuda --rows gpu --output BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("fused", "overhead", "grpo", "sft", "gpu")
# Hand-written notes (profiles, fixes) from this heading on survive a rewrite of the tables.
NOTES_MARKER = "## Where the time goes"

# The model of rows 3 and 4: a tiny Qwen2, built from its config with seed 0.
TINY_QWEN2 = {
    "model_type": "qwen2",
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}
QUICK_QWEN2 = {**TINY_QWEN2, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
# GPU rows: the shapes of Qwen2.5-0.5B and Qwen2.5-1.5B, random weights.
GPU_SHAPES = {
    "Qwen2.5-0.5B": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
    "Qwen2.5-1.5B": {
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
}
# Dense bf16 peak FLOP/s by device name fragment, for MFU.
# Intra-op threads of every worker (0: torch's default). One thread by default: on a shared machine,
# multi-threaded ops wait for descheduled threads and timings turn into scheduler noise.
THREADS = 1
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


@dataclass
class RLSetup:
    """One RL configuration, shared by both sides of a comparison."""

    prompts_per_step: int = 16
    num_generations: int = 8
    max_completion_length: int = 64
    max_prompt_length: int = 128
    learning_rate: float = 1e-6
    warmup: int = 1  # iterations before the timed ones
    iterations: int = 2  # timed iterations per subprocess


@dataclass
class SFTSetup:
    batch_size: int = 32
    max_length: int = 256
    learning_rate: float = 1e-5
    warmup: int = 1
    iterations: int = 5


# --------------------------------------------------------------------------- measuring helpers
def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def worker_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if THREADS:
        env["OMP_NUM_THREADS"] = str(THREADS)
    return env


def run_worker(spec: dict) -> dict:
    """Run one case in a fresh interpreter; its last stdout line is a JSON result."""
    env = worker_env()
    env.setdefault("PYTHONWARNINGS", "ignore")
    proc = subprocess.run(
        [sys.executable, __file__, "--_worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['kind']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def save_model(config: dict, path: Path) -> None:
    """A random-weight causal LM (seed 0) for the synthetic tokenizer, saved for both sides."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from egspo.data import synthetic_tokenizer

    tokenizer = synthetic_tokenizer()
    kwargs = dict(config)
    model_type = kwargs.pop("model_type")
    kwargs.setdefault("vocab_size", len(tokenizer))
    cfg = AutoConfig.for_model(
        model_type,
        **kwargs,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def interleaved(cases: list[tuple[str, dict]], repeats: int) -> dict[str, list[dict]]:
    """Run every case `repeats` times, alternating the order (ABBA) so drifts cancel out."""
    results: dict[str, list[dict]] = {name: [] for name, _ in cases}
    for r in range(repeats):
        order = cases if r % 2 == 0 else cases[::-1]
        for name, spec in order:
            out = run_worker(spec)
            print(f"  {name} #{r}: {json.dumps(out)}", file=sys.stderr)
            results[name].append(out)
    return results


# --------------------------------------------------------------------------- egspo through its CLI
def egspo_cli(args: list[str]):
    from egspo.cli import run

    return run(args, run=False)


def egspo_args(policy: list[str], device: str, root: str, *extra: str) -> list[str]:
    """Demo config, with everything that is not training switched off."""
    accelerator = "cuda" if device == "cuda" else "cpu"
    return [
        "--config",
        str(ROOT / "configs/demo.yaml"),
        f"--trainer.default_root_dir={root}",
        f"--trainer.accelerator={accelerator}",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks=[]",
        "--trainer.limit_val_batches=0",
        "--model.update.rl_learning_rate=null",
        "--model.optimizer.init_args.weight_decay=0.0",
        *policy,
        *extra,
    ]


def pretrained_policy(path: str) -> list[str]:
    return [
        f"--model.policy.name_or_path={path}",
        "--model.policy.config=null",
        "--model.policy.tokenizer=synthetic",
        "--model.policy.attn_implementation=sdpa",
    ]


def rl_args(setup: RLSetup) -> list[str]:
    return [
        f"--model.rollout.num_generations={setup.num_generations}",
        f"--model.rollout.max_completion_length={setup.max_completion_length}",
        f"--model.prompt.max_prompt_length={setup.max_prompt_length}",
        f"--model.optimizer.init_args.lr={setup.learning_rate}",
        f"--data.prompts_per_step={setup.prompts_per_step}",
        "--data.expert_per_step=0",
        "--data.eval_size=1",
    ]


class _IterationClock:
    """Lightning callback: wall time between consecutive iteration ends, and per-phase times."""

    def __init__(self, warmup: int, count_tokens) -> None:
        from lightning.pytorch import Callback

        outer = self

        class _Callback(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                outer.tick(trainer, pl_module, batch)

        self.callback = _Callback()
        self.warmup, self.count_tokens = warmup, count_tokens
        self.last: float | None = None
        self.seconds = 0.0
        self.tokens = 0
        self.phases: dict[str, list[float]] = {}
        self.index = 0

    def tick(self, trainer, pl_module, batch) -> None:
        now = time.perf_counter()
        if self.index > self.warmup and self.last is not None:
            self.seconds += now - self.last
            self.tokens += self.count_tokens(pl_module, batch)
            for key, value in trainer.callback_metrics.items():
                if key.startswith("time/"):
                    self.phases.setdefault(key, []).append(float(value))
        self.index += 1
        self.last = time.perf_counter()


def worker_egspo_rl(spec: dict) -> dict:
    setup = RLSetup(**spec["setup"])
    with tempfile.TemporaryDirectory() as root:
        cli = egspo_cli(
            egspo_args(
                pretrained_policy(spec["model"]),
                "cpu",
                root,
                *rl_args(setup),
                "--model.sft_iterations=0",
                f"--model.rl_iterations={setup.warmup + 1 + setup.iterations}",
            )
        )
        clock = _IterationClock(
            setup.warmup, lambda m, b: int(m.last_experience.completion_mask.sum().item())
        )
        cli.trainer.callbacks.append(clock.callback)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {
        "seconds": clock.seconds,
        "tokens": clock.tokens,
        "peak_rss_mb": peak_rss_mb(),
        "phases": {k: round(statistics.median(v), 4) for k, v in clock.phases.items()},
    }


def worker_egspo_sft(spec: dict) -> dict:
    setup = SFTSetup(**spec["setup"])

    def tokens(module, batch) -> int:
        _ids, mask, _ = module.encode_demonstrations(batch["expert_prompts"], batch["expert_responses"])
        return int(mask.sum().item())

    with tempfile.TemporaryDirectory() as root:
        cli = egspo_cli(
            egspo_args(
                pretrained_policy(spec["model"]),
                "cpu",
                root,
                f"--model.sft_iterations={setup.warmup + 1 + setup.iterations}",
                "--model.rl_iterations=0",
                f"--model.max_sft_length={setup.max_length}",
                f"--model.optimizer.init_args.lr={setup.learning_rate}",
                f"--data.expert_per_step={setup.batch_size}",
                "--data.prompts_per_step=0",
                "--data.eval_size=1",
            )
        )
        clock = _IterationClock(setup.warmup, tokens)
        cli.trainer.callbacks.append(clock.callback)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {"seconds": clock.seconds, "tokens": clock.tokens, "peak_rss_mb": peak_rss_mb()}


def _egspo_batches(kind: str, n: int, per_step: int) -> list[dict]:
    """The first `n` training batches the demo datamodule yields (the order both sides see)."""
    cli = egspo_cli(
        egspo_args(
            [],
            "cpu",
            tempfile.gettempdir(),
            "--model.sft_iterations=0" if kind == "rl" else f"--model.sft_iterations={n}",
            f"--model.rl_iterations={n}" if kind == "rl" else "--model.rl_iterations=0",
            f"--data.prompts_per_step={per_step if kind == 'rl' else 0}",
            f"--data.expert_per_step={per_step if kind == 'sft' else 0}",
            "--data.eval_size=1",
        )
    )
    dm = cli.datamodule
    dm.setup("fit")
    dataset = dm.train_dataset()
    return [dataset[i] for i in range(n)]


class _StepClock:
    """transformers callback: wall time between consecutive optimizer-step ends."""

    def __init__(self, warmup: int) -> None:
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                if outer.index > warmup and outer.last is not None:
                    outer.seconds += now - outer.last
                    outer.timed_steps.append(outer.index)
                outer.index += 1
                outer.last = time.perf_counter()

        self.callback = _Callback()
        self.index = 0
        self.last: float | None = None
        self.seconds = 0.0
        self.timed_steps: list[int] = []


def worker_trl_grpo(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from egspo.data import synthetic_tokenizer
    from egspo.rewards import MathReward

    setup = RLSetup(**spec["setup"])
    steps = setup.warmup + 1 + setup.iterations
    batches = _egspo_batches("rl", steps, setup.prompts_per_step)
    rows = [
        {"prompt": [{"role": "user", "content": q}], "answer": a}
        for b in batches
        for q, a in zip(b["prompts"], b["answers"], strict=True)
    ]
    reward = MathReward()
    tokens_per_step: list[int] = []

    def math_reward(completions, answer, completion_ids, **kwargs) -> list[float]:
        tokens_per_step.append(sum(len(c) for c in completion_ids))
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return reward(texts, answer).rewards.tolist()

    n = setup.prompts_per_step * setup.num_generations
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=setup.num_generations,
        num_iterations=1,
        max_completion_length=setup.max_completion_length,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.2,
        loss_type="dapo",  # token-mean, as egspo's loss_agg_mode default
        scale_rewards="group",
        learning_rate=setup.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=1.0,
        max_steps=steps,
        shuffle_dataset=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        seed=0,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
    )
    tokenizer = synthetic_tokenizer()
    tokenizer.padding_side = "left"
    clock = _StepClock(setup.warmup)
    trainer = GRPOTrainer(
        model=spec["model"],
        reward_funcs=math_reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[clock.callback],
    )
    trainer.train()
    tokens = sum(tokens_per_step[i] for i in clock.timed_steps)
    return {"seconds": clock.seconds, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


def worker_trl_sft(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from egspo.data import format_prompt, synthetic_tokenizer

    setup = SFTSetup(**spec["setup"])
    steps = setup.warmup + 1 + setup.iterations
    batches = _egspo_batches("sft", steps, setup.batch_size)
    tokenizer = synthetic_tokenizer()
    rows = [
        {"prompt": format_prompt(tokenizer, q, instruction=None), "completion": r}
        for b in batches
        for q, r in zip(b["expert_prompts"], b["expert_responses"], strict=True)
    ]
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=setup.batch_size,
        gradient_accumulation_steps=1,
        max_length=setup.max_length,
        packing=False,
        padding_free=False,
        completion_only_loss=True,
        learning_rate=setup.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=1.0,
        max_steps=steps,
        train_sampling_strategy="sequential",
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
    )
    clock = _StepClock(setup.warmup)
    trainer = SFTTrainer(
        model=spec["model"],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[clock.callback],
    )
    trainer.train()
    # Token count of the timed steps: the tokenized examples TRL trained on, without padding.
    data = trainer.train_dataset
    tokens = sum(
        len(data[i]["input_ids"])
        for step in clock.timed_steps
        for i in range(step * setup.batch_size, (step + 1) * setup.batch_size)
    )
    return {"seconds": clock.seconds, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


# --------------------------------------------------------------------------- row 2: EGSPO vs GRPO
def worker_overhead(spec: dict) -> dict:
    """One fit whose iterations alternate EGSPO and GRPO losses (ABBA) from identical state."""
    import torch
    from lightning.pytorch import Callback

    from egspo.losses import EGSPOLoss, EntropyGate, PPOClipLoss

    pairs = spec["pairs"]
    losses = {
        "egspo": EGSPOLoss(clip_low=0.2, clip_high=0.2, gate=EntropyGate(rule="quantile", value=0.8)),
        "grpo": PPOClipLoss(clip_low=0.2, clip_high=0.2),
    }
    order = [name for p in range(pairs) for name in (("egspo", "grpo") if p % 2 == 0 else ("grpo", "egspo"))]
    order = ["egspo", "grpo", *order]  # one warm-up iteration of each
    times: dict[str, list[float]] = {"egspo": [], "grpo": []}
    phases: dict[str, dict[str, list[float]]] = {"egspo": {}, "grpo": {}}
    tokens: list[int] = []

    class Alternate(Callback):
        """Runs before the rollout callback: same weights, prompts and RNG state every iteration."""

        def __init__(self) -> None:
            self.state = self.optim = self.batch = self.experience = None
            self.t0 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.state is None:
                self.state = {k: v.clone() for k, v in pl_module.policy.state_dict().items()}
                self.optim = trainer.optimizers[0].state_dict()
                self.batch = {k: list(v) for k, v in batch.items() if isinstance(v, list)}
            pl_module.policy.load_state_dict(self.state)
            trainer.optimizers[0].load_state_dict(self.optim)
            batch.update({k: list(v) for k, v in self.batch.items()})
            pl_module.policy_loss = losses[order[batch_idx]]
            torch.manual_seed(1234)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            elapsed = time.perf_counter() - self.t0
            if batch_idx < 2:
                return
            name = order[batch_idx]
            times[name].append(elapsed)
            self.experience = batch["experience"]
            tokens.append(int(self.experience.completion_mask.sum().item()))
            for key, value in trainer.callback_metrics.items():
                if key.startswith("time/"):
                    phases[name].setdefault(key, []).append(float(value))

    with tempfile.TemporaryDirectory() as root:
        policy = ["--model.policy.attn_implementation=sdpa"]
        if spec.get("config"):
            policy.append(f"--model.policy.config={json.dumps(spec['config'])}")
        cli = egspo_cli(
            egspo_args(
                policy,
                "cpu",
                root,
                "--model.sft_iterations=0",
                f"--model.rl_iterations={len(order)}",
                f"--model.rollout.max_completion_length={spec['max_completion_length']}",
                f"--data.prompts_per_step={spec['prompts_per_step']}",
                "--data.expert_per_step=0",
                "--data.eval_size=1",
            )
        )
        alternate = Alternate()
        cli.trainer.callbacks.insert(0, alternate)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        micro = _loss_microbench(alternate.experience, losses, spec["micro_repeats"])
    # Every iteration must have produced the same rollout (same tokens), or the comparison is void.
    identical = len(set(tokens)) == 1
    return {
        "egspo": times["egspo"],
        "grpo": times["grpo"],
        "phases": {n: {k: statistics.median(v) for k, v in p.items()} for n, p in phases.items()},
        "identical_rollouts": identical,
        "tokens": tokens[0] if tokens else 0,
        **micro,
    }


def _loss_microbench(exp, losses: dict, repeats: int) -> dict:
    """Gate threshold + loss forward/backward of each loss on the last experience, interleaved."""
    import torch

    from egspo.losses import TokenBatch

    mask = exp.completion_mask
    entropy = exp.entropy
    logits = torch.randn(mask.shape, dtype=torch.float32) * 0.01
    old = torch.randn(mask.shape).mul(0.01).sub(2.0)
    times: dict[str, list[float]] = {k: [] for k in losses}
    for _ in range(repeats + 1):
        for name, loss in losses.items():
            logprobs = (old + logits).requires_grad_(True)
            t0 = time.perf_counter()
            threshold = loss.prepare(entropy[mask.bool()])
            batch = TokenBatch(
                logprobs=logprobs,
                old_logprobs=logprobs.detach(),
                advantages=exp.advantages[:, None].expand_as(logprobs),
                entropy=entropy,
                mask=mask,
                entropy_threshold=threshold,
            )
            loss(batch).loss.backward()
            times[name].append(time.perf_counter() - t0)
    return {f"loss_{k}": statistics.median(v[1:]) for k, v in times.items()}


# --------------------------------------------------------------------------- row 5: GPU
def worker_gpu_rl(spec: dict) -> dict:
    import torch

    setup = RLSetup(**spec["setup"])
    shape = GPU_SHAPES[spec["shape"]]
    policy = [
        f"--model.policy.config={json.dumps(shape)}",
        "--model.policy.tokenizer=synthetic",
        "--model.policy.dtype=bfloat16",
        "--model.policy.attn_implementation=sdpa",
    ]
    if spec["lora"]:
        policy.append("--model.policy.lora={r: 16, alpha: 32}")
    update_tokens: list[tuple[int, int]] = []

    def count(module, batch) -> int:
        exp = module.last_experience
        update_tokens.append((int(exp.attention_mask.sum()), int(exp.completion_mask.sum())))
        return int(exp.completion_mask.sum())

    with tempfile.TemporaryDirectory() as root:
        cli = egspo_cli(
            egspo_args(
                policy,
                "cuda",
                root,
                *rl_args(setup),
                "--trainer.precision=bf16-true",
                "--model.sft_iterations=0",
                f"--model.rl_iterations={setup.warmup + 1 + setup.iterations}",
            )
        )
        clock = _IterationClock(setup.warmup, count)
        cli.trainer.callbacks.append(clock.callback)
        torch.cuda.reset_peak_memory_stats()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        policy_model = cli.model.policy
        hidden, vocab = shape["hidden_size"], shape["vocab_size"]
        n_all = sum(p.numel() for p in policy_model.parameters())
        n_decoder = n_all - vocab * hidden  # tied embeddings: the lm_head is the embedding
        flops_per_token = 4 if spec["lora"] else 6  # no weight gradients of the frozen base with LoRA
    phases = {k: statistics.median(v) for k, v in clock.phases.items()}
    timed = update_tokens[-len(clock.phases.get("time/update", [])) :] if clock.phases else []
    all_tokens = statistics.median(t[0] for t in timed) if timed else 0
    completion = statistics.median(t[1] for t in timed) if timed else 0
    update_flops = flops_per_token * (n_decoder * all_tokens + vocab * hidden * completion)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    update_s = phases.get("time/update", float("nan"))
    return {
        "device_name": name,
        "phases": phases,
        "iteration_s": clock.seconds / max(setup.iterations, 1),
        "generation_tokens_per_s": completion / phases["time/generation"] if completion else 0.0,
        "update_mfu": update_flops / update_s / peak if peak else None,
        "peak_memory_mb": peak_memory_mb("cuda"),
    }


WORKERS = {
    "egspo_rl": worker_egspo_rl,
    "trl_grpo": worker_trl_grpo,
    "egspo_sft": worker_egspo_sft,
    "trl_sft": worker_trl_sft,
    "overhead": worker_overhead,
    "gpu_rl": worker_gpu_rl,
}


# --------------------------------------------------------------------------- rows -> markdown
def row_fused(args) -> str:
    cmd = [sys.executable, str(ROOT / "scripts/bench_fused.py"), "--device", args.device]
    if args.quick or args.fused_quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=worker_env()).stdout
    return (
        "## 1. Fused log-prob + entropy vs plain full logits\n\n"
        f"From `{' '.join(['python', 'scripts/bench_fused.py', *cmd[2:]])}` (forward + backward, "
        "medians of interleaved repetitions; peak memory of one step in a fresh process).\n\n" + out.strip()
    )


def row_overhead(args) -> str:
    spec = {
        "kind": "overhead",
        "pairs": 2 if args.quick else 10,
        "prompts_per_step": 4 if args.quick else 16,
        "max_completion_length": 16 if args.quick else 48,
        "micro_repeats": 5 if args.quick else 30,
        "config": None,
    }
    out = run_worker(spec)
    ratio = median_ratio(out["egspo"], out["grpo"])
    iteration = statistics.median(out["grpo"])
    gate_share = (out["loss_egspo"] - out["loss_grpo"]) / iteration
    rows = [
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
    for key in ("time/generation", "time/reward", "time/scoring", "time/update"):
        e, g = out["phases"]["egspo"].get(key), out["phases"]["grpo"].get(key)
        if e is not None and g is not None:
            rows.append(
                f"| {key}, share of the median GRPO iteration | {e / iteration:.1%} | {g / iteration:.1%} "
                f"| {e / g:.3f} |"
            )
    rows += [
        f"| gate threshold + loss fwd/bwd (isolated, interleaved), share of one iteration | {out['loss_egspo'] / iteration:.3%} | "
        f"{out['loss_grpo'] / iteration:.3%} | difference {gate_share:+.3%} |",
        "",
        f"Target: EGSPO costs at most 1% more than GRPO. Isolated cost of the gate: {gate_share:+.3%} of an "
        f"iteration; whole-iteration ratio {ratio:.3f} (within the noise of this machine when |ratio - 1| is "
        "below the spread of the pair ratios: "
        f"{min(e / g for e, g in zip(out['egspo'], out['grpo'], strict=True)):.3f} to "
        f"{max(e / g for e, g in zip(out['egspo'], out['grpo'], strict=True)):.3f}).",
    ]
    return "\n".join(rows)


def _throughput_table(results: dict[str, list[dict]], a: str, b: str) -> tuple[float, list[str]]:
    tps = {k: [r["tokens"] / r["seconds"] for r in v] for k, v in results.items()}
    ratio = median_ratio(tps[a], tps[b])
    lines = [
        "| side | completion tokens/s (median) | peak RSS MB (median) |",
        "|---|---|---|",
    ]
    for k in (a, b):
        lines.append(
            f"| {k} | {statistics.median(tps[k]):.0f} | {statistics.median(r['peak_rss_mb'] for r in results[k]):.0f} |"
        )
    lines.append(
        f"| **{a} / {b}** | **{ratio:.2f}x** (pairs: {', '.join(f'{x / y:.2f}' for x, y in zip(tps[a], tps[b], strict=True))}) | |"
    )
    return ratio, lines


def row_grpo(args, model_dir: str) -> str:
    setup = RLSetup(prompts_per_step=4, max_completion_length=16, iterations=1) if args.quick else RLSetup()
    repeats = 1 if args.quick else args.repeats
    cases = [
        ("egspo", {"kind": "egspo_rl", "model": model_dir, "setup": asdict(setup)}),
        ("trl", {"kind": "trl_grpo", "model": model_dir, "setup": asdict(setup)}),
    ]
    results = interleaved(cases, repeats)
    ratio, table = _throughput_table(results, "egspo", "trl")
    n = setup.prompts_per_step * setup.num_generations
    return "\n".join(
        [
            "## 3. RL throughput: egspo vs TRL GRPOTrainer",
            "",
            f"Same saved random-weight Qwen2 ({json.dumps(args.model_config)}), synthetic tokenizer, the "
            f"same {setup.prompts_per_step} synthetic prompts per step in the same order, "
            f"num_generations={setup.num_generations} ({n} completions, one optimizer step per generation "
            f"round: TRL per_device_train_batch_size={n}, gradient_accumulation_steps=1, "
            f"steps_per_generation=1, num_iterations=1; egspo ppo_epochs=1, one mini-batch), "
            f"max_completion_length={setup.max_completion_length} with EOS stopping on both, temperature 1.0, "
            "top_p 1, top_k 0, beta=0, clip 0.2/0.2, token-mean loss (TRL loss_type=dapo; egspo EGSPOLoss of the "
            "demo, gate included), group-scaled advantages, MathReward (wrapped as a TRL reward function on "
            "TRL's side), AdamW lr 1e-6 no weight decay, grad-norm clip 1.0, constant LR, fp32, sdpa attention, "
            "no logging/eval/checkpointing. Each side: "
            f"{setup.warmup + 1} untimed then {setup.iterations} timed iterations in a fresh subprocess, sides "
            f"alternating ABBA, {repeats} repetitions; tokens = completion tokens (up to and including EOS) "
            "of the timed iterations.",
            "",
            *table,
            "",
            f"Target: at least 1.3x. Measured: {ratio:.2f}x ({'met' if ratio >= 1.3 else 'missed'}).",
        ]
    ), ratio


def row_sft(args, model_dir: str) -> str:
    setup = SFTSetup(batch_size=8, iterations=2) if args.quick else SFTSetup()
    repeats = 1 if args.quick else args.repeats
    cases = [
        ("egspo", {"kind": "egspo_sft", "model": model_dir, "setup": asdict(setup)}),
        ("trl", {"kind": "trl_sft", "model": model_dir, "setup": asdict(setup)}),
    ]
    results = interleaved(cases, repeats)
    ratio, table = _throughput_table(results, "egspo", "trl")
    table[0] = table[0].replace("completion tokens/s", "tokens/s (prompt + response, no padding)")
    return "\n".join(
        [
            "## 4. SFT throughput: egspo vs TRL SFTTrainer",
            "",
            f"Same model and tokenizer as row 3; the same synthetic demonstrations in the same order "
            f"(TRL: prompt-completion dataset of the same formatted prompts, sequential sampler), "
            f"batch {setup.batch_size}, no packing, padding to the longest in the batch, loss on the completion "
            f"only, max_length={setup.max_length}, AdamW lr 1e-5, fp32, sdpa. {setup.warmup + 1} untimed "
            f"then {setup.iterations} timed steps per subprocess, ABBA, {repeats} repetitions.",
            "",
            *table,
            "",
            f"Target: at least parity. Measured: {ratio:.2f}x ({'met' if ratio >= 1.0 else 'missed'}).",
        ]
    ), ratio


def row_gpu(args) -> str:
    head = [
        "## 5. GPU: time split of an RL iteration (bf16, random weights)",
        "",
        "16 prompts x 8 samples, max_completion_length=256 (EOS stopping), EGSPO loss, one update per "
        "rollout batch. MFU of the update phase counts 6 (LoRA: 4) x decoder params x all tokens + the lm_head "
        "on completion tokens only, over the dense bf16 peak of the device.",
        "",
        "| model | LoRA | generation | reward | scoring | update | update MFU | generation tok/s | peak GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    import torch

    if args.device != "cuda" or not torch.cuda.is_available():
        for shape in GPU_SHAPES:
            for lora in (False, True):
                head.append(f"| {shape} | {'yes' if lora else 'no'} | not measured (no GPU) | | | | | | |")
        return "\n".join(head)
    setup = RLSetup(max_completion_length=256, iterations=1 if args.quick else 3)
    for shape in GPU_SHAPES:
        for lora in (False, True):
            out = run_worker({"kind": "gpu_rl", "shape": shape, "lora": lora, "setup": asdict(setup)})
            p = out["phases"]
            total = sum(
                p.get(k, 0.0) for k in ("time/generation", "time/reward", "time/scoring", "time/update")
            )
            split = " | ".join(
                f"{p.get(k, 0.0) / total:.0%}"
                for k in ("time/generation", "time/reward", "time/scoring", "time/update")
            )
            mfu = f"{out['update_mfu']:.1%}" if out["update_mfu"] is not None else "n/a"
            head.append(
                f"| {shape} | {'yes' if lora else 'no'} | {split} | {mfu} | "
                f"{out['generation_tokens_per_s']:.0f} | {out['peak_memory_mb'] / 1024:.1f} |"
            )
        head[2] += f" Device: {out['device_name']}."
    return "\n".join(head)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    import torch

    return (
        f"{cpu}, {os.cpu_count()} cores ({THREADS or torch.get_num_threads()} intra-op thread(s) per "
        f"worker), load average {os.getloadavg()[0]:.1f} at the start (shared machine); Python "
        f"{platform.python_version()}; torch {version('torch')}, transformers {version('transformers')}, "
        f"trl {version('trl')}, lightning {version('lightning')}; {datetime.date.today().isoformat()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a sanity check")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--repeats", type=int, default=2, help="subprocess pairs per throughput row")
    parser.add_argument("--fused-quick", action="store_true", help="row 1 at bench_fused.py's quick sizes")
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads per worker (0: torch default)"
    )
    parser.add_argument("--output", default=None, help="write the markdown here (default: stdout only)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        spec = json.loads(args._worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)))
        return
    global THREADS
    THREADS = args.threads if args.device == "cpu" else 0
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {ROWS}")
    args.model_config = QUICK_QWEN2 if args.quick else TINY_QWEN2
    command = "python scripts/bench.py " + " ".join(sys.argv[1:])
    sections = [
        "# Benchmarks",
        "",
        f"Produced by `{command}`.",
        "",
        f"Machine: {machine()}.",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(Path(tmp) / "model")
        if {"grpo", "sft"} & set(rows):
            save_model(args.model_config, Path(model_dir))
        for row in rows:
            print(f"row {row} ...", file=sys.stderr)
            if row == "fused":
                sections += ["", row_fused(args)]
            elif row == "overhead":
                sections += ["", row_overhead(args)]
            elif row == "grpo":
                sections += ["", row_grpo(args, model_dir)[0]]
            elif row == "sft":
                sections += ["", row_sft(args, model_dir)[0]]
            elif row == "gpu":
                sections += ["", row_gpu(args)]
    text = "\n".join(sections) + "\n"
    print(text)
    if args.output:
        path = Path(args.output)
        old = path.read_text() if path.exists() else ""
        notes = old[old.index(NOTES_MARKER) :] if NOTES_MARKER in old else ""
        path.write_text(text + ("\n" + notes if notes else ""))


if __name__ == "__main__":
    main()
