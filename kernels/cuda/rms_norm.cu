// RMSNorm over the last dimension d, one block per row: y = w · x / sqrt(mean(x²) + eps).
// Backward: dx = r · (g·w − x̂ · mean(g·w·x̂)) with x̂ = r·x (r recomputed per row), and dw as
// per-column sums over rows (grid.y splits the rows; partial sums are added atomically into an
// f32 dw the caller zeroed).

template <typename T>
__device__ float inv_rms(const T *x, u64 row, int d, float eps) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = to_f32(x[row * d + i]);
        ss += v * v;
    }
    return 1.0f / sqrtf(block_sum(ss) / d + eps);
}

template <typename T>
__device__ void rms_norm_fwd(const T *x, const T *w, T *y, int d, float eps) {
    const u64 row = blockIdx.x;
    const float r = inv_rms(x, row, d, eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        put(y, row * d + i, to_f32(x[row * d + i]) * r * to_f32(w[i]));
    }
}

template <typename T>
__device__ void rms_norm_dx(const T *x, const T *w, const T *g, T *dx, int d, float eps) {
    const u64 row = blockIdx.x;
    const float r = inv_rms(x, row, d, eps);
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const u64 j = row * d + i;
        s += to_f32(g[j]) * to_f32(w[i]) * to_f32(x[j]);
    }
    const float c = block_sum(s) * r / d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const u64 j = row * d + i;
        const float xv = to_f32(x[j]);
        put(dx, j, r * (to_f32(g[j]) * to_f32(w[i]) - xv * r * c));
    }
}

// 1/rms of each row (one block per row), for the dw pass.
template <typename T>
__device__ void rms_norm_inv(const T *x, float *r, int d, float eps) {
    const float v = inv_rms(x, blockIdx.x, d, eps);
    if (threadIdx.x == 0) r[blockIdx.x] = v;
}

// dw[col] += Σ over this block's rows of g·x·r; blockIdx.x picks 256 columns (thread = column),
// blockIdx.y a run of `rows_per_block` rows.
template <typename T>
__device__ void rms_norm_dw(const T *x, const T *g, const float *r, float *dw, int rows, int d,
                            int rows_per_block) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= d) return;
    const int start = blockIdx.y * rows_per_block;
    const int end = min(rows, start + rows_per_block);
    float acc = 0.0f;
    for (int row = start; row < end; ++row) {
        const u64 j = (u64)row * d + col;
        acc += to_f32(g[j]) * to_f32(x[j]) * r[row];
    }
    atomicAdd(dw + col, acc);
}

#define RMS_NORM(T, S)                                                                           \
    extern "C" __global__ void rms_norm_fwd_##S(const T *x, const T *w, T *y, int d, float eps) { \
        rms_norm_fwd(x, w, y, d, eps);                                                           \
    }                                                                                            \
    extern "C" __global__ void rms_norm_dx_##S(const T *x, const T *w, const T *g, T *dx, int d, \
                                               float eps) {                                      \
        rms_norm_dx(x, w, g, dx, d, eps);                                                        \
    }                                                                                            \
    extern "C" __global__ void rms_norm_inv_##S(const T *x, float *r, int d, float eps) {        \
        rms_norm_inv(x, r, d, eps);                                                              \
    }                                                                                            \
    extern "C" __global__ void rms_norm_dw_##S(const T *x, const T *g, const float *r, float *dw, \
                                               int rows, int d, int rows_per_block) {            \
        rms_norm_dw(x, g, r, dw, rows, d, rows_per_block);                                       \
    }

RMS_NORM(float, f32)
RMS_NORM(bf16_t, bf16)
