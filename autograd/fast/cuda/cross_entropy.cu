// Cross-entropy over rows of logits: one pass for the loss, one for the gradient. IN_T: the
// logits' dtype; OUT_T: the gradient's (the logits', or the low-precision product dtype the
// LM head's backward multiplies it in). Reference: autograd/ops/losses.py (ce_rows, ce_row_grads).
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
