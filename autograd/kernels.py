"""Fused CUDA kernels (CuPy) for the ops that move the most bytes.

The NumPy code in ops.py is the definition of every op; the functions here compute the same
thing on CuPy arrays with fewer passes over memory, and tests/test_kernels.py checks each one
against that definition. Ops call them only for CuPy arrays and only while `enabled()`
(TINYLLM_FUSED=0 turns them off, e.g. to compare).

- attention, bfloat16/float16 operands (head size 16-64): FlashAttention-2 on tensor cores,
  scores and probabilities only ever in registers; the backward recomputes them from q, k and
  the saved log-sum-exp.
- attention, other cases (float32/TF32, larger heads): a block of queries at a time, so the
  (T x T) probability matrix never exists whole (cuBLAS does the products, one fused kernel
  each softmax step; the backward recomputes each block from the saved log-sum-exp).
  The causal upper triangle is skipped in both.
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

// Attention dropout: element (bh, i, j) (query head bh, query i of T, key j of S) is kept when
// the top 24 bits of splitmix64(seed + (bh T + i) S + j) are at least thr = p 2^24. Forward and
// backward recompute the same mask; attention_dropout_keep is this function in NumPy.
__device__ __forceinline__ bool dropout_keep(unsigned long long seed, long long bh, int i, int j,
                                             int T, int S, unsigned int thr) {
    unsigned long long z = seed + ((unsigned long long)bh * T + i) * S + j + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (unsigned int)(z >> 40) >= thr;
}

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
// With dropout (thr > 0) P is written as dropped and rescaled: P[j] keep_j / (1 - p).
extern "C" __global__ void attn_softmax_fwd(const float* __restrict__ S, OUT_T* __restrict__ P,
        float* __restrict__ lse, int n, int L, int T, int q0, int off, int causal, float scale,
        unsigned long long seed, unsigned int thr, float inv_keep) {
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
    for (int j = threadIdx.x; j < L; j += blockDim.x) {
        float pj = j < limit ? expf(s[j] * scale - l) : 0.f;
        if (thr) pj = dropout_keep(seed, head, q0 + i, j, T, T + off, thr) ? pj * inv_keep : 0.f;
        put(p + j, pj);
    }
    if (threadIdx.x == 0) lse[(long long)head * T + q0 + i] = l;
}
"""

_ATTN_BWD = r"""
// P = exp(s * scale - lse) (0 where masked) and dS = P * (dP - D) * scale, D = rowsum(dO * O).
// With dropout, Pd = P keep / (1 - p) is written for dV = Pd^T dO, and dP = dPd keep / (1 - p).
// Rows along grid.y, columns along grid.x (no per-element integer division).
extern "C" __global__ void attn_softmax_bwd(const float* __restrict__ S, const float* __restrict__ dP,
        const float* __restrict__ lse, const float* __restrict__ Drow, OUT_T* __restrict__ P,
        OUT_T* __restrict__ dS, long long rows, int n, int L, int T, int q0, int off, int causal,
        float scale, unsigned long long seed, unsigned int thr, float inv_keep) {
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
        int head = r / n, i = r % n;
        long long row = (long long)head * T + q0 + i;
        float l = lse[row], d = Drow[row];
        int limit = causal ? min(L, q0 + i + off + 1) : L;
        for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < L; j += gridDim.x * blockDim.x) {
            long long idx = r * L + j;
            float p = j < limit ? expf(S[idx] * scale - l) : 0.f, dp = dP[idx];
            if (thr) {
                bool kept = dropout_keep(seed, head, q0 + i, j, T, T + off, thr);
                put(P + idx, kept ? p * inv_keep : 0.f);
                dp = kept ? dp * inv_keep : 0.f;
            } else {
                put(P + idx, p);
            }
            put(dS + idx, p * (dp - d) * scale);
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


def _dropout_args(dropout_p, seed):
    """(seed, thr, 1 / (1 - p)) for the kernels; thr = 0 turns dropout off."""
    return np.uint64(seed), np.uint32(int(dropout_p * (1 << 24))), np.float32(1 / (1 - dropout_p))


def attention_dropout_keep(seed, BH, T, S, dropout_p):
    """The fused kernels' attention dropout mask (BH, T, S) in NumPy: the definition the
    kernels' dropout_keep computes element by element (splitmix64 of the element's index)."""
    u = np.uint64
    idx = ((np.arange(BH, dtype=u)[:, None, None] * u(T) + np.arange(T, dtype=u)[:, None]) * u(S)
           + np.arange(S, dtype=u))
    z = idx + u(seed) + u(0x9E3779B97F4A7C15)
    z = (z ^ (z >> u(30))) * u(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> u(27))) * u(0x94D049BB133111EB)
    z ^= z >> u(31)
    return (z >> u(40)) >= u(int(dropout_p * (1 << 24)))


_DROPOUT_KEEP = r"""
unsigned long long z = seed + (unsigned long long)i + 0x9E3779B97F4A7C15ull;
z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
z ^= z >> 31;
keep = (unsigned int)(z >> 40) >= thr;
"""


def dropout_keep(shape, dropout_p, seed):
    """A dropout keep mask on the GPU: element n (C order) is attention_dropout_keep(seed, 1,
    1, size, dropout_p)[0, 0, n], the same hash of the element's index."""
    if "dropout_keep" not in _cache:
        _cache["dropout_keep"] = _cp().ElementwiseKernel(
            "uint64 seed, uint32 thr", "bool keep", _DROPOUT_KEEP, "tinyllm_dropout_keep")
    keep = _cp().empty(shape, dtype=bool)
    _cache["dropout_keep"](np.uint64(seed), np.uint32(int(dropout_p * (1 << 24))), keep)
    return keep


def attention_forward(q, k, v, causal, scale, dropout_p=0.0, seed=0):
    """y (B, Hq, T, D) float32 and lse (B*Hq, T) for q (B, Hq, T, D), k, v (B, Hkv, S, D).
    With dropout_p > 0 the probabilities are dropped by attention_dropout_keep(seed, ...)."""
    if flash_supported(q, k):
        return flash_attention_forward(q, k, v, causal, scale, dropout_p, seed)
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
                                np.int32(S - T), np.int32(causal), np.float32(scale),
                                *_dropout_args(dropout_p, seed)))
        gemm(p, vf[:, :L], out=y[:, q0:q0 + n])
    return y.reshape(B, Hq, T, D), lse


def attention_backward(q, k, v, y, lse, g, causal, scale, dropout_p=0.0, seed=0):
    """dq, dk, dv (float32) from the saved q, k, v (any of the three dtypes), y, lse; the same
    dropout_p and seed as the forward."""
    if flash_supported(q, k):
        return flash_attention_backward(q, k, v, y, lse, g, causal, scale, dropout_p, seed)
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

_FLASH = r"""
typedef unsigned int u32;
typedef ELEM elem;
constexpr int D = HEAD_DIM;       // head size, a multiple of 16, at most 64
constexpr int TILE = 64;          // queries or keys per block (4 warps x 16)
constexpr int THREADS = 128;
constexpr int LD = D + 8;         // padded tile row: 16-byte aligned, ldmatrix conflict-free
constexpr int KD = D / 16, ND = D / 8, KT = TILE / 16, NT = TILE / 8;
constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ u32 pack2(float lo, float hi) {
    PACK2_BODY
}
__device__ __forceinline__ u32 ld2(const elem* p) { return *reinterpret_cast<const u32*>(p); }
__device__ __forceinline__ u32 smem(const void* p) {  // a shared-memory address for PTX
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void mma(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.MMA_T.MMA_T.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldsm4(u32* r, const elem* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem(p)));
}
__device__ __forceinline__ void ldsm4t(u32* r, const elem* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem(p)));
}
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffff, x, 1);
    return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// Start copying rows [r0, r0 + TILE) of a (n, D) matrix into tile[TILE][LD], 16 bytes per
// cp.async; rows past n are zero-filled. commit() closes the group, wait<N>() waits until at
// most N groups are in flight.
__device__ __forceinline__ void load_tile(const elem* src, int r0, int n, elem* tile) {
    constexpr int CH = D / 8;  // 16-byte chunks per row
    #pragma unroll
    for (int i = 0; i < TILE * CH / THREADS; ++i) {
        int c = i * THREADS + threadIdx.x, row = c / CH, col = (c % CH) * 8;
        bool in = r0 + row < n;
        const elem* s = src + (long long)(in ? r0 + row : 0) * D + col;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                     :: "r"(smem(tile + row * LD + col)), "l"(s), "r"(in ? 16 : 0));
    }
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

// In a loop over key tiles k0 = 0, TILE, .. < kend whose tile k0 was staged into buffer buf:
// start copying tile k0 + TILE into the other buffer, then wait until tile k0 has arrived.
__device__ __forceinline__ void kv_tiles_ready(const elem* k, const elem* v, int k0, int kend, int S,
                                               elem (*sK)[TILE * LD], elem (*sV)[TILE * LD], int buf) {
    if (k0 + TILE < kend) {
        load_tile(k, k0 + TILE, S, sK[buf ^ 1]);
        load_tile(v, k0 + TILE, S, sV[buf ^ 1]);
        commit();
        wait<1>();
    } else {
        wait<0>();
    }
    __syncthreads();
}

// A fragments (16 rows x D) of rows r, r + 8 of a (n, D) matrix in global memory.
__device__ __forceinline__ void load_a(const elem* src, int r, int n, int t, u32 (*a)[4]) {
    #pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
        int c = kk * 16 + 2 * t;
        bool in0 = r < n, in1 = r + 8 < n;
        a[kk][0] = in0 ? ld2(src + (long long)r * D + c) : 0u;
        a[kk][1] = in1 ? ld2(src + (long long)(r + 8) * D + c) : 0u;
        a[kk][2] = in0 ? ld2(src + (long long)r * D + c + 8) : 0u;
        a[kk][3] = in1 ? ld2(src + (long long)(r + 8) * D + c + 8) : 0u;
    }
}

// acc[NT][4] = X Y^T: X this warp's 16 x D rows (A fragments), Y a [TILE][LD] tile.
__device__ __forceinline__ void mm_tile(float (*acc)[4], u32 (*a)[4], const elem* sy, int lane) {
    #pragma unroll
    for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    #pragma unroll
    for (int n = 0; n < NT; n += 2) {
        #pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            u32 b[4];  // b0, b1 of key columns n and n + 1
            ldsm4(b, sy + ((n + (lane >> 4)) * 8 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
            mma(acc[n], a[kk], b[0], b[1]);
            mma(acc[n + 1], a[kk], b[2], b[3]);
        }
    }
}

// acc[ND][4] += P Y: P 16 x TILE held as C fragments p[NT][4], Y a [TILE][LD] tile ([k][n]).
__device__ __forceinline__ void mm_acc(float (*acc)[4], float (*p)[4], const elem* sy, int lane) {
    #pragma unroll
    for (int kc = 0; kc < KT; ++kc) {
        u32 a[4] = {pack2(p[2 * kc][0], p[2 * kc][1]), pack2(p[2 * kc][2], p[2 * kc][3]),
                    pack2(p[2 * kc + 1][0], p[2 * kc + 1][1]), pack2(p[2 * kc + 1][2], p[2 * kc + 1][3])};
        #pragma unroll
        for (int nd = 0; nd < ND; nd += 2) {
            u32 b[4];  // b0, b1 of output columns nd and nd + 1, transposed on load
            ldsm4t(b, sy + (kc * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (nd + (lane >> 4)) * 8);
            mma(acc[nd], a, b[0], b[1]);
            mma(acc[nd + 1], a, b[2], b[3]);
        }
    }
}

// Store rows r, r + 8 (those < n) of a 16 x D float block held as C fragments, times s0, s1.
__device__ __forceinline__ void store_rows(float* dst, float (*acc)[4], int r, int n, int t,
                                           float s0, float s1) {
    #pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
        int c = nd * 8 + 2 * t;
        if (r < n) *reinterpret_cast<float2*>(dst + (long long)r * D + c) = make_float2(acc[nd][0] * s0, acc[nd][1] * s0);
        if (r + 8 < n) *reinterpret_cast<float2*>(dst + (long long)(r + 8) * D + c) = make_float2(acc[nd][2] * s1, acc[nd][3] * s1);
    }
}

// Forward. grid (ceil(T / TILE), B * Hq). Query i of T sits at position i + S - T and, causal,
// sees the keys j <= i + S - T. O (B*Hq, T, D) float32; lse (B*Hq, T) = log sum_j exp(s_ij).
extern "C" __global__ void __launch_bounds__(THREADS) flash_fwd(
        const elem* __restrict__ Q, const elem* __restrict__ K, const elem* __restrict__ V,
        float* __restrict__ O, float* __restrict__ lse, int Hq, int G, int T, int S, int causal,
        float scale, unsigned long long seed, u32 thr, float inv_keep) {
    __shared__ __align__(16) elem sK[2][TILE * LD];
    __shared__ __align__(16) elem sV[2][TILE * LD];
    int bh = blockIdx.y, b = bh / Hq, h = bh % Hq;
    long long kvh = (long long)b * (Hq / G) + h / G;
    const elem* k = K + kvh * S * D;
    const elem* v = V + kvh * S * D;
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int q0 = blockIdx.x * TILE, r = q0 + (threadIdx.x >> 5) * 16 + g, off = S - T;
    int kend = causal ? min(S, q0 + TILE + off) : S;
    load_tile(k, 0, S, sK[0]);  // the first key tile; the loop stages each next one
    load_tile(v, 0, S, sV[0]);
    commit();
    u32 qa[KD][4];
    load_a(Q + (long long)bh * T * D, r, T, t, qa);
    float o[ND][4];
    #pragma unroll
    for (int nd = 0; nd < ND; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // running max (log2 units), sum
    float sl = scale * LOG2E;
    for (int k0 = 0, buf = 0; k0 < kend; k0 += TILE, buf ^= 1) {
        kv_tiles_ready(k, v, k0, kend, S, sK, sV, buf);
        float s[NT][4];
        mm_tile(s, qa, sK[buf], lane);
        bool edge = k0 + TILE > S || (causal && k0 + TILE - 1 > q0 + off);  // a tile with masked keys
        float mx0 = m0, mx1 = m1;
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                int j = k0 + n * 8 + 2 * t + (e & 1), i = r + (e >> 1) * 8;
                s[n][e] = (edge && (j >= S || (causal && j > i + off))) ? -INFINITY : s[n][e] * sl;
            }
            mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
            mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
        }
        mx0 = quad_max(mx0);
        mx1 = quad_max(mx1);
        float c0 = exp2f(m0 - mx0), c1 = exp2f(m1 - mx1);  // key 0 is always visible: mx finite
        m0 = mx0;
        m1 = mx1;
        float p0 = 0.f, p1 = 0.f;
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            s[n][0] = exp2f(s[n][0] - m0); s[n][1] = exp2f(s[n][1] - m0);
            s[n][2] = exp2f(s[n][2] - m1); s[n][3] = exp2f(s[n][3] - m1);
            p0 += s[n][0] + s[n][1];
            p1 += s[n][2] + s[n][3];
        }
        l0 = l0 * c0 + p0;  // this thread's share of the row sum; the quad adds them at the end
        l1 = l1 * c1 + p1;
        if (thr) {  // dropout acts on P after the softmax's sums: P V becomes Pd V
            #pragma unroll
            for (int n = 0; n < NT; ++n)
                #pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (!dropout_keep(seed, bh, r + (e >> 1) * 8, k0 + n * 8 + 2 * t + (e & 1), T, S, thr)) s[n][e] = 0.f;
                    else s[n][e] *= inv_keep;
        }
        #pragma unroll
        for (int nd = 0; nd < ND; ++nd) { o[nd][0] *= c0; o[nd][1] *= c0; o[nd][2] *= c1; o[nd][3] *= c1; }
        mm_acc(o, s, sV[buf], lane);
        __syncthreads();  // everyone is done with buf before it is loaded again
    }
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    store_rows(O + (long long)bh * T * D, o, r, T, t, 1.f / l0, 1.f / l1);
    if (t == 0) {
        const float LN2 = 0.6931471805599453f;
        if (r < T) lse[(long long)bh * T + r] = (m0 + log2f(l0)) * LN2;
        if (r + 8 < T) lse[(long long)bh * T + r + 8] = (m1 + log2f(l1)) * LN2;
    }
}

// dK, dV. grid (ceil(S / TILE), B * Hkv). For the G query heads of this kv head and every query
// tile that sees these keys: S^T = K Q^T, P^T = exp(S^T scale - lse), dP^T = V dO^T,
// dS^T = P^T (dP^T - Drow) scale; dV += P^T dO, dK += dS^T Q.
extern "C" __global__ void __launch_bounds__(THREADS) flash_bwd_kv(
        const elem* __restrict__ Q, const elem* __restrict__ K, const elem* __restrict__ V,
        const elem* __restrict__ dO, const float* __restrict__ lse, const float* __restrict__ Drow,
        float* __restrict__ dK, float* __restrict__ dV, int Hq, int G, int T, int S, int causal,
        float scale, unsigned long long seed, u32 thr, float inv_keep) {
    __shared__ __align__(16) elem sQ[2][TILE * LD];
    __shared__ __align__(16) elem sG[2][TILE * LD];
    __shared__ float sL[2][TILE], sD[2][TILE];
    int bkv = blockIdx.y, Hkv = Hq / G, b = bkv / Hkv, hk = bkv % Hkv;
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int k0 = blockIdx.x * TILE, r = k0 + (threadIdx.x >> 5) * 16 + g, off = S - T;
    int qstart = causal ? max(0, k0 - off) / TILE * TILE : 0;
    int nq = (T - qstart + TILE - 1) / TILE, steps = G * nq;  // (query head, query tile) pairs
    // stage step s into buffer buf: its q, dO tiles (cp.async) and its lse, Drow rows
    auto stage = [&](int s, int buf) {
        long long bh = (long long)b * Hq + hk * G + s / nq;
        int q0 = qstart + (s % nq) * TILE;
        load_tile(Q + bh * T * D, q0, T, sQ[buf]);
        load_tile(dO + bh * T * D, q0, T, sG[buf]);
        commit();
        for (int i = threadIdx.x; i < TILE; i += THREADS) {
            bool in = q0 + i < T;
            sL[buf][i] = in ? lse[bh * T + q0 + i] * LOG2E : INFINITY;  // rows past T: P = 0
            sD[buf][i] = in ? Drow[bh * T + q0 + i] : 0.f;
        }
    };
    if (steps > 0) stage(0, 0);
    u32 ka[KD][4], va[KD][4];
    load_a(K + (long long)bkv * S * D, r, S, t, ka);
    load_a(V + (long long)bkv * S * D, r, S, t, va);
    float dk[ND][4], dv[ND][4];
    #pragma unroll
    for (int nd = 0; nd < ND; ++nd)
        #pragma unroll
        for (int e = 0; e < 4; ++e) dk[nd][e] = dv[nd][e] = 0.f;
    float sl = scale * LOG2E;
    for (int s = 0, buf = 0; s < steps; ++s, buf ^= 1) {
        if (s + 1 < steps) {
            stage(s + 1, buf ^ 1);
            wait<1>();
        } else {
            wait<0>();
        }
        __syncthreads();
        int q0 = qstart + (s % nq) * TILE;
        long long bh = (long long)b * Hq + hk * G + s / nq;
        float p[NT][4], ds[NT][4];
        mm_tile(p, ka, sQ[buf], lane);   // S^T: keys x queries
        mm_tile(ds, va, sG[buf], lane);  // dP^T
        bool edge = causal && k0 + TILE - 1 > q0 + off;  // a tile with masked (key, query) pairs
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                int ci = n * 8 + 2 * t + (e & 1), j = r + (e >> 1) * 8;
                bool masked = edge && j > q0 + ci + off;
                float pv = masked ? 0.f : exp2f(p[n][e] * sl - sL[buf][ci]), dp = ds[n][e];
                p[n][e] = pv;
                if (thr) {  // dV = Pd^T dO, dP = dPd keep / (1 - p)
                    bool kept = dropout_keep(seed, bh, q0 + ci, j, T, S, thr);
                    p[n][e] = kept ? pv * inv_keep : 0.f;
                    dp = kept ? dp * inv_keep : 0.f;
                }
                ds[n][e] = pv * (dp - sD[buf][ci]) * scale;
            }
        }
        mm_acc(dv, p, sG[buf], lane);
        mm_acc(dk, ds, sQ[buf], lane);
        __syncthreads();
    }
    store_rows(dK + (long long)bkv * S * D, dk, r, S, t, 1.f, 1.f);
    store_rows(dV + (long long)bkv * S * D, dv, r, S, t, 1.f, 1.f);
}

// dQ. grid (ceil(T / TILE), B * Hq). Over the key tiles this query tile sees: S = Q K^T,
// P = exp(S scale - lse), dP = dO V^T, dS = P (dP - Drow) scale; dQ += dS K.
extern "C" __global__ void __launch_bounds__(THREADS) flash_bwd_q(
        const elem* __restrict__ Q, const elem* __restrict__ K, const elem* __restrict__ V,
        const elem* __restrict__ dO, const float* __restrict__ lse, const float* __restrict__ Drow,
        float* __restrict__ dQ, int Hq, int G, int T, int S, int causal, float scale,
        unsigned long long seed, u32 thr, float inv_keep) {
    __shared__ __align__(16) elem sK[2][TILE * LD];
    __shared__ __align__(16) elem sV[2][TILE * LD];
    int bh = blockIdx.y, b = bh / Hq, h = bh % Hq;
    long long kvh = (long long)b * (Hq / G) + h / G;
    const elem* k = K + kvh * S * D;
    const elem* v = V + kvh * S * D;
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int q0 = blockIdx.x * TILE, r = q0 + (threadIdx.x >> 5) * 16 + g, off = S - T;
    int kend = causal ? min(S, q0 + TILE + off) : S;
    load_tile(k, 0, S, sK[0]);  // the first key tile; the loop stages each next one
    load_tile(v, 0, S, sV[0]);
    commit();
    u32 qa[KD][4], ga[KD][4];
    load_a(Q + (long long)bh * T * D, r, T, t, qa);
    load_a(dO + (long long)bh * T * D, r, T, t, ga);
    float sl = scale * LOG2E;
    float L0 = r < T ? lse[(long long)bh * T + r] * LOG2E : 0.f;
    float L1 = r + 8 < T ? lse[(long long)bh * T + r + 8] * LOG2E : 0.f;
    float D0 = r < T ? Drow[(long long)bh * T + r] : 0.f;
    float D1 = r + 8 < T ? Drow[(long long)bh * T + r + 8] : 0.f;
    float dq[ND][4];
    #pragma unroll
    for (int nd = 0; nd < ND; ++nd) dq[nd][0] = dq[nd][1] = dq[nd][2] = dq[nd][3] = 0.f;
    for (int k0 = 0, buf = 0; k0 < kend; k0 += TILE, buf ^= 1) {
        kv_tiles_ready(k, v, k0, kend, S, sK, sV, buf);
        float p[NT][4], ds[NT][4];
        mm_tile(p, qa, sK[buf], lane);
        mm_tile(ds, ga, sV[buf], lane);
        bool edge = k0 + TILE > S || (causal && k0 + TILE - 1 > q0 + off);
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                int j = k0 + n * 8 + 2 * t + (e & 1), i = r + (e >> 1) * 8;
                bool hi = e >> 1;
                bool masked = edge && (j >= S || (causal && j > i + off));
                float pv = masked ? 0.f : exp2f(p[n][e] * sl - (hi ? L1 : L0)), dp = ds[n][e];
                if (thr) dp = dropout_keep(seed, bh, i, j, T, S, thr) ? dp * inv_keep : 0.f;
                ds[n][e] = pv * (dp - (hi ? D1 : D0)) * scale;
            }
        }
        mm_acc(dq, ds, sK[buf], lane);
        __syncthreads();
    }
    store_rows(dQ + (long long)bh * T * D, dq, r, T, t, 1.f, 1.f);
}
"""

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


def _flash(name, dtype, D):
    key = ("flash", name, dtype.name, D)
    if key not in _cache:
        ctype, mma_t, pack = _FLASH_TYPES[dtype.name]
        code = (_FLASH.replace("ELEM", ctype).replace("HEAD_DIM", str(D))
                .replace("MMA_T", mma_t).replace("PACK2_BODY", pack))
        _cache[key] = _cp().RawKernel(_PRELUDE + code, name, options=("-std=c++17",))
    return _cache[key]


def _aligned(a):
    """A C-contiguous array whose data starts on 16 bytes (cp.async copies 16 bytes at a time)."""
    a = _cp().ascontiguousarray(a)
    return a if a.data.ptr % 16 == 0 else a.copy()


def _flash_args(q, k):
    B, Hq, T, D = q.shape
    return (np.int32(Hq), np.int32(Hq // k.shape[1]), np.int32(T), np.int32(k.shape[2]))


def flash_attention_forward(q, k, v, causal, scale, dropout_p=0.0, seed=0):
    """y (B, Hq, T, D) float32 and lse (B*Hq, T) on tensor cores; q, k, v bfloat16 or float16."""
    cp = _cp()
    q, k, v = (_aligned(a) for a in (q, k, v))
    B, Hq, T, D = q.shape
    y = cp.empty((B, Hq, T, D), np.float32)
    lse = cp.empty((B * Hq, T), np.float32)
    _flash("flash_fwd", q.dtype, D)(
        ((T + 63) // 64, B * Hq), (128,),
        (q, k, v, y, lse, *_flash_args(q, k), np.int32(causal), np.float32(scale),
         *_dropout_args(dropout_p, seed)))
    return y, lse


def flash_attention_backward(q, k, v, y, lse, g, causal, scale, dropout_p=0.0, seed=0):
    """dq, dk, dv (float32) for the saved q, k, v (bfloat16 or float16), y and lse."""
    cp = _cp()
    q, k, v = (_aligned(a) for a in (q, k, v))
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = g.reshape(B, Hq, T, D)
    drow = (g.astype(np.float32, copy=False) * y).sum(axis=-1)  # rowsum(dO * O)
    gl = _aligned(g.astype(q.dtype))
    dq = cp.empty((B, Hq, T, D), np.float32)
    dk = cp.empty((B, Hkv, S, D), np.float32)
    dv = cp.empty((B, Hkv, S, D), np.float32)
    args = _flash_args(q, k) + (np.int32(causal), np.float32(scale)) + _dropout_args(dropout_p, seed)
    _flash("flash_bwd_kv", q.dtype, D)(((S + 63) // 64, B * Hkv), (128,),
                                        (q, k, v, gl, lse, drow, dk, dv, *args))
    _flash("flash_bwd_q", q.dtype, D)(((T + 63) // 64, B * Hq), (128,),
                                       (q, k, v, gl, lse, drow, dq, *args))
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
