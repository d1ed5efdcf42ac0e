"""Argument checks shared by the op families (no math here)."""

import builtins

import numpy as np

from autograd import backend
from autograd.tensor import Tensor

xp_of = backend.get_array_module


def axes_of(axis, ndim):
    """Normalize an axis argument to a sorted tuple of non-negative axes (all when None)."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    out = []
    for a in axis:
        if not -ndim <= a < builtins.max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor of {ndim} dimensions")
        out.append(a % builtins.max(ndim, 1))
    return tuple(sorted(out))


def check_broadcast(name, a, b):
    sa = a.shape if isinstance(a, Tensor) else np.shape(a)
    sb = b.shape if isinstance(b, Tensor) else np.shape(b)
    try:
        np.broadcast_shapes(sa, sb)
    except ValueError:
        raise ValueError(f"{name}: shapes {sa} and {sb} cannot be broadcast together") from None


def data(*tensors):
    """The arrays of the tensors among the arguments (for fast.pick)."""
    return [t.data for t in tensors if isinstance(t, Tensor)]
