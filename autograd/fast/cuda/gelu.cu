// GELU's tanh form in one pass each way, on contiguous, 16-byte aligned arrays of n elements
// (8 elements a thread, then the last n % 8 one by one). The forward reads and writes GELU_T
// (float, or __nv_bfloat16/__half when the product before it handed on the low dtype); the
// backward reads the upstream gradient in GRAD_T and the kept input in GELU_X_T (the
// low-precision copy a low-precision mode keeps of a float32 input) and writes the gradient in
// GRAD_T. Reference: autograd/ops/activations.py (GeluTanh).

#define GRID_STRIDE(i, start, end) \
    for (long long i = (start) + blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (end); \
         i += (long long)gridDim.x * blockDim.x)

// gelu(x) = x/2 (1 + t), t = tanh(k (x + 0.044715 x^3)), k = sqrt(2/pi)
#define GELU_K 0.7978845608028654f

__device__ __forceinline__ float gelu(float v) {
    float t = tanhf(GELU_K * (v + 0.044715f * v * v * v));
    return 0.5f * v * (1.f + t);
}

// dx = g (1/2 (1 + t) + x/2 (1 - t^2) k (1 + 3 * 0.044715 x^2)), t recomputed from x
__device__ __forceinline__ float gelu_grad(float g, float v) {
    float t = tanhf(GELU_K * (v + 0.044715f * v * v * v));
    return g * (0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * GELU_K * (1.f + 0.134145f * v * v));
}

extern "C" __global__ void gelu_tanh_fwd(const GELU_T* __restrict__ x, GELU_T* __restrict__ y,
        long long n) {
    GRID_STRIDE(i, 0, n / 8) {
        float v[8];
        load8(x + 8 * i, v);
        #pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = gelu(v[k]);
        store8(y + 8 * i, v);
    }
    GRID_STRIDE(i, n / 8 * 8, n) put(y + i, gelu(to_f(x[i])));
}

extern "C" __global__ void gelu_tanh_bwd(const GRAD_T* __restrict__ g,
        const GELU_X_T* __restrict__ x, GRAD_T* __restrict__ gx, long long n) {
    GRID_STRIDE(i, 0, n / 8) {
        float gv[8], v[8];
        load8(g + 8 * i, gv);
        load8(x + 8 * i, v);
        #pragma unroll
        for (int k = 0; k < 8; ++k) gv[k] = gelu_grad(gv[k], v[k]);
        store8(gx + 8 * i, gv);
    }
    GRID_STRIDE(i, n / 8 * 8, n) put(gx + i, gelu_grad(to_f(g[i]), to_f(x[i])));
}
