"""Shapes and indexing: reshape, transpose, broadcast_to, squeeze/unsqueeze, concat, stack,
split, getitem. Each backward moves the gradient back to where the input's elements were."""

import builtins

import numpy as np

from autograd import backend
from autograd.ops.common import axes_of, xp_of
from autograd.tensor import Function, Tensor

builtins_sum = builtins.sum


class Reshape(Function):
    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.src = x.shape
        return x.reshape(self.shape)

    def backward(self, g):
        return g.reshape(self.src)


class Transpose(Function):
    def __init__(self, axes):
        self.axes = axes

    def forward(self, x):
        return x.transpose(self.axes)

    def backward(self, g):  # apply the inverse permutation
        return g.transpose(np.argsort(self.axes))


class BroadcastTo(Function):
    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        return xp_of(x).broadcast_to(x, self.shape)

    def backward(self, g):  # the engine sums the copies back (backend.sum_to)
        return g


def reshape(x, shape):
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    known = int(np.prod([n for n in shape if n != -1]))
    if shape.count(-1) > 1 or (-1 not in shape and known != x.size) or (
        -1 in shape and (known == 0 or x.size % known)
    ):
        raise ValueError(f"reshape: cannot reshape a tensor of shape {x.shape} into {shape}")
    return Reshape(shape).apply(x)


def transpose(x, axes=None):
    axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(a % x.ndim for a in axes)
    if sorted(axes) != list(range(x.ndim)):
        raise ValueError(f"transpose: {axes} is not a permutation of the axes of shape {x.shape}")
    return Transpose(axes).apply(x)


def swapaxes(x, a, b):
    axes = list(range(x.ndim))
    axes[a], axes[b] = axes[b], axes[a]
    return Transpose(tuple(axes)).apply(x)


def broadcast_to(x, shape):
    shape = tuple(shape)
    try:
        if np.broadcast_shapes(x.shape, shape) != shape:
            raise ValueError
    except ValueError:
        raise ValueError(f"broadcast_to: cannot broadcast shape {x.shape} to {shape}") from None
    return BroadcastTo(shape).apply(x)


def squeeze(x, axis=None):
    axes = [a for a in range(x.ndim) if x.shape[a] == 1] if axis is None else axes_of(axis, x.ndim)
    for a in axes:
        if x.shape[a] != 1:
            raise ValueError(f"squeeze: axis {a} of shape {x.shape} has size {x.shape[a]}, not 1")
    return reshape(x, [n for i, n in enumerate(x.shape) if i not in axes])


def unsqueeze(x, axis):
    ndim = x.ndim + 1
    if not -ndim <= axis < ndim:
        raise ValueError(f"unsqueeze: axis {axis} out of range for a result of {ndim} dimensions")
    shape = list(x.shape)
    shape.insert(axis % ndim, 1)
    return reshape(x, shape)


class Concat(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        self.bounds = np.cumsum([x.shape[self.axis] for x in xs])[:-1]
        return xp_of(xs[0]).concatenate(xs, axis=self.axis)

    def backward(self, g):  # each input gets its own slab of the gradient
        return tuple(xp_of(g).split(g, self.bounds, axis=self.axis))


def concat(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concat: needs at least one tensor")
    ndim = tensors[0].ndim
    axis = axes_of(axis, ndim)[0]
    for t in tensors:
        if t.ndim != ndim or any(t.shape[i] != tensors[0].shape[i] for i in range(ndim) if i != axis):
            raise ValueError(
                f"concat: shapes {tensors[0].shape} and {t.shape} differ outside axis {axis}"
            )
    return Concat(axis).apply(*tensors)


def stack(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack: needs at least one tensor")
    for t in tensors:
        if t.shape != tensors[0].shape:
            raise ValueError(f"stack: shapes {tensors[0].shape} and {t.shape} differ")
    return concat([unsqueeze(t, axis) for t in tensors], axis)


def split(x, sizes, axis=0):
    """Split along `axis` into pieces of the given sizes (a list), or into n equal parts (an int)."""
    axis = axes_of(axis, x.ndim)[0]
    n = x.shape[axis]
    if isinstance(sizes, int):
        if n % sizes:
            raise ValueError(f"split: axis {axis} of size {n} does not split into {sizes} equal parts")
        sizes = [n // sizes] * sizes
    if builtins_sum(sizes) != n:
        raise ValueError(f"split: sizes {list(sizes)} do not add up to {n} (axis {axis} of {x.shape})")
    out, start = [], 0
    for s in sizes:
        key = (slice(None),) * axis + (slice(start, start + s),)
        out.append(getitem(x, key))
        start += s
    return out


# ---- indexing -------------------------------------------------------------------------------

def _is_basic(key):
    return all(k is None or k is Ellipsis or isinstance(k, (int, slice)) for k in key)


def check_index_bounds(key, shape):
    """Raise IndexError for integer indices out of range (CuPy would not raise by itself)."""
    n_real = builtins_sum(1 for k in key if k is not None and k is not Ellipsis and not (
        hasattr(k, "dtype") and k.dtype == bool)) + builtins_sum(
        k.ndim - 1 for k in key if hasattr(k, "dtype") and k.dtype == bool)
    axis = 0
    for k in key:
        if k is None:
            continue
        if k is Ellipsis:
            axis += len(shape) - n_real
            continue
        if axis >= len(shape):
            raise IndexError(f"too many indices for a tensor of shape {shape}")
        if hasattr(k, "dtype") and k.dtype == bool:
            if k.shape != shape[axis:axis + k.ndim]:
                raise IndexError(f"boolean mask of shape {k.shape} does not match shape {shape} at axis {axis}")
            axis += k.ndim
            continue
        if isinstance(k, int) or hasattr(k, "dtype"):
            size = shape[axis]
            if getattr(k, "size", 1) > 0:
                lo, hi = (int(k.min()), int(k.max())) if hasattr(k, "dtype") else (k, k)
                if lo < -size or hi >= size:
                    bad = hi if hi >= size else lo
                    raise IndexError(f"index {bad} is out of range for axis {axis} of size {size}")
        axis += 1


class GetItem(Function):
    def __init__(self, key):
        self.key = key

    def forward(self, x):
        self.shape, self.dtype = x.shape, x.dtype
        return x[self.key]

    def backward(self, g):
        # y = x[key] picks elements; dx is g scattered back to where they came from, summed
        # where an index repeats (xp.add.at), a plain assignment for slices.
        xp = xp_of(g)
        gx = xp.zeros(self.shape, dtype=g.dtype)
        if _is_basic(self.key):
            gx[self.key] = g
        else:
            xp.add.at(gx, self.key, g)
        return gx


def getitem(x, key):
    key = key if isinstance(key, tuple) else (key,)
    xp = x.xp
    parts = []
    for k in key:
        if isinstance(k, Tensor):
            k = k.data
        elif isinstance(k, (list, np.ndarray)) and xp is not np:
            k = xp.asarray(k)
        elif isinstance(k, list):
            k = np.asarray(k)
        if hasattr(k, "dtype"):
            if backend.device_of(k) != x.device:
                raise RuntimeError(f"index on {backend.device_of(k)} for a tensor on {x.device}")
            if k.dtype != bool and k.dtype.kind not in "iu":
                raise IndexError(f"indices must be integers or booleans, not {k.dtype}")
        parts.append(k)
    key = tuple(parts)
    check_index_bounds(key, x.shape)
    return GetItem(key).apply(x)
