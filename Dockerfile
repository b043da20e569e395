# syntax=docker/dockerfile:1
#
# rmserve images. Two targets, one wheel:
#   docker build -t rmserve:cpu .                   # default target: cpu (python:3.11-slim, onnxruntime)
#   docker build -t rmserve:cuda --target cuda .    # NVIDIA CUDA runtime base, onnxruntime-gpu
# The runtime stages hold a venv with the project and its `server` extra only (no torch, never the
# export/train extras) and the default bundle, which ships inside the package as rmserve/models/default.
# deploy/README.md shows how to build, push and deploy both.

ARG PYTHON_IMAGE=python:3.11-slim
# The CUDA major version of this base must match the CUDA build of the onnxruntime-gpu wheel that pip
# resolves (see the ONNX Runtime "CUDA execution provider" requirements table); override it with
# --build-arg CUDA_IMAGE=... when they differ.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9

# ---------------------------------------------------------------------------------------------------
# wheel: build the rmserve wheel exactly as pyproject.toml defines it (setuptools, package data).
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ ./service/
COPY models/ ./models/
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && python -c "import sys, zipfile, glob; \
names = zipfile.ZipFile(glob.glob('/wheels/rmserve-*.whl')[0]).namelist(); \
sys.exit(0 if any(n.startswith('rmserve/models/default/') for n in names) else 'default bundle missing from the wheel')"

# ---------------------------------------------------------------------------------------------------
# cpu-venv: the runtime venv for the cpu target (same base image as the runtime, so the venv moves as is).
FROM ${PYTHON_IMAGE} AS cpu-venv
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/rmserve
ENV PATH=/opt/rmserve/bin:$PATH
COPY --from=wheel /wheels/ /wheels/
# DL3013 (pin pip versions): versions come from pyproject.toml's ranges, as for any `pip install rmserve`;
# pin them with a constraints file (PIP_CONSTRAINT) for reproducible builds, not in this file.
# hadolint ignore=DL3013
RUN pip install --upgrade pip \
    && WHEEL="$(echo /wheels/rmserve-*.whl)" \
    && pip install "${WHEEL}[server]" \
    && pip check \
    && python -c "import importlib.util as u, sys; sys.exit('torch must not be in the runtime image' if u.find_spec('torch') else 0)" \
    && rm -rf /wheels

# ---------------------------------------------------------------------------------------------------
# uv: only used to fetch a relocatable CPython 3.11 for the CUDA image (Ubuntu 24.04 ships 3.12).
FROM ${UV_IMAGE} AS uv

# cuda-venv: CPython 3.11 + the runtime venv, with onnxruntime-gpu in place of onnxruntime.
FROM ${CUDA_IMAGE} AS cuda-venv
# Must stay equal to the [project.optional-dependencies] gpu extra in pyproject.toml (a test checks it).
ARG ONNXRUNTIME_GPU_SPEC="onnxruntime-gpu>=1.20"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# DL3008 (pin apt versions): ca-certificates must track the distribution's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install 3.11 \
    && "$(uv python find 3.11)" -m venv /opt/rmserve
ENV PATH=/opt/rmserve/bin:$PATH
COPY --from=wheel /wheels/ /wheels/
# onnxruntime and onnxruntime-gpu install into the same `onnxruntime` package, so they must never be
# both present: install the server extra, remove onnxruntime, then install onnxruntime-gpu alone.
# (No `pip check` here: it would report the deliberately absent onnxruntime.)
# DL3013 (pin pip versions): versions come from pyproject.toml's ranges, as for any `pip install rmserve`;
# pin them with a constraints file (PIP_CONSTRAINT) for reproducible builds, not in this file.
# hadolint ignore=DL3013
RUN pip install --upgrade pip \
    && WHEEL="$(echo /wheels/rmserve-*.whl)" \
    && pip install "${WHEEL}[server]" \
    && pip uninstall -y onnxruntime \
    && pip install "${ONNXRUNTIME_GPU_SPEC}" \
    && if pip show onnxruntime >/dev/null 2>&1; then echo "onnxruntime and onnxruntime-gpu both installed" >&2; exit 1; fi \
    && python -c "import onnxruntime as ort, sys; sys.exit(0 if 'CUDAExecutionProvider' in ort.get_available_providers() else 'onnxruntime has no CUDA provider')" \
    && python -c "import importlib.util as u, sys; sys.exit('torch must not be in the runtime image' if u.find_spec('torch') else 0)" \
    && rm -rf /wheels

# ---------------------------------------------------------------------------------------------------
# cuda: runtime image for NVIDIA GPUs (docker build --target cuda).
FROM ${CUDA_IMAGE} AS cuda
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/rmserve/bin:$PATH \
    HOME=/home/rmserve \
    XDG_CACHE_HOME=/home/rmserve/.cache \
    RMSERVE_HOST=0.0.0.0 \
    RMSERVE_PORT=8000 \
    RMSERVE_PROVIDER=cuda
RUN groupadd --gid 10001 rmserve \
    && useradd --uid 10001 --gid 10001 --home-dir /home/rmserve --create-home --shell /usr/sbin/nologin rmserve
COPY --from=cuda-venv /opt/python/ /opt/python/
COPY --from=cuda-venv /opt/rmserve/ /opt/rmserve/
USER 10001:10001
WORKDIR /home/rmserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as r; sys.exit(r.urlopen('http://127.0.0.1:8000/health/live', timeout=2).status != 200)"]
ENTRYPOINT ["rmserve", "serve"]

# ---------------------------------------------------------------------------------------------------
# cpu: runtime image for CPU nodes. Last stage, so it is what a plain `docker build .` produces.
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/rmserve/bin:$PATH \
    HOME=/home/rmserve \
    XDG_CACHE_HOME=/home/rmserve/.cache \
    RMSERVE_HOST=0.0.0.0 \
    RMSERVE_PORT=8000
RUN groupadd --gid 10001 rmserve \
    && useradd --uid 10001 --gid 10001 --home-dir /home/rmserve --create-home --shell /usr/sbin/nologin rmserve
COPY --from=cpu-venv /opt/rmserve/ /opt/rmserve/
USER 10001:10001
WORKDIR /home/rmserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as r; sys.exit(r.urlopen('http://127.0.0.1:8000/health/live', timeout=2).status != 200)"]
ENTRYPOINT ["rmserve", "serve"]
