// One launch over every parameter: sum of squares (grad norm), scaling (clipping), AdamW.
// References: autograd/optim.py (grad_norm, clip_grad_norm, AdamW.step on NumPy).
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

// Clipping with the norm on the device (a captured step): sumsq holds the squared global norm
// (multi_sumsq); scale = max_norm / (norm + 1e-6) when below 1 and the norm is finite, as
// optim.clip_grad_norm decides on the host.
extern "C" __global__ void multi_clip(const unsigned long long* ptrs, const long long* size,
        const int* arr, const long long* start, const float* sumsq, float max_norm) {
    float norm = sqrtf(*sumsq);
    float scale = max_norm / (norm + 1e-6f);
    if (!isfinite(norm) || !(scale < 1.f)) return;
    int a = arr[blockIdx.x];
    long long s0 = start[blockIdx.x];
    SPAN(a, s0, size);
    float* x = (float*)ptrs[a];
    for (long long i = s0 + threadIdx.x; i < end_; i += blockDim.x) x[i] *= scale;
}

// AdamW (PyTorch's form): p *= 1 - lr wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr (m / c1) / (sqrt(v / c2) + eps), with c1, c2 the bias corrections. ptrs: p, g, m, v.
// A captured step passes hp, device memory holding (lr, c1, c2) of this step, and sumsq, the
// squared gradient norm: a non-finite norm leaves weights and moments as they were (the host
// sees the norm after the replay and stops the run). Otherwise both are null. With sumsq and
// max_norm > 0, g is first scaled as multi_clip would scale it (the same product, so the
// same bits), without writing it back: clipping costs no pass of its own.
__device__ __forceinline__ void adamw1(float& p, float g, float& m, float& v, float lr, float wd,
                                       float b1, float b2, float eps, float c1, float c2) {
    m = b1 * m + (1.f - b1) * g;
    v = b2 * v + (1.f - b2) * g * g;
    p = p * (1.f - lr * wd) - lr * (m / c1) / (sqrtf(v / c2) + eps);
}

extern "C" __global__ void multi_adamw(const unsigned long long* ptrs, const long long* size,
        const int* arr, const long long* start, int n, float lr, float wd, float b1, float b2,
        float eps, float c1, float c2, const float* hp, const float* sumsq, float max_norm) {
    if (sumsq && !isfinite(*sumsq)) return;
    if (hp) { lr = hp[0]; c1 = hp[1]; c2 = hp[2]; }
    float clip = 1.f;
    if (sumsq && max_norm > 0.f) {
        float scale = max_norm / (sqrtf(*sumsq) + 1e-6f);
        if (scale < 1.f) clip = scale;
    }
    int a = arr[blockIdx.x];
    long long s0 = start[blockIdx.x];
    SPAN(a, s0, size);
    float* p = (float*)ptrs[a];
    const float* g = (const float*)ptrs[n + a];
    float* m = (float*)ptrs[2 * n + a];
    float* v = (float*)ptrs[3 * n + a];
    long long i = s0 + threadIdx.x;
    if ((ptrs[a] | ptrs[n + a] | ptrs[2 * n + a] | ptrs[3 * n + a]) % 16 == 0) {  // 4 at a time
        for (i = s0 + 4 * threadIdx.x; i + 3 < end_; i += 4 * blockDim.x) {
            float4 pv = *reinterpret_cast<float4*>(p + i), gv = *reinterpret_cast<const float4*>(g + i);
            float4 mv = *reinterpret_cast<float4*>(m + i), vv = *reinterpret_cast<float4*>(v + i);
            if (clip != 1.f) { gv.x *= clip; gv.y *= clip; gv.z *= clip; gv.w *= clip; }
            adamw1(pv.x, gv.x, mv.x, vv.x, lr, wd, b1, b2, eps, c1, c2);
            adamw1(pv.y, gv.y, mv.y, vv.y, lr, wd, b1, b2, eps, c1, c2);
            adamw1(pv.z, gv.z, mv.z, vv.z, lr, wd, b1, b2, eps, c1, c2);
            adamw1(pv.w, gv.w, mv.w, vv.w, lr, wd, b1, b2, eps, c1, c2);
            *reinterpret_cast<float4*>(p + i) = pv;
            *reinterpret_cast<float4*>(m + i) = mv;
            *reinterpret_cast<float4*>(v + i) = vv;
        }
        if (i >= end_) return;  // else this thread has the last 1-3 elements, one at a time
        for (; i < end_; ++i) {
            float gi = clip != 1.f ? g[i] * clip : g[i];
            adamw1(p[i], gi, m[i], v[i], lr, wd, b1, b2, eps, c1, c2);
        }
        return;
    }
    for (; i < end_; i += blockDim.x) {
        float gi = clip != 1.f ? g[i] * clip : g[i];
        adamw1(p[i], gi, m[i], v[i], lr, wd, b1, b2, eps, c1, c2);
    }
}
