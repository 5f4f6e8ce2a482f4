#!/usr/bin/env bash
# The merge runner's CUDA path, checked in one go on a machine with a GPU (docs/operations.md, "Checking the CUDA path").
#
#   scripts/device_wheels.sh                 # here, where PyPI is reachable: wheels the GPU image lacks, into .whl/
#   scripts/device_check.sh                  # there (carry .whl): logs and figures into $OUT (default ./device-check-output)
#
# Steps, each under its own time limit (470 s in all; a step that fails or runs out of time does not stop the next):
#   env            nvidia-smi, torch/CUDA/numba versions
#   tests          tests/test_merge_device.py (every method on CUDA against the float64 references and the CPU result,
#                  DARE's hash and TIES's histograms on CUDA, bounded device memory, a merge job on KINSHIP_DEVICE=auto)
#                  plus the CPU merge-method and SLERP tests, on this machine's torch
#   merge_cuda     bench/merge.py (SLERP, 2 x 200M bf16) with the math on CUDA, against its same-run I/O floor
#   merge_cpu      the same on CPU (fused kernels): the peer of merge_cuda
#   methods        bench/merge_methods.py --device cuda --peer cpu: every method on CUDA against ours on CPU, same run
#                  (base + 2 or 3 x 100M bf16, METHODS_PARAMS)
#   kinship        bench/kinship.py (KINSHIP_DEVICE=auto: the exact pass on CUDA), base + 3 x 200M
# summary.txt lists each step's exit status and seconds. PARAMS overrides the model size (default 2e8), PYTHON the
# interpreter (default python3, the GPU image's), WHEELS the wheel folder (default .whl).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/device-check-output}
PY=${PYTHON:-python3}
PARAMS=${PARAMS:-2e8}
METHODS_PARAMS=${METHODS_PARAMS:-1e8}  # 7 methods x (CUDA + CPU) merges: smaller models keep the step inside its limit
WORK=${WORK:-/tmp/kinship-device-check}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT" "$WORK"
cd "$ROOT" || exit 1
SITE=""
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$WHEELS"/*.whl || exit 1
  SITE="$WORK/site:"
fi
# The packages as the editable install maps them (kinship_service lives in service/), without installing anything.
mkdir -p "$WORK/path"
ln -sfn "$ROOT/service" "$WORK/path/kinship_service"
ln -sfn "$ROOT/client/kinship_client" "$WORK/path/kinship_client"
export PYTHONPATH="$SITE$WORK/path:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 KINSHIP_LOG_LEVEL=WARNING
: >"$OUT/summary.txt"

step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to $OUT/NAME.log, record rc and seconds
  local name=$1 limit=$2 started rc
  shift 2
  started=$(date +%s)
  echo "== $name: $*" | tee "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "$name rc=$rc seconds=$(($(date +%s) - started))" | tee -a "$OUT/summary.txt"
}

step env 30 bash -c "nvidia-smi; $PY -c 'import torch, numba, grpc, google.protobuf as p; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"-\"); print(\"numba\", numba.__version__, \"grpc\", grpc.__version__, \"protobuf\", p.__version__)'; nproc; free -g"
step tests 120 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_merge_device.py tests/test_merge_methods_math.py tests/test_slerp.py
step merge_cuda 60 "$PY" bench/merge.py --device cuda --params "$PARAMS" --repeat 1 --pause 1 --dir "$WORK/merge"
step merge_cpu 60 "$PY" bench/merge.py --device cpu --params "$PARAMS" --repeat 1 --pause 1 --dir "$WORK/merge"
step methods 120 "$PY" bench/merge_methods.py --device cuda --peer cpu --params "$METHODS_PARAMS" --dir "$WORK/methods"
step kinship 80 "$PY" bench/kinship.py --params "$PARAMS" --repeat 1 --dir "$WORK/kinship"
rm -rf "$WORK/merge" "$WORK/methods" "$WORK/kinship"
cat "$OUT/summary.txt"
! grep -v "rc=0 " "$OUT/summary.txt" >/dev/null
