"""The update: optimizer steps on demonstrations (SFT) and on experience (RL), with exact micro-batching.

One optimizer step = the gradient of one mini-batch's loss. When a mini-batch does not fit in
one forward/backward, it is packed into micro-batches under a token budget and their gradients
accumulate; each micro-batch's loss is weighted by its share of the mini-batch's aggregation
units (tokens for `token-mean`, sequences for the `seq-*` modes), so the accumulated gradient is
the single-pass gradient, not a mean of micro-batch means.

A step whose loss or gradient norm is not finite on any process is skipped on every process
(the decision is all-reduced, so ranks never diverge or wait on each other); `max_nonfinite_updates`
skips in a row stop the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from egspo.config import UpdateConfig
from egspo.data.encoding import EncodedDemonstrations
from egspo.distributed import all_ranks_agree, gather_objects
from egspo.losses import PolicyLoss, SFTLoss, TokenBatch
from egspo.losses.aggregation import aggregation_units
from egspo.rollout.experience import Experience, pack_rows
from egspo.scoring import token_logprobs

log = logging.getLogger(__name__)

Metrics = dict[str, float]


class NonFiniteLossError(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient."""


@dataclass
class WeightedLoss:
    """A micro-batch's contribution: its loss already weighted to sum to the mini-batch loss."""

    loss: Tensor
    metrics: dict[str, Tensor]
    weight: float


def clip_grad_norm(policy: torch.nn.Module, max_norm: float) -> Tensor:
    """Clip the policy's gradients to a global norm; the norm before clipping (a plain tensor)."""
    params = [p for p in policy.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor


class PolicyUpdate:
    """Optimizer steps for both phases of hybrid training.

    Args:
        policy_loss: the RL loss on experience.
        warmup_loss: the SFT loss of the warm-up phase.
        mix_loss: the SFT loss mixed into RL with weight mu, `L = (1 - mu) L_RL + mu L_SFT`.
        config: mini-batch, micro-batch and clipping options.
        temperature: the sampling temperature, at which RL log-probs are scored (demonstrations
            are scored at 1).
        backward: how a loss is back-propagated (Lightning's `manual_backward` under a Trainer).
        clip: `clip(max_norm) -> norm`, clipping over all of the policy's shards.
    """

    def __init__(
        self,
        policy_loss: PolicyLoss,
        warmup_loss: SFTLoss,
        mix_loss: SFTLoss,
        config: UpdateConfig,
        *,
        temperature: float,
        backward: Callable[[Tensor], None] = Tensor.backward,
        clip: Callable[[torch.nn.Module, float], Tensor] = clip_grad_norm,
    ) -> None:
        self.policy_loss = policy_loss
        self.warmup_loss = warmup_loss
        self.mix_loss = mix_loss
        self.config = config
        self.temperature = temperature
        self.backward = backward
        self.clip = clip
        self.nonfinite_streak = 0
        self.skipped_updates = 0

    # ------------------------------------------------------------------ iterations
    def rl_update(
        self,
        policy: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        experience: Experience,
        *,
        threshold: Tensor | None,
        mu: float = 0.0,
        demonstrations: EncodedDemonstrations | None = None,
        scheduler: LRScheduler | None = None,
        mini_batch_size: int | None = None,
    ) -> list[Metrics]:
        """`ppo_epochs` passes over shuffled mini-batches of `experience`, one optimizer step each.

        `threshold` is the gate threshold of this rollout batch (`policy_loss.prepare`), the same
        for every mini-batch. With `mu > 0`, every step also takes the SFT loss on `demonstrations`.
        `mini_batch_size` overrides the configured one (UEC-RL's replay batch is one step).
        Returns the metrics of every step, in order.
        """
        size = mini_batch_size or self.config.mini_batch_size or len(experience)
        # As many steps on every process (each steps in lock-step), however many rows it holds.
        count = max(gather_objects(max(len(experience) // size, 1)))
        if self.policy_loss.needs_rollout_tokens:  # Clip-Cov / KL-Cov: centred per batch
            self.policy_loss.prepare_rollout_tokens(*self._rollout_tokens(policy, experience))
        results = []
        for _ in range(self.config.ppo_epochs):
            for minibatch in experience.minibatches(count):
                losses = self._rl_losses(policy, minibatch, threshold, 1.0 - mu)
                if mu > 0:
                    losses = _chain(
                        losses, self._sft_losses(policy, demonstrations, self.mix_loss, mu, "sft_")
                    )
                results.append(self._step(policy, optimizer, scheduler, losses))
        return results

    def sft_update(
        self,
        policy: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        demonstrations: EncodedDemonstrations,
        scheduler: LRScheduler | None = None,
    ) -> list[Metrics]:
        """One optimizer step per `sft_batch_size` demonstrations; the metrics of every step."""
        n = len(demonstrations)
        size = self.config.sft_batch_size or n
        results = []
        for start in range(0, n, size):
            part = demonstrations.select(torch.arange(start, min(start + size, n)))
            results.append(
                self._step(policy, optimizer, scheduler, self._sft_losses(policy, part, self.warmup_loss))
            )
        return results

    # ------------------------------------------------------------------ losses
    @torch.no_grad()
    def _rollout_tokens(self, policy: torch.nn.Module, experience: Experience) -> tuple[Tensor, Tensor]:
        """This rank's valid tokens' rollout log-probs and advantages (1-D, any order). Without
        `old_logprobs` (one optimizer step per batch) the current policy is the rollout policy."""
        logprobs, advantages = [], []
        for mb in experience.microbatches(self.config.ppo_max_token_len_per_gpu):
            old = mb.old_logprobs
            if old is None:
                temperature = self.temperature if mb.temperature is None else float(mb.temperature[0])
                old = token_logprobs(
                    policy, mb.input_ids, mb.attention_mask, mb.score_mask(), temperature=temperature,
                    chunk_size=self.config.logprob_chunk_size,
                ).logprobs[:, mb.prompt_length :]  # fmt: skip
            valid = mb.loss_mask > 0
            logprobs.append(old[valid])
            advantages.append(mb.advantages[:, None].expand_as(valid)[valid])
        return torch.cat(logprobs), torch.cat(advantages)

    def _rl_losses(
        self, policy: torch.nn.Module, minibatch: Experience, threshold: Tensor | None, scale: float
    ) -> Iterator[WeightedLoss]:
        mode = self.policy_loss.loss_agg_mode
        total = float(aggregation_units(minibatch.loss_mask, mode))
        needs_polarity = getattr(self.policy_loss, "needs_polarity", False)
        for mb in minibatch.microbatches(self.config.ppo_max_token_len_per_gpu):
            scores = token_logprobs(
                policy,
                mb.input_ids,
                mb.attention_mask,
                mb.score_mask(),
                temperature=self.temperature if mb.temperature is None else float(mb.temperature[0]),
                chunk_size=self.config.logprob_chunk_size,
                with_polarity=needs_polarity,
            )
            p = mb.prompt_length
            logprobs = scores.logprobs[:, p:]
            batch = TokenBatch(
                logprobs=logprobs,
                old_logprobs=mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach(),
                advantages=mb.advantages[:, None].expand_as(logprobs),
                entropy=mb.entropy,
                mask=mb.loss_mask,
                ref_logprobs=mb.ref_logprobs,
                entropy_threshold=threshold,
                polarity=scores.polarity[:, p:] if needs_polarity else None,
                is_weights=mb.is_weights,
            )
            out = self.policy_loss(batch)
            weight = float(aggregation_units(mb.loss_mask, mode)) / max(total, 1.0)
            yield WeightedLoss(scale * weight * out.loss, out.metrics, weight)

    def _sft_losses(
        self,
        policy: torch.nn.Module,
        demonstrations: EncodedDemonstrations,
        loss_fn: SFTLoss,
        scale: float = 1.0,
        prefix: str = "",
    ) -> Iterator[WeightedLoss]:
        mode = loss_fn.loss_agg_mode
        total = float(aggregation_units(demonstrations.score_mask, mode))
        lengths = demonstrations.attention_mask.sum(1)
        for rows in _micro_rows(lengths, self.config.ppo_max_token_len_per_gpu):
            part = demonstrations.select(rows)
            scores = token_logprobs(
                policy,
                part.input_ids,
                part.attention_mask,
                part.score_mask,
                temperature=1.0,
                chunk_size=self.config.logprob_chunk_size,
            )
            out = loss_fn(scores.logprobs, part.score_mask)
            weight = float(aggregation_units(part.score_mask, mode)) / max(total, 1.0)
            metrics = {f"{prefix}{k}": v for k, v in out.metrics.items()}
            metrics[f"{prefix}loss"] = out.loss.detach()
            yield WeightedLoss(scale * weight * out.loss, metrics, weight)

    # ------------------------------------------------------------------ one optimizer step
    def _step(
        self,
        policy: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler | None,
        losses: Iterator[WeightedLoss],
    ) -> Metrics:
        """Backward of every micro-batch loss, then clip and step unless non-finite on any process."""
        total = None
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for part in losses:
            self.backward(part.loss)
            total = part.loss.detach() if total is None else total + part.loss.detach()
            for key, value in part.metrics.items():
                sums[key] = sums.get(key, 0.0) + part.weight * float(value)
                weights[key] = weights.get(key, 0.0) + part.weight
        metrics = {key: sums[key] / max(weights[key], 1e-12) for key in sums}
        total = total if total is not None else torch.zeros(())
        finite = bool(torch.isfinite(total))
        if self.config.max_grad_norm is not None:
            norm = self.clip(policy, self.config.max_grad_norm)
            finite = finite and bool(torch.isfinite(norm))
            metrics["grad_norm"] = float(norm)
        if all_ranks_agree(finite):
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            self.nonfinite_streak = 0
        else:
            self._skip()
        optimizer.zero_grad(set_to_none=True)
        metrics["loss"] = float(total)
        return metrics

    def _skip(self) -> None:
        self.nonfinite_streak += 1
        self.skipped_updates += 1
        log.warning("non-finite loss or gradient on some process: update skipped on every process")
        if self.nonfinite_streak >= self.config.max_nonfinite_updates:
            raise NonFiniteLossError(
                f"{self.nonfinite_streak} updates in a row had a non-finite loss or gradient "
                f"(model.update.max_nonfinite_updates={self.config.max_nonfinite_updates}). "
                "Lower the learning rate or check the data."
            )

    def counters(self) -> dict[str, float]:
        """`train/nonfinite_streak` and `train/skipped_updates`, to log."""
        return {
            "train/nonfinite_streak": float(self.nonfinite_streak),
            "train/skipped_updates": float(self.skipped_updates),
        }

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, int]:
        return {"nonfinite_streak": self.nonfinite_streak, "skipped_updates": self.skipped_updates}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        self.skipped_updates = int(state.get("skipped_updates", 0))


def _micro_rows(lengths: Tensor, max_tokens: int | None) -> list[Tensor]:
    if max_tokens is None:
        return [torch.arange(len(lengths))]
    return pack_rows(lengths, max_tokens)


def _chain(*parts: Iterator[WeightedLoss]) -> Iterator[WeightedLoss]:
    for part in parts:
        yield from part
