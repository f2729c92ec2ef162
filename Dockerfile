# The gatecast server. One Dockerfile, two variants (docs/readme/deploy.md):
#   docker build -t gatecast .                                  # CPU: onnxruntime on python:3.11 slim
#   docker build -t gatecast:cuda --build-arg VARIANT=cuda .    # GPU: onnxruntime-gpu on CUDA 13 + cuDNN 9
# Needs BuildKit (Docker 23+ and compose use it by default): only the chosen variant's base is pulled.
ARG VARIANT=cpu

# CPU: the official image, exact Python and Debian release.
FROM python:3.11.14-slim-trixie AS cpu
RUN python -m venv /opt/venv

# GPU: onnxruntime-gpu 1.31 is built for CUDA 13.0 and cuDNN 9 (its build_and_package_info: cuda_version
# 13.0; its [cudnn] extra: nvidia-cudnn-cu13 ~= 9.0); NVIDIA's runtime image carries both. The same CPython
# 3.11.14 as the CPU image, a relocatable build installed by uv (Ubuntu 24.04 ships only 3.12); uv itself
# is mounted for this one step and not left in the image.
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 AS cuda
ENV UV_PYTHON_INSTALL_DIR=/opt/python
RUN --mount=from=ghcr.io/astral-sh/uv:0.9.30,source=/uv,target=/usr/local/bin/uv \
    uv venv --python 3.11.14 --seed /opt/venv

FROM ${VARIANT} AS runtime
ARG VARIANT
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 gatecast \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home gatecast
WORKDIR /app

# Dependencies first, from the lock alone (and the pinned build backend): a code change reuses this layer.
COPY requirements/serve-${VARIANT}.txt requirements/build.txt /tmp/requirements/
RUN pip install --no-cache-dir --requirement /tmp/requirements/serve-${VARIANT}.txt \
        --requirement /tmp/requirements/build.txt \
    && rm -rf /tmp/requirements

# The package itself, without resolving again (the lock above is the whole dependency set; in the CPU variant
# it has onnxruntime where pyproject.toml names onnxruntime-gpu: the same module, without CUDA), nor fetching
# a build backend. Built outside /app: `python -m` puts the working directory first on sys.path, where a
# source tree would shadow the installed package.
COPY pyproject.toml README.md /tmp/src/
COPY gatecast /tmp/src/gatecast
COPY service /tmp/src/service
COPY training /tmp/src/training
RUN pip install --no-cache-dir --no-deps --no-build-isolation /tmp/src && rm -rf /tmp/src

# The committed default model; mount a repository over /app/models to serve others.
COPY models models
# session snapshots (GATECAST_SNAPSHOT_PATH), the one place the server writes
RUN mkdir -p /var/lib/gatecast && chown gatecast:gatecast /var/lib/gatecast

USER 10001:10001
ENV GATECAST_HOST=0.0.0.0 \
    GATECAST_REPO=/app/models
EXPOSE 8500 8510
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "gatecast.service.healthcheck", "--timeout", "3"]
# SIGTERM drains: in-flight requests finish and sessions are snapshotted when GATECAST_SNAPSHOT_PATH is set
STOPSIGNAL SIGTERM
CMD ["gatecast", "serve"]
