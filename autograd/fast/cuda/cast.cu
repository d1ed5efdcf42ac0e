// float32 to OUT_T (bfloat16 or float16), rounding to nearest even: what amp.low does to every
// operand of a low-precision product. Reference: CuPy's astype (a.astype(OUT_T)), which runs
// at about a third of the memory bandwidth on these conversions.

// Contiguous x and y, both 16-byte aligned: 8 elements a thread (two 16-byte loads, one
// 16-byte store), then the last n % 8 one by one.
extern "C" __global__ void cast_contiguous(const float* __restrict__ x, OUT_T* __restrict__ y,
        long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    long long n8 = n / 8;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n8; i += stride) {
        float4 a = reinterpret_cast<const float4*>(x)[2 * i];
        float4 b = reinterpret_cast<const float4*>(x)[2 * i + 1];
        __align__(16) OUT_T v[8];
        put(v + 0, a.x); put(v + 1, a.y); put(v + 2, a.z); put(v + 3, a.w);
        put(v + 4, b.x); put(v + 5, b.y); put(v + 6, b.z); put(v + 7, b.w);
        reinterpret_cast<uint4*>(y)[i] = *reinterpret_cast<const uint4*>(v);
    }
    for (long long i = n8 * 8 + blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride)
        put(y + i, x[i]);
}

// x any strided view of up to 4 axes (shape d0..d3, strides s0..s3 in elements), y contiguous
// in C order: the cast and the copy to C order in one pass (a transposed view of attention's
// heads would otherwise be cast, then copied).
extern "C" __global__ void cast_strided(const float* __restrict__ x, OUT_T* __restrict__ y,
        long long n, long long d1, long long d2, long long d3,
        long long s0, long long s1, long long s2, long long s3) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i;
        long long i3 = r % d3; r /= d3;
        long long i2 = r % d2; r /= d2;
        long long i1 = r % d1;
        long long i0 = r / d1;
        put(y + i, x[i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3]);
    }
}
