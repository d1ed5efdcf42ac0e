"""Training throughput on the GPU: tinyllm against the same model in PyTorch, per precision mode.

The model: Llama flavour at GPT-2-small size (12 layers, 12 heads, 768 wide, context 1024,
vocabulary 50,304, tied embeddings, SwiGLU hidden 2048); batch 16 x 1024 tokens; full steps
(forward, backward, clip at 1.0, AdamW). Each (framework, mode) runs in its own process so that
its peak memory is its own. Prints tokens/s, TFLOP/s, MFU and peak memory for both and the ratio.

    python benchmarks/train_gpu.py                       # float32, tf32, bfloat16
    python benchmarks/train_gpu.py --modes tf32 --steps 10 --batch 8

MFU counts 6N + 12 L T d FLOPs per token (N: parameters without the position table) against
the H100 SXM's dense peaks (float32 67, TF32 495, bfloat16 989 TFLOP/s).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PEAK_TFLOPS = {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4}
CONFIG = dict(n_layers=12, n_heads=12, d_model=768, context_length=1024, vocab_size=50304, d_ff=2048)


# ---- tinyllm --------------------------------------------------------------------------------------

def run_tinyllm(mode, batch, steps, warmup, checkpoint_blocks=False):
    import cupy as cp
    import numpy as np

    import autograd
    from autograd import amp, optim
    from tinyllm.model import GPT

    pool = cp.get_default_memory_pool()
    peak = [0]

    def tracking_malloc(size):  # the pool's allocator, remembering the most bytes in use
        mem = pool.malloc(size)
        peak[0] = max(peak[0], pool.used_bytes())
        return mem

    cp.cuda.set_allocator(tracking_malloc)
    autograd.manual_seed(0)
    model = GPT.from_preset("llama-gpt2-small", **CONFIG, tie_embeddings=True, device="cuda")
    model.checkpoint_blocks = checkpoint_blocks
    amp.set_precision(mode)
    opt = optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    params = model.parameters()
    rng = np.random.default_rng(0)
    T = CONFIG["context_length"]
    data = cp.asarray(rng.integers(0, CONFIG["vocab_size"], (batch, T + 1)))
    x, y = data[:, :-1], data[:, 1:]

    def step():
        _, loss = model(x, y, return_logits=False)
        loss.backward()
        optim.clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad()
        return loss

    for _ in range(warmup):
        step()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss = loss.item()
    cp.cuda.Device().synchronize()
    dt = (time.perf_counter() - t0) / steps
    return dict(seconds_per_step=dt, peak_bytes=peak[0], loss=loss,
                flops_per_token=model.flops_per_token(), params=model.num_params(non_embedding=False))


# ---- PyTorch ----------------------------------------------------------------------------------------

def torch_model(torch, fused_attention):
    nn, F = torch.nn, torch.nn.functional
    L, H, d, V, T, dff = (CONFIG[k] for k in ("n_layers", "n_heads", "d_model", "vocab_size",
                                               "context_length", "d_ff"))
    hd = d // H

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(torch.arange(T).float(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos.to(x.device, x.dtype) + torch.cat([-x2, x1], -1) * sin.to(x.device, x.dtype)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2 = RMSNorm(), RMSNorm()
            self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))
            self.w1, self.w3 = nn.Linear(d, dff, bias=False), nn.Linear(d, dff, bias=False)
            self.w2 = nn.Linear(dff, d, bias=False)

        def forward(self, x):
            B, T_, _ = x.shape
            h = self.n1(x)
            q, k, v = (w(h).view(B, T_, H, hd).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
            q, k = rope(q), rope(k)
            if fused_attention:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
                s = s.masked_fill(torch.ones(T_, T_, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
                a = torch.softmax(s, -1) @ v
            x = x + self.wo(a.transpose(1, 2).reshape(B, T_, d))
            h = self.n2(x)
            return x + self.w2(F.silu(self.w1(h)) * self.w3(h))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, d)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.norm = RMSNorm()

        def forward(self, idx, targets):
            x = self.emb(idx)
            for b in self.blocks:
                x = b(x)
            logits = F.linear(self.norm(x), self.emb.weight)
            return F.cross_entropy(logits.float().view(-1, V), targets.reshape(-1))

    model = GPT()
    for name, p in model.named_parameters():  # GPT-2's init, as tinyllm's: N(0, 0.02), norms 1
        if p.ndim == 2:
            std = 0.02 / math.sqrt(2 * L) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            torch.nn.init.normal_(p, 0.0, std)
    return model


def run_torch(mode, batch, steps, warmup, fused_attention=True):
    import torch

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = mode == "tf32"
    model = torch_model(torch, fused_attention).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    T = CONFIG["context_length"]
    data = torch.randint(0, CONFIG["vocab_size"], (batch, T + 1), device="cuda")
    x, y = data[:, :-1], data[:, 1:]
    low = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(mode)

    def step():
        with torch.autocast("cuda", dtype=low, enabled=low is not None):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss = loss.item()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    n = sum(p.numel() for p in model.parameters())
    d, L, T = CONFIG["d_model"], CONFIG["n_layers"], CONFIG["context_length"]
    return dict(seconds_per_step=dt, peak_bytes=torch.cuda.max_memory_allocated(), loss=loss,
                flops_per_token=6 * n + 12 * L * T * d, params=n)


# ---- driver -----------------------------------------------------------------------------------------

def single(args):
    if args.framework == "tinyllm":
        result = run_tinyllm(args.mode, args.batch, args.steps, args.warmup, args.checkpoint_blocks)
    else:
        result = run_torch(args.mode, args.batch, args.steps, args.warmup)
    result.update(framework=args.framework, mode=args.mode, batch=args.batch)
    print("RESULT " + json.dumps(result))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="float32,tf32,bfloat16")
    p.add_argument("--frameworks", default="torch,tinyllm")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--single", nargs=2, metavar=("FRAMEWORK", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results to this file (JSON lines)")
    p.add_argument("--checkpoint-blocks", action="store_true",
                   help="tinyllm with activation checkpointing (each block recomputed in backward)")
    args = p.parse_args()
    if args.single:
        args.framework, args.mode = args.single
        return single(args)

    results = []
    for mode in args.modes.split(","):
        for fw in args.frameworks.split(","):
            cmd = [sys.executable, __file__, "--single", fw, mode, "--batch", str(args.batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            cmd += ["--checkpoint-blocks"] if args.checkpoint_blocks else []
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                print(f"{fw} {mode}: failed\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(line[-1][7:])
            r["tokens_per_s"] = args.batch * CONFIG["context_length"] / r["seconds_per_step"]
            r["tflops"] = r["tokens_per_s"] * r["flops_per_token"] / 1e12
            r["mfu"] = r["tflops"] / PEAK_TFLOPS[mode]
            results.append(r)
            print(f"{fw:8s} {mode:9s} {r['tokens_per_s']:>10,.0f} tok/s  {r['tflops']:6.1f} TFLOP/s  "
                  f"MFU {100 * r['mfu']:5.1f}%  peak {r['peak_bytes'] / 2**30:6.2f} GiB  "
                  f"loss {r['loss']:.3f}", flush=True)
    print("\n| mode | PyTorch tok/s | tinyllm tok/s | ratio | PyTorch peak GiB | tinyllm peak GiB | tinyllm MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode in args.modes.split(","):
        by = {r["framework"]: r for r in results if r["mode"] == mode}
        if len(by) == 2:
            t, m = by["torch"], by["tinyllm"]
            print(f"| {mode} | {t['tokens_per_s']:,.0f} | {m['tokens_per_s']:,.0f} | "
                  f"{m['tokens_per_s'] / t['tokens_per_s']:.2f} | {t['peak_bytes'] / 2**30:.1f} | "
                  f"{m['peak_bytes'] / 2**30:.1f} | {100 * m['mfu']:.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
