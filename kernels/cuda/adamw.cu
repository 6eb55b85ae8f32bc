// AdamW's element update in place, in torch's order of operations (the CPU kernel's):
// p *= decay; m = lerp(m, g, lerp_w); v = v·β2 + (1 − β2)·g²; p += step_size · m / (√v / bc2 + eps).
// f32 parameters and moments; the gradient f32 or bf16.

__device__ __forceinline__ float lerp_torch(float a, float b, float w) {
    return fabsf(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

template <typename G>
__device__ void adamw(float *p, const G *g, float *m, float *v, u64 n, float step_size,
                      float lerp_w, float b2, float one_minus_b2, float bc2_sqrt, float eps,
                      float decay) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float gi = to_f32(g[i]);
        float pi = p[i] * decay;
        const float mi = lerp_torch(m[i], gi, lerp_w);
        const float vi = v[i] * b2 + one_minus_b2 * gi * gi;
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        pi += step_size * (mi / denom);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

#define ADAMW(G, S)                                                                              \
    extern "C" __global__ void adamw_##S(float *p, const G *g, float *m, float *v, u64 n,          \
                                         float step_size, float lerp_w, float b2,                \
                                         float one_minus_b2, float bc2_sqrt, float eps,          \
                                         float decay) {                                          \
        adamw(p, g, m, v, n, step_size, lerp_w, b2, one_minus_b2, bc2_sqrt, eps, decay);         \
    }

ADAMW(float, f32)
ADAMW(bf16_t, bf16)
