"""HybridRLModule: the components it composes, the callbacks it supplies, and its checkpoint state."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from tiny_model import tiny_qwen2

from egspo.callbacks.evaluation import HeldOutEvaluation
from egspo.callbacks.rollout import RolloutCallback
from egspo.config import RolloutConfig
from egspo.losses import PPOClipLoss
from egspo.methods import UECRL
from egspo.model import PolicyConfig
from egspo.module import HybridRLModule


def _module(**kwargs) -> HybridRLModule:
    policy = PolicyConfig(config=tiny_qwen2(), tokenizer="synthetic")
    return HybridRLModule(policy=policy, sft_iterations=2, rl_iterations=3, **kwargs)


def test_components_share_one_configuration():
    uec = UECRL(replay_capacity=8)
    module = _module(
        policy_loss=PPOClipLoss(beta=0.04), methods=[uec], rollout=RolloutConfig(num_generations=4)
    )
    builder = module.experience_builder
    assert builder.methods == [uec] and module.methods == [uec]
    assert builder.reference is module.reference is not None  # beta > 0: one KL reference, shared
    assert module.policy_loss is module.policy_update.policy_loss
    assert module.evaluator.engine is builder.config.engine
    assert _module().reference is None  # beta = 0: no reference, no scoring pass for it


def test_the_module_supplies_its_rollout_and_evaluation_callbacks():
    module = _module()
    module.trainer = Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    callbacks = module.configure_callbacks()
    [rollout] = [c for c in callbacks if isinstance(c, RolloutCallback)]
    [evaluation] = [c for c in callbacks if isinstance(c, HeldOutEvaluation)]
    assert rollout.builder is module.experience_builder
    assert evaluation.evaluator is module.evaluator and evaluation.summary is module.summary


def test_phases_follow_the_iteration_counter():
    module = _module()
    seen = []
    for i in range(5):
        module.iteration = i
        seen.append((module.phase, module.rl_iteration))
    assert seen == [("sft", 0), ("sft", 0), ("rl", 0), ("rl", 1), ("rl", 2)]
    assert module.total_iterations == 5
    with pytest.raises(ValueError, match="not both 0"):
        HybridRLModule(policy=PolicyConfig(config=tiny_qwen2(), tokenizer="synthetic"), rl_iterations=0)


def test_checkpoint_state_is_each_components_own_and_round_trips():
    torch.manual_seed(0)
    saved = _module(methods=[UECRL(replay_capacity=8)])
    saved.configure_model()
    saved.iteration = 4
    saved.experience_builder.prompts_over_length = 3
    saved.policy_update.skipped_updates = 2
    checkpoint = {"state_dict": saved.state_dict()}
    saved.on_save_checkpoint(checkpoint)
    state = checkpoint["egspo"]
    assert state["experience_builder"] == {"prompts_over_length": 3}
    assert state["update"]["skipped_updates"] == 2
    assert set(state["methods"]) == {"UECRL"} and state["methods"]["UECRL"]["replay"] is not None

    resumed = _module(methods=[UECRL(replay_capacity=8)])
    resumed.configure_model()
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.iteration == 4
    assert resumed.experience_builder.prompts_over_length == 3
    assert resumed.policy_update.skipped_updates == 2
    assert resumed.rng_to_restore is not None  # put back when the training loop starts

    with pytest.raises(ValueError, match="not written by egspo"):
        resumed.on_load_checkpoint({"state_dict": {}})
