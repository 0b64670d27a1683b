"""Checks across options of a parsed `fit` config, and of checkpoints, before any model is loaded.

jsonargparse already rejects unknown options, wrong types and unknown classes, and each typed
option group validates its own values. What neither can see are constraints between options
(a mini-batch size that must divide the rollout batch) and values that only make sense for
some classes (a quantile gate in [0, 1]). Loading a 7B model before finding out costs minutes;
these checks cost microseconds. Each message names the option as it is written on the command line.
"""

from __future__ import annotations

import inspect
import re
import typing
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace

from egspo.config import EvalConfig, PromptConfig, RolloutConfig, UpdateConfig
from egspo.data.datamodule import HybridDataModule, data_option_problems
from egspo.distributed import FSDP1_REFUSAL
from egspo.hf_names import looks_local
from egspo.model import PolicyConfig
from egspo.module import HybridRLModule
from egspo.validation_sources import (
    check_hub_id,
    check_paths,
    check_policy_source,
    get_option,
    init_args,
    record_bound,
    synthetic_bound,
)

# Options of the module given by `class_path`, built here once to run their constructors' checks.
CLASS_OPTIONS = ("reward", "policy_loss", "warmup_loss", "mix_loss", "mu", "methods")


def validate_fit_config(config: Any, warnings: list[str] | None = None) -> list[str]:
    """All problems found in a parsed `fit` config (a jsonargparse Namespace), one line each.

    `warnings` (when given) receives what deserves a word but may be intended (one line each)."""
    model, data, trainer = (
        get_option(config, "model"),
        init_args(get_option(config, "data")),
        get_option(config, "trainer"),
    )
    paths = check_paths(model, data)
    policy = [] if paths else check_policy_source(model, warnings if warnings is not None else [])
    errors = [
        *_check_groups(model),
        *_check_batches(model, data),
        *_check_data(model, data),
        *_check_record_counts(data, trainer),
        *_check_gate(model, trainer),
        *_check_learning_rates(model),
        *_check_validation_interval(model, trainer),
        *_check_epochs(model, trainer),
        *_check_strategy(trainer),
        *_check_checkpointing(trainer),
        *paths,
        *policy,
    ]
    # A class's own refusal, unless a check above already named the option (one line per problem).
    built = [line for option, line in _check_classes(model) if not any(e.startswith(option) for e in errors)]
    return built + errors


def _check_strategy(trainer: Any) -> list[str]:
    """FSDP1 runs training_step inside its root's forward, where egspo's update cannot call backward."""
    strategy = get_option(trainer, "strategy")
    name = strategy if isinstance(strategy, str) else str(get_option(strategy, "class_path", ""))
    if name.startswith("fsdp") or name.endswith("FSDPStrategy"):
        return [f"trainer.strategy={name}: {FSDP1_REFUSAL}"]
    return []


def check_machine(config: Any) -> list[str]:
    """What this machine cannot give a parsed `fit` config (a GPU, a hub id's files), one line each;
    kept apart from `validate_fit_config` so that a config can be checked on another machine."""
    model, trainer = get_option(config, "model"), get_option(config, "trainer")
    policy = get_option(model, "policy")
    errors = _check_accelerator(trainer)
    for option, filename in (("name_or_path", "config.json"), ("tokenizer", "tokenizer_config.json")):
        value = get_option(policy, option)
        if isinstance(value, str) and value != "synthetic" and not looks_local(value):
            errors += check_hub_id(f"model.policy.{option}", value, filename)
    return errors


def _check_accelerator(trainer: Any) -> list[str]:
    """A GPU asked for where there is none fails in the Trainer with a traceback: say so first."""
    accelerator = get_option(trainer, "accelerator")
    name = accelerator if isinstance(accelerator, str) else str(get_option(accelerator, "class_path", ""))
    name = name.lower()
    if name in ("gpu", "cuda") or name.endswith("cudaaccelerator"):
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not available:
            return [
                f"trainer.accelerator={accelerator}: no CUDA GPU is visible here; use --trainer.accelerator=cpu"
            ]
        devices = get_option(trainer, "devices")
        if isinstance(devices, int) and not isinstance(devices, bool) and devices > available:
            return [f"trainer.devices={devices}: only {available} GPU(s) visible"]
    if name == "mps" and not torch.backends.mps.is_available():
        return [
            f"trainer.accelerator={accelerator}: MPS is not available here; use --trainer.accelerator=cpu"
        ]
    return []


def _check_checkpointing(trainer: Any) -> list[str]:
    """`enable_checkpointing=false` beside a checkpoint callback: Lightning refuses the pair late."""
    if get_option(trainer, "enable_checkpointing") is not False:
        return []
    for i, callback in enumerate(get_option(trainer, "callbacks") or []):
        name = str(get_option(callback, "class_path", ""))
        if name.endswith("Checkpoint"):
            return [
                f"trainer.enable_checkpointing=false, but trainer.callbacks[{i}] ({name.rsplit('.', 1)[-1]}) "
                "saves checkpoints; remove one of the two"
            ]
    return []


def _check_classes(model: Any) -> list[tuple[str, str]]:
    """Build each `class_path` option of the module (losses, reward, schedules, methods) once, so
    that its constructor's own checks run now, named by option, instead of failing later inside
    jsonargparse's message about every type the option could have had."""
    hints = typing.get_type_hints(HybridRLModule.__init__)
    errors = []
    for key in CLASS_OPTIONS:
        value = get_option(model, key)
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            class_path = get_option(item, "class_path")
            if not isinstance(class_path, str):
                continue
            option = f"model.{key}" if index is None else f"model.{key}[{index}]"
            hint = hints[key]
            if index is not None:  # list[X] | None -> X
                hint = next(typing.get_args(a)[0] for a in typing.get_args(hint) if typing.get_args(a))
            problem = _build_problem(hint, item)
            if problem:
                errors.append((option, f"{option} ({class_path}): {problem}"))
    return errors


def _build_problem(hint: Any, value: Any) -> str | None:
    """Why `value` (a parsed `class_path` option) cannot be built as `hint`, or None."""
    types = [t for t in typing.get_args(hint) if t is not type(None)] if typing.get_origin(hint) else [hint]
    types = [t for t in types if isinstance(t, type) and t not in (int, float)]
    if len(types) != 1:
        return None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=types[0])
    plain = value.as_dict() if isinstance(value, Namespace) else value
    try:
        parser.instantiate(parser.parse_object({"value": plain}))
    except (ValueError, TypeError) as error:
        return union_reason(" ".join(str(error).split()))
    except Exception:  # anything else is for the real build to report
        return None
    return None


def _check_data(model: Any, data: Any) -> list[str]:
    """The data options against the phases (`egspo.data.datamodule.data_option_problems`)."""
    mu = get_option(model, "mu")
    mixing = (isinstance(mu, (int, float)) and mu > 0) or get_option(mu, "class_path") is not None
    data_defaults = inspect.signature(HybridDataModule.__init__).parameters
    module_defaults = inspect.signature(HybridRLModule.__init__).parameters

    def value(
        namespace: Any, key: str, defaults: Any
    ) -> Any:  # a config written as a plain dict lacks defaults
        return get_option(namespace, key, defaults[key].default)

    return data_option_problems(
        expert=get_option(data, "expert"),
        prompts=get_option(data, "prompts"),
        synthetic=get_option(data, "synthetic"),
        sft_iterations=value(model, "sft_iterations", module_defaults),
        rl_iterations=value(model, "rl_iterations", module_defaults),
        prompts_per_step=value(data, "prompts_per_step", data_defaults),
        expert_per_step=value(data, "expert_per_step", data_defaults),
        eval_size=get_option(data, "eval_size"),
        eval_batch_size=value(data, "eval_batch_size", data_defaults),
        sft_mixing=mixing,
    )


def _check_record_counts(data: Any, trainer: Any) -> list[str]:
    """Each training set against one step's draw of every process, counted before anything loads
    (`record_bound`): the sampler draws from every set whose per-step count is >= 1, whatever the
    phases, and would refuse a smaller set only after the model loaded. `EpochSampler` checks again
    after loading, for hub datasets and for what `data.gold_audit=drop` leaves out."""
    processes = _processes(trainer)
    synthetic = get_option(data, "synthetic")
    defaults = inspect.signature(HybridDataModule.__init__).parameters
    errors = []
    for key in ("expert", "prompts"):
        per_step = get_option(data, f"{key}_per_step", defaults[f"{key}_per_step"].default)
        source = get_option(data, key)
        if not isinstance(per_step, int) or per_step < 1:
            continue  # 0 draws nothing; below 0 is `data_option_problems`'s
        if synthetic is not None:
            bound = synthetic_bound(synthetic)
        else:
            bound = record_bound(f"data.{key}", init_args(source)) if source is not None else None
        needed = per_step * (processes or 1)
        if bound is None or bound[0] >= needed:
            continue
        times = ""
        if processes is not None:
            times = " x 1 process" if processes == 1 else f" x {processes} processes = {needed}"
        errors.append(f"data.{key}_per_step={per_step}: {bound[1]}, fewer than {per_step} per step{times}")
    return errors


def _processes(trainer: Any) -> int | None:
    """How many processes the Trainer starts (devices x nodes), where the config alone says it.
    None where Lightning counts at start-up (`devices: auto` or -1 on an accelerator other than
    the CPU): the record check then takes one process, a lower bound."""
    devices, nodes = get_option(trainer, "devices", "auto"), get_option(trainer, "num_nodes", 1)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    elif isinstance(devices, (list, tuple)):
        devices = len(devices)  # device indices
    elif devices == "auto" and get_option(trainer, "accelerator") == "cpu":
        devices = 1  # Lightning's CPU accelerator counts one device
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (devices, nodes)):
        return None
    return devices * nodes


def _check_groups(model: Any) -> list[str]:
    """Each typed option group's own checks (`egspo.config`), run on the parsed values."""
    errors = []
    for key, group in (
        ("policy", PolicyConfig),
        ("prompt", PromptConfig),
        ("rollout", RolloutConfig),
        ("update", UpdateConfig),
        ("evaluation", EvalConfig),
    ):
        values = get_option(model, key)
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
    rollout, update = get_option(model, "rollout"), get_option(model, "update")
    g, prompts = get_option(rollout, "num_generations"), get_option(data, "prompts_per_step")
    mini = get_option(update, "mini_batch_size")
    errors = []
    if (
        (get_option(model, "rl_iterations") or 0) > 0
        and None not in (mini, g, prompts)
        and (prompts * g) % mini
    ):
        errors.append(
            f"model.update.mini_batch_size={mini} does not divide data.prompts_per_step ({prompts}) x "
            f"model.rollout.num_generations ({g}) = {prompts * g}"
        )
    budget = get_option(update, "ppo_max_token_len_per_gpu")
    longest = (get_option(get_option(model, "prompt"), "max_prompt_length") or 0) + (
        get_option(rollout, "max_completion_length") or 0
    )
    if budget is not None and budget < longest:
        errors.append(
            f"model.update.ppo_max_token_len_per_gpu={budget} is below one sequence's longest length "
            f"(model.prompt.max_prompt_length + model.rollout.max_completion_length = {longest})"
        )
    return errors


def _check_gate(model: Any, trainer: Any) -> list[str]:
    gate = get_option(init_args(get_option(model, "policy_loss")), "gate")
    if gate is None:
        return []
    rule, value = get_option(init_args(gate), "rule"), get_option(init_args(gate), "value")
    option = "model.policy_loss.init_args.gate.value"
    errors = []
    if rule in ("quantile", "normalized") and value is not None and not 0.0 <= value <= 1.0:
        errors.append(f"{option}={value}: the {rule} gate takes a value in [0, 1]")
    if rule == "absolute" and value is not None and value < 0:
        errors.append(f"{option}={value}: the absolute gate takes a threshold >= 0 nats")
    for i, callback in enumerate(get_option(trainer, "callbacks") or []):
        if not str(get_option(callback, "class_path", "")).endswith("GateScheduler"):
            continue
        if value is not None:
            errors.append(
                f"{option}={value}: trainer.callbacks[{i}] (GateScheduler) sets the gate's value every RL "
                "iteration; leave the value out of the gate (one writer per value)"
            )
        if rule not in ("quantile", "normalized"):
            continue
        for end in ("start", "end"):
            v = get_option(init_args(callback), end)
            if v is not None and not 0.0 <= v <= 1.0:
                errors.append(
                    f"trainer.callbacks[{i}].init_args.{end}={v}: GateScheduler drives a {rule} gate, "
                    "whose value must be in [0, 1]"
                )
    return errors


def _check_learning_rates(model: Any) -> list[str]:
    lr = get_option(init_args(get_option(model, "optimizer")), "lr")
    if isinstance(lr, (int, float)) and not lr > 0:
        return [f"model.optimizer.init_args.lr={lr}: the learning rate must be > 0"]
    return []


def _check_validation_interval(model: Any, trainer: Any) -> list[str]:
    interval = get_option(trainer, "val_check_interval")
    if not isinstance(interval, int) or isinstance(interval, bool):
        return []
    phases = [n for n in (get_option(model, "sft_iterations"), get_option(model, "rl_iterations")) if n]
    if interval < 1 or any(n % interval for n in phases):
        return [
            f"trainer.val_check_interval={interval}: must divide each phase's length ({' and '.join(map(str, phases))} "
            "iterations) so that every phase ends with an evaluation"
        ]
    return []


def _check_epochs(model: Any, trainer: Any) -> list[str]:
    """Each phase is one epoch (the CLI sets `max_epochs`): any other count would cut a phase or loop."""
    epochs = get_option(trainer, "max_epochs")
    phases = sum(bool(get_option(model, key)) for key in ("sft_iterations", "rl_iterations"))
    if epochs is not None and epochs != phases:
        return [
            f"trainer.max_epochs={epochs}: each phase is one epoch, so this run has {phases}; leave it unset"
        ]
    return []


_UNION_CLASS = re.compile(r"class_path='([^']+)'")
_UNION_REASONS = re.compile(r"Errors: (.*?) Given value type:")


def union_reason(text: str) -> str:
    """jsonargparse's one-line message for a class whose constructor refused its arguments, when
    the option also allows null (`Does not validate against any of the Union subtypes ...`), as
    `class: reason`, without the list of every type the option could have had; other text as is."""
    if not text.startswith("Does not validate against any of the Union subtypes"):
        return text
    reasons = _UNION_REASONS.search(text)
    parts = [p.strip().removeprefix("- ").strip() for p in reasons[1].split(" - ")] if reasons else []
    parts = [p for p in parts if p and not p.startswith("Expected a")]
    class_path = _UNION_CLASS.search(text)
    if not parts:
        return text
    return f"{class_path[1]}: {parts[0]}" if class_path else parts[0]
