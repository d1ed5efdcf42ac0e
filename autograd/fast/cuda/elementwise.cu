// One-pass elementwise kernels on contiguous, 16-byte aligned arrays of n elements: 8
// elements a thread (16-byte loads and stores), then the last n % 8 one by one. SwiGLU's read
// and write EW_T: float, or __nv_bfloat16/__half when the products before it handed on the low
// dtype (their arithmetic is float32 either way). Dropout's, the sum's and the scale's are float32.
// References: autograd/ops/activations.py (SwiGLU), autograd/ops/dropout.py (hash_keep),
// autograd/ops/elementwise.py (Add).

#define GRID_STRIDE(i, start, end) \
    for (long long i = (start) + blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (end); \
         i += (long long)gridDim.x * blockDim.x)

// y = silu(a) b = a s(a) b
__device__ __forceinline__ float swiglu(float a, float b) {
    float s = 1.f / (1.f + expf(-a));
    return a * s * b;
}

extern "C" __global__ void swiglu_fwd(const EW_T* __restrict__ a, const EW_T* __restrict__ b,
        EW_T* __restrict__ y, long long n) {
    GRID_STRIDE(i, 0, n / 8) {
        float av[8], bv[8], yv[8];
        load8(a + 8 * i, av);
        load8(b + 8 * i, bv);
        #pragma unroll
        for (int k = 0; k < 8; ++k) yv[k] = swiglu(av[k], bv[k]);
        store8(y + 8 * i, yv);
    }
    GRID_STRIDE(i, n / 8 * 8, n) put(y + i, swiglu(to_f(a[i]), to_f(b[i])));
}

// da = g b (s + a s (1 - s)), db = g a s
__device__ __forceinline__ void swiglu_grad(float g, float a, float b, float* da, float* db) {
    float s = 1.f / (1.f + expf(-a));
    *da = g * b * s * (1.f + a * (1.f - s));
    *db = g * a * s;
}

extern "C" __global__ void swiglu_bwd(const EW_T* __restrict__ g, const EW_T* __restrict__ a,
        const EW_T* __restrict__ b, EW_T* __restrict__ ga, EW_T* __restrict__ gb, long long n) {
    GRID_STRIDE(i, 0, n / 8) {
        float gv[8], av[8], bv[8], da[8], db[8];
        load8(g + 8 * i, gv);
        load8(a + 8 * i, av);
        load8(b + 8 * i, bv);
        #pragma unroll
        for (int k = 0; k < 8; ++k) swiglu_grad(gv[k], av[k], bv[k], da + k, db + k);
        store8(ga + 8 * i, da);
        store8(gb + 8 * i, db);
    }
    GRID_STRIDE(i, n / 8 * 8, n) {
        float da, db;
        swiglu_grad(to_f(g[i]), to_f(a[i]), to_f(b[i]), &da, &db);
        put(ga + i, da);
        put(gb + i, db);
    }
}

// y = a + b (the residual stream's sums, and the engine's sums of gradient pieces)
extern "C" __global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b,
        float* __restrict__ y, long long n) {
    GRID_STRIDE(i, 0, n / 8) {
        float av[8], bv[8];
        load8(a + 8 * i, av);
        load8(b + 8 * i, bv);
        #pragma unroll
        for (int k = 0; k < 8; ++k) av[k] += bv[k];
        store8(y + 8 * i, av);
    }
    GRID_STRIDE(i, n / 8 * 8, n) y[i] = a[i] + b[i];
}

// y = a s for one number s read on the device (an upstream gradient, no host read)
extern "C" __global__ void scale_f32(const float* __restrict__ a, const float* __restrict__ s,
        float* __restrict__ y, long long n) {
    float sv = s[0];
    GRID_STRIDE(i, 0, n / 8) {
        float av[8];
        load8(a + 8 * i, av);
        #pragma unroll
        for (int k = 0; k < 8; ++k) av[k] *= sv;
        store8(y + 8 * i, av);
    }
    GRID_STRIDE(i, n / 8 * 8, n) y[i] = a[i] * sv;
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
    GRID_STRIDE(i, 0, n / 8) {
        float v[8];
        load8(x + 8 * i, v);
        #pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = hash_keep(seed, 8 * i + k, thr) ? v[k] * scale : 0.f;
        store8(y + 8 * i, v);
    }
    GRID_STRIDE(i, n / 8 * 8, n) y[i] = hash_keep(seed, i, thr) ? x[i] * scale : 0.f;
}

extern "C" __global__ void dropout_keep_mask(bool* __restrict__ keep, long long n,
        unsigned long long seed, const unsigned long long* seed_ptr, unsigned int thr) {
    if (seed_ptr) seed = *seed_ptr;  // a captured step's seed slot (graph.py)
    GRID_STRIDE(i, 0, n) keep[i] = hash_keep(seed, i, thr);
}
