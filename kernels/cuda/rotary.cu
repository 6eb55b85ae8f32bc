// Rotary embedding as Hugging Face's rotate_half, for x (B, H, T, D) and tables cos, sin
// (B or 1, T, D): y₁ = x₁·cos₁ − x₂·sin₁, y₂ = x₂·cos₂ + x₁·sin₂. `inverse` applies the
// transposed rotation (the backward pass): y₁ = x₁·cos₁ + x₂·sin₂, y₂ = x₂·cos₂ − x₁·sin₁.
// One thread per pair (i, i + D/2).

template <typename T>
__device__ void rotary(const T *x, const T *cos, const T *sin, T *y, int heads, int t, int d,
                       int table_batches, int inverse, u64 pairs) {
    const int h = d / 2;
    for (u64 p = (u64)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += (u64)gridDim.x * blockDim.x) {
        const int i = (int)(p % h);
        const u64 row = p / h;                   // (b, head, pos) flattened
        const int pos = (int)(row % t);
        const u64 b = row / ((u64)t * heads);
        const u64 tb = table_batches == 1 ? 0 : b;
        const u64 trow = (tb * t + pos) * d;
        const u64 xrow = row * d;
        const float x1 = to_f32(x[xrow + i]), x2 = to_f32(x[xrow + h + i]);
        const float c1 = to_f32(cos[trow + i]), c2 = to_f32(cos[trow + h + i]);
        const float s1 = to_f32(sin[trow + i]), s2 = to_f32(sin[trow + h + i]);
        if (inverse) {
            put(y, xrow + i, x1 * c1 + x2 * s2);
            put(y, xrow + h + i, x2 * c2 - x1 * s1);
        } else {
            put(y, xrow + i, x1 * c1 - x2 * s1);
            put(y, xrow + h + i, x2 * c2 + x1 * s2);
        }
    }
}

#define ROTARY(T, S)                                                                             \
    extern "C" __global__ void rotary_##S(const T *x, const T *cos, const T *sin, T *y, int heads, \
                                          int t, int d, int table_batches, int inverse, u64 pairs) { \
        rotary(x, cos, sin, y, heads, t, d, table_batches, inverse, pairs);                      \
    }

ROTARY(float, f32)
ROTARY(bf16_t, bf16)
