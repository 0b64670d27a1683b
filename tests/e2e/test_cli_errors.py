"""Bad inputs through `python -m egspo fit`, as a user meets them: one line, exit status 2.

Every case runs `egspo.cli.main` on configs/demo.yaml plus the bad input and checks the
whole of what the user sees: exit status 2, exactly one `error:` line (then at most the hint
about --debug), the option, file or line named, no traceback; and, for what the config alone
decides, that no tokenizer or model was loaded. The `--ckpt_path` rule ("the config and command
line win; a checkpoint the run cannot continue from is an error") is run end to end with real
fits of a tiny model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_model import tiny_qwen2, tiny_qwen2_json

# Imported here, not in the tests: Lightning's log handler binds to the stderr of the moment it is
# imported, and a test's captured stderr is closed once that test ends.
from egspo.cli import DEBUG_HINT, MAX_LINE, _one_line, clip, main, run

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")
TINY_MODEL = tiny_qwen2_json(max_position_embeddings=512)
# RL prompts from a file instead of the synthetic task, no warm-up (placeholders: see `_expand`).
PROMPTS = [
    "--data.synthetic=null",
    "--data.expert_per_step=0",
    "--data.prompts_per_step=2",
    "--model.sft_iterations=0",
]
# A model from a folder, with the locally built tokenizer.
FOLDER_MODEL = ("--model.policy.config=null", "--model.policy.tokenizer=synthetic")
GPT2 = json.dumps({"model_type": "gpt2", "n_positions": 128, "n_embd": 32, "n_layer": 1, "n_head": 2})


@dataclass(frozen=True)
class Case:
    """A bad input. `loads`: what may be loaded before the error ("nothing": the config decides;
    "tokenizer": the data decides, before the model; "model": the checkpoint decides, before
    training). `TMP` in args and message stands for the test's folder, `CKPT` for a real checkpoint."""

    id: str
    args: tuple[str, ...]
    message: str
    loads: str = "nothing"
    env: tuple[tuple[str, str | None], ...] = ()  # (name, value); None unsets it


CASES = [
    # --- data -------------------------------------------------------------------------------
    Case(
        "malformed_jsonl_line",
        (*PROMPTS, "--data.prompts.path=TMP/bad.jsonl"),
        "TMP/bad.jsonl:2: malformed JSON (Expecting value, column 31)",
        "tokenizer",
    ),
    Case(
        "row_missing_field",
        (*PROMPTS, "--data.prompts.path=TMP/missing.jsonl"),
        "TMP/missing.jsonl:2: answer: missing",
        "tokenizer",
    ),
    Case(
        "empty_file",
        (*PROMPTS, "--data.prompts.path=TMP/empty.jsonl"),
        "TMP/empty.jsonl: no records found (empty file or split)",
        "tokenizer",
    ),
    Case(
        "missing_file",
        (*PROMPTS, "--data.prompts.path=TMP/nothing.jsonl"),
        "data.prompts.path=TMP/nothing.jsonl: file not found",
    ),
    Case(
        "folder_without_the_split",
        (*PROMPTS, "--data.prompts.path=TMP/folder", "--data.prompts.split=test"),
        "data.prompts.split=test: TMP/folder holds none of test.jsonl, test.json, test.parquet",
    ),
    Case(
        "folder_without_a_split",
        (*PROMPTS, "--data.prompts.path=TMP/folder"),
        "data.prompts.path=TMP/folder: a folder; give data.prompts.split to read <split>.jsonl in it",
    ),
    # --- a set smaller than one step's draw (was: refused by the sampler after the model loaded)
    Case(
        "prompts_file_smaller_than_a_step",
        (*PROMPTS, "--data.prompts.path=TMP/three.jsonl", "--data.prompts_per_step=4"),
        "data.prompts_per_step=4: TMP/three.jsonl holds 3 records, fewer than 4 per step x 1 process",
    ),
    Case(
        "prompts_file_smaller_than_a_step_of_every_process",
        (*PROMPTS, "--data.prompts.path=TMP/three.jsonl", "--trainer.devices=2"),
        "data.prompts_per_step=2: TMP/three.jsonl holds 3 records, fewer than 2 per step x 2 processes = 4",
    ),
    Case(
        "expert_folder_smaller_than_a_step",
        (
            "--data.synthetic=null",
            "--data.expert.path=TMP/folder",
            "--data.expert.split=train",
            "--data.prompts.path=TMP/golds.jsonl",
            "--data.prompts_per_step=2",
        ),
        "data.expert_per_step=64: TMP/folder/train.jsonl holds 2 records, fewer than 64 per step x 1 process",
    ),
    Case(
        "synthetic_task_smaller_than_a_step",
        ("--data.synthetic.train_size=40",),
        "data.expert_per_step=64: data.synthetic.train_size=40 gives 40 records, fewer than 64 per step x 1 process",
    ),
    Case(
        "gold_audit_fail",
        (*PROMPTS, "--data.prompts.path=TMP/golds.jsonl", "--data.gold_audit=fail"),
        "data.gold_audit=fail: data.prompts (TMP/golds.jsonl) record 2: answer '\\\\{x \\\\mid x > 0\\\\}' "
        "is unparsable (math-verify cannot parse it); 1 unparsable and 1 lossy of 4 golds",
        "tokenizer",
    ),
    # --- model paths ---------------------------------------------------------------------------
    Case(
        "missing_local_model_folder",
        ("--model.policy.config=null", "--model.policy.name_or_path=TMP/no-model"),
        "model.policy.name_or_path=TMP/no-model: no such file or folder",
    ),
    Case(
        "hub_id_offline",
        (
            "--model.policy.config=null",
            "--model.policy.name_or_path=egspo-tests/not-cached",
            "--model.policy.tokenizer=null",
        ),
        "model.policy.name_or_path=egspo-tests/not-cached: not a local folder, not in the Hugging Face cache, "
        "and HF_HUB_OFFLINE=1 forbids downloads; check the name, pass a local path, or download it "
        "beforehand (unset HF_HUB_OFFLINE to let egspo download it)",
    ),
    Case(
        "policy_dtype",
        ("--model.policy.dtype=float8",),
        "model.policy.dtype=float8: not one of float32, bfloat16, float16",
    ),
    # --- checkpoints --------------------------------------------------------------------------
    Case("ckpt_missing", ("--ckpt_path=TMP/none.ckpt",), "--ckpt_path TMP/none.ckpt: no such file"),
    Case(
        "ckpt_junk_bytes",
        ("--ckpt_path=TMP/junk.ckpt",),
        "--ckpt_path TMP/junk.ckpt: not a readable checkpoint (truncated or not a torch file: RuntimeError)",
    ),
    Case(
        "ckpt_truncated",
        ("--ckpt_path=CKPT/truncated.ckpt",),
        "--ckpt_path CKPT/truncated.ckpt: not a readable checkpoint (truncated or not a torch file: RuntimeError)",
    ),
    Case(
        "ckpt_not_egspo",
        ("--ckpt_path=TMP/plain.pt",),
        "--ckpt_path TMP/plain.pt: not an egspo training checkpoint (no 'egspo' state)",
    ),
    Case(
        "ckpt_last_none_saved",
        ("--ckpt_path=last",),
        "--ckpt_path last: no checkpoint at TMP/run/checkpoints/last.ckpt",
    ),
    Case(
        "ckpt_model_shape_differs",
        (
            f"--model.policy.config={TINY_MODEL}",
            "--model.policy.config.hidden_size=64",
            "--model.sft_iterations=1",
            "--ckpt_path=CKPT/last.ckpt",
        ),
        "the checkpoint's policy.model.embed_tokens.weight has shape (443, 32), this model's (443, 64): "
        "model.policy differs from the run that wrote it",
        "model",
    ),
    Case(
        "ckpt_warmup_changed_after_it_was_passed",
        (f"--model.policy.config={TINY_MODEL}", "--model.sft_iterations=5", "--ckpt_path=CKPT/last.ckpt"),
        "model.sft_iterations=5, but the checkpoint was written at iteration 2 of a run with 1: "
        "the warm-up cannot change once passed",
        "model",
    ),
    # --- option values and constraints between options ---------------------------------------
    Case(
        "max_completion_length_0",
        ("--model.rollout.max_completion_length=0",),
        "model.rollout.max_completion_length=0: must be >= 1",
    ),
    Case(
        "temperature_0",
        ("--model.rollout.temperature=0",),
        "model.rollout.temperature=0.0: must be > 0 (greedy decoding is for evaluation)",
    ),
    Case(
        "negative_lr",
        ("--model.optimizer.init_args.lr=-1e-3",),
        "model.optimizer.init_args.lr=-0.001: the learning rate must be > 0",
    ),
    Case(
        "negative_rl_learning_rate",
        ("--model.update.rl_learning_rate=-1e-4",),
        "model.update.rl_learning_rate=-0.0001: must be > 0",
    ),
    Case("top_p_above_1", ("--model.rollout.top_p=1.5",), "model.rollout.top_p=1.5: must be in (0, 1]"),
    Case(
        "num_generations_1",
        ("--model.rollout.num_generations=1",),
        "model.rollout.num_generations=1: group-relative advantages need at least 2 samples per prompt",
    ),
    Case(
        "mini_batch_not_dividing",
        ("--model.update.mini_batch_size=7",),
        "model.update.mini_batch_size=7 does not divide data.prompts_per_step (16) x "
        "model.rollout.num_generations (8) = 128",
    ),
    Case(
        "token_budget_below_one_sequence",
        ("--model.update.ppo_max_token_len_per_gpu=100",),
        "model.update.ppo_max_token_len_per_gpu=100 is below one sequence's longest length "
        "(model.prompt.max_prompt_length + model.rollout.max_completion_length = 160)",
    ),
    Case(
        "gate_value_out_of_range",
        ("--model.policy_loss.init_args.gate.value=1.5", "--trainer.callbacks=[]"),  # no GateScheduler
        "model.policy_loss.init_args.gate.value=1.5: the quantile gate takes a value in [0, 1]",
    ),
    Case(
        "val_check_interval_not_dividing",
        ("--trainer.val_check_interval=7",),
        "trainer.val_check_interval=7: must divide each phase's length (300 and 100 iterations) so that "
        "every phase ends with an evaluation",
    ),
    Case(
        "max_epochs_set",
        ("--trainer.max_epochs=5",),
        "trainer.max_epochs=5: each phase is one epoch, so this run has 2; leave it unset",
    ),
    # --- what the parser rejects (jsonargparse's many-line messages, made one line) ------------
    Case(
        "unknown_loss_class",
        ("--model.policy_loss.class_path=egspo.losses.NoSuchLoss",),
        "model.policy_loss: cannot use class_path egspo.losses.NoSuchLoss: "
        "module 'egspo.losses' has no attribute 'NoSuchLoss'",
    ),
    Case(
        "unknown_option",
        ("--model.no_such_option=3",),
        "--model.no_such_option=3: no such option (see --help)",
    ),
    Case(
        "unknown_option_of_a_group",
        ("--model.rollout.temprature=0.7",),
        "model.rollout.temprature: no such option of egspo.config.RolloutConfig",
    ),
    Case(
        "unknown_option_of_a_class",
        ("--model.policy_loss.init_args.clip=0.2",),
        "model.policy_loss.clip: no such option of egspo.losses.EGSPOLoss",
    ),
    Case("wrong_type", ("--model.rl_iterations=ten",), "model.rl_iterations=ten: expected int"),
    Case(
        "wrong_type_in_a_group",
        ("--model.update.mini_batch_size=all",),
        "model.update.mini_batch_size=all: expected int or null",
    ),
    Case(
        "value_not_among_choices",
        ("--model.rollout.advantage_scale=grup",),
        "model.rollout.advantage_scale=grup: expected one of 'group', 'batch', 'none'",
    ),
    Case(
        "config_file_missing",
        ("--config=TMP/missing.yaml",),
        "--config: File does not exist: 'TMP/missing.yaml'",
    ),
    Case(
        "config_file_bad_yaml",
        ("--config=TMP/bad.yaml",),
        "TMP/bad.yaml:3:1: invalid YAML: expected ',' or ']', but got '<stream end>'",
    ),
    Case(
        "config_file_unknown_section",
        ("--config=TMP/typo.yaml",),
        "modle.rl_iterations: no such option of `fit` (from a --config file)",
    ),
]

# Issue 20's classes: inputs that ended in a traceback, failed late, were accepted silently, or
# gave an unhelpful line. One class per block; README "When an input is wrong" lists them.
WEIGHT_FILES = (
    "model.safetensors, model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json"
)
TOKENIZER_FILES = "tokenizer.json, tokenizer_config.json, vocab.json, tokenizer.model, vocab.txt"
CASES += [
    # --- a model or tokenizer folder that cannot be loaded (was: a traceback) -----------------
    Case(
        "model_folder_without_weights",
        (*FOLDER_MODEL, "--model.policy.name_or_path=TMP/noweights"),
        f"model.policy.name_or_path=TMP/noweights: no weights in this folder (none of {WEIGHT_FILES})",
    ),
    Case(
        "model_folder_corrupt_safetensors",
        (*FOLDER_MODEL, "--model.policy.name_or_path=TMP/corrupt"),
        "model.policy.name_or_path=TMP/corrupt: model.safetensors: not a safetensors file, or truncated "
        "(its header does not fit in the file)",
    ),
    Case(
        "model_folder_missing_shard",
        (*FOLDER_MODEL, "--model.policy.name_or_path=TMP/sharded"),
        "model.policy.name_or_path=TMP/sharded: model.safetensors.index.json lists "
        "model-00002-of-00002.safetensors, which is missing (1 of 2 files missing)",
    ),
    Case(
        "model_folder_without_config",
        (*FOLDER_MODEL, "--model.policy.name_or_path=TMP/folder"),
        "model.policy.name_or_path=TMP/folder: no config.json in this folder (not a saved Hugging Face model)",
    ),
    Case(
        "model_path_is_a_file",
        (*FOLDER_MODEL, "--model.policy.name_or_path=TMP/noweights/config.json"),
        "model.policy.name_or_path=TMP/noweights/config.json: a file; give the model's folder "
        "(as written by save_pretrained)",
    ),
    Case(
        "tokenizer_path_is_a_file",
        ("--model.policy.tokenizer=TMP/tok.txt",),
        "model.policy.tokenizer=TMP/tok.txt: a file; give the tokenizer's folder (as written by save_pretrained)",
    ),
    Case(
        "tokenizer_folder_without_tokenizer",
        ("--model.policy.tokenizer=TMP/folder",),
        f"model.policy.tokenizer=TMP/folder: holds no tokenizer (none of {TOKENIZER_FILES})",
    ),
    Case(
        "model_folder_without_tokenizer",
        (
            "--model.policy.config=null",
            "--model.policy.tokenizer=null",
            "--model.policy.name_or_path=TMP/notok",
        ),
        f"model.policy.name_or_path=TMP/notok: holds no tokenizer ({TOKENIZER_FILES}); give model.policy.tokenizer",
    ),
    # --- a hub id that is neither cached nor downloadable (was: 23 s of retries, a wrong hint) --
    Case(
        "hub_id_without_network",
        ("--model.policy.config=null", "--model.policy.name_or_path=egspo-tests/not-cached"),
        "model.policy.name_or_path=egspo-tests/not-cached: not a local folder, not in the Hugging Face cache, "
        "and the hub (127.0.0.1) does not answer (no network?); check the name, or pass a local path",
        env=(("HF_HUB_OFFLINE", None), ("HF_ENDPOINT", "http://127.0.0.1:9")),
    ),
    # --- Trainer options the machine or the other options cannot honour (was: a traceback) -----
    *(
        []
        if torch.cuda.is_available()
        else [
            Case(
                "gpu_asked_none_present",
                ("--trainer.accelerator=gpu",),
                "trainer.accelerator=gpu: no CUDA GPU is visible here; use --trainer.accelerator=cpu",
            )
        ]
    ),
    Case(
        "checkpointing_off_beside_a_checkpoint_callback",
        ("--trainer.enable_checkpointing=false",),
        "trainer.enable_checkpointing=false, but trainer.callbacks[3] (IterationCheckpoint) saves "
        "checkpoints; remove one of the two",
    ),
    Case(
        "trainer_misconfiguration",
        ("--trainer.devices=0",),
        "trainer: `Trainer(devices='0')` value is not a valid input using cpu accelerator.",
        "tokenizer",
    ),
    # --- a phase with nothing to draw from (was: a crash after the model loaded, or after SFT) -
    Case(
        "warmup_without_demonstrations_per_step",
        ("--data.expert_per_step=0",),
        "data.expert_per_step=0: the SFT warm-up (model.sft_iterations=300) trains on demonstrations; "
        "give >= 1, or set model.sft_iterations=0",
    ),
    Case(
        "rl_without_prompts_per_step",
        ("--data.prompts_per_step=0",),
        "data.prompts_per_step=0: the RL phase (model.rl_iterations=100) samples answers to prompts; "
        "give >= 1, or set model.rl_iterations=0",
    ),
    Case(
        "sft_mixing_without_demonstrations",
        ("--model.sft_iterations=0", "--data.expert_per_step=0", "--model.mu=0.1"),
        "data.expert_per_step=0: model.mu mixes SFT into the RL phase, which needs demonstrations; "
        "give >= 1, or set model.mu=0",
    ),
    Case(
        "demonstrations_per_step_without_expert_data",
        (
            "--data.synthetic=null",
            "--data.prompts.path=TMP/golds.jsonl",
            "--data.prompts_per_step=2",
            "--model.sft_iterations=0",
        ),
        "data.expert_per_step=64: no demonstrations to draw from; give data.expert, or set data.expert_per_step=0",
    ),
    # --- values accepted silently (was: test[:-5] evaluated) ---------------------------------
    Case(
        "eval_size_negative",
        ("--data.eval_size=-5",),
        "data.eval_size=-5: must be >= 1 (or null: the whole of each eval set)",
    ),
    Case(
        "eval_size_0",
        ("--data.eval_size=0",),
        "data.eval_size=0: must be >= 1 (or null: the whole of each eval set)",
    ),
    # --- sequences longer than a learned position table (was: a crash mid-RL) ----------------
    Case(
        "completion_beyond_learned_positions",
        (f"--model.policy.config={GPT2}",),
        "model.prompt.max_prompt_length + model.rollout.max_completion_length = 160 exceeds the model's "
        "max_position_embeddings (128): the model learned one embedding per position and has none past 128; "
        "shorten them",
    ),
    Case(
        "eval_completion_beyond_learned_positions",
        (
            f"--model.policy.config={GPT2}",
            "--model.prompt.max_prompt_length=64",
            "--model.evaluation.max_completion_length=100",
        ),
        "model.prompt.max_prompt_length + model.evaluation.max_completion_length = 164 exceeds the model's "
        "max_position_embeddings (128): the model learned one embedding per position and has none past 128; "
        "shorten them",
    ),
    # --- a class's own check of its options (was: jsonargparse's dump of the option's union) --
    Case(
        "reward_num_workers_0",
        ("--model.reward.init_args.num_workers=0",),
        "model.reward (egspo.rewards.MathReward): num_workers must be >= 1, got 0",
    ),
    Case(
        "reward_option_refused_by_its_class",
        ("--model.reward.init_args.rel_tol=2",),
        "model.reward (egspo.rewards.MathReward): rel_tol must be in [0, 1), got 2.0",
    ),
    Case(
        "loss_option_refused_by_its_class",
        ("--model.policy_loss.init_args.clip_low=-1",),
        "model.policy_loss (egspo.losses.EGSPOLoss): clip_low must be in [0, 1), got -1.0",
    ),
    Case(
        "reward_option_wrong_type",
        ("--model.reward.init_args.num_workers=two",),
        "model.reward.num_workers=two: expected int",
    ),
    # --- a model type transformers does not know (was: a 12.8 KB line) -----------------------
    Case(
        "unknown_model_type",
        ('--model.policy.config={"model_type": "zzyzx"}',),
        "model.policy.config.model_type=zzyzx: not a model type transformers knows (e.g. qwen2, llama, gpt2)",
    ),
    # --- bytes that are not UTF-8 (was: no file, no line) -------------------------------------
    Case(
        "jsonl_not_utf8",
        (*PROMPTS, "--data.prompts.path=TMP/latin1.jsonl"),
        "TMP/latin1.jsonl:2: not UTF-8 (byte 0xe9 at column 16); save the file as UTF-8",
        "tokenizer",
    ),
    Case(
        "json_not_utf8",
        (*PROMPTS, "--data.prompts.path=TMP/latin1.json"),
        "TMP/latin1.json:2: not UTF-8 (byte 0xe9 at column 17); save the file as UTF-8",
        "tokenizer",
    ),
]


def _expand(text: str, tmp: Path, checkpoint_dir: Path | None) -> str:
    text = text.replace("TMP", str(tmp))
    return text.replace("CKPT", str(checkpoint_dir)) if checkpoint_dir is not None else text


def _write_inputs(tmp: Path) -> None:
    """The bad files the cases name."""
    rows = [{"prompt": "1 + 1?", "answer": "2"}, {"prompt": "2 + 2?", "answer": "4"}]
    (tmp / "bad.jsonl").write_text(json.dumps(rows[0]) + '\n{"prompt": "2 + 2?", "answer": \n')
    (tmp / "missing.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "2 + 2?"}) + "\n")
    (tmp / "empty.jsonl").write_text("")
    three = [{"prompt": f"{i} + 1?", "answer": str(i + 1)} for i in range(3)]
    (tmp / "three.jsonl").write_text("\n".join(json.dumps(r) + "\n" for r in three) + "  \n")  # blank lines
    (tmp / "folder").mkdir()
    (tmp / "folder" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    golds = ["2", "\\{x \\mid x > 0\\}", "N = n", "x > 3"]
    (tmp / "golds.jsonl").write_text(
        "".join(json.dumps({"prompt": f"question {i}", "answer": g}) + "\n" for i, g in enumerate(golds))
    )
    (tmp / "junk.ckpt").write_bytes(b"these are not the bytes of a checkpoint" * 10)
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, tmp / "plain.pt")
    (tmp / "bad.yaml").write_text("model:\n  rl_iterations: [1\n")
    (tmp / "typo.yaml").write_text("modle:\n  rl_iterations: 3\n")
    # model and tokenizer folders
    config = json.dumps(tiny_qwen2(vocab_size=512))
    for name in ("noweights", "corrupt", "sharded", "notok"):
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(config)
    (tmp / "corrupt" / "model.safetensors").write_bytes(b"\x00" * 100)
    save_file({"w": torch.zeros(4)}, tmp / "notok" / "model.safetensors")
    save_file({"w": torch.zeros(4)}, tmp / "sharded" / "model-00001-of-00002.safetensors")
    shards = {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}
    (tmp / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    (tmp / "tok.txt").write_text("hello")
    # a Latin-1 byte (0xe9, "é") on line 2
    (tmp / "latin1.jsonl").write_bytes(
        (json.dumps(rows[0]) + "\n").encode() + b'{"prompt": "caf\xe9?", "answer": "4"}\n'
    )
    (tmp / "latin1.json").write_bytes(
        b"[" + json.dumps(rows[0]).encode() + b',\n {"prompt": "caf\xe9?", "answer": "4"}]'
    )


@pytest.fixture
def refuse_loading(monkeypatch):
    """`refuse_loading(tokenizer, model)`: fail loudly if the tokenizer or model is loaded."""
    import egspo.module

    def refuse(what: str):
        def refused(*args, **kwargs):
            raise AssertionError(f"the {what} was loaded before the error was found")

        return refused

    def apply(tokenizer: bool, model: bool) -> None:
        if tokenizer:
            monkeypatch.setattr(egspo.module, "load_tokenizer", refuse("tokenizer"))
        if model:
            monkeypatch.setattr(egspo.module, "load_policy", refuse("model"))

    return apply


def _tiny_fit_args(root: Path, *extra: str, sft: int = 1, rl: int = 1) -> list[str]:
    """A fit of the tiny model that takes seconds: `sft` + `rl` iterations, `last.ckpt` after each."""
    callbacks = [
        {"class_path": "egspo.callbacks.IterationCheckpoint", "init_args": {"every_n_iterations": 1}}
    ]
    return [
        "fit",
        "--config",
        DEMO,
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        f"--model.policy.config={TINY_MODEL}",
        f"--model.sft_iterations={sft}",
        f"--model.rl_iterations={rl}",
        "--model.rollout.num_generations=2",
        "--model.rollout.max_completion_length=8",
        "--model.reward.init_args.num_workers=1",
        "--data.prompts_per_step=2",
        "--data.expert_per_step=2",
        "--data.eval_size=4",
        "--data.eval_batch_size=4",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The checkpoint folder of a finished tiny run (1 SFT + 1 RL iteration), and a truncated copy."""
    root = tmp_path_factory.mktemp("trained")
    cli = main(_tiny_fit_args(root))
    assert cli.model.iteration == 2
    folder = root / "checkpoints"
    data = (folder / "last.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    return folder


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_naming_it(case, tmp_path, capsys, refuse_loading, request, monkeypatch):
    _write_inputs(tmp_path)
    for name, value in case.env:
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    uses_checkpoint = any("CKPT" in a for a in case.args)
    checkpoint_dir = request.getfixturevalue("trained") if uses_checkpoint else None
    args = [_expand(a, tmp_path, checkpoint_dir) for a in case.args]
    refuse_loading(tokenizer=case.loads == "nothing", model=case.loads in ("nothing", "tokenizer"))
    capsys.readouterr()
    root = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DEMO, f"--trainer.default_root_dir={root}", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    line = f"error: {_expand(case.message, tmp_path, checkpoint_dir)}"
    assert err.splitlines() in ([line], [line, DEBUG_HINT]), err  # so: no traceback, no usage text
    assert len(line) <= len("error: ") + MAX_LINE
    assert not (root / "checkpoints").exists()  # nothing trained, nothing saved


def test_every_problem_of_a_config_is_reported_at_once(capsys, refuse_loading):
    refuse_loading(tokenizer=True, model=True)
    with pytest.raises(SystemExit):
        main(["fit", "--config", DEMO, "--model.rollout.top_p=2", "--model.optimizer.init_args.lr=0"])
    assert capsys.readouterr().err.splitlines() == [
        "error: model.rollout.top_p=2.0: must be in (0, 1]",
        "error: model.optimizer.init_args.lr=0.0: the learning rate must be > 0",
    ]


def _subprocess(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "egspo", *args],
        env=environ,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_debug_shows_the_traceback(tmp_path):
    _write_inputs(tmp_path)
    args = ["fit", "--config", DEMO, f"--trainer.default_root_dir={tmp_path / 'run'}", *PROMPTS]
    args.append(f"--data.prompts.path={tmp_path / 'bad.jsonl'}")
    result = _subprocess(*args, "--debug")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert f"DataError: {tmp_path / 'bad.jsonl'}:2: malformed JSON" in result.stderr


def test_no_lightning_warning_about_args_at_start():
    """LightningCLI warns when given `args` and a command line at once; `main` always passes its
    arguments, so the warning would greet every run. The CLI parses them itself instead."""
    result = _subprocess("fit", "--config", DEMO, "--print_config")
    assert result.returncode == 0, result.stderr
    assert "model:" in result.stdout
    assert "args parameter" not in result.stderr and "args parameter" not in result.stdout


def test_policy_config_overrides_keep_their_types(tmp_path):
    """`--model.policy.config.<key>=<value>` reaches the transformers config as int, float or bool."""
    cli = run(
        [
            "fit",
            "--config",
            DEMO,
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.policy.config={TINY_MODEL}",
            "--model.policy.config.hidden_size=64",
            "--model.policy.config.rms_norm_eps=1e-5",
            "--model.policy.config.tie_word_embeddings=false",
        ],
        run=False,
    )
    cli.model.configure_model()
    config = cli.model.policy.config
    assert type(config.hidden_size) is int and config.hidden_size == 64
    assert type(config.rms_norm_eps) is float and config.rms_norm_eps == 1e-5
    assert config.tie_word_embeddings is False
    assert cli.model.policy.get_input_embeddings().weight.shape[1] == 64


# --- the --ckpt_path rule: the config and command line win --------------------------------------
@pytest.mark.slow
def test_resume_with_a_longer_rl_phase_trains_the_extra_iterations(trained, tmp_path):
    cli = main(_tiny_fit_args(tmp_path, f"--ckpt_path={trained / 'last.ckpt'}", rl=3))
    assert cli.model.iteration == 4 and cli.model.phase == "rl"
    summary = json.loads((Path(cli.trainer.log_dir) / "summary.json").read_text())
    assert summary["iterations"] == 4 and set(summary) >= {"sft", "rl"}
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
    assert saved["egspo"]["iteration"] == 4


@pytest.mark.slow
def test_resume_with_a_new_loss_uses_the_new_loss(trained, tmp_path, monkeypatch):
    from egspo.losses import EGSPOLoss, PPOClipLoss
    from egspo.losses.base import PolicyLoss

    calls: list[str] = []

    def spy(self, batch):
        calls.append(type(self).__name__)
        return PolicyLoss.__call__(self, batch)

    monkeypatch.setattr(PPOClipLoss, "__call__", spy)
    monkeypatch.setattr(EGSPOLoss, "__call__", spy)
    grpo = str(ROOT / "configs" / "method" / "grpo.yaml")
    cli = main(_tiny_fit_args(tmp_path, "--config", grpo, f"--ckpt_path={trained / 'last.ckpt'}", rl=2))
    assert cli.model.iteration == 3
    assert type(cli.model.policy_loss) is PPOClipLoss
    assert calls and set(calls) == {"PPOClipLoss"}  # the one new RL iteration used the new loss


# --- issue 20's classes that need more than one bad option -----------------------------------
def test_predict_is_not_offered(capsys):
    """`predict` needs a `forward` returning predictions; the CLI offers fit, validate, test (and export)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", DEMO])
    assert exit_info.value.code == 2
    line = "error: predict: no such subcommand (choose from fit, validate, test, export)"
    assert capsys.readouterr().err.splitlines() == [line, DEBUG_HINT]


def test_truncated_safetensors_is_named_before_loading(tmp_path, capsys, refuse_loading):
    """A real saved model whose weights file lost its tail (an interrupted copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "model"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_qwen2(vocab_size=512))).save_pretrained(
        folder
    )
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) - 1000])
    refuse_loading(tokenizer=True, model=True)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DEMO, *FOLDER_MODEL, f"--model.policy.name_or_path={folder}"])
    assert exit_info.value.code == 2
    line = (
        f"error: model.policy.name_or_path={folder}: model.safetensors: truncated "
        f"({len(whole) - 1000} bytes, its tensors need {len(whole)})"
    )
    assert capsys.readouterr().err.splitlines() == [line]


def test_hub_id_without_network_fails_within_seconds(monkeypatch, capsys, refuse_loading):
    """No retries, no resolver waits: the check gives up after one bounded probe."""
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://egspo-tests.invalid")  # a name no resolver knows
    refuse_loading(tokenizer=True, model=True)
    start = time.monotonic()
    with pytest.raises(SystemExit):
        main(["fit", "--config", DEMO, "--model.policy.config=null", "--model.policy.name_or_path=gpt2x"])
    assert time.monotonic() - start < 6.0
    err = capsys.readouterr().err
    assert "error: model.policy.name_or_path=gpt2x: not a local folder, not in the Hugging Face cache" in err
    assert "HF_HUB_OFFLINE" not in err  # it was not set: no hint to unset it


def test_rotary_positions_beyond_the_config_are_one_warning(tmp_path, capsys):
    """RoPE defines every position, so a longer sequence runs; it deserves a word, not a refusal."""
    cli = run(
        [
            "fit",
            "--config",
            DEMO,
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.policy.config={tiny_qwen2_json(max_position_embeddings=128)}",
        ],
        run=False,
    )
    assert cli.model is not None
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: model.prompt.max_prompt_length + model.rollout.max_completion_length = 160 exceeds the "
        "model's max_position_embeddings (128): its rotary positions go on past it, but the model never "
        "saw such lengths in training"
    ]


def test_long_messages_are_cut_to_one_short_line():
    text = "Unrecognized model identifier: x. Should contain one of " + ", ".join(["name"] * 3000)
    line = clip(text)
    assert len(line) <= MAX_LINE and line.endswith("... (cut; --debug shows all)")
    assert line.startswith("Unrecognized model identifier: x.")
    assert clip("short") == "short"


def test_a_constructor_refusal_inside_a_union_is_its_reason():
    """jsonargparse's message when an option typed `SomeClass | None` fails in the constructor."""
    message = (
        "Does not validate against any of the Union subtypes\nSubtypes: [<class 'egspo.rewards.base."
        "RewardFunction'>, <class 'NoneType'>]\nErrors:\n  - timeout_seconds must be > 0, got -1.0\n  - "
        "Expected a <class 'NoneType'>\nGiven value type: <class 'jsonargparse._namespace.Namespace'>\n"
        "Given value: Namespace(class_path='egspo.rewards.MathReward', init_args=Namespace(timeout_seconds=-1.0))"
    )
    assert _one_line(ValueError(message)) == "egspo.rewards.MathReward: timeout_seconds must be > 0, got -1.0"
