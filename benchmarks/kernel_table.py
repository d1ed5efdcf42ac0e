"""The GPU time of one training step, summed by kernel, from Nsight Compute's CSV.

Each kernel's duration as the GPU ran it (no host in it), for the step that
`train_gpu.py --single FRAMEWORK MODE --profile-step` runs between cudaProfilerStart and
Stop; a captured step (tinyllm's CUDA graph) is profiled node by node:

    ncu --profile-from-start off --graph-profiling node --clock-control none \\
        --metrics gpu__time_duration.sum --csv \\
        python benchmarks/train_gpu.py --single tinyllm bfloat16 --case gpt2-small --profile-step > k.csv
    python benchmarks/kernel_table.py k.csv --top 30

Kernels are grouped by name with template arguments and parameter lists cut off (CuPy's
elementwise kernels are named after their operation and dtypes, cuBLAS's after the tile).
"""

import argparse
import collections
import csv
import re
import sys

_UNITS = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0}  # to ms


def short(name):
    """A kernel's name without its parameter list and template arguments."""
    name = re.sub(r"\(.*$", "", name)
    depth, out = 0, []
    for ch in name:
        depth += ch == "<"
        if depth == 0:
            out.append(ch)
        depth -= ch == ">"
    return "".join(out).strip()[:90]


def read(path):
    """[(kernel name, ms)] of every profiled kernel in the CSV; ValueError naming the file and
    line when it holds no kernel durations or a unit this script does not know."""
    with open(path, newline="") as f:
        lines = [(n, ln) for n, ln in enumerate(f, 1) if ln.startswith('"')]  # ncu's notes are not CSV
    rows = []
    for (n, _), r in zip(lines[1:], csv.DictReader(ln for _, ln in lines)):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = r.get("Metric Unit")
        try:
            rows.append((short(r["Kernel Name"]), float(r["Metric Value"].replace(",", "")) * _UNITS[unit]))
        except (KeyError, ValueError, AttributeError):
            raise ValueError(f"{path}, line {n}: a kernel row without a name, a number or a "
                             f"known unit (unit {unit!r})") from None
    if not rows:
        raise ValueError(f"{path}: no gpu__time_duration.sum rows (expected the CSV of "
                         "ncu --metrics gpu__time_duration.sum --csv)")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    if args.top < 1:
        p.error(f"--top must be a positive number of kernels, not {args.top}")
    try:
        rows = read(args.csv)
    except (OSError, ValueError) as e:
        print(f"kernel_table.py: {e}", file=sys.stderr)
        sys.exit(2)
    total = sum(ms for _, ms in rows)
    ms = collections.defaultdict(float)
    calls = collections.Counter()
    for name, t in rows:
        ms[name] += t
        calls[name] += 1
    print(f"{len(rows)} kernels, {total:.2f} ms of GPU time")
    print("| kernel | calls | ms | share |")
    print("| --- | --- | --- | --- |")
    for name, t in sorted(ms.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| `{name}` | {calls[name]} | {t:.2f} | {100 * t / total:.1f}% |")


if __name__ == "__main__":
    main()
