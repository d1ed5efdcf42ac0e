#!/usr/bin/env bash
# Run the whole test suite on a CUDA machine, straight from the checkout (nothing installed).
#
# The tests are parametrized over devices (autograd.testing.device_params): on a machine where
# CuPy sees a GPU, every "cuda" case runs; elsewhere those cases skip with a reason. The GPU
# machine has CuPy, ml_dtypes, numpy, regex, pytest, hypothesis and torch preinstalled, and no
# package index, so this script only sets PYTHONPATH and calls pytest.
#
#   scripts/gpu-check.sh              # the whole suite, hypothesis profile "ci"
#   HYPOTHESIS_PROFILE=thorough scripts/gpu-check.sh tests/test_ops.py
#
# Prints pytest's summary line and exits with pytest's status.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}

"$PYTHON" - <<'PY'
import numpy, autograd.backend as b
ok = b.cuda_available()
print(f"numpy {numpy.__version__}; CUDA available: {ok}", end="")
if ok:
    cp = b.cupy_module()
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"; cupy {cp.__version__}; GPU 0: {name}")
else:
    print("  (the cuda test cases will be skipped)")
PY

log=$(mktemp)
xml=$(mktemp)
"$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$xml" "${@:-tests}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo "gpu-check summary: $(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$log" | tail -1)"
# the fast paths against their references (tests/test_fast.py), CPU and CUDA cases apart
"$PYTHON" - "$xml" <<'PY'
import sys, xml.etree.ElementTree as ET
counts = {}
for case in ET.parse(sys.argv[1]).iter("testcase"):
    if not case.get("classname", "").endswith("test_fast") or "[" not in case.get("name", ""):
        continue
    device = "cuda" if "CUDA-" in case.get("name") else "cpu"
    outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
    counts.setdefault(device, {}).setdefault(outcome, 0)
    counts[device][outcome] += 1
for device, c in sorted(counts.items()):
    print(f"gpu-check fast paths vs reference ({device}): " + ", ".join(f"{n} {k}" for k, n in sorted(c.items())))
PY
rm -f "$log" "$xml"

# ---- GPU benchmarks -----------------------------------------------------------------------------
# After the tests, so a failing test still reports first. GPU_CHECK_BENCH=0 skips them;
# BENCH_ARGS passes options to benchmarks/train_gpu.py (e.g. "--modes tf32 --steps 5").
if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
    echo "---- benchmarks/train_gpu.py"
    "$PYTHON" benchmarks/train_gpu.py ${BENCH_ARGS:-}
fi
# ------------------------------------------------------------------------------------------------

exit "$status"
