// Runs single-kernel launches of the CUDA sources on the CPU, one OS thread per CUDA thread:
// barriers for __syncthreads, per-warp barriers for votes, GCC atomics. Included before
// kernels/host_check.h (with FARSIGHT_EMULATE defined) and the kernel source, in which
// `__shared__` variables become function statics (shared by the block's threads, as on the
// GPU) and `extern __shared__` arrays refer to buffers the harness defines. For logic tests of
// block-level kernels (scans, compaction, ordering), not timing; blocks run one after another.
#include <algorithm>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <set>
#include <thread>
#include <vector>
#define FARSIGHT_EMULATE 1
#define __shared__ static
struct dim3_t { unsigned x = 0, y = 0, z = 0; };
inline thread_local dim3_t threadIdx, blockIdx;
inline dim3_t blockDim, gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;
inline std::barrier<>* emu_warp_barrier[32];
inline int emu_warp_vote[32][32];
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline unsigned __ballot_sync(unsigned, int pred) {
    unsigned w = threadIdx.x / 32, l = threadIdx.x % 32;
    emu_warp_vote[w][l] = pred != 0;
    emu_warp_barrier[w]->arrive_and_wait();
    unsigned b = 0;
    for (unsigned i = 0; i < 32; i++)
        if (emu_warp_vote[w][i]) b |= 1u << i;
    emu_warp_barrier[w]->arrive_and_wait();
    return b;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
template <typename T> T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

// Runs `kernel()` as `grid` blocks of `block` threads (a multiple of 32, at most 1024).
template <typename F> void emu_launch(unsigned grid, unsigned block, F kernel) {
    if (block % 32 != 0 || block > 1024) {
        std::fprintf(stderr, "emu_launch: %u threads\n", block);
        std::exit(2);
    }
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; b++) {
        std::barrier<> bar(block);
        emu_block_barrier = &bar;
        std::vector<std::unique_ptr<std::barrier<>>> warps;
        for (unsigned w = 0; w < block / 32; w++) {
            warps.emplace_back(new std::barrier<>(32));
            emu_warp_barrier[w] = warps.back().get();
        }
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < block; t++)
            ts.emplace_back([=] {
                threadIdx = {t, 0, 0};
                blockIdx = {b, 0, 0};
                kernel();
            });
        for (auto& t : ts) t.join();
    }
}
