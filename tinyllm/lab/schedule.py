"""Which peak learning rates train well, and how much room does warmup add?

A grid of runs, warmup length x peak learning rate (cosine decay to a tenth of the peak after
the warmup), each the same small model for the same steps on the built-in corpus. The final
validation loss of each is the heat map. A run is marked diverged when its loss became
non-finite, and failed when it ended no better than the unigram baseline (the cross-entropy
of predicting every token from its training frequency alone: what a model knows that has
learned nothing about context). The largest rise of the training loss above its lowest so far
shows the spikes of runs at the edge. The stable region is the set of runs within
`--tolerance` nats of the best one.
"""

import math

import numpy as np

from tinyllm.lab import common

SMOKE = dict(steps=6, lrs=[3e-3, 3.0], warmups=[0, 2], layers=1, d_model=16)


def add_arguments(p):
    from tinyllm.cli import positive_float, positive_int

    p.add_argument("--steps", type=positive_int, default=400,
                   help="optimizer steps per run (default 400)")
    p.add_argument("--lrs", type=common.number_list(float), metavar="LR,LR,...",
                   default=[1e-3, 3e-3, 1e-2, 1e-1, 1.0],
                   help="peak learning rates (default 1e-3,3e-3,1e-2,1e-1,1)")
    p.add_argument("--warmups", type=common.number_list(int), metavar="N,N,...",
                   default=[0, 40, 160], help="warmup lengths in steps (default 0,40,160)")
    p.add_argument("--layers", type=positive_int, default=2, help="transformer blocks (default 2)")
    p.add_argument("--d-model", type=positive_int, default=64, help="model width (default 64)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="sequences per step (default 8)")
    p.add_argument("--tolerance", type=positive_float, default=0.25,
                   help="nats above the best final loss still counted stable (default 0.25)")


def run(args):
    from tinyllm.cli import UsageError

    if max(args.warmups) >= args.steps:
        raise UsageError(f"--warmups: each must be below --steps {args.steps}, "
                         f"got {max(args.warmups)}")
    model = dict(common.SMALL_MODEL, n_layers=args.layers, d_model=args.d_model)
    grid = np.full((len(args.warmups), len(args.lrs)), math.nan)
    status, rows, curves, baseline = {}, [], {}, None
    for i, warmup in enumerate(args.warmups):
        for j, lr in enumerate(args.lrs):
            c = common.train(f"warmup {warmup}, lr {lr:g}", args.steps, args.device, model,
                             lr=lr, min_lr=lr / 10, warmup=warmup, batch_size=args.batch_size,
                             seed=args.seed, log_every=max(1, args.steps // 60))
            if baseline is None:
                baseline = common.unigram_loss(c.run)
            if c.diverged:
                why = "diverged (" + c.diverged.split(" at ")[0].replace("the ", "") + \
                      (f" at step {c.diverged.rsplit(' ', 1)[-1]})" if " at step " in c.diverged
                       else ")")
            elif c.final_val >= baseline:
                why = "failed (no better than unigram)"
            else:
                why = "ok"
                grid[i, j] = c.final_val
            status[warmup, lr] = why
            curves[warmup, lr] = c
            rows.append([warmup, f"{lr:g}", c.final_val, largest_rise(c.loss), why])
    best = np.nanmin(grid) if np.isfinite(grid).any() else math.nan
    stable = np.isfinite(grid) & (grid <= best + args.tolerance)
    for row, ok in zip(rows, stable.ravel()):
        row.append("yes" if ok else "")
    return common.Result(
        title="Lab 5: learning-rate schedule (warmup x peak learning rate)",
        question=__doc__.strip().splitlines()[0],
        headers=["warmup steps", "peak lr", "final val loss", "largest train-loss rise",
                 "status", f"stable (within {args.tolerance:g} of best)"],
        rows=rows, shows=findings(args, grid, stable, status, curves, baseline),
        draw=lambda: draw(args, grid, stable, curves, baseline),
        setup=[f"model: {args.layers} layers, d_model {args.d_model}, 4 heads, context 64 "
               f"(llama flavour: RoPE, RMSNorm, SwiGLU), BPE vocabulary 1024",
               f"each run: {args.steps} steps of {args.batch_size} x 64 tokens on the built-in "
               "corpus; AdamW (weight decay 0.1, betas 0.9/0.99), gradient clip 1.0, linear "
               "warmup then cosine to peak/10",
               "final val loss: the last evaluation's mean cross-entropy (nats/token) on fixed "
               f"validation windows; unigram baseline {baseline:.3f}; largest train-loss rise: "
               "the most the training loss (mean over each log interval) climbed above its "
               "lowest value so far"],
        data=dict(grid=grid.tolist(), stable=stable.tolist(), baseline=baseline,
                  status={f"{w},{lr:g}": s for (w, lr), s in status.items()}))


def largest_rise(losses):
    """The most a loss curve climbed above its lowest value so far (0 for a falling curve)."""
    losses = np.asarray(losses, dtype=np.float64)
    if not len(losses):
        return math.nan
    return float(np.max(losses - np.minimum.accumulate(losses)))


def findings(args, grid, stable, status, curves, baseline):
    lrs, warmups = args.lrs, args.warmups
    if not np.isfinite(grid).any():
        return (f"No run got below the unigram baseline ({baseline:.3f}): lower the learning "
                "rates of the grid or train longer.")
    i, j = np.unravel_index(np.nanargmin(grid), grid.shape)
    text = [f"The lowest final loss, {grid[i, j]:.3f}, came from peak lr {lrs[j]:g} with "
            f"{warmups[i]} warmup steps (unigram baseline {baseline:.3f})."]
    widths = []
    for r, w in enumerate(warmups):
        ok = [f"{lrs[c]:g}" for c in range(len(lrs)) if stable[r, c]]
        widths.append(len(ok))
        bad = [f"{lr:g}" for lr in lrs if status[w, lr] != "ok"]
        text.append(f"With {w} warmup steps the stable region is "
                    f"{'lr ' + ', '.join(ok) if ok else 'empty'}"
                    f"{'; failed or diverged at lr ' + ', '.join(bad) if bad else ''}.")
    if widths[-1] > widths[0]:
        text.append(f"Longer warmup widened the stable region ({widths[0]} to {widths[-1]} "
                    "learning rates).")
    elif widths[-1] < widths[0]:
        text.append(f"Longer warmup narrowed the stable region here ({widths[0]} to "
                    f"{widths[-1]} learning rates): at this budget the steps spent warming up "
                    "are steps not spent at the peak.")
    else:
        text.append("Warmup length did not change how many learning rates were stable at "
                    "this size and budget.")
    diverged = [k for k in curves if math.isnan(curves[k].final_val)]
    top = args.lrs[-1]
    if not diverged:
        finals = [curves[w, top].final_val for w in warmups]
        text.append(f"No run's loss became non-finite: at the highest peak lr, {top:g}, the "
                    f"runs ended near the unigram baseline ({', '.join(f'{v:.2f}' for v in finals)}"
                    ").")
    w, lr = max(curves, key=lambda k: largest_rise(curves[k].loss))
    rise = largest_rise(curves[w, lr].loss)
    if rise > 0.5:  # the mean over a log interval wobbles by a few tenths without any spike
        others = ", ".join(f"{largest_rise(curves[v, lr].loss):.2f} with {v}"
                           for v in warmups if v != w)
        text.append(f"The largest loss spike, +{rise:.2f} nats, was at lr {lr:g} with {w} "
                    f"warmup steps ({others} warmup steps at the same lr).")
    return " ".join(text)


def draw(args, grid, stable, curves, baseline):
    fig, (ax, ax2, ax3, ax4) = common.figure(4, width=4.6, height=4.4)
    masked = np.ma.masked_invalid(grid)
    im = ax.imshow(masked, cmap="viridis_r", aspect="auto")
    ax.set_facecolor("#d62728")  # failed and diverged cells show the background
    ax.set_xticks(range(len(args.lrs)), [f"{lr:g}" for lr in args.lrs])
    ax.set_yticks(range(len(args.warmups)), [str(w) for w in args.warmups])
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("warmup steps")
    for (r, c), v in np.ndenumerate(grid):
        final = curves[args.warmups[r], args.lrs[c]].final_val
        label = (f"{v:.3f}" + ("\nstable" if stable[r, c] else "")) if np.isfinite(v) else \
            ("diverged" if math.isnan(final) else f"{final:.3f}\nfailed")
        ax.text(c, r, label, ha="center", va="center", fontsize=8,
                color="black" if np.isfinite(v) else "white")
    fig.colorbar(im, ax=ax, label="final validation loss (nats/token)")
    ax.set_title("final loss; red: failed or diverged")
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"]
    for r, w in enumerate(args.warmups):
        finals = [curves[w, lr].final_val for lr in args.lrs]
        ax2.plot(args.lrs, finals, "o-", color=colors[r % len(colors)], label=f"warmup {w}")
    ax2.axhline(baseline, color="gray", ls="--", lw=1, label="unigram baseline")
    ax2.set_xscale("log")
    ax2.set_xlabel("peak learning rate")
    ax2.set_ylabel("final validation loss")
    ax2.set_title("the basin (diverged runs: no point)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    # the curves at the learning rate of the best run, and at the one with the largest spike
    best = int(np.nanargmin(grid)) if np.isfinite(grid).any() else 0
    spiky = max(args.lrs, key=lambda v: max(largest_rise(curves[w, v].loss) for w in args.warmups))
    for axis, lr, what in ((ax3, args.lrs[best % len(args.lrs)], "the best run's"),
                           (ax4, spiky, "the largest spike's")):
        for r, w in enumerate(args.warmups):
            c = curves[w, lr]
            axis.plot(c.steps, c.loss, color=colors[r % len(colors)], lw=1, label=f"warmup {w}")
        axis.axhline(baseline, color="gray", ls="--", lw=1, label="unigram baseline")
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.set_title(f"training at lr {lr:g}, {what}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    return fig
