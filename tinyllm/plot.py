"""`tinyllm plot RUN_DIR`: the loss curves of a run (metrics.jsonl) drawn to a PNG; for an RL
run (`tinyllm rl`), its reward, held-out figures, KL and completion length.

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


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("tinyllm plot needs matplotlib: pip install 'tinyllm[plot]' "
                           "(or pip install matplotlib)") from None
    return plt


def plot_run(run_dir, out=None, log_y=False):
    """Draw training and validation loss (and the learning rate) against the step, or an RL
    run's curves (`plot_rl`); returns the PNG path (default RUN_DIR/loss.png)."""
    if not (Path(run_dir) / "metrics.jsonl").exists():
        read_metrics(run_dir)  # names the missing folder or file, before matplotlib
    plt = _pyplot()
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
    plt = _pyplot()
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
