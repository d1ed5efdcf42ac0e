// RoPE rotation in one pass. IN_T: the dtype of x and the tables.
// Reference: autograd/ops/rope.py (Rotate).
// One thread per pair of one row (a row = one position of one head): threadIdx.x the pair,
// rows over threadIdx.y and the grid. y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin.
extern "C" __global__ void rope_rotate(const IN_T* __restrict__ x, const IN_T* __restrict__ c,
        const IN_T* __restrict__ s, IN_T* __restrict__ y, long long rows, int T, int D,
        int inter, float sign) {
    int h = D / 2, p = threadIdx.x;
    for (long long r = blockIdx.x * (long long)blockDim.y + threadIdx.y; r < rows;
         r += (long long)gridDim.x * blockDim.y) {
        int t = r % T;
        long long a = r * D + (inter ? 2 * p : p), b = a + (inter ? 1 : h);
        float cs = to_f(c[t * h + p]), sn = sign * to_f(s[t * h + p]);
        float x1 = to_f(x[a]), x2 = to_f(x[b]);
        put(y + a, x1 * cs - x2 * sn);
        put(y + b, x2 * cs + x1 * sn);
    }
}
