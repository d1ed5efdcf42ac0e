"""Peak memory of DPO training steps: the reference's log-probabilities cached (what `tinyllm
dpo` does) against a second, frozen reference model kept in memory and run every step.

Each variant runs in a process of its own, so one's peak cannot hide in the other's: it
builds the policy (and, for the second variant, a reference copy), an AdamW optimizer, and
takes `--steps` DPO steps on batches of the built-in preference pairs (chosen and rejected in
one batched forward, tinyllm.posttrain). Memory is measured from before the models are built:
on the CPU, the peak of the NumPy arrays (tracemalloc) and the process's peak RSS; on a GPU,
the most bytes CuPy's memory pool held in use, and the pool's size at the end.

    python benchmarks/dpo_memory.py                           # laptop preset on the CPU
    python benchmarks/dpo_memory.py --device cuda --preset gpt2-small --batch 16
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import autograd
from autograd import backend
from autograd.optim import AdamW
from tinyllm import chat, posttrain, preference
from tinyllm.model import GPT
from tinyllm.tokenizer import Tokenizer
from tinyllm.train import apply_update

VARIANTS = ("cached", "reference model")


def sync(device):
    if device != "cpu":
        backend.cupy_module().cuda.Device().synchronize()


class Meter:
    """Peak bytes in use since it was made: tracemalloc on the CPU, CuPy's pool on a GPU."""

    def __init__(self, device):
        self.device, self.peak = device, 0
        if device == "cpu":
            tracemalloc.start()
        else:
            self.pool = backend.cupy_module().get_default_memory_pool()
            self.base = self.pool.used_bytes()

    def sample(self):
        if self.device == "cpu":
            self.peak = max(self.peak, tracemalloc.get_traced_memory()[1])
        else:
            sync(self.device)
            self.peak = max(self.peak, self.pool.used_bytes() - self.base)

    def held(self):
        return None if self.device == "cpu" else self.pool.total_bytes()


def tokenizer(vocab_size):
    docs = [t for _, t in __import__("tinyllm.data", fromlist=["x"]).builtin_documents()]
    return chat.add_chat_tokens(Tokenizer.train(docs, vocab_size))


def run_variant(args):
    """Build the models and take the steps; returns the measurements."""
    tok = tokenizer(args.vocab_size)
    encoded = [posttrain.encode_pair(p, tok)
               for p in preference.builtin_pairs("train", args.batch * args.steps, 0)]
    pad = tok.eot_id
    meter = Meter(args.device)
    autograd.manual_seed(0)
    policy = GPT.from_preset(args.preset, vocab_size=tok.vocab_size, device=args.device)
    params = policy.parameters()
    opt = AdamW(params, lr=1e-5)
    reference = None
    if args.variant == "cached":  # log-probabilities of every pair, computed once
        ref = np.concatenate([np.stack([a.data, b.data], 1) for a, b in (
            _no_grad_logps(policy, encoded[i:i + args.batch], pad)
            for i in range(0, len(encoded), args.batch))])
        ref = backend.to_device(ref, "cpu")
    else:  # a frozen copy of the starting model, run every step
        reference = GPT.from_preset(args.preset, vocab_size=tok.vocab_size, device=args.device)
        reference.load_state_dict(policy.state_dict())
        for p in reference.parameters():
            p.requires_grad = False
    meter.sample()
    times = []
    for s in range(args.steps):
        batch = encoded[s * args.batch:(s + 1) * args.batch]
        sync(args.device)
        t0 = time.perf_counter()
        if reference is None:
            rc, rr = ref[s * args.batch:(s + 1) * args.batch].T
            rc, rr = backend.to_device(rc, args.device), backend.to_device(rr, args.device)
        else:
            rc, rr = (t.data for t in _no_grad_logps(reference, batch, pad))
        meter.sample()
        pc, pr = posttrain.pair_logprobs(policy, batch, pad)
        losses, _, _ = posttrain.dpo_loss(pc, pr, rc, rr)
        meter.sample()
        losses.mean().backward()
        meter.sample()
        apply_update(params, opt, 1.0)
        meter.sample()
        times.append(time.perf_counter() - t0)
    return {"variant": args.variant, "peak_bytes": meter.peak, "pool_bytes": meter.held(),
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "step_s": float(np.median(times)), "params": policy.num_parameters(),
            "param_bytes": sum(p.data.nbytes for p in params)}


def _no_grad_logps(model, encoded, pad):
    with autograd.no_grad():
        return posttrain.pair_logprobs(model, encoded, pad)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="laptop")
    ap.add_argument("--batch", type=int, default=32, help="pairs per step")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab-size", type=int, default=1024, help="BPE merges + 256 to train")
    ap.add_argument("--variant", choices=VARIANTS, help="run one variant here (internal)")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant,
               *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k != "variant")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    mib = 1 << 20
    first = rows[0]
    print(f"{args.preset} ({first['params'] / 1e6:.2f}M parameters, {first['param_bytes'] / mib:.1f} "
          f"MiB of weights), {args.batch} pairs per step, {args.steps} steps, device {args.device}")
    gpu = args.device != "cpu"
    print(f"| reference | peak {'GPU memory in use' if gpu else 'NumPy memory (tracemalloc)'} "
          f"| {'pool size' if gpu else 'peak RSS'} | median step |")
    print("|---|---|---|---|")
    for r in rows:
        other = r["pool_bytes"] / mib if gpu else r["max_rss_kib"] / 1024
        print(f"| {'cached log-probabilities' if r['variant'] == 'cached' else 'second model, run each step'} "
              f"| {r['peak_bytes'] / mib:.1f} MiB | {other:.1f} MiB | {1e3 * r['step_s']:.0f} ms |")


if __name__ == "__main__":
    main()
