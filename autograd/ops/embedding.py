"""Embedding lookup: rows of a weight matrix picked by integer ids."""

from autograd import backend, fast
from autograd.ops.common import xp_of
from autograd.tensor import Function, Tensor


class Embedding(Function):
    def __init__(self, idx):
        self.idx = idx

    def forward(self, w):
        self.shape = w.shape
        return w[self.idx]

    def backward(self, g):  # each row of W gets the sum of the gradients of its lookups
        xp = xp_of(g)
        gw = xp.zeros(self.shape, dtype=g.dtype)
        xp.add.at(gw, self.idx.reshape(-1), g.reshape(-1, self.shape[1]))  # a scatter-add
        return gw


def embedding(weight, idx):
    """Rows of `weight` (num_embeddings, dim) picked by the integer array `idx` of any shape."""
    idx = idx.data if isinstance(idx, Tensor) else idx
    idx = idx if backend.is_cupy_array(idx) else weight.xp.asarray(idx)  # GPU ids: checked below
    if idx.dtype.kind not in "iu":
        raise TypeError(f"embedding: indices must be integers, not {idx.dtype}")
    if backend.device_of(idx) != weight.device:
        raise RuntimeError(f"embedding: indices on {backend.device_of(idx)}, weight on {weight.device}")
    n = weight.shape[0]
    if idx.size and not fast.capturing() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        bad = int(idx.max()) if int(idx.max()) >= n else int(idx.min())
        raise IndexError(f"embedding: token id {bad} is out of range for {n} embeddings")
    return fast.pick(Embedding, weight.data)(idx).apply(weight)
