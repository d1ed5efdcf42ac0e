"""Generation speed on the CPU: cached vs uncached (ours) and PyTorch with a KV cache.

    python benchmarks/generate.py                  # both presets, 512 new tokens
    python benchmarks/generate.py --presets shakespeare-char --tokens 128
    python benchmarks/generate.py --full-uncached  # time every uncached step (slow for gpt2-small)

Every run: random weights (GPT-2 init) for the preset, float32, one sequence, a 16-token
prompt, greedy decoding (no sampling cost; the same tokens in all three). Tokens/s counts the
new tokens over the whole time, prefill included.

    cached     tinyllm.generate.decode_steps: prompt prefilled once, then one position per step
               against the KV cache; when the window is full (shakespeare-char: context 256 <
               16 + 512) it drops the oldest 64 positions (shift = context / 4) and prefills the
               192 + 1 kept ones again.
    uncached   nanoGPT's loop: a full forward over the last `context` tokens for every new token
               (logits of the last position only). For gpt2-small this costs minutes, so unless
               --full-uncached it is timed at every 16th step (the prompt grows by one token a
               step, so each sampled step stands for the 16 around it) and the total is 16 x the
               sum: an estimate, marked as such in the table.
    torch      a minimal PyTorch module in this file (same architecture: learned positions,
               LayerNorm, tanh-GELU MLP, tied embeddings) with a preallocated KV cache and the
               same sliding rule, weights copied from ours; its logits are checked against ours.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autograd  # noqa: E402
from autograd.tensor import no_grad  # noqa: E402
from tinyllm.generate import decode_steps  # noqa: E402
from tinyllm.model import GPT  # noqa: E402
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

PROMPT_LEN = 16


# ---- ours ------------------------------------------------------------------------------------------

def run_cached(model, prompt, n):
    t0 = time.perf_counter()
    tokens = [int(t[0]) for t, _ in decode_steps(model, prompt, max_new_tokens=n, temperature=0)]
    return time.perf_counter() - t0, tokens


def uncached_step(model, seq):
    ctx = model.config.context_length
    with no_grad():
        logits, _ = model(np.asarray([seq[-ctx:]]), last_only=True)
    return int(logits.data[0, -1].argmax())


def run_uncached(model, prompt, n, every=1):
    """Time every `every`-th step (all when every=1); returns (total time estimate, tokens).
    With every > 1 the tokens are not those of a real run (skipped steps append a dummy)."""
    seq, total = list(prompt[0]), 0.0
    out = []
    for step in range(n):
        if step % every == 0:
            t0 = time.perf_counter()
            nxt = uncached_step(model, seq)
            total += (time.perf_counter() - t0) * min(every, n - step)
        else:
            nxt = 0
        seq.append(nxt)
        out.append(nxt)
    return total, out


# ---- PyTorch -------------------------------------------------------------------------------------

def torch_model(our_model):
    import torch
    from torch import nn
    from torch.nn import functional as F

    cfg = our_model.config
    assert (cfg.positions, cfg.norm, cfg.mlp) == ("learned", "layer", "gelu") and cfg.tie_embeddings

    class Attn(nn.Module):
        def __init__(self, layer):
            super().__init__()
            d, b = cfg.d_model, cfg.bias
            self.wq, self.wk = nn.Linear(d, d, bias=b), nn.Linear(d, d, bias=b)
            self.wv, self.wo = nn.Linear(d, d, bias=b), nn.Linear(d, d, bias=b)
            self.layer = layer

        def forward(self, x, cache):
            B, T, _ = x.shape
            H, D = cfg.n_heads, cfg.head_dim

            def split(t):
                return t.view(B, T, H, D).transpose(1, 2)

            q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
            start = cache.length
            cache.k[self.layer][:, :, start:start + T] = k
            cache.v[self.layer][:, :, start:start + T] = v
            k = cache.k[self.layer][:, :, :start + T]
            v = cache.v[self.layer][:, :, :start + T]
            assert start == 0 or T == 1  # prefill from empty, or one step
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
            return self.wo(y.transpose(1, 2).reshape(B, T, H * D))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
            self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

        def forward(self, x):
            return self.w2(F.gelu(self.w1(x), approximate="tanh"))

    class Block(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
            self.attn = Attn(layer)
            self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
            self.mlp = MLP()

        def forward(self, x, cache):
            x = x + self.attn(self.norm1(x), cache)
            return x + self.mlp(self.norm2(x))

    class Cache:
        def __init__(self, B):
            shape = (B, cfg.n_heads, cfg.context_length, cfg.head_dim)
            self.k = [torch.zeros(shape) for _ in range(cfg.n_layers)]
            self.v = [torch.zeros(shape) for _ in range(cfg.n_layers)]
            self.length = 0

    class TorchGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
            self.blocks = nn.ModuleList(Block(i) for i in range(cfg.n_layers))
            self.norm_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)

        def forward(self, idx, cache):
            T = idx.shape[1]
            x = self.tok_emb(idx) + self.pos_emb.weight[cache.length:cache.length + T]
            for block in self.blocks:
                x = block(x, cache)
            cache.length += T
            return self.norm_f(x[:, -1]) @ self.tok_emb.weight.T

    m = TorchGPT()
    m.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32))
                       for k, v in our_model.state_dict().items()})
    m.eval()
    m.Cache = Cache
    return m


def run_torch(tm, prompt, n, shift):
    import torch

    ctx = tm.pos_emb.num_embeddings
    t0 = time.perf_counter()
    with torch.inference_mode():
        seq = list(prompt[0])
        cache = tm.Cache(1)
        logits = tm(torch.tensor([seq[-ctx:]]), cache)
        out = []
        for step in range(n):
            nxt = int(logits[0].argmax())
            seq.append(nxt)
            out.append(nxt)
            if step == n - 1:
                break
            if cache.length == ctx:
                cache.length = 0
                logits = tm(torch.tensor([seq[-(ctx + 1 - shift):]]), cache)
            else:
                logits = tm(torch.tensor([[nxt]]), cache)
    return time.perf_counter() - t0, out


# ---- main ----------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["shakespeare-char", "gpt2-small"])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--full-uncached", action="store_true",
                    help="time every uncached step (default: every step for shakespeare-char, "
                         "every 16th for gpt2-small)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count())
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; nproc {os.cpu_count()}; {cpu_model()}; "
          f"numpy {np.__version__}; torch {torch.__version__}; {args.tokens} new tokens, "
          f"prompt {PROMPT_LEN}, float32, batch 1, greedy")
    rows = []
    for name in args.presets:
        autograd.manual_seed(0)
        model = GPT.from_preset(name, dropout=0.0)
        model.eval()
        cfg = model.config
        n = args.tokens
        prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, PROMPT_LEN))
        shift = max(1, cfg.context_length // 4)
        decode_steps_warm = list(decode_steps(model, prompt, max_new_tokens=2, temperature=0))
        del decode_steps_warm
        t_cached, tok_cached = run_cached(model, prompt, n)
        every = 1 if args.full_uncached or model.num_params() < 50e6 else 16
        t_uncached, tok_uncached = run_uncached(model, prompt, n, every)
        if every == 1:
            agree = sum(a == b for a, b in zip(tok_cached, tok_uncached))
        tm = torch_model(model)
        import torch

        with torch.inference_mode():  # same function: compare the prompt's logits
            ours = model(prompt, last_only=True)[0].data[0, -1]
            theirs = tm(torch.tensor(prompt), tm.Cache(1)).numpy()[0]
        err = float(np.abs(ours - theirs).max())
        assert err < 1e-3 * max(1.0, float(np.abs(ours).max())), f"torch logits differ by {err}"
        t_torch, tok_torch = run_torch(tm, prompt, n, shift)
        same = sum(a == b for a, b in zip(tok_cached, tok_torch))
        est = "" if every == 1 else f" (estimate: every {every}th step timed)"
        print(f"{name}: params {model.num_params(non_embedding=False) / 1e6:.1f}M, context "
              f"{cfg.context_length}; cached {t_cached:.2f}s, uncached {t_uncached:.2f}s{est}, "
              f"torch {t_torch:.2f}s; torch logits max diff {err:.1e}; "
              f"tokens equal to torch's: {same}/{n}"
              + (f", cached == uncached tokens: {agree}/{n}" if every == 1 else ""))
        rows.append((name, model.num_params(non_embedding=False), cfg.context_length, n / t_cached,
                     n / t_uncached, est != "", n / t_torch))
    print()
    print("| preset | params | context | cached (tok/s) | uncached (tok/s) | speedup | "
          "torch + cache (tok/s) | ours / torch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, p, ctx, c, u, est, t in rows:
        mark = "*" if est else ""
        print(f"| {name} | {p / 1e6:.1f}M | {ctx} | {c:.1f} | {u:.2f}{mark} | {c / u:.1f}x{mark} "
              f"| {t:.1f} | {c / t:.2f} |")
    if any(r[5] for r in rows):
        print("\n* uncached timed at every 16th step, total = 16 x sum (an estimate)")


if __name__ == "__main__":
    main()
