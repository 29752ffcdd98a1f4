// Warp-level building blocks of the spec-dec attention kernel (sm_80+ instructions, run on sm_90):
// tensor-core MMA m16n8k16 with fp32 accumulation, ldmatrix fragment loads from shared memory,
// cp.async 16-byte copies global -> shared (zero-filling rows that do not exist), and the
// fp8 e4m3 -> 16-bit conversion used when the KV cache is quantized.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

namespace jk_sd {

typedef unsigned int u32;
typedef unsigned char u8;

// ---- element types ----------------------------------------------------------------------------
// in_t: query and output. The MMA operand type is the input type, except with an fp8 cache: then
// K/V, Q and P enter the MMAs as fp16, because e4m3 -> fp16 is one exact instruction per two
// values (cvt.rn.f16x2.e4m3x2) while e4m3 -> bf16 takes four.
#if JK_IN_BF16
typedef __nv_bfloat16 in_t;
__device__ __forceinline__ u32 pack_in2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}
#else
typedef __half in_t;
__device__ __forceinline__ u32 pack_in2(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}
#endif

#if JK_IN_BF16 && !JK_KV_FP8
#define JK_SD_MMA_TYPE "bf16"
#define JK_SD_MMA_BF16 1
#else
#define JK_SD_MMA_TYPE "f16"
#define JK_SD_MMA_BF16 0
#endif

__device__ __forceinline__ u32 pack_mma2(float lo, float hi) {
#if JK_SD_MMA_BF16
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
#else
    __half2 v = __floats2half2_rn(lo, hi);
#endif
    return *reinterpret_cast<u32*>(&v);
}

// D(16x8, fp32) += A(16x16, row) * B(16x8, col). Fragment ownership (lane = 4*g + t):
// A: a0 (g, 2t..2t+1) a1 (g+8, 2t..) a2 (g, 2t+8..) a3 (g+8, 2t+8..)
// B: b0 (k 2t..2t+1, n g) b1 (k 2t+8.., n g);  C: c0,c1 (g, 2t..2t+1) c2,c3 (g+8, 2t..2t+1)
__device__ __forceinline__ void mma16816(float c[4], const u32 a[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32." JK_SD_MMA_TYPE "." JK_SD_MMA_TYPE ".f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 smem_u32(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(u32 r[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(u32 r[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// 16-byte async copy; src_bytes = 0 writes zeros (rows past the sequence end never hold garbage:
// a NaN there times a zero probability would still poison the output).
// The copies ask L2 to fetch 128-byte lines (.L2::128B): measured (H200, 8k, batch 64, bf16
// cache; benchmarks/probe_cache_hints.py) 2.3-3% faster on the memory-bound paths (decode,
// chains, 16/16/64), 256 bytes gained less at D = 128; fp8 caches are unchanged (their decode is
// bound by the arithmetic). JK_SD_L2_PREFETCH (0, 128, 256) selects the variant for the probe.
#ifndef JK_SD_L2_PREFETCH
#define JK_SD_L2_PREFETCH 128
#endif
#if JK_SD_L2_PREFETCH == 256
#define JK_SD_CP_ASYNC "cp.async.cg.shared.global.L2::256B"
#elif JK_SD_L2_PREFETCH == 128
#define JK_SD_CP_ASYNC "cp.async.cg.shared.global.L2::128B"
#else
#define JK_SD_CP_ASYNC "cp.async.cg.shared.global"
#endif
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile(JK_SD_CP_ASYNC " [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// Shared-memory writes by ordinary stores and cp.async are ordered with the async proxy (wgmma's
// reads, TMA's writes) only through this fence, issued by the writing threads before the barrier
// that hands the bytes over (sm_90+; never called below).
__device__ __forceinline__ void fence_async_smem() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Two e4m3 values (low byte = lower index) -> fp16x2, exact, one instruction.
__device__ __forceinline__ u32 fp8x2_to_f16x2(u32 v16) {
    u32 r;
    asm("{ .reg .b16 lo;\n cvt.u16.u32 lo, %1;\n cvt.rn.f16x2.e4m3x2 %0, lo;\n }\n" : "=r"(r) : "r"(v16));
    return r;
}

// e4m3 -> fp16 for the MMAs, two values per 32-bit register: fp8_lo / fp8_hi take bytes 0-1 / 2-3
// of a word, fp8_cols byte J of two words (the lower half from the first). The conversion
// instruction is cheaper than it looks: placing the bits by hand (byte permute, shift, logic op;
// exact up to a 2^8 folded into the scales) measured 13-24% slower on fp8 decode and chains.
__device__ __forceinline__ u32 fp8_lo(u32 w) { return fp8x2_to_f16x2(w & 0xffffu); }
__device__ __forceinline__ u32 fp8_hi(u32 w) { return fp8x2_to_f16x2(w >> 16); }
template <int J>
__device__ __forceinline__ u32 fp8_cols(u32 w0, u32 w1) {
    return fp8x2_to_f16x2(__byte_perm(w0, w1, ((4 + J) << 4) | J));
}
// Four e4m3 values of one word -> two fp16x2 (bytes 0-1, bytes 2-3): two instructions, the
// halves taken as 16-bit registers (no shift or mask).
__device__ __forceinline__ void fp8x4_to_f16x4(u32 w, u32& lo, u32& hi) {
    asm("{ .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e4m3x2 %0, l;\n"
        " cvt.rn.f16x2.e4m3x2 %1, h;\n }\n" : "=r"(lo), "=r"(hi) : "r"(w));
}
// Bytes J and J+1 of two words as two column pairs, one permute for both: [w1.J+1 w0.J+1 w1.J
// w0.J] -> (w0.J, w1.J) and (w0.J+1, w1.J+1) as fp16x2.
template <int J>
__device__ __forceinline__ void fp8_cols2(u32 w0, u32 w1, u32& c0, u32& c1) {
    const u32 sel = J | ((4 + J) << 4) | ((J + 1) << 8) | ((5 + J) << 12);
    fp8x4_to_f16x4(__byte_perm(w0, w1, sel), c0, c1);
}

// bf16x2 -> fp16x2 (the query of an fp8-cache call enters the fp16 MMAs)
__device__ __forceinline__ float2 bf16x2_to_f2(u32 v) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
}
__device__ __forceinline__ u32 bf16x2_to_f16x2(u32 v) {
    const float2 f = bf16x2_to_f2(v);
    __half2 h = __floats2half2_rn(f.x, f.y);
    return *reinterpret_cast<u32*>(&h);
}

// a, b -> their e4m3 roundings hi (two bytes, a in the low one) and the e4m3 roundings of the
// residuals a - hi, b - hi (lo); see FP8_S in the kernel
__device__ __forceinline__ void split_e4m3x2(float a, float b, u32& hi, u32& lo) {
    const __nv_fp8x2_storage_t h = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
    const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2(h, __NV_E4M3);
    const float2 hf = __half22float2(*reinterpret_cast<const __half2*>(&hr));
    hi = h;
    lo = __nv_cvt_float2_to_fp8x2(make_float2(a - hf.x, b - hf.y), __NV_SATFINITE, __NV_E4M3);
}

__device__ __forceinline__ float warp_max4(float v) {  // over the 4 lanes of a quad (same row)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float warp_sum4(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

}  // namespace jk_sd
