"""Benchmarks of egspo against plain baselines, measured side by side: the tables of BENCHMARKS.md.

Rows (`--rows`, each a section of BENCHMARKS.md):

1. fused: fused log-prob + entropy vs plain full logits (`scripts/bench_fused.py`, run as is).
2. overhead: EGSPO vs GRPO, one `fit` whose iterations alternate the two losses (ABBA) from the
   same weights, prompts and seed; whole iterations and the isolated gate + loss cost.
3. rl: RL throughput vs TRL `GRPOTrainer` at three sizes (hidden 256 x 4 layers x 64 new tokens,
   512 x 8 x 128, 256 x 4 x 256); egspo with `SharedPrefillEngine` and with HF generate.
   generation: `scripts/bench_generation.py` on CPU (256 new tokens, 16 prompts x 8 samples, varied
   lengths): SharedPrefillEngine vs HF generate on the same samples.
4. sft: SFT throughput vs TRL `SFTTrainer`.
5. gpu (`--device cuda`): Qwen2.5-1.5B-shaped random weights in bf16 at 512 and 1024 new
   tokens: HF generate vs SharedPrefillEngine vs continuous batching against the decode roofline
   (`scripts/bench_generation.py`), and an RL iteration's time split and update MFU.

What makes the RL ratios mean something:

- the same saved random-weight Qwen2 directory, tokenizer, prompts in the same order, sampling
  (temperature 1, no top-k / top-p), max completion length with EOS stopping, fp32, sdpa
  attention, one optimizer step per generation round, a token-mean clipped loss (TRL
  `loss_type="dapo"`; egspo `PPOClipLoss`, clip 0.2 / 0.2, the same surrogate), AdamW lr 1e-6
  without weight decay, grad-norm clip 1, and no gradient checkpointing on either side (TRL's
  default turns it on);
- the same completions: every side reseeds torch right before each generation round
  (`SEED + round`). TRL and egspo's `HFGenerateEngine` both call `generate`, and
  `SharedPrefillEngine` draws `generate`'s noise (`same_draws_as_generate`), so all sides sample
  the same tokens, up to float rounding; each worker reports its completions' digest and token
  count per round, and a repetition whose counts differ by more than 1% is void;
- a fresh process per measurement, sides interleaved (A B C, then C B A), at least 5 repetitions:
  medians and ranges of the per-repetition ratios;
- a quiet machine: the 1-minute load average before and after each repetition (`--max-load`)
  and each worker's CPU share (CPU time / wall time; 1 thread per worker) are recorded; loaded
  repetitions are flagged and left out of the medians.

Lengths (`--lengths`): `limit` samples from the random weights as saved, where almost every
sample runs to the length limit (as in the audit); `varied` gives the saved model a stop feature
(`add_stop_feature`: one constant residual dimension whose lm_head weight raises the EOS logit)
so that each token ends the sample with probability about 2 / max_completion_length, as a
trained policy's lengths vary (about 13% of samples reach the limit). Both sides load the same
weights, so both stop alike.

    pip install -e ".[bench]"
    python scripts/bench.py --quick --output /tmp/BENCHMARKS.quick.md   # smoke run of every CPU row (minutes)
    python scripts/bench.py --rows rl --lengths varied --output BENCHMARKS.md   # about 70 minutes on 2 cores
    python scripts/bench.py --lengths limit,varied --fused-quick --replace-all --output BENCHMARKS.md  # about 3 hours
    python scripts/bench.py --device cuda --rows gpu --output BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("fused", "overhead", "rl", "generation", "sft", "gpu")
# Hand-written notes (profiles, fixes) from this heading on survive a rewrite of the tables.
NOTES_MARKER = "## Where the time goes"
SEED = 1000  # generation round r samples right after torch.manual_seed(SEED + r), on every side
TOKEN_TOLERANCE = 0.01  # completion token counts of the sides may differ by this much
THREADS = 1  # intra-op threads per worker (0: torch's default); set by --threads


def qwen2(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, **extra) -> dict:
    """A Qwen2 config (tied embeddings); the vocabulary is the tokenizer's unless given."""
    return {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        **extra,
    }


QWEN2_H256 = qwen2(256, 1024, 4, 4, 2)
TINY_QWEN2 = QWEN2_H256  # the name other scripts import
QWEN2_H512 = qwen2(512, 2048, 8, 8, 2)
QWEN2_QUICK = qwen2(64, 128, 2, 4, 2)
GPU_SHAPES = {  # the shapes of these checkpoints, random weights
    "Qwen2.5-0.5B": qwen2(896, 4864, 24, 14, 2, vocab_size=151936),
    "Qwen2.5-1.5B": qwen2(1536, 8960, 28, 12, 2, vocab_size=151936),
}
GPU_SHAPE = "Qwen2.5-1.5B"
GPU_LENGTHS = (512, 1024)
# Dense bf16 peak FLOP/s by device name fragment, for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}  # fmt: skip


@dataclass(frozen=True)
class RLCase:
    """One size of the RL comparison."""

    name: str
    shape: dict
    max_completion_length: int

    def describe(self) -> str:
        s = self.shape
        return (
            f"hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, {s['num_attention_heads']} heads "
            f"({s['num_key_value_heads']} KV), {self.max_completion_length} new tokens"
        )


RL_CASES = (
    RLCase("h256-L4-64", QWEN2_H256, 64),
    RLCase("h512-L8-128", QWEN2_H512, 128),
    RLCase("h256-L4-256", QWEN2_H256, 256),
)
QUICK_CASE = RLCase("quick", QWEN2_QUICK, 16)
# The sides of the RL comparison: label, worker, egspo's engine.
SIDES = {
    "egspo": ("egspo, SharedPrefillEngine", "egspo_rl", "egspo.rollout.SharedPrefillEngine"),
    "egspo-hf": ("egspo, HF generate", "egspo_rl", "egspo.rollout.HFGenerateEngine"),
    "trl": ("TRL GRPOTrainer (HF generate)", "trl_grpo", None),
}


@dataclass
class RLSetup:
    """One RL configuration, shared by every side of a comparison."""

    max_completion_length: int = 64
    prompts_per_step: int = 16
    num_generations: int = 8
    max_prompt_length: int = 128
    learning_rate: float = 1e-6
    warmup: int = 1  # untimed rounds first (>= 1: a timed round runs from the previous round's end)
    rounds: int = 1  # timed rounds per worker


@dataclass
class SFTSetup:
    batch_size: int = 32
    max_length: int = 256
    learning_rate: float = 1e-5
    warmup: int = 1
    rounds: int = 5


# =========================================================================== measuring helpers
def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load_average() -> float:
    """The 1-minute load average: runnable processes, ours included (a worker counts about 1)."""
    return os.getloadavg()[0]


def worker_env() -> dict[str, str]:
    """The environment of every child process: offline, `THREADS` intra-op threads."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("PYTHONWARNINGS", "ignore")
    if THREADS:
        env["OMP_NUM_THREADS"] = str(THREADS)
    return env


def run_script(name: str, *args: str) -> str:
    """Run one of the other benchmark scripts; its stdout (a markdown section)."""
    cmd = [sys.executable, str(ROOT / "scripts" / name), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=worker_env()).stdout


def run_worker(spec: dict) -> dict:
    """Run one case in a fresh interpreter; its last stdout line is a JSON result."""
    cmd = [sys.executable, __file__, "--_worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['kind']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def digest(rows: list[list[int]]) -> str:
    """A short fingerprint of token rows: equal digests, equal tokens."""
    h = hashlib.sha1()
    for row in rows:
        h.update(json.dumps(row).encode())
    return h.hexdigest()[:12]


def ratio_range(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "n/a"


# =========================================================================== the saved model
def build_model(shape: dict, vocab_size: int, eos: int, pad: int):
    """A random-weight causal LM of `shape` (seed 0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in shape.items() if k != "model_type"}
    kwargs.setdefault("vocab_size", vocab_size)
    config = AutoConfig.for_model(
        shape["model_type"], **kwargs, eos_token_id=eos, pad_token_id=pad, bos_token_id=None
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def add_stop_feature(model, eos: int, stop_prob: float) -> float:
    """Make each token end the sample with probability about `stop_prob`, in the weights themselves.

    Why in the weights: both sides load the same directory, so both stop alike, with no hook that
    one side could run and the other not. How: the last residual dimension j is a constant c at
    every position (every token's embedding has c there and no layer writes to j: the rows j of
    `o_proj` and `down_proj` are zero), so after the final RMSNorm h_j is about constant, and
    the EOS row of the (tied) lm_head gets an extra weight at j: a near-constant EOS logit bias.
    Every other token's logit shifts by the same c * h_j, which changes no probability.
    Calibrated on random token sequences; returns the mean EOS probability measured after.
    """
    import torch

    from egspo.distributed import decoder_layers

    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    j = embed.shape[1] - 1
    with torch.no_grad():
        c = float(embed.std())
        embed[:, j] = c
        if head.data_ptr() != embed.data_ptr():
            head[:, j] = c
        for layer in decoder_layers(model):
            layer.self_attn.o_proj.weight[j] = 0.0
            layer.mlp.down_proj.weight[j] = 0.0

        def stop_logit_and_feature() -> tuple[torch.Tensor, torch.Tensor]:
            ids = torch.randint(3, embed.shape[0], (16, 64), generator=torch.Generator().manual_seed(2))
            hidden = model.get_decoder()(input_ids=ids).last_hidden_state
            logits = model.get_output_embeddings()(hidden).float()
            others = torch.cat([logits[..., :eos], logits[..., eos + 1 :]], dim=-1).logsumexp(-1)
            return logits[..., eos] - others, hidden[..., j].float()

        margin, feature = stop_logit_and_feature()
        target = torch.tensor(stop_prob / (1 - stop_prob)).log()
        head[eos, j] += float((target - margin).mean() / feature.mean())
        margin, _ = stop_logit_and_feature()
    return float(torch.sigmoid(margin).mean())


def save_model(shape: dict, path: Path, stop_prob: float | None = None) -> float | None:
    """Save a random-weight model for the synthetic tokenizer (with a stop feature when asked)."""
    from egspo.data import synthetic_tokenizer

    tokenizer = synthetic_tokenizer()
    model = build_model(shape, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    measured = add_stop_feature(model, tokenizer.eos_token_id, stop_prob) if stop_prob else None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return measured


# =========================================================================== what each RL side records
class RoundLog:
    """Per generation round: the reseed, generation time, tokens, update time, wall time.

    Both sides feed it from the same places (right around sampling, around the update, at the end
    of the optimizer step), so the split means the same on both.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.rounds: list[dict] = []
        self.ends: list[tuple[float, float]] = []  # (wall, process CPU) at each round's end
        self._start = 0.0
        self.update_from: float | None = None

    def before_generation(self) -> None:
        import torch

        torch.manual_seed(SEED + len(self.rounds))
        self._start = time.perf_counter()

    def after_generation(self, end: float, prompts: list[list[int]], completions: list[list[int]]) -> None:
        """Record a round's sampling (`end`: when sampling returned; the bookkeeping is not timed)."""
        self.rounds.append(
            {
                "generation_s": end - self._start,
                "tokens": sum(len(c) for c in completions),
                "digest": digest(completions),
                "prompt_digest": digest(prompts),
            }
        )

    def add_update(self, seconds: float, attended: int | None = None) -> None:
        """The update's time, and the tokens it ran through the decoder (for MFU) when known."""
        self.rounds[-1].update(update_s=seconds, attended=attended)

    def round_end(self) -> None:
        self.ends.append((time.perf_counter(), time.process_time()))

    def result(self) -> dict:
        timed = range(self.warmup, len(self.ends))
        rounds = [{**self.rounds[r], "seconds": self.ends[r][0] - self.ends[r - 1][0]} for r in timed]
        wall = self.ends[-1][0] - self.ends[self.warmup - 1][0]
        cpu = self.ends[-1][1] - self.ends[self.warmup - 1][1]
        return {"rounds": rounds, "cpu_share": cpu / wall, "peak_rss_mb": peak_rss_mb()}


def token_rows(ids, mask) -> list[list[int]]:
    """The tokens of each row where `mask` is set."""
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def completion_rows(completion_ids, stop_ids: list[int]) -> list[list[int]]:
    """Each row's tokens up to and including its first stop token."""
    from egspo.rollout import completion_mask_from_eos

    return token_rows(completion_ids, completion_mask_from_eos(completion_ids, stop_ids)[0])


# =========================================================================== egspo through its CLI
def egspo_cli(args: list[str]):
    from egspo.cli import run

    return run(args, run=False)


def egspo_args(root: str, device: str, *extra: str) -> list[str]:
    """The demo config with everything that is not training switched off, then `extra`."""
    quiet = (
        "--trainer.logger=false --trainer.enable_checkpointing=false --trainer.enable_progress_bar=false "
        "--trainer.enable_model_summary=false --trainer.callbacks=[] --trainer.limit_val_batches=0 "
        "--model.update.rl_learning_rate=null --model.optimizer.init_args.weight_decay=0.0 --data.eval_size=1"
    )
    accelerator = "cuda" if device == "cuda" else "cpu"
    return [
        *("--config", str(ROOT / "configs/demo.yaml"), f"--trainer.default_root_dir={root}"),
        f"--trainer.accelerator={accelerator}",
        *quiet.split(),
        *extra,
    ]


def pretrained_policy(path: str) -> list[str]:
    """The saved model, the synthetic tokenizer, sdpa attention (as TRL loads it)."""
    return [
        f"--model.policy.name_or_path={path}",
        *("--model.policy.config=null", "--model.policy.tokenizer=synthetic"),
        "--model.policy.attn_implementation=sdpa",
    ]


def rl_args(setup: RLSetup, engine: str) -> list[str]:
    """RL only, `setup`'s sizes, GRPO's clipped token-mean loss (TRL's dapo), the given engine."""
    loss = (
        "--model.policy_loss=egspo.losses.PPOClipLoss --model.policy_loss.init_args.clip_low=0.2 "
        "--model.policy_loss.init_args.clip_high=0.2 --model.policy_loss.init_args.loss_agg_mode=token-mean"
    )
    return [
        *("--model.sft_iterations=0", f"--model.rl_iterations={setup.warmup + setup.rounds}"),
        f"--model.rollout.engine={engine}",
        f"--model.rollout.num_generations={setup.num_generations}",
        f"--model.rollout.max_completion_length={setup.max_completion_length}",
        f"--model.prompt.max_prompt_length={setup.max_prompt_length}",
        f"--model.optimizer.init_args.lr={setup.learning_rate}",
        *loss.split(),
        *(f"--data.prompts_per_step={setup.prompts_per_step}", "--data.expert_per_step=0"),
    ]


class LoggedEngine:
    """The module's engine, reseeded, timed and recorded around each call."""

    def __init__(self, inner, log: RoundLog) -> None:
        self.inner, self.log = inner, log

    def generate(self, model, input_ids, attention_mask, params):
        self.log.before_generation()
        rollout = self.inner.generate(model, input_ids, attention_mask, params)
        end = time.perf_counter()
        g = params.num_samples  # one prompt row per sample, as TRL passes them to `generate`
        prompts = token_rows(input_ids.repeat_interleave(g, 0), attention_mask.repeat_interleave(g, 0))
        self.log.after_generation(end, prompts, token_rows(rollout.completion_ids, rollout.completion_mask))
        return rollout


def round_end_callback(log: RoundLog):
    """A Lightning callback that stamps the end of each iteration."""
    from lightning.pytorch import Callback

    class RoundEnd(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            log.round_end()

    return RoundEnd()


def worker_egspo_rl(spec: dict) -> dict:
    """egspo's RL loop through its CLI (`fit`), every round logged: the egspo side of rows 3 and 5.

    `spec`: `model` (a saved directory) or `shape` (a config: random weights), `engine`, `setup`,
    `device` (cpu: fp32; cuda: fp32 master weights and bf16 autocast, sampling included), and
    optionally `extra` CLI arguments.
    """
    import torch

    setup = RLSetup(**spec["setup"])
    device = spec.get("device", "cpu")
    cuda = device == "cuda"
    if "model" in spec:
        policy = pretrained_policy(spec["model"])
    else:
        policy = [f"--model.policy.config={json.dumps(spec['shape'])}", "--model.policy.tokenizer=synthetic"]
    log = RoundLog(setup.warmup)
    with tempfile.TemporaryDirectory() as root:
        precision = f"--trainer.precision={'bf16-mixed' if cuda else '32-true'}"
        extra = spec.get("extra", [])
        cli = egspo_cli(egspo_args(root, device, *policy, *rl_args(setup, spec["engine"]), precision, *extra))
        module = cli.model
        module.rollout.engine = LoggedEngine(module.rollout.engine, log)  # the builder reads it from here
        update = module.update.rl_iteration

        def logged_update(policy_model, optimizer, experience, **kwargs):
            start = time.perf_counter()
            out = update(policy_model, optimizer, experience, **kwargs)
            log.add_update(time.perf_counter() - start, int(experience.attention_mask.sum()))
            return out

        module.update.rl_iteration = logged_update
        cli.trainer.callbacks.append(round_end_callback(log))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        cli.trainer.fit(module, datamodule=cli.datamodule)
        params = sum(p.numel() for p in module.policy.parameters())
    return {
        **log.result(),
        "params": params,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def egspo_batches(kind: str, n: int, per_step: int) -> list[dict]:
    """The first `n` training batches the demo datamodule yields (what both sides train on)."""
    with tempfile.TemporaryDirectory() as root:
        rl = kind == "rl"
        cli = egspo_cli(
            egspo_args(
                root,
                "cpu",
                f"--model.sft_iterations={0 if rl else n}",
                f"--model.rl_iterations={n if rl else 0}",
                f"--data.prompts_per_step={per_step if rl else 0}",
                f"--data.expert_per_step={0 if rl else per_step}",
            )
        )
        dataset = cli.datamodule.train_dataset()
        return [dataset[i] for i in range(n)]


# =========================================================================== TRL
def trl_common(setup_rounds: int, learning_rate: float) -> dict:
    """`TrainingArguments` both TRL trainers share: fp32 on CPU, nothing but training."""
    import torch

    return {
        "output_dir": tempfile.mkdtemp(),
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False,  # TRL's GRPO default is True; egspo does not checkpoint
        "learning_rate": learning_rate,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "optim": "adamw_torch",
        "max_grad_norm": 1.0,
        "max_steps": setup_rounds,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "report_to": "none",
        "logging_strategy": "no",
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "model_init_kwargs": {"dtype": torch.float32, "attn_implementation": "sdpa"},
    }


def trl_callback(on_optimizer_step: Callable[[], None], on_step_end: Callable[[], None]):
    from transformers import TrainerCallback

    class Stamps(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            on_optimizer_step()

        def on_step_end(self, args, state, control, **kwargs):
            on_step_end()

    return Stamps()


def worker_trl_grpo(spec: dict) -> dict:
    """TRL's GRPOTrainer on the same model, prompts and sampling, every round logged like egspo's."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from egspo.data import synthetic_tokenizer
    from egspo.rewards import MathReward

    setup = RLSetup(**spec["setup"])
    steps = setup.warmup + setup.rounds
    rows = [
        {"prompt": [{"role": "user", "content": q}], "answer": a}
        for b in egspo_batches("rl", steps, setup.prompts_per_step)
        for q, a in zip(b["prompts"], b["answers"], strict=True)
    ]
    reward = MathReward()

    def math_reward(completions, answer, **kwargs) -> list[float]:
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return reward(texts, answer).rewards.tolist()

    n = setup.prompts_per_step * setup.num_generations
    config = GRPOConfig(
        **trl_common(steps, setup.learning_rate),
        per_device_train_batch_size=n,
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
        loss_type="dapo",  # token-mean over the batch, as egspo's token-mean
        scale_rewards="group",
        shuffle_dataset=False,
        log_completions=False,
    )
    tokenizer = synthetic_tokenizer()
    tokenizer.padding_side = "left"
    log = RoundLog(setup.warmup)
    trainer = GRPOTrainer(
        model=spec["model"],
        reward_funcs=math_reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    model, stops = trainer.model, [tokenizer.eos_token_id]
    generate = model.generate

    def logged_generate(*args, **kwargs):
        log.before_generation()
        out = generate(*args, **kwargs)
        end = time.perf_counter()
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        log.after_generation(end, token_rows(ids, mask), completion_rows(out[:, ids.shape[1] :], stops))
        return out

    model.generate = logged_generate  # TRL samples through the unwrapped model's `generate`
    prepare = trainer._prepare_inputs

    def prepare_then_mark(*args, **kwargs):
        out = prepare(*args, **kwargs)
        log.update_from = time.perf_counter()  # experience ready: the update starts
        return out

    trainer._prepare_inputs = prepare_then_mark
    trainer.add_callback(
        trl_callback(lambda: log.add_update(time.perf_counter() - log.update_from), log.round_end)
    )
    trainer.train()
    return log.result()


# =========================================================================== row 3: RL vs TRL
def rl_repetition(case: RLCase, model_dir: str, setup: RLSetup, reverse: bool) -> dict[str, dict]:
    """Every side once, in a fresh process each, in order or reversed; load average around it all."""
    names = list(SIDES)[::-1] if reverse else list(SIDES)
    results: dict[str, dict] = {"load": {"before": load_average()}}
    for name in names:
        _label, kind, engine = SIDES[name]
        spec = {"kind": kind, "model": model_dir, "setup": asdict(setup), "engine": engine}
        results[name] = run_worker(spec)
        r = results[name]
        print(
            f"  {case.name} {name}: {sum(x['tokens'] for x in r['rounds'])} tokens, "
            f"{sum(x['seconds'] for x in r['rounds']):.1f} s, CPU share {r['cpu_share']:.2f}",
            file=sys.stderr,
        )
    results["load"]["after"] = load_average()
    return results


@dataclass
class SideStats:
    """Medians over repetitions of one side's per-round figures."""

    tokens: float
    tokens_per_s: float
    generation_s: float
    update_s: float
    other_s: float
    cpu_share: float
    peak_rss_mb: float

    @classmethod
    def of(cls, runs: list[dict]) -> SideStats:
        def med(f) -> float:
            return statistics.median(statistics.median(f(x) for x in r["rounds"]) for r in runs)

        return cls(
            tokens=med(lambda x: x["tokens"]),
            tokens_per_s=statistics.median(throughput(r) for r in runs),
            generation_s=med(lambda x: x["generation_s"]),
            update_s=med(lambda x: x["update_s"]),
            other_s=med(lambda x: x["seconds"] - x["generation_s"] - x["update_s"]),
            cpu_share=min(r["cpu_share"] for r in runs),
            peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in runs),
        )


def throughput(run: dict) -> float:
    """Completion tokens per second over a worker's timed rounds."""
    return sum(x["tokens"] for x in run["rounds"]) / sum(x["seconds"] for x in run["rounds"])


def same_tokens(a: dict, b: dict) -> tuple[bool, bool, float]:
    """Whether two workers sampled identical completions, whether their counts agree, the gap."""
    ta, tb = (sum(x["tokens"] for x in r["rounds"]) for r in (a, b))
    identical = [x["digest"] for x in a["rounds"]] == [x["digest"] for x in b["rounds"]]
    gap = abs(ta - tb) / max(tb, 1)
    return identical, gap <= TOKEN_TOLERANCE, gap


def rl_case(args, case: RLCase, lengths: str, tmp: Path) -> dict:
    """All repetitions of one size and length regime; the figures of its tables."""
    setup = RLSetup(max_completion_length=case.max_completion_length, rounds=args.rounds)
    if args.quick:
        setup.prompts_per_step, setup.rounds = 4, 1
    model_dir = tmp / f"{case.name}-{lengths}"
    stop_prob = 2 / case.max_completion_length if lengths == "varied" else None
    measured_stop = save_model(case.shape, model_dir, stop_prob)
    reps = [rl_repetition(case, str(model_dir), setup, reverse=r % 2 == 1) for r in range(args.repeats)]
    quiet, valid, notes = [], [], []
    for i, rep in enumerate(reps):
        load = max(rep["load"].values())
        checks = {name: same_tokens(rep[name], rep["trl"]) for name in ("egspo", "egspo-hf")}
        prompts = {tuple(x["prompt_digest"] for x in rep[name]["rounds"]) for name in SIDES}
        ok = all(c[1] for c in checks.values()) and len(prompts) == 1
        quiet.append(load <= args.max_load)
        valid.append(ok)
        if not ok:
            gaps = ", ".join(f"{n} {c[2]:.1%}" for n, c in checks.items())
            notes.append(
                f"repetition {i + 1} void: token counts differ from TRL's ({gaps}) or prompts differ"
            )
    used = [rep for rep, q, v in zip(reps, quiet, valid, strict=True) if q and v]
    stats = {name: SideStats.of([rep[name] for rep in used]) for name in SIDES} if used else {}
    ratios = {
        name: [throughput(rep[name]) / throughput(rep["trl"]) for rep in used]
        for name in ("egspo", "egspo-hf")
    }
    return {
        "case": case,
        "lengths": lengths,
        "setup": setup,
        "stop_prob": measured_stop,
        "reps": reps,
        "quiet": quiet,
        "valid": valid,
        "notes": notes,
        "stats": stats,
        "ratios": ratios,
        "identical": sum(
            same_tokens(rep["egspo"], rep["trl"])[0] and same_tokens(rep["egspo-hf"], rep["trl"])[0]
            for rep in reps
        ),
    }


def rl_case_table(res: dict, args) -> list[str]:
    """The detailed table of one size and length regime."""
    case, stats, setup = res["case"], res["stats"], res["setup"]
    regime = (
        "random weights as saved (almost every sample reaches the limit)"
        if res["lengths"] == "limit"
        else f"stop feature, P(EOS) about {res['stop_prob']:.3f} per token"
    )
    lines = [f"### {case.name} ({res['lengths']}): {case.describe()}; {regime}", ""]
    if not stats:
        return [*lines, "No repetition was both quiet and valid: no figures. " + " ".join(res["notes"]), ""]
    rows = setup.prompts_per_step * setup.num_generations
    lines += [
        "| side | tokens/s | generation s | update s | other s | generation tokens/s | min CPU share "
        "| peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (label, _, _) in SIDES.items():
        s = stats[name]
        lines.append(
            f"| {label} | {s.tokens_per_s:.0f} | {s.generation_s:.2f} | {s.update_s:.2f} | {s.other_s:.2f} | "
            f"{s.tokens / s.generation_s:.0f} | {s.cpu_share:.2f} | {s.peak_rss_mb:.0f} |"
        )
    trl = stats["trl"]
    for name in ("egspo", "egspo-hf"):
        s, r = stats[name], res["ratios"][name]
        lines.append(
            f"| **{SIDES[name][0]} / TRL** | **{statistics.median(r):.2f}x** ({ratio_range(r)}) | "
            f"{trl.generation_s / s.generation_s:.2f}x | {trl.update_s / s.update_s:.2f}x | | | | |"
        )
    used = sum(q and v for q, v in zip(res["quiet"], res["valid"], strict=True))
    loads = ", ".join(f"{r['load']['before']:.1f}/{r['load']['after']:.1f}" for r in res["reps"])
    lines += [
        "",
        f"Seconds per round (medians). Ratio rows: throughput ratio, then TRL's time / this side's. "
        f"{stats['trl'].tokens:.0f} completion tokens per round (median; {stats['trl'].tokens / rows:.1f} per "
        f"sample); identical completions on all sides in {res['identical']} of {len(res['reps'])} repetitions; "
        f"{used} of {len(res['reps'])} repetitions used (quiet and valid); load average before/after each: "
        f"{loads} (limit {args.max_load}). " + " ".join(res["notes"]),
        "",
    ]
    return lines


def row_rl(args) -> str:
    cases = [QUICK_CASE] if args.quick else [c for c in RL_CASES if c.name in args.rl_cases]
    regimes = args.lengths
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            for lengths in regimes:
                print(f"rl {case.name} ({lengths}) ...", file=sys.stderr)
                results.append(rl_case(args, case, lengths, Path(tmp)))
    setup = results[0]["setup"]
    n = setup.prompts_per_step * setup.num_generations
    lines = [
        "## 3. RL throughput: egspo vs TRL GRPOTrainer",
        "",
        "Each size: a random-weight Qwen2 saved once (seed 0, synthetic tokenizer, tied embeddings) that "
        f"every side loads; the same "
        f"{setup.prompts_per_step} synthetic prompts per round in the same order x {setup.num_generations} "
        f"samples ({n} completions), one optimizer step per round (TRL per_device_train_batch_size={n}, "
        "steps_per_generation=1, num_iterations=1; egspo ppo_epochs=1, one mini-batch), EOS stopping, "
        "temperature 1, no top-k / top-p, beta 0, clip 0.2 / 0.2, token-mean loss (TRL loss_type=dapo; egspo "
        "PPOClipLoss), group-scaled advantages, MathReward on both, AdamW lr 1e-6 without weight decay, "
        "grad-norm clip 1, fp32, sdpa, no gradient checkpointing on either side, no logging / eval / "
        f"checkpoints. Torch reseeded before every generation round on every side, so the sides sample "
        f"the same completions (counts must agree within {TOKEN_TOLERANCE:.0%}). Each worker: "
        f"{setup.warmup} untimed then {setup.rounds} timed rounds in a fresh process, {THREADS or 'default'} "
        f"thread(s); sides interleaved (A B C, C B A, ...), {args.repeats} repetitions. tokens/s = "
        "completion tokens (EOS included) / wall time of the timed rounds; generation = the engine / "
        "`generate` call; update = loss, backward, clipping and optimizer step; other = the rest "
        "(decoding, rewards, advantages, the frameworks' own work). Ratios: medians (ranges) of the "
        "per-repetition ratios.",
        "",
        "| size | lengths | egspo / TRL | egspo (HF generate) / TRL | generation: SharedPrefillEngine / HF generate "
        "| target 2x |",
        "|---|---|---|---|---|---|",
    ]
    for res in results:
        if not res["stats"]:
            lines.append(f"| {res['case'].name} | {res['lengths']} | not measured (see below) | | | |")
            continue
        r, rh = res["ratios"]["egspo"], res["ratios"]["egspo-hf"]
        gen = res["stats"]["egspo-hf"].generation_s / res["stats"]["egspo"].generation_s
        met = "met" if statistics.median(r) >= 2.0 else "missed"
        lines.append(
            f"| {res['case'].name} | {res['lengths']} | **{statistics.median(r):.2f}x** ({ratio_range(r)}) | "
            f"{statistics.median(rh):.2f}x ({ratio_range(rh)}) | {gen:.2f}x | {met} |"
        )
    lines.append("")
    for res in results:
        lines += rl_case_table(res, args)
    return "\n".join(lines).rstrip()


# =========================================================================== row 4: SFT vs TRL
def worker_egspo_sft(spec: dict) -> dict:
    """egspo's SFT warm-up on the saved model; tokens = the timed batches' tokens without padding."""
    setup = SFTSetup(**spec["setup"])
    log = RoundLog(setup.warmup)
    steps = setup.warmup + setup.rounds
    with tempfile.TemporaryDirectory() as root:
        cli = egspo_cli(
            egspo_args(
                root,
                "cpu",
                *pretrained_policy(spec["model"]),
                f"--model.sft_iterations={steps}",
                "--model.rl_iterations=0",
                f"--model.prompt.max_sft_length={setup.max_length}",
                f"--model.optimizer.init_args.lr={setup.learning_rate}",
                f"--data.expert_per_step={setup.batch_size}",
                "--data.prompts_per_step=0",
            )
        )
        cli.trainer.callbacks.append(round_end_callback(log))
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        encoder = cli.model.encoder
    batches = egspo_batches("sft", steps, setup.batch_size)[setup.warmup :]
    tokens = sum(
        int(encoder.demonstrations(b["expert_prompts"], b["expert_responses"]).attention_mask.sum())
        for b in batches
    )
    wall = log.ends[-1][0] - log.ends[setup.warmup - 1][0]
    return {"seconds": wall, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


def worker_trl_sft(spec: dict) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from egspo.data import format_prompt, synthetic_tokenizer

    setup = SFTSetup(**spec["setup"])
    steps = setup.warmup + setup.rounds
    tokenizer = synthetic_tokenizer()
    rows = [
        {"prompt": format_prompt(tokenizer, q, instruction=None), "completion": r}
        for b in egspo_batches("sft", steps, setup.batch_size)
        for q, r in zip(b["expert_prompts"], b["expert_responses"], strict=True)
    ]
    config = SFTConfig(
        **trl_common(steps, setup.learning_rate),
        per_device_train_batch_size=setup.batch_size,
        max_length=setup.max_length,
        packing=False,
        padding_free=False,
        completion_only_loss=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
    )
    log = RoundLog(setup.warmup)
    trainer = SFTTrainer(
        model=spec["model"],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[trl_callback(lambda: None, log.round_end)],
    )
    trainer.train()
    # Tokens of the timed steps: the tokenized examples TRL trained on, without padding.
    data = trainer.train_dataset
    tokens = sum(
        len(data[i]["input_ids"]) for i in range(setup.warmup * setup.batch_size, steps * setup.batch_size)
    )
    wall = log.ends[-1][0] - log.ends[setup.warmup - 1][0]
    return {"seconds": wall, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


def row_sft(args) -> str:
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


# =========================================================================== row 2: EGSPO vs GRPO
def worker_overhead(spec: dict) -> dict:
    """One fit whose iterations alternate EGSPO and GRPO losses (ABBA) from identical state."""
    import torch
    from lightning.pytorch import Callback

    from egspo.losses import EGSPOLoss, EntropyGate, PPOClipLoss

    losses = {
        "egspo": EGSPOLoss(clip_low=0.2, clip_high=0.2, gate=EntropyGate(rule="quantile", value=0.8)),
        "grpo": PPOClipLoss(clip_low=0.2, clip_high=0.2),
    }
    pairs = [("egspo", "grpo") if p % 2 == 0 else ("grpo", "egspo") for p in range(spec["pairs"])]
    order = ["egspo", "grpo", *(name for pair in pairs for name in pair)]  # one warm-up of each first
    times: dict[str, list[float]] = {"egspo": [], "grpo": []}
    phases: dict[str, dict[str, list[float]]] = {"egspo": {}, "grpo": {}}
    tokens: list[int] = []

    class Alternate(Callback):
        """Runs before the rollout callback: same weights, optimizer state, prompts and seed each time."""

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
                root,
                "cpu",
                *policy,
                "--model.sft_iterations=0",
                f"--model.rl_iterations={len(order)}",
                f"--model.rollout.max_completion_length={spec['max_completion_length']}",
                f"--data.prompts_per_step={spec['prompts_per_step']}",
                "--data.expert_per_step=0",
            )
        )
        alternate = Alternate()
        cli.trainer.callbacks.insert(0, alternate)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        micro = loss_microbench(alternate.experience, losses, spec["micro_repeats"])
    return {
        "egspo": times["egspo"],
        "grpo": times["grpo"],
        "phases": {n: {k: statistics.median(v) for k, v in p.items()} for n, p in phases.items()},
        # Every iteration must have produced the same rollout (same tokens), or the comparison is void.
        "identical_rollouts": len(set(tokens)) == 1,
        "tokens": tokens[0] if tokens else 0,
        **micro,
    }


def loss_microbench(exp, losses: dict, repeats: int) -> dict:
    """Gate threshold + loss forward/backward of each loss on the last experience, interleaved."""
    import torch

    from egspo.losses import TokenBatch

    mask, entropy = exp.completion_mask, exp.entropy
    logits = torch.randn(mask.shape) * 0.01
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


# =========================================================================== row 1: fused op
def row_fused(args) -> str:
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
    return run_script("bench_generation.py", "--threads", str(THREADS), *options).strip()


# =========================================================================== row 5: GPU
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


WORKERS = {
    "egspo_rl": worker_egspo_rl,
    "trl_grpo": worker_trl_grpo,
    "egspo_sft": worker_egspo_sft,
    "trl_sft": worker_trl_sft,
    "overhead": worker_overhead,
}


# =========================================================================== main
def machine() -> str:
    """CPU, threads, software versions, date: the context every table is read in."""
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

    return (
        f"{cpu}, {os.cpu_count()} cores ({THREADS or 'default'} intra-op thread(s) per worker), load average "
        f"{load_average():.1f} at the start; Python {platform.python_version()}; torch {version('torch')}, "
        f"transformers {version('transformers')}, trl {version('trl')}, lightning {version('lightning')}; "
        f"{datetime.date.today().isoformat()}"
    )


def heading(section: str) -> str:
    """A section's key: its `## ` heading up to the first colon ("## 3. RL throughput")."""
    return section.split("\n", 1)[0].split(":", 1)[0].strip()


def write_output(path: Path, header: str, sections: list[str], keep_others: bool = True) -> None:
    """Replace the sections this run produced, keep the others (unless told not to) and the notes
    (from `NOTES_MARKER` on). So a GPU run (`--device cuda --rows gpu`) updates its section of a
    CPU run's file.
    """
    old = path.read_text() if path.exists() else ""
    notes = old[old.index(NOTES_MARKER) :] if NOTES_MARKER in old else ""
    body = old[: old.index(NOTES_MARKER)] if notes else old
    kept = ["## " + part.strip() for part in body.split("\n## ")[1:]] if keep_others else []
    new = {heading(s): s for s in sections}
    merged = [new.pop(heading(s), s) for s in kept] + list(new.values())
    path.write_text("\n\n".join([header, *merged]) + "\n" + ("\n" + notes if notes else ""))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a smoke run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions (fresh processes) per comparison")
    parser.add_argument("--rounds", type=int, default=1, help="timed RL rounds per worker (after 1 warm-up)")
    parser.add_argument(
        "--rl-cases", default=",".join(c.name for c in RL_CASES), help="comma-separated RL sizes to run"
    )
    parser.add_argument(
        "--lengths", default="limit", help="comma-separated: limit, varied (see the docstring)"
    )
    parser.add_argument(
        "--max-load",
        type=float,
        default=1.5,
        help="1-minute load average above which a repetition is flagged and left out (a worker counts ~1)",
    )
    parser.add_argument("--fused-quick", action="store_true", help="row 1 at bench_fused.py's quick sizes")
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads per worker (0: torch default)"
    )
    parser.add_argument("--output", default=None, help="write the markdown here (default: stdout only)")
    parser.add_argument(
        "--replace-all", action="store_true", help="drop the output's sections this run does not produce"
    )
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rows = [r for r in args.rows.split(",") if r]
    args.rl_cases = [c for c in args.rl_cases.split(",") if c]
    args.lengths = [x for x in args.lengths.split(",") if x]
    unknown = (
        set(args.rows) - set(ROWS),
        set(args.rl_cases) - {c.name for c in RL_CASES},
        set(args.lengths) - {"limit", "varied"},
    )
    for what, bad in zip(("rows", "RL sizes", "lengths"), unknown, strict=True):
        if bad:
            parser.error(f"unknown {what}: {sorted(bad)}")
    if args.quick:
        args.repeats = 1
    return args


def main() -> None:
    global THREADS
    args = parse_args()
    if args._worker:
        spec = json.loads(args._worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)))
        return
    THREADS = args.threads if args.device == "cpu" else 0
    command = f"`python scripts/bench.py {' '.join(sys.argv[1:])}`"
    header = f"# Benchmarks\n\nLast produced by {command}.\n\nMachine: {machine()}."
    rows = {
        "fused": row_fused,
        "overhead": row_overhead,
        "rl": row_rl,
        "generation": row_generation,
        "sft": row_sft,
        "gpu": row_gpu,
    }
    sections = []
    for row in args.rows:
        print(f"row {row} ...", file=sys.stderr)
        sections.append(
            f"{rows[row](args)}\n\n(Section from {command}, {datetime.date.today().isoformat()}.)"
        )
    print("\n\n".join([header, *sections]))
    if args.output:
        write_output(Path(args.output), header, sections, keep_others=not args.replace_all)


if __name__ == "__main__":
    main()
