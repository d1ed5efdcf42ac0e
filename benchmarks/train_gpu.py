"""Training throughput on the GPU: tinyllm against the same models in PyTorch, eager and compiled.

Two models (CASES; both frameworks build each from the same tinyllm preset and overrides),
each measured per precision mode:

    gpt2-small        Llama flavour at GPT-2-small size (12 layers, 12 heads, 768 wide, context
                      1024, vocabulary 50,304, tied embeddings, SwiGLU hidden 2048, no dropout);
                      batch 16 x 1024 tokens; AdamW lr 3e-4, betas (0.9, 0.95), weight decay 0.1.
    shakespeare-char  tinyllm's preset "shakespeare-char", GPT-2 flavour (nanoGPT's
                      train_shakespeare_char: 6 layers, 6 heads, 384 wide, context 256,
                      vocabulary 65, learned positions, LayerNorm and Linear without biases,
                      tanh GELU with 4 x 384 hidden, tied embeddings, dropout 0.2 on the
                      embeddings, the attention probabilities and each residual branch's output);
                      batch 64 x 256 tokens; AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1.

Each step is a full training step (forward, backward, clip the gradient norm at 1.0, AdamW),
with dropout on where the model has it. The frameworks: `torch` (eager PyTorch), `torch-compile`
(the same PyTorch model wrapped in torch.compile, default mode, compiled during the warmup
steps, at least 3), `tinyllm` (the step captured as a CUDA graph after the warmup steps and
replayed, as `tinyllm train` runs it on a GPU; its peak memory counts the graph's whole pool)
and `tinyllm-eager` (the same step uncaptured: every kernel launched from Python). Each (case, framework, mode) runs in its own process so that
its peak memory is its own. Prints, per case, tokens/s of each framework, tinyllm's ratio to
eager and to compiled PyTorch, the peak memory of each and tinyllm's MFU. A framework that fails
(e.g. torch.compile without Triton) is reported, and its columns read "—".

    python benchmarks/train_gpu.py                       # both cases: gpt2-small in float32,
                                                         # tf32, bfloat16; shakespeare-char in bfloat16
    python benchmarks/train_gpu.py --case gpt2-small --modes tf32 --steps 10 --batch 8
    python benchmarks/train_gpu.py --case shakespeare-char --small-modes bfloat16,tf32
    python benchmarks/train_gpu.py --frameworks torch,tinyllm --json results.jsonl

--modes and --batch apply to gpt2-small, --small-modes and --small-batch to shakespeare-char.
--json writes every result (one JSON line per case, framework and mode).

MFU counts FLOPs per token against the H100 SXM's dense peaks (float32 67, TF32 495, bfloat16
989 TFLOP/s): tinyllm's model.flops_per_token(), and for PyTorch the same 6N + 12 L T d
(N: parameters without the position table, tied embeddings once).
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
FRAMEWORKS = ("torch", "torch-compile", "tinyllm", "tinyllm-eager")

# Each case: the tinyllm preset and its overrides (the model of both frameworks), the batch
# (sequences of the full context) and the optimizer's settings.
CASES = {
    "gpt2-small": dict(
        preset="llama-gpt2-small",
        overrides=dict(n_layers=12, n_heads=12, d_model=768, context_length=1024,
                       vocab_size=50304, d_ff=2048, tie_embeddings=True),
        batch=16, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, clip=1.0,
    ),
    "shakespeare-char": dict(  # examples/shakespeare_char_gpu.toml's model and optimizer
        preset="shakespeare-char",
        overrides=dict(vocab_size=65),  # the preset's (nanoGPT's 65 characters)
        batch=64, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, clip=1.0,
    ),
}


def model_config(case):
    """The tinyllm ModelConfig of a case (what both frameworks build)."""
    from tinyllm.config import preset_config

    c = CASES[case]
    return preset_config(c["preset"], **c["overrides"])


def tinyllm_model(case, device="cuda"):
    """tinyllm's GPT of a case, on `device`."""
    from tinyllm.model import GPT

    c = CASES[case]
    return GPT.from_preset(c["preset"], **c["overrides"], device=device)


# ---- tinyllm --------------------------------------------------------------------------------------

def profiled_step(step, profiler, synchronize):
    """One more step between cudaProfilerStart and Stop, for `ncu --profile-from-start off`
    (benchmarks/kernel_table.py sums what it records by kernel)."""
    profiler.start()
    step()
    synchronize()
    profiler.stop()


def run_tinyllm(case, mode, batch, steps, warmup, checkpoint_blocks=False, graph=True,
                profile_step=False):
    import cupy as cp
    import numpy as np

    import autograd
    from autograd import amp, optim

    pool = cp.get_default_memory_pool()
    peak = [0]

    def tracking_malloc(size):  # the pool's allocator, remembering the most bytes in use
        mem = pool.malloc(size)
        peak[0] = max(peak[0], pool.used_bytes())
        return mem

    cp.cuda.set_allocator(tracking_malloc)
    c = CASES[case]
    autograd.manual_seed(0)
    model = tinyllm_model(case)
    model.checkpoint_blocks = checkpoint_blocks
    amp.set_precision(mode)
    opt = optim.AdamW(model.parameters(), lr=c["lr"], betas=c["betas"], weight_decay=c["weight_decay"])
    params = model.parameters()
    rng = np.random.default_rng(0)
    T, V = model.config.context_length, model.config.vocab_size
    data = cp.asarray(rng.integers(0, V, (batch, T + 1)))
    x, y = data[:, :-1], data[:, 1:]

    def step():  # one training step, uncaptured
        _, loss = model(x, y, return_logits=False)
        loss.backward()
        optim.clip_grad_norm(params, c["clip"])
        opt.step()
        opt.zero_grad()
        return loss.data

    def device_step(x, y):  # the same step with the gradient norm kept on the GPU (a graph's)
        _, loss = model(x, y, return_logits=False)
        loss.backward()
        norm_sq = optim.clip_grad_norm_on_device(params, 0)  # the norm; AdamW's kernel clips
        opt.step(norm_sq=norm_sq + loss.data * 0, max_norm=c["clip"])
        opt.zero_grad()
        return loss.data, norm_sq

    for _ in range(warmup):
        step()
    cp.cuda.Device().synchronize()
    graph_bytes = 0
    if graph:  # tinyllm train's way: captured after uncaptured steps, then replayed
        from autograd.fast.cuda.graph import StepGraph

        pool.free_all_blocks()
        g = StepGraph(device_step, [cp.ascontiguousarray(x), cp.ascontiguousarray(y)])
        g.capture()
        persistent = pool.used_bytes()

        def step():
            return g.launch()[0]

        step()
        graph_bytes = persistent + g.pool.total_bytes()  # the graph's own pool, all of it
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss = float(loss)
    cp.cuda.Device().synchronize()
    dt = (time.perf_counter() - t0) / steps
    if profile_step:
        profiled_step(step, cp.cuda.profiler, cp.cuda.Device().synchronize)
    return dict(seconds_per_step=dt, peak_bytes=max(peak[0], graph_bytes), loss=loss,
                flops_per_token=model.flops_per_token(), params=model.num_params(non_embedding=False))


# ---- PyTorch ----------------------------------------------------------------------------------------

def torch_model(torch, cfg, fused_attention=True):
    """tinyllm's GPT (model.py) of ModelConfig `cfg` in PyTorch: pre-norm blocks, either flavour.

    llama: RoPE (rotate-half), RMSNorm, SwiGLU.  gpt2: learned positions added to the token
    embeddings, LayerNorm, tanh GELU.  Biases (Linear and LayerNorm) as cfg.bias; dropout
    cfg.dropout on the embeddings, the attention probabilities and each branch's output;
    the LM head tied to the token embeddings or not, as cfg.tie_embeddings; GPT-2's init.
    """
    nn, F = torch.nn, torch.nn.functional
    L, H, d, V, T, dff = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.vocab_size, cfg.context_length, cfg.d_ff
    hd, p_drop, eps = d // H, cfg.dropout, cfg.norm_eps
    assert cfg.n_kv_heads == H and cfg.norm_position == "pre" and cfg.init == "gpt2"
    assert cfg.positions in ("rope", "learned") and cfg.rope_style == "half"

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * self.weight

    def norm():
        return RMSNorm() if cfg.norm == "rms" else nn.LayerNorm(d, eps=eps, bias=cfg.bias)

    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(torch.arange(T).float(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos.to(x.device, x.dtype) + torch.cat([-x2, x1], -1) * sin.to(x.device, x.dtype)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2 = norm(), norm()
            self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=cfg.bias) for _ in range(4))
            self.w1, self.w2 = nn.Linear(d, dff, bias=cfg.bias), nn.Linear(dff, d, bias=cfg.bias)
            if cfg.mlp == "swiglu":
                self.w3 = nn.Linear(d, dff, bias=cfg.bias)
            self.drop = nn.Dropout(p_drop)

        def forward(self, x):
            B, T_, _ = x.shape
            h = self.n1(x)
            q, k, v = (w(h).view(B, T_, H, hd).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
            if cfg.positions == "rope":
                q, k = rope(q), rope(k)
            p = p_drop if self.training else 0.0
            if fused_attention:
                a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            else:
                s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
                s = s.masked_fill(torch.ones(T_, T_, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
                a = F.dropout(torch.softmax(s, -1), p) @ v
            x = x + self.drop(self.wo(a.transpose(1, 2).reshape(B, T_, d)))
            h = self.n2(x)
            if cfg.mlp == "swiglu":
                h = F.silu(self.w1(h)) * self.w3(h)
            else:
                h = F.gelu(self.w1(h), approximate="tanh")
            return x + self.drop(self.w2(h))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, d)
            self.pos = nn.Embedding(T, d) if cfg.positions == "learned" else None
            self.drop = nn.Dropout(p_drop)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.norm = norm()
            self.head = None if cfg.tie_embeddings else nn.Linear(d, V, bias=False)

        def forward(self, idx, targets):
            x = self.emb(idx)
            if self.pos is not None:
                x = x + self.pos.weight[: idx.shape[1]]
            x = self.drop(x)
            for b in self.blocks:
                x = b(x)
            head = self.emb.weight if self.head is None else self.head.weight
            logits = F.linear(self.norm(x), head)
            return F.cross_entropy(logits.float().view(-1, V), targets.reshape(-1))

    model = GPT()
    for name, p in model.named_parameters():  # GPT-2's init, as tinyllm's: N(0, 0.02), norms 1
        if p.ndim == 2:
            std = 0.02 / math.sqrt(2 * L) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            torch.nn.init.normal_(p, 0.0, std)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(p)
    return model


def run_torch(case, mode, batch, steps, warmup, compile=False, fused_attention=True,
              profile_step=False):
    import torch

    c, cfg = CASES[case], model_config(case)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = mode == "tf32"
    model = torch_model(torch, cfg, fused_attention).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], betas=c["betas"],
                            weight_decay=c["weight_decay"], fused=True)
    n = sum(p.numel() for p in model.parameters())
    n_pos = model.pos.weight.numel() if model.pos is not None else 0
    if compile:
        model = torch.compile(model)  # compiled on the first warmup step
        warmup = max(warmup, 3)
    T = cfg.context_length
    data = torch.randint(0, cfg.vocab_size, (batch, T + 1), device="cuda")
    x, y = data[:, :-1], data[:, 1:]
    low = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(mode)

    def step():
        with torch.autocast("cuda", dtype=low, enabled=low is not None):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c["clip"])
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
    if profile_step:
        profiled_step(step, torch.cuda.profiler, torch.cuda.synchronize)
    flops = 6 * (n - n_pos) + 12 * cfg.n_layers * T * cfg.d_model
    return dict(seconds_per_step=dt, peak_bytes=torch.cuda.max_memory_allocated(), loss=loss,
                flops_per_token=flops, params=n)


# ---- driver -----------------------------------------------------------------------------------------

def single(args):
    if args.framework in ("tinyllm", "tinyllm-eager"):
        result = run_tinyllm(args.case, args.mode, args.batch, args.steps, args.warmup,
                             args.checkpoint_blocks, graph=args.framework == "tinyllm"
                             and not args.checkpoint_blocks, profile_step=args.profile_step)
    elif args.framework in ("torch", "torch-compile"):
        result = run_torch(args.case, args.mode, args.batch, args.steps, args.warmup,
                           compile=args.framework == "torch-compile", profile_step=args.profile_step)
    else:
        raise SystemExit(f"unknown framework {args.framework!r}; known: {', '.join(FRAMEWORKS)}")
    result.update(case=args.case, framework=args.framework, mode=args.mode, batch=args.batch)
    print("RESULT " + json.dumps(result))


def measure(args, case, mode, fw, batch):
    """Run one (case, framework, mode) in its own process; its result, or None if it failed."""
    cmd = [sys.executable, __file__, "--single", fw, mode, "--case", case, "--batch", str(batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--checkpoint-blocks"] if args.checkpoint_blocks else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        print(f"{case} {fw} {mode}: failed\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}", flush=True)
        return None
    r = json.loads(line[-1][7:])
    r["tokens_per_s"] = batch * model_config(case).context_length / r["seconds_per_step"]
    r["tflops"] = r["tokens_per_s"] * r["flops_per_token"] / 1e12
    r["mfu"] = r["tflops"] / PEAK_TFLOPS[mode]
    print(f"{case:16s} {fw:13s} {mode:9s} {r['tokens_per_s']:>10,.0f} tok/s  {r['tflops']:6.1f} TFLOP/s  "
          f"MFU {100 * r['mfu']:5.1f}%  peak {r['peak_bytes'] / 2**30:6.2f} GiB  loss {r['loss']:.3f}",
          flush=True)
    return r


def print_table(case, modes, results):
    def tok(r):
        return "—" if r is None else f"{r['tokens_per_s']:,.0f}"

    def gib(r):
        return "—" if r is None else f"{r['peak_bytes'] / 2**30:.1f}"

    def ratio(r, base):
        return "—" if r is None or base is None else f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}"

    print(f"\n{case}:")
    print("| mode | PyTorch eager tok/s | torch.compile tok/s | tinyllm tok/s | tinyllm/eager | "
          "tinyllm/compile | tinyllm uncaptured tok/s | eager peak GiB | compile peak GiB | "
          "tinyllm peak GiB | tinyllm MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode in modes:
        by = {r["framework"]: r for r in results if r["case"] == case and r["mode"] == mode}
        e, c, m, u = (by.get(fw) for fw in FRAMEWORKS)
        mfu = "—" if m is None else f"{100 * m['mfu']:.1f}%"
        print(f"| {mode} | {tok(e)} | {tok(c)} | {tok(m)} | {ratio(m, e)} | {ratio(m, c)} | "
              f"{tok(u)} | {gib(e)} | {gib(c)} | {gib(m)} | {mfu} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="all", choices=[*CASES, "all"])
    p.add_argument("--modes", default="float32,tf32,bfloat16", help="gpt2-small's precision modes")
    p.add_argument("--small-modes", default="bfloat16", help="shakespeare-char's precision modes")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--batch", type=int, help=f"gpt2-small's batch (default {CASES['gpt2-small']['batch']})")
    p.add_argument("--small-batch", type=int,
                   help=f"shakespeare-char's batch (default {CASES['shakespeare-char']['batch']})")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (torch-compile: at least 3)")
    p.add_argument("--single", nargs=2, metavar=("FRAMEWORK", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results to this file (JSON lines)")
    p.add_argument("--profile-step", action="store_true",
                   help="with --single: one more step between cudaProfilerStart and Stop (for ncu)")
    p.add_argument("--checkpoint-blocks", action="store_true",
                   help="tinyllm with activation checkpointing (each block recomputed in backward)")
    args = p.parse_args()
    if args.profile_step and not args.single:
        p.error("--profile-step profiles one run: it goes with --single FRAMEWORK MODE")
    if args.single:
        args.framework, args.mode = args.single
        if args.batch is None:
            args.batch = CASES[args.case]["batch"]
        return single(args)

    cases = list(CASES) if args.case == "all" else [args.case]
    settings = {"gpt2-small": (args.modes, args.batch),  # each case's modes and batch
                "shakespeare-char": (args.small_modes, args.small_batch)}
    results = []
    for case in cases:
        modes, batch = settings[case]
        batch = batch or CASES[case]["batch"]
        for mode in modes.split(","):
            for fw in args.frameworks.split(","):
                r = measure(args, case, mode, fw, batch)
                if r is not None:
                    results.append(r)
    for case in cases:
        print_table(case, settings[case][0].split(","), results)
    if args.json:
        with open(args.json, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
