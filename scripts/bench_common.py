"""What every benchmark script shares: settings, model shapes, RL cases, measuring helpers, the saved
random-weight model, and the per-round log both sides of an RL comparison fill.

Kept apart from `bench.py` (the entry point that writes BENCHMARKS.md) so that the workers
(`bench_egspo.py`, `bench_trl.py`), the sections (`bench_rl.py`, `bench_sections.py`) and the other
scripts (`bench_generation.py`, `bench_memory.py`) read one copy of each.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED = 1000  # generation round r samples right after torch.manual_seed(SEED + r), on every side
TOKEN_TOLERANCE = 0.01  # completion token counts of the sides may differ by this much
THREADS = 1  # intra-op threads per worker (0: torch's default); set by bench.py --threads


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
    # Rows per forward/backward of the update, on both sides (None: the whole batch in one pass).
    # TRL: `per_device_train_batch_size` with gradient accumulation to one optimizer step; egspo: a
    # token budget of as many rows at the longest prompt and completion (`egspo_token_budget`).
    micro_batch_size: int | None = None

    def egspo_token_budget(self) -> int | None:
        """egspo's `ppo_max_token_len_per_gpu` for `micro_batch_size` rows: TRL's padded micro-batch
        at the longest lengths, so that neither side runs more tokens per pass than the other."""
        if self.micro_batch_size is None:
            return None
        return self.micro_batch_size * (self.max_prompt_length + self.max_completion_length)


@dataclass
class SFTSetup:
    """One SFT configuration, shared by both sides of a comparison."""

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


def run_worker(spec: dict, python: str | None = None, env: dict[str, str] | None = None) -> dict:
    """Run one case in a fresh interpreter (this one's python, or `python`: another environment's,
    with `env` added to `worker_env()`); its last stdout line is a JSON result."""
    cmd = [python or sys.executable, str(ROOT / "scripts" / "bench.py"), "--_worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**worker_env(), **(env or {})}, cwd=ROOT)
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


def package_version(pkg: str) -> str:
    """An installed package's version, for the machine line under every table."""
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


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
    """Per generation round: the reseed, weight sync, generation time, tokens, scoring, update, wall time.

    Both sides feed it from the same places (the weight push before sampling, right around sampling,
    around the update, at the end of the optimizer step), so the split means the same on both:
    sync (pushing the new weights into a vLLM engine; none for the HF engines), generation (the
    engine's sampling call), scoring (from sampling's end to the update's start: rewards, old
    log-probs, advantages), update, and the rest of the round.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.rounds: list[dict] = []
        self.ends: list[tuple[float, float]] = []  # (wall, process CPU) at each round's end
        self._start = 0.0
        self._generation_end = 0.0
        self._sync = 0.0  # weight sync seconds since the last round's sampling
        self.update_from: float | None = None

    def add_sync(self, seconds: float) -> None:
        """A weight push into the sampler (before this round's sampling)."""
        self._sync += seconds

    def before_generation(self) -> None:
        import torch

        torch.manual_seed(SEED + len(self.rounds))
        self._start = time.perf_counter()

    def after_generation(self, end: float, prompts: list[list[int]], completions: list[list[int]]) -> None:
        """Record a round's sampling (`end`: when sampling returned; the bookkeeping is not timed)."""
        self._generation_end = end
        self.rounds.append(
            {
                "generation_s": end - self._start,
                "sync_s": self._sync,
                "tokens": sum(len(c) for c in completions),
                "digest": digest(completions),
                "prompt_digest": digest(prompts),
            }
        )
        self._sync = 0.0

    def add_update(self, seconds: float, attended: int | None = None) -> None:
        """The update's time (called as it ends), and the tokens it ran through the decoder (for
        MFU) when known; scoring is what lay between sampling's end and the update's start."""
        scoring = time.perf_counter() - seconds - self._generation_end
        self.rounds[-1].update(update_s=seconds, scoring_s=scoring, attended=attended)

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


def cut_at_stop(rows: list[list[int]], stop_ids: list[int]) -> list[list[int]]:
    """Each row up to and including its first stop token (a row without one, whole)."""
    stops = set(stop_ids)
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


def completion_rows(completion_ids, stop_ids: list[int]) -> list[list[int]]:
    """Each row's tokens up to and including its first stop token."""
    from egspo.rollout import completion_mask_from_eos

    return token_rows(completion_ids, completion_mask_from_eos(completion_ids, stop_ids)[0])
