# syntax=docker/dockerfile:1
#
# The model-kinship server image.
#
#   GPU (default, CUDA build of torch):
#     docker build -t model-kinship:0.1.0 .
#   CPU only (CPU build of torch; a plain Ubuntu base keeps the image small):
#     docker build --build-arg TORCH_VARIANT=cpu --build-arg BASE_IMAGE=ubuntu:24.04 -t model-kinship:0.1.0-cpu .
#   With the scale-out extras (PostgreSQL shared state, Ray; the image of the Helm chart's
#   RayCluster too):
#     docker build --build-arg EXTRAS=postgres,ray -t model-kinship:0.1.0-ray .
#   Run:
#     docker run --gpus all -p 50051:50051 -p 9090:9090 -v /srv/models:/models:ro model-kinship:0.1.0
#
# Both stages use the same base, so the virtual environment built in the first stage
# finds its interpreter (/usr/bin/python3.12) at the same path in the second. The
# final stage holds the interpreter, the environment and nothing to build with: no
# compiler, no pip. Configuration is KINSHIP_* environment variables (docs/operations.md).

ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# --------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder

# cu128 (default) or another CUDA variant of the PyTorch index, or cpu.
ARG TORCH_VARIANT=cu128
ARG TORCH_VERSION=2.13.0
# Optional extras of pyproject.toml, comma-separated: postgres (KINSHIP_STATE_URL), ray
# (KINSHIP_RAY_ADDRESS). Each has its lock file requirements/<extra>.txt. Empty: neither.
ARG EXTRAS=""

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: it is most of the image and changes least often.
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"

WORKDIR /src
# Every other runtime dependency, pinned with its transitive closure in lock files: the
# server's, plus one per requested extra, resolved together in one pip run.
COPY requirements/ requirements/
# An unknown extra stops the build (no requirements/<extra>.txt).
RUN for extra in $(echo "${EXTRAS}" | tr ',' ' '); do \
        cat "requirements/${extra}.txt" || exit 1; \
    done > /tmp/extras.txt \
    && pip install --no-cache-dir --requirement requirements/server.txt --requirement /tmp/extras.txt \
    && rm /tmp/extras.txt

# The project itself, without re-resolving dependencies; then pip leaves the environment.
# pip compiles bytecode as it installs; it stays: the final root filesystem is read-only.
COPY pyproject.toml README.md ./
COPY client ./client
COPY service ./service
COPY proto ./proto
RUN pip install --no-cache-dir --no-deps . \
    && python -m pip uninstall -y pip

# Compile the fused CPU kernels (numba: kinship pass, SLERP, task vectors) now, so the server
# finds them in the cache instead of compiling for seconds at start. Entries are for this build
# machine's CPU; on another CPU the server compiles once at start, in the background (a copy
# under /tmp if read-only).
RUN NUMBA_CACHE_DIR=/opt/numba-cache python -c "from kinship_service.kinship import cpu_kernel; from kinship_service.merge import slerp_kernel, task_vectors_jit; print('numba warm-up', cpu_kernel.warm_up(), slerp_kernel.warm_up(), task_vectors_jit.warm_up())"

# --------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="model-kinship" \
      org.opencontainers.image.description="gRPC service: model kinship, merge recommendations and SLERP merges for LLM checkpoints" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The interpreter only (the same package as in the builder); no -venv, no -dev, no compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Numeric user 10001 (the Helm chart's runAsUser); its home and the data directories are writable.
RUN groupadd --system --gid 10001 kinship \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/kinship --create-home --shell /usr/sbin/nologin kinship \
    && mkdir -p /var/cache/model-kinship/kinship /var/cache/model-kinship/huggingface /var/lib/model-kinship/merges /models \
    && chown -R 10001:10001 /var/cache/model-kinship /var/lib/model-kinship /home/kinship

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=10001:10001 /opt/numba-cache /opt/numba-cache

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/kinship \
    XDG_CACHE_HOME=/home/kinship/.cache \
    TRITON_CACHE_DIR=/home/kinship/.cache/triton \
    NUMBA_CACHE_DIR=/opt/numba-cache \
    HF_HOME=/var/cache/model-kinship/huggingface \
    KINSHIP_HOST=0.0.0.0 \
    KINSHIP_PORT=50051 \
    KINSHIP_METRICS_PORT=9090 \
    KINSHIP_ALLOWED_ROOTS=/models:/var/lib/model-kinship/merges \
    KINSHIP_CACHE_DIR=/var/cache/model-kinship/kinship \
    KINSHIP_OUTPUT_ROOT=/var/lib/model-kinship/merges \
    KINSHIP_LOG_FORMAT=json

# The fingerprint/delta cache (with the Hugging Face cache beside it) and the merge outputs.
VOLUME ["/var/cache/model-kinship", "/var/lib/model-kinship/merges"]

# gRPC API and Prometheus metrics (KINSHIP_PORT, KINSHIP_METRICS_PORT).
EXPOSE 50051/tcp 9090/tcp

USER 10001:10001
WORKDIR /home/kinship

# Asks grpc.health.v1 on KINSHIP_HEALTH_PORT, else on KINSHIP_PORT; exits 0 only when SERVING.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 CMD ["kinship-healthcheck"]

# The server is PID 1 (exec form): SIGTERM reaches it and starts the graceful shutdown.
STOPSIGNAL SIGTERM
ENTRYPOINT ["kinship-server"]
