"""Softmax, log-softmax and the cross-entropy losses (of logits, and of a linear head)."""

import builtins

import numpy as np

from autograd import amp, backend, fast
from autograd.ops.common import axes_of, data, xp_of
from autograd.ops.linalg import mm, mm_into
from autograd.tensor import Function, Tensor


class Softmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        xp = xp_of(x)
        e = xp.exp(x - x.max(axis=self.axis, keepdims=True))  # shift: same result, no overflow
        self.y = e / e.sum(axis=self.axis, keepdims=True)
        return self.y

    def backward(self, g):  # dx = y * (g - sum(g * y))
        y = self.y
        return y * (g - (g * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        xp = xp_of(x)
        shifted = x - x.max(axis=self.axis, keepdims=True)
        self.y = shifted - xp.log(xp.exp(shifted).sum(axis=self.axis, keepdims=True))
        return self.y

    def backward(self, g):  # dx = g - softmax(x) * sum(g)
        return g - xp_of(g).exp(self.y) * g.sum(axis=self.axis, keepdims=True)


def softmax(x, axis=-1):
    return Softmax(axes_of(axis, x.ndim)[0]).apply(x)


def log_softmax(x, axis=-1):
    return LogSoftmax(axes_of(axis, x.ndim)[0]).apply(x)


# ---- cross-entropy -------------------------------------------------------------------------

def ce_rows(z, t):
    """Per-row loss lse(z_i) - z_i[t_i] and log-sum-exp lse(z_i) of logits z (N, V), targets t (N,)."""
    xp = xp_of(z)
    m = z.max(axis=1)
    shifted_lse = xp.log(xp.exp(z - m[:, None]).sum(axis=1))  # lse - m: no overflow
    # subtract the shifted target logit, not z[t] from lse: for large logits in float32,
    # lse - z[t] would lose the small loss to rounding at the logits' magnitude
    return shifted_lse - (z[xp.arange(z.shape[0]), t] - m), m + shifted_lse


def ce_row_grads(z, t, lse, scale):
    """dz_i = (softmax(z_i) - onehot(t_i)) * scale_i, from the saved log-sum-exps."""
    xp = xp_of(z)
    p = xp.exp(z - lse[:, None])  # softmax(z_i)
    p[xp.arange(p.shape[0]), t] -= 1
    return p * scale[:, None]


def ce_row_weights(g, keep, count, reduction):
    """Each row's dL/dloss_i: the upstream g (per row for "none", /count for "mean"), 0 if ignored."""
    if reduction == "none":
        return g.reshape(-1) * keep
    if reduction == "sum":
        return g * keep
    return (g / count) * keep


def ce_reduce(fn, losses, keep, shape, reduction):
    """The per-row losses reduced as asked; "mean" keeps the count of kept rows on fn."""
    if reduction == "none":
        return losses.reshape(shape)
    if reduction == "sum":
        return losses.sum()
    fn.count = keep.sum().astype(losses.dtype)  # an int64 count would make a float32 loss float64
    return losses.sum() / fn.count  # nan when every target is ignored, as in PyTorch


class CrossEntropy(Function):
    rows = staticmethod(ce_rows)  # the fast paths replace these two
    row_grads = staticmethod(ce_row_grads)

    def __init__(self, targets, ignore_index, reduction):
        self.targets, self.ignore_index, self.reduction = targets, ignore_index, reduction

    def forward(self, logits):
        # loss_i = logsumexp(z_i) - z_i[t_i], over rows whose target is not ignore_index
        xp = xp_of(logits)
        z = logits.reshape(-1, logits.shape[-1])
        t = self.targets.reshape(-1)
        keep = t != self.ignore_index
        t_safe = xp.where(keep, t, 0)
        losses, lse = self.rows(z, t_safe)
        losses = (losses * keep).astype(z.dtype, copy=False)
        self.z, self.lse, self.t, self.keep, self.shape = z, lse, t_safe, keep, logits.shape
        return ce_reduce(self, losses, keep, logits.shape[:-1], self.reduction)

    def backward(self, g):  # dz_i = (softmax(z_i) - onehot(t_i)) * g, zero for ignored rows
        scale = ce_row_weights(g, self.keep, getattr(self, "count", None), self.reduction)
        return self.row_grads(self.z, self.t, self.lse, scale).reshape(self.shape)


def class_targets(op, targets, like, what, V, ignore_index, reduction):
    """`targets` as an integer array on the device of `like` (logits, or the input of the
    head), checked: dtype, shape like.shape[:-1], device, every kept target in 0..V-1."""
    t = targets.data if isinstance(targets, Tensor) else targets
    t = t if backend.is_cupy_array(t) else like.xp.asarray(t)  # GPU targets: checked below
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: reduction must be mean, sum or none, not {reduction!r}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"{op}: targets must be integers, not {t.dtype}")
    if t.shape != like.shape[:-1]:
        raise ValueError(f"{op}: targets of shape {t.shape} for {what} of shape {like.shape}")
    if backend.device_of(t) != like.device:
        raise RuntimeError(f"{op}: targets on {backend.device_of(t)}, {what} on {like.device}")
    if fast.capturing():  # no host reads in a captured step: StepGraph's caller checks its inputs
        return t
    valid = t[t != ignore_index]
    if valid.size and (int(valid.min()) < 0 or int(valid.max()) >= V):
        bad = int(valid.max()) if int(valid.max()) >= V else int(valid.min())
        raise IndexError(f"{op}: target {bad} is out of range for {V} classes")
    return t


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    """Cross-entropy of `logits` (..., V) against integer `targets` (...).

    Fused: the log-softmax and the pick of the target logit happen in one Function, so no
    one-hot array is made. Rows whose target equals `ignore_index` count for nothing.
    """
    t = class_targets("cross_entropy", targets, logits, "logits", logits.shape[-1], ignore_index, reduction)
    return fast.pick(CrossEntropy, logits.data)(t, ignore_index, reduction).apply(logits)


class LinearCrossEntropy(Function):
    """cross_entropy(linear(x, W), t) without ever holding the (rows, V) logits or their gradient.

    Forward, a chunk of rows at a time: z_c = x_c W^T, then loss_i = lse(z_i) - z_i[t_i].
    Only the per-row lse (N numbers) is kept. Backward recomputes each chunk's logits (one
    more product than linear + cross_entropy) and, with r_i the row's weight dL/dloss_i
    (g, g/count for "mean", 0 for ignored rows):
        dz_c = (softmax(z_c) - onehot(t_c)) * r_c          (as in CrossEntropy)
        dx_c = dz_c W                                      (z = x W^T, as in Linear)
        dW  += dz_c^T x_c                                  (summed over the chunks)
    so the largest array alive is one chunk of logits, (chunk_rows, V). When all the logits
    are one chunk of at most KEEP_LOGITS numbers (small models), forward keeps them and
    backward skips the recomputing product.
    """

    KEEP_LOGITS = 1 << 23  # 32 MB of float32

    def __init__(self, targets, ignore_index, reduction, chunk_rows):
        self.targets, self.ignore_index = targets, ignore_index
        self.reduction, self.chunk_rows = reduction, chunk_rows

    rows = staticmethod(ce_rows)  # the fast paths replace these two
    row_grads = staticmethod(ce_row_grads)

    def _chunks(self, n):
        for a in range(0, n, self.chunk_rows):
            yield slice(a, min(a + self.chunk_rows, n))

    def forward(self, x, w):
        xp = xp_of(x)
        self.shape, self.dtype = x.shape, x.dtype
        # the product operands in bfloat16/float16 under a low-precision mode, as in Linear
        self.x, self.w = amp.low(x).reshape(-1, x.shape[-1]), amp.low(w)
        t = self.targets.reshape(-1)
        self.keep = keep = t != self.ignore_index
        self.t = xp.where(keep, t, 0)
        n = self.x.shape[0]
        losses, self.lse = xp.empty(n, x.dtype), xp.empty(n, x.dtype)
        self.z = None
        for c in self._chunks(n):
            z = mm(self.x[c], self.w, False, True, x.dtype)  # this chunk's logits x_c W^T
            losses[c], self.lse[c] = self.rows(z, self.t[c])
            if n <= self.chunk_rows and z.size <= self.KEEP_LOGITS:
                self.z = z  # one small chunk: kept for backward
        losses *= keep
        return ce_reduce(self, losses, keep, x.shape[:-1], self.reduction)

    def backward(self, g):
        xp = xp_of(g)
        x, w = self.x, self.w
        r = ce_row_weights(g, self.keep, getattr(self, "count", None), self.reduction)
        r = r.astype(self.dtype, copy=False)  # (N,): each row's weight, in the working dtype
        gx = xp.empty(x.shape, self.dtype) if self.needs_grad[0] else None
        gw = xp.zeros(w.shape, self.dtype) if self.needs_grad[1] else None
        for c in self._chunks(x.shape[0]):
            z = self.z if self.z is not None else mm(x[c], w, False, True, self.dtype)  # recomputed
            dz = amp.low(self.row_grads(z, self.t[c], self.lse[c], r[c]))
            del z
            if gx is not None:
                mm_into(gx[c], dz, w, False, False)
            if gw is not None:
                mm_into(gw, dz, x[c], True, False, accumulate=True)
        return (None if gx is None else gx.reshape(self.shape)), gw


def linear_cross_entropy(x, weight, targets, ignore_index=-100, reduction="mean", chunk_rows=None):
    """cross_entropy(linear(x, weight), targets, ...) without the full logits: for an LM head.

    x: (..., d); weight: (V, d) (no bias); targets: integers of shape x.shape[:-1]. The logits
    are made `chunk_rows` rows at a time, forward and again in backward, so memory holds one
    (chunk_rows, V) block instead of all rows x V logits and their gradient. Default: as
    many rows as fit 2^26 logits (256 MB in float32), at least one.
    """
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: input of shape {x.shape} does not fit weight "
                         f"of shape {weight.shape}")
    V = weight.shape[0]
    if chunk_rows is None:
        chunk_rows = builtins.max(1, (1 << 26) // builtins.max(V, 1))
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be a positive integer, not {chunk_rows!r}")
    t = class_targets("linear_cross_entropy", targets, x, "input", V, ignore_index, reduction)
    fn = fast.pick(LinearCrossEntropy, *data(x, weight))
    return fn(t, ignore_index, reduction, int(chunk_rows)).apply(x, weight)
