# aligner on an NVIDIA PyTorch image: the image's CUDA, NCCL and torch build stay as they are; the
# package and its other requirements are installed around them.
#
#   docker build -t aligner .
#   docker build -t aligner:trtllm --build-arg WITH_TRTLLM=1 --build-arg TRTLLM_VERSION=<version> \
#       --build-arg BASE_IMAGE=<the NGC PyTorch image that TensorRT-LLM version is built on> .
#   docker run --gpus all --ipc=host --rm -it -v "$PWD/outputs:/workspace/aligner/outputs" aligner \
#       torchrun --nproc_per_node 8 examples/train_sft.py model.path=... data.train=...
#
# For Slurm with pyxis/enroot: `enroot import dockerd://aligner` makes a .sqsh file to pass as
# CONTAINER_IMAGE to examples/slurm/*.sbatch (docs/slurm.md).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.08-py3
FROM ${BASE_IMAGE}

# Optional TensorRT-LLM rollout backend (`pip install aligner[trtllm]`), off by default.
ARG WITH_TRTLLM=0
ARG TRTLLM_VERSION=

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/aligner

# Remember the image's torch build; aligner-check-torch fails the build if any install replaced it.
RUN python -c "import torch; print(torch.__version__)" > /etc/aligner-torch-version \
 && printf '%s\n' '#!/bin/sh' \
      'now=$(python -c "import torch; print(torch.__version__)")' \
      'want=$(cat /etc/aligner-torch-version)' \
      '[ "$now" = "$want" ] && exit 0' \
      'echo "torch $now replaced the image build $want: pin what pulled it in, or pick a BASE_IMAGE that matches" >&2' \
      'exit 1' > /usr/local/bin/aligner-check-torch \
 && chmod +x /usr/local/bin/aligner-check-torch

# Requirements in their own layer (rebuilt only when setup.py changes): the core requirements and
# the wandb and tensorboard extras as setup.py lists them, minus torch, which the image provides.
COPY setup.py pyproject.toml ./
RUN reqs=$(mktemp -d) \
 && python setup.py -q egg_info --egg-base "$reqs" \
 && awk 'BEGIN { keep = 1 } /^\[/ { keep = ($0 == "[wandb]" || $0 == "[tensorboard]"); next } keep && NF && $0 !~ /^torch([<>=!~ ;[]|$)/' \
      "$reqs/aligner.egg-info/requires.txt" > "$reqs/requirements.txt" \
 && pip install --no-cache-dir -r "$reqs/requirements.txt" \
 && rm -rf "$reqs" \
 && aligner-check-torch

# TensorRT-LLM wheels are built against one torch version: use the NGC PyTorch release its notes
# name as BASE_IMAGE, or aligner-check-torch stops the build here.
RUN if [ "$WITH_TRTLLM" = "1" ]; then \
      apt-get update && apt-get install -y --no-install-recommends libopenmpi-dev \
      && rm -rf /var/lib/apt/lists/* \
      && pip install --no-cache-dir --extra-index-url https://pypi.nvidia.com \
           "tensorrt_llm${TRTLLM_VERSION:+==$TRTLLM_VERSION}" \
      && aligner-check-torch \
      && python -c "import tensorrt_llm"; \
    fi

COPY . .
RUN pip install --no-cache-dir --no-deps -e . \
 && aligner-check-torch \
 && python -c "import aligner, wandb, torch.utils.tensorboard" \
 && aligner --help
