"""Reductions over axes: sum, mean, max, var."""

import numpy as np

from autograd.ops.common import axes_of, xp_of
from autograd.tensor import Function


def unreduce(g, shape, axes, keepdims):
    """Put reduced axes back as size 1, then broadcast g over the input's shape."""
    xp = xp_of(g)
    if not keepdims:
        g = xp.expand_dims(g, axes) if axes else g
    return xp.broadcast_to(g, shape)


class Sum(Function):
    def __init__(self, axes, keepdims):
        self.axes, self.keepdims = axes, keepdims

    def forward(self, x):
        self.shape = x.shape
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, g):  # every summed element gets the gradient of the sum
        return unreduce(g, self.shape, self.axes, self.keepdims)


class Max(Function):
    def __init__(self, axes, keepdims):
        self.axes, self.keepdims = axes, keepdims

    def forward(self, x):
        self.x = x
        self.y = x.max(axis=self.axes, keepdims=True)
        return self.y if self.keepdims else self.y.reshape(
            [n for i, n in enumerate(x.shape) if i not in self.axes])

    def backward(self, g):  # to the maximal elements, shared equally among ties
        winners = self.x == self.y
        count = winners.sum(axis=self.axes, keepdims=True)
        return unreduce(g, self.x.shape, self.axes, self.keepdims) * winners / count


class Var(Function):
    def __init__(self, axes, keepdims, ddof):
        self.axes, self.keepdims, self.ddof = axes, keepdims, ddof

    def forward(self, x):
        n = int(np.prod([x.shape[a] for a in self.axes]))
        self.centered = x - x.mean(axis=self.axes, keepdims=True)
        self.scale = 2.0 / (n - self.ddof)
        return (self.centered * self.centered).sum(axis=self.axes, keepdims=self.keepdims) * (self.scale / 2)

    def backward(self, g):  # d/dx_i sum (x_j - mean)^2 / (n - ddof) = 2 (x_i - mean) / (n - ddof)
        g = unreduce(g, self.centered.shape, self.axes, self.keepdims)
        return g * self.centered * self.scale


def sum(x, axis=None, keepdims=False):
    return Sum(axes_of(axis, x.ndim), keepdims).apply(x)


def mean(x, axis=None, keepdims=False):
    axes = axes_of(axis, x.ndim)
    n = int(np.prod([x.shape[a] for a in axes]))
    return sum(x, axes, keepdims) * (1.0 / n)


def max(x, axis=None, keepdims=False):
    axes = axes_of(axis, x.ndim)
    if any(x.shape[a] == 0 for a in axes):
        raise ValueError(f"max: cannot reduce an empty axis of shape {x.shape}")
    return Max(axes, keepdims).apply(x)


def var(x, axis=None, keepdims=False, ddof=0):
    """Variance over `axis`, divided by n - ddof (ddof=0, NumPy's default)."""
    return Var(axes_of(axis, x.ndim), keepdims, ddof).apply(x)
