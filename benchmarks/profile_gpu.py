"""Where a GPU training step's time goes, op by op (forward and backward separately).

Runs the model of benchmarks/train_gpu.py and times one step with a device synchronization
around every Function's forward and backward (which removes overlap, so the parts add up to
a little more than an unprofiled step). Prints the ops by total time, then the optimizer.

    python benchmarks/profile_gpu.py --mode bfloat16 --batch 16
"""

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="bfloat16")
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()

    import cupy as cp
    import numpy as np

    import autograd
    from autograd import amp, optim
    from autograd.tensor import Function
    from tinyllm.model import GPT
    from train_gpu import CONFIG

    autograd.manual_seed(0)
    model = GPT.from_preset("llama-gpt2-small", **CONFIG, tie_embeddings=True, device="cuda")
    amp.set_precision(args.mode)
    opt = optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    T = CONFIG["context_length"]
    data = cp.asarray(np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (args.batch, T + 1)))
    x, y = data[:, :-1], data[:, 1:]
    sync = cp.cuda.Device().synchronize
    times = collections.defaultdict(float)
    counts = collections.Counter()

    def step():
        t0 = time.perf_counter()
        _, loss = model(x, y, return_logits=False)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        optim.clip_grad_norm(model.parameters(), 1.0)
        sync()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        sync()
        t4 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3

    for _ in range(2):
        step()
    plain = step()
    print(f"unprofiled step: forward {plain[0]*1e3:.1f} ms, backward {plain[1]*1e3:.1f} ms, "
          f"clip {plain[2]*1e3:.1f} ms, AdamW {plain[3]*1e3:.1f} ms, total {sum(plain)*1e3:.1f} ms "
          f"({args.batch * T / sum(plain):,.0f} tok/s); pool {cp.get_default_memory_pool().total_bytes()/2**30:.1f} GiB")

    def timed(name, fn):
        def wrapper(self, *a, **k):
            sync()
            t = time.perf_counter()
            out = fn(self, *a, **k)
            sync()
            times[(type(self).__name__, name)] += time.perf_counter() - t
            counts[(type(self).__name__, name)] += 1
            return out
        return wrapper

    def subclasses(c):
        for s in c.__subclasses__():
            yield s
            yield from subclasses(s)

    for cls in set(subclasses(Function)):
        if "forward" in vars(cls):
            cls.forward = timed("forward", vars(cls)["forward"])
        if "backward" in vars(cls):
            cls.backward = timed("backward", vars(cls)["backward"])
    prof = step()
    total = sum(times.values())
    print(f"profiled step {sum(prof)*1e3:.1f} ms; inside ops {total*1e3:.1f} ms")
    for (cls, phase), t in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"  {cls:14s} {phase:8s} {counts[(cls, phase)]:4d} calls {t*1e3:8.2f} ms  {100*t/total:5.1f}%")


if __name__ == "__main__":
    main()
