// moe_permute.cu: group tokens by expert before the expert GEMMs, and add the weighted outputs back.
//
// The N x k (token, slot) picks of the router, flattened p = t * k + j, are ordered by expert, stably
// (within an expert, by p). Permuted row r belongs to expert e for r in [offsets[e], offsets[e+1]).
//
//   moe_route_index:  src[r] = the pick p at permuted row r;  dst[p] = r;  offsets [E + 1]
//   moe_gather_rows:  x_perm[r, :] = x[src[r] / k, :]
//   moe_unpermute:    out[t, :] += sum_j weights[t, j] * y_perm[dst[t * k + j], :]     (j ascending)
//
// x [N, H], x_perm, y_perm [N k, H], out [N, H] f32; experts [N, k] int64 (from router_topk);
// src, dst [N k] and offsets [E + 1] int32; weights [N, k] f32. The CPU twins are
// offloadkit.kernels.cuda.twins.moe_permute / moe_unpermute; a test checks that permute -> one
// swiglu per expert group -> unpermute equals offloadkit.model.moe.dispatch_experts.
//
// Launch:
//   moe_route_index: grid E, block 256. Block e counts the picks of experts below e (its start), then
//     walks the picks in order, 256 at a time: __ballot_sync + __popc give each match its rank within
//     the warp, a shared-memory pass over the 8 warp counts its rank within the block. No atomics, so
//     the order is deterministic. It reads N k indices E times: at prefill, 512 x 2 x 8 x 8 B = 64 KB.
//   moe_gather_rows: grid N k, block 128 (one row each);  moe_unpermute: grid N, block 128.
// Unpermute gathers (each output row summed by one block) instead of scattering with atomics: the
// result does not depend on the order blocks run in, and out[t] is written once.
//
// Napkin math, RTX 4090 (1008 GB/s): gather and unpermute each move (N k + N) x H x 4 bytes: at
// prefill 512 tokens, top-2, H = 4096 -> 25 MB -> ~25 us each; at decode a few us of launch latency.

#include "common.cuh"

__global__ void moe_route_index(const long long* __restrict__ experts, int n_picks, int n_experts,
                                int* __restrict__ src, int* __restrict__ dst, int* __restrict__ offsets) {
    __shared__ int warp_counts[WARP_SIZE];
    const int e = blockIdx.x;
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;

    int below = 0;  // picks of experts with a smaller index come first
    for (int p = threadIdx.x; p < n_picks; p += blockDim.x) below += experts[p] < e;
    const int start = block_sum(below);

    int base = start;
    for (int first = 0; first < n_picks; first += blockDim.x) {  // the same trip count for every thread
        const int p = first + threadIdx.x;
        const bool hit = p < n_picks && experts[p] == e;
        const unsigned ballot = __ballot_sync(FULL_MASK, hit);
        const int rank_in_warp = __popc(ballot & ((1u << lane) - 1u));
        __syncthreads();  // the previous round may still be reading warp_counts
        if (lane == 0) warp_counts[warp] = __popc(ballot);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < n_warps; ++w) {
            before += w < warp ? warp_counts[w] : 0;
            total += warp_counts[w];
        }
        if (hit) {
            const int r = base + before + rank_in_warp;
            src[r] = p;
            dst[p] = r;
        }
        base += total;
    }
    if (threadIdx.x == 0) {
        offsets[e] = start;
        if (e == n_experts - 1) offsets[n_experts] = base;
    }
}

__global__ void moe_gather_rows(const float* __restrict__ x, int hidden, const int* __restrict__ src, int top_k,
                                float* __restrict__ x_perm) {
    const int r = blockIdx.x;
    const float* from = x + (size_t)(src[r] / top_k) * hidden;
    float* to = x_perm + (size_t)r * hidden;
    for (int h = threadIdx.x; h < hidden; h += blockDim.x) to[h] = from[h];
}

__global__ void moe_unpermute(const float* __restrict__ y_perm, int hidden, const int* __restrict__ dst,
                              const float* __restrict__ weights, int top_k, float* __restrict__ out) {
    const int t = blockIdx.x;
    for (int h = threadIdx.x; h < hidden; h += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < top_k; ++j) {
            const int p = t * top_k + j;
            acc += weights[p] * y_perm[(size_t)dst[p] * hidden + h];
        }
        out[(size_t)t * hidden + h] += acc;
    }
}
