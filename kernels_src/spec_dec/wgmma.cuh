// Warpgroup MMAs (wgmma, sm_90a only) for the spec-dec attention kernel's large query tiles.
//
// A warpgroup (four consecutive warps, 128 threads) multiplies a 64-row A by a B read straight
// from shared memory, asynchronously. Against mma.sync, whose warps each load every K/V fragment
// they use with ldmatrix (16 query rows per load), one B read serves 64 rows: that shared-memory
// traffic is what bounded the tree tiles.
//
// Register layouts: the accumulator of m64nNk16 gives warp w of the group rows 16w..16w+15 in
// exactly the m16n8 C-fragment order of mma.sync, one n8 chunk after another (d[j][0..3]:
// (g, 8j+2t), (g, 8j+2t+1), (g+8, 8j+2t), (g+8, 8j+2t+1)), and an A operand in registers has the
// m16n8k16 A-fragment order. So the kernel's softmax, masking, P packing and epilogue code serve
// both paths.
//
// Shared-memory operands use the 128-byte swizzle: a [rows][cols] 16-bit tile is stored as
// cols/64 column blocks of rows x 128 bytes, and 16-byte chunk c of row r sits at chunk
// (c ^ (r % 8)) of its 128-byte row (swz_chunk). Tiles start 1024-byte aligned (the swizzle
// repeats every 8 rows). As a K-major operand (Q and K: the contraction runs along a row) the
// descriptor's stride byte offset is the 8-row step (1024); a k16 step inside a 128-byte row
// moves the start address by 32 bytes. As an N-major operand (V: the contraction runs down the
// rows, transposed by the instruction) the leading byte offset is the step between 64-column
// blocks and the stride byte offset the 8-row step.
#pragma once
#include "primitives.cuh"

// The instructions exist on sm_90a only. Elsewhere the kernel never calls these functions (its WG
// flag is false) and their bodies compile to nothing, so one source serves every target.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define JK_SD_HAVE_WGMMA 1
#define JK_SD_WG_ASM(...) asm volatile(__VA_ARGS__)
#else
#define JK_SD_HAVE_WGMMA 0
#define JK_SD_WG_ASM(...) ((void)0)
#endif

namespace jk_sd {

typedef unsigned long long u64;

// Byte offset of 16-byte chunk c of row r in a swizzled tile of `rows` rows.
__device__ __forceinline__ int swz_chunk(int r, int c, int rows) {
    return (c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}

// Matrix descriptor: start address, leading / stride byte offsets (16-byte units), 128B swizzle.
__device__ __forceinline__ u64 wg_desc(u32 saddr, u32 lbo, u32 sbo) {
    return (u64)((saddr & 0x3ffffu) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32) |
           (1ull << 62);
}

// The descriptor of `d`'s start address moved by `bytes` (a multiple of 16): the address field
// is the low 14 bits and shared addresses stay below 2^18, so the add never carries out of it.
// One add on the low word, where rebuilding the descriptor costs a mask, a shift and an or.
__device__ __forceinline__ u64 wg_desc_at(u64 d, u32 bytes) {
    return (d & 0xffffffff00000000ull) | (u32)((u32)d + (bytes >> 4));
}

__device__ __forceinline__ void wg_fence() {
    JK_SD_WG_ASM("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_commit() {
    JK_SD_WG_ASM("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wg_wait() {
    JK_SD_WG_ASM("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins registers in program order around the asynchronous MMAs: without it the compiler may move
// a read of an accumulator above the wait, or a write of one below the issue.
template <int R>
__device__ __forceinline__ void wg_pin(float (&d)[R][4]) {
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}
// Accumulator chunk j (of eight columns) as four read-write asm operands; eight chunks at once.
#define JK_SD_ACC(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define JK_SD_ACC8(j) JK_SD_ACC(j), JK_SD_ACC(j + 1), JK_SD_ACC(j + 2), JK_SD_ACC(j + 3), \
                      JK_SD_ACC(j + 4), JK_SD_ACC(j + 5), JK_SD_ACC(j + 6), JK_SD_ACC(j + 7)

// S (64 x N) = A (64 x K, shared, K-major) * B (N x K, shared, K-major)^T (+ S if accumulate),
// one wgmma of N = 32 or 64 columns. INSTR names the instruction (shape and operand types);
// TAIL carries the immediates after the scale ones (the 16-bit forms' two transpose flags,
// none for 8-bit operands, which have no transpose).
#define JK_SD_WG_SS_N32(INSTR, TAIL)                                                          \
    JK_SD_WG_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n" INSTR "\n"                     \
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15},\n"                 \
                 "%16, %17, p, 1, 1" TAIL ";\n}\n"                                           \
                 : JK_SD_ACC(0), JK_SD_ACC(1), JK_SD_ACC(2), JK_SD_ACC(3)                    \
                 : "l"(da), "l"(db), "r"(accumulate))
#define JK_SD_WG_SS_N64(INSTR, TAIL)                                                          \
    JK_SD_WG_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" INSTR "\n"                     \
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                    \
                 "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31},\n"       \
                 "%32, %33, p, 1, 1" TAIL ";\n}\n"                                           \
                 : JK_SD_ACC8(0)                                                             \
                 : "l"(da), "l"(db), "r"(accumulate))

// 16-bit operands, k16 per instruction
__device__ __forceinline__ void wg_ss_n32(float (&d)[4][4], u64 da, u64 db, int accumulate) {
    JK_SD_WG_SS_N32("wgmma.mma_async.sync.aligned.m64n32k16.f32." JK_SD_MMA_TYPE "." JK_SD_MMA_TYPE,
                    ", 0, 0");
}
__device__ __forceinline__ void wg_ss_n64(float (&d)[8][4], u64 da, u64 db, int accumulate) {
    JK_SD_WG_SS_N64("wgmma.mma_async.sync.aligned.m64n64k16.f32." JK_SD_MMA_TYPE "." JK_SD_MMA_TYPE,
                    ", 0, 0");
}

// e4m3 operands, k32 per instruction (both K-major: 8-bit wgmma has no transpose). A k32 step
// is 32 bytes of a 128-byte swizzled row, as a k16 step of 16-bit operands is.
__device__ __forceinline__ void wg_ss_f8_n32(float (&d)[4][4], u64 da, u64 db, int accumulate) {
    JK_SD_WG_SS_N32("wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3", "");
}
__device__ __forceinline__ void wg_ss_f8_n64(float (&d)[8][4], u64 da, u64 db, int accumulate) {
    JK_SD_WG_SS_N64("wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3", "");
}

// O (64 x N) += P (64 x 16, registers) * V (16 x N, shared, N-major)
__device__ __forceinline__ void wg_rs_n64(float (&d)[8][4], const u32 (&a)[4], u64 db) {
    JK_SD_WG_ASM(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." JK_SD_MMA_TYPE "." JK_SD_MMA_TYPE "\n"
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31},\n"
        "{%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"
        : JK_SD_ACC8(0)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

__device__ __forceinline__ void wg_rs_n128(float (&d)[16][4], const u32 (&a)[4], u64 db) {
    JK_SD_WG_ASM(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." JK_SD_MMA_TYPE "." JK_SD_MMA_TYPE "\n"
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
        "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
        "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63},\n"
        "{%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"
        : JK_SD_ACC8(0), JK_SD_ACC8(8)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

__device__ __forceinline__ void wg_rs_n256(float (&d)[32][4], const u32 (&a)[4], u64 db) {
    JK_SD_WG_ASM(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32." JK_SD_MMA_TYPE "." JK_SD_MMA_TYPE "\n"
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
        "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
        "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,"
        "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"
        "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,"
        "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,"
        "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127},\n"
        "{%128,%129,%130,%131}, %132, p, 1, 1, 1;\n}\n"
        : JK_SD_ACC8(0), JK_SD_ACC8(8), JK_SD_ACC8(16), JK_SD_ACC8(24)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

// The shapes the kernel uses, by accumulator rows: S over 32 or 64 positions, O over 64, 128 or
// 256 head-dim columns.
template <int R>
__device__ __forceinline__ void wg_ss(float (&d)[R][4], u64 da, u64 db, int accumulate) {
    static_assert(R == 4 || R == 8, "S tile of 32 or 64 positions");
    if constexpr (R == 4) wg_ss_n32(d, da, db, accumulate);
    else wg_ss_n64(d, da, db, accumulate);
}
template <int R>
__device__ __forceinline__ void wg_ss_f8(float (&d)[R][4], u64 da, u64 db, int accumulate) {
    static_assert(R == 4 || R == 8, "S tile of 32 or 64 positions");
    if constexpr (R == 4) wg_ss_f8_n32(d, da, db, accumulate);
    else wg_ss_f8_n64(d, da, db, accumulate);
}
template <int R>
__device__ __forceinline__ void wg_rs(float (&d)[R][4], const u32 (&a)[4], u64 db) {
    static_assert(R == 8 || R == 16 || R == 32, "O tile of 64, 128 or 256 columns");
    if constexpr (R == 8) wg_rs_n64(d, a, db);
    else if constexpr (R == 16) wg_rs_n128(d, a, db);
    else wg_rs_n256(d, a, db);
}

}  // namespace jk_sd
