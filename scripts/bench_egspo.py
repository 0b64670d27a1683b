"""egspo's side of the benchmarks: the demo config through egspo's own CLI (`fit`), one measurement
per fresh process (`bench.py --_worker`), every round logged as `bench_trl.py` logs TRL's.

Workers: `egspo_rl` (rows 3 and 5), `egspo_sft` (row 4), `overhead` (row 2: EGSPO and GRPO losses
alternating in one fit from identical state).

The benchmarks drive egspo through its command line wherever they can. Where they must reach into
a run (time the engine and the update, swap the loss, read or reset a batch, count demonstration
tokens), they go only through the functions of the section "egspo internals" below: when
src/egspo renames a part, that section is the one place to adapt.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable

from bench_common import ROOT, RLSetup, RoundLog, SFTSetup, peak_rss_mb, token_rows


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


def phase_args(kind: str, n: int, per_step: int) -> list[str]:
    """`n` iterations of one phase only (`kind`: sft or rl), `per_step` demonstrations or questions each."""
    rl = kind == "rl"
    return [
        *(f"--model.sft_iterations={0 if rl else n}", f"--model.rl_iterations={n if rl else 0}"),
        f"--data.prompts_per_step={per_step if rl else 0}",
        f"--data.expert_per_step={0 if rl else per_step}",
    ]


def rl_args(setup: RLSetup, engine: str) -> list[str]:
    """RL only, `setup`'s sizes and micro-batches, GRPO's clipped token-mean loss (TRL's dapo), the given engine."""
    loss = (
        "--model.policy_loss=egspo.losses.PPOClipLoss --model.policy_loss.init_args.clip_low=0.2 "
        "--model.policy_loss.init_args.clip_high=0.2 --model.policy_loss.init_args.loss_agg_mode=token-mean"
    )
    budget = setup.egspo_token_budget()
    micro = [] if budget is None else [f"--model.update.ppo_max_token_len_per_gpu={budget}"]
    return [
        *phase_args("rl", setup.warmup + setup.rounds, setup.prompts_per_step),
        *micro,
        f"--model.rollout.engine={engine}",
        f"--model.rollout.num_generations={setup.num_generations}",
        f"--model.rollout.max_completion_length={setup.max_completion_length}",
        f"--model.prompt.max_prompt_length={setup.max_prompt_length}",
        f"--model.optimizer.init_args.lr={setup.learning_rate}",
        *loss.split(),
    ]


# =========================================================================== egspo internals
# What the benchmarks know of egspo beyond its command line and public exports.
def wrap_engine(module, wrap: Callable) -> None:
    """Sample through `wrap(engine)` instead of the rollout engine the module's builder holds."""
    config = module.experience_builder.config
    config.engine = wrap(config.engine)


def wrap_rl_update(module, wrap: Callable) -> None:
    """Run `wrap(update)` instead of the RL update: one iteration's optimizer steps on an experience,
    called as `update(policy, optimizer, experience, **options)`."""
    module.policy_update.rl_update = wrap(module.policy_update.rl_update)


def set_policy_loss(module, loss) -> None:
    """Make `loss` the RL loss of the module's next update (and of its gate threshold)."""
    module.policy_update.policy_loss = loss


def batch_lists(batch) -> dict[str, list]:
    """A copy of an iteration batch's lists: its questions, answers and demonstrations."""
    values = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return {k: list(v) for k, v in values.items() if isinstance(v, list)}


def set_batch_lists(batch, lists: dict[str, list]) -> None:
    """Put back what `batch_lists` copied."""
    for key, value in lists.items():
        setattr(batch, key, list(value))


def batch_experience(batch):
    """The experience the rollout callback put into an RL iteration's batch."""
    return batch.experience


def training_batches(datamodule, n: int) -> list[dict[str, list[str]]]:
    """The first `n` training batches the data module yields (questions, answers, demonstrations)."""
    dataset = datamodule.train_dataset()
    return [dataset[i] for i in range(n)]


def demonstration_tokens(module, batch: dict[str, list[str]]) -> int:
    """Tokens of a batch's demonstrations as the SFT update encodes them, without padding."""
    encoded = module.encoder.demonstrations(batch["expert_prompts"], batch["expert_responses"])
    return int(encoded.attention_mask.sum())


# =========================================================================== timing around a run
class LoggedEngine:
    """The module's engine, reseeded, timed and recorded around each call.

    An engine that keeps its own copy of the weights (`VLLMEngine`: `stale` after an optimizer
    step) gets them pushed first, timed as the round's weight sync, as TRL syncs before sampling.
    """

    def __init__(self, inner, log: RoundLog) -> None:
        self.inner, self.log = inner, log
        self.scores_what_it_samples = getattr(inner, "scores_what_it_samples", True)

    def mark_stale(self) -> None:
        if hasattr(self.inner, "mark_stale"):
            self.inner.mark_stale()

    def generate(self, model, input_ids, attention_mask, params):
        if getattr(self.inner, "stale", False):
            start = time.perf_counter()
            self.inner.sync_weights(model)
            self.log.add_sync(time.perf_counter() - start)
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


def logged_update(update: Callable, log: RoundLog) -> Callable:
    """`update`, timed into `log` with the tokens it ran through the decoder (for MFU)."""

    def run(policy_model, optimizer, experience, **kwargs):
        start = time.perf_counter()
        out = update(policy_model, optimizer, experience, **kwargs)
        log.add_update(time.perf_counter() - start, int(experience.attention_mask.sum()))
        return out

    return run


# =========================================================================== the workers
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
        wrap_engine(module, lambda engine: LoggedEngine(engine, log))
        wrap_rl_update(module, lambda update: logged_update(update, log))
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


def egspo_batches(kind: str, n: int, per_step: int) -> list[dict[str, list[str]]]:
    """The first `n` training batches the demo datamodule yields (what both sides train on)."""
    with tempfile.TemporaryDirectory() as root:
        cli = egspo_cli(egspo_args(root, "cpu", *phase_args(kind, n, per_step)))
        return training_batches(cli.datamodule, n)


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
                *phase_args("sft", steps, setup.batch_size),
                f"--model.prompt.max_sft_length={setup.max_length}",
                f"--model.optimizer.init_args.lr={setup.learning_rate}",
            )
        )
        cli.trainer.callbacks.append(round_end_callback(log))
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    batches = egspo_batches("sft", steps, setup.batch_size)[setup.warmup :]
    tokens = sum(demonstration_tokens(cli.model, b) for b in batches)
    wall = log.ends[-1][0] - log.ends[setup.warmup - 1][0]
    return {"seconds": wall, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


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
                self.batch = batch_lists(batch)
            pl_module.policy.load_state_dict(self.state)
            trainer.optimizers[0].load_state_dict(self.optim)
            set_batch_lists(batch, self.batch)
            set_policy_loss(pl_module, losses[order[batch_idx]])
            torch.manual_seed(1234)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            elapsed = time.perf_counter() - self.t0
            if batch_idx < 2:
                return
            name = order[batch_idx]
            times[name].append(elapsed)
            self.experience = batch_experience(batch)
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
                *phase_args("rl", len(order), spec["prompts_per_step"]),
                f"--model.rollout.max_completion_length={spec['max_completion_length']}",
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


WORKERS = {"egspo_rl": worker_egspo_rl, "egspo_sft": worker_egspo_sft, "overhead": worker_overhead}
