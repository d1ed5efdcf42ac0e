#!/usr/bin/env bash
# Data-parallel training on a machine with two or more GPUs, in one call, straight from the
# checkout (nothing installed; the same environment as scripts/gpu-check.sh):
#   1. the tests of the feature: tests/test_distributed.py (the in-process group on the CPU, NCCL
#      with one rank, `--gpus 1`) and tests/test_multi_gpu.py (NCCL collectives between two
#      processes, `tinyllm train --gpus 2` against one GPU with and without --zero1, resuming on
#      another number of GPUs, a worker killed, a rank that hangs);
#   2. benchmarks/train_multi_gpu.py: GPT-2-small in bfloat16 on 1 GPU, 2 GPUs and 2 GPUs with
#      ZeRO-1 at the same global batch: tokens/s, speed-up, peak memory, loss curves.
# Everything it writes goes to $OUT (default ./gpu-multi-out): tests.txt, benchmark.txt,
# loss_curves.json, multi_gpu_loss.png (when matplotlib is there), one JSON per rank and run.
#
#   scripts/gpu-multi.sh
#   BENCH_ARGS="--steps 60" scripts/gpu-multi.sh        # options of the benchmark
#   GPU_MULTI_BENCH=0 scripts/gpu-multi.sh              # the tests only
#
# Prints the tests' summary line and the benchmark's table; exits non-zero when either failed.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
OUT=${OUT:-$PWD/gpu-multi-out}
mkdir -p "$OUT"

"$PYTHON" - <<'PY'
import autograd.backend as b
from autograd import distributed
if not b.cuda_available():
    print("CUDA available: False (the GPU tests will be skipped)")
else:
    cp = b.cupy_module()
    n = cp.cuda.runtime.getDeviceCount()
    names = sorted({cp.cuda.runtime.getDeviceProperties(i)["name"].decode() for i in range(n)})
    try:
        nccl = distributed.nccl_module()
        v = nccl.get_version()
        version = f"NCCL {v // 10000}.{v // 100 % 100}.{v % 100}" if v >= 10000 else f"NCCL {v}"
    except RuntimeError as e:
        version = f"no NCCL: {e}"
    print(f"cupy {cp.__version__}; {version}; {n} GPUs: {', '.join(names)}")
PY

SECONDS=0
"$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_distributed.py tests/test_multi_gpu.py \
    2>&1 | tee "$OUT/tests.txt"
status=${PIPESTATUS[0]}
echo "gpu-multi tests: $(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$OUT/tests.txt" | tail -1) (${SECONDS}s)"

if [ "${GPU_MULTI_BENCH:-1}" != 0 ]; then
    SECONDS=0
    echo "---- benchmarks/train_multi_gpu.py ${BENCH_ARGS:-}"
    "$PYTHON" benchmarks/train_multi_gpu.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/benchmark.txt"
    bench=${PIPESTATUS[0]}
    echo "benchmark: exit ${bench} (${SECONDS}s)"
    [ "$status" = 0 ] && status=$bench
fi
exit "$status"
