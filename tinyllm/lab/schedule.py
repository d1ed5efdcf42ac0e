"""Which peak learning rates train well, and how much room does warmup add?

A grid of runs, warmup length x peak learning rate (cosine decay to a tenth of the peak after
the warmup), each the same small model for the same steps on the built-in corpus. The final
validation loss of each is the heat map; a run is marked diverged when its loss became
non-finite or ended no better than guessing uniformly over the vocabulary (ln V). The stable
region is the set of runs within `--tolerance` nats of the best one.
"""

import math

import numpy as np

from tinyllm.lab import common

SMOKE = dict(steps=6, lrs=[3e-3, 3.0], warmups=[0, 2], layers=1, d_model=16)


def add_arguments(p):
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    p.add_argument("--lrs", type=common.number_list(float), metavar="LR,LR,...",
                   default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
                   help="peak learning rates (default 1e-3,3e-3,1e-2,3e-2,1e-1)")
    p.add_argument("--warmups", type=common.number_list(int), metavar="N,N,...",
                   default=[0, 30, 100], help="warmup lengths in steps (default 0,30,100)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    p.add_argument("--d-model", type=int, default=64, help="model width (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--tolerance", type=float, default=0.1,
                   help="nats above the best final loss still counted stable (default 0.1)")


def run(args):
    from tinyllm.cli import UsageError

    if args.steps < 1 or args.layers < 1 or args.d_model < 4 or args.d_model % 4:
        raise UsageError("--steps and --layers must be positive, --d-model a multiple of 4")
    if max(args.warmups) >= args.steps:
        raise UsageError(f"--warmups: each must be below --steps {args.steps}, "
                         f"got {max(args.warmups)}")
    model = dict(common.SMALL_MODEL, n_layers=args.layers, d_model=args.d_model)
    grid = np.full((len(args.warmups), len(args.lrs)), math.nan)
    status, rows, curves = {}, [], {}
    for i, warmup in enumerate(args.warmups):
        for j, lr in enumerate(args.lrs):
            c = common.train(f"warmup {warmup}, lr {lr:g}", args.steps, args.device, model,
                             lr=lr, min_lr=lr / 10, warmup=warmup, batch_size=args.batch_size,
                             seed=args.seed)
            uniform = math.log(c.run.tokenizer.vocab_size)
            if c.diverged:
                why = "diverged (" + c.diverged.split(" at ")[0].replace("the ", "") + \
                      (f" at step {c.diverged.rsplit(' ', 1)[-1]})" if " at step " in c.diverged
                       else ")")
            elif c.final_val >= uniform:
                why = "diverged (no better than uniform)"
            else:
                why = "ok"
            if why == "ok":
                grid[i, j] = c.final_val
            status[warmup, lr] = why
            curves[warmup, lr] = c
            rows.append([warmup, f"{lr:g}", c.final_val if why == "ok" else math.nan,
                         min(c.loss) if c.loss else math.nan, why])
    best = np.nanmin(grid) if np.isfinite(grid).any() else math.nan
    stable = np.isfinite(grid) & (grid <= best + args.tolerance)
    for row, ok in zip(rows, stable.ravel()):
        row.append("yes" if ok else "")
    fig = draw(args, grid, stable, curves)
    return common.Result(
        title="Lab 5: learning-rate schedule (warmup x peak learning rate)",
        question=__doc__.strip().splitlines()[0],
        headers=["warmup steps", "peak lr", "final val loss", "lowest train loss", "status",
                 f"stable (within {args.tolerance:g} of best)"],
        rows=rows, figure=fig, shows=findings(args, grid, stable, status),
        setup=[f"model: {args.layers} layers, d_model {args.d_model}, 4 heads, context 64 "
               f"(llama flavour: RoPE, RMSNorm, SwiGLU), BPE vocabulary 1024",
               f"each run: {args.steps} steps of {args.batch_size} x 64 tokens on the built-in "
               "corpus; AdamW (weight decay 0.1, betas 0.9/0.99), gradient clip 1.0, linear "
               "warmup then cosine to peak/10",
               "final val loss: the last evaluation's mean cross-entropy (nats/token) on fixed "
               "validation windows"],
        data=dict(grid=grid.tolist(), stable=stable.tolist(), status={f"{w},{lr:g}": s for
                                                                       (w, lr), s in status.items()}))


def findings(args, grid, stable, status):
    lrs, warmups = args.lrs, args.warmups
    if not np.isfinite(grid).any():
        return "Every run diverged: lower the learning rates of the grid."
    i, j = np.unravel_index(np.nanargmin(grid), grid.shape)
    text = [f"The lowest final loss, {grid[i, j]:.3f}, came from peak lr {lrs[j]:g} with "
            f"{warmups[i]} warmup steps."]
    widths = []
    for r, w in enumerate(warmups):
        ok = [f"{lrs[c]:g}" for c in range(len(lrs)) if stable[r, c]]
        widths.append(len(ok))
        bad = [f"{lr:g}" for lr in lrs if status[w, lr] != "ok"]
        text.append(f"With {w} warmup steps the stable region is "
                    f"{'lr ' + ', '.join(ok) if ok else 'empty'}"
                    f"{'; diverged at lr ' + ', '.join(bad) if bad else ''}.")
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
    return " ".join(text)


def draw(args, grid, stable, curves):
    fig, (ax, ax2) = common.figure(2, width=6.2, height=4.4)
    masked = np.ma.masked_invalid(grid)
    im = ax.imshow(masked, cmap="viridis_r", aspect="auto")
    ax.set_facecolor("#d62728")  # diverged cells show the background
    ax.set_xticks(range(len(args.lrs)), [f"{lr:g}" for lr in args.lrs])
    ax.set_yticks(range(len(args.warmups)), [str(w) for w in args.warmups])
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("warmup steps")
    for (r, c), v in np.ndenumerate(grid):
        label = "diverged" if math.isnan(v) else f"{v:.3f}" + ("\n(stable)" if stable[r, c] else "")
        ax.text(c, r, label, ha="center", va="center", fontsize=8,
                color="white" if math.isnan(v) else "black")
    fig.colorbar(im, ax=ax, label="final validation loss (nats/token)")
    ax.set_title("final loss; red: diverged")
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for r, w in enumerate(args.warmups):
        ys = grid[r]
        ax2.plot(args.lrs, ys, "o-", color=colors[r % len(colors)], label=f"warmup {w}")
        for lr, y in zip(args.lrs, ys):
            if math.isnan(y):
                ax2.plot([lr], [np.nanmax(grid) if np.isfinite(grid).any() else 0], "x",
                         color=colors[r % len(colors)], ms=10)
    ax2.set_xscale("log")
    ax2.set_xlabel("peak learning rate")
    ax2.set_ylabel("final validation loss")
    ax2.set_title("x: diverged (drawn at the top)")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    return fig
