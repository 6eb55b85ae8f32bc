// Softmax over the last dimension d, one block per row: y = e^(x − max) / Σ e^(x − max).
// Backward from the saved output: dx = y · (g − Σ g·y).

template <typename T>
__device__ void softmax_fwd(const T *x, T *y, int d) {
    const u64 base = (u64)blockIdx.x * d;
    float m = neg_inf();
    for (int i = threadIdx.x; i < d; i += blockDim.x) m = fmaxf(m, to_f32(x[base + i]));
    m = block_max(m);
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += expf(to_f32(x[base + i]) - m);
    const float inv = 1.0f / block_sum(s);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        put(y, base + i, expf(to_f32(x[base + i]) - m) * inv);
    }
}

template <typename T>
__device__ void softmax_bwd(const T *y, const T *g, T *dx, int d) {
    const u64 base = (u64)blockIdx.x * d;
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += to_f32(g[base + i]) * to_f32(y[base + i]);
    const float c = block_sum(s);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        put(dx, base + i, to_f32(y[base + i]) * (to_f32(g[base + i]) - c));
    }
}

#define SOFTMAX(T, S)                                                                            \
    extern "C" __global__ void softmax_fwd_##S(const T *x, T *y, int d) { softmax_fwd(x, y, d); } \
    extern "C" __global__ void softmax_bwd_##S(const T *y, const T *g, T *dx, int d) {           \
        softmax_bwd(y, g, dx, d);                                                                \
    }

SOFTMAX(float, f32)
SOFTMAX(bf16_t, bf16)
