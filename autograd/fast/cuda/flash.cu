// FlashAttention-2 on tensor cores for bfloat16/float16 q, k, v (kernels.flash_attention_*).
// ELEM, HEAD_DIM, MMA_T and PACK2_BODY are filled in per dtype and head size; OUT_T is the
// dtype of the results (O, dQ, dK, dV): float, or ELEM itself.
// Reference: autograd/ops/attention.py (Attention).
// Every (B, H, T, D) operand and result is addressed through its batch, head and row strides
// (in elements; D contiguous), so the model's q, k, v can be read, and y, dq, dk, dv written,
// in the (B, T, H, D) order of the products around attention: no transposing copies.
typedef unsigned int u32;
typedef ELEM elem;
typedef OUT_T out_t;
constexpr int D = HEAD_DIM;       // head size, a multiple of 16, at most 64
constexpr int TILE = 64;          // queries or keys per block (4 warps x 16)
constexpr int THREADS = 128;
constexpr int LD = D + 8;         // padded tile row: 16-byte aligned, ldmatrix conflict-free
constexpr int KD = D / 16, ND = D / 8, KT = TILE / 16, NT = TILE / 8;
constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ u32 pack2(float lo, float hi) {
    PACK2_BODY
}
__device__ __forceinline__ u32 ld2(const elem* p) { return *reinterpret_cast<const u32*>(p); }
__device__ __forceinline__ u32 smem(const void* p) {  // a shared-memory address for PTX
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void mma(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.MMA_T.MMA_T.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldsm4(u32* r, const elem* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem(p)));
}
__device__ __forceinline__ void ldsm4t(u32* r, const elem* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem(p)));
}
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffff, x, 1);
    return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// Start copying rows [r0, r0 + TILE) of a (n, D) matrix with row stride ld into tile[TILE][LD], 16 bytes per
// cp.async; rows past n are zero-filled. commit() closes the group, wait<N>() waits until at
// most N groups are in flight.
__device__ __forceinline__ void load_tile(const elem* src, int r0, int n, long long ld, elem* tile) {
    constexpr int CH = D / 8;  // 16-byte chunks per row
    #pragma unroll
    for (int i = 0; i < TILE * CH / THREADS; ++i) {
        int c = i * THREADS + threadIdx.x, row = c / CH, col = (c % CH) * 8;
        bool in = r0 + row < n;
        const elem* s = src + (long long)(in ? r0 + row : 0) * ld + col;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                     :: "r"(smem(tile + row * LD + col)), "l"(s), "r"(in ? 16 : 0));
    }
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

// In a loop over key tiles k0 = 0, TILE, .. < kend whose tile k0 was staged into buffer buf:
// start copying tile k0 + TILE into the other buffer, then wait until tile k0 has arrived.
__device__ __forceinline__ void kv_tiles_ready(const elem* k, const elem* v, int k0, int kend, int S,
                                               long long kt, long long vt,
                                               elem (*sK)[TILE * LD], elem (*sV)[TILE * LD], int buf) {
    if (k0 + TILE < kend) {
        load_tile(k, k0 + TILE, S, kt, sK[buf ^ 1]);
        load_tile(v, k0 + TILE, S, vt, sV[buf ^ 1]);
        commit();
        wait<1>();
    } else {
        wait<0>();
    }
    __syncthreads();
}

// A fragments (16 rows x D) of rows r, r + 8 of a (n, D) matrix in global memory, row stride ld.
__device__ __forceinline__ void load_a(const elem* src, int r, int n, long long ld, int t, u32 (*a)[4]) {
    #pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
        int c = kk * 16 + 2 * t;
        bool in0 = r < n, in1 = r + 8 < n;
        a[kk][0] = in0 ? ld2(src + (long long)r * ld + c) : 0u;
        a[kk][1] = in1 ? ld2(src + (long long)(r + 8) * ld + c) : 0u;
        a[kk][2] = in0 ? ld2(src + (long long)r * ld + c + 8) : 0u;
        a[kk][3] = in1 ? ld2(src + (long long)(r + 8) * ld + c + 8) : 0u;
    }
}

// acc[NT][4] = X Y^T: X this warp's 16 x D rows (A fragments), Y a [TILE][LD] tile.
__device__ __forceinline__ void mm_tile(float (*acc)[4], u32 (*a)[4], const elem* sy, int lane) {
    #pragma unroll
    for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    #pragma unroll
    for (int n = 0; n < NT; n += 2) {
        #pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            u32 b[4];  // b0, b1 of key columns n and n + 1
            ldsm4(b, sy + ((n + (lane >> 4)) * 8 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
            mma(acc[n], a[kk], b[0], b[1]);
            mma(acc[n + 1], a[kk], b[2], b[3]);
        }
    }
}

// acc[ND][4] += P Y: P 16 x TILE held as C fragments p[NT][4], Y a [TILE][LD] tile ([k][n]).
__device__ __forceinline__ void mm_acc(float (*acc)[4], float (*p)[4], const elem* sy, int lane) {
    #pragma unroll
    for (int kc = 0; kc < KT; ++kc) {
        u32 a[4] = {pack2(p[2 * kc][0], p[2 * kc][1]), pack2(p[2 * kc][2], p[2 * kc][3]),
                    pack2(p[2 * kc + 1][0], p[2 * kc + 1][1]), pack2(p[2 * kc + 1][2], p[2 * kc + 1][3])};
        #pragma unroll
        for (int nd = 0; nd < ND; nd += 2) {
            u32 b[4];  // b0, b1 of output columns nd and nd + 1, transposed on load
            ldsm4t(b, sy + (kc * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (nd + (lane >> 4)) * 8);
            mma(acc[nd], a, b[0], b[1]);
            mma(acc[nd + 1], a, b[2], b[3]);
        }
    }
}

// Two adjacent results, rounded to nearest even when out_t is 16-bit (as kernels.cast rounds).
__device__ __forceinline__ void store2(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
__device__ __forceinline__ void store2(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ void store2(__half* p, float a, float b) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}

// Store rows r, r + 8 (those < n) of a 16 x D float block held as C fragments, times s0, s1,
// into a matrix of row stride ld.
__device__ __forceinline__ void store_rows(out_t* dst, float (*acc)[4], int r, int n, long long ld,
                                           int t, float s0, float s1) {
    #pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
        int c = nd * 8 + 2 * t;
        if (r < n) store2(dst + (long long)r * ld + c, acc[nd][0] * s0, acc[nd][1] * s0);
        if (r + 8 < n) store2(dst + (long long)(r + 8) * ld + c, acc[nd][2] * s1, acc[nd][3] * s1);
    }
}

// Forward. grid (ceil(T / TILE), B * Hq). Query i of T sits at position i + S - T and, causal,
// sees the keys j <= i + S - T. O (B, Hq, T, D) in out_t; lse (B*Hq, T) = log sum_j exp(s_ij).
// The strides: q*, k*, v*, o* (batch, head, row) of Q, K, V, O.
extern "C" __global__ void __launch_bounds__(THREADS) flash_fwd(
        const elem* __restrict__ Q, const elem* __restrict__ K, const elem* __restrict__ V,
        out_t* __restrict__ O, float* __restrict__ lse, int Hq, int G, int T, int S, int causal,
        float scale, unsigned long long seed, const unsigned long long* seed_ptr, u32 thr, float inv_keep,
        long long qb, long long qh, long long qt, long long kb, long long kh, long long kt,
        long long vb, long long vh, long long vt, long long ob, long long oh, long long ot) {
    if (seed_ptr) seed = *seed_ptr;  // a captured step's seed slot (graph.py)
    __shared__ __align__(16) elem sK[2][TILE * LD];
    __shared__ __align__(16) elem sV[2][TILE * LD];
    int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, hk = h / G;
    const elem* k = K + b * kb + hk * kh;
    const elem* v = V + b * vb + hk * vh;
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int q0 = blockIdx.x * TILE, r = q0 + (threadIdx.x >> 5) * 16 + g, off = S - T;
    int kend = causal ? min(S, q0 + TILE + off) : S;
    load_tile(k, 0, S, kt, sK[0]);  // the first key tile; the loop stages each next one
    load_tile(v, 0, S, vt, sV[0]);
    commit();
    u32 qa[KD][4];
    load_a(Q + b * qb + h * qh, r, T, qt, t, qa);
    float o[ND][4];
    #pragma unroll
    for (int nd = 0; nd < ND; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // running max (log2 units), sum
    float sl = scale * LOG2E;
    for (int k0 = 0, buf = 0; k0 < kend; k0 += TILE, buf ^= 1) {
        kv_tiles_ready(k, v, k0, kend, S, kt, vt, sK, sV, buf);
        float s[NT][4];
        mm_tile(s, qa, sK[buf], lane);
        bool edge = k0 + TILE > S || (causal && k0 + TILE - 1 > q0 + off);  // a tile with masked keys
        float mx0 = m0, mx1 = m1;
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                int j = k0 + n * 8 + 2 * t + (e & 1), i = r + (e >> 1) * 8;
                s[n][e] = (edge && (j >= S || (causal && j > i + off))) ? -INFINITY : s[n][e] * sl;
            }
            mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
            mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
        }
        mx0 = quad_max(mx0);
        mx1 = quad_max(mx1);
        float c0 = exp2f(m0 - mx0), c1 = exp2f(m1 - mx1);  // key 0 is always visible: mx finite
        m0 = mx0;
        m1 = mx1;
        float p0 = 0.f, p1 = 0.f;
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            s[n][0] = exp2f(s[n][0] - m0); s[n][1] = exp2f(s[n][1] - m0);
            s[n][2] = exp2f(s[n][2] - m1); s[n][3] = exp2f(s[n][3] - m1);
            p0 += s[n][0] + s[n][1];
            p1 += s[n][2] + s[n][3];
        }
        l0 = l0 * c0 + p0;  // this thread's share of the row sum; the quad adds them at the end
        l1 = l1 * c1 + p1;
        if (thr) {  // dropout acts on P after the softmax's sums: P V becomes Pd V
            #pragma unroll
            for (int n = 0; n < NT; ++n)
                #pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (!dropout_keep(seed, bh, r + (e >> 1) * 8, k0 + n * 8 + 2 * t + (e & 1), T, S, thr)) s[n][e] = 0.f;
                    else s[n][e] *= inv_keep;
        }
        #pragma unroll
        for (int nd = 0; nd < ND; ++nd) { o[nd][0] *= c0; o[nd][1] *= c0; o[nd][2] *= c1; o[nd][3] *= c1; }
        mm_acc(o, s, sV[buf], lane);
        __syncthreads();  // everyone is done with buf before it is loaded again
    }
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    store_rows(O + b * ob + h * oh, o, r, T, ot, t, 1.f / l0, 1.f / l1);
    if (t == 0) {
        const float LN2 = 0.6931471805599453f;
        if (r < T) lse[(long long)bh * T + r] = (m0 + log2f(l0)) * LN2;
        if (r + 8 < T) lse[(long long)bh * T + r + 8] = (m1 + log2f(l1)) * LN2;
    }
}

// dK, dV. grid (ceil(S / TILE), B * Hkv). For the G query heads of this kv head and every query
// tile that sees these keys: S^T = K Q^T, P^T = exp(S^T scale - lse), dP^T = V dO^T,
// dS^T = P^T (dP^T - Drow) scale; dV += P^T dO, dK += dS^T Q.
// The strides: those of Q, K, V, dO, dK, dV (batch, head, row).
extern "C" __global__ void __launch_bounds__(THREADS) flash_bwd_kv(
        const elem* __restrict__ Q, const elem* __restrict__ K, const elem* __restrict__ V,
        const elem* __restrict__ dO, const float* __restrict__ lse, const float* __restrict__ Drow,
        out_t* __restrict__ dK, out_t* __restrict__ dV, int Hq, int G, int T, int S, int causal,
        float scale, unsigned long long seed, const unsigned long long* seed_ptr, u32 thr, float inv_keep,
        long long qb, long long qh, long long qt, long long kb, long long kh, long long kt,
        long long vb, long long vh, long long vt, long long gb, long long gh, long long gt,
        long long dkb, long long dkh, long long dkt, long long dvb, long long dvh, long long dvt) {
    if (seed_ptr) seed = *seed_ptr;  // a captured step's seed slot (graph.py)
    __shared__ __align__(16) elem sQ[2][TILE * LD];
    __shared__ __align__(16) elem sG[2][TILE * LD];
    __shared__ float sL[2][TILE], sD[2][TILE];
    int bkv = blockIdx.y, Hkv = Hq / G, b = bkv / Hkv, hk = bkv % Hkv;
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int k0 = blockIdx.x * TILE, r = k0 + (threadIdx.x >> 5) * 16 + g, off = S - T;
    int qstart = causal ? max(0, k0 - off) / TILE * TILE : 0;
    int nq = (T - qstart + TILE - 1) / TILE, steps = G * nq;  // (query head, query tile) pairs
    // stage step s into buffer buf: its q, dO tiles (cp.async) and its lse, Drow rows
    auto stage = [&](int s, int buf) {
        int hq = hk * G + s / nq;
        long long bh = (long long)b * Hq + hq;
        int q0 = qstart + (s % nq) * TILE;
        load_tile(Q + b * qb + hq * qh, q0, T, qt, sQ[buf]);
        load_tile(dO + b * gb + hq * gh, q0, T, gt, sG[buf]);
        commit();
        for (int i = threadIdx.x; i < TILE; i += THREADS) {
            bool in = q0 + i < T;
            sL[buf][i] = in ? lse[bh * T + q0 + i] * LOG2E : INFINITY;  // rows past T: P = 0
            sD[buf][i] = in ? Drow[bh * T + q0 + i] : 0.f;
        }
    };
    if (steps > 0) stage(0, 0);
    u32 ka[KD][4], va[KD][4];
    load_a(K + b * kb + hk * kh, r, S, kt, t, ka);
    load_a(V + b * vb + hk * vh, r, S, vt, t, va);
    float dk[ND][4], dv[ND][4];
    #pragma unroll
    for (int nd = 0; nd < ND; ++nd)
        #pragma unroll
        for (int e = 0; e < 4; ++e) dk[nd][e] = dv[nd][e] = 0.f;
    float sl = scale * LOG2E;
    for (int s = 0, buf = 0; s < steps; ++s, buf ^= 1) {
        if (s + 1 < steps) {
            stage(s + 1, buf ^ 1);
            wait<1>();
        } else {
            wait<0>();
        }
        __syncthreads();
        int q0 = qstart + (s % nq) * TILE;
        long long bh = (long long)b * Hq + hk * G + s / nq;
        float p[NT][4], ds[NT][4];
        mm_tile(p, ka, sQ[buf], lane);   // S^T: keys x queries
        mm_tile(ds, va, sG[buf], lane);  // dP^T
        bool edge = causal && k0 + TILE - 1 > q0 + off;  // a tile with masked (key, query) pairs
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                int ci = n * 8 + 2 * t + (e & 1), j = r + (e >> 1) * 8;
                bool masked = edge && j > q0 + ci + off;
                float pv = masked ? 0.f : exp2f(p[n][e] * sl - sL[buf][ci]), dp = ds[n][e];
                p[n][e] = pv;
                if (thr) {  // dV = Pd^T dO, dP = dPd keep / (1 - p)
                    bool kept = dropout_keep(seed, bh, q0 + ci, j, T, S, thr);
                    p[n][e] = kept ? pv * inv_keep : 0.f;
                    dp = kept ? dp * inv_keep : 0.f;
                }
                ds[n][e] = pv * (dp - sD[buf][ci]) * scale;
            }
        }
        mm_acc(dv, p, sG[buf], lane);
        mm_acc(dk, ds, sQ[buf], lane);
        __syncthreads();
    }
    store_rows(dK + b * dkb + hk * dkh, dk, r, S, dkt, t, 1.f, 1.f);
    store_rows(dV + b * dvb + hk * dvh, dv, r, S, dvt, t, 1.f, 1.f);
}

// dQ. grid (ceil(T / TILE), B * Hq). Over the key tiles this query tile sees: S = Q K^T,
// P = exp(S scale - lse), dP = dO V^T, dS = P (dP - Drow) scale; dQ += dS K.
// The strides: those of Q, K, V, dO, dQ (batch, head, row).
extern "C" __global__ void __launch_bounds__(THREADS) flash_bwd_q(
        const elem* __restrict__ Q, const elem* __restrict__ K, const elem* __restrict__ V,
        const elem* __restrict__ dO, const float* __restrict__ lse, const float* __restrict__ Drow,
        out_t* __restrict__ dQ, int Hq, int G, int T, int S, int causal, float scale,
        unsigned long long seed, const unsigned long long* seed_ptr, u32 thr, float inv_keep,
        long long qb, long long qh, long long qt, long long kb, long long kh, long long kt,
        long long vb, long long vh, long long vt, long long gb, long long gh, long long gt,
        long long dqb, long long dqh, long long dqt) {
    if (seed_ptr) seed = *seed_ptr;  // a captured step's seed slot (graph.py)
    __shared__ __align__(16) elem sK[2][TILE * LD];
    __shared__ __align__(16) elem sV[2][TILE * LD];
    int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, hk = h / G;
    const elem* k = K + b * kb + hk * kh;
    const elem* v = V + b * vb + hk * vh;
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int q0 = blockIdx.x * TILE, r = q0 + (threadIdx.x >> 5) * 16 + g, off = S - T;
    int kend = causal ? min(S, q0 + TILE + off) : S;
    load_tile(k, 0, S, kt, sK[0]);  // the first key tile; the loop stages each next one
    load_tile(v, 0, S, vt, sV[0]);
    commit();
    u32 qa[KD][4], ga[KD][4];
    load_a(Q + b * qb + h * qh, r, T, qt, t, qa);
    load_a(dO + b * gb + h * gh, r, T, gt, t, ga);
    float sl = scale * LOG2E;
    float L0 = r < T ? lse[(long long)bh * T + r] * LOG2E : 0.f;
    float L1 = r + 8 < T ? lse[(long long)bh * T + r + 8] * LOG2E : 0.f;
    float D0 = r < T ? Drow[(long long)bh * T + r] : 0.f;
    float D1 = r + 8 < T ? Drow[(long long)bh * T + r + 8] : 0.f;
    float dq[ND][4];
    #pragma unroll
    for (int nd = 0; nd < ND; ++nd) dq[nd][0] = dq[nd][1] = dq[nd][2] = dq[nd][3] = 0.f;
    for (int k0 = 0, buf = 0; k0 < kend; k0 += TILE, buf ^= 1) {
        kv_tiles_ready(k, v, k0, kend, S, kt, vt, sK, sV, buf);
        float p[NT][4], ds[NT][4];
        mm_tile(p, qa, sK[buf], lane);
        mm_tile(ds, ga, sV[buf], lane);
        bool edge = k0 + TILE > S || (causal && k0 + TILE - 1 > q0 + off);
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                int j = k0 + n * 8 + 2 * t + (e & 1), i = r + (e >> 1) * 8;
                bool hi = e >> 1;
                bool masked = edge && (j >= S || (causal && j > i + off));
                float pv = masked ? 0.f : exp2f(p[n][e] * sl - (hi ? L1 : L0)), dp = ds[n][e];
                if (thr) dp = dropout_keep(seed, bh, i, j, T, S, thr) ? dp * inv_keep : 0.f;
                ds[n][e] = pv * (dp - (hi ? D1 : D0)) * scale;
            }
        }
        mm_acc(dq, ds, sK[buf], lane);
        __syncthreads();
    }
    store_rows(dQ + b * dqb + h * dqh, dq, r, T, dqt, t, 1.f, 1.f);
}
