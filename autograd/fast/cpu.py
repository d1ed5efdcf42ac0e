"""CPU-tuned fast paths (NumPy, float32): the same math as the references in autograd/ops/,
with fewer passes over memory.

On the CPU a large elementwise op is bound by memory traffic and every temporary array costs
a pass (and, above glibc's mmap threshold, fresh pages): these build each expression in one
scratch array updated in place, sum rows with einsum (one pass, no product temporary),
compute attention in query blocks that skip the causal mask's upper triangle, and sum an
embedding's gradient by sorted ids. Each class names its reference (its base class) and is
held to it by tests/test_fast.py.
"""

import numpy as np

from autograd import amp, fast
from autograd.fast import FastPath
from autograd.ops.activations import GELU_K, GeluTanh, SwiGLU
from autograd.ops.attention import Attention, causal_bias
from autograd.ops.dropout import keep_mask
from autograd.ops.embedding import Embedding
from autograd.ops.linalg import mm
from autograd.ops.losses import CrossEntropy, LinearCrossEntropy
from autograd.ops.norm import LayerNorm, RMSNorm


def _sigmoid(x):
    """s(x) = (1 + tanh(x/2)) / 2, built in one array."""
    s = np.asarray(x * 0.5)  # asarray: a 0-d product is a scalar, which cannot be updated
    np.tanh(s, out=s)
    s += 1
    s *= 0.5
    return s


def _times(y, b):
    """y * b, written into y when the product keeps y's shape and dtype (one array fewer)."""
    if y.shape == np.broadcast_shapes(y.shape, b.shape) and y.dtype == np.result_type(y.dtype, b.dtype):
        y *= b
        return y
    return y * b


def _rowdot(a, b):
    """sum(a * b) over the last axis, kept as an axis of size 1, in one einsum pass."""
    return np.einsum("...i,...i->...", a, b)[..., None]


@fast.register("cpu", "float32")
class SwiGLUCPU(FastPath, SwiGLU):
    def forward(self, a, b):
        self.a, self.b = a, b
        y = _sigmoid(a)
        y *= a
        return _times(y, b)

    def backward(self, g):  # da = g b (s + a s (1 - s)),  db = g a s
        a, b = self.a, self.b
        s = _sigmoid(a)
        u = a * s  # silu(a)
        ga = np.subtract(1, s, dtype=s.dtype)
        ga *= u
        ga += s  # s + a s (1 - s)
        return _times(_times(ga, b), g), _times(u, g)


@fast.register("cpu", "float32")
class GeluTanhCPU(FastPath, GeluTanh):
    def forward(self, x):
        self.x = x
        u = np.asarray(x * x)
        u *= x  # x^3 (x*x*x: NumPy's float power is ~100x slower)
        u *= 0.044715
        u += x
        u *= GELU_K
        self.t = np.tanh(u, out=u)
        y = self.t + 1
        y *= x
        y *= 0.5
        return y

    def backward(self, g):  # 1/2 (1 + t) + x/2 (1 - t^2) k (1 + 3 * 0.044715 x^2)
        x, t = self.x, self.t
        u = np.asarray(x * x)
        u *= 0.134145 * GELU_K
        u += GELU_K  # k (1 + 3 * 0.044715 x^2)
        u *= x
        w = np.asarray(t * t)
        np.subtract(1, w, out=w)  # 1 - t^2
        u *= w
        u += t
        u += 1  # 1 + t + x (1 - t^2) k (1 + ...)
        u *= 0.5
        u *= g
        return u


@fast.register("cpu", "float32")
class LayerNormCPU(FastPath, LayerNorm):
    def forward(self, x, w=None, b=None):
        mu = x.mean(axis=-1, keepdims=True)
        xc = x - mu
        self.rstd = 1 / np.sqrt(_rowdot(xc, xc) / x.dtype.type(x.shape[-1]) + self.eps)
        self.xhat = xc * self.rstd
        self.w = w
        y = self.xhat * w if w is not None else self.xhat.copy()
        if b is not None:
            y += b
        return y

    def backward(self, g):
        xhat, rstd = self.xhat, self.rstd
        gx = g * self.w if self.w is not None else g.copy()  # gh, a fresh array: gx is built in it
        dot = _rowdot(gx, xhat) / g.dtype.type(g.shape[-1])  # mean(gh xhat)
        gx -= gx.mean(axis=-1, keepdims=True)
        gx -= xhat * dot
        gx *= rstd
        rows = (-1, g.shape[-1])
        gw = (g * xhat).reshape(rows).sum(axis=0) if self.w is not None else None
        gb = g.reshape(rows).sum(axis=0) if len(self.needs_grad) > 2 else None
        return (gx, gw, gb)[: len(self.needs_grad)]


@fast.register("cpu", "float32")
class RMSNormCPU(FastPath, RMSNorm):
    def forward(self, x, w=None):
        self.rstd = 1 / np.sqrt(_rowdot(x, x) / x.dtype.type(x.shape[-1]) + self.eps)
        self.xhat = x * self.rstd
        self.w = w
        return self.xhat * w if w is not None else self.xhat

    def backward(self, g):
        xhat = self.xhat
        gh = g * self.w if self.w is not None else g.copy()  # a fresh array: gx is built in it
        gh -= xhat * (_rowdot(gh, xhat) / g.dtype.type(g.shape[-1]))  # gh - xhat mean(gh xhat)
        gh *= self.rstd
        gw = (g * xhat).reshape(-1, g.shape[-1]).sum(axis=0) if self.w is not None else None
        return gh, gw


@fast.register("cpu", "float32")
class EmbeddingCPU(FastPath, Embedding):
    def backward(self, g):
        # np.add.at is slow: sort the lookups by id (stable: each id's rows keep their order)
        # and sum each run of equal ids in one reduceat, 2x faster.
        gw = np.zeros(self.shape, dtype=g.dtype)
        idx, rows = self.idx.reshape(-1), g.reshape(-1, self.shape[1])
        if idx.size == 0:
            return gw
        order = np.argsort(idx, kind="stable")
        ids = idx[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        gw[ids[starts]] = np.add.reduceat(rows[order], starts, axis=0)
        return gw


def _ce_rows_in_place(z, t):
    """ops.losses.ce_rows with the exponentials written over one scratch array."""
    m = z.max(axis=1, keepdims=True)
    e = z - m
    shifted_lse = np.log(np.exp(e, out=e).sum(axis=1))
    return shifted_lse - (z[np.arange(z.shape[0]), t] - m[:, 0]), m[:, 0] + shifted_lse


def _ce_row_grads_in_place(z, t, lse, scale):
    """ops.losses.ce_row_grads with softmax, the one-hot and the scale in one array."""
    p = z - lse[:, None]
    np.exp(p, out=p)
    p[np.arange(p.shape[0]), t] -= 1
    p *= scale[:, None]
    return p


@fast.register("cpu", "float32")
class CrossEntropyCPU(FastPath, CrossEntropy):
    rows = staticmethod(_ce_rows_in_place)
    row_grads = staticmethod(_ce_row_grads_in_place)


@fast.register("cpu", "float32")
class LinearCrossEntropyCPU(FastPath, LinearCrossEntropy):
    rows = staticmethod(_ce_rows_in_place)
    row_grads = staticmethod(_ce_row_grads_in_place)


def _query_blocks(T, S, causal):
    """Query blocks (q0, n, L): n queries from q0, which see the first L keys.

    Under causal masking the queries [q0, q0 + n) see the keys [0, q0 + n + S - T), so
    each block computes its scores, softmax and products on (n, L) instead of (n, S) and the
    masked upper triangle is skipped block by block. Below 128 queries one block (T, S); 32
    queries a block was fastest on one core (64: 3% slower at T = 256, 7% at T = 128)."""
    if not causal or T < 128:
        return [(0, T, S)]
    n = 32
    return [(q0, min(n, T - q0), min(S, q0 + n + S - T)) for q0 in range(0, T, n)]


def _rows(a, q0, n):
    """Rows q0..q0+n of each of the G grouped heads of a (B, Hkv, G, T, X), stacked as
    (B, Hkv, G*n, X): a view for G = 1 or one block, a copy otherwise."""
    B, Hkv, G, T, X = a.shape
    return a[:, :, :, q0:q0 + n].reshape(B, Hkv, G * n, X)


@fast.register("cpu", "float32")
class AttentionCPU(FastPath, Attention):
    """Attention in query blocks, softmax and its gradient in place (ops.attention's math)."""

    def forward(self, q, k, v):
        B, Hq, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        G = Hq // Hkv
        # the scale goes on q (.., T, D), not on the larger scores (.., T, S); backward keeps
        # the scaled q, so dK = dS^T (q scale) needs no scaling either
        qf = amp.low(q * np.asarray(self.scale, q.dtype)).reshape(B, Hkv, G, T, D)
        k, v = amp.low(k), amp.low(v)
        self.blocks = _query_blocks(T, S, self.causal)
        self.q, self.k, self.v, self.dtype, self.q_shape = qf, k, v, q.dtype, q.shape
        self.p, self.pd, self.mask = [], [], []
        # dropout's mask drawn whole, as the reference draws it (the same generator state
        # gives the same mask), and cut into the blocks
        self.keep = keep_mask((B, Hkv, G, T, S), self.dropout_p, q) if self.dropout_p > 0 else None
        y = np.empty((B, Hkv, G, T, D), q.dtype)
        for q0, n, L in self.blocks:
            p, pd = self._probs(_rows(qf, q0, n), k[:, :, :L], q0, T, S)
            self.p.append(p)
            self.pd.append(pd)
            y[:, :, :, q0:q0 + n] = mm(pd, v[:, :, :L], False, False, q.dtype).reshape(B, Hkv, G, n, D)
        self.y = y
        return y.reshape(B, Hq, T, D)

    def _probs(self, qb, k, q0, T, S):
        """P (and P with dropout, Pd) for the queries qb = rows q0.. of each group and the
        keys k they can see: P = softmax(qb k^T + mask)."""
        B, Hkv, Gn, D = qb.shape
        n, L = Gn // self.q.shape[2], k.shape[2]  # G*n rows: G grouped heads
        s = mm(qb, k, False, True, self.dtype)  # q k^T scale: (B, Hkv, G*n, L)
        if self.causal:
            s5 = s.reshape(B, Hkv, -1, n, L)  # a view: the (n, L) mask broadcasts over it
            s5 += causal_bias(T, S, np, np.dtype(s.dtype))[q0:q0 + n, :L]
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s, out=s)
        p *= 1 / p.sum(axis=-1, keepdims=True)  # one division per row, then products
        if self.dropout_p == 0:
            return p, amp.low(p)
        mask = _rows(self.keep[..., :L], q0, n) * np.asarray(1 / (1 - self.dropout_p), self.dtype)
        self.mask.append(mask)
        return p, amp.low(p * mask)

    def backward(self, g):
        # as Attention.backward, a query block at a time: block b's queries see the keys
        # [0, L_b), so it adds its dK, dV to those rows only; its dQ rows are its own
        qf, k, v, dtype = self.q, self.k, self.v, self.dtype
        B, Hkv, G, T, D = qf.shape
        g = g.reshape(B, Hkv, G, T, D)
        rows = _rowdot(g, self.y) if g.dtype == self.y.dtype else (g * self.y).sum(-1, keepdims=True)
        g = amp.low(g)
        gq = np.empty_like(g, dtype=dtype)
        gk = np.zeros(k.shape, dtype)
        gv = np.zeros(v.shape, dtype)
        for i, (q0, n, L) in enumerate(self.blocks):
            p, pd, gb, qb = self.p[i], self.pd[i], _rows(g, q0, n), _rows(qf, q0, n)
            gv[:, :, :L] += mm(pd, gb, True, False, dtype)
            ds = mm(gb, v[:, :, :L], False, True, dtype)  # dP: a fresh array, updated in place
            if self.dropout_p > 0:
                ds *= self.mask[i]
            ds -= _rows(rows, q0, n)
            ds *= p
            ds = amp.low(ds)
            gq[:, :, :, q0:q0 + n] = mm(ds, k[:, :, :L], False, False, dtype).reshape(B, Hkv, G, n, D)
            gk[:, :, :L] += mm(ds, qb, True, False, dtype)
        gq *= self.scale  # on the (.., T, D) dQ, not on the larger (.., T, S) dS; qf is scaled
        return gq.reshape(self.q_shape), gk, gv
