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

The cos/sin tables, (context_length, D/2), are computed once and kept as buffers; the
rotation, with its backward and its GPU kernel, is the engine's op `autograd.ops.rope`.
"""

import numpy as np

from autograd.nn import Module
from autograd.ops.rope import Rotate, rope  # noqa: F401  (the op itself lives in the engine)
from autograd.tensor import Tensor


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
