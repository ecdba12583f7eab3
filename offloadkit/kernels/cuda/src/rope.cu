// rope.cu: rotary position embedding of queries or keys, in place, from precomputed cos / sin tables.
//
//   x[t, h, i]       = x1 * cos[t, i]       - x2 * sin[t, i]          x1 = x[t, h, i], x2 = x[t, h, i + D/2]
//   x[t, h, i + D/2] = x2 * cos[t, i + D/2] + x1 * sin[t, i + D/2]    for i in [0, D/2)
//
// i.e. x * cos + rotate_half(x) * sin ("rotate-half", the GPT-NeoX pairing of i with i + D/2). That one
// formula serves all four architectures: Mixtral, LLaMA-2 and Qwen2-MoE (rope types default / linear /
// llama3) and PhiMoE (longrope) differ only in the inverse frequencies and in a scale multiplied into
// cos and sin. Those live in the tables, which the host computes once per step with
// offloadkit.model.rope.rotary_tables (the reference's own code; for PhiMoE it picks the short or
// long scale from the step's largest position exactly as transformers does). So the kernel needs no
// variant switch, and the twin (offloadkit.kernels.cuda.twins.rope) is model.rope.apply_rope.
//
// x [N, heads, D] f32, rotated in place; cos, sin [N, D] f32 (row t for token t's position); D even.
//
// Launch: one thread per (token, head, pair i): N * heads * D/2 threads in blocks of 256. Each thread
// owns both elements of its pair, so rotating in place is safe.
//
// Napkin math, RTX 4090 (1008 GB/s): decode with 32 query heads x 128 dims is 16 KB per token: pure
// launch latency (~3 us). It is memory bound at prefill: 512 tokens x (q + k) = 10 MB -> ~10 us.

#include "common.cuh"

__global__ void rope(float* x, const float* __restrict__ cos_t, const float* __restrict__ sin_t, int n_tokens,
                     int heads, int dim) {
    const int half = dim / 2;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n_tokens * heads * half) return;
    const int i = (int)(idx % half);
    const long long row = idx / half;  // token * heads + head
    const int t = (int)(row / heads);
    float* xr = x + row * dim;
    const float* c = cos_t + (size_t)t * dim;
    const float* s = sin_t + (size_t)t * dim;
    const float x1 = xr[i], x2 = xr[i + half];
    xr[i] = x1 * c[i] - x2 * s[i];
    xr[i + half] = x2 * c[i + half] + x1 * s[i + half];
}
