// RoPE rotation in one pass. IN_T: the dtype of x and y (float, or __nv_bfloat16/__half when
// the product before it handed on the low dtype); the cos/sin tables are float32.
// Reference: autograd/ops/rope.py (Rotate).
// x and y are (A, H, T, D) arrays read and written through their strides (in elements; the
// last axis contiguous): the model's q and k arrive as a transposed view of the (B, T, H*D)
// product, and their gradients go back in that layout, so neither needs a copy.
// One thread per pair of one row (a row = one position of one head): threadIdx.x the pair,
// rows over threadIdx.y and the grid. y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin.
extern "C" __global__ void rope_rotate(const IN_T* __restrict__ x, const float* __restrict__ c,
        const float* __restrict__ s, IN_T* __restrict__ y, long long rows, int H, int T, int D,
        long long xa, long long xh, long long xt, long long ya, long long yh, long long yt,
        int inter, float sign) {
    int h = D / 2, p = threadIdx.x;
    for (long long r = blockIdx.x * (long long)blockDim.y + threadIdx.y; r < rows;
         r += (long long)gridDim.x * blockDim.y) {
        int t = r % T;
        long long ah = r / T, a0 = ah / H, h0 = ah % H;
        long long xr = a0 * xa + h0 * xh + t * xt, yr = a0 * ya + h0 * yh + t * yt;
        int i = inter ? 2 * p : p, j = i + (inter ? 1 : h);
        float cs = c[t * h + p], sn = sign * s[t * h + p];
        float x1 = to_f(x[xr + i]), x2 = to_f(x[xr + j]);
        put(y + yr + i, x1 * cs - x2 * sn);
        put(y + yr + j, x2 * cs + x1 * sn);
    }
}

// The same rotation 8 elements a thread with 16-byte loads and stores, for D a multiple of 16
// and rows starting on 16 bytes (kernels.rope_rotate checks). Rotate-half: a thread takes
// elements p..p+7 of the first half and their partners p+h..p+h+7; interleaved: elements
// p..p+7, the pairs (p, p+1), .., (p+6, p+7). `per_row` threads cover one row.
extern "C" __global__ void rope_rotate8(const IN_T* __restrict__ x, const float* __restrict__ c,
        const float* __restrict__ s, IN_T* __restrict__ y, long long rows, int H, int T, int D,
        long long xa, long long xh, long long xt, long long ya, long long yh, long long yt,
        int inter, float sign) {
    int h = D / 2, per_row = inter ? D / 8 : h / 8;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < rows * per_row;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / per_row;
        int p = (int)(i % per_row) * 8, t = r % T;
        long long ah = r / T, a0 = ah / H, h0 = ah % H;
        const IN_T* xr = x + a0 * xa + h0 * xh + t * xt;
        IN_T* yr = y + a0 * ya + h0 * yh + t * yt;
        float x1[8], out[8];
        load8(xr + p, x1);
        if (inter) {  // pair k of the 4: (x1[2k], x1[2k+1]) at angle p/2 + k
            float4 cs = *reinterpret_cast<const float4*>(c + t * h + p / 2);
            float4 sn = *reinterpret_cast<const float4*>(s + t * h + p / 2);
            float cv[4] = {cs.x, cs.y, cs.z, cs.w}, sv[4] = {sn.x, sn.y, sn.z, sn.w};
            #pragma unroll
            for (int k = 0; k < 4; ++k) {
                float a = x1[2 * k], b = x1[2 * k + 1], sk = sign * sv[k];
                out[2 * k] = a * cv[k] - b * sk;
                out[2 * k + 1] = b * cv[k] + a * sk;
            }
            store8(yr + p, out);
        } else {
            float x2[8], out2[8], cv[8], sv[8];
            load8(xr + h + p, x2);
            load8(c + t * h + p, cv);
            load8(s + t * h + p, sv);
            #pragma unroll
            for (int k = 0; k < 8; ++k) {
                float sk = sign * sv[k];
                out[k] = x1[k] * cv[k] - x2[k] * sk;
                out2[k] = x2[k] * cv[k] + x1[k] * sk;
            }
            store8(yr + p, out);
            store8(yr + h + p, out2);
        }
    }
}
