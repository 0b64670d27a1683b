"""Records counted before anything loads, and the check of each set against one step's draw."""

from __future__ import annotations

import json

import pytest

from egspo.data import DataSource
from egspo.data.records import count_records
from egspo.validation import validate_fit_config
from egspo.validation_sources import record_bound

ROWS = [{"prompt": f"{i} + 1?", "answer": str(i + 1)} for i in range(5)]


def _jsonl(path, rows, blank: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" + blank for r in rows))


def test_jsonl_counts_non_blank_lines_as_the_loader_reads_them(tmp_path):
    path = tmp_path / "train.jsonl"
    _jsonl(path, ROWS, blank="\n  \n\t\n")
    assert count_records(str(path)) == (path, 5)
    assert len(DataSource(str(path)).load()) == 5


@pytest.mark.parametrize("wrap", [lambda rows: rows, lambda rows: {"data": rows, "version": 1}])
def test_json_counts_its_list_or_its_data_list(tmp_path, wrap):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(wrap(ROWS[:3])))
    assert count_records(str(path)) == (path, 3)


def test_parquet_counts_from_its_footer(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:4]), path)
    assert count_records(str(path)) == (path, 4)


def test_folder_and_split_count_the_file_the_loader_picks(tmp_path):
    _jsonl(tmp_path / "train.jsonl", ROWS)
    (tmp_path / "test.json").write_text(json.dumps(ROWS[:2]))
    assert count_records(str(tmp_path), "train") == (tmp_path / "train.jsonl", 5)
    assert count_records(str(tmp_path), "test") == (tmp_path / "test.json", 2)
    assert count_records(str(tmp_path), "validation") is None  # no such split: the path check names it
    assert count_records(str(tmp_path)) is None  # a folder without a split: the same


def test_what_the_loader_refuses_is_not_counted(tmp_path):
    (tmp_path / "bad.json").write_text('[{"prompt": "1?", "answer": ')
    (tmp_path / "latin1.json").write_bytes(b'[{"prompt": "caf\xe9?", "answer": "4"}]')
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    (tmp_path / "rows.csv").write_text("prompt,answer\n1?,1\n")
    for name in ("bad.json", "latin1.json", "bad.parquet", "rows.csv", "missing.jsonl"):
        assert count_records(str(tmp_path / name)) is None, name
    assert count_records("openai/gsm8k", "train") is None  # a hub id


def test_record_bound_applies_the_limit(tmp_path):
    path = tmp_path / "train.jsonl"
    _jsonl(path, ROWS)
    assert record_bound("data.prompts", {"path": str(path)}) == (5, f"{path} holds 5 records")
    assert record_bound("data.prompts", {"path": str(path), "limit": 9}) == (5, f"{path} holds 5 records")
    assert record_bound("data.prompts", {"path": str(path), "limit": 2}) == (
        2,
        f"data.prompts.limit=2 keeps 2 of the 5 records of {path}",
    )
    hub = {"path": "openai/gsm8k", "split": "train", "limit": 3}
    assert record_bound("data.prompts", hub) == (
        3,
        "data.prompts.limit=3 keeps at most 3 records of openai/gsm8k",
    )
    assert record_bound("data.prompts", {"path": "openai/gsm8k"}) is None  # counted only once loaded


def test_an_empty_file_is_left_to_the_loader(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    assert count_records(str(path)) == (path, 0)
    assert record_bound("data.prompts", {"path": str(path)}) is None


def _config(path, trainer: dict, prompts_per_step: int = 2) -> dict:
    data = {"prompts": {"path": str(path)}, "prompts_per_step": prompts_per_step, "expert_per_step": 0}
    return {"model": {"sft_iterations": 0, "rl_iterations": 5}, "data": data, "trainer": trainer}


@pytest.mark.parametrize(
    ("trainer", "per_step", "tail"),
    [
        ({"accelerator": "cpu", "devices": 1}, 6, "fewer than 6 per step x 1 process"),
        ({"accelerator": "cpu", "devices": "auto"}, 6, "fewer than 6 per step x 1 process"),
        ({"accelerator": "cpu", "devices": 2, "num_nodes": 2}, 2, "fewer than 2 per step x 4 processes = 8"),
        ({"accelerator": "gpu", "devices": [0, 1, 2]}, 2, "fewer than 2 per step x 3 processes = 6"),
        ({"accelerator": "gpu", "devices": "auto"}, 6, "fewer than 6 per step"),  # counted at start-up
    ],
)
def test_a_set_smaller_than_every_process_draw_is_refused(tmp_path, trainer, per_step, tail):
    path = tmp_path / "train.jsonl"
    _jsonl(path, ROWS)
    errors = validate_fit_config(_config(path, trainer, per_step))
    assert errors == [f"data.prompts_per_step={per_step}: {path} holds 5 records, {tail}"]


def test_a_set_as_large_as_the_draw_passes(tmp_path):
    path = tmp_path / "train.jsonl"
    _jsonl(path, ROWS)
    assert validate_fit_config(_config(path, {"accelerator": "cpu", "devices": 1}, 5)) == []
    assert validate_fit_config(_config(path, {"accelerator": "gpu", "devices": "auto"}, 5)) == []
