"""Fused CUDA kernels (CuPy) for the ops that move the most bytes.

The NumPy code in ops.py is the definition of every op; the functions here compute the same
thing on CuPy arrays with fewer passes over memory, and tests/test_kernels.py checks each one
against that definition. Ops call them only for CuPy arrays and only while `enabled()`
(TINYLLM_FUSED=0 turns them off, e.g. to compare).

- attention: softmax(q k^T * scale + causal mask) v computed a block of queries at a time, so
  the (T x T) probability matrix never exists whole; the backward recomputes each block from
  q, k and the saved log-sum-exp (FlashAttention's recipe, with cuBLAS doing the products and
  one fused kernel doing each softmax step). The causal upper triangle is skipped.
- cross-entropy: one read of the logits for the loss (an online max/sum per row), one
  read and one write for the gradient.
- RMSNorm and LayerNorm: one kernel forward, one backward (weight gradients summed per block
  in shared memory, then added atomically).
- SwiGLU, AdamW: one elementwise kernel each.
"""

import os

import numpy as np

from autograd import amp, backend

_cache = {}


def enabled():
    return os.environ.get("TINYLLM_FUSED", "1") != "0"


def use(*arrays):
    """True when every array is a float32 CuPy array and the fused kernels are on."""
    return enabled() and all(backend.is_cupy_array(a) and a.dtype == np.float32 for a in arrays)


def _cp():
    return backend.cupy_module()


_CTYPE = {"float32": "float", "bfloat16": "__nv_bfloat16", "float16": "__half"}


def _ctype(dtype):
    name = np.dtype(dtype).name
    if name not in _CTYPE:
        raise TypeError(f"fused kernels support float32, bfloat16 and float16, not {name}")
    return _CTYPE[name]


_PRELUDE = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ void put(float* p, float x) { *p = x; }
__device__ __forceinline__ void put(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }
__device__ __forceinline__ void put(__half* p, float x) { *p = __float2half(x); }

// Reductions over one thread block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (threadIdx.x == 0) total = v;
    }
    __syncthreads();
    return total;
}
__device__ float block_max(float v) {
    __shared__ float part[32];
    __shared__ float total;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : -INFINITY;
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
        if (threadIdx.x == 0) total = v;
    }
    __syncthreads();
    return total;
}
"""


def _kernel(name, source, **types):
    """Compile `source` (with OUT_T/IN_T/... replaced by C types) once per type combination."""
    key = (name, tuple(sorted(types.items())))
    if key not in _cache:
        code = source
        for placeholder, dtype in types.items():
            code = code.replace(placeholder, _ctype(dtype))
        _cache[key] = _cp().RawKernel(_PRELUDE + code, name, options=("-std=c++17",))
    return _cache[key]


# ---- batched matrix products through cuBLAS ----------------------------------------------------

_CUDA_DTYPE = {"float32": 0, "float16": 2, "bfloat16": 14}  # cudaDataType: CUDA_R_32F, _16F, _16BF
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
    the operands swapped.
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
    handle = cp.cuda.device.get_cublas_handle()
    cublas.gemmStridedBatchedEx(
        handle,
        cublas.CUBLAS_OP_T if trans_b else cublas.CUBLAS_OP_N,
        cublas.CUBLAS_OP_T if trans_a else cublas.CUBLAS_OP_N,
        n, m, k, alpha.ctypes.data,
        b.data.ptr, _CUDA_DTYPE[b.dtype.name], ldb, sb,
        a.data.ptr, _CUDA_DTYPE[a.dtype.name], lda, sa,
        beta.ctypes.data, o.data.ptr, _CUDA_DTYPE[o.dtype.name], ldc, sc,
        batch, _COMPUTE_32F_FAST_TF32 if tf32 else _COMPUTE_32F, _GEMM_DEFAULT,
    )
    return out


# ---- attention ----------------------------------------------------------------------------------

_ATTN_FWD = r"""
// One block per query row: P[j] = exp(s_j * scale - lse) for the keys the row may see, else 0;
// lse = log sum_j exp(s_j * scale). Row r of the block is query q0 + r % n of its head.
extern "C" __global__ void attn_softmax_fwd(const float* __restrict__ S, OUT_T* __restrict__ P,
        float* __restrict__ lse, int n, int L, int T, int q0, int off, int causal, float scale) {
    long long r = blockIdx.x;
    int head = r / n, i = r % n;
    int limit = causal ? min(L, q0 + i + off + 1) : L;
    const float* s = S + r * L;
    OUT_T* p = P + r * L;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < limit; j += blockDim.x) m = fmaxf(m, s[j] * scale);
    m = block_max(m);
    float sum = 0.f;
    for (int j = threadIdx.x; j < limit; j += blockDim.x) sum += expf(s[j] * scale - m);
    float l = m + logf(block_sum(sum));
    for (int j = threadIdx.x; j < L; j += blockDim.x) put(p + j, j < limit ? expf(s[j] * scale - l) : 0.f);
    if (threadIdx.x == 0) lse[(long long)head * T + q0 + i] = l;
}
"""

_ATTN_BWD = r"""
// P = exp(s * scale - lse) (0 where masked) and dS = P * (dP - D) * scale, D = rowsum(dO * O).
// Rows along grid.y, columns along grid.x (no per-element integer division).
extern "C" __global__ void attn_softmax_bwd(const float* __restrict__ S, const float* __restrict__ dP,
        const float* __restrict__ lse, const float* __restrict__ Drow, OUT_T* __restrict__ P,
        OUT_T* __restrict__ dS, long long rows, int n, int L, int T, int q0, int off, int causal,
        float scale) {
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
        int head = r / n, i = r % n;
        long long row = (long long)head * T + q0 + i;
        float l = lse[row], d = Drow[row];
        int limit = causal ? min(L, q0 + i + off + 1) : L;
        for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < L; j += gridDim.x * blockDim.x) {
            long long idx = r * L + j;
            float p = j < limit ? expf(S[idx] * scale - l) : 0.f;
            put(P + idx, p);
            put(dS + idx, p * (dP[idx] - d) * scale);
        }
    }
}
"""


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


def attention_forward(q, k, v, causal, scale):
    """y (B, Hq, T, D) float32 and lse (B*Hq, T) for q (B, Hq, T, D), k, v (B, Hkv, S, D)."""
    cp = _cp()
    B, Hq, T, D = q.shape
    S, G = k.shape[2], Hq // k.shape[1]
    BH = B * Hq
    qf = cp.ascontiguousarray(q).reshape(BH, T, D)
    kf = cp.ascontiguousarray(_expand_kv(k, G)).reshape(BH, S, D)
    vf = cp.ascontiguousarray(_expand_kv(v, G)).reshape(BH, S, D)
    y = cp.empty((BH, T, D), np.float32)
    lse = cp.empty((BH, T), np.float32)
    fwd = _kernel("attn_softmax_fwd", _ATTN_FWD, OUT_T=q.dtype)
    for q0, n, L in _attention_blocks(BH, T, S, causal):
        s = gemm(qf[:, q0:q0 + n], kf[:, :L], trans_b=True)
        p = cp.empty((BH, n, L), q.dtype)
        fwd((BH * n,), (256,), (s, p, lse, np.int32(n), np.int32(L), np.int32(T), np.int32(q0),
                                np.int32(S - T), np.int32(causal), np.float32(scale)))
        gemm(p, vf[:, :L], out=y[:, q0:q0 + n])
    return y.reshape(B, Hq, T, D), lse


def attention_backward(q, k, v, y, lse, g, causal, scale):
    """dq, dk, dv (float32) from the saved q, k, v (any of the three dtypes), y, lse."""
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
    bwd = _kernel("attn_softmax_bwd", _ATTN_BWD, OUT_T=q.dtype)
    for q0, n, L in _attention_blocks(BH, T, S, causal):
        qb, gb = qf[:, q0:q0 + n], gl[:, q0:q0 + n]
        s = gemm(qb, kf[:, :L], trans_b=True)
        dp = gemm(gb, vf[:, :L], trans_b=True)
        p = cp.empty((BH, n, L), q.dtype)
        ds = cp.empty((BH, n, L), q.dtype)
        bwd(_grid2(BH * n, L), (256,), (s, dp, lse, drow, p, ds, np.int64(BH * n), np.int32(n),
                                   np.int32(L), np.int32(T), np.int32(q0), np.int32(S - T),
                                   np.int32(causal), np.float32(scale)))
        del s, dp
        gemm(p, gb, trans_a=True, out=dv[:, :L], accumulate=True)   # dV += P^T dO
        gemm(ds, qb, trans_a=True, out=dk[:, :L], accumulate=True)  # dK += dS^T Q
        gemm(ds, kf[:, :L], out=dq[:, q0:q0 + n])                   # dQ  = dS K
    dq = dq.reshape(B, Hq, T, D)
    dk = dk.reshape(B, Hkv, G, S, D).sum(axis=2) if G > 1 else dk.reshape(B, Hkv, S, D)
    dv = dv.reshape(B, Hkv, G, S, D).sum(axis=2) if G > 1 else dv.reshape(B, Hkv, S, D)
    return dq, dk, dv


# ---- cross-entropy ------------------------------------------------------------------------------

_CE_FWD = r"""
// One block per row: lse = log sum_j exp(z_j) with a running (max, sum) pair, one read of z.
extern "C" __global__ void ce_fwd(const IN_T* __restrict__ Z, const long long* __restrict__ t,
        float* __restrict__ lse, float* __restrict__ loss, int V, long long ignore) {
    long long r = blockIdx.x;
    const IN_T* z = Z + r * V;
    float m = -INFINITY, s = 0.f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float x = to_f(z[j]);
        if (x > m) { s = s * expf(m - x) + 1.f; m = x; } else { s += expf(x - m); }
    }
    float M = block_max(m);
    s = (m == -INFINITY) ? 0.f : s * expf(m - M);
    float shifted = logf(block_sum(s));  // lse - M
    if (threadIdx.x == 0) {
        lse[r] = M + shifted;
        long long tr = t[r];
        loss[r] = (tr == ignore) ? 0.f : shifted - (to_f(z[tr]) - M);  // no rounding at |z|
    }
}
"""

_CE_BWD = r"""
// dz_j = (exp(z_j - lse) - [j == t]) * w, w = the row's weight (0 for ignored rows).
extern "C" __global__ void ce_bwd(const IN_T* __restrict__ Z, const long long* __restrict__ t,
        const float* __restrict__ lse, const float* __restrict__ w, IN_T* __restrict__ dZ,
        long long rows, int V) {
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
        float l = lse[r], wr = w[r];
        long long tr = t[r];
        for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < V; j += gridDim.x * blockDim.x) {
            long long idx = r * V + j;
            put(dZ + idx, (expf(to_f(Z[idx]) - l) - (tr == j ? 1.f : 0.f)) * wr);
        }
    }
}
"""


def cross_entropy_forward(z, t, ignore_index):
    """Per-row losses (0 where ignored) and log-sum-exps for logits z (N, V), targets t (N,)."""
    cp = _cp()
    z = cp.ascontiguousarray(z)
    N, V = z.shape
    t = cp.ascontiguousarray(t.astype(np.int64, copy=False))
    lse = cp.empty(N, np.float32)
    loss = cp.empty(N, np.float32)
    _kernel("ce_fwd", _CE_FWD, IN_T=z.dtype)((N,), (512,), (z, t, lse, loss, np.int32(V), np.int64(ignore_index)))
    return loss, lse


def cross_entropy_backward(z, t, lse, w):
    cp = _cp()
    z = cp.ascontiguousarray(z)
    N, V = z.shape
    dz = cp.empty_like(z)
    _kernel("ce_bwd", _CE_BWD, IN_T=z.dtype)(
        _grid2(N, V), (256,),
        (z, cp.ascontiguousarray(t.astype(np.int64, copy=False)), lse,
         cp.ascontiguousarray(w.astype(np.float32, copy=False)), dz, np.int64(N), np.int32(V)))
    return dz


# ---- RMSNorm and LayerNorm ----------------------------------------------------------------------

_NORM_FWD = r"""
// One block per row. center=1: LayerNorm (subtract the mean, add bias); 0: RMSNorm.
extern "C" __global__ void norm_fwd(const float* __restrict__ X, const float* __restrict__ w,
        const float* __restrict__ b, float* __restrict__ Y, float* __restrict__ mean_out,
        float* __restrict__ rstd_out, int d, float eps, int center) {
    long long r = blockIdx.x;
    const float* x = X + r * d;
    float* y = Y + r * d;
    float mu = 0.f;
    if (center) {
        float s = 0.f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) s += x[j];
        mu = block_sum(s) / d;
    }
    float ss = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) { float c = x[j] - mu; ss += c * c; }
    float rstd = rsqrtf(block_sum(ss) / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = (x[j] - mu) * rstd;
        if (w) v *= w[j];
        if (b) v += b[j];
        y[j] = v;
    }
    if (threadIdx.x == 0) { mean_out[r] = mu; rstd_out[r] = rstd; }
}
"""

_NORM_BWD = r"""
// Rows in a grid-stride loop. With gh = g w and xhat = (x - mean) rstd:
//   dx = rstd (gh - [center] mean(gh) - xhat mean(gh xhat)); dw += g xhat; db += g.
// Each block sums its rows' dw, db in shared memory, then adds them to global memory once.
extern "C" __global__ void norm_bwd(const float* __restrict__ G, const float* __restrict__ X,
        const float* __restrict__ w, const float* __restrict__ mean, const float* __restrict__ rstd,
        float* __restrict__ dX, float* __restrict__ dw, float* __restrict__ db, long long rows,
        int d, int center) {
    extern __shared__ float acc[];  // dw partials [d], then db partials [d]
    for (int j = threadIdx.x; j < 2 * d; j += blockDim.x) acc[j] = 0.f;
    __syncthreads();
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* g = G + r * d;
        const float* x = X + r * d;
        float mu = mean[r], rs = rstd[r];
        float s1 = 0.f, s2 = 0.f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float xh = (x[j] - mu) * rs;
            float gh = w ? g[j] * w[j] : g[j];
            s1 += gh;
            s2 += gh * xh;
            acc[j] += g[j] * xh;
            acc[d + j] += g[j];
        }
        float m1 = center ? block_sum(s1) / d : 0.f;
        float m2 = block_sum(s2) / d;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float xh = (x[j] - mu) * rs;
            float gh = w ? g[j] * w[j] : g[j];
            dX[r * d + j] = rs * (gh - m1 - xh * m2);
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        if (dw) atomicAdd(dw + j, acc[j]);
        if (db) atomicAdd(db + j, acc[d + j]);
    }
}
"""


def _ptr(a):
    """An array argument, or a null pointer for an absent one."""
    return np.uint64(0) if a is None else _cp().ascontiguousarray(a)


def _rows(x):
    cp = _cp()
    x = cp.ascontiguousarray(x)
    return x.reshape(-1, x.shape[-1])


def norm_forward(x, w, b, eps, center):
    """y, mean, rstd for LayerNorm (center=True) or RMSNorm over the last axis (float32)."""
    cp = _cp()
    x2 = _rows(x)
    N, d = x2.shape
    y = cp.empty_like(x2)
    mean = cp.empty(N, np.float32)
    rstd = cp.empty(N, np.float32)
    threads = 128 if d <= 1024 else 256
    _kernel("norm_fwd", _NORM_FWD)((N,), (threads,), (x2, _ptr(w), _ptr(b), y, mean, rstd, np.int32(d),
                                                      np.float32(eps), np.int32(center)))
    return y.reshape(x.shape), mean, rstd


def norm_backward(g, x, w, mean, rstd, center, want_w, want_b):
    cp = _cp()
    g2, x2 = _rows(g), _rows(x)
    N, d = x2.shape
    dx = cp.empty_like(x2)
    dw = cp.zeros(d, np.float32) if want_w else None
    db = cp.zeros(d, np.float32) if want_b else None
    blocks = int(min(N, 1024))
    _kernel("norm_bwd", _NORM_BWD)((blocks,), (128,), (g2, x2, _ptr(w), mean, rstd, dx, _ptr(dw), _ptr(db),
                                                        np.int64(N), np.int32(d), np.int32(center)),
                                    shared_mem=2 * d * 4)
    return dx.reshape(x.shape), dw, db


# ---- elementwise: SwiGLU, AdamW -----------------------------------------------------------------

def swiglu_forward(a, b):
    k = _elementwise("swiglu_fwd", "T a, T b", "T y",
                     "float s = 1.f / (1.f + expf(-(float)a)); y = (float)a * s * (float)b")
    return k(a, b)


def swiglu_backward(g, a, b):
    k = _elementwise(
        "swiglu_bwd", "T g, T a, T b", "T ga, T gb",
        "float s = 1.f / (1.f + expf(-(float)a));"
        "ga = (float)g * (float)b * s * (1.f + (float)a * (1.f - s));"
        "gb = (float)g * (float)a * s")
    return k(g, a, b)


# ---- multi-tensor kernels: one launch over every parameter --------------------------------------

_CHUNK = 1 << 16  # elements per thread block

_MULTI = r"""
// The arrays are cut into chunks of CHUNK elements; block b works on chunk b, which is
// array arr[b] from element start[b]. ptrs holds each array's address (one list per operand).
#define CHUNK 65536
#define SPAN(a, start, size) long long end_ = min(size[a], start + CHUNK)

extern "C" __global__ void multi_sumsq(const unsigned long long* ptrs, const long long* size,
        const int* arr, const long long* start, float* out) {
    int a = arr[blockIdx.x];
    long long s0 = start[blockIdx.x];
    SPAN(a, s0, size);
    const float* x = (const float*)ptrs[a];
    float acc = 0.f;
    for (long long i = s0 + threadIdx.x; i < end_; i += blockDim.x) { float v = x[i]; acc += v * v; }
    acc = block_sum(acc);
    if (threadIdx.x == 0) atomicAdd(out, acc);
}

extern "C" __global__ void multi_scale(const unsigned long long* ptrs, const long long* size,
        const int* arr, const long long* start, float scale) {
    int a = arr[blockIdx.x];
    long long s0 = start[blockIdx.x];
    SPAN(a, s0, size);
    float* x = (float*)ptrs[a];
    for (long long i = s0 + threadIdx.x; i < end_; i += blockDim.x) x[i] *= scale;
}

// AdamW (PyTorch's form): p *= 1 - lr wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr (m / c1) / (sqrt(v / c2) + eps), with c1, c2 the bias corrections. ptrs: p, g, m, v.
extern "C" __global__ void multi_adamw(const unsigned long long* ptrs, const long long* size,
        const int* arr, const long long* start, int n, float lr, float wd, float b1, float b2,
        float eps, float c1, float c2) {
    int a = arr[blockIdx.x];
    long long s0 = start[blockIdx.x];
    SPAN(a, s0, size);
    float* p = (float*)ptrs[a];
    const float* g = (const float*)ptrs[n + a];
    float* m = (float*)ptrs[2 * n + a];
    float* v = (float*)ptrs[3 * n + a];
    for (long long i = s0 + threadIdx.x; i < end_; i += blockDim.x) {
        float gi = g[i];
        float mi = b1 * m[i] + (1.f - b1) * gi;
        float vi = b2 * v[i] + (1.f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * (1.f - lr * wd) - lr * (mi / c1) / (sqrtf(vi / c2) + eps);
    }
}
"""


def _multi(name, operands):
    """Launch multi-tensor kernel `name` over lists of equally shaped float32 arrays.

    Returns a function taking the kernel's scalar arguments. The address table is built on
    the host and copied once per call (the arrays' addresses change between steps).
    """
    cp = _cp()
    n = len(operands[0])
    sizes = np.array([a.size for a in operands[0]], np.int64)
    counts = (sizes + _CHUNK - 1) // _CHUNK
    arr = np.repeat(np.arange(n, dtype=np.int32), counts)
    start = np.concatenate([np.arange(c, dtype=np.int64) * _CHUNK for c in counts])
    ptrs = np.array([a.data.ptr for arrays in operands for a in arrays], np.uint64)
    host = np.concatenate([ptrs.view(np.int64), sizes, start, arr.astype(np.int64)])
    dev = cp.asarray(host)
    d_ptrs = dev[: ptrs.size]
    d_size = dev[ptrs.size: ptrs.size + n]
    d_start = dev[ptrs.size + n: ptrs.size + n + start.size]
    d_arr = dev[ptrs.size + n + start.size:].astype(np.int32)
    kernel = _kernel(name, _MULTI)

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


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay,
               bias_c1, bias_c2):
    """One AdamW update of every parameter (in place), in one launch; float32, contiguous."""
    _multi("multi_adamw", [params, grads, exp_avgs, exp_avg_sqs])(
        np.int32(len(params)), np.float32(lr), np.float32(weight_decay), np.float32(beta1),
        np.float32(beta2), np.float32(eps), np.float32(bias_c1), np.float32(bias_c2))


_ROPE = r"""
// One thread per pair of one row (a row = one position of one head): threadIdx.x the pair,
// rows over threadIdx.y and the grid. y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin.
extern "C" __global__ void rope_rotate(const IN_T* __restrict__ x, const IN_T* __restrict__ c,
        const IN_T* __restrict__ s, IN_T* __restrict__ y, long long rows, int T, int D,
        int inter, float sign) {
    int h = D / 2, p = threadIdx.x;
    for (long long r = blockIdx.x * (long long)blockDim.y + threadIdx.y; r < rows;
         r += (long long)gridDim.x * blockDim.y) {
        int t = r % T;
        long long a = r * D + (inter ? 2 * p : p), b = a + (inter ? 1 : h);
        float cs = to_f(c[t * h + p]), sn = sign * to_f(s[t * h + p]);
        float x1 = to_f(x[a]), x2 = to_f(x[b]);
        put(y + a, x1 * cs - x2 * sn);
        put(y + b, x2 * cs + x1 * sn);
    }
}
"""


def rope_rotate(x, cos, sin, sign, interleaved):
    """Rotate the pairs of the last axis of x (..., T, D) by sign * angle, in one pass.

    cos, sin: (T, D/2) tables. The pair of element j is (j, j + D/2) in the rotate-half
    convention, (2i, 2i + 1) interleaved.
    """
    cp = _cp()
    x = cp.ascontiguousarray(x)
    T, D = x.shape[-2], x.shape[-1]
    cos = cp.ascontiguousarray(cos, dtype=x.dtype)
    sin = cp.ascontiguousarray(sin, dtype=x.dtype)
    y = cp.empty_like(x)
    rows = x.size // D
    per_block = max(1, 256 // (D // 2))
    grid = (int(min((rows + per_block - 1) // per_block, 65535 * 4)),)
    _kernel("rope_rotate", _ROPE, IN_T=x.dtype)(
        grid, (D // 2, per_block), (x, cos, sin, y, np.int64(rows), np.int32(T), np.int32(D),
                                     np.int32(bool(interleaved)), np.float32(sign)))
    return y


def _elementwise(name, params_in, params_out, body):
    if name not in _cache:
        _cache[name] = _cp().ElementwiseKernel(params_in, params_out, body, name)
    return _cache[name]
