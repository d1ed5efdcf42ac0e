"""Does post-norm train at depth, and what does warmup change?

Pre-norm (GPT-2, Llama) normalizes each branch's input and leaves the residual stream alone:
x = x + f(norm(x)). Post-norm (the original Transformer, GPT-1) normalizes the sum: x =
norm(x + f(x)). Each depth is trained four ways, pre/post x with/without linear warmup, the
same steps, learning rate and batches; the training-health monitor records every block's
gradient norm (before clipping) and update/weight ratio. A run counts as diverged when its loss
became non-finite or its final validation loss is no better than uniform guessing (ln V).
"""

import math

import numpy as np

from tinyllm.lab import common

SMOKE = dict(steps=6, depths=[1, 3], d_model=16, warmup=2)


def add_arguments(p):
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default 150)")
    p.add_argument("--depths", type=common.number_list(int, low=1), metavar="L,L,...",
                   default=[4, 12, 24], help="numbers of blocks (default 4,12,24)")
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (default 1e-2)")
    p.add_argument("--warmup", type=int, default=30,
                   help="warmup steps of the runs with warmup (default 30)")
    p.add_argument("--d-model", type=int, default=32, help="model width (default 32)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--init", choices=["gpt2", "normal", "fan_in"], default="gpt2",
                   help="weight initialization (default gpt2; GPT-1 used normal)")
    p.add_argument("--clip", type=float, default=1.0,
                   help="gradient-norm clip, 0 = off (default 1.0)")


def run(args):
    from tinyllm.cli import UsageError

    if args.steps < 2 or args.d_model < 4 or args.d_model % 4 or not 0 < args.lr < 10:
        raise UsageError("--steps must be >= 2, --d-model a multiple of 4, --lr in (0, 10)")
    if args.clip < 0:
        raise UsageError(f"--clip: must be >= 0, got {args.clip:g}")
    if not 0 < args.warmup < args.steps:
        raise UsageError(f"--warmup: must be in 1..{args.steps - 1}, got {args.warmup}")
    runs, rows = {}, []
    for depth in args.depths:
        for norm in ("pre", "post"):
            for warmup in (0, args.warmup):
                model = dict(common.SMALL_MODEL, n_layers=depth, d_model=args.d_model,
                             norm_position=norm, init=args.init)
                c = common.train(f"{norm}-norm, {depth} layers, warmup {warmup}", args.steps,
                                 args.device, model, lr=args.lr, min_lr=args.lr / 10,
                                 warmup=warmup, batch_size=args.batch_size, seed=args.seed,
                                 clip=args.clip, char=True, monitor=True,
                                 log_every=max(1, args.steps // 30))
                status = status_of(c)
                runs[depth, norm, warmup] = (c, status)
                first = c.monitor[0][1]["grad_norm"]
                ratios = [max(m["update_ratio"]) for _, m in c.monitor]
                rows.append([depth, norm, warmup,
                             c.final_val if status == "ok" else math.nan,
                             min(c.loss) if c.loss else math.nan, status,
                             first[0], first[-1], first[-1] / first[0], max(ratios)])
    return common.Result(
        title="Lab 1: pre-norm against post-norm at growing depth",
        question=__doc__.strip().splitlines()[0],
        headers=["layers", "norm", "warmup", "final val loss", "lowest train loss", "status",
                 "grad norm, first block (step 1)", "grad norm, last block (step 1)",
                 "last / first", "largest update/weight ratio"],
        rows=rows, draw=lambda: draw(args, runs), shows=findings(args, runs),
        setup=[f"model: d_model {args.d_model}, 4 heads, context 64, llama flavour (RoPE, "
               f"RMSNorm, SwiGLU), {args.init} initialization, bytes as tokens (vocabulary "
               "256, uniform loss ln 256 = 5.55); depths " + ", ".join(map(str, args.depths)),
               f"each run: {args.steps} steps of {args.batch_size} x 64 tokens on the built-in "
               f"corpus, peak lr {args.lr:g}, cosine to a tenth, AdamW (weight decay 0.1), "
               + (f"gradient clip {args.clip:g}" if args.clip else "no gradient clipping")
               + f"; warmup 0 or {args.warmup} steps",
               "gradient norms: the L2 norm of each block's parameter gradients before "
               "clipping, from `tinyllm train --monitor` (step 1: the initial weights)"],
        data={f"{d},{n},{w}": dict(final_val=c.final_val, status=s,
                                   grad_norm_step1=c.monitor[0][1]["grad_norm"])
              for (d, n, w), (c, s) in runs.items()})


def status_of(c):
    if c.diverged:
        return "diverged (" + c.diverged.split(" at ")[0].replace("the ", "") + ")"
    if not c.final_val < math.log(c.run.tokenizer.vocab_size):
        return "diverged (no better than uniform)"
    return "ok"


def findings(args, runs):
    deep = max(args.depths)
    text = []
    bad = [f"{n}-norm at {d} layers{' without warmup' if w == 0 else ' with warmup'}"
           for (d, n, w), (_, s) in runs.items() if s != "ok"]
    text.append("Diverged: " + "; ".join(bad) + "." if bad else
                f"No run diverged at lr {args.lr:g} (up to {deep} layers).")
    for warmup in (0, args.warmup):
        pre, post = runs[deep, "pre", warmup][0], runs[deep, "post", warmup][0]
        text.append(f"At {deep} layers with warmup {warmup} the final validation loss was "
                    f"{common.fmt(pre.final_val)} pre-norm against {common.fmt(post.final_val)} "
                    "post-norm.")
    g = {n: np.array(runs[deep, n, 0][0].monitor[0][1]["grad_norm"]) for n in ("pre", "post")}
    text.append(f"At initialization ({deep} layers) a block's gradient norm averages "
                f"{g['pre'].mean():.2g} pre-norm and {g['post'].mean():.2g} post-norm; the last "
                f"block's is {g['pre'][-1] / g['pre'][0]:.2g}x the first block's pre-norm and "
                f"{g['post'][-1] / g['post'][0]:.2g}x post-norm.")
    if g["post"].mean() < g["pre"].mean() / 3 and args.init != "fan_in":
        text.append("Post-norm starts with much smaller gradients: pre-norm's stream keeps the "
                    "embeddings' small scale (RMS ~0.02 at init) and each norm divides by it "
                    "in backward, while post-norm resets the stream to RMS 1 after every "
                    "block.")
    elif g["post"][-1] / g["post"][0] > 2 * g["pre"][-1] / g["pre"][0]:
        text.append("Post-norm's gradient is concentrated in the top blocks, so one learning "
                    "rate is too large for them and too small for the bottom ones.")
    unigram = common.unigram_loss(next(iter(runs.values()))[0].run)
    near = [(d, n, w) for (d, n, w), (c, s) in runs.items()
            if s == "ok" and abs(c.final_val - unigram) < 0.03]
    if near:
        text.append(f"Context-blind frequencies alone give {unigram:.3f} on the validation "
                    "tokens; " + ", ".join(f"{n}-norm at {d} layers (warmup {w})"
                                           for d, n, w in near)
                    + f" ended within 0.03 of it: stalled, not diverged, after {args.steps} "
                    "steps.")
    shallow = min(args.depths)
    s_pre, s_post = runs[shallow, "pre", 0][0], runs[shallow, "post", 0][0]
    if s_post.final_val <= s_pre.final_val:
        text.append(f"At {shallow} layers post-norm did as well or better "
                    f"({common.fmt(s_post.final_val)} against {common.fmt(s_pre.final_val)}).")
    return " ".join(text)


def draw(args, runs):
    fig, (ax1, ax2, ax3) = common.figure(3, width=5.2, height=4.2)
    deep = max(args.depths)
    styles = {("pre", 0): ("tab:blue", "--"), ("pre", args.warmup): ("tab:blue", "-"),
              ("post", 0): ("tab:red", "--"), ("post", args.warmup): ("tab:red", "-")}
    for (n, w), (color, ls) in styles.items():
        c = runs[deep, n, w][0]
        ax1.plot(c.steps, c.loss, ls, color=color, label=f"{n}-norm, warmup {w}")
        finals = [runs[d, n, w][0].final_val for d in args.depths]
        ax2.plot(args.depths, finals, "o" + ls, color=color, label=f"{n}-norm, warmup {w}")
    ax1.set_title(f"{deep} layers: training loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/token)")
    ax1.set_ylim(top=min(ax1.get_ylim()[1], 2 * math.log(256)))
    ax2.set_title("final validation loss (missing: diverged)")
    ax2.set_xlabel("layers")
    for n, color in (("pre", "tab:blue"), ("post", "tab:red")):
        g = runs[deep, n, 0][0].monitor[0][1]["grad_norm"]
        ax3.plot(np.arange(len(g)), g, "o-", color=color, ms=3, label=f"{n}-norm")
    ax3.set_yscale("log")
    ax3.set_title(f"gradient norm per block at step 1 ({deep} layers)")
    ax3.set_xlabel("block")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
