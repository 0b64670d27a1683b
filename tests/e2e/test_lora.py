"""LoRA and QLoRA: the KL reference is the base with adapters disabled, 4-bit training on CPU,
adapters saved in PEFT format, and the single-GPU configs."""

import json
from pathlib import Path

import pytest
import torch
from tiny_model import tiny_qwen2

from egspo.model import KLReference, LoRAConfig, PolicyConfig, load_policy, load_tokenizer
from egspo.scoring import token_logprobs

ROOT = Path(__file__).resolve().parents[2]
TINY = tiny_qwen2()
SMALL = [
    "--trainer.accelerator=cpu",
    "--trainer.precision=32-true",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.rollout.num_generations=4",
    "--model.rollout.max_completion_length=8",
    "--model.update.mini_batch_size=null",
    "--model.update.sft_batch_size=null",
    "--model.policy.dtype=float32",
    "--model.policy.gradient_checkpointing=false",
    "--model.policy.lora={'r': 4, 'alpha': 8}",
    "--model.policy_loss.init_args.beta=0.1",
    "--data.prompts_per_step=2",
    "--data.expert_per_step=2",
    "--data.eval_size=4",
    "--data.eval_batch_size=4",
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny pretrained model on disk, with its tokenizer (4-bit loading needs `name_or_path`)."""
    path = tmp_path_factory.mktemp("base")
    spec = PolicyConfig(config=TINY, tokenizer="synthetic")
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(0)
    load_policy(spec, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def fit(tmp_path: Path, config: str, *extra: str, sft: int = 1, rl: int = 2):
    from egspo.cli import run

    args = ["--config", str(ROOT / config), f"--trainer.default_root_dir={tmp_path}", *SMALL]
    args += [f"--model.sft_iterations={sft}", f"--model.rl_iterations={rl}", *extra]
    cli = run(args, run=False)
    cli.model.configure_model()
    before = {k: v.detach().clone() for k, v in cli.model.policy.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, before


def test_reference_is_the_base_with_adapters_disabled_not_a_copy():
    from egspo.module import HybridRLModule

    spec = PolicyConfig(config=TINY, tokenizer="synthetic", lora=LoRAConfig(r=4, alpha=8))
    module = HybridRLModule(policy=spec)
    module.configure_model()
    lms = [m for m in module.modules() if type(m).__name__ == "Qwen2ForCausalLM"]
    assert len(lms) == 1, "the reference must not be a second model"
    ids = torch.randint(3, 200, (2, 12))
    mask = torch.ones_like(ids)
    score_mask = torch.zeros(2, 12)
    score_mask[:, 6:] = 1
    torch.manual_seed(1)
    for name, p in module.policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    with torch.no_grad():
        trained = token_logprobs(module.policy, ids, mask, score_mask).logprobs
        with KLReference()(module.policy) as reference_model:
            assert reference_model is module.policy  # the same model, adapters off: no copy
            reference = token_logprobs(module.policy, ids, mask, score_mask).logprobs
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.data.zero_()
        base = token_logprobs(module.policy, ids, mask, score_mask).logprobs
    assert not torch.allclose(trained, reference, atol=1e-4)
    torch.testing.assert_close(reference, base, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_lora_fit_with_kl_saves_peft_adapters(tmp_path, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cli, before = fit(
        tmp_path,
        "configs/demo.yaml",
        f"--model.policy.name_or_path={base_dir}",
        "--model.policy.config=null",
        "--model.policy.tokenizer=null",
        "--trainer.callbacks+=egspo.callbacks.AdapterExport",
    )
    module = cli.model
    metrics = cli.trainer.logged_metrics
    assert module.experience_builder.reference is not None  # adapters disabled: the KL reference
    assert torch.isfinite(metrics["rl/kl"]) and float(metrics["rl/kl"]) > 0  # adapters moved away
    after = module.policy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)

    run_dir = Path(cli.trainer.log_dir)
    final = run_dir / "adapters" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapters" / "iteration=3" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final)
    prompts = module.encoder.prompts(["What is 3 + 4?", "What is 12 - 5?"])
    ids, attn = prompts.input_ids, prompts.attention_mask
    with torch.no_grad():
        module.policy.eval()
        expected = module.policy(input_ids=ids, attention_mask=attn).logits
        got = reloaded(input_ids=ids, attention_mask=attn).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_lora_config_selects_adapters_and_a_base_reference():
    from egspo.cli import run

    for config, four_bit in (("configs/qwen_math_lora.yaml", False), ("configs/qwen_math_qlora.yaml", True)):
        cli = run(
            args=[
                "--config",
                str(ROOT / config),
                "--trainer.accelerator=cpu",
                "--model.policy.name_or_path=null",  # the recipe's hub model, replaced by a tiny one
                f"--model.policy.config={json.dumps(TINY)}",
                "--model.policy.tokenizer=synthetic",
            ],
            run=False,
        )
        spec = cli.model.policy_spec
        assert spec.lora is not None and spec.load_in_4bit == four_bit
        assert any(type(c).__name__ == "AdapterExport" for c in cli.trainer.callbacks)
