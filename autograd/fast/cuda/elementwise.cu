// One-pass elementwise kernels on contiguous float32 arrays of n elements.
// References: autograd/ops/activations.py (SwiGLU), autograd/ops/dropout.py (hash_keep).

// y = silu(a) b = a s(a) b
extern "C" __global__ void swiglu_fwd(const float* __restrict__ a, const float* __restrict__ b,
        float* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float s = 1.f / (1.f + expf(-a[i]));
        y[i] = a[i] * s * b[i];
    }
}

// da = g b (s + a s (1 - s)), db = g a s
extern "C" __global__ void swiglu_bwd(const float* __restrict__ g, const float* __restrict__ a,
        const float* __restrict__ b, float* __restrict__ ga, float* __restrict__ gb, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float s = 1.f / (1.f + expf(-a[i]));
        ga[i] = g[i] * b[i] * s * (1.f + a[i] * (1.f - s));
        gb[i] = g[i] * a[i] * s;
    }
}

// Dropout's keep mask: element i kept when the top 24 bits of splitmix64(seed + i) are >= thr.
__device__ __forceinline__ bool hash_keep(unsigned long long seed, long long i, unsigned int thr) {
    unsigned long long z = seed + (unsigned long long)i + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (unsigned int)(z >> 40) >= thr;
}

// y = x keep scale, the mask hashed on the fly (dropout's forward; its backward is the same on
// the upstream gradient, with the same seed): nothing but the seed is kept between them
extern "C" __global__ void dropout_apply(const float* __restrict__ x, float* __restrict__ y,
        long long n, unsigned long long seed, const unsigned long long* seed_ptr,
        unsigned int thr, float scale) {
    if (seed_ptr) seed = *seed_ptr;  // a captured step's seed slot (graph.py)
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = hash_keep(seed, i, thr) ? x[i] * scale : 0.f;
}

extern "C" __global__ void dropout_keep_mask(bool* __restrict__ keep, long long n,
        unsigned long long seed, const unsigned long long* seed_ptr, unsigned int thr) {
    if (seed_ptr) seed = *seed_ptr;  // a captured step's seed slot (graph.py)
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        keep[i] = hash_keep(seed, i, thr);
}
