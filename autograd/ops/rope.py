"""Rotary position embedding (RoPE): each pair of channels rotated by a position's angle.

For the pair (x1, x2) of channel i at position t, with the tables cos, sin of t theta_i:

    y1 = x1 cos - x2 sin
    y2 = x2 cos + x1 sin

A rotation is orthogonal, so the backward is the rotation by the negative angle:

    dx1 =  g1 cos + g2 sin
    dx2 = -g1 sin + g2 cos

Two conventions pair the channels differently: "half" (rotate-half, GPT-NeoX / HF Llama)
pairs x[:D/2] with x[D/2:]; "interleaved" (the paper, Meta's Llama code) x[0::2] with x[1::2].
The tables (and the model's use of them) live in tinyllm/rope.py.
"""

from autograd import backend, fast
from autograd.tensor import Function

PAIRS = {
    "half": lambda D: (slice(0, D // 2), slice(D // 2, None)),
    "interleaved": lambda D: (slice(0, None, 2), slice(1, None, 2)),
}


class Rotate(Function):
    """y = R(t theta) x for x of shape (..., T, D) and tables cos, sin of shape (T, D/2)."""

    def __init__(self, cos, sin, style="half"):
        self.cos, self.sin, self.style = cos, sin, style

    def rotate(self, x, sign):
        """x rotated by sign * angle, as a fresh array."""
        a, b = PAIRS[self.style](x.shape[-1])
        x1, x2 = x[..., a], x[..., b]
        c, s = self.cos, (self.sin if sign > 0 else -self.sin)
        y = backend.get_array_module(x).empty(x.shape, dtype=x.dtype)
        y[..., a] = x1 * c - x2 * s
        y[..., b] = x2 * c + x1 * s
        return y

    def forward(self, x):
        return self.rotate(x, +1)

    def backward(self, g):  # the transpose of a rotation is the rotation by -angle
        return self.rotate(g, -1)


def rope(x, cos, sin, style="half"):
    """Rotate x (..., T, D) by the angles whose cos, sin (T, D/2) are given (raw arrays)."""
    if x.shape[-1] % 2 or cos.shape != (x.shape[-2], x.shape[-1] // 2) or sin.shape != cos.shape:
        raise ValueError(f"rope: tables of shape {cos.shape} for input of shape {x.shape}")
    if style not in PAIRS:
        raise ValueError(f"rope: style must be one of {tuple(PAIRS)}, not {style!r}")
    return fast.pick(Rotate, x.data, cos, sin)(cos, sin, style).apply(x)
