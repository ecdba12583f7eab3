// common.cuh: the helpers every offloadkit kernel shares.
//
// Not compiled on its own: offloadkit/kernels/cuda/nvrtc.py pastes it in place of the line
// `#include "common.cuh"` of each kernel file before the source goes to NVRTC (through CuPy or
// the driverless compile check). Pasting, rather than an -I path, keeps CuPy's kernel cache honest:
// its cache key is the source text, so an edit here changes the key of every kernel that uses it.
//
// What is here:
//   - to_float(): bf16 / f16 / f32 -> f32 (weights are stored as they come and widened in registers);
//   - Pack<T>:   one 128-bit load (8 bf16, 8 f16 or 4 f32) through the streaming cache path;
//   - warp_sum / warp_max / block_sum: reductions with warp shuffles (and shared memory across warps).
//
// Conventions of all kernels: activations, norms, softmax and every accumulator are f32; blockDim.x
// is a multiple of 32 and at most 1024; a warp that leaves early leaves whole (no shuffle ever waits
// for a lane that returned).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)  // -infinity (NVRTC has no <cmath> INFINITY)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// ---- 128-bit loads ----------------------------------------------------------------------------------

// Pack<T>::N elements of T fill 16 bytes; load() reads them with one ld.global.cs.v4 instruction.
// `p` must be 16-byte aligned: callers read up to the first aligned element one by one (see warp_dot
// in expert_swiglu.cu). The .cs ("cache streaming") hint tells L1/L2 the weights are used once.
template <typename T>
struct Pack {
    static constexpr int N = 16 / sizeof(T);

    __device__ __forceinline__ static void load(const T* p, float (&out)[16 / sizeof(T)]) {
        uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < N; ++k) out[k] = to_float(e[k]);
    }
};

// ---- reductions -------------------------------------------------------------------------------------

// Butterfly reduction: after log2(32) = 5 exchanges every lane holds the sum over the warp.
template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

// Sum of v over the whole block; every thread gets the result. All threads of the block must call it.
template <typename V>
__device__ V block_sum(V v) {
    __shared__ V partial[WARP_SIZE];
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
    v = warp_sum(v);
    __syncthreads();  // a previous call may still be reading partial[]
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < n_warps ? partial[lane] : V(0);
    return warp_sum(v);
}
