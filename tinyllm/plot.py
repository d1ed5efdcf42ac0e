"""`tinyllm plot RUN_DIR`: the loss curves of a run (metrics.jsonl) drawn to a PNG; for an RL
run (`tinyllm rl`), its reward, held-out figures, KL and completion length;
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
    """Draw training and validation loss (and the learning rate) against the step, or an RL
    run's curves (`plot_rl`); returns the PNG path (default RUN_DIR/loss.png)."""
    if not (Path(run_dir) / "metrics.jsonl").exists():
        read_metrics(run_dir)  # names the missing folder or file, before matplotlib
    plt = pyplot()
    train, val = read_metrics(run_dir)
    if not train and not val:
        raise ValueError(f"{run_dir}: metrics.jsonl has no records yet")
    if any("reward" in r for r in train):
        return plot_rl(run_dir, train, out)
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


def _smooth(values, window):
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_rl(run_dir, records, out=None):
    """Four panels of an RL run against the step: the mean training reward (and its running
    mean), the held-out figures of each evaluation (pass@1, per task, mean reward), the KL
    to the starting model (beta > 0) and the mean completion length."""
    plt = pyplot()
    steps = [r["step"] for r in records if "reward" in r]
    train = [r for r in records if "reward" in r]
    evals = [r for r in records if "eval_n" in r]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    reward = [r["reward"] for r in train]
    ax.plot(steps, reward, color="tab:blue", alpha=0.3, lw=0.8, label="each step")
    window = max(1, len(reward) // 20)
    ax.plot(steps, _smooth(reward, window), color="tab:blue", label=f"mean of {window} steps")
    ax.set_title("training reward (mean over the step's completions)")
    ax.legend()
    ax = axes[0][1]
    keys = [k for k in evals[0] if k.startswith("pass@")] if evals else []
    for k in keys:
        ax.plot([r["step"] for r in evals], [r[k] for r in evals], "o-", ms=3,
                lw=2 if k == "pass@1" else 1, label=k.replace("pass@1_", ""))
    if keys:
        ax.set_ylabel("pass@1 (exact answers)")
        ax.legend(fontsize=8, loc="upper left")
    if evals and "heldout_reward" in evals[0]:  # a reward model's scale: an axis of its own
        ax2 = ax.twinx() if keys else ax
        ax2.plot([r["step"] for r in evals], [r["heldout_reward"] for r in evals], "s--",
                 color="black", label="mean reward")
        ax2.set_ylabel("mean reward of the answers")
        ax2.legend(fontsize=8, loc="lower right")
    ax.set_title(f"held-out ({evals[0]['eval_n']} prompts, greedy)" if evals else "held-out")
    ax = axes[1][0]
    if "kl" in train[0]:
        ax.plot(steps, [r["kl"] for r in train], color="tab:red")
        ax.set_title("KL to the starting model (k3, per token)")
    else:
        ax.plot(steps, [r["entropy"] for r in train], color="tab:purple")
        ax.set_title("entropy of the sampling distribution (nats/token)")
    ax = axes[1][1]
    ax.plot(steps, [r["completion_len"] for r in train], color="tab:green")
    ax.set_title("mean completion length (tokens)")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).resolve().name)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=110)
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
