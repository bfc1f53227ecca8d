# docker build -t ghcr.io/YOUR_ORG/crosslayer:0.1.0-ray2.60.0-gpu . && docker push ghcr.io/YOUR_ORG/crosslayer:0.1.0-ray2.60.0-gpu
#
# The image every cluster file names (cluster/kuberay/*.yaml, cluster/launcher/aws.yaml): Ray's own GPU image
# (CUDA, Python 3.11, Ray 2.60.0 as pinned in pyproject.toml) plus torch, DeepSpeed and this project.
# The project lands in /home/ray/crosslayer (configs/ and cluster/ included), installed, so `crosslayer ...`
# and `python -m jobs.cli ...` work from any directory; jobs submitted with a working dir run that
# code instead. Keep the Ray version here, in pyproject.toml and in every cluster file the same (tests check it).
FROM rayproject/ray:2.60.0-py311-gpu

ENV PIP_NO_CACHE_DIR=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/home/ray/.cache/huggingface

# Order matters (as in the Makefile): torch first (the default Linux wheel is the CUDA build), then DeepSpeed
# without build isolation so it sees that torch and compiles no ops now (it JIT-builds the few it needs on the
# GPU nodes), then the project, repeating torch so pip keeps it.
RUN pip install "torch==2.13.0" \
 && DS_BUILD_OPS=0 pip install --no-build-isolation "torch==2.13.0" "deepspeed==0.19.8"

# Created by the image's user (ray), not by WORKDIR (root): pip builds the project in place.
RUN mkdir -p /home/ray/crosslayer
WORKDIR /home/ray/crosslayer
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users cli_module ./cli_module
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users cluster ./cluster
RUN pip install "torch==2.13.0" "ray[train,data,serve]==2.60.0" ".[lmms]" \
 && pip install --no-deps "lmms-eval==0.7.3" \
 && python -c "import ray, torch, deepspeed, jobs.cli; assert ray.__version__ == '2.60.0', ray.__version__" \
 && crosslayer --help > /dev/null
