"""Matrix products: matmul, linear, linear with a LoRA update.

Under a low-precision mode (`amp`) the operands go to bfloat16/float16 and the products come
back in the working dtype: `amp.low` and `amp.high` mark those casts. `mm` is the one place a
product is computed; on the GPU it calls cuBLAS (GemmEx) directly, which writes float32
results from bfloat16 operands (CuPy's matmul cannot) and honours this thread's tf32 mode.
"""

import numpy as np

from autograd import amp, backend, fast
from autograd.fast.cuda import kernels as cuda
from autograd.ops.common import data, xp_of
from autograd.tensor import Function


def _batched(a, lead):
    """a as a (batch, rows, cols) stack for the batch axes `lead` (a 2-D a stays one matrix,
    which cuBLAS broadcasts)."""
    if a.ndim == 2:
        return a
    if a.shape[:-2] != lead:
        a = xp_of(a).ascontiguousarray(xp_of(a).broadcast_to(a, lead + a.shape[-2:]))
    return a.reshape(-1, *a.shape[-2:])


def mm(a, b, trans_a=False, trans_b=False, dtype=None):
    """op(a) @ op(b) for matrices or stacks of them (leading axes broadcast), in `dtype`
    (default a's); op transposes the last two axes when asked."""
    dtype = dtype or a.dtype
    if backend.is_cupy_array(a) and a.dtype.name in cuda.GEMM_DTYPES:
        lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        y = cuda.gemm(_batched(a, lead), _batched(b, lead), trans_a, trans_b, out_dtype=dtype)
        return y.reshape(*lead, *y.shape[-2:])
    xp = xp_of(a)
    a = xp.swapaxes(a, -1, -2) if trans_a else a
    b = xp.swapaxes(b, -1, -2) if trans_b else b
    return amp.high(a @ b, dtype)


def mm_into(out, a, b, trans_a, trans_b, accumulate=False):
    """out = op(a) @ op(b), or out += with accumulate, for 2-D a, b (`mm` into a buffer)."""
    if backend.is_cupy_array(a) and a.dtype.name in cuda.GEMM_DTYPES:
        cuda.gemm(a, b, trans_a, trans_b, out=out, accumulate=accumulate)
        return
    product = amp.high((a.T if trans_a else a) @ (b.T if trans_b else b), out.dtype)
    if accumulate:
        out += product
    else:
        out[...] = product


class MatMul(Function):
    def forward(self, a, b):
        self.dtype = a.dtype
        self.a, self.b = amp.low(a), amp.low(b)  # bfloat16/float16 under a low-precision mode
        y = mm(self._as_matrix(self.a, 0), self._as_matrix(self.b, 1), dtype=a.dtype)
        if a.ndim == 1:  # drop the axes the vectors were given
            y = y[..., 0, :]
        if b.ndim == 1:
            y = y[..., 0]
        return y

    @staticmethod
    def _as_matrix(v, side):
        """A vector as a 1-row matrix on the left (side 0), a 1-column matrix on the right."""
        if v.ndim != 1:
            return v
        return v[None, :] if side == 0 else v[:, None]

    def backward(self, g):
        # y = a b  =>  da = g b^T, db = a^T g, in the operands' own (batched, broadcast) shapes.
        a, b = self.a, self.b
        xp = xp_of(g)
        g = amp.low(g)
        a2, b2 = self._as_matrix(a, 0), self._as_matrix(b, 1)
        if a.ndim == 1:
            g = xp.expand_dims(g, -2 if b.ndim > 1 else 0)
        if b.ndim == 1:
            g = xp.expand_dims(g, -1)
        ga = gb = None
        if self.needs_grad[0]:
            ga = backend.sum_to(mm(g, b2, False, True, self.dtype), a2.shape).reshape(a.shape)
        if self.needs_grad[1]:
            if b2.ndim == 2 and a2.ndim > 2:
                # a shared matrix: fold the batch into rows instead of summing a batch of products
                k = a2.shape[-1]
                gb = mm(a2.reshape(-1, k), g.reshape(-1, g.shape[-1]), True, False, self.dtype)
            else:
                gb = backend.sum_to(mm(a2, g, True, False, self.dtype), b2.shape)
            gb = gb.reshape(b.shape)
        return ga, gb


def matmul(a, b):
    sa, sb = a.shape, b.shape
    if len(sa) == 0 or len(sb) == 0:
        raise ValueError(f"matmul: operands must have at least 1 dimension, got {sa} and {sb}")
    ka = sa[-1]
    kb = sb[0] if len(sb) == 1 else sb[-2]
    if ka != kb:
        raise ValueError(f"matmul: shapes {sa} and {sb} do not match (inner dimensions {ka} != {kb})")
    try:
        np.broadcast_shapes(sa[:-2], sb[:-2])
    except ValueError:
        raise ValueError(f"matmul: batch dimensions of {sa} and {sb} cannot be broadcast") from None
    return MatMul().apply(a, b)


class Linear(Function):
    def __init__(self, x_low=None, out_dtype=None):
        self.x_low = x_low  # a low-precision copy of x made by the caller, if any
        self.out_dtype = out_dtype  # the result's dtype, when not the weight's

    def forward(self, x, w, b=None):
        # Under a low-precision mode the product runs in bfloat16/float16 (amp.low) and the
        # result comes back in the weight's dtype (or out_dtype); the low-precision copies are
        # what backward keeps.
        self.x = self.x_low if self.x_low is not None else amp.low(x)
        self.w = amp.low(w)
        self.dtypes = x.dtype, w.dtype  # each gradient comes out of its product in its input's
        # (..., in) -> (rows, in) first: NumPy runs a stack of matrices times one matrix without
        # BLAS (20-60x slower on the CPU), while one 2-D product is a single GEMM.
        rows = self.x.reshape(-1, x.shape[-1])
        out_dtype = self.out_dtype or w.dtype
        y = mm(rows, self.w, False, True, w.dtype if b is not None else out_dtype)
        y = y.reshape(*x.shape[:-1], w.shape[0])
        if b is not None:  # the bias is added in the weights' dtype, then the sum rounded once
            y += b
            y = fast.astype(y, out_dtype) if y.dtype != out_dtype else y
        return y

    def backward(self, g):
        # y = x W^T + b  =>  dx = g W, dW = g^T x (rows of every batch together), db = sum g
        x, w = self.x, self.w
        x_dtype, w_dtype = self.dtypes
        gl = amp.low(g).reshape(-1, g.shape[-1])
        gx = gw = gb = None
        if self.needs_grad[0]:
            gx = self.grad_x(gl, x_dtype).reshape(*g.shape[:-1], w.shape[1])
        if self.needs_grad[1]:
            gw = mm(gl, x.reshape(-1, x.shape[-1]), True, False, w_dtype)
        if len(self.needs_grad) > 2:
            gb = g.reshape(-1, g.shape[-1]).astype(w_dtype, copy=False).sum(axis=0)
        return gx, gw, gb

    def grad_x(self, gl, dtype):
        """dx = g W for the upstream gradient's rows gl (in the product dtype), in `dtype`."""
        return mm(gl, self.w, False, False, dtype)


def linear(x, weight, bias=None, out_dtype=None):
    """x @ weight.T + bias, with weight of shape (out_features, in_features), in weight's dtype
    or `out_dtype` (a model asks for amp.activation_dtype when only low-precision kernels read
    the result)."""
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input of shape {x.shape} does not fit weight of shape {weight.shape}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear: bias of shape {bias.shape} for weight of shape {weight.shape}")
    fn = fast.pick(Linear, *data(x, weight, bias))(
        shared_low_copy(x), None if out_dtype is None else backend.as_dtype(out_dtype))
    return fn.apply(x, weight) if bias is None else fn.apply(x, weight, bias)


class LoRALinear(Function):
    """A linear layer plus a low-rank update: y = x W^T + b + scale (x A^T) B^T.

    W (out, in), A (r, in), B (out, r), r small. The update is applied as two thin products
    through the (rows, r) activation h = scale x A^T, never as the (out, in) matrix B A.
    """

    def __init__(self, scale, x_low=None):
        self.scale = scale
        self.x_low = x_low  # a low-precision copy of x made by the caller, if any

    def forward(self, x, w, a, b_up, bias=None):
        # Products in bfloat16/float16 under a low-precision mode (as in Linear), results in
        # x's dtype; the low-precision operands are what backward keeps.
        xl = self.x_low if self.x_low is not None else amp.low(x)
        rows = xl.reshape(-1, x.shape[-1])  # (rows, in): one GEMM each, as in Linear
        wl, al, bl = amp.low(w), amp.low(a), amp.low(b_up)
        h = amp.low(mm(rows, al, False, True, x.dtype) * self.scale)  # (rows, r)
        y = mm(rows, wl, False, True, x.dtype)
        mm_into(y, h, bl, False, True, accumulate=True)
        if bias is not None:
            y += bias
        # kept for backward, each only when a gradient reads it (W frozen: no dW, no x for it)
        need_x, need_w, need_a, need_b = self.needs_grad[:4]
        self.x = rows if need_w or need_a else None
        self.w, self.a = (wl, al) if need_x else (None, None)
        self.b_up = bl if need_x or need_a else None
        self.h = h if need_b else None
        self.x_low = None
        return y.reshape(*x.shape[:-1], w.shape[0])

    def backward(self, g):
        # y = x W^T + b + h B^T with h = scale x A^T  =>
        #   dx = g W + scale (g B) A,  dW = g^T x,  dA = scale (g B)^T x,  dB = g^T h,  db = sum g
        x, w, a, b_up = self.x, self.w, self.a, self.b_up
        need_x, need_w, need_a, need_b = self.needs_grad[:4]
        gl = amp.low(g).reshape(-1, g.shape[-1])
        gx = gw = ga = gb = gbias = None
        if need_x or need_a:
            gbs = amp.low(mm(gl, b_up, False, False, g.dtype) * self.scale)  # scale g B
        if need_x:
            gx = mm(gl, w, False, False, g.dtype)
            mm_into(gx, gbs, a, False, False, accumulate=True)
            gx = gx.reshape(*g.shape[:-1], w.shape[1])
        if need_w:
            gw = mm(gl, x, True, False, g.dtype)
        if need_a:
            ga = mm(gbs, x, True, False, g.dtype)
        if need_b:
            gb = mm(gl, self.h, True, False, g.dtype)
        if len(self.needs_grad) > 4 and self.needs_grad[4]:
            gbias = g.reshape(-1, g.shape[-1]).sum(axis=0)
        return gx, gw, ga, gb, gbias


def lora_linear(x, weight, lora_A, lora_B, scale, bias=None):
    """x @ weight.T + bias + scale * (x @ lora_A.T) @ lora_B.T: a linear layer with a LoRA update.

    weight: (out, in); lora_A: (r, in); lora_B: (out, r); bias: (out,) or None; scale: a
    number (alpha / r). Leave weight (and bias) without requires_grad to train only A and B:
    backward then skips the (out, in) product dW.
    """
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"lora_linear: input of shape {x.shape} does not fit weight of shape "
                         f"{weight.shape}")
    out_f, in_f = weight.shape
    r = lora_A.shape[0] if lora_A.ndim == 2 else None
    if r is None or lora_A.shape[1] != in_f or lora_B.shape != (out_f, r):
        raise ValueError(f"lora_linear: lora_A of shape {lora_A.shape} and lora_B of shape "
                         f"{lora_B.shape} do not fit weight of shape {weight.shape} "
                         f"(want (r, {in_f}) and ({out_f}, r))")
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"lora_linear: bias of shape {bias.shape} for weight of shape {weight.shape}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) \
            or not np.isfinite(scale):
        raise ValueError(f"lora_linear: scale must be a finite number, not {scale!r}")
    fn = LoRALinear(float(scale), shared_low_copy(x))
    return fn.apply(x, weight, lora_A, lora_B, *([] if bias is None else [bias]))


def shared_low_copy(t):
    """The low-precision copy of an activation, made once and shared by every product that
    reads it (the q, k and v projections read the same x): one cast, one saved copy."""
    low = amp.low_dtype()
    if low is None or t.dtype != np.float32 or t._ctx is None:
        return None  # no low precision on, or a leaf (weights change in place: cast each use)
    cached = getattr(t, "_low_copy", None)
    if cached is None or cached.dtype != low:
        cached = t._low_copy = amp.low(t.data)
    return cached
