# gemma-sae container images.
#
#   docker build --target cpu -t gemma-sae:cpu .   # XLA on CPU: local runs, smoke tests
#   docker build --target tpu -t gemma-sae:tpu .   # Cloud TPU v5e VMs (jax[tpu] + libtpu)
#   docker build --target dataflow -t gemma-sae:dataflow .  # Dataflow workers (tokenize)
#
#   docker run --rm -v "$PWD/out:/app/runs/local" gemma-sae:cpu pipeline  # out/: uid 10001 writes
#   docker run --rm --privileged --net=host gemma-sae:tpu train --config configs/... workdir=gs://...
#
# BASE_IMAGE is any Debian-based image with Python 3.11 and its venv module; where no registry
# can be reached (tests/test_image.py), a locally made one stands in for python:3.11-slim.
#
# Layers are ordered from least to most often changed: Python runtime and user, locked
# dependencies (only pyproject.toml + requirements-lock.txt are copied for them), the TPU
# runtime, and last the project source, so a source change rebuilds only the final layers.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    KERAS_BACKEND=jax \
    TF_CPP_MIN_LOG_LEVEL=3

# Unprivileged runtime user (uid/gid 10001, numeric in USER so runAsNonRoot can check it);
# the venv and the source stay root-owned, read-only to it.
RUN groupadd --gid 10001 sae \
    && useradd --uid 10001 --gid sae --no-log-init --create-home --home-dir /home/sae \
        --shell /usr/sbin/nologin sae \
    && python3 -m venv "${VIRTUAL_ENV}"

WORKDIR /app

# Dependencies first: this layer is rebuilt only when the lock file changes.
COPY pyproject.toml requirements-lock.txt ./
RUN pip install --no-cache-dir -r requirements-lock.txt

ENTRYPOINT ["gemma-sae"]
CMD ["--help"]


# ---- cpu: XLA on the host CPU (tests, local runs, Dataflow-free tokenize) ----
FROM base AS cpu

ENV JAX_PLATFORMS=cpu

COPY sae/ ./sae/
COPY jobs/ ./jobs/
COPY configs/ ./configs/
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && install -d -o sae -g sae /app/runs

USER 10001:10001


# ---- tpu: Cloud TPU v5e (runtime v2-alpha-tpuv5-lite) ----
FROM base AS tpu

# jax[tpu] must match the locked jax; jax 0.10.2's tpu extra requires libtpu==0.0.42.*.
# The lock file as constraints keeps jaxlib and every other dependency at the locked version.
RUN pip install --no-cache-dir -c requirements-lock.txt "jax[tpu]==0.10.2" "libtpu==0.0.42.1"

COPY sae/ ./sae/
COPY jobs/ ./jobs/
COPY configs/ ./configs/
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && install -d -o sae -g sae /app/runs

USER 10001:10001


# ---- dataflow: worker image for the tokenize stage on Dataflow (tokenize.runner=dataflow) ----
# The Beam SDK image at the locked apache-beam version keeps its worker boot entrypoint; the
# locked dependencies and the package go on top, so workers unpickle the same `sae` DoFns
# with the same library versions as the launcher.
FROM apache/beam_python3.11_sdk:2.77.0 AS dataflow

WORKDIR /app
COPY pyproject.toml requirements-lock.txt ./
RUN pip install --no-cache-dir -r requirements-lock.txt

COPY sae/ ./sae/
COPY jobs/ ./jobs/
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info
