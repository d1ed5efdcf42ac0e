"""Every differentiable op: a Function with its forward and backward side by side.

Notation in the derivation comments: y is the output, g = dL/dy the incoming gradient, and
each backward returns dL/d(input) for every input. Elementwise ops may return gradients of the
broadcast shape; the engine sums them back to each input's shape (`backend.sum_to`).
"""

import builtins
import functools

import numpy as np

from autograd import amp, backend, kernels
from autograd.tensor import Function, Tensor

xp_of = backend.get_array_module


def _axes(axis, ndim):
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


def _check_broadcast(name, a, b):
    sa = a.shape if isinstance(a, Tensor) else np.shape(a)
    sb = b.shape if isinstance(b, Tensor) else np.shape(b)
    try:
        np.broadcast_shapes(sa, sb)
    except ValueError:
        raise ValueError(f"{name}: shapes {sa} and {sb} cannot be broadcast together") from None


# ---- elementwise, two inputs -------------------------------------------------------------

class Add(Function):
    def forward(self, a, b):
        return a + b

    def backward(self, g):  # d(a+b)/da = d(a+b)/db = 1
        return g, g


class Sub(Function):
    def forward(self, a, b):
        return a - b

    def backward(self, g):  # d(a-b)/da = 1, d(a-b)/db = -1
        return g, (-g if self.needs_grad[1] else None)


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):  # d(ab)/da = b, d(ab)/db = a
        return (g * self.b if self.needs_grad[0] else None,
                g * self.a if self.needs_grad[1] else None)


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, g):  # d(a/b)/da = 1/b, d(a/b)/db = -a/b^2
        ga = g / self.b if self.needs_grad[0] else None
        gb = -g * self.a / (self.b * self.b) if self.needs_grad[1] else None
        return ga, gb


class Pow(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        self.y = a**b
        return self.y

    def backward(self, g):  # d(a^b)/da = b a^(b-1), d(a^b)/db = a^b ln a
        xp = xp_of(g)
        ga = g * self.b * self.a ** (self.b - 1) if self.needs_grad[0] else None
        gb = g * self.y * xp.log(self.a) if self.needs_grad[1] else None
        return ga, gb


class Maximum(Function):
    def forward(self, a, b):
        self.a_wins = a >= b
        return xp_of(a).maximum(a, b)

    def backward(self, g):  # the gradient goes to whichever input is larger (a on ties)
        return g * self.a_wins, g * ~self.a_wins


def _binary(fn_cls, name, a, b):
    _check_broadcast(name, a, b)
    return fn_cls().apply(a, b)


def add(a, b):
    return _binary(Add, "add", a, b)


def sub(a, b):
    return _binary(Sub, "sub", a, b)


def mul(a, b):
    return _binary(Mul, "mul", a, b)


def div(a, b):
    return _binary(Div, "div", a, b)


def pow(a, b):
    return _binary(Pow, "pow", a, b)


def maximum(a, b):
    return _binary(Maximum, "maximum", a, b)


# ---- elementwise, one input ----------------------------------------------------------------

class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, g):
        return -g


class Exp(Function):
    def forward(self, x):
        self.y = xp_of(x).exp(x)
        return self.y

    def backward(self, g):  # d e^x = e^x
        return g * self.y


class Log(Function):
    def forward(self, x):
        self.x = x
        return xp_of(x).log(x)

    def backward(self, g):  # d ln x = 1/x
        return g / self.x


class Sqrt(Function):
    def forward(self, x):
        self.y = xp_of(x).sqrt(x)
        return self.y

    def backward(self, g):  # d sqrt(x) = 1 / (2 sqrt(x))
        return g / (2 * self.y)


class Rsqrt(Function):
    def forward(self, x):
        self.x = x
        self.y = 1 / xp_of(x).sqrt(x)
        return self.y

    def backward(self, g):  # d x^(-1/2) = -1/2 x^(-3/2) = -1/2 y^3
        y = self.y
        return g * -0.5 * (y * y * y)  # not y**3: NumPy's float power is ~100x slower


class Tanh(Function):
    def forward(self, x):
        self.y = xp_of(x).tanh(x)
        return self.y

    def backward(self, g):  # d tanh = 1 - tanh^2
        return g * (1 - self.y * self.y)


class Sigmoid(Function):
    def forward(self, x):
        # 1/(1+e^-x) written through tanh, which never overflows
        self.y = 0.5 * (1 + xp_of(x).tanh(0.5 * x))
        return self.y

    def backward(self, g):  # d s = s (1 - s)
        return g * self.y * (1 - self.y)


class Softplus(Function):
    def forward(self, x):
        self.x = x
        return xp_of(x).logaddexp(0, x).astype(x.dtype, copy=False)  # log(1 + e^x), no overflow

    def backward(self, g):  # d softplus(x) = sigmoid(x) = exp(-softplus(-x)): exact in the tails
        xp = xp_of(g)
        return g * xp.exp(-xp.logaddexp(0, -self.x)).astype(self.x.dtype, copy=False)


class LogSigmoid(Function):
    def forward(self, x):
        self.x = x
        return -xp_of(x).logaddexp(0, -x).astype(x.dtype, copy=False)  # -softplus(-x)

    def backward(self, g):  # d log sigmoid(x) = sigmoid(-x) = exp(-softplus(x)): no cancellation
        xp = xp_of(g)
        return g * xp.exp(-xp.logaddexp(0, self.x)).astype(self.x.dtype, copy=False)


class Relu(Function):
    def forward(self, x):
        self.positive = x > 0
        return x * self.positive

    def backward(self, g):  # 1 where x > 0, else 0
        return g * self.positive


class Silu(Function):
    def forward(self, x):
        self.x = x
        self.s = 0.5 * (1 + xp_of(x).tanh(0.5 * x))
        return x * self.s

    def backward(self, g):  # d x s(x) = s + x s (1 - s)
        s = self.s
        return g * (s * (1 + self.x * (1 - s)))


def _sigmoid(x):
    """s(x) = 1/(1+e^-x) = (1 + tanh(x/2)) / 2 (tanh never overflows), built in one array."""
    s = xp_of(x).asarray(x * 0.5)  # asarray: a 0-d product is a scalar, which cannot be updated
    xp_of(x).tanh(s, out=s)
    s += 1
    s *= 0.5
    return s


def _times(y, b):
    """y * b, written into y when the product keeps y's shape and dtype (one array fewer)."""
    if y.shape == np.broadcast_shapes(y.shape, b.shape) and y.dtype == np.result_type(y.dtype, b.dtype):
        y *= b
        return y
    return y * b


class SwiGLU(Function):
    def forward(self, a, b):
        # y = silu(a) * b = a s(a) b, the gated unit of Llama's MLP, in one op
        self.a, self.b = a, b
        if kernels.use(a, b) and a.shape == b.shape:
            return kernels.swiglu_forward(a, b)
        y = _sigmoid(a)
        y *= a
        return _times(y, b)

    def backward(self, g):  # da = g b (s + a s (1 - s)),  db = g a s
        a, b = self.a, self.b
        if kernels.use(g, a, b) and a.shape == b.shape == g.shape:
            return kernels.swiglu_backward(g, a, b)
        xp = xp_of(a)
        s = _sigmoid(a)
        u = a * s  # silu(a)
        ga = xp.subtract(1, s, dtype=s.dtype)
        ga *= u
        ga += s  # s + a s (1 - s)
        return _times(_times(ga, b), g), _times(u, g)


def swiglu(a, b):
    """silu(a) * b (the SwiGLU gate), fused: saves only a and b."""
    _check_broadcast("swiglu", a, b)
    return SwiGLU().apply(a, b)


_GELU_K = float(np.sqrt(2 / np.pi))


class GeluTanh(Function):
    def forward(self, x):
        # gelu(x) ~ x/2 (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi)
        # Each expression is built in one scratch array, updated in place: on large
        # activations the time goes to memory traffic, and every temporary costs a pass.
        xp = xp_of(x)
        self.x = x
        u = xp.asarray(x * x)  # asarray: a 0-d product is a scalar, which cannot be updated
        u *= x  # x^3 (x*x*x: NumPy's float power is ~100x slower)
        u *= 0.044715
        u += x
        u *= _GELU_K
        self.t = xp.tanh(u, out=u)
        y = self.t + 1
        y *= x
        y *= 0.5
        return y

    def backward(self, g):  # 1/2 (1 + t) + x/2 (1 - t^2) k (1 + 3 * 0.044715 x^2)
        xp = xp_of(g)
        x, t = self.x, self.t
        u = xp.asarray(x * x)
        u *= 0.134145 * _GELU_K
        u += _GELU_K  # k (1 + 3 * 0.044715 x^2)
        u *= x
        w = xp.asarray(t * t)
        xp.subtract(1, w, out=w)  # 1 - t^2
        u *= w
        u += t
        u += 1  # 1 + t + x (1 - t^2) k (1 + ...)
        u *= 0.5
        u *= g
        return u


class GeluErf(Function):
    def forward(self, x):
        # gelu(x) = x Phi(x), Phi the standard normal CDF = (1 + erf(x / sqrt 2)) / 2
        self.x = x
        self.cdf = 0.5 * (1 + backend.erf(x * (1 / np.sqrt(2))))
        return x * self.cdf

    def backward(self, g):  # Phi(x) + x phi(x), phi the normal density
        x = self.x
        pdf = xp_of(x).exp(-0.5 * x * x) * (1 / np.sqrt(2 * np.pi))
        return g * (self.cdf + x * pdf)


class Abs(Function):
    def forward(self, x):
        self.sign = xp_of(x).sign(x)
        return xp_of(x).abs(x)

    def backward(self, g):  # d|x| = sign(x)
        return g * self.sign


class Clip(Function):
    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def forward(self, x):
        xp = xp_of(x)
        inside = xp.ones(x.shape, dtype=bool)
        if self.lo is not None:
            inside &= x >= self.lo
        if self.hi is not None:
            inside &= x <= self.hi
        self.inside = inside
        return xp.clip(x, self.lo, self.hi)

    def backward(self, g):  # 1 inside [lo, hi], 0 where clipped
        return g * self.inside


class Cast(Function):
    def __init__(self, dtype):
        self.dtype = dtype

    def forward(self, x):
        self.src = x.dtype
        return x.astype(self.dtype)

    def backward(self, g):  # the identity, in the input's dtype
        return g.astype(self.src)


class ToDevice(Function):
    def __init__(self, device):
        self.device = device

    def forward(self, x):
        self.src = backend.device_of(x)
        return backend.to_device(x, self.device)

    def backward(self, g):  # the identity, back on the input's device
        return backend.to_device(g, self.src)


def neg(x):
    return Neg().apply(x)


def exp(x):
    return Exp().apply(x)


def log(x):
    return Log().apply(x)


def sqrt(x):
    return Sqrt().apply(x)


def rsqrt(x):
    return Rsqrt().apply(x)


def tanh(x):
    return Tanh().apply(x)


def sigmoid(x):
    return Sigmoid().apply(x)


def softplus(x):
    """log(1 + e^x), for every x without overflow."""
    return Softplus().apply(x)


def log_sigmoid(x):
    """log sigmoid(x) = -softplus(-x): the log-likelihood of a logistic (DPO, Bradley-Terry)."""
    return LogSigmoid().apply(x)


def relu(x):
    return Relu().apply(x)


def silu(x):
    return Silu().apply(x)


def gelu(x, approximate="tanh"):
    """GELU: approximate='tanh' (GPT-2's form) or 'none' (the exact erf form)."""
    if approximate == "tanh":
        return GeluTanh().apply(x)
    if approximate in ("none", "erf"):
        return GeluErf().apply(x)
    raise ValueError(f"gelu: approximate must be 'tanh' or 'none', not {approximate!r}")


def abs(x):
    return Abs().apply(x)


def clip(x, lo=None, hi=None):
    return Clip(lo, hi).apply(x)


def cast(x, dtype):
    return Cast(backend.as_dtype(dtype)).apply(x)


def to_device(x, device):
    return ToDevice(backend.normalize_device(device)).apply(x)


class Where(Function):
    def __init__(self, cond):
        self.cond = cond

    def forward(self, a, b):
        return xp_of(self.cond).where(self.cond, a, b)

    def backward(self, g):  # the gradient flows to the input that was picked
        return g * self.cond, g * ~self.cond


def where(cond, a, b):
    """Elementwise `a if cond else b`; `cond` is a boolean array or tensor (not differentiated)."""
    cond = cond.data if isinstance(cond, Tensor) else cond
    ref = a if isinstance(a, Tensor) else b
    if backend.device_of(cond) != ref.device:
        raise RuntimeError(f"where: condition on {backend.device_of(cond)}, values on {ref.device}")
    _check_broadcast("where", a, b)
    _check_broadcast("where", cond, a)
    return Where(cond.astype(bool)).apply(a, b)


# ---- matrix products -------------------------------------------------------------------------

class MatMul(Function):
    def forward(self, a, b):
        self.dtype = a.dtype
        self.a, self.b = amp.low(a), amp.low(b)  # bfloat16/float16 under a low-precision mode
        return amp.high(self.a @ self.b, a.dtype)

    def backward(self, g):
        # y = a b  =>  da = g b^T, db = a^T g, in the operands' own (batched, broadcast) shapes.
        a, b = self.a, self.b
        xp = xp_of(g)
        g = amp.low(g)
        a2 = a[None, :] if a.ndim == 1 else a  # a vector is a 1-row matrix
        b2 = b[:, None] if b.ndim == 1 else b  # ... or a 1-column matrix
        if a.ndim == 1:
            g = xp.expand_dims(g, -2 if b.ndim > 1 else 0)
        if b.ndim == 1:
            g = xp.expand_dims(g, -1)
        ga = gb = None
        if self.needs_grad[0]:
            ga = backend.sum_to(g @ xp.swapaxes(b2, -1, -2), a2.shape).reshape(a.shape)
        if self.needs_grad[1]:
            if b2.ndim == 2 and a2.ndim > 2:
                # a shared matrix: fold the batch into rows instead of summing a batch of products
                k = a2.shape[-1]
                gb = a2.reshape(-1, k).T @ g.reshape(-1, g.shape[-1])
            else:
                gb = backend.sum_to(xp.swapaxes(a2, -1, -2) @ g, b2.shape)
            gb = amp.high(gb.reshape(b.shape), self.dtype)
        if ga is not None:
            ga = amp.high(ga, self.dtype)
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


def _bmm(a, b, trans_a, trans_b, dtype):
    """op(a) @ op(b) for 2-D a, b or stacks of them with equal leading axes, returned in `dtype`.

    On the GPU it goes through kernels.gemm, which writes float32 straight from bfloat16 or
    float16 operands (no low-precision result to cast back; CuPy's own batched matmul does not
    take bfloat16); elsewhere a plain product.
    """
    if backend.is_cupy_array(a) and a.dtype != np.float64:  # cuBLAS GemmEx, fused or not
        lead = a.shape[:-2]
        y = kernels.gemm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]),
                         trans_a, trans_b, out_dtype=dtype)
        return y.reshape(*lead, *y.shape[-2:])
    xp = xp_of(a)
    a = xp.swapaxes(a, -1, -2) if trans_a else a
    b = xp.swapaxes(b, -1, -2) if trans_b else b
    return amp.high(a @ b, dtype)


class Linear(Function):
    def __init__(self, x_low=None):
        self.x_low = x_low  # a low-precision copy of x made by the caller, if any

    def forward(self, x, w, b=None):
        # Under a low-precision mode the product runs in bfloat16/float16 (amp.low) and the
        # result comes back in x's dtype; the low-precision copies are what backward keeps.
        self.x = self.x_low if self.x_low is not None else amp.low(x)
        self.w = amp.low(w)
        # (..., in) -> (rows, in) first: NumPy runs a stack of matrices times one matrix without
        # BLAS (20-60x slower on the CPU), while one 2-D product is a single GEMM.
        rows = self.x.reshape(-1, x.shape[-1])
        y = _bmm(rows, self.w, False, True, x.dtype).reshape(*x.shape[:-1], w.shape[0])
        if b is not None:
            y += b
        return y

    def backward(self, g):
        # y = x W^T + b  =>  dx = g W, dW = g^T x (rows of every batch together), db = sum g
        x, w = self.x, self.w
        gl = amp.low(g).reshape(-1, g.shape[-1])
        gx = gw = None
        if self.needs_grad[0]:
            gx = _bmm(gl, w, False, False, g.dtype).reshape(*g.shape[:-1], w.shape[1])
        if self.needs_grad[1]:
            gw = _bmm(gl, x.reshape(-1, x.shape[-1]), True, False, g.dtype)
        gb = g.reshape(-1, g.shape[-1]).sum(axis=0) if len(self.needs_grad) > 2 else None
        return gx, gw, gb


def linear(x, weight, bias=None):
    """x @ weight.T + bias, with weight of shape (out_features, in_features)."""
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input of shape {x.shape} does not fit weight of shape {weight.shape}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear: bias of shape {bias.shape} for weight of shape {weight.shape}")
    fn = Linear(_shared_low_copy(x))
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
        h = amp.low(_bmm(rows, al, False, True, x.dtype) * self.scale)  # (rows, r)
        y = _bmm(rows, wl, False, True, x.dtype)
        _mm_into(y, h, bl, False, True, accumulate=True)
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
            gbs = amp.low(_bmm(gl, b_up, False, False, g.dtype) * self.scale)  # scale g B
        if need_x:
            gx = _bmm(gl, w, False, False, g.dtype)
            _mm_into(gx, gbs, a, False, False, accumulate=True)
            gx = gx.reshape(*g.shape[:-1], w.shape[1])
        if need_w:
            gw = _bmm(gl, x, True, False, g.dtype)
        if need_a:
            ga = _bmm(gbs, x, True, False, g.dtype)
        if need_b:
            gb = _bmm(gl, self.h, True, False, g.dtype)
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
    fn = LoRALinear(float(scale), _shared_low_copy(x))
    return fn.apply(x, weight, lora_A, lora_B, *([] if bias is None else [bias]))


def _shared_low_copy(t):
    """The low-precision copy of an activation, made once and shared by every product that
    reads it (the q, k and v projections read the same x): one cast, one saved copy."""
    low = amp.low_dtype()
    if low is None or t.dtype != np.float32 or t._ctx is None:
        return None  # no low precision on, or a leaf (weights change in place: cast each use)
    cached = getattr(t, "_low_copy", None)
    if cached is None or cached.dtype != low:
        cached = t._low_copy = amp.low(t.data)
    return cached


# ---- reductions ---------------------------------------------------------------------------

def _unreduce(g, shape, axes, keepdims):
    """Put reduced axes back as size 1, then broadcast g over the input's shape."""
    xp = xp_of(g)
    if not keepdims:
        g = xp.expand_dims(g, axes) if axes else g
    return xp.broadcast_to(g, shape)


class Sum(Function):
    def __init__(self, axes, keepdims):
        self.axes, self.keepdims = axes, keepdims

    def forward(self, x):
        self.shape = x.shape
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, g):  # every summed element gets the gradient of the sum
        return _unreduce(g, self.shape, self.axes, self.keepdims)


class Max(Function):
    def __init__(self, axes, keepdims):
        self.axes, self.keepdims = axes, keepdims

    def forward(self, x):
        self.x = x
        self.y = x.max(axis=self.axes, keepdims=True)
        return self.y if self.keepdims else self.y.reshape(
            [n for i, n in enumerate(x.shape) if i not in self.axes])

    def backward(self, g):  # to the maximal elements, shared equally among ties
        winners = self.x == self.y
        count = winners.sum(axis=self.axes, keepdims=True)
        return _unreduce(g, self.x.shape, self.axes, self.keepdims) * winners / count


class Var(Function):
    def __init__(self, axes, keepdims, ddof):
        self.axes, self.keepdims, self.ddof = axes, keepdims, ddof

    def forward(self, x):
        n = int(np.prod([x.shape[a] for a in self.axes]))
        self.centered = x - x.mean(axis=self.axes, keepdims=True)
        self.scale = 2.0 / (n - self.ddof)
        return (self.centered * self.centered).sum(axis=self.axes, keepdims=self.keepdims) * (self.scale / 2)

    def backward(self, g):  # d/dx_i sum (x_j - mean)^2 / (n - ddof) = 2 (x_i - mean) / (n - ddof)
        g = _unreduce(g, self.centered.shape, self.axes, self.keepdims)
        return g * self.centered * self.scale


def sum(x, axis=None, keepdims=False):
    return Sum(_axes(axis, x.ndim), keepdims).apply(x)


def mean(x, axis=None, keepdims=False):
    axes = _axes(axis, x.ndim)
    n = int(np.prod([x.shape[a] for a in axes]))
    return sum(x, axes, keepdims) * (1.0 / n)


def max(x, axis=None, keepdims=False):
    axes = _axes(axis, x.ndim)
    if any(x.shape[a] == 0 for a in axes):
        raise ValueError(f"max: cannot reduce an empty axis of shape {x.shape}")
    return Max(axes, keepdims).apply(x)


def var(x, axis=None, keepdims=False, ddof=0):
    """Variance over `axis`, divided by n - ddof (ddof=0, NumPy's default)."""
    return Var(_axes(axis, x.ndim), keepdims, ddof).apply(x)


# ---- shapes ---------------------------------------------------------------------------------

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
    axes = [a for a in range(x.ndim) if x.shape[a] == 1] if axis is None else _axes(axis, x.ndim)
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
    axis = _axes(axis, ndim)[0]
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
    axis = _axes(axis, x.ndim)[0]
    n = x.shape[axis]
    if isinstance(sizes, int):
        if n % sizes:
            raise ValueError(f"split: axis {axis} of size {n} does not split into {sizes} equal parts")
        sizes = [n // sizes] * sizes
    if builtins.sum(sizes) != n:
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


def _check_index_bounds(key, shape):
    """Raise IndexError for integer indices out of range (CuPy would not raise by itself)."""
    n_real = builtins.sum(1 for k in key if k is not None and k is not Ellipsis and not (
        hasattr(k, "dtype") and k.dtype == bool)) + builtins.sum(
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
    _check_index_bounds(key, x.shape)
    return GetItem(key).apply(x)


class Embedding(Function):
    def __init__(self, idx):
        self.idx = idx

    def forward(self, w):
        self.shape = w.shape
        return w[self.idx]

    def backward(self, g):  # each row of W gets the sum of the gradients of its lookups
        xp = xp_of(g)
        gw = xp.zeros(self.shape, dtype=g.dtype)
        idx, rows = self.idx.reshape(-1), g.reshape(-1, self.shape[1])
        if xp is not np or idx.size == 0 or g.dtype not in (np.float32, np.float64):
            xp.add.at(gw, idx, rows)  # a scatter-add (one kernel on the GPU)
            return gw
        # On the CPU np.add.at is slow: sort the lookups by id (stable: each id's rows keep
        # their order) and sum each run of equal ids in one reduceat, 2x faster.
        order = np.argsort(idx, kind="stable")
        ids = idx[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        gw[ids[starts]] = np.add.reduceat(rows[order], starts, axis=0)
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
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        bad = int(idx.max()) if int(idx.max()) >= n else int(idx.min())
        raise IndexError(f"embedding: token id {bad} is out of range for {n} embeddings")
    return Embedding(idx).apply(weight)


# ---- softmax, losses, normalization ------------------------------------------------------

class Softmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        xp = xp_of(x)
        e = xp.exp(x - x.max(axis=self.axis, keepdims=True))  # shift: same result, no overflow
        self.y = e / e.sum(axis=self.axis, keepdims=True)
        return self.y

    def backward(self, g):  # dx = y * (g - sum(g * y))
        y = self.y
        return y * (g - (g * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        xp = xp_of(x)
        shifted = x - x.max(axis=self.axis, keepdims=True)
        self.y = shifted - xp.log(xp.exp(shifted).sum(axis=self.axis, keepdims=True))
        return self.y

    def backward(self, g):  # dx = g - softmax(x) * sum(g)
        return g - xp_of(g).exp(self.y) * g.sum(axis=self.axis, keepdims=True)


def softmax(x, axis=-1):
    return Softmax(_axes(axis, x.ndim)[0]).apply(x)


def log_softmax(x, axis=-1):
    return LogSoftmax(_axes(axis, x.ndim)[0]).apply(x)


def _ce_rows(z, t):
    """Per-row loss lse(z_i) - z_i[t_i] and log-sum-exp lse(z_i) of logits z (N, V), targets t (N,)."""
    if kernels.use(z):  # the same, in one pass over the logits
        return kernels.cross_entropy_forward(z, t, -1)
    xp = xp_of(z)
    m = z.max(axis=1, keepdims=True)
    e = z - m
    shifted_lse = xp.log(xp.exp(e, out=e).sum(axis=1))
    rows = xp.arange(z.shape[0])
    # subtract the shifted target logit, not z[t] from lse: for large logits in float32,
    # lse - z[t] would lose the small loss to rounding at the logits' magnitude
    return shifted_lse - (z[rows, t] - m[:, 0]), m[:, 0] + shifted_lse


def _ce_grad(z, t, lse, scale):
    """dz_i = (softmax(z_i) - onehot(t_i)) * scale_i, from the saved log-sum-exps."""
    if kernels.use(z):  # the same, in one pass
        return kernels.cross_entropy_backward(z, t, lse, scale)
    xp = xp_of(z)
    p = z - lse[:, None]
    xp.exp(p, out=p)  # softmax(z_i), in place
    p[xp.arange(p.shape[0]), t] -= 1
    p *= scale[:, None]
    return p


def _ce_row_weights(g, keep, count, reduction):
    """Each row's dL/dloss_i: the upstream g (per row for "none", /count for "mean"), 0 if ignored."""
    if reduction == "none":
        return g.reshape(-1) * keep
    if reduction == "sum":
        return g * keep
    return (g / count) * keep


def _ce_reduce(fn, losses, keep, shape, reduction):
    """The per-row losses reduced as asked; "mean" keeps the count of kept rows on fn."""
    if reduction == "none":
        return losses.reshape(shape)
    if reduction == "sum":
        return losses.sum()
    fn.count = keep.sum().astype(losses.dtype)  # an int64 count would make a float32 loss float64
    return losses.sum() / fn.count  # nan when every target is ignored, as in PyTorch


class CrossEntropy(Function):
    def __init__(self, targets, ignore_index, reduction):
        self.targets, self.ignore_index, self.reduction = targets, ignore_index, reduction

    def forward(self, logits):
        # loss_i = logsumexp(z_i) - z_i[t_i], over rows whose target is not ignore_index
        xp = xp_of(logits)
        z = logits.reshape(-1, logits.shape[-1])
        t = self.targets.reshape(-1)
        keep = t != self.ignore_index
        t_safe = xp.where(keep, t, 0)
        losses, lse = _ce_rows(z, t_safe)
        losses = (losses * keep).astype(z.dtype, copy=False)
        self.z, self.lse, self.t, self.keep, self.shape = z, lse, t_safe, keep, logits.shape
        return _ce_reduce(self, losses, keep, logits.shape[:-1], self.reduction)

    def backward(self, g):  # dz_i = (softmax(z_i) - onehot(t_i)) * g, zero for ignored rows
        scale = _ce_row_weights(g, self.keep, getattr(self, "count", None), self.reduction)
        return _ce_grad(self.z, self.t, self.lse, scale).reshape(self.shape)


def _class_targets(op, targets, like, what, V, ignore_index, reduction):
    """`targets` as an integer array on the device of `like` (logits, or the input of the
    head), checked: dtype, shape like.shape[:-1], device, every kept target in 0..V-1."""
    t = targets.data if isinstance(targets, Tensor) else targets
    t = t if backend.is_cupy_array(t) else like.xp.asarray(t)  # GPU targets: checked below
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: reduction must be mean, sum or none, not {reduction!r}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"{op}: targets must be integers, not {t.dtype}")
    if t.shape != like.shape[:-1]:
        raise ValueError(f"{op}: targets of shape {t.shape} for {what} of shape {like.shape}")
    if backend.device_of(t) != like.device:
        raise RuntimeError(f"{op}: targets on {backend.device_of(t)}, {what} on {like.device}")
    valid = t[t != ignore_index]
    if valid.size and (int(valid.min()) < 0 or int(valid.max()) >= V):
        bad = int(valid.max()) if int(valid.max()) >= V else int(valid.min())
        raise IndexError(f"{op}: target {bad} is out of range for {V} classes")
    return t


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    """Cross-entropy of `logits` (..., V) against integer `targets` (...).

    Fused: the log-softmax and the pick of the target logit happen in one Function, so no
    one-hot array is made. Rows whose target equals `ignore_index` count for nothing.
    """
    t = _class_targets("cross_entropy", targets, logits, "logits", logits.shape[-1], ignore_index, reduction)
    return CrossEntropy(t, ignore_index, reduction).apply(logits)


def _mm_into(out, a, b, trans_a, trans_b, accumulate=False):
    """out = op(a) @ op(b), or out += with accumulate, for 2-D a, b (`_bmm` into a buffer)."""
    if backend.is_cupy_array(a) and a.dtype != np.float64:  # cuBLAS GemmEx, fused or not
        kernels.gemm(a, b, trans_a, trans_b, out=out, accumulate=accumulate)
        return
    product = amp.high((a.T if trans_a else a) @ (b.T if trans_b else b), out.dtype)
    if accumulate:
        out += product
    else:
        out[...] = product


class LinearCrossEntropy(Function):
    """cross_entropy(linear(x, W), t) without ever holding the (rows, V) logits or their gradient.

    Forward, a chunk of rows at a time: z_c = x_c W^T, then loss_i = lse(z_i) - z_i[t_i].
    Only the per-row lse (N numbers) is kept. Backward recomputes each chunk's logits (one
    more product than linear + cross_entropy) and, with r_i the row's weight dL/dloss_i
    (g, g/count for "mean", 0 for ignored rows):
        dz_c = (softmax(z_c) - onehot(t_c)) * r_c          (as in CrossEntropy)
        dx_c = dz_c W                                      (z = x W^T, as in Linear)
        dW  += dz_c^T x_c                                  (summed over the chunks)
    so the largest array alive is one chunk of logits, (chunk_rows, V). When all the logits
    are one chunk of at most KEEP_LOGITS numbers (small models), forward keeps them and
    backward skips the recomputing product.
    """

    KEEP_LOGITS = 1 << 23  # 32 MB of float32

    def __init__(self, targets, ignore_index, reduction, chunk_rows):
        self.targets, self.ignore_index = targets, ignore_index
        self.reduction, self.chunk_rows = reduction, chunk_rows

    def _chunks(self, n):
        for a in range(0, n, self.chunk_rows):
            yield slice(a, min(a + self.chunk_rows, n))

    def forward(self, x, w):
        xp = xp_of(x)
        self.shape, self.dtype = x.shape, x.dtype
        # the product operands in bfloat16/float16 under a low-precision mode, as in Linear
        self.x, self.w = amp.low(x).reshape(-1, x.shape[-1]), amp.low(w)
        t = self.targets.reshape(-1)
        self.keep = keep = t != self.ignore_index
        self.t = xp.where(keep, t, 0)
        n = self.x.shape[0]
        losses, self.lse = xp.empty(n, x.dtype), xp.empty(n, x.dtype)
        self.z = None
        for c in self._chunks(n):
            z = _bmm(self.x[c], self.w, False, True, x.dtype)  # this chunk's logits x_c W^T
            losses[c], self.lse[c] = _ce_rows(z, self.t[c])
            if n <= self.chunk_rows and z.size <= self.KEEP_LOGITS:
                self.z = z  # one small chunk: kept for backward
        losses *= keep
        return _ce_reduce(self, losses, keep, x.shape[:-1], self.reduction)

    def backward(self, g):
        xp = xp_of(g)
        x, w = self.x, self.w
        r = _ce_row_weights(g, self.keep, getattr(self, "count", None), self.reduction)
        r = r.astype(self.dtype, copy=False)  # (N,): each row's weight, in the working dtype
        gx = xp.empty(x.shape, self.dtype) if self.needs_grad[0] else None
        gw = xp.zeros(w.shape, self.dtype) if self.needs_grad[1] else None
        for c in self._chunks(x.shape[0]):
            z = self.z if self.z is not None else _bmm(x[c], w, False, True, self.dtype)  # recomputed
            dz = amp.low(_ce_grad(z, self.t[c], self.lse[c], r[c]))
            del z
            if gx is not None:
                _mm_into(gx[c], dz, w, False, False)
            if gw is not None:
                _mm_into(gw, dz, x[c], True, False, accumulate=True)
        return (None if gx is None else gx.reshape(self.shape)), gw


def linear_cross_entropy(x, weight, targets, ignore_index=-100, reduction="mean", chunk_rows=None):
    """cross_entropy(linear(x, weight), targets, ...) without the full logits: for an LM head.

    x: (..., d); weight: (V, d) (no bias); targets: integers of shape x.shape[:-1]. The logits
    are made `chunk_rows` rows at a time, forward and again in backward, so memory holds one
    (chunk_rows, V) block instead of all rows x V logits and their gradient. Default: as
    many rows as fit 2^26 logits (256 MB in float32), at least one.
    """
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: input of shape {x.shape} does not fit weight "
                         f"of shape {weight.shape}")
    V = weight.shape[0]
    if chunk_rows is None:
        chunk_rows = builtins.max(1, (1 << 26) // builtins.max(V, 1))
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be a positive integer, not {chunk_rows!r}")
    t = _class_targets("linear_cross_entropy", targets, x, "input", V, ignore_index, reduction)
    return LinearCrossEntropy(t, ignore_index, reduction, int(chunk_rows)).apply(x, weight)


def _rowdot(a, b):
    """sum(a * b) over the last axis, kept as an axis of size 1: einsum makes it one pass with
    no a*b temporary (float32/float64; NumPy's einsum does not take bfloat16)."""
    if a.dtype == b.dtype and a.dtype in (np.float32, np.float64):
        return xp_of(a).einsum("...i,...i->...", a, b)[..., None]
    return (a * b).sum(axis=-1, keepdims=True)


class LayerNorm(Function):
    def __init__(self, eps):
        self.eps = eps

    def forward(self, x, w=None, b=None):
        # y = (x - mean) / sqrt(var + eps) * w + b over the last axis
        xp = xp_of(x)
        if kernels.use(x, *(a for a in (w, b) if a is not None)):  # one kernel; backward recomputes xhat
            self.fused, self.x, self.w = True, x, w
            y, self.mean, self.rstd = kernels.norm_forward(x, w, b, self.eps, center=True)
            return y
        mu = x.mean(axis=-1, keepdims=True)
        xc = x - mu
        self.rstd = 1 / xp.sqrt(_rowdot(xc, xc) / x.dtype.type(x.shape[-1]) + self.eps)
        self.xhat = xc * self.rstd
        self.w = w
        y = self.xhat * w if w is not None else self.xhat.copy()
        if b is not None:
            y += b
        return y

    def backward(self, g):
        # With gh = dL/dxhat = g w:  dx = rstd (gh - mean(gh) - xhat mean(gh xhat))
        if getattr(self, "fused", False):
            gx, gw, gb = kernels.norm_backward(g, self.x, self.w, self.mean, self.rstd, True,
                                               self.w is not None, len(self.needs_grad) > 2)
            return (gx, gw, gb)[: len(self.needs_grad)]
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


class RMSNorm(Function):
    def __init__(self, eps):
        self.eps = eps

    def forward(self, x, w=None):
        # y = x / sqrt(mean(x^2) + eps) * w over the last axis
        xp = xp_of(x)
        if kernels.use(x, *(a for a in (w,) if a is not None)):  # one kernel; backward recomputes xhat
            self.fused, self.x, self.w = True, x, w
            y, self.mean, self.rstd = kernels.norm_forward(x, w, None, self.eps, center=False)
            return y
        ms = _rowdot(x, x) / x.dtype.type(x.shape[-1])  # mean(x^2)
        self.rstd = 1 / xp.sqrt(ms + self.eps)
        self.xhat = x * self.rstd
        self.w = w
        return self.xhat * w if w is not None else self.xhat

    def backward(self, g):
        # With gh = g w:  dx = rstd (gh - xhat mean(gh xhat))
        if getattr(self, "fused", False):
            gx, gw, _ = kernels.norm_backward(g, self.x, self.w, self.mean, self.rstd, False,
                                              self.w is not None, False)
            return gx, gw
        xhat = self.xhat
        gh = g * self.w if self.w is not None else g.copy()  # a fresh array: gx is built in it
        gh -= xhat * (_rowdot(gh, xhat) / g.dtype.type(g.shape[-1]))  # gh - xhat mean(gh xhat)
        gh *= self.rstd
        gw = (g * xhat).reshape(-1, g.shape[-1]).sum(axis=0) if self.w is not None else None
        return gh, gw


def _check_norm(name, x, w):
    if w is not None and w.shape != (x.shape[-1],):
        raise ValueError(f"{name}: weight of shape {w.shape} for input of shape {x.shape}")


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    _check_norm("layer_norm", x, weight)
    _check_norm("layer_norm", x, bias)
    if bias is not None and weight is None:
        raise ValueError("layer_norm: a bias needs a weight")
    inputs = [t for t in (x, weight, bias) if t is not None]
    return LayerNorm(eps).apply(*inputs)


def rms_norm(x, weight=None, eps=1e-6):
    _check_norm("rms_norm", x, weight)
    return RMSNorm(eps).apply(x) if weight is None else RMSNorm(eps).apply(x, weight)


class Dropout(Function):
    def __init__(self, mask, scale):
        self.mask, self.scale = mask, scale

    def forward(self, x):
        return x * self.mask * self.scale

    def backward(self, g):  # the same mask and scale
        return g * self.mask * self.scale


def dropout(x, p=0.5, training=True):
    """Zero each element with probability p and scale the rest by 1/(1-p) (inverted dropout)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    return Dropout(_keep_mask(x.shape, p, x.data), x.xp.asarray(1 / (1 - p), dtype=x.dtype)).apply(x)


def _keep_mask(shape, p, like):
    """Dropout's keep mask (True with probability 1 - p) on `like`'s device. Every draw starts
    from the CPU generator: on the CPU its uniforms; on the GPU a hash of the element index
    and a seed it draws (kernels.dropout_keep). So one generator state (saved in training
    checkpoints) fixes every mask, and activation checkpointing can replay them."""
    if backend.is_cupy_array(like):
        return kernels.dropout_keep(shape, p, int(backend.rng("cpu").integers(1 << 63)))
    return backend.rng("cpu").random(shape, dtype=np.float32) >= p


# ---- attention -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _causal_mask(T, S, xp):
    """Boolean (T, S) mask, True where query t may not see key s: s > t + (S - T).
    Cached, and the cache bounded: decoding asks for a new (1, S) at every token."""
    return xp.triu(xp.ones((T, S), dtype=bool), k=S - T + 1)


@functools.lru_cache(maxsize=16)
def _causal_bias(T, S, xp, dtype):
    """The causal mask as an additive (T, S) array: 0 where visible, -inf where masked.
    Adding it is one streaming pass, several times faster on the CPU than a boolean-index
    assignment."""
    return xp.where(_causal_mask(T, S, xp), -np.inf, 0).astype(dtype)


class Attention(Function):
    def __init__(self, causal, scale, dropout_p):
        self.causal, self.scale, self.dropout_p = causal, scale, dropout_p

    def forward(self, q, k, v):
        # q: (B, Hq, T, D); k, v: (B, Hkv, S, D). Query head h uses kv head h // (Hq / Hkv).
        # P = softmax(q k^T * scale + mask), y = P v. Queries are the last T of S positions.
        # The G = Hq / Hkv query heads sharing a kv head are stacked as G*T rows of one matrix,
        # so every product is a plain batched GEMM over (B, Hkv): no broadcast batch axis,
        # which NumPy would run without BLAS.
        # The two products run in amp's matrix-product dtype; the softmax runs in q's dtype.
        xp = xp_of(q)
        if kernels.use(q, k, v):
            # fused on the GPU: P is never stored whole; backward recomputes it. Dropout's mask
            # is a hash of (seed, element), recomputed too; the seed comes from the CPU
            # generator (no device sync, and a checkpoint's generator state fixes it).
            self.fused = True
            self.seed = int(backend.rng("cpu").integers(1 << 63)) if self.dropout_p > 0 else 0
            self.q, self.k, self.v = amp.low(q), amp.low(k), amp.low(v)
            self.y, self.lse = kernels.attention_forward(self.q, self.k, self.v, self.causal, self.scale,
                                                         self.dropout_p, self.seed)
            return self.y
        B, Hq, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        G = Hq // Hkv
        # the scale goes on q (.., T, D), not on the larger scores (.., T, S); backward keeps
        # the scaled q, so dK = dS^T (q scale) needs no scaling either
        qf = amp.low(q * xp.asarray(self.scale, q.dtype)).reshape(B, Hkv, G, T, D)
        k, v = amp.low(k), amp.low(v)
        self.blocks = _query_blocks(T, S, self.causal, xp)
        self.q, self.k, self.v, self.dtype, self.q_shape = qf, k, v, q.dtype, q.shape
        self.p, self.pd, self.mask = [], [], []
        y = xp.empty((B, Hkv, G, T, D), q.dtype)
        for q0, n, L in self.blocks:
            p, pd = self._probs(_rows(qf, q0, n), k[:, :, :L], q0, T, S)
            self.p.append(p)
            self.pd.append(pd)
            y[:, :, :, q0:q0 + n] = _bmm(pd, v[:, :, :L], False, False, q.dtype).reshape(B, Hkv, G, n, D)
        self.y = y
        return y.reshape(B, Hq, T, D)

    def _probs(self, qb, k, q0, T, S):
        """P (and P with dropout, Pd) for the queries qb = rows q0.. of each group and the
        keys k they can see: P = softmax(qb k^T + mask)."""
        xp = xp_of(qb)
        B, Hkv, Gn, D = qb.shape
        n, L = Gn // self.q.shape[2], k.shape[2]  # G*n rows: G grouped heads
        s = _bmm(qb, k, False, True, self.dtype)  # q k^T scale: (B, Hkv, G*n, L)
        if self.causal:
            s5 = s.reshape(B, Hkv, -1, n, L)  # a view: the (n, L) mask broadcasts over it
            s5 += _causal_bias(T, S, xp, np.dtype(s.dtype))[q0:q0 + n, :L]
        s -= s.max(axis=-1, keepdims=True)
        p = xp.exp(s, out=s)
        p *= 1 / p.sum(axis=-1, keepdims=True)  # one division per row, then products
        if self.dropout_p == 0:
            return p, amp.low(p)
        mask = _keep_mask(p.shape, self.dropout_p, p) * xp.asarray(1 / (1 - self.dropout_p), self.dtype)
        self.mask.append(mask)
        return p, amp.low(p * mask)

    def backward(self, g):
        # dV = Pd^T g;  dPd = g V^T;  dP = dPd * mask;  dS = P (dP - rowsum(dP P)) * scale;
        # dQ = dS K;  dK = dS^T Q. With the G grouped heads stacked as rows, the products
        # Pd^T g and dS^T Q already sum dK, dV over the group.
        # rowsum(dP P)_i = sum_j mask_ij P_ij (g_i . v_j) = g_i . (Pd V)_i = g_i . y_i, a sum
        # over D instead of S (as in FlashAttention): no (.., T, S) temporary.
        # Query blocks: block b's queries see the keys [0, L_b), so it adds its dK, dV to
        # those rows only; its dQ rows are its own.
        xp = xp_of(g)
        if getattr(self, "fused", False):
            return kernels.attention_backward(self.q, self.k, self.v, self.y, self.lse, g,
                                              self.causal, self.scale, self.dropout_p, self.seed)
        qf, k, v, dtype = self.q, self.k, self.v, self.dtype
        B, Hkv, G, T, D = qf.shape
        g = g.reshape(B, Hkv, G, T, D)
        rows = _rowdot(g, self.y)  # rowsum(dP P) = g . y
        g = amp.low(g)
        gq = xp.empty_like(g, dtype=dtype)
        gk = xp.zeros(k.shape, dtype)
        gv = xp.zeros(v.shape, dtype)
        for i, (q0, n, L) in enumerate(self.blocks):
            p, pd, gb, qb = self.p[i], self.pd[i], _rows(g, q0, n), _rows(qf, q0, n)
            gv[:, :, :L] += _bmm(pd, gb, True, False, dtype)
            ds = _bmm(gb, v[:, :, :L], False, True, dtype)  # dP: a fresh array, updated in place
            if self.dropout_p > 0:
                ds *= self.mask[i]
            ds -= _rows(rows, q0, n)
            ds *= p
            ds = amp.low(ds)
            gq[:, :, :, q0:q0 + n] = _bmm(ds, k[:, :, :L], False, False, dtype).reshape(B, Hkv, G, n, D)
            gk[:, :, :L] += _bmm(ds, qb, True, False, dtype)
        # the scale goes on the (.., T, D) dQ, not on the larger (.., T, S) dS; qf is scaled
        gq *= self.scale
        return gq.reshape(self.q_shape), gk, gv


def _query_blocks(T, S, causal, xp):
    """Query blocks (q0, n, L): n queries from q0, which see the first L keys.

    Under causal masking the queries [q0, q0 + n) see the keys [0, q0 + n + S - T), so
    each block computes its scores, softmax and products on (n, L) instead of (n, S) and the
    masked upper triangle is skipped block by block. Below 128 queries one block (T, S); 32 queries a block
    was fastest on one core (64: 3% slower at T = 256, 7% at T = 128). On the GPU (this path
    runs there for float64, or with TINYLLM_FUSED=0) one block: small blocks would mean many
    small kernel launches."""
    if not causal or T < 128 or xp is not np:
        return [(0, T, S)]
    n = 32
    return [(q0, min(n, T - q0), min(S, q0 + n + S - T)) for q0 in range(0, T, n)]


def _rows(a, q0, n):
    """Rows q0..q0+n of each of the G grouped heads of a (B, Hkv, G, T, X), stacked as
    (B, Hkv, G*n, X): a view for G = 1 or one block, a copy otherwise."""
    B, Hkv, G, T, X = a.shape
    return a[:, :, :, q0:q0 + n].reshape(B, Hkv, G * n, X)


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
    return Attention(causal, scale, dropout_p if training else 0.0).apply(q, k, v)


# The public differentiable ops, each with a gradient test (tests/test_ops_grad.py checks the list).
DIFFERENTIABLE_OPS = (
    "add", "sub", "mul", "div", "pow", "maximum", "neg", "exp", "log", "sqrt", "rsqrt",
    "tanh", "sigmoid", "softplus", "log_sigmoid", "relu", "silu", "swiglu", "gelu", "abs", "clip", "cast", "to_device", "where", "matmul",
    "linear", "lora_linear", "sum", "mean", "max", "var", "reshape", "transpose", "swapaxes", "broadcast_to",
    "squeeze", "unsqueeze", "concat", "stack", "split", "getitem", "embedding", "softmax",
    "log_softmax", "cross_entropy", "linear_cross_entropy", "layer_norm", "rms_norm", "dropout",
    "scaled_dot_product_attention",
)
