"""The LightningModule: a two-phase state machine, SFT warm-up then RL, around plain components.

Each phase is one training epoch of one batch per iteration (`egspo.data.batches.IterationBatch`).
An SFT iteration takes optimizer steps on expert demonstrations. An RL iteration finds its
experience already in the batch (`RolloutCallback` samples, rewards and scores it with the
`ExperienceBuilder` just before the step), then reads top to bottom in `rl_step`: gate threshold,
update (`PolicyUpdate.rl_update`: `ppo_epochs` x mini-batches, one optimizer step each), the
methods' `after_update` hooks (`egspo.methods`), logging. Lightning's validation loop evaluates
held-out sets at the end of each phase (and every `trainer.val_check_interval` iterations).

Manual optimization: Lightning's `global_step` counts optimizer steps, `iteration` counts iterations.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor

from egspo.callbacks.evaluation import HeldOutEvaluation
from egspo.callbacks.progress import phase_progress_bar
from egspo.callbacks.rollout import RolloutCallback
from egspo.config import EvalConfig, PromptConfig, RolloutConfig, UpdateConfig
from egspo.data.batches import IterationBatch
from egspo.data.encoding import PromptEncoder
from egspo.distributed import FSDP1_REFUSAL, FSDPConfig, gather_variable, shard_policy
from egspo.evaluation import Evaluator, RunSummary, eval_seed
from egspo.losses import EGSPOLoss, NLLLoss, PolicyLoss, SFTLoss
from egspo.methods import RLMethod
from egspo.model import KLReference, PolicyConfig, load_policy, load_tokenizer
from egspo.resume import check_resume
from egspo.rewards import MathReward, RewardFunction
from egspo.rng import capture_rng_states, restore_rng_states
from egspo.rollout.builder import ExperienceBuilder, clock
from egspo.schedules import ConstantMu, MuSchedule, PhaseLearningRates
from egspo.update import PolicyUpdate

Phase = Literal["sft", "rl"]


class HybridRLModule(LightningModule):
    """Hybrid SFT -> RL post-training of a causal LM with a pluggable token-level policy loss.

    Args:
        policy: the model and tokenizer (see `PolicyConfig`).
        policy_loss: RL loss, by `class_path` (`egspo.losses.EGSPOLoss`, `PPOClipLoss`, ...).
        warmup_loss: the SFT loss of the warm-up phase (default: NLL).
        mix_loss: the SFT loss mixed into RL, `L = (1 - mu) L_RL + mu L_SFT` (default: NLL;
            CHORD-phi: `egspo.losses.ChordPhiLoss`).
        reward: reward function on decoded completions, by `class_path`.
        sft_iterations, rl_iterations: the length of each phase.
        prompt: prompt format and lengths.
        rollout: sampler and sampling options (`num_generations`, `temperature`, ...).
        update: mini-batches, micro-batch token budget, clipping, RL learning rate.
        evaluation: held-out evaluation options.
        mu: SFT-mixing coefficient during RL: a constant or a schedule (`ChordMuSchedule`).
        optimizer: builds the optimizer (LightningCLI conventions).
        lr_scheduler, rl_lr_scheduler: build the learning-rate schedule of the warm-up and of the
            RL phase; each starts with its phase and steps once per optimizer step.
        methods: RL-iteration plug-ins, by `class_path` (`egspo.methods.UECRL`, `egspo.methods.OGER`).
        fsdp: FSDP2 options under `ModelParallelStrategy` (see `egspo.distributed`).
    """

    def __init__(
        self,
        policy: PolicyConfig,
        policy_loss: PolicyLoss | None = None,
        warmup_loss: SFTLoss | None = None,
        mix_loss: SFTLoss | None = None,
        reward: RewardFunction | None = None,
        sft_iterations: int = 0,
        rl_iterations: int = 100,
        prompt: PromptConfig | None = None,
        rollout: RolloutConfig | None = None,
        update: UpdateConfig | None = None,
        evaluation: EvalConfig | None = None,
        mu: float | MuSchedule = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        rl_lr_scheduler: LRSchedulerCallable | None = None,
        methods: list[RLMethod] | None = None,
        fsdp: FSDPConfig | None = None,
    ) -> None:
        super().__init__()
        if sft_iterations < 0 or rl_iterations < 0 or sft_iterations + rl_iterations < 1:
            raise ValueError("model.sft_iterations and model.rl_iterations must be >= 0, and not both 0")
        self.policy_spec = policy
        self.sft_iterations, self.rl_iterations = sft_iterations, rl_iterations
        self.mu = ConstantMu(mu) if isinstance(mu, (int, float)) else mu
        self.fsdp_config = fsdp or FSDPConfig()
        self.methods = list(methods or [])
        self.optimizer_factory = optimizer
        self.automatic_optimization = False

        rollout, update = rollout or RolloutConfig(), update or UpdateConfig()
        policy_loss = policy_loss or EGSPOLoss()
        reward = reward or MathReward()
        self.tokenizer = load_tokenizer(policy)
        self.encoder = PromptEncoder(self.tokenizer, prompt or PromptConfig())
        self.reference = KLReference() if policy_loss.beta > 0 else None
        self.experience_builder = ExperienceBuilder(
            self.encoder, reward, rollout, update, pad_token_id=self.tokenizer.pad_token_id,
            methods=self.methods, reference=self.reference,
        )  # fmt: skip
        self.policy_update = PolicyUpdate(
            policy_loss, warmup_loss or NLLLoss(), mix_loss or NLLLoss(), update,
            temperature=rollout.temperature, backward=self.manual_backward,
        )  # fmt: skip
        self.evaluator = Evaluator(
            self.encoder,
            reward,
            evaluation or EvalConfig(),
            rollout.engine,
            self.experience_builder.sampling_params,
        )
        self.policy: torch.nn.Module | None = None
        self.summary = RunSummary()
        self.iteration = 0  # iterations completed
        self.learning_rates = PhaseLearningRates(lr_scheduler, rl_lr_scheduler, update.rl_learning_rate)
        self.rng_to_restore: list | None = None

    @property
    def policy_loss(self) -> PolicyLoss:
        """The RL loss (applied by the update; the gate schedule reads its gate here)."""
        return self.policy_update.policy_loss

    # ----------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError(f"trainer.strategy: {FSDP1_REFUSAL}")

    def configure_model(self) -> None:
        if self.policy is None:
            self.policy = load_policy(self.policy_spec, self.tokenizer)
            self.policy_loss.setup(
                vocab_size=self.policy.config.vocab_size,
                max_completion_length=self.experience_builder.config.max_completion_length,
            )
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 (FSDPStrategy wraps itself)
            shard_policy(self.policy, self.device_mesh, self.fsdp_config)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])

    def configure_callbacks(self) -> list[Callback]:
        """Rollouts and held-out evaluation (a run cannot forget them), the phase-aware progress bar."""
        bar = phase_progress_bar(self.trainer.progress_bar_callback)
        own = [RolloutCallback(self.experience_builder), HeldOutEvaluation(self.evaluator, self.summary)]
        return own + ([bar] if bar is not None else [])

    # ----------------------------------------------------------------- phases
    @property
    def phase(self) -> Phase:
        return "sft" if self.iteration < self.sft_iterations else "rl"

    @property
    def rl_iteration(self) -> int:
        """RL iterations completed."""
        return max(self.iteration - self.sft_iterations, 0)

    @property
    def total_iterations(self) -> int:
        return self.sft_iterations + self.rl_iterations

    def on_train_start(self) -> None:
        if (
            self.rng_to_restore is not None
        ):  # after the loaders are built: the next batch sees the saved streams
            restore_rng_states(self.rng_to_restore, self.trainer.global_rank)
            self.rng_to_restore = None

    # ----------------------------------------------------------------- the step
    def training_step(self, batch: IterationBatch, batch_idx: int) -> dict[str, Tensor | None]:
        """One iteration: SFT steps on demonstrations, or an RL update on the batch's experience."""
        if batch.iteration != self.iteration:
            raise RuntimeError(f"batch of iteration {batch.iteration} at iteration {self.iteration}")
        if self.learning_rates.phase != batch.phase:  # a phase's first step (also after a resume)
            self.learning_rates.start(batch.phase, self.optimizers().optimizer)
        if batch.phase == "sft":
            demonstrations = self.encoder.demonstrations(
                batch.expert_prompts, batch.expert_responses, self.device
            )
            steps = self.policy_update.sft_update(
                self.policy, self.optimizers(), demonstrations, self.learning_rates.scheduler
            )
            self.log("train/sft_loss", _mean(steps, "loss"), prog_bar=True)
            self.log_dict({f"sft/{k}": _mean(steps, k) for k in steps[-1] if k != "loss"})
            output = {}
        else:
            output = self.rl_step(batch)
        self.iteration += 1
        lr = self.optimizers().optimizer.param_groups[0]["lr"]
        self.log_dict({"iteration": float(self.iteration), "train/lr": lr, **self.policy_update.counters()})
        return output

    def rl_step(self, batch: IterationBatch) -> dict[str, Tensor | None]:
        """One RL iteration on the experience the rollout callback put into the batch."""
        experience = batch.experience
        # The gate threshold: once per rollout batch, over every rank's tokens.
        tokens = gather_variable(experience.entropy[experience.loss_mask.bool()].float())
        threshold = self.policy_loss.prepare(tokens)
        mu = float(self.mu(self.rl_iteration))
        demonstrations = None
        if mu > 0:
            demonstrations = self.encoder.demonstrations(
                batch.expert_prompts, batch.expert_responses, self.device
            )
        start = clock(self.device)
        train = partial(
            self.policy_update.rl_update, self.policy, self.optimizers(),
            threshold=threshold, scheduler=self.learning_rates.scheduler,
        )  # fmt: skip
        steps = train(experience, mu=mu, demonstrations=demonstrations)
        for method in self.methods:  # e.g. UEC-RL's replay update (one step on a batch of its own)
            self.log_dict(
                method.after_update(
                    experience, lambda b: train(b, mini_batch_size=len(b))[-1], self.rl_iteration
                )
            )
        self.log("time/update", clock(self.device) - start)

        # Rollout statistics, averaged over ranks (every rank holds as many rollouts).
        stats = dict(batch.rollout_stats)
        for key in ("reward", "entropy"):
            self.log(key, stats.pop(key), prog_bar=True, sync_dist=True)
        self.log_dict(stats, sync_dist=True)
        self.log("train/rl_loss", _mean(steps, "loss"))
        self.log("train/mu", mu)
        self.log_dict({f"rl/{k}": _mean(steps, k) for k in steps[-1] if k != "loss"})
        if threshold is not None:
            self.log("rl/gate_threshold", float(threshold))
        return {"gate_threshold": threshold}

    # ----------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Answers one eval batch; `HeldOutEvaluation` logs each epoch's results."""
        eval_set = self.trainer.datamodule.eval_set_names[dataloader_idx]
        seed = eval_seed(dataloader_idx, batch_idx * self.trainer.world_size + self.trainer.global_rank)
        self.evaluator.evaluate_batch(self.policy, eval_set, batch, seed)

    test_step = validation_step

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """What a resumed run needs beyond weights and optimizer: each component's own `state_dict`,
        as plain types and tensors (the checkpoint loads with `torch.load(weights_only=True)`)."""
        loss = self.policy_loss
        checkpoint["egspo"] = {
            "iteration": self.iteration,
            "sft_iterations": self.sft_iterations,
            "policy": dataclasses.asdict(self.policy_spec),
            **{name: part.state_dict() for name, part in self.stateful_parts().items()},
            "policy_loss": {"class": type(loss).__name__, "state": loss.state_dict()},
            "reference": None if self.reference is None else self.reference.state_dict(),
            "methods": {type(m).__name__: m.state_dict() for m in self.methods},
            "rng": capture_rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Put back what `on_save_checkpoint` saved; the RNG streams wait for the training loop.
        A loss or method the saved run did not have starts fresh."""
        state = checkpoint.get("egspo")
        if state is None:
            raise ValueError(
                "the checkpoint was not written by egspo (no 'egspo' state): cannot resume from it"
            )
        own = self.state_dict()
        check_resume(state, checkpoint.get("state_dict", {}), own, self.sft_iterations, self.total_iterations)
        self.iteration = state["iteration"]
        for name, part in self.stateful_parts().items():
            part.load_state_dict(state[name])
        if state["policy_loss"]["class"] == type(self.policy_loss).__name__:
            self.policy_loss.load_state_dict(state["policy_loss"]["state"])
        if self.reference is not None:
            self.reference.load_state_dict(state["reference"], self.policy)
        for method in self.methods:
            method.load_state_dict(state["methods"].get(type(method).__name__, {}))
        self.rng_to_restore = state["rng"]

    def stateful_parts(self) -> dict:
        """The components whose `state_dict` a checkpoint keeps, by name."""
        return {
            "summary": self.summary,
            "update": self.policy_update,
            "experience_builder": self.experience_builder,
            "learning_rates": self.learning_rates,
        }


def _mean(steps: list[dict[str, float]], key: str) -> float:
    values = [s[key] for s in steps if key in s]
    return sum(values) / max(len(values), 1)
