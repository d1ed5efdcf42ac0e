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
// sees the norm after the replay and stops the run). Otherwise both are null.
extern "C" __global__ void multi_adamw(const unsigned long long* ptrs, const long long* size,
        const int* arr, const long long* start, int n, float lr, float wd, float b1, float b2,
        float eps, float c1, float c2, const float* hp, const float* sumsq) {
    if (sumsq && !isfinite(*sumsq)) return;
    if (hp) { lr = hp[0]; c1 = hp[1]; c2 = hp[2]; }
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
