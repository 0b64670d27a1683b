"""`PhaseLearningRates`: the RL learning rate holds whatever scheduler the warm-up used.

transformers' `get_*_schedule_with_warmup` are `LambdaLR`s: `lr = base_lr * lambda(step)` with
`base_lr` read from `initial_lr` when built, so a warm-up schedule kept running into RL (or an RL
schedule built on the warm-up's `initial_lr`) would bring the warm-up's rate back on its next
step. Checked on the component with a bare optimizer (the update's order: optimizer step, then
scheduler step), across a checkpoint round trip, and once through a real `fit`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import pytest
import torch
from torch.optim.lr_scheduler import LinearLR
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from egspo.schedules import PhaseLearningRates

SFT_LR, RL_LR = 0.1, 1e-3
SFT_STEPS, RL_STEPS = 4, 6

WARMUPS = {
    "linear": lambda opt: get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10),
    "cosine": lambda opt: get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10),
}
# The RL schedule's factor at RL step k (what multiplies rl_learning_rate).
RL_SCHEDULES: dict[str, tuple[Callable | None, Callable[[int], float]]] = {
    "constant": (None, lambda k: 1.0),
    "linear-lr": (
        lambda opt: LinearLR(opt, start_factor=0.5, end_factor=1.0, total_iters=4),
        lambda k: 0.5 + 0.5 * min(k, 4) / 4,
    ),
    "lambda": (
        lambda opt: get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=8),
        lambda k: max(0.0, (8 - k) / 8),
    ),
}


class Run:
    """A parameter, its optimizer and the phases' learning rates, stepped like `PolicyUpdate` does."""

    def __init__(self, warmup: Callable, rl: Callable | None, rl_learning_rate: float | None) -> None:
        self.param = torch.nn.Parameter(torch.ones(3))
        self.optimizer = torch.optim.SGD([self.param], lr=SFT_LR)
        self.rates = PhaseLearningRates(warmup, rl, rl_learning_rate)

    def steps(self, phase: str, n: int) -> list[float]:
        """The learning rate of each of `n` optimizer steps in `phase` (starting it if needed)."""
        if self.rates.phase != phase:
            self.rates.start(phase, self.optimizer)
        used = []
        for _ in range(n):
            used.append(self.optimizer.param_groups[0]["lr"])
            self.param.grad = torch.ones_like(self.param)
            self.optimizer.step()
            if self.rates.scheduler is not None:
                self.rates.scheduler.step()
        return used

    def checkpoint(self) -> dict:
        """What a Lightning checkpoint holds of these: the optimizer's and the run state's dicts."""
        return copy.deepcopy(
            {
                "optimizer": self.optimizer.state_dict(),
                "rates": self.rates.state_dict(),
                "param": self.param.data,
            }
        )

    @classmethod
    def resumed(cls, state: dict, *args) -> Run:
        """A new process: fresh objects, then the checkpoint loaded into them (Lightning's order)."""
        run = cls(*args)
        run.param.data.copy_(state["param"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.rates.load_state_dict(state["rates"])
        return run


@pytest.mark.parametrize("warmup", list(WARMUPS))
@pytest.mark.parametrize("rl", list(RL_SCHEDULES))
def test_the_rl_rate_is_rl_learning_rate_times_the_rl_schedule(warmup, rl):
    factory, factor = RL_SCHEDULES[rl]
    run = Run(WARMUPS[warmup], factory, RL_LR)
    sft = run.steps("sft", SFT_STEPS)
    schedule = WARMUPS[warmup](torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=SFT_LR))
    assert sft == pytest.approx([SFT_LR * schedule.lr_lambdas[0](k) for k in range(SFT_STEPS)])
    assert max(sft) > 10 * RL_LR  # the warm-up's rate is far from the RL one: a leak would show
    assert run.steps("rl", RL_STEPS) == pytest.approx([RL_LR * factor(k) for k in range(RL_STEPS)], rel=1e-9)


@pytest.mark.parametrize("warmup", list(WARMUPS))
@pytest.mark.parametrize("rl", list(RL_SCHEDULES))
@pytest.mark.parametrize(("phase", "done"), [("sft", 2), ("rl", 0), ("rl", 3)])
def test_a_resume_mid_phase_continues_the_exact_learning_rate_sequence(warmup, rl, phase, done):
    """Checkpoint after `done` steps of `phase`, resume in a fresh run: the same rates to the end."""
    args = (WARMUPS[warmup], RL_SCHEDULES[rl][0], RL_LR)
    straight = Run(*args)
    expected = straight.steps("sft", SFT_STEPS) + straight.steps("rl", RL_STEPS)

    first = Run(*args)
    if phase == "sft":
        used = first.steps("sft", done)
    else:
        used = first.steps("sft", SFT_STEPS) + first.steps("rl", done)
    state = first.checkpoint()
    second = Run.resumed(state, *args)
    if phase == "sft":
        used += second.steps("sft", SFT_STEPS - done) + second.steps("rl", RL_STEPS)
    else:
        used += second.steps("rl", RL_STEPS - done)
    assert used == pytest.approx(expected, rel=1e-12)
    assert torch.equal(second.param.data, straight.param.data)


def test_without_rl_learning_rate_the_rl_schedule_starts_from_the_optimizer_base_rate():
    """`rl_learning_rate=None`: RL schedules multiply the optimizer's own lr, not the warm-up's last."""
    factory, factor = RL_SCHEDULES["linear-lr"]
    run = Run(WARMUPS["linear"], factory, None)
    run.steps("sft", SFT_STEPS)
    assert run.steps("rl", 3) == pytest.approx([SFT_LR * factor(k) for k in range(3)])


def test_a_warmup_schedule_that_decays_to_zero_does_not_leave_rl_at_zero():
    """No RL schedule, no `rl_learning_rate`: RL trains at the optimizer's lr, not the warm-up's last."""
    run = Run(lambda opt: get_linear_schedule_with_warmup(opt, 0, SFT_STEPS), None, None)
    assert run.steps("sft", SFT_STEPS)[-1] < SFT_LR
    assert run.optimizer.param_groups[0]["lr"] == 0.0
    assert run.steps("rl", 3) == [SFT_LR] * 3


def test_state_dict_loads_into_a_checkpoint_read_with_weights_only(tmp_path):
    """Resume reads checkpoints with `weights_only=True`: the state must be plain types."""
    run = Run(WARMUPS["cosine"], RL_SCHEDULES["lambda"][0], RL_LR)
    run.steps("sft", SFT_STEPS)
    run.steps("rl", 2)
    torch.save(run.rates.state_dict(), tmp_path / "rates.pt")
    state = torch.load(tmp_path / "rates.pt", weights_only=True)
    assert state["phase"] == "rl" and state["scheduler"]["last_epoch"] == 2


# ---------------------------------------------------------------------- through a real fit
class RecordingSGD(torch.optim.SGD):
    """SGD that records the learning rate of every step it takes."""

    def __init__(self, params, lr: float, record: list[float]) -> None:
        super().__init__(params, lr=lr)
        self.record = record

    def step(self, closure=None):
        self.record.append(self.param_groups[0]["lr"])
        return super().step(closure)


@pytest.mark.slow
def test_fit_with_a_transformers_warmup_schedule_trains_rl_at_rl_learning_rate(tmp_path):
    """`model.lr_scheduler` a LambdaLR (transformers' linear warm-up), `rl_learning_rate` and an RL
    LinearLR. Given in Python: in YAML, jsonargparse takes a scheduler class, or a callable of the
    optimizer alone; transformers' schedules are functions that also need their step counts."""
    from lightning.pytorch import Trainer
    from tiny_model import tiny_qwen2

    from egspo.cli import TRAINER_DEFAULTS
    from egspo.config import PromptConfig, RolloutConfig, UpdateConfig
    from egspo.data import HybridDataModule
    from egspo.data.synthetic import SyntheticArithmetic
    from egspo.model import PolicyConfig
    from egspo.module import HybridRLModule

    sft, rl = 3, 3
    used: list[float] = []
    module = HybridRLModule(
        policy=PolicyConfig(config=tiny_qwen2(), tokenizer="synthetic"),
        sft_iterations=sft,
        rl_iterations=rl,
        prompt=PromptConfig(max_prompt_length=64, max_sft_length=128),
        rollout=RolloutConfig(num_generations=2, max_completion_length=4),
        update=UpdateConfig(rl_learning_rate=RL_LR),
        optimizer=partial(RecordingSGD, lr=SFT_LR, record=used),
        lr_scheduler=lambda opt: get_linear_schedule_with_warmup(
            opt, num_warmup_steps=2, num_training_steps=10
        ),
        rl_lr_scheduler=lambda opt: LinearLR(opt, start_factor=0.5, end_factor=1.0, total_iters=4),
    )
    data = HybridDataModule(
        synthetic=SyntheticArithmetic(seed=0, train_size=32, test_size=4),
        sft_iterations=sft,
        rl_iterations=rl,
        prompts_per_step=1,
        expert_per_step=2,
        seed=0,
    )
    trainer = Trainer(
        **TRAINER_DEFAULTS,
        max_epochs=2,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    assert module.iteration == sft + rl
    warmup = [0.0, 0.5, 1.0]  # linear warm-up over 2 steps, then decay over 8
    rl_factor = [0.5, 0.625, 0.75]  # LinearLR from 0.5 to 1 over 4 steps
    assert used == pytest.approx([SFT_LR * f for f in warmup] + [RL_LR * f for f in rl_factor], rel=1e-9)
