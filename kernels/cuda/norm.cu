// LayerNorm and GroupNorm with affine weight and bias, one set of kernels for both (as the CPU
// kernel): rows of m = per_group · spatial elements are normalised with their mean and biased
// variance (two passes), and element k of row r takes channel (r mod groups) · per_group + k /
// spatial. One block per row, except dw/db: one thread per channel, over the rows that hold it.

template <typename T>
__device__ void row_stats(const T *x, u64 base, int m, float eps, float *mean, float *rstd) {
    float s = 0.0f;
    for (int k = threadIdx.x; k < m; k += blockDim.x) s += to_f32(x[base + k]);
    const float mu = block_sum(s) / m;
    float q = 0.0f;
    for (int k = threadIdx.x; k < m; k += blockDim.x) {
        const float d = to_f32(x[base + k]) - mu;
        q += d * d;
    }
    *mean = mu;
    *rstd = 1.0f / sqrtf(block_sum(q) / m + eps);
}

template <typename T>
__device__ void norm_fwd(const T *x, const T *w, const T *b, T *y, int groups, int per_group,
                         int spatial, float eps) {
    const int m = per_group * spatial;
    const u64 row = blockIdx.x, base = row * m;
    float mean, rstd;
    row_stats(x, base, m, eps, &mean, &rstd);
    const int c0 = (int)(row % groups) * per_group;
    for (int k = threadIdx.x; k < m; k += blockDim.x) {
        const int c = c0 + k / spatial;
        put(y, base + k, (to_f32(x[base + k]) - mean) * (to_f32(w[c]) * rstd) + to_f32(b[c]));
    }
}

// dx = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂)), dx̂ = g · w.
template <typename T>
__device__ void norm_dx(const T *x, const T *w, const T *g, T *dx, int groups, int per_group,
                        int spatial, float eps) {
    const int m = per_group * spatial;
    const u64 row = blockIdx.x, base = row * m;
    float mean, rstd;
    row_stats(x, base, m, eps, &mean, &rstd);
    const int c0 = (int)(row % groups) * per_group;
    float a = 0.0f, bsum = 0.0f;
    for (int k = threadIdx.x; k < m; k += blockDim.x) {
        const float dxh = to_f32(g[base + k]) * to_f32(w[c0 + k / spatial]);
        a += dxh;
        bsum += dxh * (to_f32(x[base + k]) - mean) * rstd;
    }
    a = block_sum(a) / m;
    bsum = block_sum(bsum) / m;
    for (int k = threadIdx.x; k < m; k += blockDim.x) {
        const float dxh = to_f32(g[base + k]) * to_f32(w[c0 + k / spatial]);
        const float xh = (to_f32(x[base + k]) - mean) * rstd;
        put(dx, base + k, rstd * (dxh - a - xh * bsum));
    }
}

// Mean and 1/std of each row, for dw/db.
template <typename T>
__device__ void norm_stats(const T *x, float *stats, int m, float eps) {
    float mean, rstd;
    row_stats(x, (u64)blockIdx.x * m, m, eps, &mean, &rstd);
    if (threadIdx.x == 0) {
        stats[2 * blockIdx.x] = mean;
        stats[2 * blockIdx.x + 1] = rstd;
    }
}

// out[ch] += Σ g·x̂ and out[C + ch] += Σ g over the rows holding channel ch (rows n·groups +
// ch / per_group for n in this block's run of `per_block` of the `batches` runs).
template <typename T>
__device__ void norm_dwdb(const T *x, const T *g, const float *stats, float *out, int batches,
                          int groups, int per_group, int spatial, int per_block) {
    const int channels = groups * per_group;
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= channels) return;
    const int m = per_group * spatial, grp = ch / per_group, local = ch % per_group;
    const int first = blockIdx.y * per_block, last = min(batches, first + per_block);
    float dw = 0.0f, db = 0.0f;
    for (int n = first; n < last; ++n) {
        const u64 row = (u64)n * groups + grp;
        const float mean = stats[2 * row], rstd = stats[2 * row + 1];
        const u64 base = row * m + (u64)local * spatial;
        for (int k = 0; k < spatial; ++k) {
            const float gv = to_f32(g[base + k]);
            dw += gv * (to_f32(x[base + k]) - mean) * rstd;
            db += gv;
        }
    }
    atomicAdd(out + ch, dw);
    atomicAdd(out + channels + ch, db);
}

#define NORM(T, S)                                                                               \
    extern "C" __global__ void norm_fwd_##S(const T *x, const T *w, const T *b, T *y, int groups, \
                                            int per_group, int spatial, float eps) {             \
        norm_fwd(x, w, b, y, groups, per_group, spatial, eps);                                   \
    }                                                                                            \
    extern "C" __global__ void norm_dx_##S(const T *x, const T *w, const T *g, T *dx, int groups, \
                                           int per_group, int spatial, float eps) {              \
        norm_dx(x, w, g, dx, groups, per_group, spatial, eps);                                   \
    }                                                                                            \
    extern "C" __global__ void norm_stats_##S(const T *x, float *stats, int m, float eps) {      \
        norm_stats(x, stats, m, eps);                                                            \
    }                                                                                            \
    extern "C" __global__ void norm_dwdb_##S(const T *x, const T *g, const float *stats,         \
                                             float *out, int batches, int groups, int per_group, \
                                             int spatial, int per_block) {                       \
        norm_dwdb(x, g, stats, out, batches, groups, per_group, spatial, per_block);             \
    }

NORM(float, f32)
NORM(bf16_t, bf16)
