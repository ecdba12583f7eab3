// norm.cu: the two normalisations of the supported architectures, one row of activations per block.
//
//   rmsnorm   (Mixtral, LLaMA, Qwen2-MoE): out = x * rsqrt(mean(x^2) + eps) * w
//   layernorm (PhiMoE):                   out = (x - mean(x)) * rsqrt(var(x) + eps) * w + b   (biased var)
//
// x, out [N, H] f32 (out may be x: each thread reads and writes only its own elements, after the
// reductions); w, b [H] stored bf16, f16 or f32. The CPU twins are offloadkit.kernels.cuda.twins.rms_norm
// (which calls offloadkit.model.reference.rms_norm) and .layer_norm (torch.nn.functional.layer_norm,
// as the reference forward does).
//
// Launch: grid N, block 256 threads; thread j handles elements j, j + 256, ... of its row, and the
// row's sums go through block_sum (warp shuffles, then one shared-memory exchange across the 8 warps).
// layernorm takes two passes (mean, then the variance around it) for the accuracy of
// F.layer_norm; the second pass reads the row from L1, not DRAM.
//
// Napkin math, RTX 4090 (1008 GB/s): one row of H = 4096 f32 is read once (twice for layernorm,
// from cache) and written once: 32 KB. At decode (N = 1..8) the kernel is pure launch latency
// (~3-5 us); at prefill, N = 512 rows move 16 MB -> ~16 us at the DRAM roofline.

#include "common.cuh"

template <typename T>
__global__ void rmsnorm(const float* x, const T* __restrict__ weight, float* out, int hidden, float eps) {
    const float* xr = x + (size_t)blockIdx.x * hidden;
    float* outr = out + (size_t)blockIdx.x * hidden;
    float ss = 0.f;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) ss += xr[j] * xr[j];
    const float inv = rsqrtf(block_sum(ss) / hidden + eps);
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) outr[j] = xr[j] * inv * to_float(weight[j]);
}

template <typename T>
__global__ void layernorm(const float* x, const T* __restrict__ weight, const T* __restrict__ bias, float* out,
                          int hidden, float eps) {
    const float* xr = x + (size_t)blockIdx.x * hidden;
    float* outr = out + (size_t)blockIdx.x * hidden;
    float s = 0.f;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) s += xr[j];
    const float mean = block_sum(s) / hidden;
    float sq = 0.f;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) sq += (xr[j] - mean) * (xr[j] - mean);
    const float inv = rsqrtf(block_sum(sq) / hidden + eps);
    for (int j = threadIdx.x; j < hidden; j += blockDim.x)
        outr[j] = (xr[j] - mean) * inv * to_float(weight[j]) + to_float(bias[j]);
}
