#!/usr/bin/env bash
# GPU smoke test: a few iterations each of bf16-mixed, LoRA (+KL, adapters, export), QLoRA 4-bit and
# FSDP2 (ModelParallelStrategy) on one GPU. Downloads nothing: the policy is a randomly
# initialised model with Qwen2.5-0.5B's shape (24 layers, 896 hidden, GQA 14/2 heads; the
# vocabulary is the local synthetic tokenizer's), the data is the synthetic arithmetic task.
#   bash scripts/gpu_smoke.sh [output_dir]
# Each stage prints its wall time; the script stops at the first failure.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu_smoke}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"

QWEN05='{"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
 "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 2048,
 "tie_word_embeddings": true, "rope_theta": 1000000.0}'

COMMON=(
  --config configs/demo.yaml
  --trainer.accelerator=gpu
  --trainer.devices=1
  --trainer.enable_progress_bar=false
  --trainer.callbacks=[]
  --model.sft_iterations=2
  --model.rl_iterations=3
  --model.rollout.num_generations=4
  --model.rollout.max_completion_length=32
  --model.evaluation.max_completion_length=32
  --data.prompts_per_step=4
  --data.expert_per_step=8
  --data.eval_size=16
  --data.eval_batch_size=16
)

stage() {  # stage NAME ARGS...: one short fit run under $OUT/NAME
  local name="$1"
  shift
  echo "=== $name"
  local start=$SECONDS
  python -m egspo fit "${COMMON[@]}" --trainer.default_root_dir="$OUT/$name" "$@"
  echo "=== $name: ok in $((SECONDS - start)) s"
}

# 1. Full fine-tuning: fp32 master weights, bf16 compute (as configs/qwen_math.yaml), token budget.
stage bf16 \
  --model.policy.config="$QWEN05" --model.policy.tokenizer=synthetic \
  --trainer.precision=bf16-mixed --model.policy.dtype=float32 \
  --model.update.ppo_max_token_len_per_gpu=512

# 2. LoRA with a KL penalty (reference = base with adapters disabled), adapters saved, then export.
stage lora \
  --model.policy.config="$QWEN05" --model.policy.tokenizer=synthetic \
  --trainer.precision=bf16-mixed --model.policy.dtype=bfloat16 \
  --model.policy.lora="{'r': 16, 'alpha': 32}" --model.policy.gradient_checkpointing=true \
  --model.policy_loss.init_args.beta=0.05 \
  '--trainer.callbacks=[{"class_path": "egspo.callbacks.AdapterExport"}]'
test -f "$OUT/lora/checkpoints/last.ckpt"
find "$OUT/lora" -path '*adapters/final/adapter_model.safetensors' | grep -q .
python -m egspo export "$OUT/lora/checkpoints/last.ckpt" --out "$OUT/lora/hf" --dtype bfloat16
python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('$OUT/lora/hf')"

# 3. QLoRA: 4-bit NF4 base (bitsandbytes needs a saved model: `name_or_path`).
python - "$OUT/base" "$QWEN05" <<'PY'
import json, sys
import torch
from egspo.model import PolicyConfig, load_policy, load_tokenizer
spec = PolicyConfig(config=json.loads(sys.argv[2]), tokenizer="synthetic", dtype="bfloat16")
tokenizer = load_tokenizer(spec)
torch.manual_seed(0)
load_policy(spec, tokenizer).save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
PY
stage qlora \
  --model.policy.name_or_path="$OUT/base" --model.policy.config=null --model.policy.tokenizer=null \
  --trainer.precision=bf16-mixed --model.policy.dtype=bfloat16 \
  --model.policy.load_in_4bit=true --model.policy.lora="{'r': 16, 'alpha': 32}" \
  --model.policy_loss.init_args.beta=0.05

# 4. FSDP2 through ModelParallelStrategy on one device (sharding, scoring and generation paths),
#    bf16 compute over fp32 shards. The checkpoint is a sharded folder; export reads it.
stage fsdp2 \
  --model.policy.config="$QWEN05" --model.policy.tokenizer=synthetic \
  --trainer.precision=32-true --model.policy.dtype=float32 \
  '--trainer.strategy={"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}' \
  --model.fsdp.param_dtype=bfloat16
python -m egspo export "$OUT/fsdp2/checkpoints/last.ckpt" --out "$OUT/fsdp2/hf"

echo "all GPU smoke stages passed; outputs in $OUT"
