"""Checks of where a run's model, tokenizer, data and checkpoint come from, before any of it loads:
files and folders, readable weights, the hub, the model's position table; and the small readers of
a parsed config that every check uses. Each message names the option as written on the command line.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from jsonargparse import Namespace
from transformers import CONFIG_MAPPING, AutoConfig

from egspo.data.records import count_records
from egspo.data.synthetic import SyntheticArithmetic
from egspo.hf_names import looks_local
from egspo.model import hub_unreachable_reason

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


def check_paths(model: Any, data: Any) -> list[str]:
    errors = []
    policy = get_option(model, "policy")
    for key in ("name_or_path", "tokenizer"):
        path = get_option(policy, key)
        if isinstance(path, str) and path != "synthetic" and looks_local(path):
            errors += _check_local_folder(f"model.policy.{key}", path, tokenizer=key == "tokenizer")
    name, tokenizer = get_option(policy, "name_or_path"), get_option(policy, "tokenizer")
    if not errors and tokenizer is None and isinstance(name, str) and looks_local(name):
        folder = Path(name).expanduser()
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            errors.append(
                f"model.policy.name_or_path={name}: holds no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                "give model.policy.tokenizer"
            )
    for option, source in _data_sources(data):
        path = get_option(source, "path")
        if not isinstance(path, str) or not looks_local(path):
            continue
        local, split = Path(path).expanduser(), get_option(source, "split")
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


def check_policy_source(model: Any, warnings: list[str]) -> list[str]:
    """The policy's transformers config, read without weights (from `model.policy.config`, a local
    folder or the cache): a `model_type` transformers knows, and sequences that fit its positions."""
    policy = get_option(model, "policy")
    if policy is None:
        return []
    from_config, name = get_option(policy, "config"), get_option(policy, "name_or_path")
    if from_config is not None:
        config, problem = _config_from_dict(dict(from_config))
    elif isinstance(name, str):
        config, problem = _config_from_pretrained(name, bool(get_option(policy, "trust_remote_code")))
    else:
        return []
    if problem:
        return [problem]
    return _check_positions(model, config, warnings) if config is not None else []


def check_hub_id(option: str, name: str, filename: str) -> list[str]:
    """A hub id is only worth a download attempt when it is cached, or the hub can be reached."""
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
    model_type = values.get("model_type")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        hint = f" (closest: {', '.join(close)})" if close else " (e.g. qwen2, llama, gpt2)"
        return None, f"model.policy.config.model_type={model_type}: not a model type transformers knows{hint}"
    try:
        return AutoConfig.for_model(**values), None
    except (ValueError, TypeError, KeyError) as error:
        return None, f"model.policy.config: {clip_text(' '.join(str(error).split()))}"


def _config_from_pretrained(name: str, trust_remote_code: bool) -> tuple[Any, str | None]:
    """The config of a local or cached pretrained model (no download), or why it cannot be read."""
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
        return None, f"model.policy.name_or_path={name}: {clip_text(' '.join(str(error).split()))}"


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
    prompt, rollout, evaluation = (get_option(model, k) for k in ("prompt", "rollout", "evaluation"))
    prompt_length = get_option(prompt, "max_prompt_length", 512)
    completion = get_option(rollout, "max_completion_length", 256)
    eval_completion = get_option(evaluation, "max_completion_length")
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


def record_bound(option: str, source: Any) -> tuple[int, str] | None:
    """At most how many records the data source `option` (`data.prompts`) gives, and a phrase
    saying where that number comes from, known before anything loads: the local file's count
    (`egspo.data.records.count_records`), capped by the source's `limit`.

    None where no such number is known: a hub dataset without a `limit` cannot be counted before
    it loads (the sampler's check after loading, `EpochSampler`, speaks for it); an empty or
    unreadable file is named by the loader in its own words."""
    path, split, limit = (get_option(source, key) for key in ("path", "split", "limit"))
    if not isinstance(path, str):
        return None
    limit = limit if isinstance(limit, int) and limit >= 1 else None  # below 1: the loader refuses it
    if not looks_local(path):  # a hub dataset: only its `limit` is known
        if limit is None:
            return None
        return limit, f"{option}.limit={limit} keeps at most {limit} records of {path}"
    counted = count_records(path, split)
    if counted is None or counted[1] == 0:
        return None
    file, count = counted
    if limit is not None and limit < count:
        return limit, f"{option}.limit={limit} keeps {limit} of the {count} records of {file}"
    return count, f"{file} holds {count} records"


def synthetic_bound(synthetic: Any) -> tuple[int, str]:
    """The synthetic task's train split (its demonstrations and its RL prompts), as `record_bound`."""
    size = get_option(synthetic, "train_size", SyntheticArithmetic.train_size)
    return size, f"data.synthetic.train_size={size} gives {size} records"


def _data_sources(data: Any) -> Iterator[tuple[str, Any]]:
    for key in ("expert", "prompts"):
        source = get_option(data, key)
        if source is not None:
            yield f"data.{key}", init_args(source)
    for name, source in (get_option(data, "eval_sets") or {}).items():
        yield f"data.eval_sets.{name}", init_args(source)


def init_args(value: Any) -> Any:
    args = get_option(value, "init_args")
    return args if args is not None else value


def clip_text(text: str, limit: int = 300) -> str:
    """A message cut to `limit` characters (some libraries put whole lists in one)."""
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def get_option(namespace: Any, key: str, default: Any = None) -> Any:
    if namespace is None:
        return default
    if isinstance(namespace, (dict, Namespace)):  # not getattr: Namespace.update is a method
        value = namespace.get(key, default)
        return default if value is None else value
    return getattr(namespace, key, default)
