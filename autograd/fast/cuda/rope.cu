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
