"""Where a GPU training step's time goes, op by op (forward and backward separately).

Runs a model of benchmarks/train_gpu.py (its CASES: gpt2-small, the Llama-flavour GPT-2-small
at batch 16 x 1024, or shakespeare-char, the GPT-2-flavour 6-layer char model with dropout 0.2
at batch 64 x 256), with that case's optimizer settings. Times one unprofiled step (forward,
backward, clip, AdamW), then one step with a device synchronization around every Function's
forward and backward (which removes overlap, so the parts add up to a little more than an
unprofiled step), and prints the ops by GPU time: for each op the host's time to run its
Python and launch its kernels, and the kernels' time on the GPU. Before each call the device
is kept busy by a kernel that waits SPIN_S seconds, so the op's kernels are all queued before
the first runs and run back to back: CUDA events around them time the kernels alone (an op
whose host time exceeds SPIN_S is marked, its GPU time then includes gaps).

    python benchmarks/profile_gpu.py --mode bfloat16 --batch 16
    python benchmarks/profile_gpu.py --case shakespeare-char      # batch 64 x 256, bfloat16
"""

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_gpu import CASES, tinyllm_model  # noqa: E402  (the benchmark's models)


SPIN_S = 5e-3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="gpt2-small", choices=list(CASES))
    p.add_argument("--mode", default="bfloat16")
    p.add_argument("--batch", type=int, help="default: the case's (gpt2-small 16, shakespeare-char 64)")
    args = p.parse_args()

    import cupy as cp
    import numpy as np

    import autograd
    from autograd import amp, optim
    from autograd.tensor import Function

    c = CASES[args.case]
    if args.batch is None:
        args.batch = c["batch"]
    autograd.manual_seed(0)
    model = tinyllm_model(args.case)
    amp.set_precision(args.mode)
    opt = optim.AdamW(model.parameters(), lr=c["lr"], betas=c["betas"], weight_decay=c["weight_decay"])
    T, V = model.config.context_length, model.config.vocab_size
    data = cp.asarray(np.random.default_rng(0).integers(0, V, (args.batch, T + 1)))
    x, y = data[:, :-1], data[:, 1:]
    sync = cp.cuda.Device().synchronize
    times = collections.defaultdict(float)
    gpu_times = collections.defaultdict(float)
    counts = collections.Counter()
    # keeps the GPU busy for `ns` nanoseconds, so that what is queued behind it runs unbroken
    spin = cp.RawKernel(r'''
    extern "C" __global__ void spin(long long ns) {
        long long start = clock64();
        while (clock64() - start < ns) { }
    }''', "spin")
    rate = cp.cuda.runtime.getDeviceProperties(0)["clockRate"] * 1e3  # clock64 ticks per second

    def step():
        t0 = time.perf_counter()
        _, loss = model(x, y, return_logits=False)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        optim.clip_grad_norm(model.parameters(), c["clip"])
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
            key = (type(self).__name__, name)
            sync()
            spin((1,), (1,), (np.int64(SPIN_S * rate),))
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            t = time.perf_counter()
            out = fn(self, *a, **k)
            times[key] += time.perf_counter() - t
            end.record()
            end.synchronize()
            gpu_times[key] += cp.cuda.get_elapsed_time(start, end) * 1e-3
            counts[key] += 1
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
    total, gpu_total = sum(times.values()), sum(gpu_times.values())
    print(f"profiled step {sum(prof)*1e3:.1f} ms; inside ops {total*1e3:.1f} ms on the host, "
          f"{gpu_total*1e3:.1f} ms on the GPU")
    print(f"  {'op':22s} {'phase':8s} {'calls':>5s} {'host ms':>9s} {'GPU ms':>8s} {'GPU %':>6s}")
    for key, t in sorted(gpu_times.items(), key=lambda kv: -kv[1]):
        cls, phase = key
        late = " (host > spin: GPU time has gaps)" if times[key] / counts[key] > SPIN_S else ""
        print(f"  {cls:22s} {phase:8s} {counts[key]:5d} {times[key]*1e3:9.2f} {t*1e3:8.2f} "
              f"{100*t/gpu_total:5.1f}%{late}")


if __name__ == "__main__":
    main()
