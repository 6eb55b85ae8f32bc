// Shared by every kernel source: it is prepended to each one before NVRTC compiles it (no
// #include, so neither the CUDA toolkit's headers nor a file system are needed at run time).
//
// bf16 travels as its 16 bits and is widened to f32 for arithmetic; stores round to nearest
// even, as torch and candle do. Every reduction is over one block of a multiple of 32 threads.

typedef unsigned short bf16_t;
typedef unsigned long long u64;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16_t x) { return __uint_as_float(((unsigned int)x) << 16); }

__device__ __forceinline__ void put(float *p, u64 i, float v) { p[i] = v; }
__device__ __forceinline__ void put(bf16_t *p, u64 i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
        p[i] = (bf16_t)((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (bf16_t)(u >> 16);
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Sum (or max) of v over the block; every thread gets the result.
__device__ float block_reduce(float v, bool take_max) {
    __shared__ float part[32];
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = take_max ? fmaxf(v, w) : v + w;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    __syncthreads();  // a previous call may still be reading part[]
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < warps ? part[lane] : (take_max ? neg_inf() : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = take_max ? fmaxf(v, w) : v + w;
    }
    return v;
}
__device__ __forceinline__ float block_sum(float v) { return block_reduce(v, false); }
__device__ __forceinline__ float block_max(float v) { return block_reduce(v, true); }
