"""CUDA kernels (CuPy) for the ops that move the most bytes, and the cuBLAS product binding.

The kernels' sources are the .cu files beside this module, compiled by CuPy (NVRTC) at first
use, once per dtype they are instantiated for; the functions here launch them. The Function
classes that call them, each a fast path of a reference op, are in paths.py.

- attention, bfloat16/float16 operands (head size 16-64): FlashAttention-2 on tensor cores
  (flash.cu), scores and probabilities only ever in registers; the backward recomputes them
  from q, k and the saved log-sum-exp.
- attention, other cases (float32/TF32, larger heads): a block of queries at a time, so the
  (T x T) probability matrix never exists whole (cuBLAS does the products, attention.cu each
  softmax step; the backward recomputes each block from the saved log-sum-exp).
  The causal upper triangle is skipped in both.
- cross-entropy (cross_entropy.cu): one read of the logits for the loss (an online max/sum
  per row), one read and one write for the gradient; the LM head's forward asks for both
  from one kernel.
- RMSNorm and LayerNorm (norm.cu): one kernel forward, one backward, a warp per row (weight
  gradients summed per block in shared memory, then added atomically); the backward can add
  the rest of x's gradient, the forward write a low-precision copy of y.
- SwiGLU, dropout, the float32 sum (elementwise.cu), GELU (gelu.cu), RoPE (rope.cu): one pass
  each; the elementwise ones 8 elements a thread, with 16-byte loads and stores.
- the casts of float32 activations and gradients to bfloat16/float16 (cast.cu): one pass,
  16-byte loads and stores, strided views made contiguous on the way.
- grad norm, clipping, AdamW (multi_tensor.cu): one launch over every parameter.
"""

import os
from pathlib import Path

import numpy as np

from autograd import amp, backend
from autograd.fast.cuda import cublaslt, graph

_cache = {}
_HERE = Path(__file__).parent


def _cp():
    return backend.cupy_module()


def _source(name):
    """The text of a .cu file beside this module, after prelude.cu."""
    return (_HERE / "prelude.cu").read_text() + (_HERE / name).read_text()


_CTYPE = {"float32": "float", "bfloat16": "__nv_bfloat16", "float16": "__half"}


def _ctype(dtype):
    name = np.dtype(dtype).name
    if name not in _CTYPE:
        raise TypeError(f"fused kernels support float32, bfloat16 and float16, not {name}")
    return _CTYPE[name]


def _kernel(name, file, **types):
    """Kernel `name` of `file`, compiled (with OUT_T/IN_T/... replaced by C types, and
    placeholders given an int by that number) once per combination."""
    key = (name, tuple(sorted((k, v if isinstance(v, int) else np.dtype(v).name)
                              for k, v in types.items())))
    if key not in _cache:
        code = _source(file)
        for placeholder, value in types.items():
            code = code.replace(placeholder, str(value) if isinstance(value, int) else _ctype(value))
        _cache[key] = _cp().RawKernel(code, name, options=("-std=c++17",))
    return _cache[key]


# ---- batched matrix products through cuBLAS ----------------------------------------------------

_CUDA_DTYPE = {"float32": 0, "float16": 2, "bfloat16": 14}  # cudaDataType: CUDA_R_32F, _16F, _16BF
GEMM_DTYPES = frozenset(_CUDA_DTYPE)  # what gemm multiplies (float64 and integers: CuPy's matmul)
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32 = 68, 77  # cublasComputeType_t
_GEMM_DEFAULT = -1


def _as_rows(a):
    """A 3-D view whose rows are contiguous, and its (row stride, batch stride) in elements."""
    if a.ndim == 2:
        a = a[None]
    its = a.itemsize
    if a.strides[2] != its or (a.shape[1] > 1 and a.strides[1] < a.shape[2] * its) or a.strides[1] % its:
        a = _cp().ascontiguousarray(a)
    ld = a.strides[1] // its if a.shape[1] > 1 else a.shape[2]
    batch_stride = a.strides[0] // its if a.shape[0] > 1 else 0
    return a, ld, batch_stride


def gemm(a, b, trans_a=False, trans_b=False, out=None, out_dtype=np.float32, accumulate=False):
    """out[i] = op(a[i]) @ op(b[i]) (or += with accumulate) for batches of row-major matrices.

    a, b: 3-D (batch, rows, cols) or 2-D arrays of one dtype; a batch of 1 broadcasts. The
    result can be float32 whatever the inputs (bfloat16 products accumulate in float32), which
    cupy.matmul cannot do. Row-major C = A B is column-major C^T = B^T A^T, so cuBLAS gets
    the operands swapped. A single product goes through cuBLASLt (cublaslt.py), a batch (and
    a single one with TINYLLM_GEMM=ex, or one cuBLASLt has no algorithm for) through GemmEx.
    """
    cp = _cp()
    from cupy.cuda import cublas

    a, lda, sa = _as_rows(a)
    b, ldb, sb = _as_rows(b)
    if a.dtype != b.dtype:
        raise TypeError(f"gemm: operands of different dtypes {a.dtype} and {b.dtype}")
    m, k = (a.shape[2], a.shape[1]) if trans_a else (a.shape[1], a.shape[2])
    k2, n = (b.shape[2], b.shape[1]) if trans_b else (b.shape[1], b.shape[2])
    if k != k2:
        raise ValueError(f"gemm: inner dimensions {k} and {k2} differ")
    batch = max(a.shape[0], b.shape[0])
    if out is None:
        out = cp.empty((batch, m, n), dtype=out_dtype)
        accumulate = False
    o = out if out.ndim == 3 else out[None]
    if o.shape != (batch, m, n) or o.strides[2] != o.itemsize:
        raise ValueError(f"gemm: output of shape {out.shape} for a product of shape {(batch, m, n)}")
    ldc = o.strides[1] // o.itemsize if m > 1 else n
    sc = o.strides[0] // o.itemsize if batch > 1 else 0
    tf32 = a.dtype == np.float32 and amp.precision() == "tf32"
    alpha = np.array(1.0, np.float32)
    beta = np.array(1.0 if accumulate else 0.0, np.float32)
    compute = _COMPUTE_32F_FAST_TF32 if tf32 else _COMPUTE_32F
    plan = None
    if batch == 1 and cublaslt.available():
        # column-major C^T (n x m) = op(B)^T op(A)^T, as below
        plan = cublaslt.plan((int(trans_b), int(trans_a), n, m, k,
                              _CUDA_DTYPE[b.dtype.name], ldb, 0, _CUDA_DTYPE[a.dtype.name], lda, 0,
                              _CUDA_DTYPE[o.dtype.name], ldc, 0, 1, compute,
                              tuple(cublaslt.alignment(x.data.ptr) for x in (b, a, o))))
    if plan is not None:
        if not plan.tuned and cublaslt.tuning() and not graph.capturing():
            scratch = cp.empty_like(o) if accumulate else o
            plan.tune(b.data.ptr, a.data.ptr, scratch.data.ptr)
        plan.run(b.data.ptr, a.data.ptr, o.data.ptr, float(beta))
        return out
    handle = cp.cuda.device.get_cublas_handle()
    call = _captured_gemm if graph.capturing() else cublas.gemmStridedBatchedEx
    call(
        handle,
        cublas.CUBLAS_OP_T if trans_b else cublas.CUBLAS_OP_N,
        cublas.CUBLAS_OP_T if trans_a else cublas.CUBLAS_OP_N,
        n, m, k, alpha.ctypes.data,
        b.data.ptr, _CUDA_DTYPE[b.dtype.name], ldb, sb,
        a.data.ptr, _CUDA_DTYPE[a.dtype.name], lda, sa,
        beta.ctypes.data, o.data.ptr, _CUDA_DTYPE[o.dtype.name], ldc, sc,
        batch, compute, _GEMM_DEFAULT,
    )
    return out


_cublas_lib = None
_workspace = None  # cuBLAS's scratch memory for captured products: allocated once, never freed
_WORKSPACE_BYTES = 32 << 20  # what cuBLAS asks for on Hopper


def _captured_gemm(handle, *args):
    """cublasGemmStridedBatchedEx through ctypes, on the stream being captured: CuPy's own
    binding refuses every cuBLAS call while a stream is captured, though cuBLAS records its
    products in a graph like any kernel (the scalars are read from host memory at capture,
    and ours are fixed at 1 and 0 or 1). The products get a workspace of our own: the one
    cuBLAS keeps per stream is released when the handle moves to another stream, and a
    replayed product would then write into freed memory."""
    global _cublas_lib, _workspace
    import ctypes

    if _cublas_lib is None:  # the library CuPy loaded (its handle exists: it is in the process)
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libcublas.so" in line}
        if not paths:
            raise graph.CaptureError("cuBLAS: libcublas is not loaded in this process")
        lib = ctypes.CDLL(sorted(paths)[0])
        v, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        lib.cublasSetStream_v2.argtypes = [v, v]
        lib.cublasSetWorkspace_v2.argtypes = [v, v, ctypes.c_size_t]
        lib.cublasGemmStridedBatchedEx.argtypes = [v, i, i, i, i, i, v, v, i, i, ll, v, i, i, ll,
                                                   v, v, i, i, ll, i, i, i]
        _cublas_lib = lib
    if _workspace is None:  # a plain cudaMalloc, outside every pool (allowed while capturing)
        _workspace = _cp().cuda.runtime.malloc(_WORKSPACE_BYTES)
    status = _cublas_lib.cublasSetStream_v2(handle, _cp().cuda.get_current_stream().ptr)
    status = status or _cublas_lib.cublasSetWorkspace_v2(handle, _workspace, _WORKSPACE_BYTES)
    status = status or _cublas_lib.cublasGemmStridedBatchedEx(handle, *args)
    if status:
        raise graph.CaptureError(f"cuBLAS status {status} in a captured product")


# ---- attention ----------------------------------------------------------------------------------

def _grid2(rows, cols, threads=256):
    """A grid for row-wise elementwise kernels: columns along x, rows (grid-strided) along y."""
    return (int(min((cols + threads - 1) // threads, 64)), int(min(rows, 65535)))


def _attention_blocks(BH, T, S, causal):
    """Query blocks (q0, n, L): n queries from q0, seeing the first L keys."""
    # At most ~256 MB of float32 scores per block. Under causal masking each block computes
    # only the keys up to its last query, so the upper triangle is skipped block by block
    # (smaller blocks skip more of it but were slower overall: more, smaller products).
    n = max(16, min(T, (1 << 26) // max(1, BH * S)) // 16 * 16)
    off = S - T
    for q0 in range(0, T, n):
        m = min(n, T - q0)
        yield q0, m, (min(S, q0 + m + off) if causal else S)


def _expand_kv(k, G):
    """Grouped-query attention: repeat each kv head for the G query heads that share it."""
    return k if G == 1 else _cp().repeat(k, G, axis=1)


def _dropout_args(dropout_p, seed):
    """(seed, seed_ptr, thr, 1 / (1 - p)) for the kernels; thr = 0 turns dropout off. `seed`:
    a number, or a captured step's slot (graph.draw_seed)."""
    return (*graph.seed_args(seed), np.uint32(int(dropout_p * (1 << 24))),
            np.float32(1 / (1 - dropout_p)))


def attention_dropout_keep(seed, BH, T, S, dropout_p):
    """The fused kernels' attention dropout mask (BH, T, S) in NumPy: element (bh, i, j) is
    ops.dropout.hash_keep of its index (bh T + i) S + j, as the kernels compute it."""
    from autograd.ops.dropout import hash_keep

    return hash_keep(np.arange(BH * T * S, dtype=np.uint64), seed, dropout_p).reshape(BH, T, S)


def _launch_1d(kernel, n, *args):
    """A grid-stride launch over n elements."""
    kernel((int(min((n + 255) // 256, 65535 * 4)) or 1,), (256,), args)


def _launch_vec(kernel, n, *args):
    """A grid-stride launch over n elements, 8 a thread (elementwise.cu, gelu.cu): every array
    argument must be contiguous and 16-byte aligned (_aligned)."""
    kernel((int(min(((n + 7) // 8 + 255) // 256, 65535 * 4)) or 1,), (256,), args)


def add(a, b):
    """a + b for float32 arrays of one shape, in one vectorized pass (CuPy's add moves these
    arrays at about half the memory bandwidth)."""
    a, b = _aligned(a), _aligned(b)
    y = _cp().empty(a.shape, np.float32)
    _launch_vec(_kernel("add_f32", "elementwise.cu", EW_T=np.float32), a.size, a, b, y, np.int64(a.size))
    return y


def scale(a, s):
    """a * s in a new array, for a float32 array a and a one-element float32 GPU array s (an
    upstream gradient: no host read), in one vectorized pass."""
    cp = _cp()
    a = _aligned(a)
    s = cp.asarray(s, dtype=np.float32).reshape(1)
    y = cp.empty(a.shape, np.float32)
    _launch_vec(_kernel("scale_f32", "elementwise.cu", EW_T=np.float32), a.size, a, s, y, np.int64(a.size))
    return y


def dropout_keep(shape, dropout_p, seed):
    """A dropout keep mask on the GPU in one pass: ops.dropout.hash_keep of each element's
    index (C order) and the seed."""
    keep = _cp().empty(shape, dtype=bool)
    _launch_1d(_kernel("dropout_keep_mask", "elementwise.cu", EW_T=np.float32), keep.size, keep, np.int64(keep.size),
               *_dropout_args(dropout_p, seed)[:3])  # no scale: the mask alone
    return keep


def dropout_apply(x, dropout_p, seed):
    """x * keep / (1 - p) in one pass, keep = dropout_keep(x.shape, dropout_p, seed) hashed on
    the fly (so the backward, the same call on the upstream gradient, needs only the seed)."""
    x = _aligned(x)
    y = _cp().empty_like(x)
    _launch_vec(_kernel("dropout_apply", "elementwise.cu", EW_T=np.float32), x.size, x, y, np.int64(x.size),
               *_dropout_args(dropout_p, seed))
    return y


def attention_forward(q, k, v, causal, scale, dropout_p=0.0, seed=0, out_dtype=np.float32,
                      out_layout=None):
    """y (B, Hq, T, D) and lse (B*Hq, T) for q (B, Hq, T, D), k, v (B, Hkv, S, D).
    With dropout_p > 0 the probabilities are dropped by attention_dropout_keep(seed, ...).
    The flash kernels write y in out_dtype, its axes in memory in the order of the strides
    out_layout (see flash_attention_forward); the blockwise path writes float32, C order."""
    if flash_supported(q, k):
        return flash_attention_forward(q, k, v, causal, scale, dropout_p, seed, out_dtype, out_layout)
    cp = _cp()
    B, Hq, T, D = q.shape
    S, G = k.shape[2], Hq // k.shape[1]
    BH = B * Hq
    qf = cp.ascontiguousarray(q).reshape(BH, T, D)
    kf = cp.ascontiguousarray(_expand_kv(k, G)).reshape(BH, S, D)
    vf = cp.ascontiguousarray(_expand_kv(v, G)).reshape(BH, S, D)
    y = cp.empty((BH, T, D), np.float32)
    lse = cp.empty((BH, T), np.float32)
    fwd = _kernel("attn_softmax_fwd", "attention.cu", OUT_T=q.dtype, IN_T=np.float32, Y_T=np.float32)
    for q0, n, L in _attention_blocks(BH, T, S, causal):
        s = gemm(qf[:, q0:q0 + n], kf[:, :L], trans_b=True)
        p = cp.empty((BH, n, L), q.dtype)
        fwd((BH * n,), (256,), (s, p, lse, np.int32(n), np.int32(L), np.int32(T), np.int32(q0),
                                np.int32(S - T), np.int32(causal), np.float32(scale),
                                *_dropout_args(dropout_p, seed)))
        gemm(p, vf[:, :L], out=y[:, q0:q0 + n])
    return y.reshape(B, Hq, T, D), lse


def attention_backward(q, k, v, y, lse, g, causal, scale, dropout_p=0.0, seed=0,
                       out_dtype=np.float32, layouts=None):
    """dq, dk, dv from the saved q, k, v (any of the three dtypes), y, lse; the same dropout_p
    and seed as the forward. The flash kernels write them in out_dtype, in the memory orders of
    the strides `layouts` (see flash_attention_backward); the blockwise path in float32."""
    if flash_supported(q, k):
        return flash_attention_backward(q, k, v, y, lse, g, causal, scale, dropout_p, seed,
                                        out_dtype, layouts)
    cp = _cp()
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    BH = B * Hq
    qf = cp.ascontiguousarray(q).reshape(BH, T, D)
    kf = cp.ascontiguousarray(_expand_kv(k, G)).reshape(BH, S, D)
    vf = cp.ascontiguousarray(_expand_kv(v, G)).reshape(BH, S, D)
    g32 = g.reshape(BH, T, D).astype(np.float32, copy=False)
    drow = (g32 * y.reshape(BH, T, D)).sum(axis=-1)
    gl = cp.ascontiguousarray(g32.astype(q.dtype, copy=False))
    dq = cp.empty((BH, T, D), np.float32)
    dk = cp.zeros((BH, S, D), np.float32)
    dv = cp.zeros((BH, S, D), np.float32)
    bwd = _kernel("attn_softmax_bwd", "attention.cu", OUT_T=q.dtype, IN_T=np.float32, Y_T=np.float32)
    for q0, n, L in _attention_blocks(BH, T, S, causal):
        qb, gb = qf[:, q0:q0 + n], gl[:, q0:q0 + n]
        s = gemm(qb, kf[:, :L], trans_b=True)
        dp = gemm(gb, vf[:, :L], trans_b=True)
        p = cp.empty((BH, n, L), q.dtype)
        ds = cp.empty((BH, n, L), q.dtype)
        bwd(_grid2(BH * n, L), (256,), (s, dp, lse, drow, p, ds, np.int64(BH * n), np.int32(n),
                                   np.int32(L), np.int32(T), np.int32(q0), np.int32(S - T),
                                   np.int32(causal), np.float32(scale), *_dropout_args(dropout_p, seed)))
        del s, dp
        gemm(p, gb, trans_a=True, out=dv[:, :L], accumulate=True)   # dV += P^T dO
        gemm(ds, qb, trans_a=True, out=dk[:, :L], accumulate=True)  # dK += dS^T Q
        gemm(ds, kf[:, :L], out=dq[:, q0:q0 + n])                   # dQ  = dS K
    dq = dq.reshape(B, Hq, T, D)
    dk = dk.reshape(B, Hkv, G, S, D).sum(axis=2) if G > 1 else dk.reshape(B, Hkv, S, D)
    dv = dv.reshape(B, Hkv, G, S, D).sum(axis=2) if G > 1 else dv.reshape(B, Hkv, S, D)
    return dq, dk, dv


# ---- flash attention on tensor cores (bfloat16 / float16 operands) -----------------------------
#
# FlashAttention-2's loops with the warp-level tensor-core instruction mma.sync.m16n8k16
# (inline PTX: NVRTC compiles it without the CUDA toolkit's mma.h). A block of 4 warps takes 64
# queries (forward, dQ) or 64 keys (dK, dV); each warp owns 16 of them and keeps their operand
# fragments and accumulators in registers, while the other side streams through shared memory
# in tiles of 64 rows (cp.async, two buffers: the next tile loads while this one computes).
# Scores, probabilities and their gradients live in registers only: nothing of size T x S
# touches global memory.
#
# Fragment layouts of m16n8k16 (lane = 4 g + t): A (16 x 16, row-major) a0 = A[g][2t, 2t+1],
# a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]; B (16 x 8) b0 = B[2t, 2t+1][g],
# b1 = B[2t+8, 2t+9][g]; C (16 x 8, float) c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1].
# A C fragment of scores, rounded to pairs, is the A fragment of the next product (P V).
# B fragments come from row-major tiles through ldmatrix: as stored for X Y^T (Y's tile is
# [n][k]), transposed on load (.trans) for X Y (Y's tile is [k][n]).
# The backward is two kernels (dK dV over query tiles, dQ over key tiles), each recomputing P:
# more FLOPs than one kernel with atomic dQ, but deterministic and without atomics.

_FLASH_TYPES = {
    "bfloat16": ("__nv_bfloat16", "bf16",
                 "__nv_bfloat162 v = __floats2bfloat162_rn(lo, hi); return *reinterpret_cast<u32*>(&v);"),
    "float16": ("__half", "f16",
                "__half2 v = __floats2half2_rn(lo, hi); return *reinterpret_cast<u32*>(&v);"),
}


def flash_supported(q, k):
    """The tensor-core kernels take bfloat16/float16 q, k, v with a head size of 16, 32, 48 or 64
    (their tiles fit the 48 KB of static shared memory); other cases use the cuBLAS path.
    TINYLLM_FLASH=0 sends every case to the cuBLAS path (to compare the two)."""
    return (os.environ.get("TINYLLM_FLASH", "1") != "0" and q.dtype == k.dtype
            and q.dtype.name in _FLASH_TYPES and q.shape[-1] % 16 == 0 and q.shape[-1] <= 64)


def _flash(name, dtype, D, out_dtype):
    key = ("flash", name, dtype.name, D, np.dtype(out_dtype).name)
    if key not in _cache:
        ctype, mma_t, pack = _FLASH_TYPES[dtype.name]
        code = (_source("flash.cu").replace("ELEM", ctype).replace("HEAD_DIM", str(D))
                .replace("MMA_T", mma_t).replace("PACK2_BODY", pack)
                .replace("OUT_T", _ctype(out_dtype)))
        _cache[key] = _cp().RawKernel(code, name, options=("-std=c++17",))
    return _cache[key]


def _aligned(a):
    """A C-contiguous array whose data starts on 16 bytes (cp.async copies 16 bytes at a time)."""
    a = _cp().ascontiguousarray(a)
    return a if a.data.ptr % 16 == 0 else a.copy()


def _flash_operand(a):
    """a (B, H, T, D) as the flash kernels read it: through its strides when its last axis is
    contiguous and its rows start on 16 bytes (cp.async copies 16 bytes at a time), as the
    model's q, k, v views of (B, T, H*D) products do; else a contiguous, aligned copy."""
    its = a.itemsize
    if a.strides[3] == its and all(st % 16 == 0 for st in a.strides[:3]) and a.data.ptr % 16 == 0:
        return a
    return _aligned(a)


def _strides(a):
    """The batch, head and row strides of a (B, H, T, D) array, in elements."""
    return tuple(np.int64(st // a.itemsize) for st in a.strides[:3])


def _flash_args(q, k):
    B, Hq, T, D = q.shape
    return (np.int32(Hq), np.int32(Hq // k.shape[1]), np.int32(T), np.int32(k.shape[2]))


def _empty(shape, dtype, layout):
    return _cp().empty(shape, dtype) if layout is None else empty_in_layout(shape, layout, dtype)


def flash_attention_forward(q, k, v, causal, scale, dropout_p=0.0, seed=0, out_dtype=np.float32,
                            out_layout=None):
    """y (B, Hq, T, D) in out_dtype and lse (B*Hq, T) on tensor cores; q, k, v bfloat16 or
    float16, read through their strides. y's axes lie in memory in the order of the strides
    out_layout (C order when None): given q's, y of the model's (B, T, H, D)-ordered q is in
    that order too, and the transpose and reshape after attention are views."""
    cp = _cp()
    q, k, v = (_flash_operand(a) for a in (q, k, v))
    B, Hq, T, D = q.shape
    y = _empty(q.shape, out_dtype, out_layout)
    lse = cp.empty((B * Hq, T), np.float32)
    _flash("flash_fwd", q.dtype, D, y.dtype)(
        ((T + 63) // 64, B * Hq), (128,),
        (q, k, v, y, lse, *_flash_args(q, k), np.int32(causal), np.float32(scale),
         *_dropout_args(dropout_p, seed), *_strides(q), *_strides(k), *_strides(v), *_strides(y)))
    return y, lse


def _attention_bwd_prep(g, y, low):
    """drow = rowsum(g * y) (B, H, T) float32 for g and y (B, H, T, D), and g as the flash
    kernels read it in `low`: g itself when it already is in `low` and readable through its
    strides, else a contiguous copy. One kernel, reading g and y through their strides, when
    both have a contiguous last axis; else the same in CuPy's steps."""
    cp = _cp()
    B, H, T, D = g.shape
    if (g.strides[3] == g.itemsize and y.strides[3] == y.itemsize
            and all(st % g.itemsize == 0 for st in g.strides) and all(st % y.itemsize == 0 for st in y.strides)
            and g.dtype.name in _CTYPE and y.dtype.name in _CTYPE):
        keep = g.dtype == low and _flash_operand(g) is g
        gl = g if keep else cp.empty(g.shape, low)
        drow = cp.empty((B, H, T), np.float32)
        rows = B * H * T
        args = (g, y, np.uint64(0) if keep else gl, drow, np.int64(rows), np.int32(H), np.int32(T),
                np.int32(D), *_strides(g), *_strides(y))
        if D in (8, 16, 32, 64, 128, 256) and all(  # 16-byte loads (and stores of gl)
                a.data.ptr % 16 == 0 and all(st % 16 == 0 for st in a.strides[:3]) for a in (g, y, gl)):
            warps = (rows * D // 256 + 7) // 8  # 8 warps a block, 256 / D rows a warp
            _kernel("attn_bwd_prep8", "attention.cu", IN_T=g.dtype, Y_T=y.dtype, OUT_T=low)(
                (int(min(max(warps, 1), 65535 * 8)),), (256,), args)
        else:
            _kernel("attn_bwd_prep", "attention.cu", IN_T=g.dtype, Y_T=y.dtype, OUT_T=low)(
                (int(min((rows + 7) // 8, 65535 * 8)),), (256,), args)
        return drow, gl
    drow = (g.astype(np.float32) * y.astype(np.float32)).sum(axis=-1)
    return drow, _aligned(g.astype(low))


def flash_attention_backward(q, k, v, y, lse, g, causal, scale, dropout_p=0.0, seed=0,
                             out_dtype=np.float32, layouts=None):
    """dq, dk, dv in out_dtype for the saved q, k, v (bfloat16 or float16), y and lse, each in
    the memory order of the strides in `layouts` (q's, k's, v's as the forward got them: the
    transposes and reshapes before attention then pass the gradients on as views)."""
    q, k, v = (_flash_operand(a) for a in (q, k, v))
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    drow, gl = _attention_bwd_prep(g.reshape(B, Hq, T, D), y, q.dtype)
    lq, lk, lv = layouts or (None, None, None)
    dq, dk, dv = _empty(q.shape, out_dtype, lq), _empty(k.shape, out_dtype, lk), _empty(v.shape, out_dtype, lv)
    args = _flash_args(q, k) + (np.int32(causal), np.float32(scale)) + _dropout_args(dropout_p, seed)
    operands = _strides(q) + _strides(k) + _strides(v) + _strides(gl)
    _flash("flash_bwd_kv", q.dtype, D, out_dtype)(((S + 63) // 64, B * Hkv), (128,),
                                                   (q, k, v, gl, lse, drow, dk, dv, *args, *operands,
                                                    *_strides(dk), *_strides(dv)))
    _flash("flash_bwd_q", q.dtype, D, out_dtype)(((T + 63) // 64, B * Hq), (128,),
                                                  (q, k, v, gl, lse, drow, dq, *args, *operands,
                                                   *_strides(dq)))
    return dq, dk, dv


# ---- cross-entropy ------------------------------------------------------------------------------

def cross_entropy_forward(z, t, ignore_index, w=None, out_dtype=None):
    """Per-row losses (0 where ignored) and log-sum-exps for logits z (N, V), targets t (N,).

    With row weights w (N,), also the logits' gradient dz = (softmax(z) - onehot(t)) w (as
    cross_entropy_backward gives it, in out_dtype, default z's) from the same kernel, which
    reads each row a second time for it: (loss, lse, dz)."""
    cp = _cp()
    z = cp.ascontiguousarray(z)
    N, V = z.shape
    t = cp.ascontiguousarray(t.astype(np.int64, copy=False))
    lse = cp.empty(N, np.float32)
    loss = cp.empty(N, np.float32)
    dz = None if w is None else cp.empty(z.shape, out_dtype or z.dtype)
    vec = V % 8 == 0 and z.data.ptr % 16 == 0 and (dz is None or dz.data.ptr % 16 == 0)
    _kernel("ce_fwd", "cross_entropy.cu", IN_T=z.dtype, OUT_T=z.dtype if dz is None else dz.dtype)(
        (N,), (512,), (z, t, lse, loss, np.int32(V), np.int64(ignore_index),
                       _ptr(None if w is None else w.astype(np.float32, copy=False)),
                       np.uint64(0) if dz is None else dz, np.int32(vec)))
    return (loss, lse) if w is None else (loss, lse, dz)


def cross_entropy_backward(z, t, lse, w, out_dtype=None):
    """dz (N, V) in out_dtype (default z's): the LM head's gradient can be written straight in
    the product's low-precision dtype, with no float32 copy between."""
    cp = _cp()
    z = cp.ascontiguousarray(z)
    N, V = z.shape
    dz = cp.empty(z.shape, out_dtype or z.dtype)
    _kernel("ce_bwd", "cross_entropy.cu", IN_T=z.dtype, OUT_T=dz.dtype)(
        _grid2(N, V), (256,),
        (z, cp.ascontiguousarray(t.astype(np.int64, copy=False)), lse,
         cp.ascontiguousarray(w.astype(np.float32, copy=False)), dz, np.int64(N), np.int32(V)))
    return dz


# ---- RMSNorm and LayerNorm ----------------------------------------------------------------------

def _ptr(a):
    """An array argument, or a null pointer for an absent one."""
    return np.uint64(0) if a is None else _cp().ascontiguousarray(a)


def _rows(x):
    cp = _cp()
    x = cp.ascontiguousarray(x)
    return x.reshape(-1, x.shape[-1])


def _norm_vec(x2, *arrays):
    """NORM_VEC, the float4s a lane holds, for the warp-per-row kernels; 0 when they do not
    apply (d not a multiple of 4, over 1024, or an array not on 16 bytes)."""
    d = x2.shape[1]
    ok = d % 4 == 0 and d <= 1024 and all(a is None or a.data.ptr % 16 == 0 for a in (x2,) + arrays)
    return (d + 127) // 128 if ok else 0


def norm_forward(x, w, b, eps, center, low=None):
    """y, mean, rstd for LayerNorm (center=True) or RMSNorm over the last axis (float32), and
    y in the dtype `low` (bfloat16/float16) from the same kernel when asked and the warp-per-
    row kernel runs (else None)."""
    cp = _cp()
    x2 = _rows(x)
    N, d = x2.shape
    y = cp.empty_like(x2)
    mean = cp.empty(N, np.float32)
    rstd = cp.empty(N, np.float32)
    w, b = (None if a is None else cp.ascontiguousarray(a) for a in (w, b))
    nv = _norm_vec(x2, w, b)
    y_low = None
    if nv:  # a warp per row, 4 rows a block
        y_low = None if low is None else cp.empty(x.shape, low)
        _kernel("norm_fwd_warp", "norm.cu", NORM_VEC=nv, NORM_DB=1, LOW_T=low or np.float32)(
            ((N + 3) // 4,), (128,), (x2, _ptr(w), _ptr(b), y, mean, rstd, np.int64(N), np.int32(d),
                                      np.float32(eps), np.int32(center), _ptr(y_low)))
    else:
        threads = 128 if d <= 1024 else 256
        _kernel("norm_fwd", "norm.cu", NORM_VEC=1, NORM_DB=1, LOW_T=np.float32)(
            (N,), (threads,), (x2, _ptr(w), _ptr(b), y, mean, rstd, np.int32(d), np.float32(eps),
                               np.int32(center)))
    return y.reshape(x.shape), mean, rstd, y_low


def norm_backward(g, x, w, mean, rstd, center, want_w, want_b, addend=None):
    """dx, dw, db (None where not wanted); dx + addend (x's shape) when an addend is given."""
    cp = _cp()
    g2, x2 = _rows(g), _rows(x)
    N, d = x2.shape
    dx = cp.empty_like(x2)
    dw = cp.zeros(d, np.float32) if want_w else None
    db = cp.zeros(d, np.float32) if want_b else None
    w = None if w is None else cp.ascontiguousarray(w)
    r = None if addend is None else _rows(addend)
    nv = _norm_vec(x2, g2, w, r)
    args = (g2, x2, _ptr(w), mean, rstd, _ptr(r), dx, _ptr(dw), _ptr(db), np.int64(N), np.int32(d),
            np.int32(center))
    if nv:  # a warp per row, 4 warps a block, at most 1024 blocks (each sums its rows' dw, db)
        _kernel("norm_bwd_warp", "norm.cu", NORM_VEC=nv, NORM_DB=int(want_b), LOW_T=np.float32)(
            (int(min((N + 3) // 4, 1024)) or 1,), (128,), args, shared_mem=2 * d * 4)
    else:
        _kernel("norm_bwd", "norm.cu", NORM_VEC=1, NORM_DB=1, LOW_T=np.float32)((int(min(N, 1024)) or 1,), (128,), args,
                                                            shared_mem=2 * d * 4)
    return dx.reshape(x.shape), dw, db


# ---- elementwise: SwiGLU --------------------------------------------------------------------

def swiglu_forward(a, b):
    """silu(a) b for a, b of one shape and dtype (float32, bfloat16 or float16), in that dtype."""
    a, b = _aligned(a), _aligned(b)
    y = _cp().empty_like(a)
    _launch_vec(_kernel("swiglu_fwd", "elementwise.cu", EW_T=a.dtype), a.size, a, b, y, np.int64(a.size))
    return y


def swiglu_backward(g, a, b):
    """da, db in a's dtype; g, a, b of one shape and dtype."""
    cp = _cp()
    g, a, b = (_aligned(x) for x in (g, a, b))
    ga, gb = cp.empty_like(a), cp.empty_like(b)
    _launch_vec(_kernel("swiglu_bwd", "elementwise.cu", EW_T=a.dtype), a.size, g, a, b, ga, gb,
               np.int64(a.size))
    return ga, gb


# ---- elementwise: GELU (tanh form) ------------------------------------------------------------

def gelu_tanh_forward(x):
    """GELU (tanh form) of x in x's dtype (float32, bfloat16 or float16)."""
    x = _aligned(x)
    y = _cp().empty_like(x)
    _launch_vec(_kernel("gelu_tanh_fwd", "gelu.cu", GELU_T=x.dtype, GRAD_T=x.dtype, GELU_X_T=x.dtype),
               x.size, x, y, np.int64(x.size))
    return y


def gelu_tanh_backward(g, x):
    """The gradient in g's dtype; x in g's dtype, or the bfloat16/float16 copy a low-precision
    mode kept of a float32 input."""
    g, x = _aligned(g), _aligned(x)
    gx = _cp().empty(x.shape, g.dtype)
    _launch_vec(_kernel("gelu_tanh_bwd", "gelu.cu", GELU_T=g.dtype, GRAD_T=g.dtype, GELU_X_T=x.dtype),
               x.size, g, x, gx, np.int64(x.size))
    return gx


# ---- casts to the low-precision dtype -----------------------------------------------------------

def cast(x, dtype):
    """x (float32) as a C-contiguous array of `dtype` (bfloat16 or float16) in one pass:
    x.astype(dtype) for contiguous x, ascontiguousarray(x.astype(dtype)) for a strided view of
    up to 4 axes (more axes: CuPy's own two passes)."""
    cp = _cp()
    y = cp.empty(x.shape, dtype)
    if x.size == 0:
        return y
    if x.flags.c_contiguous and x.data.ptr % 16 == 0:
        n = x.size
        blocks = int(min(((n + 7) // 8 + 255) // 256, 65535 * 4)) or 1
        _kernel("cast_contiguous", "cast.cu", OUT_T=dtype)((blocks,), (256,), (x, y, np.int64(n)))
    elif x.ndim <= 4 and all(s % 4 == 0 for s in x.strides):
        shape = (1,) * (4 - x.ndim) + x.shape
        strides = (0,) * (4 - x.ndim) + tuple(s // 4 for s in x.strides)
        _launch_1d(_kernel("cast_strided", "cast.cu", OUT_T=dtype), x.size, x, y, np.int64(x.size),
                   *(np.int64(d) for d in shape[1:]), *(np.int64(s) for s in strides))
    else:
        y[...] = x.astype(dtype)
    return y


# ---- multi-tensor kernels: one launch over every parameter --------------------------------------

_CHUNK = 1 << 16  # elements per thread block

def _multi(name, operands):
    """Launch multi-tensor kernel `name` over lists of equally shaped float32 arrays.

    Returns a function taking the kernel's scalar arguments. The address table is built on
    the host and copied once per call (the arrays' addresses change between steps); while a
    step is captured the copy is part of the graph (graph.StepGraph.upload).
    """
    cp = _cp()
    n = len(operands[0])
    sizes = np.array([a.size for a in operands[0]], np.int64)
    counts = (sizes + _CHUNK - 1) // _CHUNK
    arr = np.repeat(np.arange(n, dtype=np.int32), counts)
    start = np.concatenate([np.arange(c, dtype=np.int64) * _CHUNK for c in counts])
    ptrs = np.array([a.data.ptr for arrays in operands for a in arrays], np.uint64)
    host = np.concatenate([ptrs.view(np.int64), sizes, start, arr.astype(np.int64)])
    dev = graph.active().upload(host) if graph.capturing() else cp.asarray(host)
    d_ptrs = dev[: ptrs.size]
    d_size = dev[ptrs.size: ptrs.size + n]
    d_start = dev[ptrs.size + n: ptrs.size + n + start.size]
    d_arr = dev[ptrs.size + n + start.size:].astype(np.int32)
    kernel = _kernel(name, "multi_tensor.cu")

    def launch(*scalars):
        kernel((int(arr.size),), (512,), (d_ptrs, d_size, d_arr, d_start) + scalars)

    return launch


def sum_of_squares(arrays):
    """sum over the float32 arrays of sum(a * a), as a 1-element float32 GPU array."""
    out = _cp().zeros(1, np.float32)
    _multi("multi_sumsq", [[_cp().ascontiguousarray(a) for a in arrays]])(out)
    return out


def scale_(arrays, scale):
    """Multiply every (contiguous float32) array by `scale` in place, in one launch."""
    _multi("multi_scale", [arrays])(np.float32(scale))


def clip_(arrays, sumsq, max_norm):
    """optim.clip_grad_norm with the squared norm `sumsq` (sum_of_squares) on the device:
    the kernel decides whether to scale, so no host reads the norm (a captured step)."""
    _multi("multi_clip", [arrays])(sumsq, np.float32(max_norm))


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay,
               bias_c1, bias_c2, hp=None, sumsq=None, max_norm=0.0):
    """One AdamW update of every parameter (in place), in one launch; float32, contiguous.
    A captured step passes `hp`, the address of (lr, bias_c1, bias_c2) in its slots, and
    `sumsq`, the squared gradient norm on the device (a non-finite one skips the update).
    With sumsq and max_norm > 0 the update uses the gradients clipped to that global norm
    (as clip_ scales them), the gradients themselves left as they are."""
    _multi("multi_adamw", [params, grads, exp_avgs, exp_avg_sqs])(
        np.int32(len(params)), np.float32(lr), np.float32(weight_decay), np.float32(beta1),
        np.float32(beta2), np.float32(eps), np.float32(bias_c1), np.float32(bias_c2),
        np.uint64(hp or 0), _ptr(sumsq), np.float32(max_norm))


def rope_rotate(x, cos, sin, sign, interleaved, out_layout=None):
    """Rotate the pairs of the last axis of x (..., T, D) by sign * angle, in one pass.

    cos, sin: (T, D/2) tables. The pair of element j is (j, j + D/2) in the rotate-half
    convention, (2i, 2i + 1) interleaved. A 4-D x is read through its strides (a transposed
    view needs no copy first); the result is C-contiguous, or has its axes in memory in the
    order of the strides `out_layout` (the backward writes the gradient in its input's
    layout, so the transpose and reshape before RoPE pass it on as views).
    """
    cp = _cp()
    its, shape = x.itemsize, x.shape
    if x.ndim != 4 or x.strides[3] != its or any(st % its for st in x.strides):
        x = cp.ascontiguousarray(x)
    if x.ndim != 4:
        x, out_layout = x.reshape(-1, 1, *x.shape[-2:]), None  # (rows of T positions, 1, T, D)
    A, H, T, D = x.shape
    y = cp.empty(x.shape, x.dtype) if out_layout is None else empty_in_layout(x.shape, out_layout, x.dtype)
    cos = cp.ascontiguousarray(cos, dtype=np.float32)
    sin = cp.ascontiguousarray(sin, dtype=np.float32)
    rows = x.size // D
    args = (x, cos, sin, y, np.int64(rows), np.int32(H), np.int32(T), np.int32(D),
            *(np.int64(st // its) for st in x.strides[:3]), *(np.int64(st // its) for st in y.strides[:3]),
            np.int32(bool(interleaved)), np.float32(sign))
    if D % 16 == 0 and all(a.data.ptr % 16 == 0 for a in (x, y, cos, sin)) and all(
            st % (8 * its) == 0 for st in x.strides[:3] + y.strides[:3]):
        threads = rows * D // 8 // (1 if interleaved else 2)
        _kernel("rope_rotate8", "rope.cu", IN_T=x.dtype)(
            (int(min((threads + 255) // 256, 65535 * 4)) or 1,), (256,), args)
    else:
        per_block = max(1, 256 // (D // 2))
        grid = (int(min((rows + per_block - 1) // per_block, 65535 * 4)),)
        _kernel("rope_rotate", "rope.cu", IN_T=x.dtype)(grid, (D // 2, per_block), args)
    return y.reshape(shape) if len(shape) != 4 else y


def empty_in_layout(shape, strides, dtype):
    """An empty dense array of `shape` whose axes lie in memory in the order of `strides`
    (largest first): C-contiguous for a C-contiguous array's strides, transposed for a
    transposed view's."""
    order = sorted(range(len(shape)), key=lambda a: -strides[a])
    y = _cp().empty(tuple(shape[a] for a in order), dtype)
    return y.transpose(tuple(int(a) for a in np.argsort(order)))
