// Attention a block of queries at a time around cuBLAS products (kernels.attention_forward,
// attention_backward): the softmax step forward and its gradient backward. OUT_T: the
// probabilities' dtype (float, __nv_bfloat16 or __half).
// Reference: autograd/ops/attention.py (Attention).
// One block per query row: P[j] = exp(s_j * scale - lse) for the keys the row may see, else 0;
// lse = log sum_j exp(s_j * scale). Row r of the block is query q0 + r % n of its head.
// With dropout (thr > 0) P is written as dropped and rescaled: P[j] keep_j / (1 - p).
extern "C" __global__ void attn_softmax_fwd(const float* __restrict__ S, OUT_T* __restrict__ P,
        float* __restrict__ lse, int n, int L, int T, int q0, int off, int causal, float scale,
        unsigned long long seed, const unsigned long long* seed_ptr, unsigned int thr, float inv_keep) {
    if (seed_ptr) seed = *seed_ptr;  // a captured step's seed slot (graph.py)
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

// P = exp(s * scale - lse) (0 where masked) and dS = P * (dP - D) * scale, D = rowsum(dO * O).
// With dropout, Pd = P keep / (1 - p) is written for dV = Pd^T dO, and dP = dPd keep / (1 - p).
// Rows along grid.y, columns along grid.x (no per-element integer division).
extern "C" __global__ void attn_softmax_bwd(const float* __restrict__ S, const float* __restrict__ dP,
        const float* __restrict__ lse, const float* __restrict__ Drow, OUT_T* __restrict__ P,
        OUT_T* __restrict__ dS, long long rows, int n, int L, int T, int q0, int off, int causal,
        float scale, unsigned long long seed, const unsigned long long* seed_ptr, unsigned int thr, float inv_keep) {
    if (seed_ptr) seed = *seed_ptr;  // a captured step's seed slot (graph.py)
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

// The backward's preamble in one pass (flash and blockwise alike): for each row r = (b, h, t)
// of the upstream gradient g (B, H, T, D) and the forward's output y, both read through their
// strides (last axis contiguous; usually transposed views of (B, T, H*D) arrays),
// drow[r] = g_r . y_r, and, unless gl is null, gl = g in OUT_T, contiguous (B, H, T, D).
// IN_T, Y_T: the dtypes of g and y. Reference: kernels.attention_backward's (g * y).sum(-1)
// and g.astype(OUT_T). One warp per row.
extern "C" __global__ void attn_bwd_prep(const IN_T* __restrict__ g, const Y_T* __restrict__ y,
        OUT_T* __restrict__ gl, float* __restrict__ drow, long long rows, int H, int T, int D,
        long long sb, long long sh, long long st, long long yb, long long yh, long long yt) {
    int lane = threadIdx.x & 31;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long r = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5; r < rows; r += nwarps) {
        long long t = r % T, bh = r / T, b = bh / H, h = bh % H;
        const IN_T* gr = g + b * sb + h * sh + t * st;
        const Y_T* yr = y + b * yb + h * yh + t * yt;
        float s = 0.f;
        for (int d = lane; d < D; d += 32) {
            float v = to_f(gr[d]);
            s += v * to_f(yr[d]);
            if (gl) put(gl + r * D + d, v);
        }
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        if (lane == 0) drow[r] = s;
    }
}

// The same preamble with 16-byte loads, for D / 8 a power of two up to 32 and rows of g, y
// (and gl) starting on 16 bytes (kernels._attention_bwd_prep checks): D / 8 lanes a row, each
// lane 8 elements, the row's sum over those lanes with shuffles; a warp takes 256 / D rows.
extern "C" __global__ void attn_bwd_prep8(const IN_T* __restrict__ g, const Y_T* __restrict__ y,
        OUT_T* __restrict__ gl, float* __restrict__ drow, long long rows, int H, int T, int D,
        long long sb, long long sh, long long st, long long yb, long long yh, long long yt) {
    int per_row = D / 8, lane = threadIdx.x & 31, sub = lane % per_row, rows_per_warp = 32 / per_row;
    long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long r0 = warp * rows_per_warp; r0 < rows; r0 += nwarps * rows_per_warp) {
        long long r = r0 + lane / per_row;  // the loop is the warp's: every lane shuffles
        float s = 0.f;
        if (r < rows) {
            long long t = r % T, bh = r / T, b = bh / H, h = bh % H;
            float v[8], w[8];
            load8(g + b * sb + h * sh + t * st + sub * 8, v);
            load8(y + b * yb + h * yh + t * yt + sub * 8, w);
            #pragma unroll
            for (int k = 0; k < 8; ++k) s += v[k] * w[k];
            if (gl) store8(gl + r * D + sub * 8, v);
        }
        for (int o = per_row / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        if (r < rows && sub == 0) drow[r] = s;
    }
}
