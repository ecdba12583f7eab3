// attention_decode.cu: one query per sequence (a decode step) over the KV cache, grouped-query attention.
//
//   out[b, h, :] = sum_s softmax_s(q[b, h] . k[b, g, s] / sqrt(D)) v[b, g, s, :]     g = h / (H / KV)
//
// over the keys s in [s0, L): L = length (the query sits at position L - 1, its own key and value
// already written to the cache), s0 = max(0, L - window) with a sliding window (Mixtral's config may
// set one), else 0. This is the reference's causal_attention for a single query
// (offloadkit.kernels.cuda.twins.attention_decode calls it).
//
// q [B, H, D] f32; k_cache, v_cache [B, KV, S, D] (the reference KVCache layout, S >= L the capacity)
// stored f32, bf16 or f16; out [B, H, D] f32. D <= 256, any D.
//
// Launch: grid (H, B), block 128 = 4 warps. Warp w takes keys s0 + w, s0 + w + 4, ...; within a warp,
// lane l holds dims l, l + 32, ... of q, of its running output and of each key / value row it reads
// (32 consecutive elements per instruction: coalesced). Each warp keeps an online softmax (running
// max m, running sum l, output rescaled by exp(m_old - m_new) when the max grows: the FlashAttention
// recurrence); the 4 partial results are merged through shared memory at the end.
// Query heads of one KV group read the same K/V rows; the second and later reads hit L2 (72 MB).
// Reading each K/V row once for the whole group (one block per KV head) is the next step.
//
// Napkin math, RTX 4090 (1008 GB/s): the step is bound by reading the cache: 2 x L x KV x D x bytes
// per sequence and layer. Mixtral (KV = 8, D = 128) in f32 at L = 4096: 32 MB -> ~32 us per layer at
// the DRAM roofline; FLOPs are 4 x L x H x D = 67 MFLOP, negligible. benchmarks/cuda_kernels.py
// compares it with torch's scaled_dot_product_attention.

#include "common.cuh"

#define MAX_DIM 256
#define PER_LANE (MAX_DIM / WARP_SIZE)
#define MAX_WARPS 8  // blockDim.x <= 256

template <typename T>
__global__ void attention_decode(const float* __restrict__ q, const T* __restrict__ k_cache,
                                 const T* __restrict__ v_cache, float* __restrict__ out, int n_heads,
                                 int n_kv_heads, int capacity, int dim, int length, int window) {
    __shared__ float s_max[MAX_WARPS], s_sum[MAX_WARPS];
    __shared__ float s_out[MAX_WARPS][MAX_DIM];
    const int h = blockIdx.x, b = blockIdx.y;
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
    const int g = h / (n_heads / n_kv_heads);
    const float scale = rsqrtf((float)dim);
    const int s0 = window > 0 ? max(0, length - window) : 0;

    const float* qh = q + ((size_t)b * n_heads + h) * dim;
    const size_t kv_base = ((size_t)b * n_kv_heads + g) * capacity * dim;
    float qr[PER_LANE], acc[PER_LANE];
#pragma unroll
    for (int m = 0; m < PER_LANE; ++m) {
        const int d = lane + WARP_SIZE * m;
        qr[m] = d < dim ? qh[d] : 0.f;
        acc[m] = 0.f;
    }

    float run_max = NEG_INF, run_sum = 0.f;
    for (int s = s0 + warp; s < length; s += n_warps) {  // warp-uniform loop: shuffles stay converged
        const T* kr = k_cache + kv_base + (size_t)s * dim;
        const T* vr = v_cache + kv_base + (size_t)s * dim;
        float dot = 0.f;
#pragma unroll
        for (int m = 0; m < PER_LANE; ++m) {
            const int d = lane + WARP_SIZE * m;
            if (d < dim) dot += qr[m] * to_float(kr[d]);
        }
        const float score = warp_sum(dot) * scale;
        const float new_max = fmaxf(run_max, score);
        const float correction = expf(run_max - new_max);  // 0 on the first key (run_max = -inf)
        const float p = expf(score - new_max);
        run_sum = run_sum * correction + p;
#pragma unroll
        for (int m = 0; m < PER_LANE; ++m) {
            const int d = lane + WARP_SIZE * m;
            acc[m] = acc[m] * correction + (d < dim ? p * to_float(vr[d]) : 0.f);
        }
        run_max = new_max;
    }

    if (lane == 0) {
        s_max[warp] = run_max;
        s_sum[warp] = run_sum;
    }
#pragma unroll
    for (int m = 0; m < PER_LANE; ++m) {
        const int d = lane + WARP_SIZE * m;
        if (d < dim) s_out[warp][d] = acc[m];
    }
    __syncthreads();

    // Merge the warps' partial softmaxes: rescale each to the global max, then normalise.
    float total_max = NEG_INF;
    for (int w = 0; w < n_warps; ++w) total_max = fmaxf(total_max, s_max[w]);
    float total_sum = 0.f;
    for (int w = 0; w < n_warps; ++w) total_sum += s_sum[w] * expf(s_max[w] - total_max);
    float* oh = out + ((size_t)b * n_heads + h) * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float o = 0.f;
        for (int w = 0; w < n_warps; ++w) o += s_out[w][d] * expf(s_max[w] - total_max);
        oh[d] = o / total_sum;
    }
}
