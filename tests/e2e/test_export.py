"""`python -m egspo export`: a checkpoint becomes a Hugging Face model that generates like the policy."""

from pathlib import Path

import pytest
import torch
from tiny_model import tiny_qwen2

from egspo.model import PolicyConfig, load_policy, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = tiny_qwen2()
QUESTIONS = ["What is 3 + 4?", "Tom has 12 apples and eats 5. How many are left?", "What is 9 - 2?"]

pytestmark = pytest.mark.slow


def fit(tmp_path: Path, *extra: str):
    from egspo.cli import run

    args = [
        "--config",
        str(ROOT / "configs/demo.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--model.sft_iterations=2",
        "--model.rl_iterations=1",
        "--model.rollout.num_generations=4",
        "--model.rollout.max_completion_length=8",
        "--trainer.limit_val_batches=0",
        "--data.prompts_per_step=2",
        "--data.expert_per_step=4",
        "--data.eval_size=4",
        *extra,
    ]
    cli = run(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def greedy(model, ids: torch.Tensor, mask: torch.Tensor, pad: int, eos: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base")
    spec = PolicyConfig(config=TINY, tokenizer="synthetic")
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(0)
    load_policy(spec, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_exported_model_generates_like_the_trained_policy(tmp_path, lora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from egspo.cli import main

    cli = fit(tmp_path, *(["--model.policy.lora={'r': 4, 'alpha': 16}"] if lora else []))
    module = cli.model
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    config = Path(cli.trainer.log_dir) / "config.yaml"
    args = ["export", str(checkpoint), "--out", str(tmp_path / "hf")]
    out = main([*args, "--config", str(config)] if lora else args)

    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in exported.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = [module.encoder.format(q) for q in QUESTIONS]
    assert (
        tokenizer(texts, add_special_tokens=False)["input_ids"]
        == (module.tokenizer(texts, add_special_tokens=False)["input_ids"])
    )
    prompts = module.encoder.prompts(QUESTIONS)
    ids, mask = prompts.input_ids, prompts.attention_mask
    pad, eos = module.tokenizer.pad_token_id, module.tokenizer.eos_token_id
    expected = greedy(module.policy, ids, mask, pad, eos)
    assert torch.equal(greedy(exported, ids, mask, pad, eos), expected)
    if lora:  # the adapters moved the weights: the merge is not the untouched base
        merged = exported.state_dict()["model.layers.0.self_attn.q_proj.weight"]
        base = module.policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
        assert not torch.allclose(merged, base)


def test_qlora_export_merges_adapters_into_the_full_precision_base(tmp_path, base_dir):
    from safetensors.torch import load_file

    from egspo.export import export

    cli = fit(
        tmp_path,
        f"--model.policy.name_or_path={base_dir}",
        "--model.policy.config=null",
        "--model.policy.tokenizer=null",
        "--model.policy.load_in_4bit=true",
        "--model.policy.lora={'r': 4, 'alpha': 16, 'target_modules': ['q_proj']}",
    )
    state = cli.model.policy.state_dict()
    out = export(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hf")
    merged = load_file(out / "model.safetensors")
    original = load_file(base_dir / "model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    delta = state[prefix + "lora_B.default.weight"] @ state[prefix + "lora_A.default.weight"] * (16 / 4)
    assert delta.abs().max() > 0
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[key], original[key] + delta, rtol=0, atol=1e-6)
    assert "quantization_config" not in (out / "config.json").read_text()
