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

// Vocabulary split over a group of ranks: this rank holds v columns of each row. The host
// completes the row statistics over the group between the passes (max, then Σ e^(x − max) and
// the target's logit), so each kernel is one per-row pass over the local columns; `local` is
// the target's column on this rank, or −1.
template <typename T>
__device__ void ce_split_max(const T *x, int v, float *m) {
    const u64 row = blockIdx.x, base = row * v;
    float mx = neg_inf();
    for (int i = threadIdx.x; i < v; i += blockDim.x) mx = fmaxf(mx, to_f32(x[base + i]));
    mx = block_max(mx);
    if (threadIdx.x == 0) m[row] = mx;
}

template <typename T>
__device__ void ce_split_stats(const T *x, const long long *local, const float *m, int v, float *sum,
                               float *picked) {
    const u64 row = blockIdx.x, base = row * v;
    float s = 0.0f;
    for (int i = threadIdx.x; i < v; i += blockDim.x) s += expf(to_f32(x[base + i]) - m[row]);
    s = block_sum(s);
    if (threadIdx.x == 0) {
        sum[row] = s;
        const long long c = local[row];
        picked[row] = c < 0 ? 0.0f : to_f32(x[base + c]);
    }
}

// dx = scale · e^(x − lse) − scale · onehot(local), with the group's log-sum-exp per row and
// scale 0 on ignored rows.
template <typename T>
__device__ void ce_split_grad(const T *x, const long long *local, const float *lse, const float *scale,
                              int v, T *dx) {
    const u64 row = blockIdx.x, base = row * v;
    const float l = lse[row], sc = scale[row];
    const long long c = local[row];
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
        const float onehot = (i == c) ? sc : 0.0f;
        put(dx, base + i, sc * expf(to_f32(x[base + i]) - l) - onehot);
    }
}

#define CROSS_ENTROPY(T, S)                                                                      \
    extern "C" __global__ void ce_rows_##S(const T *x, const long long *targets, long long ignore, \
                                           int v, float *loss) {                                 \
        ce_rows(x, targets, ignore, v, loss);                                                    \
    }                                                                                            \
    extern "C" __global__ void ce_grad_##S(const T *x, const long long *targets, long long ignore, \
                                           int v, float g, T *dx) {                              \
        ce_grad(x, targets, ignore, v, g, dx);                                                   \
    }                                                                                            \
    extern "C" __global__ void ce_split_max_##S(const T *x, int v, float *m) {                   \
        ce_split_max(x, v, m);                                                                   \
    }                                                                                            \
    extern "C" __global__ void ce_split_stats_##S(const T *x, const long long *local, const float *m, \
                                                  int v, float *sum, float *picked) {           \
        ce_split_stats(x, local, m, v, sum, picked);                                             \
    }                                                                                            \
    extern "C" __global__ void ce_split_grad_##S(const T *x, const long long *local, const float *lse, \
                                                 const float *scale, int v, T *dx) {             \
        ce_split_grad(x, local, lse, scale, v, dx);                                              \
    }

CROSS_ENTROPY(float, f32)
CROSS_ENTROPY(bf16_t, bf16)
