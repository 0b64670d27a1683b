"""The LightningModule: a two-phase state machine, SFT warm-up then RL, around plain components.

Each phase is one training epoch of one batch per iteration. An SFT iteration takes optimizer
steps on expert demonstrations. An RL iteration finds its experience already in the batch
(`RolloutCallback` samples, rewards and scores it with the `ExperienceBuilder` just before the
step), computes the gate threshold once, and runs the update (`PolicyUpdate.rl_iteration`:
`ppo_epochs` x mini-batches, one optimizer step each). Lightning's validation loop evaluates
held-out sets at the end of each phase (and every `trainer.val_check_interval` iterations).

The batch is the one interface between the data, the rollout callback and the step:
`{"iteration", "phase", "prompts", "answers", "expert_prompts", "expert_responses"}`, plus
`EXPERIENCE` and `ROLLOUT_STATS` for RL iterations. Manual optimization: Lightning's
`global_step` counts optimizer steps, `iteration` counts iterations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from egspo.components import build_components
from egspo.config import EvalConfig, PromptConfig, RolloutConfig, UpdateConfig
from egspo.data.encoding import PromptEncoder
from egspo.distributed import FSDP1_REFUSAL, FSDPConfig, gather_variable, shard_policy
from egspo.evaluation import Evaluator, RunSummary, eval_seed
from egspo.losses import EGSPOLoss, NLLLoss, PolicyLoss, SFTLoss
from egspo.model import PolicyConfig, load_policy, load_tokenizer
from egspo.rewards import MathReward, RewardFunction
from egspo.rewards.oger import OGERBonus
from egspo.rollout.builder import ExperienceBuilder, clock
from egspo.rollout.experience import Experience
from egspo.rollout.exploration import UECConfig
from egspo.rollout.replay import ReplayStabiliser
from egspo.run_state import (
    restore_rng_snapshot,
    restore_rng_states,
    restore_run_state,
    rng_snapshot,
    run_state,
)
from egspo.schedules import ConstantMu, MuSchedule, PhaseLearningRates
from egspo.update import PolicyUpdate

EXPERIENCE = "experience"
ROLLOUT_STATS = "rollout_stats"
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
        exploration_bonus: OGER's exploration bonus on correct samples (`egspo.rewards.oger.OGERBonus`).
        uec: UEC-RL's targeted exploration and replay stabiliser (`egspo.rollout.exploration.UECConfig`).
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
        exploration_bonus: OGERBonus | None = None,
        uec: UECConfig | None = None,
        fsdp: FSDPConfig | None = None,
    ) -> None:
        super().__init__()
        if sft_iterations < 0 or rl_iterations < 0 or sft_iterations + rl_iterations < 1:
            raise ValueError("model.sft_iterations and model.rl_iterations must be >= 0, and not both 0")
        self.policy_spec = policy
        self.sft_iterations, self.rl_iterations = sft_iterations, rl_iterations
        self.rollout = rollout or RolloutConfig()
        self.update_config = update or UpdateConfig()
        self.eval_config = evaluation or EvalConfig()
        self.mu = ConstantMu(mu) if isinstance(mu, (int, float)) else mu
        self.reward = reward or MathReward()
        self.fsdp_config = fsdp or FSDPConfig()
        self.exploration_bonus, self.uec = exploration_bonus, uec
        self.optimizer_factory = optimizer
        self.automatic_optimization = False

        self.tokenizer = load_tokenizer(policy)
        self.encoder = PromptEncoder(self.tokenizer, prompt or PromptConfig())
        self.update = PolicyUpdate(
            policy_loss or EGSPOLoss(),
            warmup_loss or NLLLoss(),
            mix_loss or NLLLoss(),
            self.update_config,
            temperature=self.rollout.temperature,
            backward=self.manual_backward,
        )
        self.policy: torch.nn.Module | None = None
        self.experience_builder: ExperienceBuilder | None = None  # driven by RolloutCallback
        self.reference = None  # the KL reference, when policy_loss.beta > 0
        self.replay: ReplayStabiliser | None = None  # UEC-RL's stabiliser
        self.evaluator: Evaluator | None = None
        self.summary = RunSummary()
        self.iteration = 0  # iterations completed
        self.learning_rates = PhaseLearningRates(
            lr_scheduler, rl_lr_scheduler, self.update_config.rl_learning_rate
        )
        self.rng_to_restore: list | None = None
        self._rng_before_eval: tuple | None = None

    @property
    def policy_loss(self) -> PolicyLoss:
        """The RL loss (held by the update, which is the one that applies it)."""
        return self.update.policy_loss

    @policy_loss.setter
    def policy_loss(self, loss: PolicyLoss) -> None:
        self.update.policy_loss = loss

    # ----------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError(f"trainer.strategy: {FSDP1_REFUSAL}")

    def configure_model(self) -> None:
        if self.policy is None:
            self.policy = load_policy(self.policy_spec, self.tokenizer)
            self.policy_loss.setup(
                vocab_size=self.policy.config.vocab_size,
                max_completion_length=self.rollout.max_completion_length,
            )
            parts = build_components(
                self.policy, self.tokenizer, self.encoder, self.reward, rollout=self.rollout,
                update=self.update_config, evaluation=self.eval_config, policy_loss=self.policy_loss,
                exploration_bonus=self.exploration_bonus, uec=self.uec,
            )  # fmt: skip
            self.experience_builder, self.evaluator = parts.experience_builder, parts.evaluator
            self.reference, self.replay = parts.reference, parts.replay
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 (FSDPStrategy wraps itself)
            shard_policy(self.policy, self.device_mesh, self.fsdp_config)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])

    def configure_callbacks(self):
        from egspo.callbacks import RolloutCallback, phase_progress_bar

        bar = phase_progress_bar(self.trainer.progress_bar_callback)
        return [RolloutCallback()] + ([bar] if bar is not None else [])

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
    def training_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor | None]:
        """One iteration: SFT steps on demonstrations, or an RL update on the batch's experience."""
        if batch["iteration"] != self.iteration:
            raise RuntimeError(f"batch of iteration {batch['iteration']} at iteration {self.iteration}")
        if self.learning_rates.phase != batch["phase"]:  # a phase's first step (also after a resume)
            self.learning_rates.start(batch["phase"], self.optimizers().optimizer)
        if batch["phase"] == "sft":
            demonstrations = self.encoder.demonstrations(
                batch["expert_prompts"], batch["expert_responses"], self.device
            )
            steps = self.update.sft_iteration(
                self.policy, self.optimizers(), demonstrations, self.learning_rates.scheduler
            )
            self.log("train/sft_loss", _mean(steps, "loss"), prog_bar=True)
            self.log_dict({f"sft/{k}": _mean(steps, k) for k in steps[-1] if k != "loss"})
            output = {}
        else:
            output = self.rl_step(batch)
        self.iteration += 1
        lr = self.optimizers().optimizer.param_groups[0]["lr"]
        self.log_dict({"iteration": float(self.iteration), "train/lr": lr, **self.update.counters()})
        return output

    def rl_step(self, batch: dict) -> dict[str, Tensor | None]:
        """One RL iteration on the experience the rollout callback put into the batch."""
        experience: Experience = batch[EXPERIENCE]
        # The gate threshold: once per rollout batch, over every rank's tokens.
        tokens = gather_variable(experience.entropy[experience.loss_mask.bool()].float())
        threshold = self.policy_loss.prepare(tokens)
        mu = float(self.mu(self.rl_iteration))
        demonstrations = None
        if mu > 0:
            demonstrations = self.encoder.demonstrations(
                batch["expert_prompts"], batch["expert_responses"], self.device
            )
        start = clock(self.device)
        steps = self.update.rl_iteration(
            self.policy,
            self.optimizers(),
            experience,
            threshold=threshold,
            mu=mu,
            demonstrations=demonstrations,
            scheduler=self.learning_rates.scheduler,
        )
        if self.replay is not None:  # UEC-RL's stabiliser: a replay update every few iterations
            self.log_dict(
                self.update.replay_iteration(
                    self.policy, self.optimizers(), self.replay, experience, threshold=threshold,
                    temperature=self.rollout.temperature, rl_iteration=self.rl_iteration,
                    scheduler=self.learning_rates.scheduler,
                )
            )  # fmt: skip
        self.log("time/update", clock(self.device) - start)

        # Rollout statistics, averaged over ranks (every rank holds as many rollouts).
        stats = dict(batch.get(ROLLOUT_STATS, {}))
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
    def on_validation_start(self) -> None:
        # Evaluating mid-fit must not move the training run's random streams.
        self._rng_before_eval = rng_snapshot() if self.trainer.state.fn == "fit" else None

    def on_validation_end(self) -> None:
        if self._rng_before_eval is not None:
            restore_rng_snapshot(self._rng_before_eval)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        eval_set = self.trainer.datamodule.eval_set_names[dataloader_idx]
        seed = eval_seed(dataloader_idx, batch_idx * self.trainer.world_size + self.trainer.global_rank)
        self.evaluator.evaluate_batch(self.policy, eval_set, batch, seed)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        results = self._log_eval("val")
        if self.trainer.state.fn == "fit" and self.iteration in (self.sft_iterations, self.total_iterations):
            phase = "sft" if self.iteration == self.sft_iterations else "rl"
            self.summary.record(phase, results)
            rank_zero_info(
                f"held-out accuracy after {phase} (iteration {self.iteration}): {self.summary.headline(phase):.3f}"
            )

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> dict[str, dict[str, float]]:
        """`<stage>/<set>/<metric>`: greedy accuracy, pass@k, maj@k, length, truncation rate."""
        results = self.evaluator.results()
        self.log_dict(
            {f"{stage}/{n}/{k}": v for n, m in results.items() for k, v in m.items()},
            add_dataloader_idx=False,
        )
        return results

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero and self.summary.phases:
            path = self.summary.write(
                Path(self.trainer.log_dir or self.trainer.default_root_dir), self.iteration
            )
            print(f"\n{self.summary.table()}\nsummary: {path}")

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["egspo"] = run_state(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_run_state(self, checkpoint)  # one-line errors when this run cannot continue from it


def _mean(steps: list[dict[str, float]], key: str) -> float:
    values = [s[key] for s in steps if key in s]
    return sum(values) / max(len(values), 1)
