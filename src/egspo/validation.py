"""Checks across options of a parsed `fit` config, and of checkpoints, before any model is loaded.

jsonargparse already rejects unknown options, wrong types and unknown classes, and each typed
option group validates its own values. What neither can see are constraints between options
(a mini-batch size that must divide the rollout batch) and values that only make sense for
some classes (a quantile gate in [0, 1]). Loading a 7B model before finding out costs minutes;
these checks cost microseconds. Each message names the option as it is written on the command line.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from egspo.hf_names import looks_local

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")  # the files `egspo.data.records` reads
# What `from_pretrained` reads from a model folder: its config and weights (one file, or shards
# listed in an index), and from a tokenizer folder any of these.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
# Options of the module given by `class_path`, built here once to run their constructors' checks.
CLASS_OPTIONS = ("reward", "policy_loss", "warmup_loss", "mix_loss", "mu", "methods")


def validate_fit_config(config: Any, warnings: list[str] | None = None) -> list[str]:
    """All problems found in a parsed `fit` config (a jsonargparse Namespace), one line each.

    `warnings` (when given) receives what deserves a word but may be intended (one line each)."""
    model, data, trainer = _get(config, "model"), _init_args(_get(config, "data")), _get(config, "trainer")
    paths = _check_paths(model, data)
    policy = [] if paths else _check_policy_source(model, warnings if warnings is not None else [])
    errors = [
        *_check_groups(model),
        *_check_batches(model, data),
        *_check_data(model, data),
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
    strategy = _get(trainer, "strategy")
    name = strategy if isinstance(strategy, str) else str(_get(strategy, "class_path", ""))
    if name.startswith("fsdp") or name.endswith("FSDPStrategy"):
        from egspo.distributed import FSDP1_REFUSAL

        return [f"trainer.strategy={name}: {FSDP1_REFUSAL}"]
    return []


def check_machine(config: Any) -> list[str]:
    """What this machine cannot give a parsed `fit` config (a GPU, a hub id's files), one line each;
    kept apart from `validate_fit_config` so that a config can be checked on another machine."""
    model, trainer = _get(config, "model"), _get(config, "trainer")
    policy = _get(model, "policy")
    errors = _check_accelerator(trainer)
    for option, filename in (("name_or_path", "config.json"), ("tokenizer", "tokenizer_config.json")):
        value = _get(policy, option)
        if isinstance(value, str) and value != "synthetic" and not looks_local(value):
            errors += _check_hub_id(f"model.policy.{option}", value, filename)
    return errors


def _check_accelerator(trainer: Any) -> list[str]:
    """A GPU asked for where there is none fails in the Trainer with a traceback: say so first."""
    import torch

    accelerator = _get(trainer, "accelerator")
    name = accelerator if isinstance(accelerator, str) else str(_get(accelerator, "class_path", ""))
    name = name.lower()
    if name in ("gpu", "cuda") or name.endswith("cudaaccelerator"):
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not available:
            return [
                f"trainer.accelerator={accelerator}: no CUDA GPU is visible here; use --trainer.accelerator=cpu"
            ]
        devices = _get(trainer, "devices")
        if isinstance(devices, int) and not isinstance(devices, bool) and devices > available:
            return [f"trainer.devices={devices}: only {available} GPU(s) visible"]
    if name == "mps" and not torch.backends.mps.is_available():
        return [
            f"trainer.accelerator={accelerator}: MPS is not available here; use --trainer.accelerator=cpu"
        ]
    return []


def _check_checkpointing(trainer: Any) -> list[str]:
    """`enable_checkpointing=false` beside a checkpoint callback: Lightning refuses the pair late."""
    if _get(trainer, "enable_checkpointing") is not False:
        return []
    for i, callback in enumerate(_get(trainer, "callbacks") or []):
        name = str(_get(callback, "class_path", ""))
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
    from egspo.module import HybridRLModule

    hints = typing.get_type_hints(HybridRLModule.__init__)
    errors = []
    for key in CLASS_OPTIONS:
        value = _get(model, key)
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            class_path = _get(item, "class_path")
            if not isinstance(class_path, str):
                continue
            option = f"model.{key}" if index is None else f"model.{key}[{index}]"
            hint = hints[key]
            if index is not None:  # list[X] | None -> X
                hint = next(typing.get_args(a)[0] for a in typing.get_args(hint) if typing.get_args(a))
            built, problem = _build(hint, item)
            if problem:
                errors.append((option, f"{option} ({class_path}): {problem}"))
            workers = getattr(built, "num_workers", None)
            if isinstance(workers, int) and workers < 1:  # a pool of worker processes, started at first use
                line = f"{option}.init_args.num_workers={workers}: must be >= 1 (worker processes)"
                errors.append((option, line))
    return errors


def _build(hint: Any, value: Any) -> tuple[Any, str | None]:
    """`value` (a parsed `class_path` option) built as `hint`, or why it cannot be."""
    types = [t for t in typing.get_args(hint) if t is not type(None)] if typing.get_origin(hint) else [hint]
    types = [t for t in types if isinstance(t, type) and t not in (int, float)]
    if len(types) != 1:
        return None, None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=types[0])
    plain = value.as_dict() if isinstance(value, Namespace) else value
    try:
        return parser.instantiate(parser.parse_object({"value": plain})).value, None
    except (ValueError, TypeError) as error:
        return None, union_reason(" ".join(str(error).split()))
    except Exception:  # anything else is for the real build to report
        return None, None


def _check_data(model: Any, data: Any) -> list[str]:
    """The data options against the phases (`egspo.data.datamodule.data_option_problems`)."""
    from egspo.data.datamodule import HybridDataModule, data_option_problems
    from egspo.module import HybridRLModule

    mu = _get(model, "mu")
    mixing = (isinstance(mu, (int, float)) and mu > 0) or _get(mu, "class_path") is not None
    data_defaults = inspect.signature(HybridDataModule.__init__).parameters
    module_defaults = inspect.signature(HybridRLModule.__init__).parameters

    def value(
        namespace: Any, key: str, defaults: Any
    ) -> Any:  # a config written as a plain dict lacks defaults
        return _get(namespace, key, defaults[key].default)

    return data_option_problems(
        expert=_get(data, "expert"),
        prompts=_get(data, "prompts"),
        synthetic=_get(data, "synthetic"),
        sft_iterations=value(model, "sft_iterations", module_defaults),
        rl_iterations=value(model, "rl_iterations", module_defaults),
        prompts_per_step=value(data, "prompts_per_step", data_defaults),
        expert_per_step=value(data, "expert_per_step", data_defaults),
        eval_size=_get(data, "eval_size"),
        eval_batch_size=value(data, "eval_batch_size", data_defaults),
        sft_mixing=mixing,
    )


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
        if isinstance(path, str) and path != "synthetic" and looks_local(path):
            errors += _check_local_folder(f"model.policy.{key}", path, tokenizer=key == "tokenizer")
    name, tokenizer = _get(policy, "name_or_path"), _get(policy, "tokenizer")
    if not errors and tokenizer is None and isinstance(name, str) and looks_local(name):
        folder = Path(name).expanduser()
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            errors.append(
                f"model.policy.name_or_path={name}: holds no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                "give model.policy.tokenizer"
            )
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


def _check_local_folder(option: str, path: str, *, tokenizer: bool) -> list[str]:
    """A model (config and readable weights) or tokenizer folder, as `from_pretrained` reads it."""
    folder = Path(path).expanduser()
    if not folder.exists():
        return [f"{option}={path}: no such file or folder"]
    what = "tokenizer" if tokenizer else "model"
    if not folder.is_dir():
        return [f"{option}={path}: a file; give the {what}'s folder (as written by save_pretrained)"]
    if tokenizer:
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            return []
        return [f"{option}={path}: holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})"]
    if not (folder / "config.json").is_file():
        return [f"{option}={path}: no config.json in this folder (not a saved Hugging Face model)"]
    present = [f for f in WEIGHT_FILES if (folder / f).is_file()]
    if not present:
        return [f"{option}={path}: no weights in this folder (none of {', '.join(WEIGHT_FILES)})"]
    problem = _weights_problem(folder, present[0])
    return [f"{option}={path}: {problem}"] if problem else []


def _weights_problem(folder: Path, name: str) -> str | None:
    """Why the weights `name` in `folder` cannot be read, from the index and the safetensors
    headers alone (a few KB, however large the model), or None."""
    files = [name]
    if name.endswith(".index.json"):
        try:
            files = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{name}: not a valid weight index (JSON with a weight_map)"
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            return (
                f"{name} lists {missing[0]}, which is missing ({len(missing)} of {len(files)} files missing)"
            )
    for file in files:
        problem = safetensors_problem(folder / file) if file.endswith(".safetensors") else None
        if problem:
            return f"{file}: {problem}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, or None: reads its header only.

    Layout: 8 bytes little-endian header length n, n bytes of JSON (each tensor's byte range
    `data_offsets` [begin, end) in the data that follows), then the data: the file must hold
    at least 8 + n + the largest end."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or 8 + length > size:
            return "not a safetensors file, or truncated (its header does not fit in the file)"
        try:
            header = json.loads(handle.read(length))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return "not a safetensors file (unreadable header)"
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        return f"truncated ({size} bytes, its tensors need {needed})"
    return None


def _check_policy_source(model: Any, warnings: list[str]) -> list[str]:
    """The policy's transformers config, read without weights (from `model.policy.config`, a local
    folder or the cache): a `model_type` transformers knows, and sequences that fit its positions."""
    policy = _get(model, "policy")
    if policy is None:
        return []
    from_config, name = _get(policy, "config"), _get(policy, "name_or_path")
    if from_config is not None:
        config, problem = _config_from_dict(dict(from_config))
    elif isinstance(name, str):
        config, problem = _config_from_pretrained(name, bool(_get(policy, "trust_remote_code")))
    else:
        return []
    if problem:
        return [problem]
    return _check_positions(model, config, warnings) if config is not None else []


def _check_hub_id(option: str, name: str, filename: str) -> list[str]:
    """A hub id is only worth a download attempt when it is cached, or the hub can be reached."""
    import huggingface_hub

    from egspo.model import hub_unreachable_reason

    try:
        cached = huggingface_hub.try_to_load_from_cache(name, filename)
    except ValueError as error:  # HFValidationError: not a valid repo id
        return [f"{option}={name}: not a local path and not a valid hub id ({' '.join(str(error).split())})"]
    if isinstance(cached, str):
        return []
    reason = hub_unreachable_reason()
    if reason:
        return [f"{option}={name}: not a local folder, not in the Hugging Face cache, and {reason}"]
    return []


def _config_from_dict(values: dict[str, Any]) -> tuple[Any, str | None]:
    """The transformers config of `model.policy.config` (random init), or why it cannot be built."""
    from transformers import CONFIG_MAPPING, AutoConfig

    model_type = values.get("model_type")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        hint = f" (closest: {', '.join(close)})" if close else " (e.g. qwen2, llama, gpt2)"
        return None, f"model.policy.config.model_type={model_type}: not a model type transformers knows{hint}"
    try:
        return AutoConfig.for_model(**values), None
    except (ValueError, TypeError, KeyError) as error:
        return None, f"model.policy.config: {_clip(' '.join(str(error).split()))}"


def _config_from_pretrained(name: str, trust_remote_code: bool) -> tuple[Any, str | None]:
    """The config of a local or cached pretrained model (no download), or why it cannot be read."""
    from transformers import AutoConfig

    local = looks_local(name)
    try:
        path = str(Path(name).expanduser()) if local else name
        return AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        ), None
    except OSError:  # a hub id not cached here (the hub answered): its download reads it
        if local:
            return None, f"model.policy.name_or_path={name}: config.json cannot be read"
        return None, None
    except (ValueError, KeyError, TypeError) as error:
        return None, f"model.policy.name_or_path={name}: {_clip(' '.join(str(error).split()))}"


def _rotary(config: Any) -> bool:
    """Positions by rotation (RoPE: defined at any index) rather than a learned table."""
    keys = ("rope_parameters", "rope_scaling", "rope_theta", "rotary_dim", "rotary_pct", "rotary_emb_base")
    return any(getattr(config, key, None) is not None for key in keys)


def _check_positions(model: Any, config: Any, warnings: list[str]) -> list[str]:
    """A prompt plus its completion must fit the model's positions: a learned position table
    (GPT-2) has no row past `max_position_embeddings` (the run would crash mid-RL); RoPE runs
    past it, with the quality of a length it never saw (a warning: it may be meant, e.g. YaRN)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return []
    prompt, rollout, evaluation = (_get(model, k) for k in ("prompt", "rollout", "evaluation"))
    prompt_length = _get(prompt, "max_prompt_length", 512)
    completion = _get(rollout, "max_completion_length", 256)
    eval_completion = _get(evaluation, "max_completion_length")
    if eval_completion is not None and eval_completion > completion:
        completion, names = (
            eval_completion,
            "model.prompt.max_prompt_length + model.evaluation.max_completion_length",
        )
    else:
        names = "model.prompt.max_prompt_length + model.rollout.max_completion_length"
    longest = prompt_length + completion
    if longest <= limit:
        return []
    where = f"{names} = {longest} exceeds the model's max_position_embeddings ({limit})"
    if _rotary(config):
        warnings.append(
            f"{where}: its rotary positions go on past it, but the model never saw such lengths in training"
        )
        return []
    return [f"{where}: the model learned one embedding per position and has none past {limit}; shorten them"]


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


def _clip(text: str, limit: int = 300) -> str:
    """A message cut to `limit` characters (some libraries put whole lists in one)."""
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _get(namespace: Any, key: str, default: Any = None) -> Any:
    if namespace is None:
        return default
    if isinstance(namespace, (dict, Namespace)):  # not getattr: Namespace.update is a method
        value = namespace.get(key, default)
        return default if value is None else value
    return getattr(namespace, key, default)
