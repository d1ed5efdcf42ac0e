// LayerNorm (center = 1) and RMSNorm (center = 0) over the last axis, float32.
// Reference: autograd/ops/norm.py (LayerNorm, RMSNorm).
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
