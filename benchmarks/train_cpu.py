"""CPU training throughput: tinyllm against the same model in PyTorch (eager), in one run.

A full training step on both sides: forward, cross-entropy, backward, global-norm clip at 1.0,
AdamW (decoupled decay, no decay on vectors), zero grads. Tokens/s = batch * block / step time,
the median over the timed steps after warmup steps. The PyTorch model below is written to
match tinyllm's (same layers, shapes and tied embeddings; its own random weights).
tinyllm's step is the one `tinyllm train` runs (tinyllm.train.accumulate_grads and
apply_update), in the same mode: with data_threads "auto" on 2+ cores each batch is split over
threads, 1 BLAS thread each; the "tinyllm mode" column says which (shards x BLAS threads).

    python benchmarks/train_cpu.py                 # both sizes
    python benchmarks/train_cpu.py --steps 5 --only laptop
    python benchmarks/train_cpu.py --profile       # cProfile of tinyllm's step
    python benchmarks/train_cpu.py --threads 1     # NumPy's BLAS and torch on 1 thread each
    python benchmarks/train_cpu.py --data-threads 1  # tinyllm's batch not split (BLAS threads only)
    python benchmarks/train_cpu.py --monitor       # the cost of tinyllm train --monitor

--monitor times tinyllm's step with the training-health monitor (tinyllm.monitor) on every
step and off, alternating on the same model (so both see the same load), and prints the cost;
PyTorch is left out.

As `tinyllm train` does on the CPU, the process first asks glibc's malloc to keep freed memory
for reuse (`tinyllm.perf.reuse_freed_memory`; it applies to both libraries here);
--default-malloc leaves malloc as it is.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import autograd
from autograd.optim import AdamW
from tinyllm.config import preset_config
from tinyllm.model import GPT
from tinyllm import perf
from tinyllm.train import accumulate_grads, apply_update, blas_thread_count, shard_count
from machine import cpu_model  # benchmarks/machine.py

# (preset, overrides, batch, block): the laptop preset as `tinyllm train` runs it, and the
# nanoGPT shakespeare_char-sized model (6 x 384, context 256) at a CPU-sized batch, no dropout.
CASES = {
    "laptop": ("laptop", dict(vocab_size=1025), 16, 128),
    "shakespeare-char": ("shakespeare-char", dict(vocab_size=65, dropout=0.0), 8, 256),
}


def torch_model(cfg):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(cfg.d_model))
            self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.bias and cfg.norm == "layer" else None

        def forward(self, x):
            if cfg.norm == "rms":
                return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * self.weight
            return F.layer_norm(x, (cfg.d_model,), self.weight, self.bias, cfg.norm_eps)

    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2).float() / D))
    ang = torch.outer(torch.arange(cfg.context_length).float(), inv)
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # rotate-half, x (B, H, T, D)
        T = x.shape[2]
        c, s = cos[:T], sin[:T]
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            d, H, Hkv = cfg.d_model, cfg.n_heads, cfg.n_kv_heads
            self.norm1, self.norm2 = Norm(), Norm()
            self.wq = nn.Linear(d, H * D, bias=cfg.bias)
            self.wk = nn.Linear(d, Hkv * D, bias=cfg.bias)
            self.wv = nn.Linear(d, Hkv * D, bias=cfg.bias)
            self.wo = nn.Linear(H * D, d, bias=cfg.bias)
            self.w1 = nn.Linear(d, cfg.d_ff, bias=cfg.bias)
            self.w3 = nn.Linear(d, cfg.d_ff, bias=cfg.bias) if cfg.mlp == "swiglu" else None
            self.w2 = nn.Linear(cfg.d_ff, d, bias=cfg.bias)

        def forward(self, x):
            B, T, _ = x.shape
            h = self.norm1(x)
            q = self.wq(h).view(B, T, cfg.n_heads, D).transpose(1, 2)
            k = self.wk(h).view(B, T, cfg.n_kv_heads, D).transpose(1, 2)
            v = self.wv(h).view(B, T, cfg.n_kv_heads, D).transpose(1, 2)
            if cfg.positions == "rope":
                q, k = rope(q), rope(k)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=cfg.n_kv_heads != cfg.n_heads)
            x = x + self.wo(y.transpose(1, 2).reshape(B, T, -1))
            h = self.norm2(x)
            if self.w3 is not None:
                h = F.silu(self.w1(h)) * self.w3(h)
            else:
                h = F.gelu(self.w1(h), approximate="tanh")
            return x + self.w2(h)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos = nn.Embedding(cfg.context_length, cfg.d_model) if cfg.positions == "learned" else None
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.n_layers))
            self.norm = Norm()
            for p in self.parameters():
                if p.ndim == 2:
                    nn.init.normal_(p, std=0.02)

        def forward(self, idx, targets):
            x = self.tok(idx)
            if self.pos is not None:
                x = x + self.pos.weight[: idx.shape[1]]
            for b in self.blocks:
                x = b(x)
            logits = self.norm(x) @ self.tok.weight.T
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    return Model()


def batches(vocab, B, T, n, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, vocab, (B, T)), rng.integers(0, vocab, (B, T))) for _ in range(n)]


def time_steps(step, data, warmup):
    times = []
    for i, (x, y) in enumerate(data):
        t0 = time.perf_counter()
        step(x, y)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_monitor(cfg, B, T, steps, warmup, shards):
    """Median step time with the monitor off and on (every step), alternating."""
    from tinyllm.monitor import Monitor

    autograd.manual_seed(0)
    model = GPT(cfg)
    params = model.parameters()
    opt = AdamW(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    monitor = Monitor(model)
    times = {False: [], True: []}
    for i, (x, y) in enumerate(batches(cfg.vocab_size, B, T, 2 * (steps + warmup))):
        on = bool(i % 2)
        t0 = time.perf_counter()
        if on:
            monitor.begin()
        accumulate_grads(model, params, [(x, y)], shards)
        if on:
            monitor.before_update()
        apply_update(params, opt, clip=1.0)
        if on:
            monitor.end()
        if i >= 2 * warmup:
            times[on].append(time.perf_counter() - t0)
    return statistics.median(times[False]), statistics.median(times[True]), model


def bench_tinyllm(cfg, B, T, steps, warmup, shards):
    autograd.manual_seed(0)
    model = GPT(cfg)
    params = model.parameters()
    opt = AdamW(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)

    def step(x, y):  # what Run.train_step does with one micro-batch
        loss = accumulate_grads(model, params, [(x, y)], shards)
        apply_update(params, opt, clip=1.0)
        return loss

    return time_steps(step, batches(cfg.vocab_size, B, T, steps + warmup), warmup), step, model


def bench_torch(cfg, B, T, steps, warmup):
    import torch

    torch.manual_seed(0)
    model = torch_model(cfg)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)

    def step(x, y):
        loss = model(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    n = sum(p.numel() for p in model.parameters())
    return time_steps(step, batches(cfg.vocab_size, B, T, steps + warmup), warmup), n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", choices=list(CASES))
    ap.add_argument("--profile", action="store_true",
                    help="cProfile tinyllm's step (the main thread's work: with a split batch, "
                         "its first slice; --data-threads 1 for the whole batch)")
    ap.add_argument("--threads", type=int, help="threads for both (NumPy's BLAS and torch)")
    ap.add_argument("--data-threads", default="auto", type=lambda v: v if v == "auto" else int(v),
                    help="tinyllm's data_threads setting, as in `tinyllm train` (default auto)")
    ap.add_argument("--monitor", action="store_true",
                    help="time tinyllm's step with the training-health monitor off and on")
    ap.add_argument("--default-malloc", action="store_true",
                    help="do not call reuse_freed_memory (glibc returns large blocks to the OS)")
    args = ap.parse_args()
    reuse = False if args.default_malloc else perf.reuse_freed_memory()
    if args.threads:
        from tinyllm.train import set_blas_threads

        set_blas_threads(args.threads)
    try:
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        threads = torch.get_num_threads()
    except ImportError:
        torch, threads = None, None
    print(f"# {cpu_model()}, nproc {os.cpu_count()}, numpy {np.__version__}"
          + (f", torch {torch.__version__} ({threads} threads)" if torch else ", no torch")
          + f", malloc {'keeps freed memory' if reuse else 'default'}, {time.strftime('%Y-%m-%d')}")
    if args.monitor:
        print("| model | params | batch x block | tinyllm mode | step, monitor off | step, "
              "monitor on | cost |")
        print("|---|---|---|---|---|---|---|")
    else:
        print("| model | params | batch x block | tinyllm mode | tinyllm tok/s | PyTorch tok/s "
              "| tinyllm / PyTorch |")
        print("|---|---|---|---|---|---|---|")
    for name, (preset, over, B, T) in CASES.items():
        if args.only and name != args.only:
            continue
        cfg = preset_config(preset, **over)
        shards = shard_count(args.data_threads, B, "cpu", cfg.dropout, args.threads)
        mode = f"{shards} x {1 if shards > 1 else blas_thread_count() or '?'}"
        if args.monitor:
            off, on, model = bench_monitor(cfg, B, T, args.steps, args.warmup, shards)
            print(f"| {name} ({cfg.n_layers}x{cfg.d_model}) | {model.num_parameters() / 1e6:.2f}M "
                  f"| {B} x {T} | {mode} | {1e3 * off:.1f} ms | {1e3 * on:.1f} ms "
                  f"| {100 * (on - off) / off:+.1f}% |", flush=True)
            continue
        t_ours, step, model = bench_tinyllm(cfg, B, T, args.steps, args.warmup, shards)
        ours = B * T / t_ours
        if torch is not None:
            t_torch, _ = bench_torch(cfg, B, T, args.steps, args.warmup)
            theirs = B * T / t_torch
            ratio = f"{ours / theirs:.2f}x"
            theirs = f"{theirs:,.0f}"
        else:
            theirs, ratio = "-", "-"
        print(f"| {name} ({cfg.n_layers}x{cfg.d_model}, {'llama' if cfg.mlp == 'swiglu' else 'gpt2'}) "
              f"| {model.num_parameters() / 1e6:.2f}M | {B} x {T} | {mode} | {ours:,.0f} | {theirs} "
              f"| {ratio} |",
              flush=True)
        if args.profile:
            import cProfile
            import pstats

            data = batches(cfg.vocab_size, B, T, 3)
            prof = cProfile.Profile()
            prof.enable()
            for x, y in data:
                step(x, y)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
