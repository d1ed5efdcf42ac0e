"""Attention alone on the GPU: tinyllm's tensor-core flash kernels, tinyllm's cuBLAS blockwise
path, and PyTorch's scaled_dot_product_attention, forward and backward, bfloat16 operands.

    python benchmarks/attention_gpu.py                       # GPT-2-small's shape: 16 x 12 x 1024 x 64
    python benchmarks/attention_gpu.py --batch 64 --heads 6 --T 256

FLOPs: forward 4 B H T S D (two products), halved under causal masking; backward 2.5x the
forward (five products), as FlashAttention counts them. Median of --repeats timed calls.
"""

import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(fn, repeats):
    import cupy as cp
    fn()
    times = []
    for _ in range(repeats):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()

    import cupy as cp

    from autograd import backend
    from autograd.fast.cuda import kernels

    B, H, T, D = args.batch, args.heads, args.T, args.D
    bf16 = backend.bfloat16()
    rng = cp.random.default_rng(0)
    q, k, v, g = (rng.standard_normal((B, H, T, D), dtype=np.float32) for _ in range(4))
    ql, kl, vl = (a.astype(bf16) for a in (q, k, v))
    scale = 1 / np.sqrt(D)
    fwd_flops = 4 * B * H * T * T * D / 2
    print(f"attention B={B} H={H} T={T} D={D} causal, bfloat16 operands; "
          f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    print(f"{'':28s} {'forward ms':>10s} {'TFLOP/s':>8s} {'backward ms':>11s} {'TFLOP/s':>8s}")

    def row(name, f, b):
        tf, tb = timed(f, args.repeats), timed(b, args.repeats)
        print(f"{name:28s} {tf:10.3f} {fwd_flops / tf / 1e9:8.1f} {tb:11.3f} {2.5 * fwd_flops / tb / 1e9:8.1f}")

    for name, flash in (("tinyllm flash (tensor cores)", "1"), ("tinyllm cuBLAS blockwise", "0")):
        os.environ["TINYLLM_FLASH"] = flash
        y, lse = kernels.attention_forward(ql, kl, vl, True, scale)
        row(name, lambda: kernels.attention_forward(ql, kl, vl, True, scale),
            lambda: kernels.attention_backward(ql, kl, vl, y, lse, g, True, scale))
    os.environ.pop("TINYLLM_FLASH")

    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("PyTorch: not installed")
        return
    tq, tk, tv = (torch.as_tensor(a, device="cuda").to(torch.bfloat16).requires_grad_() for a in (q, k, v))
    tg = torch.as_tensor(g, device="cuda").to(torch.bfloat16)
    out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

    def torch_bwd():
        torch.autograd.grad(out, (tq, tk, tv), tg, retain_graph=True)

    row(f"PyTorch {torch.__version__} sdpa",
        lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True), torch_bwd)


if __name__ == "__main__":
    main()
