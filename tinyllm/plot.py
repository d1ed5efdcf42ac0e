"""`tinyllm plot RUN_DIR`: the loss curves of a run (metrics.jsonl) drawn to a PNG;
`tinyllm plot --monitor RUN_DIR`: the training-health monitor's figures per layer.

matplotlib is an optional extra (`pip install 'tinyllm[plot]'`), imported only here.
"""

import json
import sys
from pathlib import Path

import numpy as np


def read_metrics(run_dir):
    """(train, val): lists of metric records from RUN_DIR/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics file (is {run_dir} a training run folder?)")
    train, val = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        (val if "val_loss" in rec else train).append(rec)
    return train, val


def pyplot(command="tinyllm plot"):
    """matplotlib.pyplot on the file-only Agg backend; RuntimeError naming the extra if absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(f"{command} needs matplotlib: pip install 'tinyllm[plot]' "
                           "(or pip install matplotlib)") from None
    return plt


def plot_run(run_dir, out=None, log_y=False):
    """Draw training and validation loss (and the learning rate) against the step; returns
    the PNG path (default RUN_DIR/loss.png)."""
    if not (Path(run_dir) / "metrics.jsonl").exists():
        read_metrics(run_dir)  # names the missing folder or file, before matplotlib
    plt = pyplot()
    train, val = read_metrics(run_dir)
    if not train and not val:
        raise ValueError(f"{run_dir}: metrics.jsonl has no records yet")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        every = train[1]["step"] - train[0]["step"] if len(train) > 1 else 1
        ax.plot([r["step"] for r in train], [r["loss"] for r in train],
                label=f"train loss (mean over {every} steps)",
                color="tab:blue", alpha=0.8)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss",
                color="tab:orange")
        best = min(val, key=lambda r: r["val_loss"])
        ax.annotate(f"best {best['val_loss']:.3f}", (best["step"], best["val_loss"]),
                    textcoords="offset points", xytext=(0, 8), ha="center")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if train and "lr" in train[0]:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in train], [r["lr"] for r in train], color="gray",
                 lw=0.8, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    else:
        ax.legend(loc="upper right")
    ax.set_title(Path(run_dir).resolve().name)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# (key in the monitor's record, panel title, log scale)
MONITOR_PANELS = (("resid_rms", "residual stream RMS after the block", True),
                  ("attn_rms", "attention output RMS", True),
                  ("mlp_rms", "MLP output RMS", True),
                  ("grad_norm", "gradient norm of the block", True),
                  ("update_ratio", "update / weight ratio", True))


def plot_monitor(run_dir, out=None):
    """Draw the monitor's per-layer figures (a run trained with --monitor) against the step,
    one line per layer, and the float16/bfloat16 cast counts when there are any; returns the
    PNG path (default RUN_DIR/monitor.png)."""
    train, _ = read_metrics(run_dir)
    recs = [r for r in train if "monitor" in r]
    if not recs:
        raise ValueError(f"{run_dir}: metrics.jsonl has no monitor figures (train with --monitor)")
    plt = pyplot()
    casts = "overflow" in recs[0]["monitor"]
    panels = MONITOR_PANELS + ((("casts", "cast overflows / underflows", True),) if casts else ())
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    steps = [r["step"] for r in recs]
    n_layers = len(recs[0]["monitor"]["resid_rms"])
    colors = plt.cm.viridis(np.linspace(0, 0.9, n_layers))
    for ax, (key, title, log) in zip(axes.flat, panels):
        if key == "casts":
            for name, style in (("overflow", "-"), ("underflow", "--")):
                ax.plot(steps, [r["monitor"][name] for r in recs], style, label=name)
            ax.legend(fontsize=8)
            ax.set_yscale("symlog")
        else:
            values = np.array([r["monitor"][key] for r in recs], dtype=float)
            for i in range(n_layers):
                ax.plot(steps, values[:, i], color=colors[i], lw=1.2,
                        label=f"layer {i}" if n_layers <= 12 or i % (n_layers // 6) == 0 else None)
            if log and np.all(values[np.isfinite(values)] > 0):
                ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, ncol=2)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{Path(run_dir).resolve().name}: training health per layer")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "monitor.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def cmd_plot(args):
    try:
        if args.monitor:
            out = plot_monitor(args.run_dir, args.output)
        else:
            out = plot_run(args.run_dir, args.output, args.log)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"tinyllm plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def register(subparsers):
    p = subparsers.add_parser("plot", help="draw a run's loss curves to a PNG (needs matplotlib)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run folder (has metrics.jsonl)")
    p.add_argument("-o", "--output", help="PNG path (default RUN_DIR/loss.png)")
    p.add_argument("--log", action="store_true", help="logarithmic loss axis")
    p.add_argument("--monitor", action="store_true",
                   help="draw the per-layer figures of a run trained with --monitor instead "
                        "(default RUN_DIR/monitor.png)")
    p.set_defaults(func=cmd_plot)
    return p
