"""What do bfloat16 and float16 cost in loss, and what does loss scaling save?

The same model trained four ways: float32; bfloat16 and float16 matrix products (float32
master weights, optimizer state, norms, softmax and loss: autograd.amp); float16 with and
without dynamic loss scaling. The training-health monitor counts, on every logged step, the
operands of the products whose cast to 16 bits overflowed (finite -> inf) or underflowed
(nonzero -> 0). Speed is the median of the log intervals' tokens per second (evaluations and
the first interval left out); memory is what one training step
holds at its peak (the CPU: NumPy's allocations, traced; the GPU: CuPy's memory pool). On the
CPU the 16-bit products are emulated by NumPy (float16 without BLAS), so their speed says
nothing about a GPU's: run with --device cuda for that, at a size where the products dominate:

    tinyllm lab precision --device cuda --layers 6 --d-model 384 --context 256 \
        --batch-size 16 --steps 300 --out docs/lab/gpu
"""

import math
import statistics
import tracemalloc

from autograd import amp, backend
from tinyllm.lab import common

SMOKE = dict(steps=4, layers=1, d_model=16)
MODES = (("float32", "float32", True), ("bfloat16", "bfloat16", True),
         ("float16, loss scaling", "float16", True), ("float16, no loss scaling", "float16", False))


def add_arguments(p):
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per run (default 120)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    p.add_argument("--d-model", type=int, default=32, help="model width (default 32)")
    p.add_argument("--context", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")


def step_memory(run):
    """Peak bytes held while one more training step runs (after the run's own steps)."""
    if run.cfg.device == "cpu":
        tracemalloc.start()
        try:
            run.train_step()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    cp = backend.cupy_module()
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()  # the pool then grows to what the step needs at its peak
    run.train_step()
    cp.cuda.Device().synchronize()
    return pool.total_bytes()


def run(args):
    from tinyllm.cli import UsageError

    if args.steps < 2 or args.layers < 1 or args.d_model < 4 or args.d_model % 4 \
            or args.context < 2:
        raise UsageError("--steps and --context must be >= 2, --layers positive, --d-model a "
                         "multiple of 4")
    if not 0 < args.lr < 10:
        raise UsageError(f"--lr: must be in (0, 10), got {args.lr:g}")
    if "bfloat16" in [m for _, m, _ in MODES]:
        try:
            backend.bfloat16()
        except RuntimeError as e:
            raise UsageError(f"tinyllm lab precision: {e}") from None
    model = dict(common.SMALL_MODEL, n_layers=args.layers, d_model=args.d_model,
                 context_length=args.context)
    runs, rows = {}, []
    for label, dtype, scaling in MODES:
        try:
            c = common.train(label, args.steps, args.device, model, lr=args.lr,
                             min_lr=args.lr / 10, warmup=min(30, args.steps // 10),
                             batch_size=args.batch_size, seed=args.seed, char=True, dtype=dtype,
                             loss_scaling=scaling, monitor=True,
                             log_every=max(1, args.steps // 30))
            memory = step_memory(c.run)
        finally:
            amp.set_precision("float32")
        # the median log interval's speed: evaluations and the first (warm-up) interval left out
        tok_s = statistics.median(c.tokens_per_s[1:] or c.tokens_per_s)
        figs = [m for _, m in c.monitor]
        over = sum(m.get("overflow", 0) for m in figs)
        under = sum(m.get("underflow", 0) for m in figs)
        cast = sum(m.get("cast_values", 0) for m in figs)
        scale = c.run.scaler.scale_value if c.run.scaler else None
        runs[label] = dict(curves=c, overflow=over, underflow=under, cast=cast, memory=memory,
                           tok_s=tok_s, scale=scale)
        rows.append([label, c.final_val if not c.diverged else math.nan,
                     f"{over:,}", f"{under:,}",
                     f"{100 * under / cast:.3g}%" if cast else "-",
                     f"{scale:g}" if scale else "-",
                     f"{tok_s:,.0f}", f"{memory / 2**20:.1f}"])
    where = common.machine(args.device)
    return common.Result(
        title="Lab 4: numeric precision (float32, bfloat16, float16 with and without loss "
              "scaling)",
        question=__doc__.strip().splitlines()[0],
        headers=["precision", "final val loss", "overflows", "underflows",
                 "underflowed share of cast values", "final loss scale", "tokens/s",
                 "peak memory of a step (MiB)"],
        rows=rows, draw=lambda: draw(runs), shows=findings(args, runs),
        setup=[f"model: {args.layers} layers, d_model {args.d_model}, 4 heads, context "
               f"{args.context}, llama flavour, bytes as tokens (vocabulary 256)",
               f"each run: {args.steps} steps of {args.batch_size} x {args.context} tokens on "
               f"the built-in corpus, peak lr {args.lr:g}, AdamW, gradient clip 1.0",
               "overflows / underflows: summed over the monitored steps (every logged step, "
               f"{len(runs['float32']['curves'].monitor)} of {args.steps}), counted on every "
               "operand of every matrix product, forward and backward",
               f"speed and memory measured on {args.device} ({where})"
               + ("; the CPU emulates 16-bit products (NumPy has no float16 BLAS), so these "
                  "speeds are not a GPU's: the GPU figures need `--device cuda`"
                  if args.device == "cpu" else "")],
        data={k: {n: v for n, v in r.items() if n != "curves"} for k, r in runs.items()})


def findings(args, runs):
    f32 = runs["float32"]["curves"].final_val
    text = ["Final validation loss against float32's " + common.fmt(f32) + ": " + "; ".join(
        f"{k} {common.fmt(r['curves'].final_val)} ({r['curves'].final_val - f32:+.3f})"
        for k, r in runs.items() if k != "float32") + "."]
    for k, r in runs.items():
        if r["cast"]:
            text.append(f"{k}: {r['overflow']:,} overflows and {r['underflow']:,} underflows "
                        f"in {r['cast']:,} cast values.")
    ls, nls = runs["float16, loss scaling"], runs["float16, no loss scaling"]
    if nls["underflow"] > ls["underflow"]:
        times = nls["underflow"] / max(ls["underflow"], 1)
        text.append(f"Without loss scaling float16 lost {times:.3g}x as many values to "
                    "underflow (small gradients flushed to zero)"
                    + (", yet its loss was no worse: at this size and budget the flushed "
                       "values did not carry the learning."
                       if nls["curves"].final_val <= ls["curves"].final_val + 0.01 else
                       f", and ended {nls['curves'].final_val - ls['curves'].final_val:+.3f} "
                       "from float16 with loss scaling."))
    mem = {k: r["memory"] for k, r in runs.items()}
    text.append(f"A step's peak memory: {mem['float32'] / 2**20:.1f} MiB in float32, "
                f"{mem['bfloat16'] / 2**20:.1f} MiB in bfloat16"
                + (": the 16-bit copies of the products' operands come on top of the float32 "
                   "activations that norms, softmax and the residual stream still keep."
                   if mem["bfloat16"] > mem["float32"] else "."))
    speed = {k: r["tok_s"] for k, r in runs.items()}
    text.append(f"Speed on {args.device}: float32 {speed['float32']:,.0f} tokens/s, bfloat16 "
                f"{speed['bfloat16']:,.0f}, float16 {speed['float16, loss scaling']:,.0f}"
                + (" (emulated on the CPU: not a GPU's speed)." if args.device == "cpu" else
                   ": a model this small is bound by kernel launches, not arithmetic, and each "
                   "product's operands add a cast kernel." if speed["bfloat16"] < speed["float32"]
                   else "."))
    return " ".join(text)


def draw(runs):
    fig, (ax1, ax2) = common.figure(2, width=5.6, height=4.2)
    colors = ["tab:blue", "tab:purple", "tab:green", "tab:red"]
    for (k, r), color in zip(runs.items(), colors):
        c = r["curves"]
        ax1.plot(c.steps, c.loss, color=color, label=k)
        if r["cast"]:
            steps = [s for s, _ in c.monitor]
            ax2.plot(steps, [m["underflow"] / m["cast_values"] for _, m in c.monitor], "-",
                     color=color, label=f"{k}: underflow")
            ax2.plot(steps, [m["overflow"] / m["cast_values"] for _, m in c.monitor], ":",
                     color=color, label=f"{k}: overflow")
    ax1.set_title("training loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/token)")
    ax2.set_yscale("symlog", linthresh=1e-7)
    ax2.set_title("share of cast values lost, per monitored step")
    ax2.set_xlabel("step")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
