"""The LightningModule: a two-phase state machine, SFT warm-up then RL, around one update loop.

One `training_step` is one iteration. The first `sft_iterations` iterations train on expert
demonstrations alone; the next `rl_iterations` train on the policy's own rollouts, which the
`RolloutCallback` collects before the step (sample, reward, group advantages, score). An RL
iteration then makes `ppo_epochs` passes over mini-batches of that experience, one optimizer
step per mini-batch, so the module uses manual optimization: Lightning's `global_step` counts
optimizer steps, and `iteration` counts iterations.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric

from egspo.advantages import group_advantages
from egspo.callbacks.checkpointing import capture_rng_states, restore_rng_states
from egspo.data.prompts import format_prompt
from egspo.distributed import FSDPConfig, gather_variable, shard_policy
from egspo.losses import LossOutput, NLLLoss, PolicyLoss, SFTLoss, TokenBatch
from egspo.metrics import EvalMetrics, resolve_pass_k
from egspo.model import PolicyConfig, load_policy, load_tokenizer
from egspo.rewards import MathReward, RewardFunction, RewardOutput
from egspo.rollout import Experience, HFGenerateEngine
from egspo.schedules import ConstantMu, MuSchedule
from egspo.scoring import token_logprobs

log = logging.getLogger(__name__)

Phase = Literal["sft", "rl"]


class NonFiniteLossError(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient."""


class HybridRLModule(LightningModule):
    """Hybrid SFT -> RL post-training of a causal LM with a pluggable token-level policy loss.

    Args:
        policy: the model and tokenizer (see `PolicyConfig`).
        policy_loss: RL loss, by `class_path` (`egspo.losses.EGSPOLoss`, `PPOClipLoss`, ...).
        sft_loss: loss on expert tokens, for the SFT phase and for mixing during RL.
        reward: reward function on decoded completions, by `class_path`.
        sft_iterations: iterations of the SFT warm-up.
        rl_iterations: iterations of RL after the warm-up.
        num_generations: samples per prompt (the group of the group-relative advantage).
        max_prompt_length: prompt tokens kept; longer prompts lose their beginning and are counted.
        max_completion_length: new tokens per sample at most.
        temperature, top_p, top_k: sampling; log-probs are scored under the same temperature.
        ppo_epochs: passes over each rollout batch.
        mini_batch_size: sequences per optimizer step in RL (default: the whole rollout batch).
            Must divide prompts_per_step x num_generations.
        sft_batch_size: expert sequences per optimizer step (default: all of the iteration's batch).
        advantage_scale: "group" (GRPO), "batch", or "none" (Dr.GRPO).
        mu: SFT-mixing coefficient during RL, `L = (1 - mu) L_RL + mu L_SFT`: a constant or a
            schedule (`egspo.schedules.ChordMuSchedule`).
        optimizer, lr_scheduler: callables that build them (LightningCLI conventions).
        rl_learning_rate: learning rate from the first RL iteration on (default: unchanged).
        max_grad_norm: gradient clipping (manual optimization cannot use the Trainer's flag).
        max_nonfinite_updates: stop after this many skipped updates in a row.
        logprob_chunk_size: rows per chunk in the fused log-prob/entropy op (default: about 256 MB
            of fp32 logits per chunk for the vocabulary).
        max_sft_length: expert sequences are truncated to this many tokens.
        system_prompt, instruction: prompt formatting (chat template when the tokenizer has one).
        eval_max_completion_length: answer length on eval sets (default: max_completion_length).
        eval_num_samples: answers per eval prompt for pass@k, maj@k, length and truncation rate;
            sampled at the training temperature when > 1, else the greedy answer. The headline
            `accuracy` is always the greedy answer's.
        eval_pass_k: the k of pass@k and maj@k (default: 1 and eval_num_samples).
        evaluate_at_phase_end: measure held-out accuracy after SFT and after RL, into summary.json.
        eval_every_n_iterations: also measure it every n iterations (logged as `val/<set>/accuracy`).
        fsdp: FSDP2 options under `ModelParallelStrategy`, which shards each decoder layer and
            the root (see `egspo.distributed`); ignored by other strategies.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        policy_loss: PolicyLoss | None = None,
        sft_loss: SFTLoss | None = None,
        reward: RewardFunction | None = None,
        sft_iterations: int = 0,
        rl_iterations: int = 100,
        num_generations: int = 8,
        max_prompt_length: int = 512,
        max_completion_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        ppo_epochs: int = 1,
        mini_batch_size: int | None = None,
        sft_batch_size: int | None = None,
        advantage_scale: Literal["group", "batch", "none"] = "group",
        mu: float | MuSchedule = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        rl_learning_rate: float | None = None,
        max_grad_norm: float | None = 1.0,
        max_nonfinite_updates: int = 5,
        logprob_chunk_size: int | None = None,
        max_sft_length: int = 1024,
        system_prompt: str | None = None,
        instruction: str | None = None,
        eval_max_completion_length: int | None = None,
        eval_num_samples: int = 1,
        eval_pass_k: list[int] | None = None,
        evaluate_at_phase_end: bool = True,
        eval_every_n_iterations: int | None = None,
        fsdp: FSDPConfig | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["policy_loss", "sft_loss", "reward", "optimizer", "lr_scheduler"])
        _check_positive(
            num_generations=num_generations - 1,
            ppo_epochs=ppo_epochs,
            max_completion_length=max_completion_length,
            max_prompt_length=max_prompt_length,
            max_nonfinite_updates=max_nonfinite_updates,
        )
        if sft_iterations < 0 or rl_iterations < 0:
            raise ValueError("sft_iterations and rl_iterations must be >= 0")
        self.eval_pass_k = resolve_pass_k(eval_num_samples, eval_pass_k)
        self.policy_spec = policy
        self.fsdp_config = fsdp if fsdp is not None else FSDPConfig()
        self.policy_loss = policy_loss if policy_loss is not None else _default_policy_loss()
        self.sft_loss = sft_loss if sft_loss is not None else NLLLoss()
        self.reward = reward if reward is not None else MathReward()
        self.mu = ConstantMu(mu) if isinstance(mu, (int, float)) else mu
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

        self.tokenizer = load_tokenizer(policy)
        self.engine = HFGenerateEngine(
            max_completion_length=max_completion_length,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        self.policy: torch.nn.Module | None = None
        self.iteration = 0
        self.summary: dict[str, Any] = {}
        self.summary_metrics: dict[str, dict[str, dict[str, float]]] = {}
        self._stage_metrics: dict[str, EvalMetrics] = {}
        self._nonfinite_streak = 0
        self._rng_to_restore: list[dict] | None = None
        self._skipped_updates = 0
        self._prompts_over_length = 0
        self.last_experience: Experience | None = None
        # Loss metrics of the last RL mini-batch (gate threshold, branch fractions), for diagnostics.
        self.last_rl_metrics: dict[str, Tensor] = {}
        self.automatic_optimization = False

        # Step values over all ranks' rollouts, not the first rank's.
        self.train_reward = MeanMetric(dist_sync_on_step=True)
        self.train_accuracy = MeanMetric(dist_sync_on_step=True)
        self.train_length = MeanMetric(dist_sync_on_step=True)
        self.train_truncated = MeanMetric(dist_sync_on_step=True)

    # ----------------------------------------------------------------- set-up
    def configure_model(self) -> None:
        if self.policy is None:
            self.policy = load_policy(self.policy_spec, self.tokenizer)
            vocab_size = self.policy.config.vocab_size
            for holder in (self.policy_loss, getattr(self.policy_loss, "gate", None)):
                if holder is not None and getattr(holder, "vocab_size", False) is None:
                    holder.vocab_size = vocab_size
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 (once; FSDPStrategy wraps itself)
            shard_policy(self.policy, self.device_mesh, self.fsdp_config)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def configure_callbacks(self):
        from egspo.callbacks import RolloutCallback, phase_progress_bar

        bar = phase_progress_bar(self.trainer.progress_bar_callback)
        return [RolloutCallback()] + ([bar] if bar is not None else [])

    # ----------------------------------------------------------------- phases
    @property
    def total_iterations(self) -> int:
        return self.hparams.sft_iterations + self.hparams.rl_iterations

    @property
    def phase(self) -> Phase:
        return "sft" if self.iteration < self.hparams.sft_iterations else "rl"

    @property
    def rl_iteration(self) -> int:
        return self.iteration - self.hparams.sft_iterations

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore, self.trainer.global_rank)
            self._rng_to_restore = None
        if self.iteration >= self.total_iterations:
            self.trainer.should_stop = True

    def _enter_rl(self) -> None:
        if self.hparams.evaluate_at_phase_end and "sft" not in self.summary:
            self._evaluate_phase("sft")
            rank_zero_info(f"held-out accuracy after the warm-up: {_fmt(self.summary['sft'])}")
        if self.hparams.rl_learning_rate is not None:
            for group in self.optimizers().optimizer.param_groups:
                group["lr"] = self.hparams.rl_learning_rate

    # ----------------------------------------------------------------- tokenisation
    def format_prompts(self, questions: list[str]) -> list[str]:
        return [
            format_prompt(
                self.tokenizer,
                q,
                system_prompt=self.hparams.system_prompt,
                instruction=self.hparams.instruction,
            )
            for q in questions
        ]

    def encode_prompts(self, questions: list[str]) -> tuple[Tensor, Tensor, int]:
        """Left-padded prompt ids and mask; prompts over the limit keep their end and are counted."""
        texts = self.format_prompts(questions)
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        limit = self.hparams.max_prompt_length
        over = sum(len(x) > limit for x in ids)
        ids = [x[-limit:] for x in ids]
        input_ids, attention_mask = _left_pad(ids, self.tokenizer.pad_token_id, self.device)
        return input_ids, attention_mask, over

    def encode_demonstrations(
        self, prompts: list[str], responses: list[str]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`[prompt | response EOS]` sequences, left-padded, with a mask on the response tokens."""
        texts = self.format_prompts(prompts)
        prompt_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        response_ids = self.tokenizer(responses, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        limit = self.hparams.max_sft_length
        sequences, masks = [], []
        for p, r in zip(prompt_ids, response_ids, strict=True):
            seq = (p + r + [eos])[:limit]
            sequences.append(seq)
            masks.append([0] * len(p) + [1] * (len(seq) - len(p)))
        input_ids, attention_mask = _left_pad(sequences, self.tokenizer.pad_token_id, self.device)
        score_mask, _ = _left_pad(masks, 0, self.device)
        return input_ids, attention_mask, score_mask.float()

    # ----------------------------------------------------------------- scoring
    def score(self, input_ids: Tensor, attention_mask: Tensor, score_mask: Tensor) -> tuple[Tensor, Tensor]:
        return token_logprobs(
            self.policy,
            input_ids,
            attention_mask,
            score_mask,
            temperature=self.hparams.temperature if self.phase == "rl" else 1.0,
            chunk_size=self.hparams.logprob_chunk_size,
        )

    def needs_reference(self) -> bool:
        return getattr(self.policy_loss, "beta", 0.0) > 0

    def reference_context(self):
        """The reference policy: the base with LoRA adapters disabled, or a frozen copy."""
        disable = getattr(self.policy, "disable_adapter", None)
        if callable(disable):
            return disable()
        raise ValueError(
            "policy_loss.beta > 0 needs a reference policy: use `policy.lora` (the base model with "
            "adapters disabled is the reference)"
        )

    def single_update(self, batch_size: int) -> bool:
        """True when each rollout batch gets exactly one optimizer step: old log-probs = current."""
        mini = self.hparams.mini_batch_size or batch_size
        return self.hparams.ppo_epochs == 1 and mini >= batch_size

    @torch.no_grad()
    def build_experience(self, batch: dict) -> tuple[Experience, dict[str, float]]:
        """Sample, reward, advantages and (when needed) old/reference log-probs for one RL iteration."""
        g = self.hparams.num_generations
        timings: dict[str, float] = {}
        t0 = _clock(self.device)
        prompt_ids, prompt_mask, over = self.encode_prompts(batch["prompts"])
        if over:
            if not self._prompts_over_length:
                rank_zero_warn(
                    f"iteration {self.iteration}: {over} of {len(batch['prompts'])} prompts exceed "
                    f"max_prompt_length={self.hparams.max_prompt_length} tokens and lose their "
                    "beginning; counted in data/prompts_over_length(_total)"
                )
            self._prompts_over_length += over
        rollout = self.engine.generate(self.policy, prompt_ids, prompt_mask, g)
        t1 = _clock(self.device)
        completions = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        answers = [a for a in batch["answers"] for _ in range(g)]
        reward_out = self.reward(completions, answers)
        rewards = reward_out.rewards.to(self.device, torch.float32)
        advantages = group_advantages(rewards, g, scale=self.hparams.advantage_scale)
        t2 = _clock(self.device)

        score_mask = torch.cat(
            [
                rollout.completion_mask.new_zeros(rollout.input_ids.shape[0], rollout.prompt_length),
                rollout.completion_mask,
            ],
            dim=1,
        )
        p = rollout.prompt_length
        old_logprobs = entropy = ref_logprobs = None
        if not self.single_update(rollout.input_ids.shape[0]):
            logprobs, ent = self.score(rollout.input_ids, rollout.attention_mask, score_mask)
            old_logprobs, entropy = logprobs[:, p:], ent[:, p:]
        if self.needs_reference():
            with self.reference_context():
                ref_logprobs = self.score(rollout.input_ids, rollout.attention_mask, score_mask)[0][:, p:]
        t3 = _clock(self.device)

        experience = Experience(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            completion_mask=rollout.completion_mask.float(),
            old_logprobs=old_logprobs,
            entropy=entropy
            if entropy is not None
            else torch.zeros_like(rollout.completion_mask, dtype=torch.float32),
            advantages=advantages,
            rewards=rewards,
            truncated=rollout.truncated,
            prompt_length=p,
            ref_logprobs=ref_logprobs,
            correct=_correct(reward_out).to(self.device),
            completions=completions,
        )
        stats = {k: float(v) for k, v in reward_out.metrics.items()}
        stats.update(
            {
                "data/prompts_over_length": float(over),
                "data/prompts_over_length_total": float(self._prompts_over_length),
                "time/generation": t1 - t0,
                "time/reward": t2 - t1,
                "time/scoring": t3 - t2,
            }
        )
        timings.update(stats)
        return experience, timings

    # ----------------------------------------------------------------- the step
    def training_step(self, batch: dict, batch_idx: int) -> None:
        if self.iteration >= self.total_iterations:
            self.trainer.should_stop = True
            return
        if self.phase == "sft":
            self._sft_iteration(batch)
        else:
            if self.iteration == self.hparams.sft_iterations:
                self._enter_rl()
            self._rl_iteration(batch)
        self.iteration += 1
        self.log("iteration", float(self.iteration), prog_bar=False)
        every = self.hparams.eval_every_n_iterations
        if every and self.iteration % every == 0 and self.iteration < self.total_iterations:
            self._log_eval(self.evaluate_held_out_metrics())
        if self.iteration >= self.total_iterations:
            self.trainer.should_stop = True

    def _sft_iteration(self, batch: dict) -> None:
        n = len(batch["expert_prompts"])
        size = self.hparams.sft_batch_size or n
        metrics: dict[str, Tensor] = {}
        for start in range(0, n, size):
            out = self._sft_loss(
                batch["expert_prompts"][start : start + size], batch["expert_responses"][start : start + size]
            )
            self._optimizer_step(out.loss)
            metrics = out.metrics
        self.log("train/sft_loss", out.loss.detach(), prog_bar=True)
        self.log_dict({f"sft/{k}": v for k, v in metrics.items()})

    def _sft_loss(self, prompts: list[str], responses: list[str]) -> LossOutput:
        input_ids, attention_mask, score_mask = self.encode_demonstrations(prompts, responses)
        logprobs, _ = self.score(input_ids, attention_mask, score_mask)
        return self.sft_loss(logprobs, score_mask)

    def _rl_iteration(self, batch: dict) -> None:
        experience: Experience = batch["experience"]
        stats: dict[str, float] = batch.get("rollout_stats", {})
        n = len(experience)
        mini = self.hparams.mini_batch_size or n
        mu = float(self.mu(self.rl_iteration))
        threshold = None
        if experience.old_logprobs is not None:
            threshold = self._gate_threshold(experience.entropy, experience.completion_mask)
        t0 = _clock(self.device)
        last: LossOutput | None = None
        for _ in range(self.hparams.ppo_epochs):
            for mb in experience.minibatches(mini):
                last = self._rl_loss(mb, threshold, batch if mu > 0 else None, mu)
                self._optimizer_step(last.loss)
        t1 = _clock(self.device)

        self.last_experience = experience
        self.last_rl_metrics = last.metrics
        self.train_reward(experience.rewards.mean())
        self.train_accuracy(experience.correct.float().mean())
        self.train_length(experience.completion_mask.sum(1).float().mean())
        self.train_truncated(experience.truncated.float().mean())
        self.log("reward", self.train_reward, prog_bar=True)
        self.log("train/accuracy", self.train_accuracy)
        self.log("train/response_length", self.train_length)
        self.log("train/truncation_rate", self.train_truncated)
        self.log("train/rl_loss", last.loss.detach())
        self.log("train/mu", mu)
        self.log(
            "entropy",
            _masked_mean(experience.entropy, experience.completion_mask),
            prog_bar=True,
            sync_dist=True,
        )
        self.log_dict({f"rl/{k}": v for k, v in last.metrics.items()})
        self.log_dict({**stats, "time/update": t1 - t0})

    def _gate_threshold(self, entropy: Tensor, mask: Tensor) -> Tensor | None:
        """The gate threshold over the global rollout batch: all ranks' valid tokens."""
        gate = getattr(self.policy_loss, "gate", None)
        if gate is None:
            return None
        values = entropy[mask.bool()]
        if self.trainer.world_size > 1:
            values = gather_variable(values)
        return gate.threshold(values, torch.ones_like(values))

    def _rl_loss(self, mb: Experience, threshold: Tensor | None, batch: dict | None, mu: float) -> LossOutput:
        logprobs, entropy = self.score(mb.input_ids, mb.attention_mask, mb.score_mask())
        p = mb.prompt_length
        logprobs, entropy = logprobs[:, p:], entropy[:, p:]
        old = mb.old_logprobs
        if old is None:  # single update: the rollout policy is the current one
            old = logprobs.detach()
            mb.entropy = entropy
            threshold = self._gate_threshold(entropy, mb.completion_mask)
        token_batch = TokenBatch(
            logprobs=logprobs,
            old_logprobs=old,
            advantages=mb.advantages[:, None].expand_as(logprobs),
            entropy=mb.entropy,
            mask=mb.completion_mask,
            ref_logprobs=mb.ref_logprobs,
            entropy_threshold=threshold,
        )
        out = self.policy_loss(token_batch)
        if batch is None:
            return out
        sft = self._sft_loss(batch["expert_prompts"], batch["expert_responses"])
        metrics = {**out.metrics, **{f"sft_{k}": v for k, v in sft.metrics.items()}}
        return LossOutput(loss=(1.0 - mu) * out.loss + mu * sft.loss, metrics=metrics)

    def _optimizer_step(self, loss: Tensor) -> None:
        """Backward and step, skipping (and counting) updates with a non-finite loss or gradient."""
        optimizer = self.optimizers()
        finite = bool(torch.isfinite(loss))
        if finite:
            self.manual_backward(loss)
            if self.hparams.max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.policy.parameters() if p.grad is not None], self.hparams.max_grad_norm
                )
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: DTensor
                finite = bool(torch.isfinite(norm))
                self.log("train/grad_norm", norm.detach().float())
        if finite:
            optimizer.step()
            self._nonfinite_streak = 0
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        else:
            self._nonfinite_streak += 1
            self._skipped_updates += 1
            rank_zero_warn(f"iteration {self.iteration}: non-finite loss or gradient, update skipped")
            if self._nonfinite_streak >= self.hparams.max_nonfinite_updates:
                raise NonFiniteLossError(
                    f"{self._nonfinite_streak} updates in a row had a non-finite loss or gradient "
                    f"(max_nonfinite_updates={self.hparams.max_nonfinite_updates}); stopping at "
                    f"iteration {self.iteration}. Lower the learning rate or check the data."
                )
        optimizer.zero_grad(set_to_none=True)
        self.log("train/nonfinite_streak", float(self._nonfinite_streak))
        self.log("train/skipped_updates", float(self._skipped_updates))
        self.log("train/lr", optimizer.optimizer.param_groups[0]["lr"])

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def answer(self, questions: list[str], max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers to `questions`."""
        return self._eval_rollout(questions, 1, max_new_tokens=max_new_tokens)[0]

    def _eval_rollout(
        self,
        questions: list[str],
        num_samples: int,
        *,
        do_sample: bool = False,
        max_new_tokens: int | None = None,
    ) -> tuple[list[str], Tensor, Tensor]:
        """Decoded answers (`num_samples` per question, grouped), their token counts and truncation flags."""
        ids, mask, _ = self.encode_prompts(questions)
        engine = HFGenerateEngine(
            max_completion_length=max_new_tokens
            or self.hparams.eval_max_completion_length
            or self.hparams.max_completion_length,
            temperature=self.hparams.temperature,
            top_p=self.hparams.top_p,
            top_k=self.hparams.top_k,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        rollout = engine.generate(self.policy, ids, mask, num_samples, do_sample=do_sample)
        texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        return texts, rollout.completion_mask.sum(1), rollout.truncated

    @torch.no_grad()
    def _eval_batch(self, batch: dict, metrics: EvalMetrics, seed: int) -> None:
        """Update `metrics` with the greedy answers' correctness and `eval_num_samples` answers per prompt.

        More than one sample per prompt is drawn at the training temperature under a private RNG
        seeded with `seed`, so evaluating mid-run neither changes the training rollouts nor
        depends on when it happens.
        """
        questions, answers = batch["prompts"], batch["answers"]
        texts, lengths, truncated = self._eval_rollout(questions, 1)
        correct = _correct(self.reward(texts, answers)).to(self.device)
        n = self.hparams.eval_num_samples
        samples = correct[:, None]
        if n > 1:
            with _seeded_rng(self.device, seed):
                texts, lengths, truncated = self._eval_rollout(questions, n, do_sample=True)
            repeated = [a for a in answers for _ in range(n)]
            samples = _correct(self.reward(texts, repeated)).to(self.device).view(-1, n)
        metrics.update(
            greedy_correct=correct,
            correct=samples,
            completions=[texts[i * n : (i + 1) * n] for i in range(len(questions))],
            lengths=lengths.view(-1, n),
            truncated=truncated.view(-1, n),
        )

    def _new_eval_metrics(self) -> EvalMetrics:
        return EvalMetrics(self.hparams.eval_num_samples, self.eval_pass_k).to(self.device)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, dataloader_idx)

    def _eval_step(self, batch: dict, batch_idx: int, dataloader_idx: int) -> None:
        name = self._eval_name(dataloader_idx)
        if name not in self._stage_metrics:
            self._stage_metrics[name] = self._new_eval_metrics()
        unique_batch = batch_idx * self.trainer.world_size + self.trainer.global_rank
        self._eval_batch(batch, self._stage_metrics[name], seed=_eval_seed(dataloader_idx, unique_batch))

    def on_validation_epoch_start(self) -> None:
        self._stage_metrics = {}

    def on_test_epoch_start(self) -> None:
        self._stage_metrics = {}

    def on_validation_epoch_end(self) -> None:
        self._log_stage_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_stage_metrics("test")

    def _log_stage_metrics(self, stage: str) -> None:
        """`<stage>/<set>/<metric>`: accuracy, pass@k, maj@k, response_length, truncation_rate."""
        for name, metrics in self._stage_metrics.items():
            values = metrics.compute()  # reduced over ranks by the metrics themselves
            self.log_dict(
                {f"{stage}/{name}/{key}": value for key, value in values.items()},
                add_dataloader_idx=False,
                sync_dist=True,
            )
        self._stage_metrics = {}

    def _eval_name(self, dataloader_idx: int) -> str:
        names = getattr(self.trainer.datamodule, "eval_set_names", None) or []
        return names[dataloader_idx] if dataloader_idx < len(names) else str(dataloader_idx)

    def evaluate_held_out(self) -> dict[str, float]:
        """Greedy accuracy on every eval set, over all ranks: `{set: accuracy}`."""
        return {name: values["accuracy"] for name, values in self.evaluate_held_out_metrics().items()}

    def evaluate_held_out_metrics(self) -> dict[str, dict[str, float]]:
        """Every eval metric on every eval set (`{set: {metric: value}}`, see `egspo.metrics.EvalMetrics`).

        Runs outside Lightning's validation loop (during `fit`): batches are dealt to ranks in
        turn and the metrics reduce their sums over ranks. The global RNG comes out as it went
        in (data loaders draw from it too), so a mid-run evaluation leaves the training run as is.
        """
        datamodule = self.trainer.datamodule
        loaders = datamodule.val_dataloader()
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        rank, world = self.trainer.global_rank, self.trainer.world_size
        results = {}
        with _seeded_rng(self.device):
            for idx, loader in enumerate(loaders):
                metrics = self._new_eval_metrics()
                for i, batch in enumerate(loader):
                    if i % world == rank:
                        self._eval_batch(batch, metrics, seed=_eval_seed(idx, i))
                results[self._eval_name(idx)] = {k: float(v) for k, v in metrics.compute().items()}
        return results

    def _evaluate_phase(self, key: str) -> None:
        """Held-out metrics at the end of a phase, into the summary and the loggers."""
        results = self.evaluate_held_out_metrics()
        self.summary[key] = {name: values["accuracy"] for name, values in results.items()}
        self.summary_metrics[key] = results
        self._log_eval(results)

    def _log_eval(self, results: dict[str, dict[str, float]]) -> None:
        """Held-out metrics (`val/<set>/<metric>`) to every logger, stamped with the current iteration."""
        metrics = {f"val/{name}/{key}": v for name, values in results.items() for key, v in values.items()}
        metrics["iteration"] = float(self.iteration)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def on_train_end(self) -> None:
        if not self.hparams.evaluate_at_phase_end:
            return
        key = "rl" if self.hparams.rl_iterations > 0 else "sft"
        if self.iteration >= self.total_iterations and key not in self.summary:
            self._evaluate_phase(key)
        self._write_summary()

    def _write_summary(self) -> None:
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        summary = {
            **{
                k: {"accuracy": _headline(v), "per_set": v, "metrics": self.summary_metrics.get(k, {})}
                for k, v in self.summary.items()
            },
            "run_dir": str(run_dir),
            "iterations": self.iteration,
        }
        if self.trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            rows = [f"{'checkpoint':<12}{'held-out accuracy':>20}"]
            for k in ("sft", "rl"):
                if k in self.summary:
                    label = "warm-up (SFT)" if k == "sft" else "after RL"
                    rows.append(f"{label:<16}{_headline(self.summary[k]):>16.3f}")
            print("\n" + "\n".join(rows) + f"\nsummary: {run_dir / 'summary.json'}")

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain types and tensors only: the checkpoint loads with `torch.load(weights_only=True)`.
        checkpoint["egspo"] = {
            "iteration": self.iteration,
            "summary": self.summary,
            "summary_metrics": self.summary_metrics,
            "nonfinite_streak": self._nonfinite_streak,
            "skipped_updates": self._skipped_updates,
            "prompts_over_length": self._prompts_over_length,
            "rng": capture_rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("egspo", {})
        self.iteration = state.get("iteration", 0)
        self.summary = state.get("summary", {})
        self.summary_metrics = state.get("summary_metrics", {})
        self._nonfinite_streak = state.get("nonfinite_streak", 0)
        self._skipped_updates = state.get("skipped_updates", 0)
        self._prompts_over_length = state.get("prompts_over_length", 0)
        # Lightning warns that a mid-epoch resume of a plain loader may repeat batches; here the
        # loader starts at the restored iteration (below), so every batch comes exactly once.
        warnings.filterwarnings(
            "ignore", message="You're resuming from a checkpoint that ended before the epoch"
        )
        # Applied in `on_train_start`, after Lightning has built the loader iterator (which draws
        # from the global RNG): the next iteration then sees the streams the saved run saw.
        self._rng_to_restore = state.get("rng")
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "start_iteration"):
            datamodule.start_iteration = self.iteration


# --------------------------------------------------------------------- helpers
def _default_policy_loss() -> PolicyLoss:
    from egspo.losses import EGSPOLoss

    return EGSPOLoss()


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(
                f"{name.replace('num_generations', 'num_generations (>= 2)')} must be positive, got {value}"
            )


def _left_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _correct(out: RewardOutput) -> Tensor:
    """Per-sample correctness: the reward's own verdict, else a full reward."""
    return out.correct if out.correct is not None else out.rewards >= 1.0


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _eval_seed(set_index: int, batch_index: int) -> int:
    return 1_000_003 * set_index + batch_index


@contextmanager
def _seeded_rng(device: torch.device, seed: int | None = None) -> Iterator[None]:
    """Run the block on a fork of torch's RNG (seeded with `seed` if given); the state is restored after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _headline(per_set: dict[str, float]) -> float:
    return float(sum(per_set.values()) / max(len(per_set), 1)) if per_set else math.nan


def _fmt(per_set: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in per_set.items())
