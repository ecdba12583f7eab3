// emulate.hpp: just enough of CUDA, in plain C++20, to run offloadkit's kernels on a CPU.
//
// offloadkit/kernels/cuda/emulate.py compiles a kernel file with g++ after this header and calls it through
// ctypes. Every CUDA thread of a block is an OS thread; blocks run one after another. __syncthreads is
// a barrier of the block's threads, a warp shuffle or ballot is a barrier of the warp's 32 threads
// around an exchange through memory, and __shared__ variables are `static` (one copy, which is right
// while one block runs at a time). So a kernel's indexing, its reductions, its treatment of odd sizes
// and unaligned slices can be checked against its CPU twin on a machine without a GPU.
//
// What it is not: CUDA. Only the intrinsics offloadkit's kernels use exist; warps run in lockstep
// only at shuffles, ballots and barriers; a shuffle a lane skips deadlocks here (and is a bug on a GPU
// too). Thousands of threads on a few cores: small shapes only. Timings mean nothing.
//
// One thing a GPU enforces and x86 forgives is checked: alignment. A 16-byte load (uint4, float4)
// from an address that is not a multiple of 16 faults on a GPU ("misaligned address") and simply
// works on a CPU, so a kernel reading a slice off the 16-byte grid would pass here and crash there.
// Every load through __ldg / __ldcs checks its pointer against the type's alignment (16 for the
// vector types, declared alignas(16) as in CUDA's vector_types.h); the first offence of a launch is
// kept (address, block, thread) and the launch returns 1; emulate.py raises, naming the kernel and the
// argument the address points into.
// Vector loads must therefore go through these intrinsics (tests/test_emulate_alignment.py checks the
// sources for a plain dereference of a vector pointer).

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

using std::max;
using std::min;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __half2float(__half h) {
    _Float16 f;
    std::memcpy(&f, &h.bits, 2);
    return (float)f;
}
inline float __bfloat162float(__nv_bfloat16 b) {
    const uint32_t u = (uint32_t)b.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

// ---- alignment of loads ------------------------------------------------------------------------------

// The first misaligned load of the running launch (set once, by whichever thread gets there first).
static std::atomic<bool> emu_misaligned{false};
static char emu_fault_text[256];

template <typename T>
inline T emu_load(const T* p, const char* how) {
    const uintptr_t address = reinterpret_cast<uintptr_t>(p);
    if (address % alignof(T) != 0 && !emu_misaligned.exchange(true))
        std::snprintf(emu_fault_text, sizeof emu_fault_text,
                      "misaligned %zu-byte load %s from address 0x%llx (%llu bytes past a %zu-byte boundary) "
                      "in block (%u, %u, %u), thread %u",
                      sizeof(T), how, (unsigned long long)address, (unsigned long long)(address % alignof(T)),
                      alignof(T), blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);
    T v;  // the read itself, aligned or not, as the CPU allows: the launch runs on and reports afterwards
    std::memcpy(&v, p, sizeof(T));
    return v;
}
inline uint4 __ldcs(const uint4* p) { return emu_load(p, "__ldcs(const uint4*)"); }
inline float4 __ldg(const float4* p) { return emu_load(p, "__ldg(const float4*)"); }
template <typename T>
inline T __ldg(const T* p) { return emu_load(p, "__ldg"); }
inline float __int_as_float(unsigned i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }

// ---- the block being run: its barriers and the mailbox of the warp exchanges -------------------------

struct EmuBlock {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    uint64_t mailbox[1024];
};
static EmuBlock* emu_block;

inline void __syncthreads() { emu_block->block->arrive_and_wait(); }

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int offset) {
    static_assert(sizeof(V) <= 8, "shuffles of up to 64 bits");
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(V));
    emu_block->mailbox[threadIdx.x] = bits;
    emu_block->warps[warp]->arrive_and_wait();
    bits = emu_block->mailbox[warp * 32 + (lane ^ (unsigned)offset)];
    emu_block->warps[warp]->arrive_and_wait();  // nobody overwrites a mailbox still to be read
    V out;
    std::memcpy(&out, &bits, sizeof(V));
    return out;
}

inline unsigned __ballot_sync(unsigned, bool pred) {
    const unsigned warp = threadIdx.x / 32;
    emu_block->mailbox[threadIdx.x] = pred ? 1 : 0;
    emu_block->warps[warp]->arrive_and_wait();
    unsigned bits = 0;
    for (unsigned l = 0; l < 32; ++l) bits |= (unsigned)emu_block->mailbox[warp * 32 + l] << l;
    emu_block->warps[warp]->arrive_and_wait();
    return bits;
}

// ---- launching --------------------------------------------------------------------------------------

// Runs body() as every thread of every block of the grid (blockDim.x a multiple of 32). The block's
// threads are started once per launch and walk the blocks together, a barrier between two blocks.
// Returns 0, or 1 after a misaligned load (emu_fault_text says which).
template <typename F>
int emu_run(dim3 grid, dim3 block, F body) {
    emu_misaligned = false;
    blockDim = block;
    gridDim = grid;
    const unsigned n = block.x;
    EmuBlock eb;
    eb.block = std::make_unique<std::barrier<>>(n);
    for (unsigned w = 0; w < n / 32; ++w) eb.warps.push_back(std::make_unique<std::barrier<>>(32));
    emu_block = &eb;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < n; ++t)
        threads.emplace_back([&, t] {
            threadIdx = dim3{t, 0, 0};
            for (unsigned bz = 0; bz < grid.z; ++bz)
                for (unsigned by = 0; by < grid.y; ++by)
                    for (unsigned bx = 0; bx < grid.x; ++bx) {
                        blockIdx = dim3{bx, by, bz};
                        body();
                        eb.block->arrive_and_wait();  // the next block starts when this one is done
                    }
        });
    for (auto& th : threads) th.join();
    return emu_misaligned ? 1 : 0;
}

extern "C" const char* emu_fault() { return emu_fault_text; }

// Calls kernel k with its arguments unpacked from args[i], each a pointer to the i-th argument's
// value: the convention of cuLaunchKernel's kernelParams.
template <typename... A, std::size_t... I>
void emu_call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}
template <typename... A>
void emu_call(void (*k)(A...), void** args) {
    emu_call(k, args, std::index_sequence_for<A...>{});
}
