"""autograd.grad (gradients returned, .grad untouched) and graphs differentiated on several
threads at once (the grad mode is per thread; shared parameters are only read)."""

import threading

import numpy as np
import pytest

import autograd
from autograd import Tensor, no_grad, ops


def leaf(a):
    return Tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def test_grad_matches_the_derivative_and_backward():
    # f = sum(x*x*y + exp(x)):  df/dx = 2 x y + exp(x),  df/dy = x^2 (x is used three times)
    xv, yv = np.array([0.5, -1.0, 2.0]), np.array([1.5, 0.25, -3.0])
    x, y = leaf(xv), leaf(yv)

    def f():
        return (x * x * y + ops.exp(x)).sum()

    gx, gy = autograd.grad(f(), [x, y])
    np.testing.assert_allclose(gx, 2 * xv * yv + np.exp(xv), rtol=1e-12)
    np.testing.assert_allclose(gy, xv * xv, rtol=1e-12)
    assert x.grad is None and y.grad is None  # nothing accumulated
    f().backward()
    np.testing.assert_array_equal(x.grad, gx)
    np.testing.assert_array_equal(y.grad, gy)
    # a .grad already there is left as it is
    before = x.grad.copy()
    autograd.grad(f(), [x])
    np.testing.assert_array_equal(x.grad, before)


def test_grad_of_an_intermediate_input_and_a_repeated_input():
    x = leaf([1.0, 2.0])
    h = x * 3.0  # df/dh = 2 h for f = sum(h * h)
    gh, gx, gx2 = autograd.grad((h * h).sum(), [h, x, x])
    np.testing.assert_allclose(gh, [6.0, 12.0])
    np.testing.assert_allclose(gx, [18.0, 36.0])  # 2 h * 3
    np.testing.assert_array_equal(gx, gx2)
    assert gx is not gx2  # each a fresh array


def test_grad_with_an_upstream_gradient_and_of_a_leaf_itself():
    x = leaf([[1.0, 2.0], [3.0, 4.0]])
    up = np.array([[1.0, 0.0], [2.0, -1.0]])
    (g,) = autograd.grad(x * x, [x], grad_output=up)
    np.testing.assert_allclose(g, 2 * x.data * up)
    (g,) = autograd.grad(x, [x], grad_output=up)  # d x / d x: the upstream gradient itself
    np.testing.assert_array_equal(g, up)
    assert g is not up


def test_grad_errors_name_the_problem():
    x, y, z = leaf([1.0]), leaf([2.0]), Tensor(np.array([3.0]))
    with pytest.raises(RuntimeError, match=r"input 1 .* not part of the output's graph"):
        autograd.grad((x * 2.0).sum(), [x, y])
    gx, gy = autograd.grad((x * 2.0).sum(), [x, y], allow_unused=True)
    np.testing.assert_allclose(gx, [2.0])
    assert gy is None
    with pytest.raises(RuntimeError, match=r"input 1 .* does not require grad"):
        autograd.grad((x * z).sum(), [x, z])
    with pytest.raises(RuntimeError, match="does not require grad"):
        autograd.grad(z * 2.0, [x])
    with pytest.raises(RuntimeError, match="needs an explicit gradient"):
        autograd.grad(x * leaf([1.0, 2.0]), [x])
    with pytest.raises(TypeError, match="list of tensors"):
        autograd.grad((x * 2.0).sum(), x)
    out = (x * x).sum()
    autograd.grad(out, [x])
    with pytest.raises(RuntimeError, match="second time"):
        autograd.grad(out, [x])  # the first call freed the saved arrays
    out = (x * x).sum()
    a = autograd.grad(out, [x], retain_graph=True)
    np.testing.assert_array_equal(autograd.grad(out, [x])[0], a[0])


def test_no_grad_is_per_thread():
    seen = {}
    inside, checked = threading.Event(), threading.Event()

    def other():
        inside.wait()  # the main thread is inside no_grad now
        x = leaf([1.0])
        seen["enabled"] = autograd.is_grad_enabled()
        seen["requires_grad"] = (x * 2.0).requires_grad
        checked.set()

    t = threading.Thread(target=other)
    t.start()
    with no_grad():
        inside.set()
        checked.wait(10)
        assert not autograd.is_grad_enabled()
    t.join()
    assert seen == {"enabled": True, "requires_grad": True}


def test_threads_differentiating_one_model_at_once_match_sequential():
    from tinyllm.model import GPT, ModelConfig

    autograd.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
                            context_length=16))
    params = model.parameters()
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, 50, (2, 16)), rng.integers(0, 50, (2, 16))) for _ in range(2)]

    def grads(x, y):
        _, loss = model(x, y, return_logits=False)
        return autograd.grad(loss, params)

    expected = [grads(x, y) for x, y in batches]
    start = threading.Barrier(2)
    results = [[] for _ in batches]

    def work(i):
        start.wait()
        for _ in range(5):
            results[i].append(grads(*batches[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, runs in enumerate(results):
        assert len(runs) == 5
        for got in runs:
            for g, e in zip(got, expected[i]):
                np.testing.assert_array_equal(g, e)
    assert all(p.grad is None for p in params)


# ---- Functions that add an input's pending gradient into their own (Function.takes_addends) ----

class _TwiceAdding(autograd.Function):
    """y = 2 x, whose backward takes x's pending gradient into its own, as the CUDA products
    and norms do (autograd/fast/cuda/paths.py); records whether it was given one."""

    takes_addends = True
    given = []

    def forward(self, x):
        return 2 * x

    def backward(self, g):
        a = self.addends[0] if self.addends else None
        type(self).given.append(a is not None)
        return 2 * g if a is None else 2 * g + a


def _three_consumers(x):
    """h = 3 x read by two _TwiceAdding and by h * h; dy/dh = u (10 + 2 h + 2) for upstream u."""
    h = x * 3.0
    y = _TwiceAdding().apply(h) * 5.0 + h * h + _TwiceAdding().apply(h)
    return h, y


def test_a_pending_gradient_taken_into_a_backward_gives_the_same_gradients():
    rng = np.random.default_rng(5)
    x0, u = rng.standard_normal(6), rng.standard_normal(6)
    want_h = u * (12 + 2 * 3 * x0)
    _TwiceAdding.given.clear()
    x = leaf(x0)
    _three_consumers(x)[1].backward(u)
    np.testing.assert_allclose(x.grad, 3 * want_h, rtol=1e-12)
    assert any(_TwiceAdding.given)  # the walk offered the sum so far to a later consumer
    x2 = leaf(x0)
    [gx] = autograd.grad(_three_consumers(x2)[1], [x2], u)
    np.testing.assert_allclose(gx, 3 * want_h, rtol=1e-12)


def test_a_watched_intermediate_gets_every_piece_of_its_gradient():
    """A retained or grad()-requested non-leaf reads its pieces, so its sum is not offered."""
    rng = np.random.default_rng(6)
    x0, u = rng.standard_normal(5), rng.standard_normal(5)
    want_h = u * (12 + 2 * 3 * x0)
    _TwiceAdding.given.clear()
    h, y = _three_consumers(leaf(x0))
    h.retain_grad()
    y.backward(u)
    np.testing.assert_allclose(h.grad, want_h, rtol=1e-12)
    h, y = _three_consumers(leaf(x0))
    [gh] = autograd.grad(y, [h], u)
    np.testing.assert_allclose(gh, want_h, rtol=1e-12)
    assert not any(_TwiceAdding.given)


class _TwiceInPlace(autograd.Function):
    """y = 2 x, a Function that promises fresh gradients and adds x's pending gradient into
    its own in place when the walk owns that array, declining it otherwise."""

    fresh_grads = takes_addends = True
    log = []

    def forward(self, x):
        return 2 * x

    def backward(self, g):
        a = self.addends[0] if self.addends else None
        if a is not None and not self.owned[0]:
            self.addends[0] = a = None  # declined: the walk adds the two
        type(self).log.append("none" if a is None else "in place")
        if a is None:
            return 2 * g
        a += 2 * g
        return a


def test_pending_gradients_are_written_in_place_only_when_the_walk_owns_them():
    """h's pieces: 2 * 5 u through a Mul, u itself from an Add (the same array also goes to
    the Add's other input: not the walk's to write), 2 u twice. Writing into an array the walk
    does not own would change another branch's gradient; the gradients stay exact."""
    rng = np.random.default_rng(7)
    x0, u = rng.standard_normal(4), rng.standard_normal(4)
    for _ in range(3):
        _TwiceInPlace.log.clear()
        x = leaf(x0)
        h = x * 3.0
        y = (_TwiceInPlace().apply(h) * 5.0 + h) + _TwiceInPlace().apply(h) + _TwiceInPlace().apply(h)
        y.backward(u)
        np.testing.assert_allclose(x.grad, 3 * 15 * u, rtol=1e-12)
        assert "in place" in _TwiceInPlace.log
