"""The checks that a run can continue from a checkpoint, before anything of it is loaded."""

from __future__ import annotations

import torch


def check_resume(
    state: dict,
    weights: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor],
    sft_iterations: int,
    total: int,
) -> None:
    """One-line errors for a checkpoint this run cannot continue from (config and CLI win otherwise).

    `state` is the checkpoint's egspo run state, `weights` its model weights, `own` this run's.
    """
    if state["sft_iterations"] != sft_iterations and state["iteration"] > min(
        state["sft_iterations"], sft_iterations
    ):
        raise ValueError(
            f"model.sft_iterations={sft_iterations}, but the checkpoint was written at iteration "
            f"{state['iteration']} of a run with {state['sft_iterations']}: the warm-up cannot change once passed"
        )
    if state["iteration"] > total:
        raise ValueError(
            f"the checkpoint is at iteration {state['iteration']}, beyond this run's "
            f"{total} (model.sft_iterations + model.rl_iterations)"
        )
    for name, tensor in weights.items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"the checkpoint's {name} has shape {tuple(tensor.shape)}, this model's {tuple(own[name].shape)}: "
                "model.policy differs from the run that wrote it"
            )
    missing = [k for k in own if k not in weights]
    if weights and missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} of this model's weights (first: {missing[0]}): "
            "model.policy differs from the run that wrote it"
        )
