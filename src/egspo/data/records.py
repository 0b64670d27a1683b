"""Loading question/solution/answer records from local files or the Hugging Face hub.

Nothing is dropped silently: a row that lacks what its layout needs raises ``DataError``
naming the file, the 1-based line (or record) number and the field, as
``file:line: field: why`` (``train.jsonl:12: answer: missing``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from egspo.rewards.extraction import last_boxed

Layout = Literal["auto", "gsm8k", "math", "generic"]
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
_MATH_TRAILER = "The answer is:"
# Source field names per layout, for the logical fields prompt / response / answer.
_DEFAULT_FIELDS: dict[str, dict[str, str | None]] = {
    "gsm8k": {"prompt": "question", "response": "answer", "answer": None},
    "math": {"prompt": "problem", "response": "solution", "answer": "answer"},
    "generic": {"prompt": "prompt", "response": "response", "answer": "answer"},
}


class DataError(ValueError):
    """A data file or row that cannot be used; the message names file, line and field."""


@dataclass(frozen=True)
class Example:
    """One problem: the raw question, an expert solution when known, the gold final answer."""

    prompt: str
    response: str | None
    answer: str


@dataclass
class DataSource:
    """Where a data set lives and how to read it (one YAML block per set).

    ``path``: a local .jsonl/.json/.parquet file, a folder holding ``{split}.jsonl`` (or
    .json/.parquet), or a hub dataset id. ``subset``: the hub configuration name (e.g.
    ``main`` for ``openai/gsm8k``). ``fields`` renames the logical fields ``prompt``,
    ``response`` and ``answer`` to the file's keys (``None`` marks a field as absent).
    ``limit`` keeps the first ``limit`` records.
    """

    path: str
    split: str | None = None
    layout: Layout = "auto"
    fields: dict[str, str | None] | None = None
    limit: int | None = None
    subset: str | None = None

    def load(self) -> list[Example]:
        return load_examples(
            self.path,
            split=self.split,
            layout=self.layout,
            fields=self.fields,
            limit=self.limit,
            subset=self.subset,
        )


def gsm8k_final_answer(solution: str) -> str | None:
    """The number after the last ``####`` with thousands commas removed, or None."""
    if "####" not in solution:
        return None
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return answer or None


def split_math_solution(solution: str) -> tuple[str, str | None]:
    """``(solution, final answer)`` of a MATH-style solution.

    A trailing ``The answer is: X`` line (MetaMath style) gives the answer and is cut from
    the solution; otherwise the answer is the content of the last ``\\boxed{}``.
    """
    if _MATH_TRAILER in solution:
        body, _, answer = solution.rpartition(_MATH_TRAILER)
        if answer.strip():
            return body.rstrip(), answer.strip()
    return solution, last_boxed(solution)


def load_examples(
    source: str,
    *,
    split: str | None = None,
    layout: Layout = "auto",
    fields: dict[str, str | None] | None = None,
    limit: int | None = None,
    subset: str | None = None,
) -> list[Example]:
    """Read ``source`` into Examples (see ``DataSource`` for the arguments).

    Layouts: ``gsm8k`` (``question``; ``answer`` holds a solution ending ``#### N``;
    answer = N without commas), ``math`` (``problem``; ``solution`` with ``\\boxed{}`` or a
    ``The answer is:`` trailer; an ``answer`` field wins when present), ``generic``
    (``prompt``, optional ``response``, ``answer``). ``auto`` decides from the first row.
    """
    if layout not in ("auto", *_DEFAULT_FIELDS):
        raise DataError(f"unknown layout {layout!r}; expected auto, gsm8k, math or generic")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    name, rows = _open_rows(source, split, subset)
    examples: list[Example] = []
    resolved: dict[str, str | None] | None = None
    kind = layout
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{name}{where}: expected a JSON object, got {type(row).__name__}")
        if resolved is None:
            kind, defaults = _detect_layout(row) if layout == "auto" else (layout, _DEFAULT_FIELDS[layout])
            resolved = {**defaults, **(fields or {})}
        examples.append(_to_example(row, kind, resolved, f"{name}{where}"))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{name}: no records found (empty file or split)")
    return examples


def _detect_layout(row: dict[str, Any]) -> tuple[str, dict[str, str | None]]:
    """Layout and default field names, from the keys (and answer text) of the first row."""
    if "problem" in row and "solution" in row:
        return "math", _DEFAULT_FIELDS["math"]
    if "question" in row and isinstance(row.get("answer"), str):
        text = row["answer"]
        if "####" in text:
            return "gsm8k", _DEFAULT_FIELDS["gsm8k"]
        if "\\boxed" in text or _MATH_TRAILER in text:
            # MATH-500 / MetaMath files: `answer` holds the whole solution.
            return "math", {"prompt": "question", "response": "answer", "answer": None}
        return "generic", {"prompt": "question", "response": None, "answer": "answer"}
    return "generic", _DEFAULT_FIELDS["generic"]


def _field(row: dict[str, Any], key: str | None, where: str, logical: str, required: bool) -> str | None:
    if key is None:
        if required:
            raise DataError(f"{where}: {logical}: required, but `fields` maps it to no source field")
        return None
    role = "" if key == logical else f" (the {logical})"
    if key not in row or row[key] is None:
        if required:
            raise DataError(f"{where}: {key}: missing{role}")
        return None
    value = row[key]
    if isinstance(value, float | int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: {key}: must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: {key}: empty{role}")
    return value


def _to_example(row: dict[str, Any], kind: str, fields: dict[str, str | None], where: str) -> Example:
    prompt = _field(row, fields.get("prompt"), where, "prompt", required=True)
    if kind == "gsm8k":
        key = fields.get("response")
        response = _field(row, key, where, "response", required=True)
        answer = _field(row, fields.get("answer"), where, "answer", required=False)
        answer = answer or gsm8k_final_answer(response)
        if not answer:
            raise DataError(f"{where}: {key}: no '#### <answer>' line to take the final answer from")
        return Example(prompt, response, answer.strip())
    if kind == "math":
        key = fields.get("response")
        response = _field(row, key, where, "response", required=False)
        answer_key = fields.get("answer")
        answer = None if answer_key == key else _field(row, answer_key, where, "answer", required=False)
        if response is not None:
            response, derived = split_math_solution(response)
            answer = answer or derived
        if not answer or not answer.strip():
            missing = f"{answer_key}: missing, and " if answer_key and answer_key != key else ""
            raise DataError(
                f"{where}: {missing}{key}: no \\boxed{{}} or 'The answer is:' to take the final answer from"
            )
        return Example(prompt, response, answer.strip())
    response = _field(row, fields.get("response"), where, "response", required=False)
    answer = _field(row, fields.get("answer"), where, "answer", required=True)
    return Example(prompt, response, answer.strip())


def _open_rows(source: str, split: str | None, subset: str | None) -> tuple[str, Iterator[tuple[str, Any]]]:
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        path = _file_in_folder(path, split)
    if path.is_file():
        return str(path), _read_file(path)
    if _looks_local(source):
        raise DataError(f"{source}: file not found")
    return _hub_rows(source, split, subset)


def _looks_local(source: str) -> bool:
    return source.endswith(_LOCAL_SUFFIXES) or source.startswith(("/", "./", "../", "~", "."))


def _file_in_folder(folder: Path, split: str | None) -> Path:
    if split is None:
        raise DataError(f"{folder}: is a folder; give a split to pick {{split}}.jsonl in it")
    for suffix in _LOCAL_SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: no {split}.jsonl, {split}.json or {split}.parquet in this folder")


def count_records(source: str, split: str | None = None) -> tuple[Path, int] | None:
    """The local file that `load_examples(source, split=split)` reads and how many records it
    holds, counted without building them: a JSONL file's non-blank lines, a JSON file's list (or
    its `data` list), a parquet file's row count from its footer. None where that cannot be known
    before loading: a hub dataset, or a file the loader refuses in its own words (missing,
    malformed, not UTF-8, an unsupported type).

    The check of a run's options uses it to refuse a set smaller than one step's draw while that
    costs a read of the file, not a model load."""
    path = Path(os.path.expanduser(source))
    try:
        if path.is_dir():
            path = _file_in_folder(path, split)
        count = _count_rows(path) if path.is_file() else None
    except (DataError, OSError):
        return None
    return None if count is None else (path, count)


def _count_rows(path: Path) -> int | None:
    if path.suffix == ".jsonl":
        with path.open("rb") as handle:  # a line at a time: no more memory than the longest line
            return sum(1 for raw in handle if raw.strip())
    if path.suffix == ".json":
        return len(_json_records(path))
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(path).num_rows  # the footer only
        except pa.ArrowException:
            return None
    return None


def _read_file(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        return _read_json(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported file type; use .jsonl, .json or .parquet")


def _decode(raw: bytes, path: Path, number: int | None = None) -> str:
    """UTF-8 text of `raw` (a byte-order mark is allowed), or a DataError naming the file, the
    line and the column of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = number if number is not None else raw.count(b"\n", 0, exc.start) + 1
        start = raw.rfind(b"\n", 0, exc.start) + 1
        column = len(raw[start : exc.start].decode("utf-8-sig")) + 1  # valid up to the bad byte
        byte = raw[exc.start : exc.start + 1].hex()
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte 0x{byte} at column {column}); save the file as UTF-8"
        ) from exc


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as handle:  # bytes: a decoding error is then named by its line
        for number, raw in enumerate(handle, start=1):
            line = _decode(raw, path, number)
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip())  # columns then count within the line
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON ({exc.msg}, column {exc.colno})") from exc
            yield f":{number}", row


def _json_records(path: Path) -> list[Any]:
    """The records of a JSON file: its list, or the list under its `data` key."""
    try:
        data = json.loads(_decode(path.read_bytes(), path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
    return data


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    for number, row in enumerate(_json_records(path), start=1):
        yield f": record {number}", row


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        reason = " ".join(str(exc).split())
        raise DataError(f"{path}: not a readable parquet file ({reason[:200]})") from exc
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f": row {number}", row


def _hub_rows(source: str, split: str | None, subset: str | None) -> tuple[str, Iterator[tuple[str, Any]]]:
    import datasets

    split = split or "train"
    try:
        dataset = datasets.load_dataset(source, subset, split=split)
    except Exception as exc:
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 200 else reason[:197].rstrip() + "..."
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if _is_set(os.environ.get(v))]
        hint = (
            f"; {' and '.join(offline)} {'forbid' if len(offline) > 1 else 'forbids'} downloads"
            if offline
            else ""
        )
        raise DataError(
            f"{source}: cannot load this hub dataset (subset={subset!r}, split={split!r}): {reason}{hint}; "
            "check the name, or pass a local .jsonl/.json/.parquet path"
        ) from exc
    name = f"{source}[{split}]"
    return name, ((f": row {number}", row) for number, row in enumerate(dataset, start=1))


def _is_set(flag: str | None) -> bool:
    return (flag or "").lower() in {"1", "true", "yes", "on"}
