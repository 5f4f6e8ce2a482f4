#!/usr/bin/env bash
# Wheels of the server's packages that the GPU machine's image lacks (or has in other versions), into .whl/
# (ignored by git) for scripts/device_check.sh, which installs them there: that machine reaches no registry.
# Run here, where PyPI is reachable, then pass `.whl` in the device run's `carry`. About 15 MiB.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
cd "$ROOT"
rm -rf .whl && mkdir .whl
# The GPU image has torch, numpy, numba, safetensors, PyYAML, prometheus-client, pytest, pytest-timeout; these it lacks or
# has in other versions (the stubs in client/kinship_client/v1 need protobuf 7); huggingface_hub is imported only for hf:// references.
PACKAGES=(
  grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 grpcio-status==1.85.1
  protobuf==7.36.2 googleapis-common-protos==1.76.0 diskcache==5.6.3
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d .whl "${PACKAGES[@]}"
ls -l .whl
du -sh .whl
