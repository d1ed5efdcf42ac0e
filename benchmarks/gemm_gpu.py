"""The matrix products of a training step, one by one: tinyllm's cuBLAS calls against PyTorch's.

For each Linear of a case of train_gpu.py (q/k/v/o, the MLP's, one chunk of the fused LM head)
the three products of a step (forward y = x W^T, dx = g W, dW = g^T x) are timed on the GPU
(20 calls queued behind a busy kernel, so that they run back to back as in a captured step;
the median of 5 such runs) through `autograd.fast.cuda.kernels.gemm`:

    ex       cublasGemmStridedBatchedEx, algorithm left to cuBLAS (TINYLLM_GEMM=ex)
    lt       cuBLASLt, the heuristic's first algorithm (the default)
    tune     cuBLASLt, the fastest of the heuristic's candidates, timed once (TINYLLM_GEMM=tune)

each with the result in float32 (what the engine's ops hand on) and, for comparison, in the
operands' dtype; and PyTorch's `x @ w.t()` on the same shapes (its result in the operands'
dtype, as under autocast). TFLOP/s = 2 m n k / time.

    python benchmarks/gemm_gpu.py --case gpt2-small --mode bfloat16
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_gpu import CASES, model_config  # noqa: E402


def products(case):
    """[(name, m, n, k, trans_a, trans_b, a_shape, b_shape)]: the step's products as row-major
    op(a) @ op(b) of shape (m, n) with inner size k."""
    cfg = model_config(case)
    N = CASES[case]["batch"] * cfg.context_length
    d, f, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    hd = cfg.d_model // cfg.n_heads
    kv = (cfg.n_kv_heads or cfg.n_heads) * hd
    linears = [("wq/wo", N, d, d)] + ([("wk/wv", N, d, kv)] if kv != d else []) + [("w1" + ("/w3" if cfg.mlp == "swiglu" else ""), N, d, f),
               ("w2", N, f, d)]
    chunk = min(N, max(1, (1 << 26) // V))
    linears.append(("head chunk", chunk, d, V))
    out = []
    for name, rows, fin, fout in linears:
        out.append((f"{name} fwd", rows, fout, fin, False, True, (rows, fin), (fout, fin)))
        out.append((f"{name} dx", rows, fin, fout, False, False, (rows, fout), (fout, fin)))
        out.append((f"{name} dW", fout, fin, rows, True, False, (rows, fout), (rows, fin)))
    return out


_spin = None


def timed(fn, repeats=20):
    """Seconds per call of fn on the GPU: the calls are queued behind a kernel that keeps the
    device busy for 5 ms, so they run back to back and the host's time to launch them (tens of
    microseconds in Python, as long as a small product itself) is not counted, as in a
    captured step."""
    global _spin
    import cupy as cp
    import numpy as np

    if _spin is None:
        _spin = cp.RawKernel(r"""
        extern "C" __global__ void spin(long long ticks) {
            long long start = clock64();
            while (clock64() - start < ticks) { }
        }""", "spin")
    rate = cp.cuda.runtime.getDeviceProperties(0)["clockRate"] * 1e3  # clock64 ticks per second
    for _ in range(3):
        fn()
    times = []
    for _ in range(5):
        _spin((1,), (1,), (np.int64(5e-3 * rate),))
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / repeats)
    return statistics.median(times) / 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="gpt2-small", choices=list(CASES))
    p.add_argument("--mode", default="bfloat16", choices=["bfloat16", "tf32"])
    args = p.parse_args()

    import numpy as np

    from autograd import amp, backend
    if not backend.cuda_available():
        print("gemm_gpu.py: needs CuPy and a CUDA GPU, and this machine has none", file=sys.stderr)
        sys.exit(2)
    import cupy as cp
    from autograd.fast.cuda import kernels

    amp.set_precision(args.mode)
    low = backend.bfloat16() if args.mode == "bfloat16" else np.dtype(np.float32)
    try:
        import torch
        torch.backends.cuda.matmul.allow_tf32 = args.mode == "tf32"
    except ImportError:
        torch = None
    rng = cp.random.default_rng(0)
    variants = ["ex", "lt", "tune"]
    outs = [np.float32] + ([low] if low != np.float32 else [])
    cols = [f"{v} {np.dtype(o).name}" for v in variants for o in outs] + (["torch"] if torch else [])
    print(f"case {args.case}, mode {args.mode}; ms (TFLOP/s)")
    print("| product | m x n x k | " + " | ".join(cols) + " |")
    print("|" + " --- |" * (len(cols) + 2))
    totals = dict.fromkeys(cols, 0.0)
    for name, m, n, k, ta, tb, ashape, bshape in products(args.case):
        a = rng.standard_normal(ashape, dtype=np.float32).astype(low)
        b = rng.standard_normal(bshape, dtype=np.float32).astype(low)
        row = []
        flops = 2 * m * n * k
        for v in variants:
            os.environ["TINYLLM_GEMM"] = v
            for o in outs:
                t = timed(lambda: kernels.gemm(a, b, ta, tb, out_dtype=o))
                totals[f"{v} {np.dtype(o).name}"] += t
                row.append(f"{t * 1e3:.3f} ({flops / t / 1e12:.0f})")
        if torch is not None:
            tdt = torch.bfloat16 if args.mode == "bfloat16" else torch.float32
            ta_, tb_ = (torch.randn(z.shape, dtype=tdt, device="cuda") for z in (a, b))
            ta_ = ta_.t() if ta else ta_
            tb_ = tb_.t() if tb else tb_
            t = timed(lambda: ta_ @ tb_)
            totals["torch"] += t
            row.append(f"{t * 1e3:.3f} ({flops / t / 1e12:.0f})")
        print(f"| {name} | {m} x {n} x {k} | " + " | ".join(row) + " |")
    print("| **sum** | | " + " | ".join(f"{totals[c] * 1e3:.2f}" for c in cols) + " |")
    os.environ.pop("TINYLLM_GEMM")


if __name__ == "__main__":
    main()
