"""gradcheck itself: it passes correct backwards and catches planted wrong ones.

Each planted bug is a Function whose forward is right and whose backward is wrong in one
way; gradcheck must raise GradcheckError naming the input, the element and both values.
"""

import numpy as np
import pytest

from autograd import Function, GradcheckError, Tensor, gradcheck, ops
from autograd.testing import device_params

DEVICES = device_params()


def leaf(a, device="cpu"):
    return Tensor(np.asarray(a, dtype=np.float64), requires_grad=True, device=device)


class Square(Function):
    """y = x^2 with a selectable backward: right, or wrong in a planted way."""

    def __init__(self, bug=None):
        self.bug = bug

    def forward(self, x):
        self.x = x
        return x * x

    def backward(self, g):
        if self.bug == "ignores_upstream":  # right only for a .sum() loss (g == 1)
            return 2 * self.x
        if self.bug == "upstream_mean":  # uses g's mean: also right for g == 1 and for g == 0
            return 2 * g.mean() * self.x
        if self.bug == "wrong_factor":
            return 3 * g * self.x
        if self.bug == "one_element":  # wrong at a single element
            gx = 2 * g * self.x
            gx.reshape(-1)[-1] *= 1.01
            return gx
        if self.bug == "adds_constant":  # non-zero gradient for a zero upstream gradient
            return 2 * g * self.x + 1e-3
        return 2 * g * self.x


class Noisy(Square):
    """A backward that changes from call to call (e.g. reads state it should not)."""

    calls = 0

    def backward(self, g):
        Noisy.calls += 1
        return 2 * g * self.x * (1 + 1e-6 * Noisy.calls)


class Product(Function):
    """y = a * b with the gradient of b wrong by a factor: the error must name input 1."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        return g * self.b, 2 * g * self.a


X = np.array([[0.5, -1.25, 2.0], [1.5, 0.75, -0.3]])


@pytest.mark.parametrize("device", DEVICES)
def test_correct_backward_passes(device):
    assert gradcheck(lambda x: Square().apply(x), [leaf(X, device)])
    assert gradcheck(lambda x: Square().apply(x), [leaf(X, device)], mode="fast")


@pytest.mark.parametrize("device", DEVICES)
def test_backward_that_ignores_the_upstream_gradient_is_caught(device):
    for bug in ("ignores_upstream", "upstream_mean"):
        x = leaf(X, device)
        Square(bug).apply(x).sum().backward()  # a .sum() loss alone cannot tell: right for it
        np.testing.assert_allclose(x.grad if device == "cpu" else x.grad.get(), 2 * X)
    with pytest.raises(GradcheckError, match="input 0: "):
        gradcheck(lambda x: Square("ignores_upstream").apply(x), [leaf(X, device)])
    # zero for a zero upstream gradient, so only the random upstream gradient catches it
    with pytest.raises(GradcheckError, match="input 0: gradient mismatch at element"):
        gradcheck(lambda x: Square("upstream_mean").apply(x), [leaf(X, device)])


@pytest.mark.parametrize("device", DEVICES)
def test_wrong_factor_is_caught_with_index_and_values(device):
    with pytest.raises(GradcheckError) as e:
        gradcheck(lambda x: Square("wrong_factor").apply(x), [leaf(X, device)])
    msg = str(e.value)
    assert "input 0" in msg and "element (" in msg
    assert "analytic" in msg and "numeric" in msg


def test_the_reported_element_and_values_are_the_wrong_ones():
    x = leaf(X)
    with pytest.raises(GradcheckError) as e:
        gradcheck(lambda x: Square("one_element").apply(x), [x])
    msg = str(e.value)
    assert "element (1, 2)" in msg  # the last element, the only wrong one
    # the upstream gradient is gradcheck's (seed 0): analytic is 1.01 times numeric
    u = np.random.default_rng(0).standard_normal(X.shape)
    right = 2 * u[1, 2] * X[1, 2]
    numeric = float(msg.split("numeric ")[1].split(" ")[0])
    analytic = float(msg.split("analytic ")[1].split(",")[0])
    np.testing.assert_allclose(numeric, right, rtol=1e-7)
    np.testing.assert_allclose(analytic, 1.01 * right, rtol=1e-9)  # printed to 10 digits


def test_the_failing_input_is_named():
    a, b = leaf([1.0, 2.0]), leaf([3.0, -1.0])
    with pytest.raises(GradcheckError, match="input 1: gradient mismatch"):
        gradcheck(lambda a, b: Product().apply(a, b), [a, b])
    # with only `a` requiring grad, the wrong gradient of b is never used
    a, c = leaf([1.0, 2.0]), Tensor(np.array([3.0, -1.0]))
    assert gradcheck(lambda a, c: Product().apply(a, c), [a, c])


@pytest.mark.parametrize("device", DEVICES)
def test_zero_upstream_gradient_check(device):
    with pytest.raises(GradcheckError, match="zero upstream gradient gave a non-zero gradient"):
        gradcheck(lambda x: Square("adds_constant").apply(x), [leaf(X, device)])


def test_repeat_check():
    with pytest.raises(GradcheckError, match="two backward runs .* disagree"):
        gradcheck(lambda x: Noisy().apply(x), [leaf(X)])


@pytest.mark.parametrize("device", DEVICES)
def test_fast_mode_on_a_big_input(device):
    rng = np.random.default_rng(1)
    big = rng.uniform(-1, 1, (300, 400))  # 120,000 elements: mode="auto" picks random directions
    assert gradcheck(lambda x: ops.tanh(x) * x, [leaf(big, device)])
    with pytest.raises(GradcheckError, match="input 0: gradient mismatch at random direction"):
        gradcheck(lambda x: Square("wrong_factor").apply(x), [leaf(big, device)])
    with pytest.raises(GradcheckError, match="random direction"):
        gradcheck(lambda x: Square("upstream_mean").apply(x), [leaf(big, device)])
    # one element wrong by 1% in 120,000 still moves v^T J u by ~0.1, far above the ~1e-6
    # rounding error of the central differences (the correct backward passes the same check)
    threes = np.full(big.shape, 3.0)
    assert gradcheck(lambda x: Square().apply(x), [leaf(threes, device)], mode="fast", atol=1e-3, rtol=0)
    with pytest.raises(GradcheckError, match="random direction"):
        gradcheck(lambda x: Square("one_element").apply(x), [leaf(threes, device)], mode="fast",
                  atol=1e-3, rtol=0)


def test_full_mode_on_every_element_when_asked():
    x = leaf(np.linspace(-1, 1, 30).reshape(5, 6))
    assert gradcheck(lambda x: ops.exp(x).sum(axis=1), [x], mode="full")
    with pytest.raises(GradcheckError, match=r"element \(\d, \d\)"):
        gradcheck(lambda x: Square("wrong_factor").apply(x), [x], mode="full", max_full_elements=1)


def test_gradcheck_rejects_unusable_inputs():
    with pytest.raises(ValueError, match="no input requires grad"):
        gradcheck(ops.exp, [Tensor(X)])
    with pytest.raises(TypeError, match="input 0 is float32"):
        gradcheck(ops.exp, [Tensor(X.astype(np.float32), requires_grad=True)])
    with pytest.raises(ValueError, match="input 0 is not a leaf"):
        gradcheck(ops.exp, [leaf(X) * 2])
    with pytest.raises(TypeError, match="must return a Tensor"):
        gradcheck(lambda x: 1.0, [leaf(X)])


def test_zero_dimensional_inputs_stay_zero_dimensional():
    x = leaf(1.5)
    assert gradcheck(lambda t: t * t * t, [x])
    assert x.shape == ()
