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
//   dx = rstd (gh - [center] mean(gh) - xhat mean(gh xhat)) (+ R, the rest of x's gradient,
//   when given: Function.takes_addends); dw += g xhat; db += g.
// Each block sums its rows' dw, db in shared memory, then adds them to global memory once.
extern "C" __global__ void norm_bwd(const float* __restrict__ G, const float* __restrict__ X,
        const float* __restrict__ w, const float* __restrict__ mean, const float* __restrict__ rstd,
        const float* __restrict__ R, float* __restrict__ dX, float* __restrict__ dw,
        float* __restrict__ db, long long rows, int d, int center) {
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
            dX[r * d + j] = rs * (gh - m1 - xh * m2) + (R ? R[r * d + j] : 0.f);
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        if (dw) atomicAdd(dw + j, acc[j]);
        if (db) atomicAdd(db + j, acc[d + j]);
    }
}

// The same two kernels a warp per row, for d a multiple of 4 of at most 128 NORM_VEC: the warp
// holds its row in registers, NORM_VEC float4 a lane (lane l has the columns 4 (32 k + l) .. +3),
// reads it once with 16-byte loads, and reduces with shuffles (no block barriers per row).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ __forceinline__ float4 f4(float v) { return make_float4(v, v, v, v); }
__device__ __forceinline__ float sum4(float4 a) { return a.x + a.y + a.z + a.w; }
__device__ __forceinline__ float4 mul4(float4 a, float4 b) { return make_float4(a.x * b.x, a.y * b.y, a.z * b.z, a.w * b.w); }
__device__ __forceinline__ float4 add4(float4 a, float4 b) { return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); }
__device__ __forceinline__ float4 sub4(float4 a, float4 b) { return make_float4(a.x - b.x, a.y - b.y, a.z - b.z, a.w - b.w); }

// YL, when not null: y rounded to LOW_T as well (the copy the products after the norm read
// under a low-precision mode, written here instead of by a cast that reads y again).
extern "C" __global__ void norm_fwd_warp(const float* __restrict__ X, const float* __restrict__ w,
        const float* __restrict__ b, float* __restrict__ Y, float* __restrict__ mean_out,
        float* __restrict__ rstd_out, long long rows, int d, float eps, int center,
        LOW_T* __restrict__ YL) {
    int lane = threadIdx.x & 31, n4 = d / 4;
    long long r = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;
    const float4* x = reinterpret_cast<const float4*>(X + r * d);
    float4 v[NORM_VEC];
    float s = 0.f;
    #pragma unroll
    for (int k = 0; k < NORM_VEC; ++k) {
        int c = k * 32 + lane;
        v[k] = c < n4 ? x[c] : f4(0.f);
        s += sum4(v[k]);
    }
    float mu = center ? warp_sum(s) / d : 0.f, ss = 0.f;
    #pragma unroll
    for (int k = 0; k < NORM_VEC; ++k) {
        if (k * 32 + lane < n4) { v[k] = sub4(v[k], f4(mu)); ss += sum4(mul4(v[k], v[k])); }
    }
    float rstd = rsqrtf(warp_sum(ss) / d + eps);
    float4* y = reinterpret_cast<float4*>(Y + r * d);
    #pragma unroll
    for (int k = 0; k < NORM_VEC; ++k) {
        int c = k * 32 + lane;
        if (c >= n4) continue;
        float4 o = mul4(v[k], f4(rstd));
        if (w) o = mul4(o, reinterpret_cast<const float4*>(w)[c]);
        if (b) o = add4(o, reinterpret_cast<const float4*>(b)[c]);
        y[c] = o;
        if (YL) {
            LOW_T* yl = YL + r * d + 4 * c;
            put(yl, o.x); put(yl + 1, o.y); put(yl + 2, o.z); put(yl + 3, o.w);
        }
    }
    if (lane == 0) { mean_out[r] = mu; rstd_out[r] = rstd; }
}

// Rows grid-strided over the warps; each lane sums dw (and db when NORM_DB is 1) of its
// columns over its rows in registers, then the block's warps add theirs in shared memory and
// the block adds the total to dw, db once (atomically: other blocks add theirs).
extern "C" __global__ void norm_bwd_warp(const float* __restrict__ G, const float* __restrict__ X,
        const float* __restrict__ w, const float* __restrict__ mean, const float* __restrict__ rstd,
        const float* __restrict__ R, float* __restrict__ dX, float* __restrict__ dw,
        float* __restrict__ db, long long rows, int d, int center) {
    extern __shared__ float acc[];  // the block's dw [d], then db [d]
    for (int j = threadIdx.x; j < 2 * d; j += blockDim.x) acc[j] = 0.f;
    __syncthreads();
    int lane = threadIdx.x & 31, n4 = d / 4, warps = blockDim.x >> 5;
    float4 aw[NORM_VEC], ab[NORM_VEC];  // ab only with NORM_DB (a bias to differentiate)
    #pragma unroll
    for (int k = 0; k < NORM_VEC; ++k) aw[k] = ab[k] = f4(0.f);
    for (long long r = blockIdx.x * (long long)warps + (threadIdx.x >> 5); r < rows;
         r += (long long)gridDim.x * warps) {
        const float4* g = reinterpret_cast<const float4*>(G + r * d);
        const float4* x = reinterpret_cast<const float4*>(X + r * d);
        float mu = mean[r], rs = rstd[r], s1 = 0.f, s2 = 0.f;
        float4 gh[NORM_VEC], xh[NORM_VEC], rv[NORM_VEC];  // rv: R's row, loaded with g's and x's
        #pragma unroll
        for (int k = 0; k < NORM_VEC; ++k) {
            int c = k * 32 + lane;
            if (c >= n4) { gh[k] = xh[k] = rv[k] = f4(0.f); continue; }
            float4 gv = g[c];
            rv[k] = R ? reinterpret_cast<const float4*>(R + r * d)[c] : f4(0.f);
            xh[k] = mul4(sub4(x[c], f4(mu)), f4(rs));
            aw[k] = add4(aw[k], mul4(gv, xh[k]));
            if (NORM_DB) ab[k] = add4(ab[k], gv);
            gh[k] = w ? mul4(gv, reinterpret_cast<const float4*>(w)[c]) : gv;
            s1 += sum4(gh[k]);
            s2 += sum4(mul4(gh[k], xh[k]));
        }
        float m1 = center ? warp_sum(s1) / d : 0.f, m2 = warp_sum(s2) / d;
        float4* dx = reinterpret_cast<float4*>(dX + r * d);
        #pragma unroll
        for (int k = 0; k < NORM_VEC; ++k) {
            int c = k * 32 + lane;
            if (c >= n4) continue;
            dx[c] = add4(mul4(f4(rs), sub4(sub4(gh[k], f4(m1)), mul4(xh[k], f4(m2)))), rv[k]);
        }
    }
    #pragma unroll
    for (int k = 0; k < NORM_VEC; ++k) {
        int c = 4 * (k * 32 + lane);
        if (c >= d) continue;
        atomicAdd(acc + c, aw[k].x); atomicAdd(acc + c + 1, aw[k].y);
        atomicAdd(acc + c + 2, aw[k].z); atomicAdd(acc + c + 3, aw[k].w);
        if (NORM_DB) {
            atomicAdd(acc + d + c, ab[k].x); atomicAdd(acc + d + c + 1, ab[k].y);
            atomicAdd(acc + d + c + 2, ab[k].z); atomicAdd(acc + d + c + 3, ab[k].w);
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        if (dw) atomicAdd(dw + j, acc[j]);
        if (NORM_DB && db) atomicAdd(db + j, acc[d + j]);
    }
}
