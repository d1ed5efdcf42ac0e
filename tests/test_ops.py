"""Every differentiable op: forward against plain NumPy, backward by gradcheck in float64.

Each test draws shapes with hypothesis (size-1 and broadcast dimensions, 0-d where the op
allows it, negative axes), compares the forward to a NumPy reference written here, and then
gradient-checks the op with a random upstream gradient. `GRAD_TESTS` maps every op name to
its test; `test_every_op_has_a_gradient_test` fails when an op in
`autograd.ops.DIFFERENTIABLE_OPS` (or a public function of autograd.ops) has none.

Devices: every test is parametrized over `device_params()` from autograd.testing, so the
same tests run on CuPy; the cuda cases skip with a reason where no GPU is available.
"""

import inspect
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import autograd
from autograd import Tensor, backend, gradcheck, ops
from autograd.ops import linalg, losses
from autograd.ops.common import axes_of
from autograd.testing import (
    axes, broadcastable_pair, device_params, float_arrays, positive_arrays, shapes, tie_free_pair,
)

DEVICES = device_params()
GRAD_TESTS = {}


def grad_test(*names):
    """Register a test as the gradient test of the named ops."""
    def register(fn):
        for name in names:
            GRAD_TESTS[name] = fn
        return fn
    return register


def leaf(a, device, requires_grad=True):
    return Tensor(np.asarray(a, dtype=np.float64), requires_grad=requires_grad, device=device)


def check(f, arrays, device, reference=None, rtol=1e-10, atol=1e-12, **gradcheck_kw):
    """Forward of f on tensors vs reference on the NumPy arrays, then gradcheck."""
    inputs = [leaf(a, device) for a in arrays]
    if reference is not None:
        out = f(*inputs)
        want = np.asarray(reference(*arrays))
        assert out.shape == want.shape
        assert out.dtype == np.float64
        np.testing.assert_allclose(out.numpy(), want, rtol=rtol, atol=atol)
    assert gradcheck(f, inputs, **gradcheck_kw)


def on(device, a):
    """A NumPy array (index, mask, targets) moved to the device the tensors live on."""
    return autograd.backend.to_device(np.asarray(a), device)


def test_every_op_has_a_gradient_test():
    missing = set(ops.DIFFERENTIABLE_OPS) - set(GRAD_TESTS)
    assert not missing, f"ops without a gradient test: {sorted(missing)}"


def test_differentiable_ops_lists_every_public_op():
    # what autograd.ops exports from its family modules (autograd/ops/*.py)
    public = {
        name for name, obj in vars(ops).items()
        if inspect.isfunction(obj) and obj.__module__.startswith(ops.__name__ + ".")
        and not name.startswith("_")
    }
    assert public == set(ops.DIFFERENTIABLE_OPS), (
        f"not in DIFFERENTIABLE_OPS: {sorted(public - set(ops.DIFFERENTIABLE_OPS))}; "
        f"listed but not defined: {sorted(set(ops.DIFFERENTIABLE_OPS) - public)}"
    )
    for name in ops.DIFFERENTIABLE_OPS:
        assert getattr(autograd, name) is getattr(ops, name), f"autograd.{name} is not exported"


# ---- elementwise, two inputs ---------------------------------------------------------------

def _binary_inputs(data, name):
    sa, sb = data.draw(broadcastable_pair())
    if name == "maximum":
        return data.draw(tie_free_pair(sa, sb))
    if name == "div":
        return data.draw(float_arrays(sa)), data.draw(float_arrays(sb, away_from=[0.0], margin=0.3))
    if name == "pow":
        return data.draw(positive_arrays(sa)), data.draw(float_arrays(sb))
    return data.draw(float_arrays(sa)), data.draw(float_arrays(sb))


BINARY = {
    "add": (ops.add, np.add), "sub": (ops.sub, np.subtract), "mul": (ops.mul, np.multiply),
    "div": (ops.div, np.divide), "pow": (ops.pow, np.power), "maximum": (ops.maximum, np.maximum),
    "swiglu": (ops.swiglu, lambda a, b: a / (1 + np.exp(-a)) * b),
}


@grad_test(*BINARY)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(BINARY))
@given(data=st.data())
def test_binary(name, device, data):
    op, reference = BINARY[name]
    a, b = _binary_inputs(data, name)
    check(op, [a, b], device, reference)


@pytest.mark.parametrize("device", DEVICES)
def test_binary_with_python_scalars(device):
    x = np.array([[0.5, 1.5, -2.0]])
    cases = [
        (lambda t: 2.0 + t, lambda a: 2.0 + a), (lambda t: t - 3, lambda a: a - 3),
        (lambda t: 1.0 - t, lambda a: 1.0 - a), (lambda t: t * 2.5, lambda a: a * 2.5),
        (lambda t: 2.0 / (t + 3), lambda a: 2.0 / (a + 3)), (lambda t: t**2, lambda a: a**2),
        (lambda t: 2.0**t, lambda a: 2.0**a), (lambda t: -t, lambda a: -a),
    ]
    for f, reference in cases:
        check(f, [x], device, reference)
        assert f(leaf(x, device)).dtype == np.float64


# ---- elementwise, one input ------------------------------------------------------------------

def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def _gelu_tanh(a):
    return 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))


def _gelu_erf(a):
    return a * 0.5 * (1 + np.vectorize(math.erf)(a / np.sqrt(2)))


# name -> (op, numpy reference, array strategy for a shape)
UNARY = {
    "neg": (ops.neg, np.negative, float_arrays),
    "exp": (ops.exp, np.exp, float_arrays),
    "log": (ops.log, np.log, positive_arrays),
    "sqrt": (ops.sqrt, np.sqrt, positive_arrays),
    "rsqrt": (ops.rsqrt, lambda a: 1 / np.sqrt(a), positive_arrays),
    "tanh": (ops.tanh, np.tanh, float_arrays),
    "sigmoid": (ops.sigmoid, _sigmoid, lambda s: float_arrays(s, -6, 6)),
    "softplus": (ops.softplus, lambda a: np.log1p(np.exp(a)), lambda s: float_arrays(s, -8, 8)),
    "log_sigmoid": (ops.log_sigmoid, lambda a: np.log(_sigmoid(a)), lambda s: float_arrays(s, -8, 8)),
    "relu": (ops.relu, lambda a: np.maximum(a, 0), lambda s: float_arrays(s, away_from=[0.0])),
    "silu": (ops.silu, lambda a: a * _sigmoid(a), lambda s: float_arrays(s, -6, 6)),
    "abs": (ops.abs, np.abs, lambda s: float_arrays(s, away_from=[0.0])),
    "gelu": (ops.gelu, _gelu_tanh, lambda s: float_arrays(s, -4, 4)),
    "gelu_erf": (lambda t: ops.gelu(t, approximate="none"), _gelu_erf, lambda s: float_arrays(s, -4, 4)),
}


@grad_test(*UNARY)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(UNARY))
@given(data=st.data())
def test_unary(name, device, data):
    op, reference, arrays = UNARY[name]
    x = data.draw(arrays(data.draw(shapes())))
    check(op, [x], device, reference)


def test_gelu_rejects_unknown_form():
    with pytest.raises(ValueError, match="approximate"):
        ops.gelu(leaf([1.0], "cpu"), approximate="fast")


@grad_test("clip")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_clip(device, data):
    lo = data.draw(st.none() | st.floats(-1.5, 0.0))
    hi = data.draw(st.none() | st.floats(0.1, 1.5))
    kinks = [v for v in (lo, hi) if v is not None]
    x = data.draw(float_arrays(data.draw(shapes()), away_from=kinks))
    check(lambda t: ops.clip(t, lo, hi), [x], device, lambda a: np.clip(a, lo, hi))


@grad_test("cast")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_cast(device, data):
    # float64 -> float32 -> float64 is the identity up to float32 rounding (~1e-7), so a wide
    # step keeps the rounding out of the numeric gradient; the gradient must be u itself.
    x = data.draw(float_arrays(data.draw(shapes())))
    f = lambda t: ops.cast(ops.cast(t, "float32"), "float64")  # noqa: E731
    check(f, [x], device, lambda a: a.astype(np.float32).astype(np.float64), eps=1e-2, atol=1e-4)
    t = leaf(x, device)
    y = ops.cast(t, "float32")
    assert y.dtype == np.float32
    y.backward(np.ones(x.shape, np.float32) if device == "cpu" else y.xp.ones(x.shape, np.float32))
    assert t.grad.dtype == np.float64 and np.all(autograd.backend.to_device(t.grad, "cpu") == 1)


@grad_test("to_device")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_to_device(device, data):
    x = data.draw(float_arrays(data.draw(shapes())))
    check(lambda t: ops.to_device(t, device), [x], device, lambda a: a)
    if device != "cpu":  # there and back: the gradient comes home to the input's device
        check(lambda t: ops.to_device(ops.to_device(t, "cpu") * 2, device), [x], device, lambda a: 2 * a)


@grad_test("where")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_where(device, data):
    (sc, sa, sb), _ = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=3, max_side=4))
    cond = data.draw(hnp.arrays(bool, sc))
    a, b = data.draw(float_arrays(sa)), data.draw(float_arrays(sb))
    c = on(device, cond)
    check(lambda x, y: ops.where(c, x, y), [a, b], device, lambda x, y: np.where(cond, x, y))


# ---- matrix products -------------------------------------------------------------------------

@grad_test("matmul")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_matmul(device, data):
    n, k, m = (data.draw(st.integers(1, 4)) for _ in range(3))
    batch_a, batch_b = data.draw(broadcastable_pair(max_dims=2, max_side=3))
    a_shape = (k,) if data.draw(st.booleans()) else batch_a + (n, k)
    b_shape = (k,) if data.draw(st.booleans()) else batch_b + (k, m)
    a, b = data.draw(float_arrays(a_shape)), data.draw(float_arrays(b_shape))
    check(ops.matmul, [a, b], device, np.matmul)
    check(lambda x, y: x @ y, [a, b], device, np.matmul)


@grad_test("linear")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_linear(device, data):
    fan_in, fan_out = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    x = data.draw(float_arrays(data.draw(shapes(0, 2)) + (fan_in,)))
    w = data.draw(float_arrays((fan_out, fan_in)))
    if data.draw(st.booleans()):
        b = data.draw(float_arrays((fan_out,)))
        check(ops.linear, [x, w, b], device, lambda x, w, b: x @ w.T + b)
    else:
        check(ops.linear, [x, w], device, lambda x, w: x @ w.T)


@grad_test("lora_linear")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_lora_linear(device, data):
    fan_in, fan_out, rank = (data.draw(st.integers(1, 4)) for _ in range(3))
    x = data.draw(float_arrays(data.draw(shapes(0, 2)) + (fan_in,)))
    w = data.draw(float_arrays((fan_out, fan_in)))
    a, b = data.draw(float_arrays((rank, fan_in))), data.draw(float_arrays((fan_out, rank)))
    check(lambda x, w, a, b: ops.lora_linear(x, w, a, b, 0.5), [x, w, a, b], device,
          lambda x, w, a, b: x @ w.T + 0.5 * (x @ a.T) @ b.T)


# ---- reductions -------------------------------------------------------------------------------

def _np_axis(axis):
    return tuple(axis) if isinstance(axis, list) else axis


@grad_test("sum", "mean")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["sum", "mean"])
@given(data=st.data())
def test_sum_mean(name, device, data):
    shape = data.draw(shapes())
    x = data.draw(float_arrays(shape))
    axis, keepdims = data.draw(axes(len(shape))), data.draw(st.booleans())
    op, reference = getattr(ops, name), getattr(np, name)
    check(lambda t: op(t, axis, keepdims), [x], device, lambda a: reference(a, axis=axis, keepdims=keepdims))
    method = getattr(Tensor, name)
    check(lambda t: method(t, axis=axis, keepdims=keepdims), [x], device,
          lambda a: reference(a, axis=axis, keepdims=keepdims))


@grad_test("max")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_max(device, data):
    shape = data.draw(shapes())
    x = data.draw(float_arrays(shape, distinct=True))  # no ties: max is differentiable there
    x = x * data.draw(st.sampled_from([1.0, -1.0]))
    axis, keepdims = data.draw(axes(len(shape))), data.draw(st.booleans())
    check(lambda t: ops.max(t, axis, keepdims), [x], device, lambda a: np.max(a, axis=axis, keepdims=keepdims))


@pytest.mark.parametrize("device", DEVICES)
def test_max_shares_the_gradient_among_ties(device):
    x = leaf([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]], device)
    ops.max(x, axis=1).backward(on(device, [1.0, 6.0]))
    np.testing.assert_allclose(autograd.backend.to_device(x.grad, "cpu"), [[0, 0.5, 0.5], [2, 2, 2]])


@grad_test("var")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_var(device, data):
    shape = data.draw(shapes())
    x = data.draw(float_arrays(shape))
    axis, keepdims = data.draw(axes(len(shape))), data.draw(st.booleans())
    ddof = data.draw(st.sampled_from([0, 1]))
    n = int(np.prod([shape[a] for a in axes_of(axis, len(shape))]))
    assume(n > ddof)
    check(lambda t: ops.var(t, axis, keepdims, ddof), [x], device,
          lambda a: np.var(a, axis=axis, keepdims=keepdims, ddof=ddof))


# ---- shapes ---------------------------------------------------------------------------------

@grad_test("reshape")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_reshape(device, data):
    shape = data.draw(shapes())
    x = data.draw(float_arrays(shape))
    # a new shape of the same size: the sides shuffled, size-1 axes added, maybe one -1
    target = data.draw(st.permutations(list(shape) + [1] * data.draw(st.integers(0, 2))))
    if target and data.draw(st.booleans()):
        target[data.draw(st.integers(0, len(target) - 1))] = -1
    check(lambda t: ops.reshape(t, target), [x], device, lambda a: a.reshape(target))
    check(lambda t: t.reshape(*target), [x], device, lambda a: a.reshape(target))


@grad_test("transpose")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_transpose(device, data):
    shape = data.draw(shapes(max_dims=4))
    x = data.draw(float_arrays(shape))
    perm = data.draw(st.permutations(range(len(shape))))
    perm = [p - len(shape) if data.draw(st.booleans()) else p for p in perm]  # some negative
    axes_arg = None if data.draw(st.booleans()) else perm
    check(lambda t: ops.transpose(t, axes_arg), [x], device, lambda a: np.transpose(a, axes_arg))
    check(lambda t: t.T, [x], device, lambda a: a.T)


@pytest.mark.parametrize("device", DEVICES)
def test_transpose_by_a_cycle(device):
    # a 3-cycle is not its own inverse: the backward must apply the inverse permutation
    x = np.arange(24.0).reshape(2, 3, 4)
    check(lambda t: ops.transpose(t, (1, 2, 0)), [x], device, lambda a: a.transpose(1, 2, 0))
    check(lambda t: t.permute(2, 0, 1), [x], device, lambda a: a.transpose(2, 0, 1))


@grad_test("swapaxes")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_swapaxes(device, data):
    shape = data.draw(shapes(min_dims=1))
    x = data.draw(float_arrays(shape))
    a, b = (data.draw(st.integers(-len(shape), len(shape) - 1)) for _ in range(2))
    check(lambda t: ops.swapaxes(t, a, b), [x], device, lambda v: np.swapaxes(v, a, b))


@grad_test("broadcast_to")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_broadcast_to(device, data):
    shape = data.draw(shapes())
    x = data.draw(float_arrays(shape))
    lead = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2)))
    target = lead + tuple(data.draw(st.integers(1, 3)) if n == 1 else n for n in shape)
    check(lambda t: ops.broadcast_to(t, target), [x], device, lambda a: np.broadcast_to(a, target))
    check(lambda t: t.expand(*target), [x], device, lambda a: np.broadcast_to(a, target))


@grad_test("squeeze", "unsqueeze")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_squeeze_unsqueeze(device, data):
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=2))
    x = data.draw(float_arrays(shape))
    ones = [i for i, n in enumerate(shape) if n == 1]
    axis = None
    if ones and data.draw(st.booleans()):
        axis = data.draw(st.sampled_from(ones)) - (len(shape) if data.draw(st.booleans()) else 0)
    check(lambda t: ops.squeeze(t, axis), [x], device, lambda a: np.squeeze(a, axis))
    new = data.draw(st.integers(-len(shape) - 1, len(shape)))
    check(lambda t: ops.unsqueeze(t, new), [x], device, lambda a: np.expand_dims(a, new))


@grad_test("concat", "stack")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_concat_stack(device, data):
    shape = data.draw(shapes(min_dims=1))
    ndim, n = len(shape), data.draw(st.integers(1, 3))
    axis = data.draw(st.integers(-ndim, ndim - 1))
    sides = [data.draw(st.integers(1, 3)) for _ in range(n)]
    parts = [data.draw(float_arrays(tuple(s if i == axis % ndim else d for i, d in enumerate(shape))))
             for s in sides]
    check(lambda *ts: ops.concat(ts, axis), parts, device, lambda *a: np.concatenate(a, axis))
    same = [data.draw(float_arrays(shape)) for _ in range(n)]
    new = data.draw(st.integers(-ndim - 1, ndim))
    check(lambda *ts: ops.stack(ts, new), same, device, lambda *a: np.stack(a, new))


@grad_test("split")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_split(device, data):
    shape = data.draw(shapes(min_dims=1))
    x = data.draw(float_arrays(shape))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis]
    if data.draw(st.booleans()):
        sizes = data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
        cuts = np.arange(1, sizes) * (n // sizes)
    else:
        cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=3))) if n > 1 else []
        sizes = list(np.diff([0, *cuts, n]))
    pieces = np.split(x, cuts, axis)
    assert len(ops.split(leaf(x, device), sizes, axis)) == len(pieces)
    for i, piece in enumerate(pieces):
        check(lambda t: ops.split(t, sizes, axis)[i], [x], device, lambda a: piece)


# ---- indexing ---------------------------------------------------------------------------------

@st.composite
def index_keys(draw, shape):
    """Basic keys (ints, slices, None, ...), integer arrays (repeats, negatives), boolean masks."""
    kind = draw(st.sampled_from(["basic", "int_arrays", "mask", "mixed"]))
    if kind == "basic" or not shape:
        return draw(hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True))
    if kind == "int_arrays":
        return draw(hnp.integer_array_indices(shape, result_shape=shapes(0, 2)))
    if kind == "mask":
        k = draw(st.integers(1, len(shape)))
        return draw(hnp.arrays(bool, shape[:k]))
    # a slice on the first axis, an integer array with repeats on the second
    if len(shape) < 2:
        return (slice(None), ) if draw(st.booleans()) else np.array([0, 0, -1])
    idx = draw(hnp.arrays(np.int64, draw(shapes(1, 2)), elements=st.integers(-shape[1], shape[1] - 1)))
    return (slice(None, None, draw(st.sampled_from([1, -1, 2]))), idx)


def _key_on(device, key):
    parts = key if isinstance(key, tuple) else (key,)
    parts = tuple(on(device, k) if isinstance(k, np.ndarray) else k for k in parts)
    return parts if isinstance(key, tuple) else parts[0]


@grad_test("getitem")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_getitem(device, data):
    shape = data.draw(shapes())
    x = data.draw(float_arrays(shape))
    key = data.draw(index_keys(shape))
    dkey = _key_on(device, key)
    check(lambda t: t[dkey], [x], device, lambda a: a[key])
    check(lambda t: ops.getitem(t, dkey), [x], device, lambda a: a[key])


@pytest.mark.parametrize("device", DEVICES)
def test_getitem_repeated_indices_add_up(device):
    x = leaf([1.0, 2.0, 3.0], device)
    x[on(device, [0, 2, 0, 0])].backward(on(device, [1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_allclose(autograd.backend.to_device(x.grad, "cpu"), [8.0, 0.0, 2.0])


@grad_test("embedding")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_embedding(device, data):
    n, dim = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 4))
    w = data.draw(float_arrays((n, dim)))
    idx = data.draw(hnp.arrays(np.int64, data.draw(shapes(0, 2)), elements=st.integers(0, n - 1)))
    didx = on(device, idx)
    check(lambda t: ops.embedding(t, didx), [w], device, lambda a: a[idx])


# ---- softmax, losses, normalization -----------------------------------------------------------

def _np_log_softmax(a, axis):
    shifted = a - a.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


@grad_test("softmax", "log_softmax")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@given(data=st.data())
def test_softmax(name, device, data):
    shape = data.draw(shapes(min_dims=1))
    x = data.draw(float_arrays(shape, -4, 4))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    if name == "softmax":
        reference = lambda a: np.exp(_np_log_softmax(a, axis))  # noqa: E731
    else:
        reference = lambda a: _np_log_softmax(a, axis)  # noqa: E731
    check(lambda t: getattr(ops, name)(t, axis), [x], device, reference)


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_is_stable_for_large_logits(device):
    x = Tensor(np.array([[1000.0, 1000.0, -1000.0]], np.float32), device=device)
    np.testing.assert_allclose(ops.softmax(x).numpy(), [[0.5, 0.5, 0.0]])
    np.testing.assert_allclose(ops.log_softmax(x).numpy(), [[-np.log(2), -np.log(2), -2000 - np.log(2)]], rtol=1e-6)
    t = Tensor(np.array([0]), device=device)
    np.testing.assert_allclose(ops.cross_entropy(x, t).item(), np.log(2), rtol=1e-6)


def _np_cross_entropy(logits, targets, ignore_index, reduction):
    z = logits.reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    keep = t != ignore_index
    lsm = _np_log_softmax(z, -1)
    losses = np.where(keep, -lsm[np.arange(len(t)), np.where(keep, t, 0)], 0.0)
    if reduction == "none":
        return losses.reshape(targets.shape)
    return losses.sum() if reduction == "sum" else losses.sum() / keep.sum()


@grad_test("cross_entropy")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_cross_entropy(device, data):
    batch = data.draw(shapes(0, 2))
    V = data.draw(st.integers(1, 5))
    logits = data.draw(float_arrays(batch + (V,), -4, 4))
    ignore_index = data.draw(st.sampled_from([-100, 0, -1]))
    targets = data.draw(hnp.arrays(np.int64, batch, elements=st.integers(0, V - 1)))
    targets = np.where(data.draw(hnp.arrays(bool, batch)), ignore_index, targets)
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    if reduction == "mean":
        assume((targets != ignore_index).any())
    t = on(device, targets)
    check(lambda z: ops.cross_entropy(z, t, ignore_index, reduction), [logits], device,
          lambda z: _np_cross_entropy(z, targets, ignore_index, reduction))


def test_cross_entropy_mean_of_all_ignored_is_nan():
    z = leaf(np.zeros((2, 3)), "cpu")
    with np.errstate(invalid="ignore"):
        assert np.isnan(ops.cross_entropy(z, np.array([-100, -100])).item())



@grad_test("linear_cross_entropy")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_linear_cross_entropy(device, data):
    batch = data.draw(shapes(1, 2))
    d, V = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))
    x = data.draw(float_arrays(batch + (d,)))
    w = data.draw(float_arrays((V, d)))
    ignore_index = data.draw(st.sampled_from([-100, 0, -1]))
    targets = data.draw(hnp.arrays(np.int64, batch, elements=st.integers(0, V - 1)))
    targets = np.where(data.draw(hnp.arrays(bool, batch)), ignore_index, targets)
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    if reduction == "mean":
        assume((targets != ignore_index).any())
    chunk_rows = data.draw(st.integers(1, targets.size))  # often several chunks
    t = on(device, targets)
    check(lambda x, w: ops.linear_cross_entropy(x, w, t, ignore_index, reduction, chunk_rows), [x, w],
          device, lambda x, w: _np_cross_entropy(x @ w.T, targets, ignore_index, reduction))


def _loss_and_grads(f, x, w, upstream, device):
    xt, wt = leaf(x, device), leaf(w, device)
    y = f(xt, wt)
    y.backward(on(device, upstream))
    return y.numpy(), xt.grad, wt.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_rows", [1, 4, 10, 100, None])
def test_linear_cross_entropy_equals_cross_entropy_of_linear(device, reduction, chunk_rows):
    # 2 x 5 = 10 rows, 3 of them ignored, in chunks of 1, 4 (4+4+2), 10 and more than all rows
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 5, 6)) * 2, rng.standard_normal((7, 6))
    targets = rng.integers(0, 7, (2, 5))
    targets[0, 1] = targets[1, 0] = targets[1, 4] = -100
    upstream = rng.standard_normal(targets.shape) if reduction == "none" else np.array(rng.standard_normal())
    t = on(device, targets)
    fused = _loss_and_grads(lambda x, w: ops.linear_cross_entropy(x, w, t, reduction=reduction,
                                                                  chunk_rows=chunk_rows), x, w, upstream, device)
    plain = _loss_and_grads(lambda x, w: ops.cross_entropy(ops.linear(x, w), t, reduction=reduction),
                            x, w, upstream, device)
    for got, want in zip(fused, plain):
        got, want = autograd.backend.to_device(got, "cpu"), autograd.backend.to_device(want, "cpu")
        assert got.shape == want.shape and got.dtype == want.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    assert np.abs(fused[1][0, 1]).max() == 0  # an ignored row gets no gradient


def test_linear_cross_entropy_float32_keeps_its_dtype_and_default_chunks():
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((3, 4)).astype(np.float32), requires_grad=True)
    w = Tensor(rng.standard_normal((5, 4)).astype(np.float32), requires_grad=True)
    loss = ops.linear_cross_entropy(x, w, Tensor(np.array([1, -100, 4])))  # targets as a Tensor
    loss.backward()
    assert loss.dtype == np.float32 and x.grad.dtype == w.grad.dtype == np.float32
    want = _np_cross_entropy(x.numpy().astype(np.float64) @ w.numpy().T, np.array([1, -100, 4]), -100, "mean")
    np.testing.assert_allclose(loss.item(), want, rtol=1e-6)


@pytest.mark.parametrize("chunk_rows,keep_logits,products", [(None, 1 << 23, 1), (4, 1 << 23, 4), (None, 10, 2)])
def test_linear_cross_entropy_keeps_small_logits(monkeypatch, chunk_rows, keep_logits, products):
    # one chunk of at most KEEP_LOGITS logits is kept for backward (one logits product in all);
    # several chunks, or too many logits, are recomputed in backward (one more product each)
    calls = []
    real = linalg.mm
    monkeypatch.setattr(losses, "mm", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(losses.LinearCrossEntropy, "KEEP_LOGITS", keep_logits)
    rng = np.random.default_rng(2)
    x, w = leaf(rng.standard_normal((2, 3, 4)), "cpu"), leaf(rng.standard_normal((5, 4)), "cpu")
    t = rng.integers(0, 5, (2, 3))
    ops.linear_cross_entropy(x, w, t, chunk_rows=chunk_rows).backward()
    assert len(calls) == products
    want = _loss_and_grads(lambda x, w: ops.cross_entropy(ops.linear(x, w), t), x.numpy(), w.numpy(),
                           np.array(1.0), "cpu")
    np.testing.assert_allclose(x.grad, want[1], rtol=1e-12)
    np.testing.assert_allclose(w.grad, want[2], rtol=1e-12)


def test_linear_cross_entropy_mean_of_all_ignored_is_nan():
    x, w = leaf(np.ones((2, 3)), "cpu"), leaf(np.ones((4, 3)), "cpu")
    with np.errstate(invalid="ignore"):
        assert np.isnan(ops.linear_cross_entropy(x, w, np.array([-100, -100])).item())


class _FakeCudaArray(np.ndarray):
    """A NumPy array that reports itself as a CuPy array, to test device checks without a GPU."""

    __module__ = "cupy._fake"
    device = type("Device", (), {"id": 0})()


def test_linear_cross_entropy_rejects_bad_input():
    x, w = leaf(np.ones((2, 3)), "cpu"), leaf(np.ones((4, 3)), "cpu")
    t = np.array([0, 3])
    with pytest.raises(ValueError, match=r"linear_cross_entropy: input of shape \(2, 3\) does not fit weight of shape \(4, 2\)"):
        ops.linear_cross_entropy(x, leaf(np.ones((4, 2)), "cpu"), t)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: targets of shape \(3,\) for input of shape \(2, 3\)"):
        ops.linear_cross_entropy(x, w, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="linear_cross_entropy: targets must be integers, not float64"):
        ops.linear_cross_entropy(x, w, np.array([0.0, 1.0]))
    with pytest.raises(IndexError, match="linear_cross_entropy: target 4 is out of range for 4 classes"):
        ops.linear_cross_entropy(x, w, np.array([0, 4]))
    with pytest.raises(IndexError, match="target -2 is out of range"):
        ops.linear_cross_entropy(x, w, np.array([-2, 0]))
    with pytest.raises(ValueError, match="reduction must be mean, sum or none, not 'avg'"):
        ops.linear_cross_entropy(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="chunk_rows must be a positive integer, not 0"):
        ops.linear_cross_entropy(x, w, t, chunk_rows=0)
    with pytest.raises(RuntimeError, match="linear_cross_entropy: targets on cuda, input on cpu"):
        ops.linear_cross_entropy(x, w, t.view(_FakeCudaArray))
    ops.linear_cross_entropy(x, w, np.array([-100, 3]))  # ignore_index is not out of range

def _np_layer_norm(x, w, b, eps):
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return y * (1 if w is None else w) + (0 if b is None else b)


def _np_rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1 if w is None else w)


@grad_test("layer_norm", "rms_norm")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
@given(data=st.data())
def test_norms(name, device, data):
    C = data.draw(st.integers(1, 5))
    shape = data.draw(shapes(0, 2)) + (C,)
    # distinct values keep the variance (layer_norm) and mean square (rms_norm) away from 0,
    # where the normalization is steep and central differences would be inaccurate
    x = data.draw(float_arrays(shape, distinct=True, margin=0.2, away_from=[0.0], ))
    params = data.draw(st.sampled_from(["none", "weight", "both"] if name == "layer_norm" else ["none", "weight"]))
    eps = data.draw(st.sampled_from([1e-5, 0.1]))
    arrays = [x] + [data.draw(float_arrays((C,))) for _ in range({"none": 0, "weight": 1, "both": 2}[params])]
    if name == "layer_norm":
        f = lambda *ts: ops.layer_norm(*ts, eps=eps)  # noqa: E731
        reference = lambda x, w=None, b=None: _np_layer_norm(x, w, b, eps)  # noqa: E731
    else:
        f = lambda *ts: ops.rms_norm(*ts, eps=eps)  # noqa: E731
        reference = lambda x, w=None: _np_rms_norm(x, w, eps)  # noqa: E731
    check(f, arrays, device, reference, rtol=1e-9, atol=1e-10)


@grad_test("dropout")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_dropout(device, data):
    x = data.draw(float_arrays(data.draw(shapes())))
    p = data.draw(st.sampled_from([0.0, 0.25, 0.5, 0.9]))

    def f(t):  # the same mask on every call: reseed before drawing it
        autograd.manual_seed(7)
        return ops.dropout(t, p, training=True)

    y = f(leaf(x, device)).numpy()
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / (1 - p), rtol=1e-12)
    assert gradcheck(f, [leaf(x, device)])
    np.testing.assert_array_equal(ops.dropout(leaf(x, device), p, training=False).numpy(), x)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_keeps_the_expected_fraction(device):
    autograd.manual_seed(0)
    y = ops.dropout(Tensor(np.ones(100_000, np.float32), device=device), 0.3).numpy()
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.01  # 0.7 +- 7 standard deviations
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)
    with pytest.raises(ValueError, match="p must be in"):
        ops.dropout(Tensor(np.ones(3), device=device), 1.0)


def _np_attention(q, k, v, causal, scale):
    B, Hq, T, D = q.shape
    S = k.shape[2]
    G = Hq // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)  # query head h reads kv head h // G
    s = q @ np.swapaxes(k, -1, -2) * (1 / np.sqrt(D) if scale is None else scale)
    if causal:  # query t sits at position t + S - T and sees keys 0 .. t + S - T
        s = np.where(np.arange(S)[None, :] > np.arange(T)[:, None] + S - T, -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@grad_test("scaled_dot_product_attention")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_attention(device, data):
    B, Hkv, G, T, D = (data.draw(st.integers(1, n)) for n in (2, 2, 2, 3, 3))
    S = T + data.draw(st.integers(0, 2))  # S > T: the queries are the last T of S positions
    q = data.draw(float_arrays((B, Hkv * G, T, D)))
    k, v = data.draw(float_arrays((B, Hkv, S, D))), data.draw(float_arrays((B, Hkv, S, D)))
    causal = data.draw(st.booleans())
    scale = data.draw(st.sampled_from([None, 0.3]))
    check(lambda *t: ops.scaled_dot_product_attention(*t, causal=causal, scale=scale), [q, k, v],
          device, lambda *a: _np_attention(*a, causal, scale))


@pytest.mark.parametrize("device", DEVICES)
def test_attention_with_dropout(device):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 4, 3, 2)), rng.standard_normal((1, 2, 4, 2)), rng.standard_normal((1, 2, 4, 2))

    def f(*t):  # the same dropout mask on every call
        autograd.manual_seed(3)
        return ops.scaled_dot_product_attention(*t, dropout_p=0.4)

    assert gradcheck(f, [leaf(a, device) for a in (q, k, v)])
    no_drop = ops.scaled_dot_product_attention(*(leaf(a, device) for a in (q, k, v)), dropout_p=0.4, training=False)
    np.testing.assert_allclose(no_drop.numpy(), _np_attention(q, k, v, True, None), rtol=1e-10)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_attention_in_query_blocks(dropout_p):
    # the reference at the lengths where the float32 CPU fast path works in query blocks
    # (tests/test_fast.py holds those blocks to this reference): grouped heads, a key/value
    # cache (S > T), a last block shorter than the others
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((1, 2, 130, 3)), rng.standard_normal((1, 1, 133, 3)), rng.standard_normal((1, 1, 133, 3))

    def f(*t):  # the same dropout mask on every call
        autograd.manual_seed(3)
        return ops.scaled_dot_product_attention(*t, dropout_p=dropout_p)

    assert gradcheck(f, [leaf(a, "cpu") for a in (q, k, v)], mode="fast")
    if dropout_p == 0:
        np.testing.assert_allclose(f(*(Tensor(a) for a in (q, k, v))).numpy(), _np_attention(q, k, v, True, None), rtol=1e-10)


def test_fused_attention_dropout_mask_definition():
    # the NumPy definition of the GPU kernels' attention-dropout mask: splitmix64 of
    # seed + (bh T + i) S + j, kept when its top 24 bits are >= p 2^24; checked against the
    # same hash in Python integers, and for the kept fraction
    from autograd.fast.cuda.kernels import attention_dropout_keep

    def splitmix64(x):
        m = (1 << 64) - 1
        z = (x + 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    seed, BH, T, S, p = 2**62 + 99, 3, 5, 7, 0.4
    keep = attention_dropout_keep(seed, BH, T, S, p)
    assert keep.shape == (BH, T, S) and keep.dtype == bool
    for bh, i, j in [(0, 0, 0), (2, 4, 6), (1, 3, 2), (2, 0, 5)]:
        z = splitmix64(seed + (bh * T + i) * S + j)
        assert keep[bh, i, j] == ((z >> 40) >= int(p * 2**24))
    big = attention_dropout_keep(1, 8, 128, 128, 0.2)
    assert abs(big.mean() - 0.8) < 0.006
    assert not np.array_equal(big, attention_dropout_keep(2, 8, 128, 128, 0.2))
    assert attention_dropout_keep(5, 2, 4, 4, 0.0).all()


def _np_rope(x, cos, sin, style):
    a, b = (slice(0, x.shape[-1] // 2), slice(x.shape[-1] // 2, None)) if style == "half" else \
        (slice(0, None, 2), slice(1, None, 2))
    y = np.empty_like(x)
    y[..., a] = x[..., a] * cos - x[..., b] * sin
    y[..., b] = x[..., b] * cos + x[..., a] * sin
    return y


@grad_test("rope")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_rope(device, data):
    T, half = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))
    x = data.draw(float_arrays(data.draw(shapes(0, 2)) + (T, 2 * half)))
    angles = data.draw(float_arrays((T, half), -3.0, 3.0))
    cos, sin = np.cos(angles), np.sin(angles)
    style = data.draw(st.sampled_from(["half", "interleaved"]))
    check(lambda t: ops.rope(t, on(device, cos), on(device, sin), style), [x], device,
          lambda a: _np_rope(a, cos, sin, style))


def test_rope_rejects_bad_tables_and_styles():
    x = leaf(np.ones((2, 3, 4)), "cpu")
    with pytest.raises(ValueError, match=r"rope: tables of shape \(3, 3\) for input of shape \(2, 3, 4\)"):
        ops.rope(x, np.ones((3, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="style must be one of"):
        ops.rope(x, np.ones((3, 2)), np.ones((3, 2)), "spiral")


@pytest.mark.parametrize("device", DEVICES)
def test_softplus_and_log_sigmoid_do_not_overflow(device):
    x = leaf([-1000.0, -50.0, 0.0, 50.0, 1000.0], device)
    sp, ls = ops.softplus(x), ops.log_sigmoid(x)
    tiny = np.exp(-50.0)
    np.testing.assert_allclose(sp.numpy(), [0.0, tiny, np.log(2), 50.0, 1000.0], rtol=1e-12)
    np.testing.assert_allclose(ls.numpy(), [-1000.0, -50.0, -np.log(2), -tiny, 0.0], rtol=1e-12)
    (g_sp,) = autograd.grad(sp.sum(), [x])  # sigmoid(x), exact in the tails too
    (g_ls,) = autograd.grad(ls.sum(), [x])  # sigmoid(-x)
    sig = [0.0, tiny / (1 + tiny), 0.5, 1 / (1 + tiny), 1.0]
    np.testing.assert_allclose(backend.to_device(g_sp, "cpu"), sig, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(backend.to_device(g_ls, "cpu"), sig[::-1], rtol=1e-12, atol=1e-300)
