// Causal attention without the probability matrix (FlashAttention's memory scheme): q is
// (B, H, Tq, D), already scaled; k, v are (B, Hkv, Tk = past + Tq, D) with H a multiple of Hkv
// (grouped-query heads read their shared head in place). A query sees key j when j ≤ past + i,
// the key is not padding (key_valid) and, with segments, j is a current token of its document.
// Keys are processed in tiles of blockDim.x: one thread per key computes its score, then one
// thread per output column reduces the tile. Only O and nothing T × T are kept; backward
// recomputes the scores — per query row for dq (with each row's log-sum-exp and Σ dO·O, stored
// for the next pass), then per key row for dk and dv, so no atomics are needed.

#define MAX_COLS 4  // columns per thread: D ≤ 4 · blockDim.x

struct Mask {
    const unsigned char *key_valid;  // (B × Tk) or null
    const unsigned int *segments;    // (B × Tq) or null
    int past, tq, tk;
};

__device__ __forceinline__ bool visible(const Mask &m, int b, int i, int j) {
    if (j > m.past + i) return false;
    if (m.key_valid && m.key_valid[(u64)b * m.tk + j] == 0) return false;
    if (m.segments) {
        if (j < m.past) return false;
        const unsigned int *seg = m.segments + (u64)b * m.tq;
        if (seg[j - m.past] != seg[i]) return false;
    }
    return true;
}

template <typename T>
__device__ float dot_row(const float *a, const T *b, int d) {
    float s = 0.0f;
    for (int c = 0; c < d; ++c) s += a[c] * to_f32(b[c]);
    return s;
}

// log Σ_j e^(q·k_j) over the visible keys of query i (+∞ when none is visible), q in shared memory.
// Keys past this one are never visible to query i.
__device__ __forceinline__ int key_end(const Mask &m, int i) { return min(m.tk, m.past + i + 1); }

template <typename T>
__device__ float row_lse(const float *q, const T *k, const Mask &m, int b, int i, int d) {
    float mx = neg_inf(), l = 0.0f;
    for (int j = threadIdx.x; j < key_end(m, i); j += blockDim.x) {
        if (!visible(m, b, i, j)) continue;
        const float s = dot_row(q, k + (u64)j * d, d);
        if (s > mx) {
            l = l * expf(mx - s) + 1.0f;
            mx = s;
        } else {
            l += expf(s - mx);
        }
    }
    const float all = block_max(mx);
    if (all == neg_inf()) return -neg_inf();
    l = mx == neg_inf() ? 0.0f : l * expf(mx - all);
    return all + logf(block_sum(l));
}

template <typename T>
__device__ void load_row(float *dst, const T *src, int d) {
    for (int c = threadIdx.x; c < d; c += blockDim.x) dst[c] = to_f32(src[c]);
}

// grid (Tq, B·H): O row i and its log-sum-exp. Shared: q (D) and one tile of P (blockDim.x).
template <typename T>
__device__ void attn_fwd(const T *q, const T *k, const T *v, T *o, float *lse, Mask m, int heads,
                         int rep, int d) {
    extern __shared__ float sh[];
    float *qs = sh, *p = sh + d;
    const int i = blockIdx.x, bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const u64 kv = ((u64)b * (heads / rep) + h / rep) * m.tk * d;
    const u64 row = ((u64)bh * m.tq + i) * d;
    load_row(qs, q + row, d);
    __syncthreads();
    const float l = row_lse(qs, k + kv, m, b, i, d);
    float acc[MAX_COLS] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int end = key_end(m, i);
    for (int j0 = 0; j0 < end; j0 += blockDim.x) {
        const int j = j0 + threadIdx.x;
        __syncthreads();
        p[threadIdx.x] = (j < end && visible(m, b, i, j)) ? expf(dot_row(qs, k + kv + (u64)j * d, d) - l) : 0.0f;
        __syncthreads();
        const int n = min((int)blockDim.x, end - j0);
        for (int t = 0; t < MAX_COLS; ++t) {
            const int c = threadIdx.x + t * blockDim.x;
            if (c >= d) break;
            for (int jj = 0; jj < n; ++jj) acc[t] += p[jj] * to_f32(v[kv + (u64)(j0 + jj) * d + c]);
        }
    }
    for (int t = 0; t < MAX_COLS; ++t) {
        const int c = threadIdx.x + t * blockDim.x;
        if (c < d) put(o, row + c, acc[t]);
    }
    if (threadIdx.x == 0) lse[(u64)bh * m.tq + i] = l;
}

// grid (Tq, B·H): dq row i, and per row its log-sum-exp and δ = Σ dO·O for the dk/dv pass.
// Shared: q, dO (D each) and one tile of dS.
template <typename T>
__device__ void attn_bwd_dq(const T *q, const T *k, const T *v, const T *o, const T *dout, T *dq,
                            float *lse, float *delta, Mask m, int heads, int rep, int d) {
    extern __shared__ float sh[];
    float *qs = sh, *dos = sh + d, *ds = sh + 2 * d;
    const int i = blockIdx.x, bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const u64 kv = ((u64)b * (heads / rep) + h / rep) * m.tk * d;
    const u64 row = ((u64)bh * m.tq + i) * d;
    load_row(qs, q + row, d);
    load_row(dos, dout + row, d);
    __syncthreads();
    const float l = row_lse(qs, k + kv, m, b, i, d);
    float part = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) part += dos[c] * to_f32(o[row + c]);
    const float dl = block_sum(part);
    float acc[MAX_COLS] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int end = key_end(m, i);
    for (int j0 = 0; j0 < end; j0 += blockDim.x) {
        const int j = j0 + threadIdx.x;
        __syncthreads();
        float g = 0.0f;
        if (j < end && visible(m, b, i, j)) {
            const float pj = expf(dot_row(qs, k + kv + (u64)j * d, d) - l);
            g = pj * (dot_row(dos, v + kv + (u64)j * d, d) - dl);
        }
        ds[threadIdx.x] = g;
        __syncthreads();
        const int n = min((int)blockDim.x, end - j0);
        for (int t = 0; t < MAX_COLS; ++t) {
            const int c = threadIdx.x + t * blockDim.x;
            if (c >= d) break;
            for (int jj = 0; jj < n; ++jj) acc[t] += ds[jj] * to_f32(k[kv + (u64)(j0 + jj) * d + c]);
        }
    }
    for (int t = 0; t < MAX_COLS; ++t) {
        const int c = threadIdx.x + t * blockDim.x;
        if (c < d) put(dq, row + c, acc[t]);
    }
    if (threadIdx.x == 0) {
        lse[(u64)bh * m.tq + i] = l;
        delta[(u64)bh * m.tq + i] = dl;
    }
}

// grid (Tk, B·Hkv): dk and dv of key row j, summed over the group's query heads and the
// queries that see it. Shared: k, v (D each) and tiles of dS and P.
template <typename T>
__device__ void attn_bwd_dkv(const T *q, const T *k, const T *v, const T *dout, T *dk, T *dv,
                             const float *lse, const float *delta, Mask m, int heads, int rep, int d) {
    extern __shared__ float sh[];
    float *ks = sh, *vs = sh + d, *ds = sh + 2 * d, *p = sh + 2 * d + blockDim.x;
    const int j = blockIdx.x, bg = blockIdx.y, hkv = heads / rep, b = bg / hkv, g = bg % hkv;
    const u64 krow = ((u64)bg * m.tk + j) * d;
    load_row(ks, k + krow, d);
    load_row(vs, v + krow, d);
    __syncthreads();
    float ak[MAX_COLS] = {0.0f, 0.0f, 0.0f, 0.0f}, av[MAX_COLS] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int r = 0; r < rep; ++r) {
        const u64 bh = (u64)b * heads + g * rep + r;
        // Queries before j − past never see key j.
        const int first = max(0, j - m.past);
        for (int i0 = first - first % (int)blockDim.x; i0 < m.tq; i0 += blockDim.x) {
            const int i = i0 + threadIdx.x;
            __syncthreads();
            float pi = 0.0f, gi = 0.0f;
            if (i < m.tq && visible(m, b, i, j)) {
                const u64 row = (bh * m.tq + i) * d;
                pi = expf(dot_row(ks, q + row, d) - lse[bh * m.tq + i]);
                gi = pi * (dot_row(vs, dout + row, d) - delta[bh * m.tq + i]);
            }
            p[threadIdx.x] = pi;
            ds[threadIdx.x] = gi;
            __syncthreads();
            const int n = min((int)blockDim.x, m.tq - i0);
            for (int t = 0; t < MAX_COLS; ++t) {
                const int c = threadIdx.x + t * blockDim.x;
                if (c >= d) break;
                for (int ii = 0; ii < n; ++ii) {
                    const u64 row = (bh * m.tq + i0 + ii) * d + c;
                    ak[t] += ds[ii] * to_f32(q[row]);
                    av[t] += p[ii] * to_f32(dout[row]);
                }
            }
        }
    }
    for (int t = 0; t < MAX_COLS; ++t) {
        const int c = threadIdx.x + t * blockDim.x;
        if (c < d) {
            put(dk, krow + c, ak[t]);
            put(dv, krow + c, av[t]);
        }
    }
}

#define MASK_ARGS const unsigned char *key_valid, const unsigned int *segments, int past, int tq, int tk
#define MASK_OF Mask{key_valid, segments, past, tq, tk}

#define ATTENTION(T, S)                                                                          \
    extern "C" __global__ void attn_fwd_##S(const T *q, const T *k, const T *v, T *o, float *lse, \
                                            MASK_ARGS, int heads, int rep, int d) {              \
        attn_fwd(q, k, v, o, lse, MASK_OF, heads, rep, d);                                       \
    }                                                                                            \
    extern "C" __global__ void attn_bwd_dq_##S(const T *q, const T *k, const T *v, const T *o,   \
                                               const T *dout, T *dq, float *lse, float *delta,   \
                                               MASK_ARGS, int heads, int rep, int d) {           \
        attn_bwd_dq(q, k, v, o, dout, dq, lse, delta, MASK_OF, heads, rep, d);                   \
    }                                                                                            \
    extern "C" __global__ void attn_bwd_dkv_##S(const T *q, const T *k, const T *v,              \
                                                const T *dout, T *dk, T *dv, const float *lse,   \
                                                const float *delta, MASK_ARGS, int heads,        \
                                                int rep, int d) {                                \
        attn_bwd_dkv(q, k, v, dout, dk, dv, lse, delta, MASK_OF, heads, rep, d);                 \
    }

ATTENTION(float, f32)
ATTENTION(bf16_t, bf16)
