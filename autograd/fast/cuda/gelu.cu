// GELU's tanh form in one pass each way, on contiguous arrays of n elements. The forward reads
// and writes GELU_T (float, or __nv_bfloat16/__half when the product before it handed on the low
// dtype); the backward reads the upstream gradient in GRAD_T and the kept input in GELU_X_T (the
// low-precision copy a low-precision mode keeps of a float32 input) and writes the gradient in
// GRAD_T. Reference: autograd/ops/activations.py (GeluTanh).

// gelu(x) = x/2 (1 + t), t = tanh(k (x + 0.044715 x^3)), k = sqrt(2/pi)
#define GELU_K 0.7978845608028654f

extern "C" __global__ void gelu_tanh_fwd(const GELU_T* __restrict__ x, GELU_T* __restrict__ y,
        long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = to_f(x[i]);
        float t = tanhf(GELU_K * (v + 0.044715f * v * v * v));
        put(y + i, 0.5f * v * (1.f + t));
    }
}

// dx = g (1/2 (1 + t) + x/2 (1 - t^2) k (1 + 3 * 0.044715 x^2)), t recomputed from x
extern "C" __global__ void gelu_tanh_bwd(const GRAD_T* __restrict__ g,
        const GELU_X_T* __restrict__ x, GRAD_T* __restrict__ gx, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = to_f(x[i]);
        float t = tanhf(GELU_K * (v + 0.044715f * v * v * v));
        put(gx + i, to_f(g[i]) * (0.5f * (1.f + t)
                                  + 0.5f * v * (1.f - t * t) * GELU_K * (1.f + 0.134145f * v * v)));
    }
}
