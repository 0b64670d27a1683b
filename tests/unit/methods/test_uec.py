"""UEC-RL as a plug-in: expanded samples scored at the temperature they were drawn at, shaped and
filtered like every other row of their joint group, and a run with its replay buffer resumes exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny_model import tiny_qwen2, tiny_qwen2_json

from egspo.config import PromptConfig, RolloutConfig, UpdateConfig
from egspo.data.encoding import PromptEncoder
from egspo.losses import NLLLoss, PPOClipLoss
from egspo.methods import UECRL
from egspo.model import PolicyConfig, load_policy
from egspo.rewards import RewardFunction, RewardOutput
from egspo.rollout import SharedPrefillEngine
from egspo.rollout.builder import ExperienceBuilder
from egspo.rollout.groups import overlong_penalty
from egspo.update import PolicyUpdate

ROOT = Path(__file__).resolve().parents[3]
G, HOT = 4, 1.7
REPLAY = {"exploration_temperature": 1.2, "replay_every": 2, "replay_min_advantage": 0.0}


class HardFirstPrompt:
    """The first prompt never scores (a hard prompt); the others alternate 0/1 by sample."""

    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        rewards = torch.tensor(
            [0.0 if a == "hard" else float(len(c) % 2) for c, a in zip(completions, answers, strict=True)]
        )
        return RewardOutput(rewards=rewards, correct=rewards >= 1.0)


class ParityReward(RewardFunction):
    """1 for completions of odd length: some samples of every group score, some do not."""

    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        rewards = torch.tensor([float(len(c) % 2) for c in completions])
        return RewardOutput(rewards=rewards, correct=rewards >= 1.0)

    def close(self) -> None:
        pass


def test_expanded_samples_are_scored_at_the_temperature_they_were_drawn_at(tiny_tokenizer):
    torch.manual_seed(0)
    policy = load_policy(PolicyConfig(config=tiny_qwen2(), tokenizer="synthetic"), tiny_tokenizer)
    builder = ExperienceBuilder(
        PromptEncoder(tiny_tokenizer, PromptConfig()),
        HardFirstPrompt(),
        RolloutConfig(engine=SharedPrefillEngine(), num_generations=G, max_completion_length=6),
        UpdateConfig(ppo_epochs=2),
        pad_token_id=tiny_tokenizer.pad_token_id,
        methods=[UECRL(exploration_temperature=HOT, replay_capacity=0)],
    )
    torch.manual_seed(1)
    experience, stats = builder.build(policy, ["a hard one", "an easy one"], ["hard", "easy"])
    assert stats["uec/hard_prompts"] == 0.5
    hot_rows = torch.tensor([False] * (2 * G) + [True] * G)  # G more samples of the hard prompt
    torch.testing.assert_close(experience.temperature, torch.where(hot_rows, HOT, 1.0))
    hot = experience.temperature > 1.0
    # The old log-probs of the expanded rows are the model's log-softmax at HOT, at the sampled tokens.
    p = experience.prompt_length
    with torch.no_grad():
        ids, mask = experience.input_ids[hot], experience.attention_mask[hot]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens
        logits = policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    logp = torch.log_softmax(logits[:, p - 1 : -1] / HOT, dim=-1)
    sampled = experience.input_ids[hot, p:]
    direct = logp.gather(-1, sampled[..., None]).squeeze(-1) * experience.completion_mask[hot]
    torch.testing.assert_close(experience.old_logprobs[hot], direct, rtol=0, atol=1e-4)
    # And the update scores them at HOT too: the first step's ratio is exactly 1 on every row.
    loss = PPOClipLoss()
    update = PolicyUpdate(loss, NLLLoss(), NLLLoss(), UpdateConfig(), temperature=1.0)
    optimizer = torch.optim.SGD(copy.deepcopy(policy).parameters(), lr=0.0)
    steps = update.rl_update(copy.deepcopy(policy), optimizer, experience, threshold=None)
    assert steps[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert steps[0]["approx_kl"] == pytest.approx(0.0, abs=1e-8)


class HardAndLong:
    """The first prompt never scores; the others score when the completion has odd length."""

    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        rewards = torch.tensor(
            [0.0 if a == "hard" else float(len(c) % 2) for c, a in zip(completions, answers, strict=True)]
        )
        return RewardOutput(rewards=rewards, correct=rewards >= 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expanded_rows_get_the_same_shaping_and_filters_as_their_group(tiny_tokenizer, seed):
    """Every row of a joint group: the overlong punishment on its reward, overlong filtering out of the
    loss; so a truncated expanded sample is never reinforced for being long."""
    torch.manual_seed(seed)
    policy = load_policy(PolicyConfig(config=tiny_qwen2(), tokenizer="synthetic"), tiny_tokenizer)
    length, buffer = 6, 4
    builder = ExperienceBuilder(
        PromptEncoder(tiny_tokenizer, PromptConfig()),
        HardAndLong(),
        RolloutConfig(
            engine=SharedPrefillEngine(), num_generations=G, max_completion_length=length,
            overlong_buffer_len=buffer, overlong_penalty_factor=1.0, mask_truncated_completions=True,
        ),
        UpdateConfig(),
        pad_token_id=tiny_tokenizer.pad_token_id,
        methods=[UECRL(exploration_temperature=HOT, replay_capacity=0)],
    )  # fmt: skip
    experience, stats = builder.build(policy, ["a hard one", "an easy one"], ["hard", "easy"])
    added = experience.temperature > 1.0
    assert stats["uec/hard_prompts"] == 0.5 and int(added.sum()) == G
    lengths = experience.completion_mask.sum(1)
    verifiable = torch.where(experience.correct, 1.0, 0.0)
    shaped = verifiable + overlong_penalty(lengths, length, buffer, 1.0)
    torch.testing.assert_close(experience.rewards, shaped)  # regular and expanded rows alike
    excluded = experience.excluded if experience.excluded is not None else torch.zeros_like(added)
    assert bool(excluded[experience.truncated].all())  # truncated rows leave the loss, expanded ones too
    # Expanded rows carry no negative advantage into the loss (UEC-RL's rule), after shaping.
    kept_expanded = added & ~excluded
    assert bool((experience.advantages[kept_expanded] >= 0).all())


def _args(root: Path, rl: int, *extra: str) -> list[str]:
    callbacks = [
        {"class_path": "egspo.callbacks.IterationCheckpoint", "init_args": {"every_n_iterations": 2}}
    ]
    return [
        "fit",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "--config",
        str(ROOT / "configs/method/uec_rl.yaml"),
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0",
        "--trainer.deterministic=true",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        f"--model.policy.config={tiny_qwen2_json(max_position_embeddings=512)}",
        "--model.sft_iterations=1",
        f"--model.rl_iterations={rl}",
        "--model.rollout.num_generations=4",
        "--model.rollout.max_completion_length=8",
        f"--model.methods={json.dumps([{'class_path': 'egspo.methods.UECRL', 'init_args': REPLAY}])}",
        "--model.reward=test_uec.ParityReward",
        "--data.prompts_per_step=2",
        "--data.expert_per_step=2",
        *extra,
    ]


@pytest.mark.slow
def test_a_resumed_run_keeps_its_replay_buffer_and_ends_with_the_same_weights(tmp_path):
    import sys

    from egspo.cli import main

    sys.path.insert(0, str(Path(__file__).parent))  # the reward class is this module's
    whole = main(_args(tmp_path / "whole", 6))
    [uec] = whole.model.methods
    assert uec.replay is not None and len(uec.replay) > 0
    interrupted = tmp_path / "interrupted"
    first = main(_args(interrupted, 3))
    saved = torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["egspo"]["methods"]["UECRL"]["replay"] is not None
    assert saved["egspo"]["reference"] is not None
    assert len(first.model.methods[0].replay) > 0
    resumed = main([*_args(interrupted, 6), "--ckpt_path", "last"])
    assert resumed.model.iteration == whole.model.iteration == 7
    replay, expected_replay = resumed.model.methods[0].replay, uec.replay
    assert len(replay) == len(expected_replay)
    assert replay.metrics(6) == pytest.approx(expected_replay.metrics(6))
    expected, got = whole.model.policy.state_dict(), resumed.model.policy.state_dict()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
