"""Data-parallel training on several GPUs against one: tokens/s, loss curves, peak memory.

The model is benchmarks/train_gpu.py's GPT-2-small (Llama flavour, 12 layers, 768 wide, context
1024, vocabulary 50,304, tied embeddings) in bfloat16 mode; the data is the built-in corpus as
bytes (ids 0..255 of the 50,304), batches drawn by tinyllm.data.Batches with seed 0. Every run
takes the same global batch (default 32 x 1024 tokens) and the same steps (AdamW, betas 0.9 /
0.95, weight decay 0.1, clip 1.0, cosine from 6e-4 after 10 warmup steps), through the
functions `tinyllm train --gpus N` uses: each rank its rows (data.shard_rows), its loss weighted
by its share (train.accumulate_grads), gradients summed by autograd.distributed.DataParallel
(train.apply_update). Runs: 1 GPU (one process, no NCCL), N GPUs, N GPUs with ZeRO-1; each
rank in its own process (started by tinyllm.parallel.launch), so its peak memory is its own.

    python benchmarks/train_multi_gpu.py                    # 1 GPU, 2 GPUs, 2 GPUs + ZeRO-1
    python benchmarks/train_multi_gpu.py --gpus 4 --steps 60 --out results/

Prints a table (tokens/s, speed-up over one GPU, peak and optimizer-state memory per GPU, the
largest loss difference from the one-GPU curve) and writes loss curves to --out as JSON and,
when matplotlib is there, PNG.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIG = dict(n_layers=12, n_heads=12, d_model=768, context_length=1024, vocab_size=50304, d_ff=2048)


# ---- one rank -------------------------------------------------------------------------------------

def worker(args):
    import cupy as cp
    import numpy as np

    import autograd
    from autograd import amp, backend, distributed, optim
    from tinyllm import data as data_mod
    from tinyllm.model import GPT
    from tinyllm.train import accumulate_grads, apply_update

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cp.cuda.Device(local).use()
    device = "cuda" if local == 0 else f"cuda:{local}"
    pool = cp.get_default_memory_pool()
    peak = [0]

    def tracking_malloc(size):  # the pool's allocator, remembering the most bytes in use
        mem = pool.malloc(size)
        peak[0] = max(peak[0], pool.used_bytes())
        return mem

    cp.cuda.set_allocator(tracking_malloc)
    group = distributed.NcclGroup.from_env() if world > 1 else None
    autograd.manual_seed(0)
    model = GPT.from_preset("llama-gpt2-small", **CONFIG, tie_embeddings=True, device=device)
    amp.set_precision("bfloat16")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    dp = None
    if group is not None:
        dp = distributed.DataParallel(params, opt, group, zero1=args.zero1)
        opt = dp.optimizer
        dp.broadcast_params()
    schedule = optim.make_schedule("cosine", args.lr, 10, args.steps, args.lr / 10)
    text = "".join(t for _, t in data_mod.builtin_documents()).encode("utf-8")
    batches = data_mod.Batches(np.frombuffer(text, np.uint8), args.batch,
                               CONFIG["context_length"], seed=0)
    rows = data_mod.shard_rows(args.batch, rank, world)
    share = (rows.stop - rows.start) / args.batch  # every target counts: the share of the rows
    losses = []
    for step in range(args.steps):
        if step == args.measure_from:
            cp.cuda.Device().synchronize()
            t0 = time.perf_counter()
        schedule.apply(opt, step)
        x, y = (backend.to_device(a, device) for a in batches.get(step, rows))
        loss = accumulate_grads(model, params, [(x, y)], weights=[share])
        if dp is not None:
            loss = float(dp.sum([loss])[0])
        apply_update(params, opt, 1.0, None, dp)
        losses.append(loss)
    cp.cuda.Device().synchronize()
    seconds = time.perf_counter() - t0
    moments = opt.inner.state if args.zero1 else opt.state
    result = dict(rank=rank, world=world, zero1=args.zero1, losses=losses, peak_bytes=peak[0],
                  state_bytes=sum(a.nbytes for st in moments.values() for a in st.values()),
                  tokens_per_s=(args.steps - args.measure_from) * args.batch
                  * CONFIG["context_length"] / seconds)
    with open(os.path.join(args.out, f"{args.name}-rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if group is not None:
        group.close()


# ---- driver ---------------------------------------------------------------------------------------

def run(name, gpus, zero1, args):
    """One configuration: its ranks' results, or None when it failed (the output is shown)."""
    from tinyllm import parallel

    cmd = ["--worker", "--name", name, "--batch", str(args.batch), "--steps", str(args.steps),
           "--measure-from", str(args.measure_from), "--lr", str(args.lr), "--out", args.out]
    cmd += ["--zero1"] if zero1 else []
    t0 = time.perf_counter()
    if gpus == 1:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        code = subprocess.run([sys.executable, __file__] + cmd, env=env).returncode
    else:
        code = parallel.launch(argparse.Namespace(gpus=gpus, argv=cmd), "benchmark",
                               program=[sys.executable, __file__])
    if code:
        print(f"{name}: failed (exit code {code})", flush=True)
        return None
    ranks = [json.load(open(os.path.join(args.out, f"{name}-rank{r}.json"))) for r in range(gpus)]
    print(f"{name}: {ranks[0]['tokens_per_s']:,.0f} tok/s, peak "
          f"{max(r['peak_bytes'] for r in ranks) / 2**30:.2f} GiB per GPU, final loss "
          f"{ranks[0]['losses'][-1]:.4f} ({time.perf_counter() - t0:.0f}s with start-up)", flush=True)
    return ranks


def plot(curves, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no PNG (the curves are in the JSON)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, losses), style in zip(curves.items(), ("-", "--", ":", "-.")):
        ax.plot(range(1, len(losses) + 1), losses, style, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("GPT-2-small, bfloat16, the same global batch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=2, help="GPUs of the data-parallel runs")
    p.add_argument("--batch", type=int, default=32, help="global batch (sequences of 1024)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--measure-from", type=int, default=10, help="steps before timing starts")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--out", default=os.environ.get("OUT") or "bench-multi-gpu",
                   help="folder of the results (default $OUT or bench-multi-gpu)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--zero1", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.worker:
        return worker(args)

    n = args.gpus
    runs = {"1 GPU": run("gpu1", 1, False, args), f"{n} GPUs": run(f"gpu{n}", n, False, args),
            f"{n} GPUs, ZeRO-1": run(f"gpu{n}-zero1", n, True, args)}
    one = runs["1 GPU"]
    print(f"\nGPT-2-small bfloat16, global batch {args.batch} x 1024, {args.steps} steps "
          f"(tokens/s over steps {args.measure_from + 1}-{args.steps})\n")
    print("| run | tokens/s | vs 1 GPU | peak GiB per GPU | AdamW state GiB per GPU | "
          "final loss | largest loss gap to 1 GPU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, ranks in runs.items():
        if ranks is None:
            print(f"| {name} | failed | | | | | |")
            continue
        r0 = ranks[0]
        speedup = f"{r0['tokens_per_s'] / one[0]['tokens_per_s']:.2f}x" if one else "-"
        gap = (max(abs(a - b) for a, b in zip(r0["losses"], one[0]["losses"])) if one else None)
        print(f"| {name} | {r0['tokens_per_s']:,.0f} | {speedup} | "
              f"{max(r['peak_bytes'] for r in ranks) / 2**30:.2f} | "
              f"{max(r['state_bytes'] for r in ranks) / 2**30:.2f} | {r0['losses'][-1]:.4f} | "
              f"{'-' if gap is None else f'{gap:.4f}'} |")
    curves = {name: ranks[0]["losses"] for name, ranks in runs.items() if ranks}
    with open(os.path.join(args.out, "loss_curves.json"), "w") as f:
        json.dump({"batch": args.batch, "steps": args.steps, "curves": curves,
                   "runs": {k: v for k, v in runs.items() if v}}, f)
    plot(curves, os.path.join(args.out, "multi_gpu_loss.png"))
    if one and runs[f"{n} GPUs"]:
        speedup = runs[f"{n} GPUs"][0]["tokens_per_s"] / one[0]["tokens_per_s"]
        target = 0.9 * n
        print(f"\nscaling on {n} GPUs: {speedup:.2f}x one GPU (target {target:.1f}x): "
              f"{'met' if speedup >= target else 'NOT met'}")
    return 0 if all(runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
