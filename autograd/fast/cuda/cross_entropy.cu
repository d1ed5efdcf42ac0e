// Cross-entropy over rows of logits. IN_T: the logits' dtype; OUT_T: the gradient's (the
// logits', or the low-precision product dtype the LM head's products multiply it in).
// Reference: autograd/ops/losses.py (ce_rows, ce_row_grads).

// One row's log-sum-exp lse = M + log sum_j exp(z_j - M) from one read of z, each thread
// keeping a running (max, sum) pair over its elements: 8 at a time (16-byte loads) when
// vec (V a multiple of 8, z 16-byte aligned), else one at a time.
__device__ __forceinline__ void ce_running(float x, float& m, float& s) {
    if (x > m) { s = s * expf(m - x) + 1.f; m = x; } else if (m != -INFINITY) { s += expf(x - m); }
}
__device__ void ce_row_lse(const IN_T* z, int V, int vec, float* M_out, float* shifted_out) {
    float m = -INFINITY, s = 0.f;
    if (vec) {
        for (int j = threadIdx.x * 8; j < V; j += blockDim.x * 8) {
            float v[8];
            load8(z + j, v);
            float mx = v[0];
            #pragma unroll
            for (int k = 1; k < 8; ++k) mx = fmaxf(mx, v[k]);
            if (mx > m) { s *= expf(m - mx); m = mx; }  // exp(-inf) = 0: s was 0 then
            if (m != -INFINITY) {
                #pragma unroll
                for (int k = 0; k < 8; ++k) s += expf(v[k] - m);
            }
        }
    } else {
        for (int j = threadIdx.x; j < V; j += blockDim.x) ce_running(to_f(z[j]), m, s);
    }
    float M = block_max(m);
    s = (m == -INFINITY) ? 0.f : s * expf(m - M);
    *M_out = M;
    *shifted_out = logf(block_sum(s));  // lse - M
}

// One block per row: lse and the loss lse - z_t (0 where t == ignore) and, when dZ is given,
// the row's gradient dz_j = (exp(z_j - lse) - [j == t]) w_r in the same kernel (the LM head's
// forward, which makes its gradient at once: LinearCrossEntropyCUDA). The second pass reads
// the row again; nothing of size V is kept between the passes.
extern "C" __global__ void ce_fwd(const IN_T* __restrict__ Z, const long long* __restrict__ t,
        float* __restrict__ lse, float* __restrict__ loss, int V, long long ignore,
        const float* __restrict__ w, OUT_T* __restrict__ dZ, int vec) {
    long long r = blockIdx.x;
    const IN_T* z = Z + r * V;
    float M, shifted;
    ce_row_lse(z, V, vec, &M, &shifted);
    long long tr = t[r];
    if (threadIdx.x == 0) {
        lse[r] = M + shifted;
        loss[r] = (tr == ignore) ? 0.f : shifted - (to_f(z[tr]) - M);  // no rounding at |z|
    }
    if (!dZ) return;
    float l = M + shifted, wr = w[r];
    OUT_T* dz = dZ + r * V;
    if (vec) {
        for (int j = threadIdx.x * 8; j < V; j += blockDim.x * 8) {
            float v[8];
            load8(z + j, v);
            #pragma unroll
            for (int k = 0; k < 8; ++k) v[k] = (expf(v[k] - l) - (j + k == tr ? 1.f : 0.f)) * wr;
            store8(dz + j, v);
        }
    } else {
        for (int j = threadIdx.x; j < V; j += blockDim.x)
            put(dz + j, (expf(to_f(z[j]) - l) - (j == tr ? 1.f : 0.f)) * wr);
    }
}

// dz_j = (exp(z_j - lse) - [j == t]) * w, w = the row's weight (0 for ignored rows).
extern "C" __global__ void ce_bwd(const IN_T* __restrict__ Z, const long long* __restrict__ t,
        const float* __restrict__ lse, const float* __restrict__ w, OUT_T* __restrict__ dZ,
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
