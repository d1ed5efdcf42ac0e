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
