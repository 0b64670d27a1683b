"""Checks across options of a parsed `fit` config, and of checkpoints, before any model is loaded.

jsonargparse already rejects unknown options, wrong types and unknown classes, and each typed
option group validates its own values. What neither can see are constraints between options
(a mini-batch size that must divide the rollout batch) and values that only make sense for
some classes (a quantile gate in [0, 1]). Loading a 7B model before finding out costs minutes;
these checks cost microseconds. Each message names the option as it is written on the command line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from egspo.hf_names import looks_local

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")  # the files `egspo.data.records` reads


def validate_fit_config(config: Any) -> list[str]:
    """All problems found in a parsed `fit` config (a jsonargparse Namespace), one line each."""
    model, data, trainer = _get(config, "model"), _init_args(_get(config, "data")), _get(config, "trainer")
    return [
        *_check_groups(model),
        *_check_batches(model, data),
        *_check_gate(model, trainer),
        *_check_learning_rates(model),
        *_check_validation_interval(model, trainer),
        *_check_epochs(model, trainer),
        *_check_strategy(trainer),
        *_check_paths(model, data),
    ]


def _check_strategy(trainer: Any) -> list[str]:
    """FSDP1 runs training_step inside its root's forward, where egspo's update cannot call backward."""
    strategy = _get(trainer, "strategy")
    name = strategy if isinstance(strategy, str) else str(_get(strategy, "class_path", ""))
    if name.startswith("fsdp") or name.endswith("FSDPStrategy"):
        from egspo.distributed import FSDP1_REFUSAL

        return [f"trainer.strategy={name}: {FSDP1_REFUSAL}"]
    return []


def _check_groups(model: Any) -> list[str]:
    """Each typed option group's own checks (`egspo.config`), run on the parsed values."""
    from egspo.config import EvalConfig, PromptConfig, RolloutConfig, UpdateConfig
    from egspo.model import PolicyConfig

    errors = []
    for key, group in (
        ("policy", PolicyConfig),
        ("prompt", PromptConfig),
        ("rollout", RolloutConfig),
        ("update", UpdateConfig),
        ("evaluation", EvalConfig),
    ):
        values = _get(model, key)
        if values is None:
            continue
        values = dict(vars(values)) if isinstance(values, Namespace) else dict(values)
        if group is RolloutConfig:
            values["engine"] = None  # a class_path, instantiated later; the numbers are checked here
        try:
            group(**values)
        except ValueError as error:
            errors.extend(str(error).splitlines())
    return errors


def _check_batches(model: Any, data: Any) -> list[str]:
    rollout, update = _get(model, "rollout"), _get(model, "update")
    g, prompts = _get(rollout, "num_generations"), _get(data, "prompts_per_step")
    mini = _get(update, "mini_batch_size")
    errors = []
    if (_get(model, "rl_iterations") or 0) > 0 and None not in (mini, g, prompts) and (prompts * g) % mini:
        errors.append(
            f"model.update.mini_batch_size={mini} does not divide data.prompts_per_step ({prompts}) x "
            f"model.rollout.num_generations ({g}) = {prompts * g}"
        )
    budget = _get(update, "ppo_max_token_len_per_gpu")
    longest = (_get(_get(model, "prompt"), "max_prompt_length") or 0) + (
        _get(rollout, "max_completion_length") or 0
    )
    if budget is not None and budget < longest:
        errors.append(
            f"model.update.ppo_max_token_len_per_gpu={budget} is below one sequence's longest length "
            f"(model.prompt.max_prompt_length + model.rollout.max_completion_length = {longest})"
        )
    return errors


def _check_gate(model: Any, trainer: Any) -> list[str]:
    gate = _get(_init_args(_get(model, "policy_loss")), "gate")
    if gate is None:
        return []
    rule, value = _get(_init_args(gate), "rule"), _get(_init_args(gate), "value")
    option = "model.policy_loss.init_args.gate.value"
    errors = []
    if rule in ("quantile", "normalized") and value is not None and not 0.0 <= value <= 1.0:
        errors.append(f"{option}={value}: the {rule} gate takes a value in [0, 1]")
    if rule == "absolute" and value is not None and value < 0:
        errors.append(f"{option}={value}: the absolute gate takes a threshold >= 0 nats")
    for i, callback in enumerate(_get(trainer, "callbacks") or []):
        if not str(_get(callback, "class_path", "")).endswith("GateScheduler"):
            continue
        if value is not None:
            errors.append(
                f"{option}={value}: trainer.callbacks[{i}] (GateScheduler) sets the gate's value every RL "
                "iteration; leave the value out of the gate (one writer per value)"
            )
        if rule not in ("quantile", "normalized"):
            continue
        for end in ("start", "end"):
            v = _get(_init_args(callback), end)
            if v is not None and not 0.0 <= v <= 1.0:
                errors.append(
                    f"trainer.callbacks[{i}].init_args.{end}={v}: GateScheduler drives a {rule} gate, "
                    "whose value must be in [0, 1]"
                )
    return errors


def _check_learning_rates(model: Any) -> list[str]:
    lr = _get(_init_args(_get(model, "optimizer")), "lr")
    if isinstance(lr, (int, float)) and not lr > 0:
        return [f"model.optimizer.init_args.lr={lr}: the learning rate must be > 0"]
    return []


def _check_validation_interval(model: Any, trainer: Any) -> list[str]:
    interval = _get(trainer, "val_check_interval")
    if not isinstance(interval, int) or isinstance(interval, bool):
        return []
    phases = [n for n in (_get(model, "sft_iterations"), _get(model, "rl_iterations")) if n]
    if interval < 1 or any(n % interval for n in phases):
        return [
            f"trainer.val_check_interval={interval}: must divide each phase's length ({' and '.join(map(str, phases))} "
            "iterations) so that every phase ends with an evaluation"
        ]
    return []


def _check_epochs(model: Any, trainer: Any) -> list[str]:
    """Each phase is one epoch (the CLI sets `max_epochs`): any other count would cut a phase or loop."""
    epochs = _get(trainer, "max_epochs")
    phases = sum(bool(_get(model, key)) for key in ("sft_iterations", "rl_iterations"))
    if epochs is not None and epochs != phases:
        return [
            f"trainer.max_epochs={epochs}: each phase is one epoch, so this run has {phases}; leave it unset"
        ]
    return []


def _check_paths(model: Any, data: Any) -> list[str]:
    errors = []
    policy = _get(model, "policy")
    for key in ("name_or_path", "tokenizer"):
        path = _get(policy, key)
        if (
            isinstance(path, str)
            and path != "synthetic"
            and looks_local(path)
            and not Path(path).expanduser().exists()
        ):
            errors.append(f"model.policy.{key}={path}: no such file or folder")
    for option, source in _data_sources(data):
        path = _get(source, "path")
        if not isinstance(path, str) or not looks_local(path):
            continue
        local, split = Path(path).expanduser(), _get(source, "split")
        if not local.exists():
            errors.append(f"{option}.path={path}: file not found")
        elif local.is_dir() and split is None:
            errors.append(f"{option}.path={path}: a folder; give {option}.split to read <split>.jsonl in it")
        elif local.is_dir() and not any((local / f"{split}{suffix}").is_file() for suffix in DATA_SUFFIXES):
            names = ", ".join(f"{split}{suffix}" for suffix in DATA_SUFFIXES)
            errors.append(f"{option}.split={split}: {path} holds none of {names}")
    return errors


def check_checkpoint(path: Path) -> str | None:
    """Why `path` is not a checkpoint egspo can resume from, or None when it is (reads it memory-mapped)."""
    import torch

    if not path.exists():
        return "no such file"
    if path.is_dir():
        return None if (path / "meta.pt").is_file() else "a folder, but not a sharded checkpoint (no meta.pt)"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated, junk, or not a torch file: all mean the same to the user
        return f"not a readable checkpoint (truncated or not a torch file: {type(error).__name__})"
    if not isinstance(checkpoint, dict) or "egspo" not in checkpoint:
        return "not an egspo training checkpoint (no 'egspo' state)"
    return None


def _data_sources(data: Any) -> Iterator[tuple[str, Any]]:
    for key in ("expert", "prompts"):
        source = _get(data, key)
        if source is not None:
            yield f"data.{key}", _init_args(source)
    for name, source in (_get(data, "eval_sets") or {}).items():
        yield f"data.eval_sets.{name}", _init_args(source)


def _init_args(value: Any) -> Any:
    args = _get(value, "init_args")
    return args if args is not None else value


def _get(namespace: Any, key: str, default: Any = None) -> Any:
    if namespace is None:
        return default
    if isinstance(namespace, (dict, Namespace)):  # not getattr: Namespace.update is a method
        value = namespace.get(key, default)
        return default if value is None else value
    return getattr(namespace, key, default)
