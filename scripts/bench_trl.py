"""TRL's side of the benchmarks: `GRPOTrainer` (row 3) and `SFTTrainer` (row 4) on the same saved
model, data order and sampling as egspo's side (`bench_egspo.py`), one measurement per fresh
process (`bench.py --_worker`), every round logged into the same `RoundLog` from the same places.

Needs `pip install -e ".[bench]"` (trl); imported lazily, so the rest of the harness runs without it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable

from bench_common import (
    RLSetup,
    RoundLog,
    SFTSetup,
    completion_rows,
    cut_at_stop,
    peak_rss_mb,
    token_rows,
)
from bench_egspo import egspo_batches


def trl_common(setup_rounds: int, learning_rate: float) -> dict:
    """`TrainingArguments` both TRL trainers share: fp32 on CPU, nothing but training."""
    import torch

    return {
        "output_dir": tempfile.mkdtemp(),
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False,  # TRL's GRPO default is True; egspo does not checkpoint
        "learning_rate": learning_rate,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "optim": "adamw_torch",
        "max_grad_norm": 1.0,
        "max_steps": setup_rounds,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "report_to": "none",
        "logging_strategy": "no",
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "model_init_kwargs": {"dtype": torch.float32, "attn_implementation": "sdpa"},
    }


def trl_callback(on_optimizer_step: Callable[[], None], on_step_end: Callable[[], None]):
    from transformers import TrainerCallback

    class Stamps(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            on_optimizer_step()

        def on_step_end(self, args, state, control, **kwargs):
            on_step_end()

    return Stamps()


def worker_trl_grpo(spec: dict) -> dict:
    """TRL's GRPOTrainer on the same model, prompts and sampling, every round logged like egspo's.

    `spec["vllm"]` (optional): sample with TRL's colocated vLLM (`use_vllm=True,
    vllm_mode="colocate"`) instead of `generate`; its value, a dict of further `GRPOConfig` options
    (`vllm_max_model_length`, ...). Run in the environment of `scripts/install_trl_vllm_cpu.sh`.
    """
    setup = RLSetup(**spec["setup"])
    log = RoundLog(setup.warmup)
    vllm = spec.get("vllm")
    trainer, tokenizer = grpo_trainer(spec["model"], setup, vllm)
    stops = [tokenizer.eos_token_id]
    if vllm is None:
        log_generate(trainer.model, log, stops)  # TRL samples through the unwrapped model's `generate`
    else:
        log_vllm(trainer.vllm_generation, log, stops)
    prepare = trainer._prepare_inputs

    def prepare_then_mark(*args, **kwargs):
        out = prepare(*args, **kwargs)
        if log.update_from is None:  # the round's first micro-batch: experience ready, the update starts
            log.update_from = time.perf_counter()
        return out

    def update_done() -> None:  # the optimizer step, after every micro-batch's backward
        log.add_update(time.perf_counter() - log.update_from)
        log.update_from = None

    trainer._prepare_inputs = prepare_then_mark
    trainer.add_callback(trl_callback(update_done, log.round_end))
    trainer.train()
    return log.result()


def grpo_trainer(model: str, setup: RLSetup, vllm: dict | None):
    """The GRPOTrainer of row 3 (section 7 with `vllm`), and its tokenizer."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from egspo.data import synthetic_tokenizer
    from egspo.rewards import MathReward

    steps = setup.warmup + setup.rounds
    rows = [
        {"prompt": [{"role": "user", "content": q}], "answer": a}
        for b in egspo_batches("rl", steps, setup.prompts_per_step)
        for q, a in zip(b["prompts"], b["answers"], strict=True)
    ]
    reward = MathReward()

    def math_reward(completions, answer, **kwargs) -> list[float]:
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return reward(texts, answer).rewards.tolist()

    n = setup.prompts_per_step * setup.num_generations
    micro = setup.micro_batch_size or n
    if n % micro:
        raise ValueError(f"micro_batch_size {micro} does not divide the {n} samples of a round")
    sampler = {} if vllm is None else {"use_vllm": True, "vllm_mode": "colocate", **vllm}
    # One optimizer step per round: `n // micro` micro-batches of one generation batch, accumulated.
    config = GRPOConfig(
        **{**trl_common(steps, setup.learning_rate), "gradient_accumulation_steps": n // micro},
        per_device_train_batch_size=micro,
        steps_per_generation=n // micro,
        num_generations=setup.num_generations,
        num_iterations=1,
        max_completion_length=setup.max_completion_length,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.2,
        loss_type="dapo",  # token-mean over the batch, as egspo's token-mean
        scale_rewards="group",
        shuffle_dataset=False,
        log_completions=False,
        **sampler,
    )
    tokenizer = synthetic_tokenizer()
    tokenizer.padding_side = "left"
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=math_reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    return trainer, tokenizer


def log_generate(model, log: RoundLog, stops: list[int]) -> None:
    """Reseed, time and record every `model.generate` call."""
    generate = model.generate

    def logged_generate(*args, **kwargs):
        log.before_generation()
        out = generate(*args, **kwargs)
        end = time.perf_counter()
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        log.after_generation(end, token_rows(ids, mask), completion_rows(out[:, ids.shape[1] :], stops))
        return out

    model.generate = logged_generate


def log_vllm(generation, log: RoundLog, stops: list[int]) -> None:
    """Time TRL's weight pushes into its colocated vLLM (`sync_weights`) and reseed, time and record
    its sampling (`generate`, token ids in and out); `generation`: the trainer's `vllm_generation`."""
    sync, generate = generation.sync_weights, generation.generate

    def logged_sync(*args, **kwargs):
        start = time.perf_counter()
        out = sync(*args, **kwargs)
        log.add_sync(time.perf_counter() - start)
        return out

    def logged_generate(*args, **kwargs):
        log.before_generation()
        out = generate(*args, **kwargs)
        end = time.perf_counter()
        prompts = kwargs["prompts"] if "prompts" in kwargs else args[0]
        log.after_generation(end, [list(p) for p in prompts], cut_at_stop(out[1], stops))
        return out

    generation.sync_weights, generation.generate = logged_sync, logged_generate


def worker_trl_sft(spec: dict) -> dict:
    """TRL's SFTTrainer on the saved model and the same demonstrations in the same order."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from egspo.data import format_prompt, synthetic_tokenizer

    setup = SFTSetup(**spec["setup"])
    steps = setup.warmup + setup.rounds
    tokenizer = synthetic_tokenizer()
    rows = [
        {"prompt": format_prompt(tokenizer, q, instruction=None), "completion": r}
        for b in egspo_batches("sft", steps, setup.batch_size)
        for q, r in zip(b["expert_prompts"], b["expert_responses"], strict=True)
    ]
    config = SFTConfig(
        **trl_common(steps, setup.learning_rate),
        per_device_train_batch_size=setup.batch_size,
        max_length=setup.max_length,
        packing=False,
        padding_free=False,
        completion_only_loss=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
    )
    log = RoundLog(setup.warmup)
    trainer = SFTTrainer(
        model=spec["model"],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[trl_callback(lambda: None, log.round_end)],
    )
    trainer.train()
    # Tokens of the timed steps: the tokenized examples TRL trained on, without padding.
    data = trainer.train_dataset
    tokens = sum(
        len(data[i]["input_ids"]) for i in range(setup.warmup * setup.batch_size, steps * setup.batch_size)
    )
    wall = log.ends[-1][0] - log.ends[setup.warmup - 1][0]
    return {"seconds": wall, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


WORKERS = {"trl_grpo": worker_trl_grpo, "trl_sft": worker_trl_sft}
