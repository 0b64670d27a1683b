"""Record loading, prompt formatting and the HybridDataModule."""

import json
import re
import time

import jsonargparse
import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from egspo.data import (
    BOXED_INSTRUCTION,
    DataError,
    DataSource,
    Example,
    HybridDataModule,
    SyntheticArithmetic,
    format_prompt,
    load_examples,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- real files ---------------------------------------------------------------------------


def test_gsm8k_layout(gsm8k_train_path, gsm8k_test_path):
    train, test = load_examples(str(gsm8k_train_path)), load_examples(str(gsm8k_test_path))
    assert (len(train), len(test)) == (7473, 1319)
    for example in test:
        last_line = example.response.rstrip().rsplit("\n", 1)[1]
        assert last_line.startswith("#### ") and last_line[5:].replace(",", "") == example.answer
        assert example.answer.lstrip("-").isdigit()
    with_commas = [e for e in test if "#### " in e.response and "," in e.response.rsplit("####", 1)[1]]
    assert with_commas and all(e.answer.isdigit() for e in with_commas)  # e.g. 1,450,000 -> 1450000


def test_folder_and_split(gsm8k_test_path):
    examples = load_examples(str(gsm8k_test_path.parent), split="test", limit=5)
    assert examples == load_examples(str(gsm8k_test_path))[:5]
    with pytest.raises(DataError, match="give a split"):
        load_examples(str(gsm8k_test_path.parent))
    with pytest.raises(DataError, match=r"no validation\.jsonl"):
        load_examples(str(gsm8k_test_path.parent), split="validation")


def test_math500_layout(math500_path):
    examples = load_examples(str(math500_path))
    assert len(examples) == 500
    raw = [json.loads(line) for line in math500_path.read_text().splitlines()]
    for example, row in zip(examples, raw, strict=True):
        assert example.prompt == row["question"]
        assert example.answer == row["answer"].rsplit("The answer is:", 1)[1].strip()
        assert "The answer is:" not in example.response and "\\boxed" in example.response
    explicit = load_examples(
        str(math500_path), layout="math", fields={"prompt": "question", "response": "answer"}
    )
    assert explicit == examples


# --- generic layouts and formats -----------------------------------------------------------


def test_generic_jsonl_json_parquet_agree(tmp_path):
    rows = [{"prompt": "1+1?", "response": "2", "answer": 2}, {"prompt": "2+2?", "answer": "4"}]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(
        pa.Table.from_pylist([{**r, "answer": str(r["answer"])} for r in rows]), tmp_path / "d.parquet"
    )
    expected = [Example("1+1?", "2", "2"), Example("2+2?", None, "4")]
    for path in (jsonl, tmp_path / "d.json", tmp_path / "d.parquet"):
        assert load_examples(str(path)) == expected


def test_math_layout_with_boxed_or_answer_field(tmp_path):
    rows = [
        {"problem": "p1", "solution": r"so $\boxed{\frac{1}{2}}$."},
        {"problem": "p2", "solution": "no box", "answer": "7"},
    ]
    examples = load_examples(str(write_jsonl(tmp_path / "m.jsonl", rows)))
    assert [e.answer for e in examples] == [r"\frac{1}{2}", "7"]


def test_field_mapping(tmp_path):
    rows = [{"q": "What?", "final": "3", "work": "1+2=3"}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    examples = load_examples(
        str(path), layout="generic", fields={"prompt": "q", "answer": "final", "response": "work"}
    )
    assert examples == [Example("What?", "1+2=3", "3")]


def test_limit(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": str(i), "answer": str(i)} for i in range(10)])
    assert [e.prompt for e in load_examples(str(path), limit=3)] == ["0", "1", "2"]


# --- bad input ------------------------------------------------------------------------------


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON \(Expecting value, column 26\)$"):
        load_examples(str(path))


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        # Latin-1 "é" (0xe9) on line 2, after 15 characters of that line
        (
            "latin1.jsonl",
            b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n',
            "2: not UTF-8 (byte 0xe9 at column 16)",
        ),
        # the character count, not the byte count: "ü" is two bytes of UTF-8
        (
            "after_utf8.jsonl",
            '{"prompt": "\u00fc'.encode() + b'\xff", "answer": "1"}\n',
            "1: not UTF-8 (byte 0xff at column 14)",
        ),
        (
            "latin1.json",
            b'[{"prompt": "a", "answer": "1"},\n {"prompt": "\xe9", "answer": "2"}]',
            "2: not UTF-8 (byte 0xe9 at column 14)",
        ),
    ],
)
def test_bytes_that_are_not_utf8_name_file_line_and_column(tmp_path, name, content, where):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{name}:{where}; save the file as UTF-8") + "$"):
        load_examples(str(path))


def test_a_byte_order_mark_is_read_as_utf8(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "answer": "1"}\n')
    assert load_examples(str(path))[0].prompt == "a"


def test_unreadable_parquet_names_the_file(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable parquet file"):
        load_examples(str(path))


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "miss.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    with pytest.raises(DataError, match=r"miss\.jsonl:2: answer: missing$"):
        load_examples(str(path))
    path = write_jsonl(
        tmp_path / "gsm.jsonl", [{"question": "a", "answer": "x\n#### 1"}, {"question": "b", "answer": "2"}]
    )
    with pytest.raises(DataError, match=r"gsm\.jsonl:2: answer: no '#### <answer>' line"):
        load_examples(str(path))
    path = write_jsonl(tmp_path / "math.jsonl", [{"problem": "a", "solution": "no answer"}])
    with pytest.raises(DataError, match=r"math\.jsonl:1: answer: missing, and solution: no \\boxed\{\}"):
        load_examples(str(path))
    path = write_jsonl(tmp_path / "type.jsonl", [{"prompt": ["a"], "answer": "1"}])
    with pytest.raises(DataError, match=r"type\.jsonl:1: prompt: must be a string, got list$"):
        load_examples(str(path))
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": ""}]))
    with pytest.raises(DataError, match=r"arr\.json: record 2: answer: empty$"):
        load_examples(str(path))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        load_examples(str(path))


def test_missing_file_and_offline_hub(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_examples(str(tmp_path / "nope.jsonl"))
    start = time.perf_counter()
    with pytest.raises(
        DataError, match=r"; HF_HUB_OFFLINE( and HF_DATASETS_OFFLINE)? forbids? downloads;"
    ) as info:
        load_examples("someone/some-dataset-that-is-not-cached", split="train")
    assert str(info.value).startswith("someone/some-dataset-that-is-not-cached: cannot load this hub dataset")
    assert str(info.value).endswith("check the name, or pass a local .jsonl/.json/.parquet path")
    assert time.perf_counter() - start < 30  # offline mode fails without network retries


# --- prompts ----------------------------------------------------------------------------------


def test_format_prompt_chat_template(tiny_tokenizer):
    text = format_prompt(tiny_tokenizer, "What is 2+2?")
    assert text.startswith("<|im_start|>user\nWhat is 2+2?\nSolve step by step")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    text = format_prompt(tiny_tokenizer, "Q", system_prompt="Be brief.", instruction=BOXED_INSTRUCTION)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\nQ\n{BOXED_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        format_prompt(tiny_tokenizer, "Q", instruction=None)
        == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )


def test_format_prompt_plain(tiny_tokenizer):
    plain = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer)
    assert not plain.chat_template
    assert format_prompt(plain, "Q", instruction="Think.") == "Question: Q\nThink.\nAnswer:\n"
    assert format_prompt(plain, "Q", system_prompt="S", instruction="") == "S\n\nQuestion: Q\nAnswer:\n"


# --- DataModule --------------------------------------------------------------------------------


def make_synthetic_dm(**kwargs) -> HybridDataModule:
    task = SyntheticArithmetic(seed=1, train_size=300, test_size=50)
    defaults = dict(synthetic=task, rl_iterations=40, prompts_per_step=4, expert_per_step=3, seed=7)
    return HybridDataModule(**{**defaults, **kwargs})


def batches(dm, rank=0, world_size=1):
    dm.rank, dm.world_size = rank, world_size
    dataset = dm.train_dataset()
    return [dataset[i] for i in range(len(dataset))]


def test_train_batches_are_pure_functions_of_seed_iteration_rank():
    first = batches(make_synthetic_dm())
    assert len(first) == 40
    assert first == batches(make_synthetic_dm())
    assert first != batches(make_synthetic_dm(seed=8))
    assert batches(make_synthetic_dm(), 1, 2) == batches(make_synthetic_dm(), 1, 2)
    # Random access gives the same batch as sequential access (what resume relies on).
    dm = make_synthetic_dm()
    dm.rank, dm.world_size = 0, 1
    dataset = dm.train_dataset()
    assert [dataset[i] for i in (33, 2, 17)] == [first[33], first[2], first[17]]
    batch = first[0]
    assert set(batch) == {"prompts", "answers", "expert_prompts", "expert_responses"}
    assert len(batch["prompts"]) == len(batch["answers"]) == 4
    assert len(batch["expert_prompts"]) == len(batch["expert_responses"]) == 3
    assert all(r.endswith("#### " + r.rsplit("#### ", 1)[1]) for r in batch["expert_responses"])


def test_ranks_are_disjoint_and_epochs_sample_without_replacement():
    world = 3
    per_rank = [batches(make_synthetic_dm(), rank, world) for rank in range(world)]
    iterations_per_epoch = 300 // (4 * world)
    for i in range(40):
        seen = [p for rank in range(world) for p in per_rank[rank][i]["prompts"]]
        assert len(seen) == len(set(seen)) == 4 * world
    epoch = [p for i in range(iterations_per_epoch) for r in range(world) for p in per_rank[r][i]["prompts"]]
    assert len(epoch) == len(set(epoch))  # no prompt twice within an epoch
    next_epoch = [p for r in range(world) for p in per_rank[r][iterations_per_epoch]["prompts"]]
    assert set(next_epoch) <= {e.prompt for e in SyntheticArithmetic(seed=1, train_size=300).generate()}


def test_phase_batches_resume_after_the_last_consumed_batch():
    dm = make_synthetic_dm(sft_iterations=10, rl_iterations=30)
    assert dm.phases == [("sft", 0, 10), ("rl", 10, 40)]
    loader = dm.train_dataloader()  # no trainer: the first epoch, the warm-up
    full = list(loader)
    assert len(loader) == 10 and [b.iteration for b in full] == list(range(10))
    assert {b.phase for b in full} == {"sft"}
    # Lightning fetches ahead: only what reached the step counts as done.
    loader.consumed(3)
    resumed = dm.train_dataloader()
    resumed.load_state_dict(loader.state_dict())
    assert list(resumed) == full[4:]
    assert len(resumed) == 10  # the phase's length, for Lightning's batch count


def test_lightning_fit_runs_each_phase_as_an_epoch_and_sees_every_iteration_once():
    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = make_synthetic_dm(sft_iterations=2, rl_iterations=4)
    module = Recorder()
    trainer = L.Trainer(
        max_epochs=2, reload_dataloaders_every_n_epochs=1, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    dm.rank = None  # rank now comes from the trainer
    dataset = dm.train_dataset()
    assert [b.iteration for b in module.seen] == list(range(6))
    assert [b.phase for b in module.seen] == ["sft"] * 2 + ["rl"] * 4
    assert [b.prompts for b in module.seen] == [dataset[i]["prompts"] for i in range(6)]


def test_eval_shards_cover_every_example_once_with_equal_lengths():
    from egspo.data.batches import EvalShard

    examples = make_synthetic_dm().synthetic.generate(7, split="test")
    shards = [EvalShard(examples, rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    real = [s[i][0] for s in shards for i in range(len(s)) if not s[i][1]]
    assert sorted(e.prompt for e in real) == sorted(e.prompt for e in examples)
    assert sum(s[i][1] for s in shards for i in range(len(s))) == 2  # padding, flagged


def test_validation_loaders():
    dm = make_synthetic_dm(eval_batch_size=16, eval_size=40)
    loaders = dm.val_dataloader()
    assert dm.eval_set_names == ["synthetic"]
    first = list(loaders[0])
    assert [len(b["prompts"]) for b in first] == [16, 16, 8]
    assert set(first[0]) == {"prompts", "answers", "padding"}


def test_real_data_module(gsm8k_train_path, gsm8k_test_path, math500_path):
    dm = HybridDataModule(
        expert=DataSource(str(gsm8k_train_path)),
        prompts=DataSource(str(gsm8k_train_path.parent), split="train"),
        eval_sets={"gsm8k": DataSource(str(gsm8k_test_path)), "math500": DataSource(str(math500_path))},
        rl_iterations=5, prompts_per_step=2, expert_per_step=2, eval_size=100, eval_batch_size=32,
    )  # fmt: skip
    assert dm.eval_set_names == ["gsm8k", "math500"]
    assert [sum(len(b["prompts"]) for b in dl) for dl in dm.val_dataloader()] == [100, 100]
    batch = next(iter(dm.train_dataloader()))
    assert all("####" in r for r in batch.expert_responses)


def test_datamodule_errors(tmp_path):
    with pytest.raises(ValueError, match=r"either the synthetic task or data\.expert/data\.prompts"):
        HybridDataModule(synthetic=SyntheticArithmetic(), prompts=DataSource("x.jsonl"))
    with pytest.raises(ValueError, match="no training data"):
        HybridDataModule()
    small = write_jsonl(tmp_path / "p.jsonl", [{"prompt": str(i), "answer": str(i)} for i in range(5)])
    dm = HybridDataModule(prompts=DataSource(str(small)), prompts_per_step=3, expert_per_step=0)
    dm.rank, dm.world_size = 0, 2
    with pytest.raises(DataError, match="5 records, fewer than 3 per step x 2 processes"):
        dm.train_dataset()
    dm = HybridDataModule(
        expert=DataSource(str(small)),
        expert_per_step=1,
        prompts_per_step=0,
        sft_iterations=1,
        rl_iterations=0,
    )
    with pytest.raises(DataError, match="without a response"):
        dm.setup()
    with pytest.raises(ValueError, match=r"data\.expert_per_step=2: no demonstrations to draw from"):
        HybridDataModule(prompts=DataSource(str(small)), expert_per_step=2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sft_iterations": 3, "expert_per_step": 0}, "data.expert_per_step=0: the SFT warm-up"),
        ({"rl_iterations": 3, "prompts_per_step": 0}, "data.prompts_per_step=0: the RL phase"),
        ({"expert_per_step": -1}, "data.expert_per_step=-1: must be >= 0"),
        ({"eval_size": -5}, "data.eval_size=-5: must be >= 1"),
        ({"eval_size": 0}, "data.eval_size=0: must be >= 1"),
        ({"eval_batch_size": 0}, "data.eval_batch_size=0: must be >= 1"),
    ],
)
def test_a_phase_with_nothing_to_draw_is_refused_when_built(options, message):
    """A draw of 0 for a phase that runs would fail only when the phase starts (after the model
    loads, or after the whole warm-up): refused when the data module is built."""
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        make_synthetic_dm(**options)


def test_eval_size_keeps_that_many(tmp_path):
    dm = make_synthetic_dm(eval_size=7)
    dm.setup()
    assert len(dm.eval_examples["synthetic"]) == 7


def test_jsonargparse_builds_datamodule_from_config():
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(HybridDataModule, "data")
    config = parser.parse_object(
        {
            "data": {
                "synthetic": {
                    "seed": 3,
                    "num_steps": 3,
                    "operations": "+-*",
                    "train_size": 100,
                    "test_size": 20,
                },
                "eval_sets": {
                    "gsm8k": {"path": "/data/gsm8k", "split": "test", "fields": {"prompt": "question"}}
                },
                "prompts_per_step": 2,
            }
        }
    )
    dm = parser.instantiate(config).data
    assert isinstance(dm, HybridDataModule)
    assert dm.synthetic == SyntheticArithmetic(
        seed=3, num_steps=3, operations="+-*", train_size=100, test_size=20
    )
    assert dm.eval_sources["gsm8k"] == DataSource("/data/gsm8k", split="test", fields={"prompt": "question"})
    assert dm.eval_set_names == ["synthetic", "gsm8k"]


# --- gold audit at data load ---------------------------------------------------------------------

# A set-builder gold (math-verify cannot parse it: never paid), a relation whose parse merges N and
# n into one symbol (lossy: paid only for its own text), and golds the reward verifies in full.
AUDIT_GOLDS = ["2", "\\{x \\mid x > 0\\}", "N = n", "x > 3", "\\frac{1}{2}"]
SET_BUILDER, RELATION = 1, 2


def _audited(tmp_path, mode: str, trainer=None) -> HybridDataModule:
    rows = [{"prompt": f"question {i}", "answer": gold} for i, gold in enumerate(AUDIT_GOLDS)]
    path = write_jsonl(tmp_path / "golds.jsonl", rows)
    dm = HybridDataModule(
        prompts=DataSource(str(path)),
        eval_sets={"held_out": DataSource(str(path))},
        rl_iterations=1, prompts_per_step=1, expert_per_step=0, gold_audit=mode,
    )  # fmt: skip
    dm.trainer = trainer
    dm.setup("fit")
    return dm


def _events(log_dir) -> tuple[dict[str, float], dict[str, str]]:
    """Scalars and texts written to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    scalars = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    texts = {
        tag: events.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]
    }
    return scalars, texts


def test_gold_audit_report_counts_and_shows_bad_golds_in_log_and_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path / "logs", name="", version="")
    trainer = L.Trainer(
        logger=logger, accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False
    )
    with pytest.warns(
        UserWarning, match=r"(?s)data\.prompts \(.*golds\.jsonl\): gold audit: 5 golds.*1 unparsable"
    ):
        dm = _audited(tmp_path, "report", trainer)
    assert [e.answer for e in dm.prompt_examples] == AUDIT_GOLDS  # reported, kept
    assert len(dm.eval_examples["held_out"]) == 5
    for name in ("prompts", "held_out"):
        audit = dm.gold_audits[name]
        assert (audit.unparsable, audit.lossy) == (1, 1)
        assert audit.ok == [True, False, False, True, True]
        assert audit.flags[SET_BUILDER] == "unparsable" and audit.flags[RELATION] == "lossy"
    logger.experiment.flush()
    scalars, texts = _events(logger.log_dir)
    for name in ("prompts", "held_out"):
        assert scalars[f"data/{name}/unparsable_golds"] == 1.0
        assert scalars[f"data/{name}/lossy_golds"] == 1.0
    text = texts["data/prompts/gold_audit/text_summary"]
    assert "\\\\{x \\\\mid x > 0\\\\}" in text and "N = n" in text  # the examples, with their reasons
    assert "unparsable: " in text and "lossy: " in text


def test_gold_audit_drop_leaves_out_the_bad_golds_and_says_so(tmp_path):
    with pytest.warns(UserWarning, match=r"dropped 2 of 5 \(data\.gold_audit=drop\)"):
        dm = _audited(tmp_path, "drop")
    kept = ["2", "x > 3", "\\frac{1}{2}"]
    assert [e.answer for e in dm.prompt_examples] == kept
    assert [e.answer for e in dm.eval_examples["held_out"]] == kept
    assert [b["answers"] for b in dm.val_dataloader()[0]] == [kept]
    assert (dm.gold_audits["prompts"].unparsable, dm.gold_audits["prompts"].lossy) == (1, 1)


def test_gold_audit_fail_names_the_set_and_the_first_bad_gold(tmp_path):
    with pytest.raises(DataError) as error:
        _audited(tmp_path, "fail")
    assert str(error.value) == (
        f"data.gold_audit=fail: data.prompts ({tmp_path / 'golds.jsonl'}) record 2: answer "
        "'\\\\{x \\\\mid x > 0\\\\}' is unparsable (math-verify cannot parse it); "
        "1 unparsable and 1 lossy of 5 golds"
    )


def test_gold_audit_of_the_real_data(gsm8k_train_path, math500_path):
    """GSM8K's golds are plain numbers (no parse); MATH-500 has six lossy base-b answers."""
    dm = HybridDataModule(
        prompts=DataSource(str(gsm8k_train_path)),
        eval_sets={"math500": DataSource(str(math500_path))},
        rl_iterations=1, prompts_per_step=1, expert_per_step=0,
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"data\.eval_sets\.math500 .* 0 unparsable .*, 6 lossy"):
        dm.setup("fit")
    gsm8k, math500 = dm.gold_audits["prompts"], dm.gold_audits["math500"]
    assert (len(gsm8k.flags), gsm8k.unparsable, gsm8k.lossy) == (7473, 0, 0)
    assert (len(math500.flags), math500.unparsable, math500.lossy) == (500, 0, 6)
    assert gsm8k.seconds < 1.0  # numbers never reach math-verify
    print(f"gold audit: GSM8K train {gsm8k.seconds:.3f} s, MATH-500 {math500.seconds:.2f} s")
