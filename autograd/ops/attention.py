"""Scaled dot-product attention, with grouped key/value heads, causal masking and dropout.

    S = (q scale) k^T + mask      scores, (T, S) per head; mask 0 or -inf
    P = softmax(S)                over the keys
    y = (P keep / (1 - p)) v      keep: dropout's mask (all ones without dropout)

q is (B, Hq, T, D), k and v are (B, Hkv, S, D): query head h reads kv head h // G with
G = Hq / Hkv, and the T queries are the last T of the S positions (a key/value cache when
S > T). The G query heads sharing a kv head are stacked as the G*T rows of one matrix, so
each product is a plain batched matrix product over (B, Hkv).
"""

import functools

import numpy as np

from autograd import amp, fast
from autograd.ops.common import data, xp_of
from autograd.ops.dropout import keep_mask
from autograd.ops.linalg import mm
from autograd.tensor import Function


@functools.lru_cache(maxsize=16)
def causal_bias(T, S, xp, dtype):
    """The causal mask as an additive (T, S) array: -inf where query t may not see key s,
    s > t + (S - T), else 0. Cached, and the cache bounded: decoding asks for a new (1, S)
    at every token."""
    hidden = xp.triu(xp.ones((T, S), dtype=bool), k=S - T + 1)
    return xp.where(hidden, -np.inf, 0).astype(dtype)


class Attention(Function):
    def __init__(self, causal, scale, dropout_p):
        self.causal, self.scale, self.dropout_p = causal, scale, dropout_p

    def forward(self, q, k, v):
        xp = xp_of(q)
        B, Hq, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        self.q_shape, self.dtype = q.shape, q.dtype
        # the products run in amp's matrix-product dtype, the softmax in q's dtype
        self.q = amp.low((q * q.dtype.type(self.scale)).reshape(B, Hkv, -1, D))  # (B, Hkv, G*T, D)
        self.k, self.v = amp.low(k), amp.low(v)
        s = mm(self.q, self.k, False, True, q.dtype)  # (B, Hkv, G*T, S)
        if self.causal:
            s = (s.reshape(B, Hkv, -1, T, S) + causal_bias(T, S, xp, np.dtype(s.dtype))).reshape(s.shape)
        e = xp.exp(s - s.max(axis=-1, keepdims=True))
        self.p = e / e.sum(axis=-1, keepdims=True)
        self.drop = None
        if self.dropout_p > 0:
            self.drop = keep_mask(s.shape, self.dropout_p, s) * q.dtype.type(1 / (1 - self.dropout_p))
        self.pd = amp.low(self.p if self.drop is None else self.p * self.drop)
        self.y = mm(self.pd, self.v, False, False, q.dtype)  # (B, Hkv, G*T, D)
        return self.y.reshape(B, Hq, T, D)

    def backward(self, g):
        # dV = Pd^T g;  dPd = g V^T;  dP = dPd keep / (1 - p);  dS = P (dP - rowsum(dP P));
        # dQ = dS K scale;  dK = dS^T (Q scale). With the grouped heads stacked as rows,
        # Pd^T g and dS^T Q already sum dK, dV over each group.
        # rowsum(dP P)_i = sum_j keep_ij P_ij (g_i . v_j) / (1 - p) = g_i . y_i: a sum over D.
        g = g.reshape(self.y.shape)
        rows = (g * self.y).sum(axis=-1, keepdims=True)
        gl = amp.low(g)
        dtype = self.dtype
        gv = mm(self.pd, gl, True, False, dtype)
        dp = mm(gl, self.v, False, True, dtype)
        if self.drop is not None:
            dp = dp * self.drop
        ds = amp.low(self.p * (dp - rows))
        gq = mm(ds, self.k, False, False, dtype) * dtype.type(self.scale)
        gk = mm(ds, self.q, True, False, dtype)
        return gq.reshape(self.q_shape), gk, gv


def scaled_dot_product_attention(q, k, v, causal=True, scale=None, dropout_p=0.0, training=True):
    """softmax(q k^T / sqrt(D) + causal mask) v, fused into one op.

    q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hq a multiple of Hkv (grouped-query attention
    when Hkv < Hq). With S > T the queries are the last T positions (a key/value cache).
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attention: expected q (B,H,T,D) and k, v (B,Hkv,S,D); got {q.shape}, {k.shape}, {v.shape}")
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or Hq % k.shape[1] or k.shape[2] < T:
        raise ValueError(f"attention: q of shape {q.shape} does not fit k, v of shape {k.shape}")
    scale = 1 / np.sqrt(D) if scale is None else scale
    fn = fast.pick(Attention, *data(q, k, v))
    return fn(causal, scale, dropout_p if training else 0.0).apply(q, k, v)
