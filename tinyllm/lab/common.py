"""What every lab experiment needs: train a small model for a budget of steps and keep its
curves, draw the figure, and write the experiment's page (docs/lab/NAME.md) with its table,
plot, command, machine, date and wall time.

Training goes through `tinyllm.train` (TrainConfig, Run.fit) on the built-in corpus, so an
experiment measures the same loop that `tinyllm train` runs; a run that needs other batches
(packing) passes a Run subclass.
"""

import datetime
import math
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinyllm.atomic import atomic_write
from tinyllm.plot import pyplot, read_metrics
from tinyllm.train import Run, TrainConfig, validate_train

# The lab's small model: trains to a readable loss on the built-in corpus in seconds on a CPU.
SMALL_MODEL = dict(n_layers=2, d_model=64, n_heads=4, context_length=64)


@dataclass
class Curves:
    """One training run's measured curves: train loss (the mean over each log interval) and
    validation loss against the step; `diverged` names why it stopped early (None: it did not)."""
    label: str
    steps: list
    loss: list
    val_steps: list
    val_loss: list
    elapsed_s: float
    diverged: str | None
    run: Run = field(repr=False)  # the model, tokenizer and data, for more measurements
    monitor: list = field(default_factory=list)  # (step, figures) of a run with monitor=True
    tokens_per_s: list = field(default_factory=list)  # each log line's (evaluations left out)

    @property
    def final_val(self):
        """The last validation loss, nan for a run that diverged before any."""
        return self.val_loss[-1] if self.val_loss and not self.diverged else math.nan


def train(label, steps, device="cpu", model=None, run_class=Run, **settings):
    """Train a model of `model` settings (default SMALL_MODEL, laptop preset's llama flavour)
    for `steps` on the built-in corpus; `settings` are TrainConfig fields. Returns its Curves."""
    folder = tempfile.mkdtemp(prefix="tinyllm-lab-")
    try:
        base = dict(data="builtin", steps=steps, device=device, model=dict(model or SMALL_MODEL),
                    batch_size=8, warmup=min(30, steps // 10), log_every=max(1, steps // 20),
                    eval_every=max(1, steps // 4), eval_iters=8, sample_tokens=0, quiet=True,
                    out=folder)
        base.update(settings)
        cfg = validate_train(TrainConfig(**base))
        run = run_class(cfg)
        summary = run.fit()
        train_recs, val_recs = read_metrics(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return Curves(label, [r["step"] for r in train_recs], [r["loss"] for r in train_recs],
                  [r["step"] for r in val_recs], [r["val_loss"] for r in val_recs],
                  summary["elapsed_s"], summary["diverged"], run,
                  [(r["step"], r["monitor"]) for r in train_recs if "monitor" in r],
                  [r["tokens_per_s"] for r in train_recs])


# ---- the page ----------------------------------------------------------------------------------

@dataclass
class Result:
    """What an experiment's run() returns: the page's title, a table of the measured figures,
    how to draw the plot (measuring needs no matplotlib), what it shows (sentences written
    from the numbers), and how it was set up. `data` keeps the raw numbers, for tests and for
    anyone importing the experiment."""
    title: str
    question: str
    headers: list
    rows: list
    draw: object  # () -> a matplotlib Figure: drawn when the page is written
    shows: str
    setup: list = field(default_factory=list)  # lines: model, steps, batch, ...
    data: dict = field(default_factory=dict)


def fmt(v, digits=4):
    """A table cell: floats to `digits` significant figures, nan as 'diverged'."""
    if isinstance(v, float):
        return "diverged" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(device="cpu"):
    """One line: the CPU and its usable cores, and the GPU when the device is one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    text = f"{cpu_model()}, {cores} cores"
    if device.startswith("cuda"):
        from autograd import backend

        cp = backend.cupy_module()
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        text += f"; GPU: {props['name'].decode()}"
    return text


def save_figure(fig, path):
    """Write a matplotlib figure to `path` as a PNG, all at once or not at all."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    pyplot().close(fig)


def write_page(out, name, result, command, device, wall_s):
    """docs/lab/NAME.md and NAME.png under `out`; returns the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_figure(result.draw(), out / f"{name}.png")
    setup = "".join(f"- {line}\n" for line in result.setup)
    text = (f"# {result.title}\n\n"
            f"**Question.** {result.question}\n\n"
            f"![{name}]({name}.png)\n\n"
            f"{markdown_table(result.headers, result.rows)}\n\n"
            f"## What it shows\n\n{result.shows}\n\n"
            f"## How it ran\n\n{setup}"
            f"- command: `{command}`\n"
            f"- machine: {machine(device)}\n"
            f"- date: {datetime.date.today().isoformat()}\n"
            f"- wall time: {wall_s:.0f} s"
            + (" (a shared CPU: other work ran at the same time, so times are inflated)"
               if device == "cpu" else "") + "\n")
    page = out / f"{name}.md"
    with atomic_write(page, "w", encoding="utf-8") as f:
        f.write(text)
    return page


def figure(ncols=1, width=6.0, height=4.0):
    """A new matplotlib figure with `ncols` axes side by side: (fig, axes list)."""
    plt = pyplot("tinyllm lab")
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def number_list(kind=float, low=0):
    """An argparse type: a comma-separated list of numbers, each >= `low` ("1e-3,3e-3")."""
    def parse(text):
        import argparse

        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, "
                                             f"got {text!r}") from None
        if not values or any(not math.isfinite(v) or v < low for v in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= {low}, "
                                             f"got {text!r}")
        return values
    parse.__name__ = f"{kind.__name__} list"
    return parse


def unigram_loss(run):
    """Cross-entropy, on the targets of the validation windows the runs are scored on, of the
    training tokens' frequencies (add-one): the loss of a model that ignores the context."""
    counts = np.bincount(np.asarray(run.dataset.train), minlength=run.tokenizer.vocab_size)
    logp = np.log((counts + 1.0) / (counts.sum() + len(counts)))
    targets = np.concatenate([y.ravel() for _, y in run.val_batches()])
    return float(-logp[targets].mean())
