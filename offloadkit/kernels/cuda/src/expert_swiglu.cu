// expert_swiglu.cu: one SwiGLU expert over a row slice [r0, r1) of its intermediate dimension, for
// a few tokens (decode), adding the slice's partial output into an output buffer.
//
//   act[t, i]  = silu(W1[r0+i, :] . x[t]) * (W3[r0+i, :] . x[t])     i in [0, s), s = r1 - r0   expert_gate_up
//   out[t, h] += sum_i W2[h, r0+i] * act[t, i]                        h in [0, H)                expert_down
//
// x [n, H] f32, n <= MAX_TOKENS; W1 = w_gate, W3 = w_up [I, H]; W2 = w_down [H, I] (the Hugging Face
// layouts), stored bf16, f16 or f32 and widened in registers; every sum is f32. The slice's partial is
// *added* to out (docs/DESIGN.md section 3): the GG and CG slices of one expert run one after the other into
// the same buffer, and the CPU's CC partial is added last. The CPU twin is
// offloadkit.kernels.cuda.twins.expert_swiglu; more than MAX_TOKENS tokens (prefill) go to cuBLAS through
// torch instead (offloadkit.kernels.cuda.ops.expert_swiglu says where).
//
// Launch (two kernels on one stream, act [n, s] f32 scratch between them):
//   expert_gate_up<T>: grid ceil(s / 4), block 128 = 4 warps, one warp per intermediate row i;
//   expert_down<T>:    grid ceil(H / 4), block 128 = 4 warps, one warp per output row h.
// Each warp walks its weight row in 16-byte packs, lane l taking packs l, l + 32, ... so one warp
// instruction reads 512 contiguous bytes (coalesced), then reduces its n partial sums with shuffles.
// W2's rows are read from column r0 with leading dimension ld_down, so a resident full block (ld = I)
// and a streamed slice buffer [H, s] (ld = s) use the same kernel. Slices need not start on a 16-byte
// boundary: the elements before the first aligned one (and after the last pack) are read one by one.
//
// Napkin math, RTX 4090 (1008 GB/s GDDR6X, 82.6 TFLOP/s f32 FMA, 72 MB L2):
//   a Mixtral-8x7B expert is 3 x 4096 x 14336 = 176 M weights = 352 MB in bf16 -> 0.35 ms at 1008 GB/s;
//   at n tokens it does 2 x n x 176 M FLOPs -> 2.8 GFLOP at n = 8 -> 0.034 ms at 82.6 TFLOP/s.
//   Arithmetic intensity is n FLOP/byte (bf16), the ridge is 82 FLOP/byte: for n <= 8 the kernel is
//   memory bound, and its target is ~85-90% of the measured DRAM bandwidth (~0.4 ms per full expert).
//   x and act (n x 4096 x 4 B = 128 KB at n = 8) stay in L1/L2 and are read as float4 where aligned;
//   the weights are read exactly once.
//   benchmarks/cuda_kernels.py measures the effective GB/s against the device's copy bandwidth.

#include "common.cuh"

#define MAX_TOKENS 8

// acc[t] += sum_j w[j] * x[t * ldx + j] over j in [0, len), t < n, split across the lanes of one
// warp: each lane returns its share in acc and the caller reduces. All 32 lanes must call it.
template <typename T>
__device__ __forceinline__ void warp_dot(const T* __restrict__ w, const float* __restrict__ x, int ldx,
                                         int len, int n, float (&acc)[MAX_TOKENS]) {
    constexpr int P = Pack<T>::N;
    const int lane = threadIdx.x % WARP_SIZE;
    // Elements before the first 16-byte boundary of this row (0 when the row starts aligned).
    int head = (int)(((16 - (reinterpret_cast<size_t>(w) & 15)) & 15) / sizeof(T));
    head = min(head, len);
    const int body_end = head + (len - head) / P * P;

    for (int j = lane; j < head; j += WARP_SIZE) {
        const float wj = to_float(w[j]);
#pragma unroll
        for (int t = 0; t < MAX_TOKENS; ++t)
            if (t < n) acc[t] += wj * __ldg(x + t * ldx + j);
    }
    // x may be read 16 bytes at a time too when its rows and the first pack line up (the usual case:
    // H a multiple of 8, slices on 8-row boundaries); then a warp reads x in contiguous 512-byte runs.
    const bool x_packed = ((reinterpret_cast<size_t>(x + head) & 15) == 0) && (ldx % 4 == 0);
    for (int j = head + lane * P; j < body_end; j += WARP_SIZE * P) {
        float wp[P];
        Pack<T>::load(w + j, wp);
#pragma unroll
        for (int t = 0; t < MAX_TOKENS; ++t) {
            if (t < n) {
                const float* xt = x + t * ldx + j;
                if (x_packed) {
#pragma unroll
                    for (int k = 0; k < P; k += 4) {
                        const float4 xv = __ldg(reinterpret_cast<const float4*>(xt + k));
                        acc[t] += wp[k] * xv.x + wp[k + 1] * xv.y + wp[k + 2] * xv.z + wp[k + 3] * xv.w;
                    }
                } else {
#pragma unroll
                    for (int k = 0; k < P; ++k) acc[t] += wp[k] * __ldg(xt + k);
                }
            }
        }
    }
    for (int j = body_end + lane; j < len; j += WARP_SIZE) {
        const float wj = to_float(w[j]);
#pragma unroll
        for (int t = 0; t < MAX_TOKENS; ++t)
            if (t < n) acc[t] += wj * __ldg(x + t * ldx + j);
    }
}

// w_gate, w_up point at row r0 of their block (rows of `hidden` elements); act is [n, rows].
template <typename T>
__global__ void expert_gate_up(const float* __restrict__ x, int n, int hidden, const T* __restrict__ w_gate,
                               const T* __restrict__ w_up, int rows, float* __restrict__ act) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int i = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (i >= rows) return;  // the whole warp leaves together
    float g[MAX_TOKENS], u[MAX_TOKENS];
#pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) g[t] = u[t] = 0.f;
    warp_dot(w_gate + (size_t)i * hidden, x, hidden, hidden, n, g);
    warp_dot(w_up + (size_t)i * hidden, x, hidden, hidden, n, u);
#pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
        if (t < n) {  // n is the same for every lane: the shuffles stay converged
            const float gs = warp_sum(g[t]), us = warp_sum(u[t]);
            if (lane == 0) act[t * rows + i] = gs / (1.f + expf(-gs)) * us;  // silu(g) * u
        }
    }
}

// w_down points at W2[0, r0]; row h of the slice starts at w_down + h * ld_down. out is [n, hidden].
template <typename T>
__global__ void expert_down(const float* __restrict__ act, int n, int rows, const T* __restrict__ w_down,
                            long long ld_down, int hidden, float* __restrict__ out) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int h = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (h >= hidden) return;
    float acc[MAX_TOKENS];
#pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) acc[t] = 0.f;
    warp_dot(w_down + (size_t)h * ld_down, act, rows, rows, n, acc);
#pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
        if (t < n) {
            const float s = warp_sum(acc[t]);
            if (lane == 0) out[t * hidden + h] += s;  // one warp owns out[:, h]: no atomics needed
        }
    }
}
