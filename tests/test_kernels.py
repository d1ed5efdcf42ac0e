"""The fused CUDA kernels against their definition: the same op on NumPy arrays.

Each test runs an op forward and backward on the CPU (NumPy) and on the GPU (CuPy, where
autograd.fast picks the CUDA paths of autograd/fast/cuda/), from the same inputs and the same
upstream gradient, and compares outputs and every input gradient, at fixed shapes that reach
each kernel's edge cases (tests/test_fast.py compares each path with its reference on drawn
inputs). Skipped without CUDA.
"""

import numpy as np
import pytest

import autograd
from autograd import Tensor, amp, backend, fast, ops
from autograd.fast.cuda import kernels

pytestmark = pytest.mark.skipif(not backend.cuda_available(), reason="CuPy with a CUDA GPU is not available")

def run(op, arrays, device, upstream):
    """Output and input gradients of op(*tensors) under the upstream gradient, as NumPy."""
    tensors = [Tensor(a, requires_grad=a.dtype.kind == "f", device=device) for a in arrays]
    y = op(*tensors)
    y.backward(backend.to_device(upstream, device))
    return [y.numpy()] + [t.grad.get() if device != "cpu" else t.grad for t in tensors if t.requires_grad]


def compare(op, arrays, seed=0, rtol=2e-4, atol=2e-5):
    rng = np.random.default_rng(seed)
    with autograd.no_grad():
        shape, dtype = (lambda y: (y.shape, y.dtype))(op(*[Tensor(a) for a in arrays]))
    upstream = rng.standard_normal(shape).astype(dtype)
    want = run(op, arrays, "cpu", upstream)
    got = run(op, arrays, "cuda", upstream)
    for i, (g, w) in enumerate(zip(got, want)):
        err = np.abs(g.astype(np.float64) - w).max() / (np.abs(w).max() + 1e-30)
        assert err < rtol or np.allclose(g, w, rtol=rtol, atol=atol), f"output/grad {i}: relative error {err:.3g}"


def rand(rng, *shape, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("T,S", [(7, 7), (64, 64), (300, 300), (3, 40)])
def test_attention(causal, heads, T, S):
    if not causal and T != S:
        pytest.skip("a cache only makes sense with causal attention")
    rng = np.random.default_rng(T * S)
    Hq, Hkv = heads
    q, k, v = rand(rng, 2, Hq, T, 16), rand(rng, 2, Hkv, S, 16), rand(rng, 2, Hkv, S, 16)
    compare(lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, causal=causal), [q, k, v])


def test_attention_float64_uses_the_reference_exactly():
    rng = np.random.default_rng(1)
    q, k, v = rand(rng, 1, 2, 9, 8, dtype=np.float64), rand(rng, 1, 2, 9, 8, dtype=np.float64), rand(rng, 1, 2, 9, 8, dtype=np.float64)
    compare(ops.scaled_dot_product_attention, [q, k, v], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["tf32", "bfloat16", "float16"])
def test_attention_low_precision_close_to_float32(mode):
    rng = np.random.default_rng(2)
    q, k, v = rand(rng, 2, 4, 128, 32), rand(rng, 2, 4, 128, 32), rand(rng, 2, 4, 128, 32)
    ref = ops.scaled_dot_product_attention(*[Tensor(a) for a in (q, k, v)]).numpy()
    with amp.autocast(mode):
        got = ops.scaled_dot_product_attention(*[Tensor(a, device="cuda") for a in (q, k, v)]).numpy()
    assert np.abs(got - ref).max() < (2e-2 if mode != "tf32" else 5e-3)


@pytest.mark.parametrize("V", [10, 1000, 50304])
def test_cross_entropy(V):
    rng = np.random.default_rng(V)
    z = rand(rng, 37, V, scale=3.0)
    t = rng.integers(0, V, 37)
    t[::5] = -100
    for reduction in ("mean", "sum", "none"):
        compare(lambda z: ops.cross_entropy(z, backend.to_device(t, z.device), reduction=reduction), [z])


def test_cross_entropy_large_logits_keep_small_losses():
    z = np.full((4, 100), 1000.0, np.float32)
    z[:, 3] = 1010.0
    t = np.array([3, 3, 3, 3])
    loss = ops.cross_entropy(Tensor(z, device="cuda"), backend.to_device(t, "cuda")).item()
    ref = np.log(1 + 99 * np.exp(-10.0))
    assert abs(loss - ref) < 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy(reduction):
    rng = np.random.default_rng(11)
    x, w = rand(rng, 3, 100, 64), rand(rng, 5000, 64, scale=0.2)  # 300 rows: chunks of 128, 128, 44
    t = rng.integers(0, 5000, (3, 100))
    t[:, ::7] = -100
    compare(lambda x, w: ops.linear_cross_entropy(x, w, backend.to_device(t, x.device), reduction=reduction,
                                                  chunk_rows=128), [x, w])


@pytest.mark.parametrize("mode", ["tf32", "bfloat16"])
def test_linear_cross_entropy_low_precision_matches_linear_then_cross_entropy(mode):
    rng = np.random.default_rng(12)
    x, w = rand(rng, 300, 64), rand(rng, 5000, 64, scale=0.2)
    t = backend.to_device(rng.integers(0, 5000, 300), "cuda")
    results = []
    for op in (lambda x, w: ops.linear_cross_entropy(x, w, t, chunk_rows=128),
               lambda x, w: ops.cross_entropy(ops.linear(x, w), t)):
        xt, wt = Tensor(x, requires_grad=True, device="cuda"), Tensor(w, requires_grad=True, device="cuda")
        with amp.autocast(mode):
            loss = op(xt, wt)
            loss.backward()
        results.append([loss.numpy(), xt.grad.get(), wt.grad.get()])
    for got, want in zip(*results):
        assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


@pytest.mark.parametrize("d", [8, 768, 2500])
def test_norms(d):
    rng = np.random.default_rng(d)
    x, w, b = rand(rng, 3, 5, d) + 0.5, rand(rng, d), rand(rng, d)
    compare(lambda x, w, b: ops.layer_norm(x, w, b), [x, w, b])
    compare(lambda x: ops.layer_norm(x), [x])
    compare(lambda x, w: ops.rms_norm(x, w), [x, w])
    compare(lambda x: ops.rms_norm(x), [x])


def test_swiglu():
    rng = np.random.default_rng(3)
    compare(ops.swiglu, [rand(rng, 4, 33, 70, scale=3), rand(rng, 4, 33, 70)])


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_gemm_against_matmul(ta, tb):
    cp = backend.cupy_module()
    rng = np.random.default_rng(4)
    a = cp.asarray(rand(rng, 3, 20, 12))
    b = cp.asarray(rand(rng, 3, 20, 12) if ta != tb else rand(rng, 3, 12, 20))
    if ta and not tb:
        b = cp.asarray(rand(rng, 3, 20, 9))
    if tb and not ta:
        b = cp.asarray(rand(rng, 3, 9, 12))
    A = a.transpose(0, 2, 1) if ta else a
    Bm = b.transpose(0, 2, 1) if tb else b
    want = (A @ Bm).get()
    got = kernels.gemm(a, b, trans_a=ta, trans_b=tb).get()
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5)
    out = cp.ones(want.shape, np.float32)
    kernels.gemm(a, b, trans_a=ta, trans_b=tb, out=out, accumulate=True)
    assert np.allclose(out.get(), want + 1, rtol=1e-5, atol=1e-5)
    lo = kernels.gemm(a.astype(backend.bfloat16()), b.astype(backend.bfloat16()), trans_a=ta, trans_b=tb)
    assert lo.dtype == np.float32 and np.allclose(lo.get(), want, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("route", ["ex", "lt", "tune"])
@pytest.mark.parametrize("ta,tb", [(False, True), (False, False), (True, False), (True, True)])
def test_2d_gemm_routes_against_float64(monkeypatch, route, ta, tb):
    """2-D products (cuBLASLt unless TINYLLM_GEMM=ex; tune times its candidates first) equal
    the float64 product of the same operands: plain, accumulated into an output, into a
    bfloat16 output, from operands whose rows are strided views, and under TF32."""
    monkeypatch.setenv("TINYLLM_GEMM", route)
    cp = backend.cupy_module()
    rng = np.random.default_rng(5)
    m, n, k = 70, 48, 40
    for low in (np.dtype(np.float32), backend.bfloat16()):
        big_a = cp.asarray(rand(rng, *((k, m + 8) if ta else (m, k + 8)))).astype(low)
        a = big_a[:, :m] if ta else big_a[:, :k]  # rows strided: a leading dimension > columns
        b = cp.asarray(rand(rng, *((n, k) if tb else (k, n)))).astype(low)
        A = a.astype(np.float32).get().astype(np.float64)
        B = b.astype(np.float32).get().astype(np.float64)
        want = (A.T if ta else A) @ (B.T if tb else B)
        tol = 1e-4 * np.abs(want).max()
        got = kernels.gemm(a, b, ta, tb)
        assert got.shape == (1, m, n) and got.dtype == np.float32
        assert np.abs(got.get()[0] - want).max() < tol
        out = cp.asarray(rand(rng, m, n))
        before = out.get().astype(np.float64)
        kernels.gemm(a, b, ta, tb, out=out, accumulate=True)
        assert np.abs(out.get() - before - want).max() < tol
        lo = kernels.gemm(a, b, ta, tb, out_dtype=low)
        assert lo.dtype == low
        assert np.abs(lo.astype(np.float32).get()[0] - want).max() < 1e-2 * np.abs(want).max()
    f32 = cp.asarray(rand(rng, m, k)), cp.asarray(rand(rng, n, k))
    want = f32[0].get().astype(np.float64) @ f32[1].get().astype(np.float64).T
    with amp.autocast("tf32"):
        got = kernels.gemm(*f32, trans_b=True).get()[0]
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 5e-3  # TensorFloat-32 inputs: a 10-bit mantissa


@pytest.mark.parametrize("low", ["bfloat16", "float16"])
def test_cast_is_astype_in_c_order(low):
    """kernels.cast (amp.low's fast path) gives CuPy's astype bit for bit, in C order: contiguous
    arrays with a tail of n % 8, an unaligned start, strided views of 2 and 4 axes (attention's
    transposed heads), 5 axes (CuPy's fallback), specials (inf, nan, subnormals, overflow)."""
    cp = backend.cupy_module()
    low = backend.bfloat16() if low == "bfloat16" else np.dtype(np.float16)
    rng = np.random.default_rng(6)
    base = rand(rng, 4, 37, 6, 16, scale=100)
    base.flat[:8] = [np.inf, -np.inf, np.nan, 1e-40, -1e-45, 3.4e38, 65520.0, -0.0]
    x = cp.asarray(base)
    cases = {"contiguous": x, "odd size": x.reshape(-1)[: 8 * 101 + 5],
             "unaligned": x.reshape(-1)[1:1001], "2-D strided": x.reshape(-1, 16)[::3, 1:9],
             "heads transposed": x.transpose(0, 2, 1, 3),
             "5 axes": x.reshape(4, 37, 6, 4, 4).transpose(4, 1, 0, 2, 3), "empty": x[:0]}
    for name, a in cases.items():
        got = kernels.cast(a, low)
        want = cp.ascontiguousarray(a.astype(low))
        assert got.dtype == low and got.shape == a.shape and got.flags.c_contiguous, name
        g, w = got.view(np.uint16).get(), want.view(np.uint16).get()
        nan = np.isnan(want.astype(np.float32).get())
        assert np.array_equal(g[~nan], w[~nan]), name  # every bit, signed zeros included
        assert np.isnan(got.astype(np.float32).get()[nan]).all(), name
    with amp.autocast("bfloat16"):
        assert amp.low(x).flags.c_contiguous and amp.low(x).dtype == backend.bfloat16()


def test_attention_backward_preamble_reads_a_strided_gradient():
    """drow = rowsum(g * y) and g in bfloat16 from one kernel, g a transposed view as the model
    hands it (its rows strided, its last axis contiguous), against CuPy's steps."""
    cp = backend.cupy_module()
    rng = np.random.default_rng(7)
    B, H, T, D = 2, 3, 40, 64
    g = cp.asarray(rand(rng, B, T, H, D)).transpose(0, 2, 1, 3)
    y = cp.asarray(rand(rng, B, H, T, D))
    drow, gl = kernels._attention_bwd_prep(g, y, backend.bfloat16())
    want = (g.get().astype(np.float64) * y.get()).sum(axis=-1)
    assert drow.shape == (B, H, T) and np.allclose(drow.get(), want, rtol=1e-5, atol=1e-5)
    assert gl.flags.c_contiguous and gl.data.ptr % 16 == 0
    assert np.array_equal(gl.view(np.uint16).get(),
                          cp.ascontiguousarray(g.astype(backend.bfloat16())).view(np.uint16).get())


def test_lm_head_gradient_is_written_in_the_product_dtype():
    """Under bfloat16, the fused head's logits gradient comes out of the kernel in bfloat16,
    equal bit for bit to the float32 gradient cast afterwards (the reference's amp.low)."""
    cp = backend.cupy_module()
    rng = np.random.default_rng(8)
    z = cp.asarray(rand(rng, 9, 70, scale=3))
    t = cp.asarray(rng.integers(0, 70, 9))
    _, lse = kernels.cross_entropy_forward(z, t, -1)
    w = cp.asarray(rand(rng, 9))
    full = kernels.cross_entropy_backward(z, t, lse, w)
    low = kernels.cross_entropy_backward(z, t, lse, w, out_dtype=backend.bfloat16())
    assert full.dtype == np.float32 and low.dtype == backend.bfloat16()
    assert np.array_equal(low.view(np.uint16).get(), full.astype(backend.bfloat16()).view(np.uint16).get())


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("TINYLLM_FUSED", "0")
    cp = backend.cupy_module()
    from autograd.ops.norm import LayerNorm

    assert not fast.cuda_float32(cp.zeros(3, np.float32))
    assert fast.pick(LayerNorm, cp.zeros(3, np.float32)) is LayerNorm
    monkeypatch.setenv("TINYLLM_FUSED", "1")
    assert fast.cuda_float32(cp.zeros(3, np.float32))
    assert fast.pick(LayerNorm, cp.zeros(3, np.float32)).__name__ == "LayerNormCUDA"
    assert fast.pick(LayerNorm, cp.zeros(3, np.float64)) is LayerNorm  # float64: the reference
    assert not fast.cuda_float32(np.zeros(3, np.float32))


def test_adamw_kernel_matches_the_numpy_step():
    from autograd import optim

    rng = np.random.default_rng(5)
    shapes = [(7, 5), (5,), (300, 700)]  # the last spans several 65536-element chunks
    from autograd.nn import Parameter

    params = {"cpu": [Parameter(rng.standard_normal(s).astype(np.float32)) for s in shapes]}
    params["cuda"] = [Parameter(p.numpy(), device="cuda") for p in params["cpu"]]
    opts = {dev: optim.AdamW(params[dev], lr=1e-2, weight_decay=0.1) for dev in params}
    for step in range(3):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        for dev in params:
            for p, g in zip(params[dev], grads):
                p.grad = backend.to_device(g, dev)
            opts[dev].step()
    for pc, pg in zip(params["cpu"], params["cuda"]):
        assert np.allclose(pc.numpy(), pg.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_kernel(style):
    from tinyllm.rope import rope, rope_tables

    rng = np.random.default_rng(6)
    cos, sin = (a.astype(np.float32) for a in rope_tables(11, 8))
    x = rand(rng, 2, 3, 11, 8)
    compare(lambda t: rope(t, backend.to_device(cos, t.device), backend.to_device(sin, t.device), style), [x])


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_kernel_reads_and_writes_the_heads_transposed(style):
    """The model's q is a transposed view of its (B, T, H*D) product: the kernel reads it in
    place, and the backward writes the gradient back in that (B, T, H, D) memory order, equal
    to the rotation of a contiguous copy; the model's rope, transpose and reshape then agree
    with the CPU forward and backward."""
    from tinyllm.rope import rope, rope_tables

    cp = backend.cupy_module()
    rng = np.random.default_rng(9)
    B, T, H, D = 2, 11, 3, 8
    cos, sin = (cp.asarray(a.astype(np.float32)) for a in rope_tables(T, D))
    x = cp.asarray(rand(rng, B, T, H, D)).transpose(0, 2, 1, 3)
    inter = style == "interleaved"
    y = kernels.rope_rotate(x, cos, sin, +1, inter)
    assert y.flags.c_contiguous
    assert np.array_equal(y.get(), kernels.rope_rotate(cp.ascontiguousarray(x), cos, sin, +1, inter).get())
    g = cp.asarray(rand(rng, B, H, T, D))
    gx = kernels.rope_rotate(g, cos, sin, -1, inter, out_layout=x.strides)
    assert gx.shape == x.shape and gx.transpose(0, 2, 1, 3).flags.c_contiguous
    assert np.array_equal(gx.get(), kernels.rope_rotate(g, cos, sin, -1, inter).get())

    def model_like(t):  # (B, T, H*D) -> heads -> rope -> back, as tinyllm.model's attention
        c, s = backend.to_device(cos.get(), t.device), backend.to_device(sin.get(), t.device)
        heads = t.reshape(B, T, H, D).transpose(0, 2, 1, 3)
        return rope(heads, c, s, style).transpose(0, 2, 1, 3).reshape(B, T, H * D) * 1.0

    compare(model_like, [rand(rng, B, T, H * D)])


def test_grad_norm_kernel():
    from autograd import optim
    from autograd.nn import Parameter

    rng = np.random.default_rng(7)
    ps = [Parameter(np.zeros(s, np.float32), device="cuda") for s in [(30, 7), (5,), (200_000,)]]
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = backend.to_device(g, "cuda")
    want = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))
    assert abs(optim.grad_norm(ps) - want) < 1e-5 * want


def test_clip_scales_every_array_in_one_launch():
    from autograd import optim
    from autograd.nn import Parameter

    rng = np.random.default_rng(8)
    shapes = [(3, 4), (150_000,), (7,)]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ps = [Parameter(np.zeros(s, np.float32), device="cuda") for s in shapes]
    for p, g in zip(ps, grads):
        p.grad = backend.to_device(g, "cuda")
    norm = optim.clip_grad_norm(ps, 1.0)
    want = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))
    assert abs(norm - want) < 1e-5 * want
    for p, g in zip(ps, grads):
        assert np.allclose(p.grad.get(), g * (1.0 / (want + 1e-6)), rtol=1e-5, atol=1e-8)


def test_reference_attention_under_bfloat16_on_the_gpu(monkeypatch):
    # with TINYLLM_FUSED=0 attention takes the reference path, whose batched
    # bfloat16 products go through kernels.gemm: close to float32
    rng = np.random.default_rng(9)
    q, k, v = rand(rng, 2, 4, 32, 16), rand(rng, 2, 2, 32, 16), rand(rng, 2, 2, 32, 16)
    want = ops.scaled_dot_product_attention(*[Tensor(a) for a in (q, k, v)]).numpy()
    monkeypatch.setenv("TINYLLM_FUSED", "0")
    ts = [Tensor(a, device="cuda", requires_grad=True) for a in (q, k, v)]
    with amp.autocast("bfloat16"):
        y = ops.scaled_dot_product_attention(*ts)
        y.backward(y.xp.ones(y.shape, np.float32))
    assert np.abs(y.numpy() - want).max() < 3e-2
    assert all(t.grad.dtype == np.float32 for t in ts)
    with amp.autocast("bfloat16"):
        z = ops.scaled_dot_product_attention(*ts, dropout_p=0.2)
        z.backward(z.xp.ones(z.shape, np.float32))
    assert np.isfinite(z.numpy()).all()


def attention_float64(q, k, v, g, causal, scale, drop=None):
    """Attention and its gradients in float64 NumPy, written out from the math (no autograd):
    y = P v, P = softmax(q k^T scale + mask); dv = P^T g, dS = P (g v^T - rowsum(g y)),
    dq = dS k scale, dk = dS^T q scale, with the G query heads of a kv head summed.
    With dropout, drop = keep / (1 - p) of shape (B, Hq, T, S): y = (P drop) v,
    dv = (P drop)^T g, dS = P (g v^T drop - rowsum(g y))."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kx, vx = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    s = q @ kx.swapaxes(-1, -2) * scale
    if causal:
        s = np.where(np.arange(S)[None, :] <= np.arange(T)[:, None] + S - T, s, -np.inf)
    m = s.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(s - m).sum(-1))
    p = np.exp(s - lse[..., None])
    pd = p if drop is None else p * drop
    y = pd @ vx
    dp = g @ vx.swapaxes(-1, -2)
    ds = p * ((dp if drop is None else dp * drop) - (g * y).sum(-1, keepdims=True))
    dq = ds @ kx * scale
    dk = (ds.swapaxes(-1, -2) @ q * scale).reshape(B, Hkv, G, S, D).sum(2)
    dv = (pd.swapaxes(-1, -2) @ g).reshape(B, Hkv, G, S, D).sum(2)
    return y, lse.reshape(B * Hq, T), dq, dk, dv


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("D", [16, 32, 64])
@pytest.mark.parametrize("heads,T,S,causal", [
    ((2, 2), 7, 7, True), ((4, 2), 64, 64, True), ((3, 1), 130, 130, True), ((2, 2), 100, 100, False),
    ((4, 4), 3, 70, True), ((2, 1), 65, 200, True),
])
def test_flash_attention_against_float64(dtype, D, heads, T, S, causal):
    # the tensor-core kernels on bfloat16/float16 operands against the float64 math on the same
    # rounded operands: what is left is the rounding of P and dS to the operand dtype
    cp = backend.cupy_module()
    low = backend.bfloat16() if dtype == "bfloat16" else np.dtype(np.float16)
    rng = np.random.default_rng(T * S + D)
    Hq, Hkv = heads
    B = 2
    q, k, v, g = (rng.standard_normal(s).astype(np.float32).astype(low)
                  for s in ((B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D), (B, Hq, T, D)))
    scale = 1 / np.sqrt(D)
    assert kernels.flash_supported(cp.asarray(q), cp.asarray(k))
    want = attention_float64(*(a.astype(np.float64) for a in (q, k, v, g)), causal, scale)
    y, lse = kernels.flash_attention_forward(cp.asarray(q), cp.asarray(k), cp.asarray(v), causal, scale)
    grads = kernels.flash_attention_backward(cp.asarray(q), cp.asarray(k), cp.asarray(v), y, lse,
                                             cp.asarray(g.astype(np.float32)), causal, scale)
    tol = 2e-2 if dtype == "bfloat16" else 3e-3
    for name, got, w in zip(("y", "lse", "dq", "dk", "dv"), (y, lse) + tuple(grads), want):
        got = cp.asnumpy(got)
        assert got.shape == w.shape and got.dtype == np.float32, name
        err = np.abs(got - w).max() / np.abs(w).max()
        assert err < tol, f"{name}: relative error {err:.3g}"


def test_flash_attention_is_what_bfloat16_training_uses(monkeypatch):
    # under bfloat16 autocast with head size 64, ops' attention runs the tensor-core kernels
    # (forward and backward) and agrees with the float32 reference on the CPU
    calls = []
    for name in ("flash_attention_forward", "flash_attention_backward"):
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    rng = np.random.default_rng(5)
    q, k, v = rand(rng, 1, 2, 80, 64), rand(rng, 1, 2, 80, 64), rand(rng, 1, 2, 80, 64)
    want = ops.scaled_dot_product_attention(*[Tensor(a) for a in (q, k, v)]).numpy()
    ts = [Tensor(a, device="cuda", requires_grad=True) for a in (q, k, v)]
    with amp.autocast("bfloat16"):
        y = ops.scaled_dot_product_attention(*ts)
        y.backward(y.xp.ones(y.shape, np.float32))
    assert calls == ["flash_attention_forward", "flash_attention_backward"]
    assert np.abs(y.numpy() - want).max() < 2e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("heads,T,S,causal", [((2, 2), 100, 100, True), ((4, 2), 64, 64, False),
                                              ((2, 1), 33, 90, True)])
def test_fused_attention_dropout_against_float64(dtype, heads, T, S, causal):
    # dropout inside the fused kernels (float32: the blockwise path; bfloat16: the tensor-core
    # kernels) against the float64 math with the mask of attention_dropout_keep, the NumPy
    # definition of the kernels' hash
    cp = backend.cupy_module()
    low = np.dtype(np.float32) if dtype == "float32" else backend.bfloat16()
    rng = np.random.default_rng(T + S)
    Hq, Hkv = heads
    B, D, p, seed = 2, 32, 0.2, 12345
    q, k, v, g = (rng.standard_normal(s).astype(np.float32).astype(low)
                  for s in ((B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D), (B, Hq, T, D)))
    keep = kernels.attention_dropout_keep(seed, B * Hq, T, S, p).reshape(B, Hq, T, S)
    assert abs(keep.mean() - (1 - p)) < 0.01
    want = attention_float64(*(a.astype(np.float64) for a in (q, k, v, g)), causal, 1 / np.sqrt(D),
                             drop=keep / (1 - p))
    args = (cp.asarray(q), cp.asarray(k), cp.asarray(v))
    y, lse = kernels.attention_forward(*args, causal, 1 / np.sqrt(D), p, seed)
    grads = kernels.attention_backward(*args, y, lse, cp.asarray(g.astype(np.float32)), causal,
                                       1 / np.sqrt(D), p, seed)
    tol = 1e-4 if dtype == "float32" else 2e-2
    for name, got, w in zip(("y", "lse", "dq", "dk", "dv"), (y, lse) + tuple(grads), want):
        err = np.abs(cp.asnumpy(got) - w).max() / np.abs(w).max()
        assert err < tol, f"{name}: relative error {err:.3g}"


def test_attention_dropout_on_the_gpu_follows_the_seed():
    # through ops: the same seed gives the same output, the next call a different mask;
    # gradients stay finite and float32
    rng = np.random.default_rng(3)
    q, k, v = rand(rng, 2, 2, 70, 32), rand(rng, 2, 2, 70, 32), rand(rng, 2, 2, 70, 32)
    ts = [Tensor(a, device="cuda", requires_grad=True) for a in (q, k, v)]
    outs = []
    for seed in (7, 7):
        autograd.manual_seed(seed)
        outs.append(ops.scaled_dot_product_attention(*ts, dropout_p=0.3).numpy())
    again = ops.scaled_dot_product_attention(*ts, dropout_p=0.3)
    again.backward(again.xp.ones(again.shape, np.float32))
    assert np.array_equal(outs[0], outs[1])
    assert not np.allclose(again.numpy(), outs[0])
    assert all(t.grad.dtype == np.float32 and bool(t.xp.isfinite(t.grad).all()) for t in ts)


def test_gpu_dropout_mask_is_the_hash_of_its_definition():
    # ops.dropout on the GPU: the mask is kernels.dropout_keep, element n kept as
    # attention_dropout_keep(seed, 1, 1, size, p)[0, 0, n]; the seed comes from the CPU generator
    cp = backend.cupy_module()
    got = cp.asnumpy(kernels.dropout_keep((3, 5, 7), 0.3, 2**40 + 3))
    want = kernels.attention_dropout_keep(2**40 + 3, 1, 1, 105, 0.3).reshape(3, 5, 7)
    assert np.array_equal(got, want)
    x = Tensor(np.ones((64, 64), np.float32), device="cuda")
    autograd.manual_seed(4)
    y = ops.dropout(x, 0.25).numpy()
    autograd.manual_seed(4)
    assert np.array_equal(ops.dropout(x, 0.25).numpy(), y)
    assert abs((y == 0).mean() - 0.25) < 0.03 and set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}


def test_gpu_dropout_applies_the_mask_of_dropout_keep_in_one_pass():
    # kernels.dropout_apply (DropoutCUDA's forward and backward) = x * keep * 1/(1-p), bit for bit,
    # with keep = kernels.dropout_keep of the same seed
    cp = backend.cupy_module()
    x = cp.asarray(np.random.default_rng(0).standard_normal((6, 5, 37)).astype(np.float32))
    for p in (0.1, 0.3):
        keep = kernels.dropout_keep(x.shape, p, 2**50 + 9)
        want = cp.asnumpy(x * (keep * np.float32(1 / (1 - p))))
        got = cp.asnumpy(kernels.dropout_apply(x, p, 2**50 + 9))
        assert np.array_equal(got, want)
        assert np.array_equal(cp.asnumpy(kernels.dropout_apply(x[:, :, ::2], p, 5)),
                              cp.asnumpy(kernels.dropout_apply(cp.ascontiguousarray(x[:, :, ::2]), p, 5)))


# ---- activations handed on in the low dtype (amp.activation_dtype) ------------------------------

def _bits(a):
    """The raw bits of a 16-bit CuPy array, as NumPy, in C order."""
    return backend.cupy_module().ascontiguousarray(a).view(np.uint16).get()


def _heads_view(cp, a):
    """a (B, H, T, D) as the model hands it: a transposed view of a (B, T, H*D) array."""
    B, H, T, D = a.shape
    return cp.ascontiguousarray(a.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("heads,T,causal,p", [((2, 2), 80, True, 0.0), ((4, 2), 64, True, 0.1),
                                              ((3, 3), 33, False, 0.0)])
def test_flash_reads_and_writes_the_heads_transposed(heads, T, causal, p):
    """q, k, v, dO read through the strides of (B, T, H, D)-ordered views, and y, dq, dk, dv
    written in bfloat16 in their inputs' memory order: bit for bit the contiguous float32
    results rounded (the same float32 accumulators, read from other addresses)."""
    cp = backend.cupy_module()
    low = backend.bfloat16()
    rng = np.random.default_rng(T)
    Hq, Hkv = heads
    B, D, scale = 2, 64, 0.125
    q, k, v = (cp.asarray(rand(rng, *s)).astype(low) for s in ((B, Hq, T, D), (B, Hkv, T, D), (B, Hkv, T, D)))
    qv, kv, vv = (_heads_view(cp, a) for a in (q, k, v))
    assert not qv.flags.c_contiguous and kernels._flash_operand(qv) is qv  # read in place
    y32, lse = kernels.flash_attention_forward(q, k, v, causal, scale, p, 5)
    y, lse2 = kernels.flash_attention_forward(qv, kv, vv, causal, scale, p, 5, low, qv.strides)
    assert y.dtype == low and y.transpose(0, 2, 1, 3).flags.c_contiguous  # (B, T, H, D) in memory
    assert np.array_equal(_bits(y), _bits(kernels.cast(y32, low)))
    assert np.array_equal(lse.get(), lse2.get())
    g = cp.asarray(rand(rng, B, Hq, T, D)).astype(low)
    want = kernels.flash_attention_backward(q, k, v, cp.ascontiguousarray(y), lse, g, causal, scale, p, 5)
    got = kernels.flash_attention_backward(qv, kv, vv, y, lse, _heads_view(cp, g), causal, scale, p, 5,
                                           low, (qv.strides, kv.strides, vv.strides))
    for name, w, gt, inp in zip(("dq", "dk", "dv"), want, got, (qv, kv, vv)):
        assert w.dtype == np.float32 and gt.dtype == low and gt.strides == inp.strides, name
        assert np.array_equal(_bits(gt), _bits(kernels.cast(w, low))), name


@pytest.mark.parametrize("low", ["bfloat16", "float16"])
def test_elementwise_kernels_in_the_low_dtype_are_the_float32_ones_rounded(low):
    """SwiGLU, GELU and RoPE on bfloat16/float16 arrays compute in float32 and round once: the
    float32 kernels on the same values, rounded by kernels.cast, to the last bit."""
    cp = backend.cupy_module()
    low = backend.bfloat16() if low == "bfloat16" else np.dtype(np.float16)
    rng = np.random.default_rng(3)
    a, b, g = (cp.asarray(rand(rng, 5, 3, 77, scale=2)).astype(low) for _ in range(3))
    f = [x.astype(np.float32) for x in (a, b, g)]

    def same(got, want):
        assert got.dtype == low
        assert np.array_equal(_bits(got), _bits(kernels.cast(want, low)))

    same(kernels.swiglu_forward(a, b), kernels.swiglu_forward(f[0], f[1]))
    for got, want in zip(kernels.swiglu_backward(g, a, b), kernels.swiglu_backward(f[2], f[0], f[1])):
        same(got, want)
    same(kernels.gelu_tanh_forward(a), kernels.gelu_tanh_forward(f[0]))
    same(kernels.gelu_tanh_backward(g, a), kernels.gelu_tanh_backward(f[2], a))
    x = _heads_view(cp, cp.asarray(rand(rng, 2, 3, 9, 16)).astype(low))
    ang = rng.uniform(-3, 3, (9, 8))
    cos, sin = cp.asarray(np.cos(ang), np.float32), cp.asarray(np.sin(ang), np.float32)
    for style in (False, True):
        got = kernels.rope_rotate(x, cos, sin, +1, style, out_layout=x.strides)
        assert got.strides == x.strides
        same(got, kernels.rope_rotate(x.astype(np.float32), cos, sin, +1, style))


@pytest.mark.parametrize("flavour,dropout", [("llama", 0.0), ("gpt2", 0.1)])
def test_low_precision_activations_train_like_float32_ones(monkeypatch, flavour, dropout):
    """A bfloat16 step of the model whose q, k, v and MLP activations travel in bfloat16
    (amp.activation_dtype) against the same step with them in float32: the same loss and
    gradients up to bfloat16 rounding; the activations really are bfloat16."""
    from tinyllm.config import FLAVOURS
    from tinyllm.model import GPT, ModelConfig

    cfg = ModelConfig(**FLAVOURS[flavour], vocab_size=97, context_length=64, n_layers=2, n_heads=4,
                      d_model=128, dropout=dropout, device="cuda")
    autograd.manual_seed(0)
    model = GPT(cfg)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 97, (3, 64))
    tgt = rng.integers(0, 97, (3, 64))

    def step():
        for p in model.parameters():
            p.grad = None
        autograd.manual_seed(1)
        with amp.autocast("bfloat16"):
            _, loss = model(idx, tgt, return_logits=False)
            loss.backward()
        return float(loss.numpy()), [p.grad.get() for p in model.parameters()]

    seen = []
    monkeypatch.setattr(ops, "gelu", lambda x, *a, f=ops.gelu, **k: seen.append(x.dtype) or f(x, *a, **k))
    monkeypatch.setattr(ops, "swiglu", lambda a, b, f=ops.swiglu: seen.append(a.dtype) or f(a, b))
    loss, grads = step()
    assert seen and all(d == backend.bfloat16() for d in seen)
    monkeypatch.setattr(amp, "activation_dtype", lambda x: None)
    loss32, grads32 = step()
    assert abs(loss - loss32) < 1e-2 * abs(loss32)
    for g, w in zip(grads, grads32):
        assert g.dtype == np.float32
        assert np.abs(g - w).max() <= 5e-2 * np.abs(w).max() + 1e-6


def test_add_kernel_is_cupy_add_bit_for_bit(monkeypatch):
    """kernels.add (8 elements a thread, then the tail) equals CuPy's a + b, for every tail
    length and for views that do not start on 16 bytes; fast.add routes only float32 arrays of
    one shape in C order to it."""
    cp = backend.cupy_module()
    rng = np.random.default_rng(4)
    for n in (1, 7, 8, 9, 1003, 4101):
        a, b = cp.asarray(rand(rng, n)), cp.asarray(rand(rng, n))
        assert np.array_equal(kernels.add(a, b).get(), (a + b).get()), n
    a, b = cp.asarray(rand(rng, 1001))[1:], cp.asarray(rand(rng, 1002))[2:]
    assert a.data.ptr % 16 and np.array_equal(kernels.add(a, b).get(), (a + b).get())
    calls = []
    real = kernels.add
    monkeypatch.setattr(kernels, "add", lambda a, b: calls.append(a.shape) or real(a, b))
    x = cp.asarray(rand(rng, 3, 5))
    fast.add(x, x)
    fast.add(x, x[:1])  # broadcast: CuPy's +
    fast.add(x.T, x.T)  # not C order: CuPy's +
    fast.add(x.astype(np.float64), x.astype(np.float64))
    assert calls == [(3, 5)]


def test_products_and_norms_sum_their_inputs_gradients_themselves(monkeypatch):
    """A pre-norm block (h = rms_norm(x); x + three products of h): the CUDA products and norm
    take the gradient their input already has into their own (Function.takes_addends; the
    products accumulate into the first one's new array), so the backward calls no separate
    sum, and every gradient equals the CPU's; a retained h gets its whole gradient."""
    rng = np.random.default_rng(22)
    x, w = rand(rng, 2, 9, 64), rand(rng, 64) + 1
    wq, wk, wv = (rand(rng, 64, 64, scale=0.1) for _ in range(3))

    def block(x0, w, wq, wk, wv):
        x = x0 * 1.0  # the residual stream: a non-leaf, as between two blocks
        h = ops.rms_norm(x, w)
        return x + ops.linear(h, wq) * ops.linear(h, wk) + ops.linear(h, wv)

    compare(block, [x, w, wq, wk, wv])
    sums = []
    real = fast.add
    monkeypatch.setattr(fast, "add", lambda a, b: sums.append(a.shape) or real(a, b))
    ts = [Tensor(a, requires_grad=True, device="cuda") for a in (x, w, wq, wk, wv)]
    y = block(*ts)
    sums.clear()
    y.backward(backend.to_device(rand(rng, *y.shape), "cuda"))
    assert sums == []  # without the addends: two sums for h, one for x
    xt = Tensor(x, requires_grad=True, device="cuda")
    h = ops.rms_norm(xt, Tensor(w, device="cuda"))
    h.retain_grad()
    wts = [Tensor(a, device="cuda") for a in (wq, wk, wv)]
    u = rand(rng, 2, 9, 64)
    (ops.linear(h, wts[0]) + ops.linear(h, wts[1]) + ops.linear(h, wts[2])).backward(backend.to_device(u, "cuda"))
    want = u @ (wq + wk + wv)
    assert np.abs(h.grad.get() - want).max() < 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rope_kernel_8_a_thread_against_float64(style, dtype):
    """Head size 64: the 16-byte kernel (rope_rotate8), reading the model's transposed heads
    in place and writing the gradient in their layout, against the rotation in float64."""
    from tinyllm.rope import rope_tables

    cp = backend.cupy_module()
    rng = np.random.default_rng(23)
    B, T, H, D = 2, 13, 3, 64
    cos, sin = (a.astype(np.float32) for a in rope_tables(T, D))
    low = np.float32 if dtype == "float32" else backend.bfloat16()
    x = cp.asarray(rand(rng, B, T, H, D)).astype(low).transpose(0, 2, 1, 3)
    xd = x.astype(np.float64).get()
    inter = style == "interleaved"
    if inter:
        a, b = xd[..., 0::2], xd[..., 1::2]
    else:
        a, b = xd[..., : D // 2], xd[..., D // 2:]
    for sign in (+1, -1):
        y = kernels.rope_rotate(x, cp.asarray(cos), cp.asarray(sin), sign, inter, out_layout=x.strides)
        assert y.dtype == low and y.strides == x.strides
        c, s = cos.astype(np.float64), sign * sin.astype(np.float64)
        ya, yb = a * c - b * s, b * c + a * s
        want = np.empty_like(xd)
        if inter:
            want[..., 0::2], want[..., 1::2] = ya, yb
        else:
            want[..., : D // 2], want[..., D // 2:] = ya, yb
        tol = 1e-6 if dtype == "float32" else 8e-3
        assert np.abs(y.astype(np.float64).get() - want).max() <= tol * np.abs(want).max()
    assert any(key[0] == "rope_rotate8" for key in kernels._cache)


def test_norm_backward_adds_the_addend():
    cp = backend.cupy_module()
    rng = np.random.default_rng(24)
    for d in (8, 768, 2500):  # the warp-per-row kernels, and the block-per-row ones
        x, g, r = (cp.asarray(rand(rng, 33, d)) for _ in range(3))
        w = cp.asarray(rand(rng, d))
        _, mean, rstd, _ = kernels.norm_forward(x, w, None, 1e-5, center=False)
        dx, dw, _ = kernels.norm_backward(g, x, w, mean, rstd, False, True, False)
        dx_r, dw_r, _ = kernels.norm_backward(g, x, w, mean, rstd, False, True, False, addend=r)
        assert np.abs((dx_r - dx - r).get()).max() < 1e-5 * float(cp.abs(dx + r).max()), d
        assert np.allclose(dw_r.get(), dw.get(), rtol=0, atol=1e-5 * float(cp.abs(dw).max()))  # atomics: any order


def test_lm_head_gradients_made_in_the_forward():
    """With a gradient to come and a mean or sum loss, LinearCrossEntropyCUDA makes the
    gradients in its forward: the logits' gradient from the loss kernel equals the separate
    backward kernel's bit for bit; the loss equals the one without gradients; a second backward
    (retain_graph) and another upstream gradient scale the same gradients."""
    cp = backend.cupy_module()
    rng = np.random.default_rng(25)
    z, w = cp.asarray(rand(rng, 9, 4000, scale=3)), cp.asarray(rand(rng, 9))
    t = cp.asarray(rng.integers(0, 4000, 9))
    loss, lse, dz = kernels.cross_entropy_forward(z, t, -1, w, backend.bfloat16())
    loss0, lse0 = kernels.cross_entropy_forward(z, t, -1)
    assert np.array_equal(loss.get(), loss0.get()) and np.array_equal(lse.get(), lse0.get())
    want = kernels.cross_entropy_backward(z, t, lse, w, out_dtype=backend.bfloat16())
    assert np.array_equal(dz.view(np.uint16).get(), want.view(np.uint16).get())
    x0, w0 = rand(rng, 300, 64), rand(rng, 4000, 64, scale=0.2)
    tt = cp.asarray(rng.integers(0, 4000, 300))
    xt, wt = Tensor(x0, requires_grad=True, device="cuda"), Tensor(w0, requires_grad=True, device="cuda")
    loss = ops.linear_cross_entropy(xt, wt, tt, chunk_rows=128)
    with autograd.no_grad():
        plain = ops.linear_cross_entropy(Tensor(x0, device="cuda"), Tensor(w0, device="cuda"), tt, chunk_rows=128)
    assert abs(loss.item() - plain.item()) <= 1e-6 * abs(plain.item())
    (loss * 1.0).backward(retain_graph=True)
    gx1, gw1 = xt.grad.get(), wt.grad.get()
    xt.zero_grad(), wt.zero_grad()
    (loss * 3.0).backward()
    assert np.allclose(xt.grad.get(), 3 * gx1, rtol=1e-6, atol=1e-9)
    assert np.allclose(wt.grad.get(), 3 * gw1, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_adamw_with_max_norm_is_clipping_then_the_step_bit_for_bit(max_norm):
    """A captured step clips inside AdamW's kernel (the gradient scaled as it is read, 4
    elements a thread): weights and moments equal those of clip_grad_norm_on_device then
    step(), bit for bit, with sizes that leave a tail and a gradient off 16 bytes (the
    one-at-a-time loop); the gradients themselves are left unclipped."""
    from autograd import optim
    from autograd.nn import Parameter

    cp = backend.cupy_module()
    shapes = [(7, 5), (5,), (301, 701)]
    init = [rand(np.random.default_rng(26), *s) for s in shapes]
    runs = []
    for fused in (False, True):
        ps = [Parameter(a, device="cuda") for a in init]
        opt = optim.AdamW(ps, lr=1e-2, weight_decay=0.1)
        rng = np.random.default_rng(27)
        for _ in range(3):
            for p, s in zip(ps, shapes):
                g = cp.asarray(rand(rng, int(np.prod(s)) + 1, scale=3))[1:]  # off 16 bytes
                p.grad = g.reshape(s) if s == (5,) else g.reshape(s).copy()
            norm_sq = optim.clip_grad_norm_on_device(ps, 0 if fused else max_norm)
            unclipped = [p.grad.copy() for p in ps]
            opt.step(norm_sq=norm_sq, max_norm=max_norm if fused else 0.0)
            if fused:
                assert all(np.array_equal(p.grad.get(), u.get()) for p, u in zip(ps, unclipped))
        runs.append([a.get() for p in ps for a in (p.data, *opt.state[id(p)].values())])
    for a, b in zip(*runs):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_a_norm_writes_the_low_precision_copy_its_products_read(norm):
    """Under bfloat16 on the GPU the norm's kernel also writes its output in bfloat16, bit for
    bit the cast of the float32 output, and the products after it read that copy; without a
    graph being recorded it writes none."""
    from autograd.ops.linalg import shared_low_copy

    rng = np.random.default_rng(28)
    x, w, b = rand(rng, 2, 5, 64), rand(rng, 64), rand(rng, 64)

    def apply(*ts):
        return ops.rms_norm(*ts[:2]) if norm == "rms" else ops.layer_norm(*ts)

    with amp.autocast("bfloat16"):
        h = apply(*[Tensor(a, requires_grad=True, device="cuda") for a in (x, w, b)])
        low = h._low_copy
        assert low.dtype == backend.bfloat16() and shared_low_copy(h) is low
        want = kernels.cast(h.data, backend.bfloat16())
        assert np.array_equal(low.view(np.uint16).get(), want.view(np.uint16).get())
        with autograd.no_grad():
            assert getattr(apply(*[Tensor(a, device="cuda") for a in (x, w, b)]), "_low_copy", None) is None
