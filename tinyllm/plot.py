"""`tinyllm plot RUN_DIR`: the loss curves of a run (metrics.jsonl) drawn to a PNG.

matplotlib is an optional extra (`pip install 'tinyllm[plot]'`), imported only here.
"""

import json
import sys
from pathlib import Path


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


def cmd_plot(args):
    try:
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
    p.set_defaults(func=cmd_plot)
    return p
