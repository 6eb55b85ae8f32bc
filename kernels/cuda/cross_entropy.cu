// Cross-entropy over rows of v logits with the log-softmax fused in (one block per row):
// loss_row = log Σ e^x − x[target], 0 where the target is `ignore`; the rows' losses are then
// summed by one block. Backward recomputes each row's log-sum-exp (one more read of the row, no
// state kept between the passes): dx = g · (e^(x − lse) − onehot(target)), 0 on ignored rows.

template <typename T>
__device__ float row_lse(const T *x, u64 base, int v) {
    float m = neg_inf();
    for (int i = threadIdx.x; i < v; i += blockDim.x) m = fmaxf(m, to_f32(x[base + i]));
    m = block_max(m);
    float s = 0.0f;
    for (int i = threadIdx.x; i < v; i += blockDim.x) s += expf(to_f32(x[base + i]) - m);
    return m + logf(block_sum(s));
}

template <typename T>
__device__ void ce_rows(const T *x, const long long *targets, long long ignore, int v, float *loss) {
    const u64 row = blockIdx.x, base = row * v;
    const float lse = row_lse(x, base, v);
    const long long t = targets[row];
    if (threadIdx.x == 0) loss[row] = t == ignore ? 0.0f : lse - to_f32(x[base + t]);
}

template <typename T>
__device__ void ce_grad(const T *x, const long long *targets, long long ignore, int v, float g, T *dx) {
    const u64 row = blockIdx.x, base = row * v;
    const float lse = row_lse(x, base, v);
    const long long t = targets[row];
    const float scale = t == ignore ? 0.0f : g;
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
        const float onehot = (i == t) ? scale : 0.0f;
        put(dx, base + i, scale * expf(to_f32(x[base + i]) - lse) - onehot);
    }
}

// out[0] = Σ loss over n rows (one block).
extern "C" __global__ void ce_sum(const float *loss, u64 n, float *out) {
    float s = 0.0f;
    for (u64 i = threadIdx.x; i < n; i += blockDim.x) s += loss[i];
    s = block_sum(s);
    if (threadIdx.x == 0) out[0] = s;
}

#define CROSS_ENTROPY(T, S)                                                                      \
    extern "C" __global__ void ce_rows_##S(const T *x, const long long *targets, long long ignore, \
                                           int v, float *loss) {                                 \
        ce_rows(x, targets, ignore, v, loss);                                                    \
    }                                                                                            \
    extern "C" __global__ void ce_grad_##S(const T *x, const long long *targets, long long ignore, \
                                           int v, float g, T *dx) {                              \
        ce_grad(x, targets, ignore, v, g, dx);                                                   \
    }

CROSS_ENTROPY(float, f32)
CROSS_ENTROPY(bf16_t, bf16)
