// router_topk.cu: router logits -> (weights, experts) per token, plus Qwen's shared-expert gate.
//
//   mode 0, softmax-top-k (Mixtral, Qwen2-MoE): p = softmax(logits[t, :E]); keep the k largest;
//           if normalize, divide them by their sum.           = offloadkit.model.moe.route_softmax_topk
//   mode 1, sparsemixer top-2 (PhiMoE at inference): expert 1 = argmax; its weight is its softmax share
//           among experts within a relative 2 * eps of the max; expert 2 = argmax without expert 1, its
//           weight its share among the rest within 2 * eps of that max.  = offloadkit.model.moe.route_sparsemixer
//   shared gate (Qwen2-MoE): when has_shared, logits has E + 1 columns, the last being the logit of
//           shared_expert_gate (its [1, H] weight appended to the router's [E, H] weight, so one GEMM
//           yields both); it is left out of the routing and shared[t] = sigmoid(logits[t, E]).
//
// logits [N, E (+1)] f32 (the router GEMM itself runs on cuBLAS through torch: it is [N, H] x [H, E]);
// weights [N, k] f32; experts [N, k] int64 (torch's index dtype), ordered by decreasing weight as
// torch.topk orders them; shared [N, 1] f32. Ties go to the lower expert index.
//
// Launch: one warp per token, block 128 = 4 tokens, grid ceil(N / 4). Lane l holds the logits of
// experts l, l + 32, ... (E <= 32 * MAX_PER_LANE = 256). Each of the k picks is a warp-wide argmax by
// shuffles; a picked expert is struck from its lane's bitmask.
//
// Napkin math: N x E x 4 bytes of logits (8 tokens x 64 experts = 2 KB): latency bound, a few us.
// What it saves is the round trip: the picks stay on the device for moe_permute.

#include "common.cuh"

#define MAX_PER_LANE 8

// Warp-wide argmax over (value, index) pairs; ties go to the lower index. Every lane gets the winner.
__device__ __forceinline__ void warp_argmax(float& v, int& idx) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, v, offset);
        const int oi = __shfl_xor_sync(FULL_MASK, idx, offset);
        if (ov > v || (ov == v && oi < idx)) {
            v = ov;
            idx = oi;
        }
    }
}

// The best of this lane's experts that `skip` has not struck out, then the best over the warp.
__device__ __forceinline__ void pick(const float (&vals)[MAX_PER_LANE], unsigned skip, int lane, float& best,
                                     int& best_e) {
    best = NEG_INF;
    best_e = 0x7fffffff;
#pragma unroll
    for (int m = 0; m < MAX_PER_LANE; ++m) {
        if (!(skip & (1u << m)) && vals[m] > best) {
            best = vals[m];
            best_e = lane + WARP_SIZE * m;
        }
    }
    warp_argmax(best, best_e);
}

// PhiMoE's mask: true where an expert's score is too far below `top` to share the gate.
__device__ __forceinline__ bool sparsemixer_masked(float v, float top, float eps) {
    return (top - v) / fmaxf(fabsf(v), top) > 2.f * eps;
}

__global__ void router_topk(const float* __restrict__ logits, int n_tokens, int n_experts, int has_shared,
                            int top_k, int mode, int normalize, float jitter_eps, float* __restrict__ weights,
                            long long* __restrict__ experts, float* __restrict__ shared) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int t = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (t >= n_tokens) return;
    const float* row = logits + (size_t)t * (n_experts + has_shared);

    float vals[MAX_PER_LANE];
    unsigned absent = 0;  // bit m: lane + 32 m is not an expert
#pragma unroll
    for (int m = 0; m < MAX_PER_LANE; ++m) {
        const int e = lane + WARP_SIZE * m;
        vals[m] = e < n_experts ? row[e] : NEG_INF;
        if (e >= n_experts) absent |= 1u << m;
    }
    if (has_shared && lane == 0) shared[t] = 1.f / (1.f + expf(-row[n_experts]));

    if (mode == 0) {  // softmax -> top-k -> optional renormalisation
        float mx = NEG_INF;
#pragma unroll
        for (int m = 0; m < MAX_PER_LANE; ++m) mx = fmaxf(mx, vals[m]);
        mx = warp_max(mx);
        float denom = 0.f;
#pragma unroll
        for (int m = 0; m < MAX_PER_LANE; ++m) denom += (absent & (1u << m)) ? 0.f : expf(vals[m] - mx);
        denom = warp_sum(denom);
        unsigned taken = absent;
        float picked_sum = 0.f;
        for (int j = 0; j < top_k; ++j) {
            float best;
            int best_e;
            pick(vals, taken, lane, best, best_e);
            if (best_e % WARP_SIZE == lane) taken |= 1u << (best_e / WARP_SIZE);
            const float w = expf(best - mx) / denom;
            picked_sum += w;
            if (lane == 0) {
                weights[(size_t)t * top_k + j] = w;
                experts[(size_t)t * top_k + j] = best_e;
            }
        }
        if (normalize && lane == 0)
            for (int j = 0; j < top_k; ++j) weights[(size_t)t * top_k + j] /= picked_sum;
        return;
    }

    // mode 1: sparsemixer, top-2
    float top1, top2;
    int first, second;
    pick(vals, absent, lane, top1, first);
    unsigned without_first = absent;
    if (first % WARP_SIZE == lane) without_first |= 1u << (first / WARP_SIZE);
    pick(vals, without_first, lane, top2, second);
    float d1 = 0.f, d2 = 0.f;  // softmax denominators over the experts each mask keeps
#pragma unroll
    for (int m = 0; m < MAX_PER_LANE; ++m) {
        if (absent & (1u << m)) continue;
        if (!sparsemixer_masked(vals[m], top1, jitter_eps)) d1 += expf(vals[m] - top1);
        if (!(without_first & (1u << m)) && !sparsemixer_masked(vals[m], top2, jitter_eps)) d2 += expf(vals[m] - top2);
    }
    d1 = warp_sum(d1);
    d2 = warp_sum(d2);
    if (lane == 0) {
        weights[(size_t)t * 2] = 1.f / d1;  // exp(top1 - top1) / d1
        weights[(size_t)t * 2 + 1] = 1.f / d2;
        experts[(size_t)t * 2] = first;
        experts[(size_t)t * 2 + 1] = second;
    }
}
