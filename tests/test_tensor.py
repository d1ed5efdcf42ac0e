"""The engine around the ops: graph walk, gradient accumulation, no_grad, freeing, errors,
devices and dtypes, and memory over a training-like loop.

Devices come from `device_params()` in autograd.testing (cuda cases skip without a GPU).
"""

import gc
import sys
import tracemalloc
import types
import weakref

import numpy as np
import pytest

import autograd
from autograd import Tensor, backend, no_grad, ops
from autograd.testing import device_params

DEVICES = device_params()


def leaf(a, device="cpu", dtype=np.float64):
    return Tensor(np.asarray(a, dtype=dtype), requires_grad=True, device=device)


def host(a):
    return backend.to_device(a, "cpu")


# ---- the graph walk ------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_deep_chain_backward_without_recursion(device):
    x = leaf([1.0, 2.0], device)
    y = x
    for _ in range(10_000):
        y = y + x
    limit = sys.getrecursionlimit()
    y.sum().backward()
    assert sys.getrecursionlimit() == limit
    np.testing.assert_array_equal(host(x.grad), [10_001.0, 10_001.0])


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_accumulates_over_reuse(device):
    x = leaf([1.0, -2.0, 3.0], device)
    (x * x).sum().backward()
    np.testing.assert_allclose(host(x.grad), [2.0, -4.0, 6.0])
    x.grad = None
    (x + x).sum().backward()
    np.testing.assert_allclose(host(x.grad), [2.0, 2.0, 2.0])
    x.grad = None
    a, b = x * 2.0, x * 3.0  # a diamond: x -> a, b -> a * b = 6 x^2
    (a * b).sum().backward()
    np.testing.assert_allclose(host(x.grad), [12.0, -24.0, 36.0])
    (x * x).sum().backward()  # a second graph adds to the leaf's .grad
    np.testing.assert_allclose(host(x.grad), [14.0, -28.0, 42.0])


@pytest.mark.parametrize("device", DEVICES)
def test_diamond_with_unequal_depths(device):
    # y = exp(x) * x, with exp(x) one step deeper than x: dy/dx = exp(x) (1 + x)
    x = leaf([0.5, -1.0], device)
    e = ops.exp(x)
    h = e * 1.0
    (h * x).sum().backward()
    np.testing.assert_allclose(host(x.grad), np.exp([0.5, -1.0]) * (1 + np.array([0.5, -1.0])))


@pytest.mark.parametrize("device", DEVICES)
def test_broadcast_gradient_is_summed_back(device):
    a = leaf(np.ones((3, 1)), device)
    b = leaf(np.arange(4.0), device)
    (a * b).backward(backend.to_device(np.ones((3, 4)), device))
    np.testing.assert_allclose(host(a.grad), [[6.0], [6.0], [6.0]])
    np.testing.assert_allclose(host(b.grad), [3.0, 3.0, 3.0, 3.0])


def test_no_grad_context_and_decorator():
    x = leaf([1.0, 2.0])
    with no_grad():
        y = x * 2
        assert not autograd.is_grad_enabled()
    assert autograd.is_grad_enabled()
    assert not y.requires_grad and y.is_leaf

    @no_grad()
    def double(t):
        """Doubles."""
        return t * 2

    z = double(x)
    assert not z.requires_grad and z.is_leaf
    assert double.__name__ == "double" and double.__doc__ == "Doubles."
    assert (x * 2).requires_grad  # enabled again after the call

    with pytest.raises(ZeroDivisionError):
        with no_grad():
            1 / 0
    assert autograd.is_grad_enabled()  # restored after an exception
    with no_grad():
        with no_grad():
            pass
        assert not autograd.is_grad_enabled()  # nested: the outer one still holds


def test_second_backward_raises_unless_graph_retained():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()
    z = leaf([1.0, 2.0]) * 2.0
    (z * 3.0).sum().backward()
    with pytest.raises(RuntimeError, match="retain_graph"):  # a new graph on a freed part
        (z * 4.0).sum().backward()
    x.grad = None
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, [4.0, 8.0])


def test_backward_frees_intermediate_arrays():
    x = leaf(np.ones(1000))

    def build():
        h = ops.exp(x)
        return (h * h).sum(), weakref.ref(h.data)

    y, h_data = build()
    gc.collect()
    assert h_data() is not None  # the graph keeps the intermediate alive ...
    y.backward()
    gc.collect()
    assert h_data() is None  # ... until backward has used it


def test_leaf_grads_are_independent_copies():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    g = np.array([1.0, 1.0])
    (a + b).backward(g)
    assert a.grad is not b.grad and a.grad is not g
    a.grad[0] = 100.0
    g[1] = -5.0
    np.testing.assert_array_equal(b.grad, [1.0, 1.0])
    np.testing.assert_array_equal(a.grad, [100.0, 1.0])
    x = leaf([1.0])
    seed = np.array([2.0])
    x.backward(seed)  # backward on a leaf itself
    seed[0] = 0.0
    np.testing.assert_array_equal(x.grad, [2.0])


def test_retain_grad_and_detach():
    x = leaf([1.0, 2.0])
    h = (x * 3.0).retain_grad()
    k = x * 5.0
    (h * h + k.detach() * x).sum().backward()
    np.testing.assert_allclose(h.grad, 2 * np.array([3.0, 6.0]))
    assert k.grad is None  # not retained
    np.testing.assert_allclose(x.grad, 18 * np.array([1.0, 2.0]) + np.array([5.0, 10.0]))
    assert not k.detach().requires_grad and np.shares_memory(k.detach().data, k.data)


def test_memory_does_not_grow_over_training_steps():
    """100 forward/backward steps of a 512x512 matmul: no allocation outlives its step.

    Measured with tracemalloc on the 2-core dev machine (NumPy 2.4, float32): traced memory
    1,848 B after step 10 and 1,912 B after step 100 (+64 B over 90 steps); peak within a step
    5.25 MB over steps 1-10 and 5.28 MB over steps 11-100 (one 512x512 array is 1.05 MB).
    """
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((512, 512), dtype=np.float32))
    w = Tensor(rng.standard_normal((512, 512), dtype=np.float32) * 0.05, requires_grad=True)

    def step():
        loss = (ops.tanh(x @ w) * 0.5).mean()
        loss.backward()
        w.data -= 0.1 * w.grad
        w.grad = None

    tracemalloc.start()
    try:
        for _ in range(10):
            step()
        gc.collect()
        current_10, peak_10 = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(90):
            step()
        gc.collect()
        current_100, peak_100 = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"traced memory after step 10: {current_10} B (peak {peak_10} B); "
          f"after step 100: {current_100} B (peak of steps 11-100 {peak_100} B)")
    one_array = 512 * 512 * 4
    assert current_100 - current_10 < one_array // 16
    assert peak_100 <= peak_10 + one_array // 16


# ---- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("call, name", [
    (lambda a, b: a + b, "add"), (lambda a, b: a * b, "mul"), (lambda a, b: a / b, "div"),
    (lambda a, b: a - b, "sub"), (lambda a, b: ops.maximum(a, b), "maximum"),
    (lambda a, b: a @ b, "matmul"), (lambda a, b: ops.concat([a, b], 0), "concat"),
])
def test_shape_mismatch_names_the_op_and_both_shapes(call, name):
    a, b = leaf(np.ones((2, 3))), leaf(np.ones((4, 5)))
    with pytest.raises(ValueError) as e:
        call(a, b)
    msg = str(e.value)
    assert name in msg and "(2, 3)" in msg and "(4, 5)" in msg


def test_other_shape_errors_are_clear():
    x = leaf(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"linear.*\(2, 3\).*\(4, 5\)"):
        ops.linear(x, leaf(np.ones((4, 5))))
    with pytest.raises(ValueError, match=r"reshape.*\(2, 3\).*\(4,\)"):
        x.reshape(4)
    with pytest.raises(ValueError, match=r"broadcast_to.*\(2, 3\).*\(3, 3\)"):
        ops.broadcast_to(x, (3, 3))
    with pytest.raises(ValueError, match=r"cross_entropy.*\(3,\).*\(2, 3\)"):
        ops.cross_entropy(x, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"layer_norm.*\(2,\).*\(2, 3\)"):
        ops.layer_norm(x, leaf(np.ones(2)))
    with pytest.raises(ValueError, match=r"squeeze.*axis 0.*\(2, 3\)"):
        ops.squeeze(x, 0)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        x.sum(axis=2)
    with pytest.raises(ValueError, match=r"attention.*\(1, 2, 3, 4\)"):
        ops.scaled_dot_product_attention(leaf(np.ones((1, 2, 3, 4))), leaf(np.ones((1, 2, 3, 5))),
                                         leaf(np.ones((1, 2, 3, 5))))
    with pytest.raises(ValueError, match=r"gradient of shape \(3,\) for a tensor of shape \(2, 3\)"):
        (x * 2).backward(np.ones(3))


def test_backward_on_non_scalar_needs_a_gradient():
    y = leaf(np.ones((2, 3))) * 2
    with pytest.raises(RuntimeError, match=r"shape \(2, 3\).*explicit gradient"):
        y.backward()
    z = leaf(np.ones((1, 1))) * 2  # one element: the implicit gradient 1 is fine
    z.backward()
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor([1.0]).backward()


def test_integer_tensors_cannot_require_grad():
    with pytest.raises(TypeError, match="int64"):
        Tensor(np.arange(3), requires_grad=True)
    with pytest.raises(TypeError, match="bool"):
        Tensor(np.ones(3, bool)).requires_grad_()
    Tensor(np.arange(3)).requires_grad_(False)  # turning it off is fine


def test_out_of_range_indices_raise():
    x = leaf(np.ones((3, 4)))
    with pytest.raises(IndexError, match="index 3 is out of range for axis 0 of size 3"):
        x[3]
    with pytest.raises(IndexError, match="index -5 .* axis 1 of size 4"):
        x[:, np.array([0, -5])]
    with pytest.raises(IndexError, match="too many indices"):
        x[0, 0, 0]
    with pytest.raises(IndexError, match="boolean mask"):
        x[np.ones(4, bool)]
    with pytest.raises(IndexError, match="integers or booleans"):
        x[np.array([0.5])]
    with pytest.raises(IndexError, match="token id 3 is out of range for 3 embeddings"):
        ops.embedding(x, np.array([[0, 3]]))
    with pytest.raises(IndexError, match="token id -1"):
        ops.embedding(x, np.array([-1]))
    with pytest.raises(TypeError, match="indices must be integers"):
        ops.embedding(x, np.array([0.0]))
    with pytest.raises(IndexError, match="target 4 is out of range for 4 classes"):
        ops.cross_entropy(x, np.array([0, 4, 1]))
    with pytest.raises(IndexError, match="target -2"):
        ops.cross_entropy(x, np.array([0, -2, 1]))
    ops.cross_entropy(x, np.array([0, -100, 1]))  # ignore_index is not out of range
    with pytest.raises(TypeError, match="targets must be integers"):
        ops.cross_entropy(x, np.array([0.0, 1.0, 2.0]))


class _FakeCudaArray(np.ndarray):
    """A NumPy array that reports itself as a CuPy array on GPU 0, so the device checks that
    run before any arithmetic can be tested without a GPU."""

    __module__ = "cupy._fake"
    device = types.SimpleNamespace(id=0)


def test_mixed_devices_raise_naming_both_devices_without_a_gpu():
    x = leaf([1.0, 2.0])
    fake = Tensor._wrap(np.ones(2).view(_FakeCudaArray))
    assert fake.device == "cuda"
    with pytest.raises(RuntimeError, match="Add: tensors on different devices: cpu and cuda"):
        x + fake
    with pytest.raises(RuntimeError, match="cuda.*cpu"):
        fake * x
    with pytest.raises(RuntimeError, match="embedding: indices on cuda, weight on cpu"):
        ops.embedding(x.reshape(2, 1), np.array([0]).view(_FakeCudaArray))
    with pytest.raises(RuntimeError, match="cross_entropy: targets on cuda, logits on cpu"):
        ops.cross_entropy(x.reshape(1, 2), np.array([0]).view(_FakeCudaArray))
    with pytest.raises(RuntimeError, match="index on cuda for a tensor on cpu"):
        x[np.array([0]).view(_FakeCudaArray)]
    with pytest.raises(RuntimeError, match="where: condition on cuda, values on cpu"):
        ops.where(np.ones(2, bool).view(_FakeCudaArray), x, x)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_devices_raise_on_a_gpu(device):
    if device == "cpu":
        pytest.skip("needs a second device: runs in the cuda case")
    a, b = leaf([1.0], "cpu"), leaf([1.0], device)
    with pytest.raises(RuntimeError, match="cpu.*cuda|cuda.*cpu"):
        a + b
    with pytest.raises(RuntimeError, match="cpu.*cuda|cuda.*cpu"):
        b @ a
    y = a.to(device)  # moving is explicit and differentiable
    assert y.device == "cuda"
    (y * 3.0).sum().backward()
    assert a.grad is not None and backend.device_of(a.grad) == "cpu"
    np.testing.assert_array_equal(a.grad, [3.0])


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        Tensor([1.0], device="tpu")


# ---- dtypes and conversions -------------------------------------------------------------------

def test_default_dtypes():
    assert Tensor(1.0).dtype == np.float32
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor(np.ones(2)).dtype == np.float64  # NumPy arrays keep their dtype
    assert Tensor([1, 2]).dtype.kind == "i"
    assert autograd.randn(2, 3).dtype == np.float32 and autograd.zeros(2).dtype == np.float32
    x = Tensor([1.0, 2.0], requires_grad=True)
    assert (x * 2.0).dtype == np.float32 and (2 * x + 1).dtype == np.float32
    assert (x / 3).dtype == np.float32 and (x**2).dtype == np.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_storage_and_differentiable_cast(device, dtype):
    pytest.importorskip("ml_dtypes")
    values = np.array([1.0, -2.5, 0.3333, 1000.0], np.float32)
    low = Tensor(values, dtype=dtype, device=device)
    assert low.dtype == backend.as_dtype(dtype)
    back = low.numpy()
    assert back.dtype == backend.as_dtype(dtype)
    np.testing.assert_array_equal(back, values.astype(backend.as_dtype(dtype)))
    np.testing.assert_allclose(back.astype(np.float32), values, rtol=2**-7)

    x = Tensor(values, requires_grad=True, device=device)
    y = x.to(dtype=dtype)
    assert y.dtype == backend.as_dtype(dtype) and y.requires_grad
    z = ops.cast(y * 2.0, "float32")
    z.backward(backend.to_device(np.array([1.0, 2.0, 3.0, 4.0], np.float32), device))
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(host(x.grad), [2.0, 4.0, 6.0, 8.0])
    other = "float16" if dtype == "bfloat16" else "bfloat16"  # low to low, then back
    x.grad = None
    ops.cast(ops.cast(x.to(dtype=dtype), other), "float32").backward(
        backend.to_device(np.array([1.0, 2.0, 3.0, 4.0], np.float32), device))
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(host(x.grad), [1.0, 2.0, 3.0, 4.0])
    w = Tensor(values[:3], dtype=dtype, requires_grad=True, device=device)  # low-precision leaves
    ops.cast(w * w, "float32").sum().backward()  # the product in low precision, the sum in float32
    assert w.grad.dtype == backend.as_dtype(dtype)


def test_conversions():
    x = Tensor([[1.5, 2.5]])
    with pytest.raises(ValueError, match="one element"):
        x.item()
    assert Tensor([[3.5]]).item() == 3.5 and isinstance(Tensor([[3.5]]).item(), float)
    assert x.tolist() == [[1.5, 2.5]]
    y = x.to("cpu", "float64")
    assert y.dtype == np.float64 and y.device == "cpu"
    assert x.to("cpu") is x  # nothing to do: no copy
    assert "requires_grad=True" in repr(leaf([1.0]))


def test_graph_keeps_no_intermediate_array_that_no_backward_needs():
    # Add saves nothing for its backward, so once the user drops h, h's array must be freed
    # even though y's graph still routes gradients through h.
    import weakref

    x = Tensor(np.random.default_rng(0).standard_normal((64, 64)), requires_grad=True)
    h = x + 1.0
    ref = weakref.ref(h.data)
    y = (h + 2.0).sum()
    del h
    assert ref() is None
    y.backward()
    assert np.array_equal(x.grad, np.ones((64, 64)))


def test_retain_grad_on_an_intermediate_used_before_the_call():
    x = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    h = x * 3.0
    y = (h * h).sum()
    h.retain_grad()
    y.backward()
    assert np.allclose(h.grad, 2 * 3.0 * np.array([1.0, 2.0, 3.0]))
    assert np.allclose(x.grad, 18.0 * np.array([1.0, 2.0, 3.0]))


def test_erf_without_scipy_matches_math_erf(monkeypatch):
    # SciPy is optional: without it erf falls back to math.erf elementwise, 0-d arrays included
    import math
    import sys

    from autograd import backend

    monkeypatch.setitem(sys.modules, "scipy.special", None)
    for x in (np.array(0.5), np.array([[-1.5, 0.0], [0.25, 2.0]], np.float32)):
        y = backend.erf(x)
        assert isinstance(y, np.ndarray) and y.shape == x.shape and y.dtype == x.dtype
        assert np.allclose(y, np.vectorize(math.erf)(x), rtol=1e-6)
