"""Every fast path against its reference, and every Function against a test.

`test_every_function_has_a_test` walks all Function subclasses of the engine and of tinyllm:
a reference op must name its gradient test (tests/test_ops.py's GRAD_TESTS, or another test
file), a fast path (a subclass registered in autograd.fast) must have a case in FAST_CASES
here. `test_fast_path_matches_its_reference` then runs each registered fast path and its
reference on the same hypothesis-drawn inputs and upstream gradient, and compares the output
and every input gradient, in the dtypes the path runs in:

    float32 (CPU and CUDA)               relative error <= 1e-3 (summation order, amplified
                                         by the cancellation in dS = P (dP - rowsum))
    bfloat16 / float16 products (CUDA)   the same autocast mode on both sides;
                                         relative error <= 3e-2 (bfloat16), 5e-3 (float16)
    bfloat16 inputs (CUDA, the paths      bfloat16 mode; the fast path gets the inputs (and
    registered for bfloat16)              the upstream gradient) in bfloat16, the reference
                                          the same values in float32; relative error <= 3e-2

The relative error is max |fast - reference| / max |reference| per array (at least 1e-3 of
the largest array's, for arrays that are rounding noise around 0 on both sides). The CUDA cases
skip without a GPU and run in scripts/gpu-check.sh.
"""

import importlib
import pkgutil

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import autograd
import tinyllm
from autograd import Function, Tensor, amp, backend, fast
from autograd.fast import FastPath
from autograd.ops.activations import GeluTanh, SwiGLU
from autograd.ops.attention import Attention
from autograd.ops.dropout import Dropout
from autograd.ops.elementwise import Add
from autograd.ops.embedding import Embedding
from autograd.ops.linalg import Linear
from autograd.ops.losses import CrossEntropy, LinearCrossEntropy
from autograd.ops.norm import LayerNorm, RMSNorm
from autograd.ops.rope import Rotate

import test_ops

TOLERANCE = {"float32": 1e-3, "bfloat16": 3e-2, "float16": 5e-3, "bfloat16-inputs": 3e-2}


# ---- coverage ---------------------------------------------------------------------------------

# reference Function -> its op's name in tests/test_ops.py's GRAD_TESTS, or "file::test"
REFERENCE_TESTS = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Maximum": "maximum",
    "Neg": "neg", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Rsqrt": "rsqrt", "Abs": "abs",
    "Clip": "clip", "Cast": "cast", "ToDevice": "to_device", "Where": "where",
    "Tanh": "tanh", "Sigmoid": "sigmoid", "Softplus": "softplus", "LogSigmoid": "log_sigmoid",
    "Relu": "relu", "Silu": "silu", "SwiGLU": "swiglu", "GeluTanh": "gelu", "GeluErf": "gelu_erf",
    "Sum": "sum", "Max": "max", "Var": "var",
    "Reshape": "reshape", "Transpose": "transpose", "BroadcastTo": "broadcast_to",
    "Concat": "concat", "GetItem": "getitem",
    "MatMul": "matmul", "Linear": "linear", "LoRALinear": "lora_linear",
    "LayerNorm": "layer_norm", "RMSNorm": "rms_norm",
    "Softmax": "softmax", "LogSoftmax": "log_softmax", "CrossEntropy": "cross_entropy",
    "LinearCrossEntropy": "linear_cross_entropy", "Attention": "scaled_dot_product_attention",
    "Embedding": "embedding", "Dropout": "dropout", "Rotate": "rope",
    "Checkpoint": "test_checkpoint.py::test_checkpoint_gives_the_unwrapped_values_and_gradients",
}


def _all_functions():
    for package in (autograd, tinyllm):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith("__main__"):  # running the CLI is not importing it
                importlib.import_module(info.name)
    fast.registered()  # loads the fast-path modules
    found, todo = set(), [Function]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return {c for c in found if c.__module__.split(".")[0] in ("autograd", "tinyllm")}


def test_every_function_has_a_test():
    missing = []
    for cls in sorted(_all_functions(), key=lambda c: c.__qualname__):
        if issubclass(cls, FastPath):
            if cls not in FAST_CASES.get(cls.reference(), {}).get("paths", ()):
                missing.append(f"fast path {cls.__name__}: no case in tests/test_fast.py FAST_CASES")
            continue
        name = REFERENCE_TESTS.get(cls.__name__)
        if name is None:
            missing.append(f"{cls.__module__}.{cls.__name__}: not in REFERENCE_TESTS")
        elif "::" in name:
            file, test = name.split("::")
            if not callable(getattr(importlib.import_module(file[:-3]), test, None)):
                missing.append(f"{cls.__name__}: {name} does not exist")
        elif name not in test_ops.GRAD_TESTS:
            missing.append(f"{cls.__name__}: no gradient test for {name!r} in tests/test_ops.py")
    assert not missing, "\n".join(missing)


def test_every_fast_path_is_registered_and_names_its_reference():
    for ref, paths in fast.registered().items():
        assert not issubclass(ref, FastPath)
        for cls in paths:
            assert cls.reference() is ref and cls.device in ("cpu", "cuda") and cls.dtypes
            assert issubclass(cls, ref) and cls.__module__.startswith("autograd.fast."), cls


# ---- the cases: inputs for each reference, shared by its fast paths --------------------------
# A case draws (constructor arguments, input arrays, arrays that decide the pick) with `on`
# moving raw arrays to the device; inputs are float32 and get gradients.

def _f32(data, shape, low=-2.0, high=2.0):
    n = int(np.prod(shape))
    values = data.draw(st.lists(st.floats(low, high, width=32), min_size=n, max_size=n))
    return np.array(values, np.float32).reshape(shape)


def _rows(data, max_rows=4, max_cols=6):
    lead = tuple(data.draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    return lead + (data.draw(st.integers(1, max_cols)),)


def case_swiglu(data, on):
    shape = _rows(data)
    same = data.draw(st.booleans())
    b_shape = shape if same else shape[:-1] + (1,)
    a, b = _f32(data, shape, -4, 4), _f32(data, b_shape)
    return (), [a, b], None


def case_add(data, on):
    shape = _rows(data)
    return (), [_f32(data, shape), _f32(data, shape)], None


def case_linear(data, on):
    shape, out = _rows(data), data.draw(st.integers(1, 6))
    bias = [_f32(data, (out,))] if data.draw(st.booleans()) else []
    return (), [_f32(data, shape), _f32(data, (out, shape[-1]))] + bias, None


def case_gelu(data, on):
    return (), [_f32(data, _rows(data), -4, 4)], None


def case_norm(data, on, bias):
    shape = _rows(data, max_cols=40)
    x = _f32(data, shape) + np.float32(0.5)
    params = data.draw(st.integers(0, 2 if bias else 1))
    ws = [_f32(data, shape[-1:]) for _ in range(params)]
    assume(float(np.ptp(x, axis=-1).min(initial=1.0)) > 1e-2 or not bias)  # a row of equal values
    return (data.draw(st.sampled_from([1e-5, 1e-2])),), [x] + ws, None


def case_embedding(data, on):
    V, d = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    idx = np.array(data.draw(st.lists(st.integers(0, V - 1), min_size=0, max_size=12)), np.int64)
    return (on(idx.reshape(data.draw(st.sampled_from([(-1,), (1, -1)])))),), [_f32(data, (V, d))], None


def _targets(data, rows, V):
    t = np.array(data.draw(st.lists(st.integers(0, V - 1), min_size=rows, max_size=rows)), np.int64)
    t[np.array(data.draw(st.lists(st.booleans(), min_size=rows, max_size=rows)), bool)] = -100
    return t


def case_cross_entropy(data, on):
    N, V = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 30))
    z = _f32(data, (N, V), -6, 6)
    return (on(_targets(data, N, V)), -100, data.draw(st.sampled_from(["mean", "sum", "none"]))), [z], None


def case_linear_cross_entropy(data, on):
    N, d, V = data.draw(st.integers(1, 7)), data.draw(st.integers(1, 8)), data.draw(st.integers(1, 30))
    x, w = _f32(data, (N, d)), _f32(data, (V, d))
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    return (on(_targets(data, N, V)), -100, reduction, data.draw(st.integers(1, 8))), [x, w], None


def case_attention(data, on):
    B, Hkv, G = (data.draw(st.integers(1, n)) for n in (2, 2, 2))
    T = data.draw(st.sampled_from([1, 5, 33, 130]))  # 130: the CPU path's query blocks
    S = T + data.draw(st.sampled_from([0, 3]))
    D = data.draw(st.sampled_from([16, 32]))
    causal = data.draw(st.booleans()) or S > T
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in
               ((B, Hkv * G, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    p = data.draw(st.sampled_from([0.0, 0.0, 0.3]))
    return (causal, 1 / np.sqrt(D), p), [q, k, v], None


def case_rope(data, on):
    T, half = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 8))
    angles = _f32(data, (T, half), -3, 3)
    cos, sin = on(np.cos(angles)), on(np.sin(angles))
    x = _f32(data, tuple(data.draw(st.lists(st.integers(1, 3), max_size=2))) + (T, 2 * half))
    return (cos, sin, data.draw(st.sampled_from(["half", "interleaved"]))), [x], [cos, sin]


def case_dropout(data, on):
    return (data.draw(st.sampled_from([0.1, 0.5])),), [_f32(data, _rows(data, max_cols=50))], None


FAST_CASES = {  # reference -> its case and the paths it covers (filled from the registry below)
    Add: {"case": case_add},
    Linear: {"case": case_linear, "low": True},
    SwiGLU: {"case": case_swiglu},
    GeluTanh: {"case": case_gelu, "low": True},
    LayerNorm: {"case": lambda d, on: case_norm(d, on, True)},
    RMSNorm: {"case": lambda d, on: case_norm(d, on, False)},
    Embedding: {"case": case_embedding},
    CrossEntropy: {"case": case_cross_entropy},
    LinearCrossEntropy: {"case": case_linear_cross_entropy},
    Attention: {"case": case_attention, "low": True},
    Rotate: {"case": case_rope},
    Dropout: {"case": case_dropout},
}
for _ref, _paths in fast.registered().items():
    if _ref in FAST_CASES:
        FAST_CASES[_ref]["paths"] = list(_paths)


def _params():
    out = []
    for ref, entry in FAST_CASES.items():
        for cls in entry.get("paths", ()):
            modes = ["float32"] + (["bfloat16", "float16"] if entry.get("low") and cls.device == "cuda" else [])
            modes += ["bfloat16-inputs"] if "bfloat16" in cls.dtypes else []
            marks = [] if cls.device == "cpu" else [pytest.mark.skipif(
                not backend.cuda_available(), reason="CuPy with a CUDA GPU is not available")]
            out += [pytest.param(cls, mode, id=f"{cls.__name__}-{mode}", marks=marks) for mode in modes]
    return out


def _run(cls, ctor, arrays, device, upstream, mode):
    """Output and input gradients of cls(*ctor) applied to the arrays, as float64 NumPy."""
    tensors = [Tensor(a, requires_grad=True, device=device) for a in arrays]
    autograd.manual_seed(11)  # dropout: the same mask on both sides
    with amp.autocast(mode.split("-")[0]):
        y = cls(*ctor).apply(*tensors)
        y.backward(backend.to_device(upstream.astype(y.dtype), device))
    grads = [t.grad for t in tensors]
    return [np.asarray(backend.to_device(a, "cpu"), np.float64) for a in [y.data] + grads]


@pytest.mark.parametrize("cls,mode", _params())
@given(data=st.data())
def test_fast_path_matches_its_reference(cls, mode, data):
    ref = cls.reference()
    device = cls.device

    def on(a):
        return backend.to_device(a, device)

    ctor, arrays, pick_extra = FAST_CASES[ref]["case"](data, on)
    # one query and one key: every dQ is 0 in exact arithmetic, and a path handed bfloat16
    # inputs writes y in bfloat16, so its dQ is y's rounding times |dO| |y| |k| (as in
    # FlashAttention, which rounds O the same way): no relative comparison applies to it. The
    # other modes still compare this shape.
    assume(not (ref is Attention and mode == "bfloat16-inputs" and arrays[0].shape[2] == 1
                and arrays[1].shape[2] == 1))
    if mode == "bfloat16-inputs":  # both sides get the bfloat16 values; the path gets them as such
        low = [a.astype(backend.bfloat16()) for a in arrays]
        arrays, path_arrays = [a.astype(np.float32) for a in low], low
    else:
        path_arrays = arrays
    pick_arrays = [on(a) for a in path_arrays] + list(pick_extra or [])
    assume(fast.pick(ref, *pick_arrays) is cls)  # the inputs this path is chosen for
    with autograd.no_grad():
        shape = cls(*ctor).apply(*[Tensor(a, device=device) for a in arrays]).shape
    upstream = np.random.default_rng(0).standard_normal(shape)
    if mode == "bfloat16-inputs":
        upstream = upstream.astype(backend.bfloat16()).astype(np.float64)
    want = _run(ref, ctor, arrays, device, upstream, mode)
    got = _run(cls, ctor, path_arrays, device, upstream, mode)
    names = ["output"] + [f"grad {i}" for i in range(len(arrays))]
    # an array that is 0 in exact arithmetic (dQ of a query that sees one key) is rounding
    # noise on both sides: errors are relative to at least 1e-3 of the largest array's scale
    floor = 1e-3 * max(float(np.nan_to_num(np.abs(w)).max(initial=0)) for w in want)
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, name
        assert np.array_equal(np.isnan(g), np.isnan(w)), f"{cls.__name__} {name}: nan differs"
        g, w = np.nan_to_num(g), np.nan_to_num(w)  # a mean over no kept rows is nan on both
        err = np.abs(g - w).max(initial=0) / max(np.abs(w).max(initial=0), floor, 1e-30)
        assert err <= TOLERANCE[mode], \
            f"{cls.__name__} ({mode}) {name}: relative error {err:.3g}"


def test_fused_off_runs_the_reference_everywhere(monkeypatch):
    x = Tensor(np.ones((2, 3), np.float32))
    assert fast.pick(LayerNorm, x.data) is not LayerNorm  # a CPU fast path exists
    monkeypatch.setenv("TINYLLM_FUSED", "0")
    for ref in fast.registered():
        assert fast.pick(ref, x.data) is ref
    y = autograd.layer_norm(Tensor(np.ones((2, 3), np.float32), requires_grad=True))
    assert type(y._ctx) is LayerNorm
