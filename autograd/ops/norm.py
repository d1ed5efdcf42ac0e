"""Normalization over the last axis: LayerNorm and RMSNorm."""

from autograd import fast
from autograd.ops.common import data, xp_of
from autograd.tensor import Function


def _rows_sum(a):
    """Sum over every axis but the last: a weight's gradient gathers all rows."""
    return a.reshape(-1, a.shape[-1]).sum(axis=0)


class LayerNorm(Function):
    """y = xhat w + b, xhat = (x - mean(x)) / sqrt(var(x) + eps), over the last axis."""

    def __init__(self, eps):
        self.eps = eps

    def forward(self, x, w=None, b=None):
        mu = x.mean(axis=-1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
        self.rstd = 1 / xp_of(x).sqrt(var + self.eps)
        self.xhat = (x - mu) * self.rstd
        self.w = w
        y = self.xhat if w is None else self.xhat * w
        return y if b is None else y + b

    def backward(self, g):
        # With gh = dL/dxhat = g w:  dx = rstd (gh - mean(gh) - xhat mean(gh xhat))
        # (the mean's and the variance's dependence on every x of the row).
        xhat = self.xhat
        gh = g if self.w is None else g * self.w
        gx = self.rstd * (gh - gh.mean(axis=-1, keepdims=True)
                          - xhat * (gh * xhat).mean(axis=-1, keepdims=True))
        gw = _rows_sum(g * xhat) if self.w is not None else None  # y = xhat w + b
        gb = _rows_sum(g) if len(self.needs_grad) > 2 else None
        return (gx, gw, gb)[: len(self.needs_grad)]


class RMSNorm(Function):
    """y = xhat w, xhat = x / sqrt(mean(x^2) + eps), over the last axis."""

    def __init__(self, eps):
        self.eps = eps

    def forward(self, x, w=None):
        self.rstd = 1 / xp_of(x).sqrt((x * x).mean(axis=-1, keepdims=True) + self.eps)
        self.xhat = x * self.rstd
        self.w = w
        return self.xhat if w is None else self.xhat * w

    def backward(self, g):
        # With gh = g w:  dx = rstd (gh - xhat mean(gh xhat))
        xhat = self.xhat
        gh = g if self.w is None else g * self.w
        gx = self.rstd * (gh - xhat * (gh * xhat).mean(axis=-1, keepdims=True))
        gw = _rows_sum(g * xhat) if self.w is not None else None
        return gx, gw


def _check_norm(name, x, w):
    if w is not None and w.shape != (x.shape[-1],):
        raise ValueError(f"{name}: weight of shape {w.shape} for input of shape {x.shape}")


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    _check_norm("layer_norm", x, weight)
    _check_norm("layer_norm", x, bias)
    if bias is not None and weight is None:
        raise ValueError("layer_norm: a bias needs a weight")
    inputs = [t for t in (x, weight, bias) if t is not None]
    return _with_low_copy(fast.pick(LayerNorm, *data(*inputs))(eps), inputs)


def rms_norm(x, weight=None, eps=1e-6):
    _check_norm("rms_norm", x, weight)
    inputs = [t for t in (x, weight) if t is not None]
    return _with_low_copy(fast.pick(RMSNorm, *data(*inputs))(eps), inputs)


def _with_low_copy(fn, inputs):
    """fn applied; a low-precision copy of the output that a fast path wrote beside it
    (`out_low`) becomes the output's shared copy (ops.linalg.shared_low_copy), so the products
    that read the norm's output need no cast of it."""
    y = fn.apply(*inputs)
    low = fn.__dict__.pop("out_low", None)
    if low is not None and y._ctx is not None:
        y._low_copy = low
    return y
