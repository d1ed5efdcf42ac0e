// One-pass elementwise kernels on contiguous arrays of n elements. SwiGLU's read and write
// EW_T: float, or __nv_bfloat16/__half when the products before it handed on the low dtype
// (their arithmetic is float32 either way). Dropout's are float32.
// References: autograd/ops/activations.py (SwiGLU), autograd/ops/dropout.py (hash_keep).

// y = silu(a) b = a s(a) b
extern "C" __global__ void swiglu_fwd(const EW_T* __restrict__ a, const EW_T* __restrict__ b,
        EW_T* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float av = to_f(a[i]);
        float s = 1.f / (1.f + expf(-av));
        put(y + i, av * s * to_f(b[i]));
    }
}

// da = g b (s + a s (1 - s)), db = g a s
extern "C" __global__ void swiglu_bwd(const EW_T* __restrict__ g, const EW_T* __restrict__ a,
        const EW_T* __restrict__ b, EW_T* __restrict__ ga, EW_T* __restrict__ gb, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float av = to_f(a[i]), gv = to_f(g[i]);
        float s = 1.f / (1.f + expf(-av));
        put(ga + i, gv * to_f(b[i]) * s * (1.f + av * (1.f - s)));
        put(gb + i, gv * av * s);
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
