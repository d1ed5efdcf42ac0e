"""The engine's safety rules: no silent wrong gradients, no state leaking across threads or
nested blocks, no silent upcast, no cache that grows with use."""

import threading

import numpy as np
import pytest

import autograd
from autograd import Tensor, amp, no_grad, ops, optim
from autograd.nn import Parameter


# ---- in-place changes of arrays saved for backward --------------------------------------------

def test_in_place_change_of_a_saved_input_raises_at_backward():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    w = Tensor(np.array([3.0, 4.0]))  # no grad: may be changed in place
    y = (x * w).sum()  # Mul saves w for dL/dx = w
    w.add_(1.0)
    with pytest.raises(RuntimeError, match=r"Mul: an input it saved for backward was modified in place"):
        y.backward()


def test_in_place_change_through_setitem_copy_and_zero_raises():
    for change in (lambda w: w.__setitem__(0, 5.0), lambda w: w.copy_(np.ones(2)), lambda w: w.zero_(),
                   lambda w: w.mul_(2.0), lambda w: w.detach().add_(1.0)):  # detach shares the count
        x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
        w = Tensor(np.array([3.0, 4.0]))
        y = ops.exp(x * w).sum()
        change(w)
        with pytest.raises(RuntimeError, match="modified in place"):
            y.backward()


def test_change_of_an_unsaved_input_is_fine():
    # Add keeps neither input: changing one after the forward changes no gradient
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    w = Tensor(np.array([3.0, 4.0]))
    y = (x + w).sum()
    w.add_(1.0)
    y.backward()
    np.testing.assert_array_equal(x.grad, [1.0, 1.0])


def test_optimizer_step_before_backward_raises_after_backward_is_legal():
    p = Parameter(np.array([1.0, -2.0], np.float32))
    opt = optim.SGD([p], lr=0.1)
    loss = (p * p).sum()
    loss.backward()
    opt.step()  # after backward: the graph is gone, nothing to check
    loss = (p * p).sum()
    loss.backward(retain_graph=True)
    opt.step()  # p changed while a retained graph still holds it
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()
    for make in (lambda ps: optim.SGD(ps, lr=0.1), lambda ps: optim.AdamW(ps, lr=0.1)):
        q = Parameter(np.array([1.0, 2.0], np.float32))
        opt = make([q])
        q.grad = np.ones(2, np.float32)
        loss = ops.log(q).sum()  # Log keeps q: dL/dq = 1/q
        opt.step()
        with pytest.raises(RuntimeError, match="Log: an input it saved"):
            loss.backward()


def test_in_place_on_a_tensor_that_requires_grad_needs_no_grad():
    p = Parameter(np.array([1.0, 2.0], np.float32))
    with pytest.raises(RuntimeError, match="inside no_grad"):
        p.mul_(0.5)
    with no_grad():
        p.mul_(0.5)
    np.testing.assert_array_equal(p.numpy(), [0.5, 1.0])


# ---- grad mode and precision: per thread, re-entrant ------------------------------------------

def test_one_no_grad_object_nested_twice_restores_the_mode():
    guard = no_grad()
    with guard:
        with guard:
            assert not autograd.is_grad_enabled()
        assert not autograd.is_grad_enabled()
    assert autograd.is_grad_enabled()
    with autograd.enable_grad():
        with guard:
            with autograd.enable_grad():
                assert autograd.is_grad_enabled()
            assert not autograd.is_grad_enabled()
    assert autograd.is_grad_enabled()
    x = Tensor(np.ones(2), requires_grad=True)
    assert no_grad()(lambda: (x * 2.0).requires_grad)() is False
    assert (x * 2.0).requires_grad


def test_one_autocast_object_nested_twice_restores_the_mode():
    block = amp.autocast("tf32")
    with block:
        with block:
            assert amp.precision() == "tf32"
        assert amp.precision() == "tf32"
    assert amp.precision() == "float32"


def test_a_failed_precision_change_leaves_the_previous_one(monkeypatch):
    amp.set_precision("tf32")
    try:
        with pytest.raises(ValueError, match="precision must be one of"):
            amp.set_precision("float8")
        assert amp.precision() == "tf32"

        def missing():
            raise RuntimeError("bfloat16 needs the ml_dtypes package")

        monkeypatch.setattr(autograd.backend, "bfloat16", missing)
        with pytest.raises(RuntimeError, match="ml_dtypes"):
            amp.set_precision("bfloat16")
        assert amp.precision() == "tf32" and amp.low_dtype() is None
        with pytest.raises(RuntimeError, match="ml_dtypes"):
            with amp.autocast("bfloat16"):
                pass
        assert amp.precision() == "tf32"
    finally:
        amp.set_precision("float32")


def test_autocast_in_one_thread_is_invisible_in_another():
    seen = {}
    inside, checked = threading.Event(), threading.Event()

    def other():
        inside.wait()  # the main thread is inside autocast now
        seen["mode"], seen["low"] = amp.precision(), amp.low_dtype()
        x = Tensor(np.ones((2, 3), np.float32))
        w = Tensor(np.full((4, 3), 1 / 3, np.float32))
        seen["linear"] = ops.linear(x, w).numpy()  # exact only in float32: 1/3 rounds in float16
        checked.set()

    t = threading.Thread(target=other)
    t.start()
    with amp.autocast("float16"):
        inside.set()
        checked.wait(10)
        assert amp.precision() == "float16"
    t.join()
    assert seen["mode"] == "float32" and seen["low"] is None
    np.testing.assert_array_equal(seen["linear"], np.float32(1 / 3) * 3 * np.ones((2, 4), np.float32))


# ---- dtype policy of raw array operands -------------------------------------------------------

def test_a_float32_graph_stays_float32_with_float64_numpy_operands():
    x = Tensor(np.array([1.0, 2.0], np.float32), requires_grad=True)
    a = np.array([0.5, 0.25])  # float64
    for y in (x + a, a + x, x * a, a * x, x - a, a / x, x ** np.float64(2.0), ops.maximum(x, a),
              ops.where(np.array([True, False]), x, a)):
        assert y.dtype == np.float32, y
    y = (x * a).sum()
    y.backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(x.grad, a)
    i = Tensor(np.array([1, 2]))  # an integer tensor: NumPy's promotion, as before
    assert (i + np.array([0.5, 0.5])).dtype == np.float64


# ---- bounded caches ---------------------------------------------------------------------------

def test_causal_mask_cache_stays_bounded_while_decoding_thousands_of_tokens():
    from autograd.ops.attention import causal_bias as cached

    cached.cache_clear()
    rng = np.random.default_rng(0)
    D, S_max = 4, 3000
    k = Tensor(rng.standard_normal((1, 1, S_max, D)).astype(np.float32))
    v = Tensor(rng.standard_normal((1, 1, S_max, D)).astype(np.float32))
    with no_grad():
        for S in range(1, S_max + 1):  # one query per step against a growing cache
            q = Tensor(rng.standard_normal((1, 1, 1, D)).astype(np.float32))
            ops.scaled_dot_product_attention(q, k[:, :, :S], v[:, :, :S])
    info = cached.cache_info()
    assert info.currsize <= info.maxsize <= 64
