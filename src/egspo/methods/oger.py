"""OGER (arXiv 2604.18530) as an RL-iteration plug-in: an offline-guided exploration bonus for
correct rollouts, paid at the reward-shaping hook (`egspo.methods.base`), before advantages.

The formula card (what the paper states vs. what egspo chooses) is the docstring of :class:`OGER`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from egspo.hf_names import unwrap_causal_lm
from egspo.methods.base import Metrics, RLMethod, RolloutContext
from egspo.rollout.groups import Groups
from egspo.schedules import MuSchedule, ramp

Similarity = Literal["max", "mean"]
Combine = Literal["product", "mean"]


def mean_pool_embeddings(token_ids: Tensor, mask: Tensor, embedding_weight: Tensor) -> Tensor:
    """Mean of the input embeddings of each row's valid tokens: ``[N, L]`` ids -> ``[N, D]`` fp32.

    The shared space of OGER's divergence is the policy's own input-embedding matrix
    (``policy.get_input_embeddings().weight``): rollouts and teacher responses land in it by a
    table look-up, with no extra forward pass and no second model. Only the distinct token ids
    of the batch are gathered and cast to fp32 (``[U, D]``, U = distinct ids), and the sums run in
    ``embedding_bag``, so no ``[N, L, D]`` tensor is ever built (512 rollouts x 4k tokens x 4k dims
    would be 34 GB in fp32). Rows without a valid token get the zero vector; padding ids, whatever
    they are, weigh nothing.

    Args:
        token_ids: ``[N, L]`` token ids (e.g. ``rollout.completion_ids``; any padding).
        mask: ``[N, L]``, 1 (or True) at the tokens that count.
        embedding_weight: ``[V, D]``. A sharded DTensor (FSDP2) is gathered whole first, which is a
            collective: every rank must call this together (the builder's rollout step does).
    """
    if token_ids.dim() != 2 or mask.shape != token_ids.shape:
        raise ValueError(
            f"token_ids and mask must both be [N, L], got {tuple(token_ids.shape)} and {tuple(mask.shape)}"
        )
    if hasattr(embedding_weight, "full_tensor"):
        embedding_weight = embedding_weight.full_tensor()
    weights = mask.to(torch.float32)
    if token_ids.numel() == 0:
        return weights.new_zeros(token_ids.shape[0], embedding_weight.shape[1])
    unique, inverse = torch.unique(token_ids, return_inverse=True)
    table = embedding_weight.detach()[unique.to(embedding_weight.device)].to(token_ids.device, torch.float32)
    sums = F.embedding_bag(inverse, table, per_sample_weights=weights, mode="sum")
    return sums / weights.sum(1, keepdim=True).clamp(min=1.0)


class BonusSchedule:
    """The bonus multiplier ``s(k)`` in ``[0, 1]`` at RL iteration ``k`` (0-based).

    ``s(k) = k / warmup_iterations`` during the warm-up, then 1, or, with ``decay_iterations``, a
    ramp from 1 to ``final`` over that many iterations (``kind`` linear or cosine), ``final``
    after. A pure function of ``k``, so a resumed run recomputes the same value.
    The default (no warm-up, no decay) is the constant 1.
    """

    def __init__(
        self,
        warmup_iterations: int = 0,
        decay_iterations: int | None = None,
        final: float = 0.0,
        kind: Literal["linear", "cosine"] = "linear",
    ) -> None:
        if warmup_iterations < 0:
            raise ValueError(f"warmup_iterations must be >= 0, got {warmup_iterations}")
        if decay_iterations is not None and decay_iterations < 1:
            raise ValueError(f"decay_iterations must be None or >= 1, got {decay_iterations}")
        if not 0.0 <= final <= 1.0:
            raise ValueError(f"final must be in [0, 1], got {final}")
        if kind not in ("linear", "cosine"):
            raise ValueError(f"kind must be 'linear' or 'cosine', got {kind!r}")
        self.warmup_iterations = warmup_iterations
        self.decay_iterations = decay_iterations
        self.final = final
        self.kind = kind

    def __call__(self, rl_iteration: int) -> float:
        if rl_iteration < self.warmup_iterations:
            return rl_iteration / self.warmup_iterations
        if self.decay_iterations is None:
            return 1.0
        progress = (rl_iteration - self.warmup_iterations) / self.decay_iterations
        return ramp(1.0, self.final, progress, self.kind)


class OGER(RLMethod):
    """Offline-guided exploration bonus: ``R'_i = R_i + b_i``, paid to correct rollouts that diverge
    from their prompt's teacher trajectories with confidence, never enough to reorder two rewards.

    Formula card. What the paper states (Ma, Xu, Liu, Jin, Wang, Wong, Zhang, "OGER: A Robust
    Offline-Guided Exploration Reward for Hybrid Reinforcement Learning", arXiv 2604.18530, April
    2026; from the abstract and secondary reviews, the full text and code were not reachable):
    OGER unifies offline teacher guidance and online RL "through a reward modeling lens"; it uses
    multi-teacher collaborative training and builds an *auxiliary exploration reward* from the
    offline trajectories and the model's own entropy ("entropy-aware reward modulation", ablated in
    the paper). Reviews: offline trajectories are a *semantic reference point* rather than extra
    training samples; online and offline trajectories are embedded in a *shared latent space* and
    compared by similarity; the reward is refined by the model's confidence, measured by its
    entropy (zzz0906.github.io technical review, 2026-04-26); it rewards "correct reasoning paths
    that confidently move away from" the teachers' map (cognaptus.com, 2026-04-23). Not stated in
    anything reachable: the embedding model, the similarity, the combination, the weight, the
    schedule, the gate on correctness.

    What egspo computes, for rollout ``i`` of prompt ``g`` (every choice an option):

    - Shared space: the mean of the policy's input embeddings over the response tokens
      (:func:`mean_pool_embeddings`, same for rollouts and teacher responses; no extra forward).
    - Similarity to the teachers ``T_g`` (one or several, possibly none):
      ``s_i = max_k cos(e_i, t_gk)`` (``similarity="max"``: novel only if far from *every*
      teacher) or the mean over teachers (``"mean"``); divergence ``d_i = clip(1 - s_i, 0, 1)``.
    - Confidence from the rollout's own mean token entropy (nats, at the sampling temperature,
      valid tokens only): ``c_i = exp(-mean_t H_it / entropy_temperature)`` in ``(0, 1]``;
      ``entropy_temperature=None`` turns the entropy term off (``c_i = 1``, the ablation).
    - Score ``u_i = d_i * c_i`` (``combine="product"``: divergent *and* confident) or
      ``(d_i + c_i) / 2`` (``"mean"``); ``u_i`` in ``[0, 1]``.
    - Bonus ``b_i = s(k) * cap_g * u_i`` on correct rollouts that have teachers and tokens, else 0,
      with ``cap_g = min(weight, margin * gap_g)``, ``gap_g`` the smallest positive difference
      between two rewards of group ``g`` (infinite when all are equal), and ``s(k)`` in ``[0, 1]``
      the schedule at RL iteration ``k``.

    The ordering guarantee (not an option: it is what makes the bonus safe), for two rollouts
    ``i, j`` of the same prompt: if ``R_i > R_j`` then ``R_i - R_j >= gap_g > margin * gap_g >=
    b_j >= b_j - b_i``, so ``R'_i > R'_j`` (``>=`` after float rounding, which is monotone); if
    ``R_i = R_j``, only a correct rollout can gain. So the shaped order refines the verifiable one:
    a wrong rollout ranks above a right one after shaping only if it already did before, for binary
    and graded rewards alike (for binary rewards that agree with ``correct``, never). Group-relative advantages are a monotone
    map of the rewards within a group, so the same holds for advantages.

    Note: in a group whose rollouts are all right (equal rewards), the bonus is the group's only
    signal; with ``advantage_scale="group"`` its differences are standardised to unit scale, so even
    small bonuses give full-size advantages there (``"batch"`` or ``"none"`` keep them at their size).
    Apply the bonus to the verifiable reward, before reward shaping such as DAPO's overlong penalty.

    Defaults: weight 0.1 (largest bonus, reward units), margin 0.5, similarity "max",
    entropy_temperature 1.0 nats, combine "product", schedule constant 1.

    Args:
        weight: the largest bonus, in reward units, > 0.
        margin: fraction of the group's smallest reward gap the bonus may reach, in ``(0, 1)``.
        similarity: "max" or "mean" cosine similarity over the prompt's teachers.
        entropy_temperature: nats per e-fold of confidence, > 0; None: no entropy term.
        combine: "product" or "mean" of divergence and confidence.
        schedule: ``rl_iteration -> s(k)`` in ``[0, 1]`` (:class:`BonusSchedule`, or any callable
            such as :class:`egspo.schedules.ChordMuSchedule`); None: constant 1.

    ``__call__`` returns the bonus ``[N]`` and metrics (plain floats, keys ``oger/...``):
    ``bonus_mean``, ``bonus_max``, ``rewarded_fraction`` (rollouts paid a bonus > 0), ``schedule``,
    ``cap_mean`` (over groups with a rewarded rollout), and over the eligible rollouts (correct,
    with teachers): ``similarity_mean``, ``divergence_mean``, ``confidence_mean``; plus
    ``prompts_without_teachers`` (fraction).
    """

    def __init__(
        self,
        weight: float = 0.1,
        margin: float = 0.5,
        similarity: Similarity = "max",
        entropy_temperature: float | None = 1.0,
        combine: Combine = "product",
        schedule: MuSchedule | None = None,
    ) -> None:
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be finite and > 0, got {weight}")
        if not 0.0 < margin < 1.0:
            raise ValueError(f"margin must be in (0, 1) (the bonus stays below the reward gap), got {margin}")
        if similarity not in ("max", "mean"):
            raise ValueError(f"similarity must be 'max' or 'mean', got {similarity!r}")
        if entropy_temperature is not None and not (
            math.isfinite(entropy_temperature) and entropy_temperature > 0
        ):
            raise ValueError(f"entropy_temperature must be None or finite and > 0, got {entropy_temperature}")
        if combine not in ("product", "mean"):
            raise ValueError(f"combine must be 'product' or 'mean', got {combine!r}")
        self.weight = weight
        self.margin = margin
        self.similarity = similarity
        self.entropy_temperature = entropy_temperature
        self.combine = combine
        self.schedule = schedule

    needs_fixed_groups = True  # the bonus is bounded by each group's reward gaps, num_generations rows each

    def shape_rewards(
        self, groups: Groups, entropy: Tensor, context: RolloutContext
    ) -> tuple[Tensor, Metrics]:
        """The bonus of every row: the embeddings of its completion and of its prompt's teachers."""
        prompts = groups.questions[:: context.group_size]
        pooled, teacher = embed_rollouts_and_teachers(
            context.policy,
            context.tokenizer,
            groups.rollout,
            [list(context.teachers.get(q, ())) for q in prompts],
        )
        return self(
            pooled,
            teacher,
            entropy=entropy,
            mask=groups.rollout.completion_mask,
            rewards=groups.rewards,
            correct=groups.correct,
            group_size=context.group_size,
            rl_iteration=context.rl_iteration,
        )

    def scale(self, rl_iteration: int) -> float:
        """``s(k)``, checked to lie in ``[0, 1]`` (a larger value would break the ordering bound)."""
        value = 1.0 if self.schedule is None else float(self.schedule(rl_iteration))
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"the OGER schedule gave {value} at RL iteration {rl_iteration}; it must be in [0, 1]"
            )
        return value

    @torch.no_grad()
    def __call__(
        self,
        rollout_embeddings: Tensor,
        teacher_embeddings: Tensor | Sequence[Tensor],
        *,
        entropy: Tensor,
        mask: Tensor,
        rewards: Tensor,
        correct: Tensor,
        group_size: int,
        rl_iteration: int,
        teacher_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """The bonus ``[N]`` (same dtype and device as ``rewards``) and its metrics.

        Args:
            rollout_embeddings: ``[N, D]``, e.g. :func:`mean_pool_embeddings` of the completions.
            teacher_embeddings: per prompt (``B = N / group_size`` prompts, in group order): a
                sequence of ``[K_b, D]`` tensors (``K_b`` may be 0), or one ``[B, K, D]`` tensor
                with ``teacher_mask`` ``[B, K]`` (True = a real teacher; None: all real).
            entropy, mask: ``[N, C]`` token entropies (nats) and the valid-token mask.
            rewards: ``[N]`` verifiable rewards, grouped by prompt. correct: ``[N]`` bool.
            group_size: rollouts per prompt. rl_iteration: for the schedule (0-based).
        Long: the formula card's steps (divergence, confidence, bounded payment, metrics) in order, one block each.
        """
        n = rewards.numel()
        if rewards.dim() != 1 or group_size < 1 or n % group_size:
            raise ValueError(
                f"rewards must be 1-D with a multiple of group_size={group_size} entries, got {tuple(rewards.shape)}"
            )
        b, g = n // group_size, group_size
        device = rewards.device
        for name, value, shape in (
            ("rollout_embeddings", rollout_embeddings, (n,)),
            ("correct", correct, (n,)),
            ("entropy", entropy, (n,)),
            ("mask", mask, (n,)),
        ):
            if tuple(value.shape[:1]) != shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {n} rows")
        if entropy.shape != mask.shape:
            raise ValueError(f"entropy {tuple(entropy.shape)} and mask {tuple(mask.shape)} differ in shape")
        teachers, present = _pad_teachers(
            teacher_embeddings, teacher_mask, b, rollout_embeddings.shape[1], device
        )

        # Divergence from the prompt's teachers, in the shared embedding space.
        rollout = F.normalize(rollout_embeddings.to(device, torch.float32), dim=-1)
        teacher = F.normalize(teachers, dim=-1)
        cos = torch.einsum("bgd,bkd->bgk", rollout.view(b, g, -1), teacher)  # [B, G, K]
        keep = present[:, None, :]
        if self.similarity == "max":
            sim = cos.masked_fill(~keep, -math.inf).amax(-1)
        else:
            sim = (cos * keep).sum(-1) / keep.sum(-1).clamp(min=1)
        sim = sim.reshape(n)
        divergence = (1.0 - sim).clamp(0.0, 1.0)

        # Confidence from the rollout's own mean token entropy (valid tokens only).
        valid = mask.to(device, torch.float32)
        tokens = valid.sum(1)
        mean_entropy = (entropy.to(device, torch.float32) * valid).sum(1) / tokens.clamp(min=1.0)
        if self.entropy_temperature is None:
            confidence = torch.ones_like(mean_entropy)
        else:
            confidence = torch.exp(-mean_entropy / self.entropy_temperature)
        score = divergence * confidence if self.combine == "product" else 0.5 * (divergence + confidence)

        # Bounded below the group's smallest reward gap, paid to correct rollouts only.
        has_teacher = present.any(-1).repeat_interleave(g)
        eligible = correct.to(device, torch.bool) & has_teacher & (tokens > 0)
        cap = torch.clamp(self.margin * _smallest_gap(rewards.float(), g), max=self.weight)  # [B]
        s = self.scale(rl_iteration)
        bonus = torch.where(eligible, s * cap.repeat_interleave(g) * score, 0.0).to(rewards.dtype)

        rewarded = bonus > 0
        paid_groups = rewarded.view(b, g).any(1)
        metrics = {
            "oger/bonus_mean": float(bonus.float().mean()) if n else 0.0,
            "oger/bonus_max": float(bonus.max()) if n else 0.0,
            "oger/rewarded_fraction": float(rewarded.float().mean()) if n else 0.0,
            "oger/schedule": s,
            "oger/cap_mean": float(cap[paid_groups].mean()) if bool(paid_groups.any()) else 0.0,
            "oger/prompts_without_teachers": float((~present.any(-1)).float().mean()) if b else 0.0,
        }
        if bool(eligible.any()):
            metrics["oger/similarity_mean"] = float(sim[eligible].mean())
            metrics["oger/divergence_mean"] = float(divergence[eligible].mean())
            metrics["oger/confidence_mean"] = float(confidence[eligible].mean())
        return bonus, metrics


def _pad_teachers(
    teachers: Tensor | Sequence[Tensor], present: Tensor | None, prompts: int, dim: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``[B, K, D]`` fp32 teacher embeddings on `device` and the ``[B, K]`` bool mask of real ones (K >= 1)."""
    if isinstance(teachers, Tensor):
        if teachers.dim() != 3 or teachers.shape[0] != prompts or teachers.shape[2] != dim:
            raise ValueError(
                f"teacher_embeddings must be [B={prompts}, K, D={dim}], got {tuple(teachers.shape)}"
            )
        if present is None:
            present = torch.ones(teachers.shape[:2], dtype=torch.bool, device=teachers.device)
        elif present.shape != teachers.shape[:2]:
            raise ValueError(f"teacher_mask must be {tuple(teachers.shape[:2])}, got {tuple(present.shape)}")
        if teachers.shape[1] == 0:  # no teacher anywhere: one empty slot per prompt
            teachers = torch.zeros(prompts, 1, dim, device=device)
            present = torch.zeros(prompts, 1, dtype=torch.bool, device=device)
        return teachers.to(device, torch.float32), present.to(device, torch.bool)
    if present is not None:
        raise ValueError("teacher_mask goes with a [B, K, D] tensor of teacher embeddings, not a sequence")
    if len(teachers) != prompts:
        raise ValueError(
            f"teacher_embeddings has {len(teachers)} entries, expected one per prompt ({prompts})"
        )
    for i, t in enumerate(teachers):
        if t.dim() != 2 or (t.shape[0] and t.shape[1] != dim):
            raise ValueError(f"teacher_embeddings[{i}] must be [K, D={dim}], got {tuple(t.shape)}")
    k = max([t.shape[0] for t in teachers] + [1])
    out = torch.zeros(prompts, k, dim, dtype=torch.float32, device=device)
    mask = torch.zeros(prompts, k, dtype=torch.bool, device=device)
    for i, t in enumerate(teachers):
        out[i, : t.shape[0]] = t.detach().to(device, torch.float32)
        mask[i, : t.shape[0]] = True
    return out, mask


def _smallest_gap(rewards: Tensor, group_size: int) -> Tensor:
    """``[B]``: the smallest positive difference between two rewards of each group (inf if none)."""
    ordered = rewards.view(-1, group_size).sort(dim=1).values
    steps = ordered.diff(dim=1)
    steps = steps.masked_fill(steps <= 0, math.inf)
    if steps.shape[1] == 0:
        return torch.full((ordered.shape[0],), math.inf, device=rewards.device)
    return steps.amin(dim=1)


def embed_rollouts_and_teachers(
    policy: torch.nn.Module, tokenizer, rollout, teachers: list[list[str]]
) -> tuple[Tensor, list[Tensor]]:
    """The shared space of the bonus: mean-pooled input embeddings of the policy, for the rollout's
    completions (`[N, D]`) and for each prompt's teacher responses (`[K_b, D]` per prompt).

    The embedding matrix is gathered whole first (under FSDP2 a collective: every rank calls this).
    """
    weight = unwrap_causal_lm(policy).get_input_embeddings().weight
    weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
    pooled = mean_pool_embeddings(rollout.completion_ids, rollout.completion_mask, weight)
    flat = [text for texts in teachers for text in texts]
    teacher = pooled.new_zeros(0, pooled.shape[1])
    if flat:
        encoded = tokenizer(flat, add_special_tokens=False, padding=True, return_tensors="pt")
        ids, mask = encoded["input_ids"].to(pooled.device), encoded["attention_mask"].to(pooled.device)
        teacher = mean_pool_embeddings(ids, mask, weight)
    return pooled, list(teacher.split([len(texts) for texts in teachers]))
