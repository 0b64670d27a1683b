"""Checks across options of a parsed `fit` config, before any tokenizer or model is loaded.

jsonargparse already rejects unknown options, wrong types and unknown classes. What it cannot
see are constraints between options (a mini-batch size that must divide the rollout batch) and
values that only make sense for some classes (a quantile gate in [0, 1]). Loading a 7B model
before finding out costs minutes; these checks cost microseconds. Each message names the
option the way it is written on the command line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def validate_fit_config(config: Any) -> list[str]:
    """All problems found in a parsed `fit` config (a jsonargparse Namespace), one line each."""
    model, data = _get(config, "model"), _get(config, "data")
    errors: list[str] = []
    errors += _check_generations(model, data)
    errors += _check_gate(model, _get(config, "trainer"))
    errors += _check_data_files(data)
    return errors


def _check_generations(model: Any, data: Any) -> list[str]:
    g = _get(model, "num_generations")
    rl = _get(model, "rl_iterations", 0) or 0
    errors = []
    if g is not None and g < 2 and rl > 0:
        errors.append(
            f"model.num_generations={g}: group-relative advantages need at least 2 samples per prompt"
        )
    prompts = _get(_init_args(data), "prompts_per_step")
    mini = _get(model, "mini_batch_size")
    if mini is not None and mini < 1:
        errors.append(f"model.mini_batch_size={mini} must be >= 1")
    elif mini is not None and g is not None and prompts is not None and rl > 0:
        rollout = prompts * g
        if rollout % mini:
            errors.append(
                f"model.mini_batch_size={mini} does not divide data.prompts_per_step ({prompts}) x "
                f"model.num_generations ({g}) = {rollout}"
            )
    return errors


def _check_gate(model: Any, trainer: Any) -> list[str]:
    loss = _get(model, "policy_loss")
    gate = _get(_init_args(loss), "gate")
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
        args = _init_args(callback)
        if _get(args, "attribute", "value") != "value" or rule not in ("quantile", "normalized"):
            continue
        for end in ("start", "end"):
            v = _get(args, end)
            if v is not None and not 0.0 <= v <= 1.0:
                errors.append(
                    f"trainer.callbacks[{i}].init_args.{end}={v}: GateScheduler drives a {rule} gate, "
                    "whose value must be in [0, 1]"
                )
    return errors


def _check_data_files(data: Any) -> list[str]:
    errors = []
    for option, source in _data_sources(_init_args(data)):
        path = _get(source, "path")
        if isinstance(path, str) and _looks_local(path) and not Path(path).expanduser().exists():
            errors.append(f"{option}.path={path}: file not found")
    return errors


def _data_sources(data: Any) -> Iterator[tuple[str, Any]]:
    for key in ("expert", "prompts"):
        source = _get(data, key)
        if source is not None:
            yield f"data.{key}", _init_args(source)
    for name, source in (_get(data, "eval_sets") or {}).items():
        yield f"data.eval_sets.{name}", _init_args(source)


def _looks_local(path: str) -> bool:
    """A file path rather than a hub dataset id (`openai/gsm8k`)."""
    return path.endswith(DATA_SUFFIXES) or path.startswith(("/", ".", "~")) or Path(path).exists()


def _init_args(value: Any) -> Any:
    args = _get(value, "init_args")
    return args if args is not None else value


def _get(namespace: Any, key: str, default: Any = None) -> Any:
    if namespace is None:
        return default
    if isinstance(namespace, dict):
        return namespace.get(key, default)
    return getattr(namespace, key, default)
