// Tensor-map bulk copies (TMA, sm_90+) for the spec-dec attention kernel's K/V pipeline.
//
// The host encodes one CUtensorMap per cache (cuTensorMapEncodeTiled: a 3-D view of the paged
// pool, a box of one page's positions x 64 head-dim columns of one KV head, 128-byte swizzle) and
// passes both in the kernel's parameter struct, which the kernel takes as a __grid_constant__ so
// the copies can name them by address. One thread arms a stage's mbarrier with the bytes it
// expects and issues the copies; every consumer waits on the barrier's phase itself, which also
// makes the landed bytes visible to it.
#pragma once
#include "primitives.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define JK_SD_TMA_ASM(...) asm volatile(__VA_ARGS__)
#else
#define JK_SD_TMA_ASM(...) ((void)0)   // never called there (TMA is false below sm_90)
#endif

namespace jk_sd {

// CUtensorMap: 128 opaque bytes, 64-byte aligned
struct alignas(64) TensorMap {
    unsigned long long words[16];
};

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    JK_SD_TMA_ASM("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// the initialized barriers -> the async proxy (the copies complete on them)
__device__ __forceinline__ void mbar_init_fence() {
    JK_SD_TMA_ASM("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// this thread's arrival, announcing `bytes` of copies that complete on the barrier
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    JK_SD_TMA_ASM("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                  : "memory");
}

// wait until the barrier's phase `parity` has completed
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    JK_SD_TMA_ASM(
        "{\n.reg .pred done;\nJK_SD_WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra JK_SD_WAIT_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}

// box at coordinates (c0, c1, c2) of `map` -> shared `dst`, completing on `bar`
__device__ __forceinline__ void tma_load_3d(u32 dst, const TensorMap* map, int c0, int c1, int c2,
                                            u32 bar) {
    JK_SD_TMA_ASM(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst), "l"(map), "r"(c0), "r"(c1), "r"(c2),
        "r"(bar) : "memory");
}

}  // namespace jk_sd
