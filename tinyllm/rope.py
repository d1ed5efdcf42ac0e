"""Rotary position embedding (RoPE), as one Function with its backward.

Each pair of channels (x1_i, x2_i) of a query or key at position t is rotated by the angle
t * theta_i, theta_i = base^(-2i/D), i = 0 .. D/2 - 1:

    y1 = x1 cos - x2 sin
    y2 = x2 cos + x1 sin

A rotation is orthogonal, so the backward is the rotation by the negative angle:

    dx1 =  g1 cos + g2 sin
    dx2 = -g1 sin + g2 cos

Because R(a)^T R(b) = R(b - a), the score q_s . k_t after rotation depends on the positions only
through t - s. Two conventions pair the channels differently:

    "half"        (rotate-half, GPT-NeoX / HF Llama): x1 = x[:D/2], x2 = x[D/2:]
    "interleaved" (the original paper, Meta's Llama code): x1 = x[0::2], x2 = x[1::2]

The cos/sin tables, (context_length, D/2), are computed once and kept as buffers.
"""

import numpy as np

from autograd import backend, kernels
from autograd.nn import Module
from autograd.tensor import Function, Tensor

_PAIRS = {
    "half": lambda D: (slice(0, D // 2), slice(D // 2, None)),
    "interleaved": lambda D: (slice(0, None, 2), slice(1, None, 2)),
}


class Rotate(Function):
    """y = R(t theta) x for x of shape (..., T, D) and tables cos, sin of shape (T, D/2)."""

    def __init__(self, cos, sin, style="half"):
        self.cos, self.sin, self.style = cos, sin, style

    def _rotate(self, x, sign):
        # rotation by sign * angle; writes a fresh C-contiguous array
        if kernels.use(x, self.cos, self.sin):  # on the GPU: the same in one pass
            return kernels.rope_rotate(x, self.cos, self.sin, sign, self.style == "interleaved")
        a, b = _PAIRS[self.style](x.shape[-1])
        x1, x2 = x[..., a], x[..., b]
        c, s = self.cos, (self.sin if sign > 0 else -self.sin)
        y = backend.get_array_module(x).empty(x.shape, dtype=x.dtype)
        y[..., a] = x1 * c - x2 * s
        y[..., b] = x2 * c + x1 * s
        return y

    def forward(self, x):
        return self._rotate(x, +1)

    def backward(self, g):  # the transpose of a rotation is the rotation by -angle
        return self._rotate(g, -1)


def rope(x, cos, sin, style="half"):
    """Rotate x (..., T, D) by the angles whose cos, sin (T, D/2) are given (raw arrays)."""
    if x.shape[-1] % 2 or cos.shape != (x.shape[-2], x.shape[-1] // 2) or sin.shape != cos.shape:
        raise ValueError(f"rope: tables of shape {cos.shape} for input of shape {x.shape}")
    if style not in _PAIRS:
        raise ValueError(f"rope: style must be one of {tuple(_PAIRS)}, not {style!r}")
    return Rotate(cos, sin, style).apply(x)


def rope_tables(n_positions, head_dim, theta=10000.0):
    """cos and sin of t * theta_i, shape (n_positions, head_dim/2), computed in float64."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(n_positions, dtype=np.float64), inv_freq)
    return np.cos(angles), np.sin(angles)


class RotaryEmbedding(Module):
    """Holds the cos/sin tables (buffers: they move with `to(device)`, and are not saved)."""

    def __init__(self, head_dim, n_positions, theta=10000.0, style="half", dtype=None, device=None):
        self.head_dim, self.n_positions, self.theta, self.style = head_dim, n_positions, theta, style
        cos, sin = rope_tables(n_positions, head_dim, theta)
        self.cos = Tensor(cos, dtype=dtype or "float32", device=device)
        self.sin = Tensor(sin, dtype=dtype or "float32", device=device)

    def tables(self, start, length, dtype):
        """The rows for positions start .. start+length-1, in `dtype` (recomputed if it differs)."""
        if start + length > self.n_positions:
            raise ValueError(
                f"RoPE: positions up to {start + length} but tables for {self.n_positions} only"
            )
        if self.cos.dtype != dtype:  # e.g. after model.to(dtype=...): recompute, do not upcast
            cos, sin = rope_tables(self.n_positions, self.head_dim, self.theta)
            self.cos = Tensor(cos, dtype=dtype, device=self.cos.device)
            self.sin = Tensor(sin, dtype=dtype, device=self.sin.device)
        return self.cos.data[start:start + length], self.sin.data[start:start + length]

    def forward(self, x, start=0):
        cos, sin = self.tables(start, x.shape[-2], x.dtype)
        return rope(x, cos, sin, self.style)
