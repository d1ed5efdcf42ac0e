"""Dropout, and the keep masks it and attention's dropout draw.

Every mask starts from the CPU generator: on the CPU its uniforms; on the GPU a hash of the
element's index and a seed drawn from it (`hash_keep`). So one generator state (saved in
training checkpoints) fixes every mask, and activation checkpointing can replay them.
"""

import numpy as np

from autograd import backend, fast
from autograd.tensor import Function


def hash_keep(index, seed, p):
    """Keep element `index` (a uint64 array) when the top 24 bits of splitmix64(seed + index)
    are at least p 2^24: a mask with keep probability 1 - p, the same on any device."""
    u = np.uint64
    z = index + u(seed) + u(0x9E3779B97F4A7C15)
    z = (z ^ (z >> u(30))) * u(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> u(27))) * u(0x94D049BB133111EB)
    z ^= z >> u(31)
    return (z >> u(40)) >= u(int(p * (1 << 24)))


def keep_mask(shape, p, like):
    """A boolean mask of `shape` on `like`'s device, True with probability 1 - p."""
    if backend.is_cupy_array(like):
        from autograd.fast.cuda import graph

        if graph.capturing():  # a seed passed by value would repeat the mask at every replay
            raise graph.CaptureError("dropout outside its CUDA fast path (dtype "
                                     f"{like.dtype}) cannot be captured")
        seed = int(backend.rng("cpu").integers(1 << 63))
        index = backend.get_array_module(like).arange(int(np.prod(shape)), dtype=np.uint64)
        return hash_keep(index, seed, p).reshape(shape)
    return backend.rng("cpu").random(shape, dtype=np.float32) >= p


class Dropout(Function):
    """Inverted dropout: y = x keep / (1 - p), keep drawn per element with probability 1 - p."""

    def __init__(self, p):
        self.p = p

    keep_mask = staticmethod(keep_mask)  # the GPU's fast path draws the same mask in one kernel

    def forward(self, x):
        self.mask = self.keep_mask(x.shape, self.p, x) * x.dtype.type(1 / (1 - self.p))
        return x * self.mask

    def backward(self, g):  # the same mask and scale
        return g * self.mask


def dropout(x, p=0.5, training=True):
    """Zero each element with probability p and scale the rest by 1/(1-p) (inverted dropout)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    return fast.pick(Dropout, x.data)(p).apply(x)
