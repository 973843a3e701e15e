# syntax=docker/dockerfile:1
# rnnserve serving image: ONNX Runtime + FastAPI/uvicorn + the torch-free core and the serving
# package. No PyTorch and no training code. See docs/deployment.md, "The container".
#
#   docker build -t rnnserve .                       # GPU: onnxruntime-gpu with CUDA 13 + cuDNN 9 from PyPI
#   docker build --build-arg ORT_PACKAGE=onnxruntime==1.31.1 -t rnnserve:cpu .   # CPU: no CUDA, ~0.7 GB
#   docker run --gpus all -p 8000:8000 -p 8001:8001 rnnserve   # REST, gRPC; needs an NVIDIA driver >= 580 (CUDA 13)
#   docker run -p 8000:8000 -p 8001:8001 -v $PWD/model_repository:/models rnnserve:cpu   # CPU, mounted models
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# ONNX Runtime's GPU wheel with the CUDA runtime and cuDNN wheels it was built against; its CPU
# execution provider is the fallback where no GPU is visible. onnxruntime (the same version) makes
# the CPU image: nothing of CUDA in it.
ARG ORT_PACKAGE="onnxruntime-gpu[cuda,cudnn]==1.31.1"
# the model repository baked into the image; mount one at /models to override it
ARG MODEL_REPOSITORY=model_repository

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    RNNSERVE_REPOSITORY=/models \
    RNNSERVE_HOST=0.0.0.0 \
    RNNSERVE_PORT=8000 \
    RNNSERVE_GRPC_PORT=8001

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 rnnserve

# dependencies first, so that code changes do not reinstall them. Behind a TLS-intercepting
# proxy, pass its CA as a build secret (--secret id=pip_ca,src=ca.crt): it is not kept in the image.
COPY deploy/requirements-serve.txt /tmp/requirements-serve.txt
RUN --mount=type=secret,id=pip_ca \
    if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && pip install --no-compile -r /tmp/requirements-serve.txt "${ORT_PACKAGE}"

WORKDIR /app
COPY core/ core/
COPY serving/ serving/
COPY ${MODEL_REPOSITORY}/ /models/

USER 10001
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['RNNSERVE_PORT']}/v2/health/ready\", timeout=2)"]
CMD ["python3", "-m", "serving"]
