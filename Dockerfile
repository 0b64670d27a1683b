# egspo on a CUDA PyTorch image: `python -m egspo` is the entrypoint.
#   docker build -t egspo .
#   docker run --gpus all --ipc=host -v $PWD/runs:/opt/egspo/runs -v $HOME/.cache/huggingface:/cache/huggingface \
#     egspo fit --config configs/qwen_math_lora.yaml
# The base image brings torch with CUDA; `pip install .` keeps it (pyproject asks torch>=2.4)
# and adds lightning, transformers, peft, bitsandbytes, datasets and math-verify.
# BASE_IMAGE can name any pytorch/pytorch *-cuda*-cudnn*-runtime tag with torch >= 2.6 (FSDP2).
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    TOKENIZERS_PARALLELISM=false

WORKDIR /opt/egspo
# Dependencies first, so that a code change does not reinstall them.
COPY pyproject.toml README.md ./
COPY src/egspo/__init__.py src/egspo/__init__.py
RUN pip install . && pip uninstall -y egspo
COPY src ./src
COPY configs ./configs
COPY scripts ./scripts
RUN pip install --no-deps . && python -c "import egspo, torch; print('egspo on torch', torch.__version__)"

# Runs write under /opt/egspo/runs (configs use relative `runs/...`): mount a volume there.
VOLUME ["/opt/egspo/runs", "/cache/huggingface"]
ENTRYPOINT ["python", "-m", "egspo"]
CMD ["--help"]
