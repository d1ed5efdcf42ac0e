"""How do RoPE, learned, sinusoidal and no positions compare, within and beyond the trained length?

The same small model is trained four times, once per position scheme, on windows of `--train-length`
tokens; each model's context is `--factor` times longer, so it can be asked about sequences
longer than any it trained on (learned positions past the trained length keep their random
initial values; RoPE and sinusoidal extend by formula; "none" has only the causal mask). Then
every model reads the same validation windows of factor x train-length tokens, and the loss at
each position is averaged over the windows: positions up to the trained length measure the
scheme, the ones past it measure how it extrapolates.
"""

import math

import numpy as np

from tinyllm import data as data_mod
from tinyllm.lab import common

SCHEMES = ("rope", "learned", "sinusoidal", "none")
SMOOTH = 9  # positions in the plot's moving mean: one position's mean over the windows is noisy
SMOKE = dict(steps=4, layers=1, d_model=16, train_length=8, windows=4)


def add_arguments(p):
    from tinyllm.cli import positive_float, positive_int

    p.add_argument("--steps", type=positive_int, default=800,
                   help="optimizer steps per run (default 800)")
    p.add_argument("--train-length", type=positive_int, default=64,
                   help="tokens per training window (default 64)")
    p.add_argument("--factor", type=positive_int, default=4,
                   help="the longest evaluation window, in trained lengths (default 4)")
    p.add_argument("--layers", type=positive_int, default=2, help="transformer blocks (default 2)")
    p.add_argument("--d-model", type=positive_int, default=64, help="model width (default 64)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="sequences per step (default 16)")
    p.add_argument("--lr", type=positive_float, default=3e-3,
                   help="peak learning rate (default 3e-3)")
    p.add_argument("--windows", type=positive_int, default=64,
                   help="validation windows of the long evaluation (default 64)")


def loss_per_position(run, length, n_windows):
    """Mean cross-entropy (nats) at each position 0..length-1 over `n_windows` fixed
    validation windows of `length` tokens (the same windows for every model)."""
    import autograd
    from autograd import backend

    starts = data_mod.eval_windows(run.dataset.val, length, n_windows)
    totals, count = np.zeros(length), 0
    run.model.eval()
    with autograd.no_grad():
        for i in range(0, len(starts), run.cfg.batch_size):
            x, y = data_mod.windows_at(run.dataset.val, starts[i:i + run.cfg.batch_size], length)
            logits, _ = run.model(run._dev(x))
            z = backend.to_device(logits.data, "cpu").astype(np.float64)
            z -= z.max(axis=-1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # log-softmax
            totals += -np.take_along_axis(logp, y[..., None], axis=-1)[..., 0].sum(axis=0)
            count += len(x)
    run.model.train()
    return totals / count


def bands_of(T, L):
    """Position bands [a, b): the trained length, then doublings up to L."""
    bands, a = [(0, T)], T
    while a < L:
        bands.append((a, min(2 * a, L)))
        a = bands[-1][1]
    return bands


def run(args):
    from tinyllm.cli import UsageError

    if args.factor < 2:
        raise UsageError(f"--factor: must be at least 2 (to evaluate past the trained length), "
                         f"got {args.factor}")
    T, L = args.train_length, args.factor * args.train_length
    model = dict(common.SMALL_MODEL, n_layers=args.layers, d_model=args.d_model, context_length=L)
    rows, data, curves = [], {}, {}
    for scheme in SCHEMES:
        c = common.train(scheme, args.steps, args.device, dict(model, positions=scheme),
                         block_size=T, lr=args.lr, min_lr=args.lr / 10,
                         batch_size=args.batch_size, seed=args.seed)
        per_pos = loss_per_position(c.run, L, args.windows) if not c.diverged else \
            np.full(L, math.nan)
        bands = bands_of(T, L)
        band_loss = [float(per_pos[a:b].mean()) for a, b in bands]
        curves[scheme] = (c, per_pos)
        data[scheme] = dict(val_loss=c.final_val, bands=band_loss, seconds=c.elapsed_s,
                            params=c.run.model.num_params(non_embedding=False))
        rows.append([scheme, c.final_val] + band_loss + [f"{c.elapsed_s:.0f}"])
    band_names = [f"positions {a + 1}-{b}" for a, b in bands]
    return common.Result(
        title="Lab 2: positional encodings (RoPE, learned, sinusoidal, none)",
        question=__doc__.strip().splitlines()[0],
        headers=["positions", f"val loss, windows of {T}"]
                + [f"{n} of {L}-token windows" for n in band_names] + ["train seconds"],
        rows=rows, draw=lambda: draw(curves, T, args), shows=findings(data, bands, T),
        setup=[f"model: {args.layers} layers, d_model {args.d_model}, 4 heads, context {L}, "
               "llama flavour (RMSNorm, SwiGLU) with the position scheme swapped; BPE "
               "vocabulary 1024",
               f"each run: {args.steps} steps of {args.batch_size} x {T} tokens on the built-in "
               f"corpus, peak lr {args.lr:g}, cosine to a tenth",
               f"long evaluation: {args.windows} validation windows of {L} tokens, the loss at "
               "each position averaged over them (the bands in the table are means over their "
               "positions)"],
        data=data)


def findings(data, bands, T):
    ok = [s for s in SCHEMES if math.isfinite(data[s]["val_loss"])]
    if not ok:
        return "Every run diverged."
    best = min(ok, key=lambda s: data[s]["val_loss"])
    worst = max(ok, key=lambda s: data[s]["val_loss"])
    text = (f"At the trained length {best} reached the lowest validation loss "
            f"({data[best]['val_loss']:.3f}) and {worst} the highest "
            f"({data[worst]['val_loss']:.3f}).")
    last = bands[-1]
    rise = {s: data[s]["bands"][-1] - data[s]["bands"][0] for s in ok}
    steady = min(ok, key=lambda s: rise[s])
    broke = max(ok, key=lambda s: rise[s])
    text += (f" Past the trained length (positions {last[0] + 1}-{last[1]}) {broke} degraded "
             f"most, by {rise[broke]:+.3f} nats over its loss on the first {T} positions, and "
             f"{steady} least ({rise[steady]:+.3f}).")
    if "none" in ok:
        beaten = [s for s in ok if s != "none" and data[s]["val_loss"] > data["none"]["val_loss"]]
        text += (f" Without any positions the model reached {data['none']['val_loss']:.3f}"
                 + (f", better than {' and '.join(beaten)}" if beaten else "")
                 + ": the causal mask alone lets it tell positions apart.")
    return text


def moving_average(v, width):
    """The mean of each run of `width` values, centred, shorter at the ends."""
    kernel = np.ones(width)
    return np.convolve(v, kernel, "same") / np.convolve(np.ones_like(v), kernel, "same")


def draw(curves, T, args):
    fig, (ax, ax2) = common.figure(2, width=6.0, height=4.2)
    for scheme, (c, per_pos) in curves.items():
        ax.plot(c.val_steps, c.val_loss, "o-", label=scheme)
        ax2.plot(np.arange(1, len(per_pos) + 1), moving_average(per_pos, SMOOTH), label=scheme,
                 lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"validation loss, windows of {T} (nats/token)")
    ax.set_title("training")
    ax.grid(alpha=0.3)
    ax.legend()
    ax2.axvline(T, color="black", ls="--", lw=0.8)
    ax2.text(T, ax2.get_ylim()[1], " trained length", va="top", fontsize=8)
    ax2.set_xlabel("position in the window")
    ax2.set_ylabel("loss at that position (nats)")
    ax2.set_title(f"loss per position, windows of {args.factor * T} "
                  f"(moving mean of {SMOOTH})")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    return fig
