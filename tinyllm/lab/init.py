"""How does the initialization scheme shape a deep model's activations and its training?

Three schemes on the same deep pre-norm model (ModelConfig.init): "gpt2", normal(0, 0.02)
with the two residual projections of each block (attn.wo, mlp.w2) scaled by 1/sqrt(2 L);
"normal", normal(0, 0.02) everywhere; "fan_in", PyTorch's defaults (Linear uniform
+-1/sqrt(fan_in), embeddings normal(0, 1)). The training-health monitor reads the RMS of the
residual stream after every block, and of each block's attention and MLP outputs, in the
first step's forward (the initial weights), then every run trains the same steps on the same
batches.
"""

import math

import numpy as np

from tinyllm.lab import common

SMOKE = dict(steps=6, layers=3, d_model=16)
SCHEMES = ("gpt2", "normal", "fan_in")


def add_arguments(p):
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    p.add_argument("--layers", type=int, default=24, help="transformer blocks (default 24)")
    p.add_argument("--d-model", type=int, default=32, help="model width (default 32)")
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (default 1e-2)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")


def run(args):
    from tinyllm.cli import UsageError

    if args.steps < 2 or args.layers < 1 or args.d_model < 4 or args.d_model % 4:
        raise UsageError("--steps must be >= 2, --layers positive, --d-model a multiple of 4")
    if not 0 < args.lr < 10:
        raise UsageError(f"--lr: must be in (0, 10), got {args.lr:g}")
    runs, rows = {}, []
    for scheme in SCHEMES:
        model = dict(common.SMALL_MODEL, n_layers=args.layers, d_model=args.d_model, init=scheme)
        c = common.train(scheme, args.steps, args.device, model, lr=args.lr, min_lr=args.lr / 10,
                         warmup=min(30, args.steps // 10), batch_size=args.batch_size,
                         seed=args.seed, char=True, monitor=True,
                         log_every=max(1, args.steps // 40))
        runs[scheme] = c
        m0 = c.monitor[0][1]
        resid, g = m0["resid_rms"], m0["grad_norm"]
        branch = max(max(a, b) for a, b in zip(m0["attn_rms"], m0["mlp_rms"]))
        ok = not c.diverged and c.final_val < math.log(c.run.tokenizer.vocab_size)
        rows.append([scheme, c.loss[0], c.final_val if ok else math.nan,
                     min(c.loss), resid[0], resid[-1], resid[-1] / resid[0], branch,
                     g[0], g[-1], largest_update(c)])
    return common.Result(
        title="Lab 3: initialization at depth",
        question=__doc__.strip().splitlines()[0],
        headers=["init", "loss at step 1", "final val loss", "lowest train loss",
                 "stream RMS after block 0", "stream RMS after last block", "last / first",
                 "largest branch output RMS", "grad norm, first block", "grad norm, last block",
                 "largest update/weight ratio"],
        rows=rows, draw=lambda: draw(args, runs), shows=findings(args, runs),
        setup=[f"model: {args.layers} layers, d_model {args.d_model}, 4 heads, context 64, "
               "llama flavour (pre-norm, RoPE, RMSNorm, SwiGLU, tied embeddings), bytes as "
               "tokens (vocabulary 256, uniform loss ln 256 = 5.55)",
               f"each run: {args.steps} steps of {args.batch_size} x 64 tokens on the built-in "
               f"corpus, peak lr {args.lr:g} after {min(30, args.steps // 10)} warmup steps, "
               "cosine to a tenth, AdamW (weight decay 0.1), gradient clip 1.0",
               "RMS and gradient norms: `tinyllm train --monitor` at step 1 (the initial "
               "weights; gradients before clipping)"],
        data={s: dict(final_val=c.final_val, step1=c.monitor[0][1]) for s, c in runs.items()})


def largest_update(c):
    """The largest update/weight ratio of any block over the monitored steps."""
    return max(max(m["update_ratio"]) for _, m in c.monitor)


def findings(args, runs):
    m = {s: c.monitor[0][1] for s, c in runs.items()}
    growth = {s: v["resid_rms"][-1] / v["resid_rms"][0] for s, v in m.items()}
    text = [f"At step 0 the residual stream's RMS grows {growth['gpt2']:.2g}x from the first to "
            f"the last of {args.layers} blocks under gpt2, {growth['normal']:.2g}x under normal "
            f"and {growth['fan_in']:.2g}x under fan_in."]
    first = {s: c.loss[0] for s, c in runs.items()}
    text.append(f"The first step's loss is {first['gpt2']:.2f} (gpt2), {first['normal']:.2f} "
                f"(normal) and {first['fan_in']:.2f} (fan_in), against ln 256 = "
                f"{math.log(256):.2f} for a uniform guess: the tied head reads embeddings of "
                f"RMS {m['fan_in']['resid_rms'][0]:.2g} under fan_in, so its logits start large "
                "and confidently wrong.")
    finals = {s: c.final_val for s, c in runs.items()}
    best = min(finals, key=lambda s: finals[s] if not math.isnan(finals[s]) else math.inf)
    text.append("Final validation loss: " + ", ".join(
        f"{s} {common.fmt(v)}" for s, v in finals.items()) + f"; {best} ended lowest.")
    unigram = common.unigram_loss(next(iter(runs.values())).run)
    stalled = [s for s, v in finals.items() if abs(v - unigram) < 0.1]
    if stalled:
        text.append(f"Context-blind byte frequencies give {unigram:.3f}: "
                    + " and ".join(stalled) + " ended within 0.1 of it, barely past "
                    f"unigram statistics after {args.steps} steps.")
    up = {s: largest_update(c) for s, c in runs.items()}
    if up["gpt2"] > 2 * up["fan_in"]:
        text.append(f"At lr {args.lr:g} the small weights of gpt2 and normal take steps up to "
                    f"{up['gpt2']:.2g} and {up['normal']:.2g} of their size (update/weight "
                    f"ratio; fan_in's largest is {up['fan_in']:.2g}): the learning rate that "
                    "suits an init depends on its scale.")
    return " ".join(text)


def draw(args, runs):
    fig, (ax1, ax2, ax3) = common.figure(3, width=5.2, height=4.2)
    colors = {"gpt2": "tab:blue", "normal": "tab:orange", "fan_in": "tab:green"}
    for s, c in runs.items():
        m0 = c.monitor[0][1]
        blocks = np.arange(len(m0["resid_rms"]))
        ax1.plot(blocks, m0["resid_rms"], "o-", ms=3, color=colors[s], label=f"{s}: stream")
        ax1.plot(blocks, np.maximum(m0["attn_rms"], m0["mlp_rms"]), ":", color=colors[s],
                 label=f"{s}: larger branch output")
        ax2.plot(c.steps, c.loss, color=colors[s], label=s)
        ax3.plot(blocks, m0["grad_norm"], "o-", ms=3, color=colors[s], label=s)
    ax1.set_yscale("log")
    ax1.set_title("activation RMS per block at step 0")
    ax1.set_xlabel("block")
    ax2.axhline(math.log(256), color="gray", lw=0.8, ls="--", label="uniform (ln 256)")
    ax2.set_yscale("log")
    ax2.set_title("training loss")
    ax2.set_xlabel("step")
    ax3.set_yscale("log")
    ax3.set_title("gradient norm per block at step 1")
    ax3.set_xlabel("block")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
