"""Activation functions: tanh, sigmoid, softplus, log-sigmoid, relu, silu, SwiGLU, GELU.

s(x) = 1/(1+e^-x) is written as (1 + tanh(x/2)) / 2 throughout: tanh never overflows.
"""

import numpy as np

from autograd import backend, fast
from autograd.ops.common import check_broadcast, data, xp_of
from autograd.tensor import Function


def sigmoid_of(x):
    return 0.5 * (1 + xp_of(x).tanh(0.5 * x))


class Tanh(Function):
    def forward(self, x):
        self.y = xp_of(x).tanh(x)
        return self.y

    def backward(self, g):  # d tanh = 1 - tanh^2
        return g * (1 - self.y * self.y)


class Sigmoid(Function):
    def forward(self, x):
        self.y = sigmoid_of(x)
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
        self.x, self.s = x, sigmoid_of(x)
        return x * self.s

    def backward(self, g):  # d x s(x) = s + x s (1 - s)
        s = self.s
        return g * (s * (1 + self.x * (1 - s)))


class SwiGLU(Function):
    """y = silu(a) b = a s(a) b, the gated unit of Llama's MLP, in one op: saves only a, b."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * sigmoid_of(a) * b

    def backward(self, g):  # da = g b (s + a s (1 - s)),  db = g a s
        a, b = self.a, self.b
        s = sigmoid_of(a)
        return g * b * (s + a * s * (1 - s)), g * a * s


GELU_K = float(np.sqrt(2 / np.pi))


class GeluTanh(Function):
    """gelu(x) ~ x/2 (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi) (GPT-2's form)."""

    def forward(self, x):
        self.x = x
        self.t = xp_of(x).tanh(GELU_K * (x + 0.044715 * (x * x * x)))
        return 0.5 * x * (1 + self.t)

    def backward(self, g):  # 1/2 (1 + t) + x/2 (1 - t^2) k (1 + 3 * 0.044715 x^2)
        x, t = self.x, self.t
        return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * GELU_K * (1 + 0.134145 * (x * x)))


class GeluErf(Function):
    """gelu(x) = x Phi(x), Phi the standard normal CDF = (1 + erf(x / sqrt 2)) / 2."""

    def forward(self, x):
        self.x = x
        self.cdf = 0.5 * (1 + backend.erf(x * (1 / np.sqrt(2))))
        return x * self.cdf

    def backward(self, g):  # Phi(x) + x phi(x), phi the normal density
        x = self.x
        pdf = xp_of(x).exp(-0.5 * x * x) * (1 / np.sqrt(2 * np.pi))
        return g * (self.cdf + x * pdf)


# ---- the public functions --------------------------------------------------------------------

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


def swiglu(a, b):
    """silu(a) * b (the SwiGLU gate), fused: saves only a and b."""
    check_broadcast("swiglu", a, b)
    return fast.pick(SwiGLU, *data(a, b))().apply(a, b)


def gelu(x, approximate="tanh"):
    """GELU: approximate='tanh' (GPT-2's form) or 'none' (the exact erf form)."""
    if approximate == "tanh":
        return fast.pick(GeluTanh, x.data)().apply(x)
    if approximate in ("none", "erf"):
        return GeluErf().apply(x)
    raise ValueError(f"gelu: approximate must be 'tanh' or 'none', not {approximate!r}")
