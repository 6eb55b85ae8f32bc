// SwiGLU's gate, element-wise over n elements: y = silu(a) · b. Backward writes both gradients
// into one (2, n) output: d_a = g · b · σ(a) · (1 + a · (1 − σ(a))), then d_b = g · silu(a).

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
__device__ void swiglu_fwd(const T *a, const T *b, T *y, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float av = to_f32(a[i]);
        put(y, i, av * sigmoid(av) * to_f32(b[i]));
    }
}

template <typename T>
__device__ void swiglu_bwd(const T *a, const T *b, const T *g, T *out, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float av = to_f32(a[i]), bv = to_f32(b[i]), gv = to_f32(g[i]);
        const float s = sigmoid(av);
        put(out, i, gv * bv * s * (1.0f + av * (1.0f - s)));
        put(out, n + i, gv * av * s);
    }
}

#define SWIGLU(T, S)                                                                             \
    extern "C" __global__ void swiglu_fwd_##S(const T *a, const T *b, T *y, u64 n) {             \
        swiglu_fwd(a, b, y, n);                                                                  \
    }                                                                                            \
    extern "C" __global__ void swiglu_bwd_##S(const T *a, const T *b, const T *g, T *out, u64 n) { \
        swiglu_bwd(a, b, g, out, n);                                                             \
    }

SWIGLU(float, f32)
SWIGLU(bf16_t, bf16)
