# syntax=docker/dockerfile:1
# batching_server image. Two stages: the builder installs the package and its dependencies into
# a virtual environment (and optionally downloads the weights); the runtime stage copies only
# that environment onto a clean slim base and runs it as a non-root user.
#
#   docker build -t batching-server .                          # CPU torch, weights fetched at start
#   docker build --build-arg BAKE_WEIGHTS=1 -t batching-server .  # weights baked in: starts offline
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       -t batching-server:cuda .                              # CUDA wheels (needs the NVIDIA runtime)
#   docker build --build-arg BAKE_COMPILED=1 -t batching-server .  # compiled forward passes baked in
#
# BAKE_COMPILED runs `batching-server compile` with settings.toml at build time, so that a start
# loads the compiled forward passes instead of running eagerly (model.compile = auto on a CPU) or
# compiling them (on a GPU). Its cache entries are keyed by the CPU model and features and by
# the thread plan, so build on the kind of machine you deploy to, with model.num_threads and
# batching.max_concurrent_batches set in settings.toml (auto counts the builder's cores); an
# entry that does not match is not used (the log says model_not_compiled and why). See
# docs/operations.md, "Compiled forward passes".
#
# The CUDA variant uses the same slim base: the torch CUDA wheels bring their own CUDA libraries,
# and only the host's driver is needed (docker run --gpus all ...).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

# Where torch wheels come from: CPU-only by default (about 1/5 of the CUDA download).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# 1: download the ResNet-50 IMAGENET1K_V2 weights into the image at build time.
ARG BAKE_WEIGHTS=0
# 1: compile the forward passes of settings.toml into the image (needs a C++ compiler, added).
ARG BAKE_COMPILED=0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TORCH_HOME=/opt/torch \
    BATCHING_SERVER_MODEL__COMPILE_CACHE_DIR=/opt/compiled

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the chosen index, so the package install below finds it satisfied.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1

WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY batching_server ./batching_server
RUN pip install .

# The weights land in $TORCH_HOME/hub/checkpoints, where torchvision looks at start-up.
RUN mkdir -p "${TORCH_HOME}" \
    && if [ "${BAKE_WEIGHTS}" = "1" ]; then \
         python -c "from torchvision.models import ResNet50_Weights, resnet50; resnet50(weights=ResNet50_Weights.IMAGENET1K_V2)"; \
       fi

# AOTInductor compiles its C++ with the system's g++ (the slim base has none), only when baking.
COPY settings.toml /src/settings.toml
# hadolint ignore=DL3008
RUN mkdir -p /opt/compiled \
    && if [ "${BAKE_COMPILED}" = "1" ]; then \
         apt-get update \
         && apt-get install -y --no-install-recommends g++ \
         && rm -rf /var/lib/apt/lists/* \
         && batching-server compile --settings /src/settings.toml; \
       fi


FROM ${PYTHON_IMAGE} AS runtime

ARG APP_UID=10001

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TORCH_HOME=/opt/torch \
    BATCHING_SERVER_MODEL__COMPILE_CACHE_DIR=/opt/compiled \
    BATCHING_SERVER_SERVER__HOST=0.0.0.0 \
    BATCHING_SERVER_SERVER__PORT=8080

RUN groupadd --system --gid "${APP_UID}" app \
    && useradd --system --uid "${APP_UID}" --gid app --no-create-home --home-dir /app app

COPY --from=builder /opt/venv /opt/venv
# Writable by the app user, so unbaked weights can still be downloaded there at first start.
COPY --from=builder --chown=${APP_UID}:${APP_UID} /opt/torch /opt/torch
# Writable too: an entry that is missing or stale is rebuilt there (where a compiler exists).
COPY --from=builder --chown=${APP_UID}:${APP_UID} /opt/compiled /opt/compiled
COPY settings.toml /app/settings.toml

WORKDIR /app
USER ${APP_UID}:${APP_UID}

EXPOSE 8080

# Liveness only: /ready turns 200 after warm-up, which orchestrators check separately.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]

ENTRYPOINT ["batching-server"]
CMD ["--settings", "/app/settings.toml"]
