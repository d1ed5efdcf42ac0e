"""Elementwise arithmetic, and the ops that only move or retype an array.

Notation: y is the output, g = dL/dy the incoming gradient; each backward returns dL/d(input)
for every input. A gradient may have the broadcast shape: the engine sums it back to each
input's shape (`backend.sum_to`).
"""

from autograd import backend, fast
from autograd.ops.common import check_broadcast, data, xp_of
from autograd.tensor import Function, Tensor


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
        self.y = 1 / xp_of(x).sqrt(x)
        return self.y

    def backward(self, g):  # d x^(-1/2) = -1/2 x^(-3/2) = -1/2 y^3
        y = self.y
        return g * -0.5 * (y * y * y)  # not y**3: NumPy's float power is ~100x slower


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


class Where(Function):
    def __init__(self, cond):
        self.cond = cond

    def forward(self, a, b):
        return xp_of(self.cond).where(self.cond, a, b)

    def backward(self, g):  # the gradient flows to the input that was picked
        return g * self.cond, g * ~self.cond


# ---- the public functions --------------------------------------------------------------------

def _binary(fn_cls, name, a, b):
    check_broadcast(name, a, b)
    return fn_cls().apply(a, b)


def add(a, b):
    check_broadcast("add", a, b)
    return fast.pick(Add, *data(a, b))().apply(a, b)


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


def abs(x):
    return Abs().apply(x)


def clip(x, lo=None, hi=None):
    return Clip(lo, hi).apply(x)


def cast(x, dtype):
    return Cast(backend.as_dtype(dtype)).apply(x)


def to_device(x, device):
    return ToDevice(backend.normalize_device(device)).apply(x)


def where(cond, a, b):
    """Elementwise `a if cond else b`; `cond` is a boolean array or tensor (not differentiated)."""
    cond = cond.data if isinstance(cond, Tensor) else cond
    ref = a if isinstance(a, Tensor) else b
    if backend.device_of(cond) != ref.device:
        raise RuntimeError(f"where: condition on {backend.device_of(cond)}, values on {ref.device}")
    check_broadcast("where", a, b)
    check_broadcast("where", cond, a)
    return Where(cond.astype(bool)).apply(a, b)
