# syntax=docker/dockerfile:1
# Two stages: `export` (PyTorch, builds the model repository and the gRPC stubs), then `serve` (CUDA 13 +
# cuDNN runtime with ONNX Runtime GPU and the serving dependencies only: no PyTorch). The default target,
# `serve-models`, bakes the exported models into /models; `--target serve` builds the same image without
# them, for a model repository mounted as a volume at /models; `--target batch-ray` adds Ray for KubeRay.
#
#   docker build -t cnn-serve:0.1.0 .
#   docker run --rm --gpus all -p 3000:3000 -p 50051:50051 cnn-serve:0.1.0

# ---------------------------------------------------------------------------------------------- export
FROM python:3.12.12-slim-bookworm AS export
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# PyTorch from its CPU index: the export needs no GPU, and the CUDA wheels are gigabytes.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY export/ export/
COPY service/ service/
COPY proto/ proto/
# The compiled crop-only resize and JPEG part decoder of exact preprocessing (service/resample.c,
# service/jpeg_region.c), for the serve stage, which has no compiler. The part decoder needs libjpeg's headers
# only: it uses the libjpeg-turbo Pillow's wheel brings. The apt versions follow the pinned Python image's
# Debian snapshot (docs/DEPLOY.md).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libjpeg62-turbo-dev \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p service/native \
    && gcc -O3 -fPIC -shared -o service/native/resample.so service/resample.c -lm \
    && gcc -O3 -fPIC -shared -o service/native/jpeg_region.so service/jpeg_region.c
COPY requirements/export.txt requirements/export.txt
RUN pip install -r requirements/export.txt
# gRPC stubs are generated at build time, never taken from the build context.
RUN python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. proto/*.proto \
    && python -m export defaults --repository /models

# ----------------------------------------------------------------------------------------------- serve
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 AS serve
ARG APP_UID=10001
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# Ubuntu 24.04's python3 is 3.12, the version requirements/runtime.txt is resolved for. The apt versions
# follow the pinned CUDA image's Ubuntu snapshot (see docs/DEPLOY.md for why DL3008 is ignored).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && groupadd --gid "$APP_UID" app \
    && useradd --uid "$APP_UID" --gid app --no-create-home --home-dir /tmp --shell /usr/sbin/nologin app
WORKDIR /app
COPY requirements/runtime.txt requirements/runtime.txt
RUN pip install --only-binary=:all: -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY service/ service/
COPY --from=export /src/service/native/resample.so /src/service/native/jpeg_region.so service/native/
COPY --from=export /src/proto/ proto/
RUN pip install --no-deps .
# Every write goes under /tmp (an emptyDir in Kubernetes, where the root filesystem is read-only), the model
# cache of a repository in a bucket (CNN_SERVE_REPOSITORY=s3://...) included.
# MALLOC_ARENA_MAX=2: glibc's arenas per thread keep what a burst freed; with two, and the service's idle trim,
# the worker comes back to within 50 MB of its warm size after a burst (docs/BENCHMARKS.md).
ENV HOME=/tmp \
    TMPDIR=/tmp \
    BENTOML_HOME=/tmp/bentoml \
    CNN_SERVE_REPOSITORY=/models \
    CNN_SERVE_MODEL_CACHE=/tmp/cnn-serve-models \
    CNN_SERVE_HOST=0.0.0.0 \
    CNN_SERVE_HTTP_PORT=3000 \
    CNN_SERVE_GRPC_PORT=50051 \
    MALLOC_ARENA_MAX=2
RUN mkdir -p /models && chown "$APP_UID:$APP_UID" /models
VOLUME ["/tmp"]
USER ${APP_UID}:${APP_UID}
EXPOSE 3000 50051
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4).status != 200)"]
ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "service", "serve"]

# ------------------------------------------------------------------------- batch scoring on Ray (KubeRay)
# `docker build --target batch-ray -t cnn-serve:0.1.0-ray .`: the serving image with the models and Ray
# Data, for k8s/batch/rayjob.yaml. The serving image itself never carries Ray.
FROM serve AS batch-ray
USER 0:0
COPY requirements/ray.txt requirements/ray.txt
RUN pip install --only-binary=:all: --no-deps -r requirements/ray.txt
COPY --from=export --chown=root:root /models/ /models/
USER 10001:10001

# ---------------------------------------------------------------------------------- serve with models
FROM serve AS serve-models
COPY --from=export --chown=root:root /models/ /models/

