// Speculative-decoding attention over a paged KV cache (the verification pass), XQA semantics.
//
// Work decomposition
//   One CTA owns (sequence b, KV head hk, query-row tile rt, KV split s). Its query rows are the
//   (draft token t, group member gq) pairs of sequence b that read KV head hk, row r = t*G + gq,
//   rows [rt*QT, rt*QT + QT). Every K/V tile it loads serves all of them, so a KV head's cache is
//   read once for all q_len*G query rows (not once per query head).
//   The CTA walks its share of the KV positions in tiles of 64, staged through shared memory by
//   cp.async, STAGES deep (by each warp or warpgroup for its own slice where WARP_PIPE or
//   WG_PIPE says so, synchronizing only those threads), or by one thread's tensor-map bulk
//   copies per pipeline completing on a per-stage mbarrier (TMA: 16-bit caches; fp8 ones in
//   16- to 128-row tiles). Warps are
//   laid out WM x WN: WM slabs of 16 query rows (the MMA M), and WN slices of each KV tile
//   (with warpgroup MMAs, WG below, four consecutive slabs multiply together as one group).
//   Each warp keeps a private online softmax (m, l, O) over the positions it saw; the epilogue
//   merges the WN warps of a row slab through shared memory and either writes the output (one
//   split) or an unnormalized partial (O, m, l), which spec_dec_merge combines.
//
// Numerics: S = Q K^T and O = P V on tensor cores (mma.sync m16n8k16, or wgmma m64nNk16 for 64-
// and 128-row tiles on sm_90a; fp32 accumulate), softmax in the log2 domain in fp32 with a lazily
// moved reference max (probabilities up to 2^8; RESCALE_TAU; the quad reduction of the maxima
// only on tiles where a warp's vote says some score passed it), P rounded to the input type before
// P V (as XQA does). With an fp8 e4m3 cache the MMAs run in fp16: K/V are
// converted exactly (in registers, or once per CTA in shared memory for large tiles), Q once in
// shared memory, P is rounded to fp16; kv_scale is folded into the softmax scale (K) and the
// output (V), exact math.
//
// Masking (applied only on tiles that reach the draft region, the window edge, or the end):
//   prefix positions < ctx = L - n always visible; draft j = pos - ctx visible iff
//   chain: j <= t;  tree: bit j%32 of word j/32 of the row's mask;  positions >= L never.
//   A row that sees nothing produces zeros (m stays -inf, l = 0).
#include "spec_dec/primitives.cuh"
#include "spec_dec/wgmma.cuh"
#include "spec_dec/tma.cuh"

#ifndef JK_HEAD_DIM
#define JK_HEAD_DIM 128
#endif
#ifndef JK_IN_BF16
#define JK_IN_BF16 1
#endif
#ifndef JK_KV_FP8
#define JK_KV_FP8 0
#endif
#ifndef JK_KV_HND
#define JK_KV_HND 0
#endif
#ifndef JK_PAGE_SIZE
#define JK_PAGE_SIZE 64
#endif
#ifndef JK_MODE
#define JK_MODE 2  // 0 decode (one query token), 1 chain, 2 tree
#endif
#ifndef JK_Q_TILE
#define JK_Q_TILE 64
#endif
#ifndef JK_SPLIT_KV
#define JK_SPLIT_KV 1
#endif
#ifndef JK_KV_STAGES
#define JK_KV_STAGES 0  // K/V pipeline depth; 0: the choice below
#endif
#ifndef JK_KV_TILE
#define JK_KV_TILE 0    // KV positions per pipeline stage (64 or 128); 0: 64
#endif
#ifndef JK_SD_WARP_PIPE
#define JK_SD_WARP_PIPE 1   // warp-private K/V pipelines where they measured faster (see WARP_PIPE)
#endif

namespace jk_sd {

// DQ: the tensors' head_dim (any multiple of 16 up to 256). D: the kernel's, DQ padded to 64, 128
// or 256. The padded columns are zeros in shared memory (Q and K/V chunks past DQ are zero-filled,
// never read from memory), so they add nothing to Q K^T, and the output columns past DQ are not
// written: only the tiles' arithmetic is padded, not the memory traffic.
constexpr int DQ = JK_HEAD_DIM;
constexpr int D = DQ <= 64 ? 64 : DQ <= 128 ? 128 : 256;
static_assert(DQ % 16 == 0 && DQ >= 16 && DQ <= 256, "head_dim must be a multiple of 16 up to 256");
constexpr int PS = JK_PAGE_SIZE;
constexpr int MODE = JK_MODE;
constexpr int QT = JK_Q_TILE;                  // query rows per CTA
#if JK_KV_FP8
constexpr int KV_BYTES = 1;
#else
constexpr int KV_BYTES = 2;
#endif
// KV positions per pipeline stage: 64, or 128 where kv_tile asks (for measurements). A 64-position
// fp8 tile is half the bytes of a 16-bit one for the same per-tile work (barriers, softmax row
// reductions, rescaling the accumulators), so 128 was measured for fp8 decode and chains (H200,
// benchmarks/probe_cache_hints.py): -3% to +1% at batch 8-64, 8% slower at batch 1; not adopted.
// The host counts KV in 64-position units (kv_tiles); the kernel converts.
constexpr int TILE = JK_KV_TILE > 0 ? JK_KV_TILE : 64;
static_assert(TILE == 64 || TILE == 128, "KV tile of 64 or 128 positions");
constexpr int WM = QT / 16;                    // warps along rows (16 rows each: the MMA M)
// Large tiles (trees) run 8 warps, two per row slab, so that with <= 128 registers two CTAs
// (16 warps) share an SM; small tiles 4 warps, one slab split across them.
constexpr int NWARPS = QT >= 64 ? (WM > 8 ? WM : 8) : 4;
constexpr int WN = NWARPS / WM;                // warps along the KV tile
constexpr int NT = 32 * NWARPS;
constexpr int NW = TILE / WN;                  // KV positions per warp per tile (16, 32, 64)
constexpr int NJ = NW / 8;                     // S column chunks (n8) per warp
constexpr int NKC = D / 16;                    // k16 chunks over the head dim
constexpr int NDC = D / 8;                     // n8 chunks of the output
// fp8 cache with 128-row query tiles (64-node trees): once a K/V tile has landed, the CTA converts
// it to fp16 in shared memory together (each element once), and the warps run the 16-bit ldmatrix
// path on the copy. Converting in registers instead (FP8_DIRECT) repeats the conversion in every
// warp that reads the tile: WM = 8 times here. Measured (H200, 8k, batch 64): 64-node trees 11%
// faster; 64-row tiles (WM = 4) 3.5% slower, so they keep the direct path.
//
// Warpgroup MMAs (spec_dec/wgmma.cuh) for tiles of 64 and 128 query rows on sm_90a: each group
// of four warps multiplies its 64 rows by the K and V tiles read straight from shared memory
// (stored in the 128-byte swizzle), so one shared-memory read of a K/V tile serves 64 rows
// instead of 16; with mma.sync every warp loaded every fragment with ldmatrix, and that
// traffic bounded the trees. 128-row tiles run two groups (rows 0-63, 64-127) over the whole KV
// tile, 64-row tiles two groups over its halves (merged in the epilogue). Other targets (sm_90
// without the 'a' features, sm_100a: no wgmma) and JK_SD_WGMMA 0 keep mma.sync. WG_SHAPE is
// arch-independent: the host sizes shared memory (the alignment slack, fp8 conversion tiles)
// from it.
#ifndef JK_SD_WGMMA
#define JK_SD_WGMMA 1
#endif
constexpr bool WG_SHAPE = QT >= 64 && TILE == 64;
constexpr bool WG = JK_SD_HAVE_WGMMA && JK_SD_WGMMA && WG_SHAPE;
// wgmma reads B only from shared memory, so an fp8 cache is converted there for it.
constexpr bool FP8_SMEM = JK_KV_FP8 && (QT >= 128 || WG);
constexpr bool FP8_DIRECT = JK_KV_FP8 && !FP8_SMEM;
// Tensor-map (TMA) K/V loads, on sm_90 and later: for a 16-bit cache whose head_dim is a multiple
// of 64 or an fp8 cache whose head_dim is a multiple of 128, the memory-bound tiles (16 and 32
// query rows; fp8 fragments read from the swizzled rows, kv8_at) and the warpgroup tiles (64
// and 128 rows, sm_90a; fp8 converted to fp16 after landing, as below). The host passes the
// two tensor maps (jitkern/ops/tensor_map.py; the op's kv_tma). One thread per pipeline copies
// its K and V rows with one
// cp.async.bulk.tensor per box (a page, or TMA_BOX_ROWS positions of a larger one) and 128 bytes
// of head-dim columns (64 16-bit or 128 e4m3 values), completing on the stage's
// mbarrier; the tile lands in the 128-byte swizzle (dense 128-byte rows, chunk c of row r at
// c ^ (r % 8)), which is both conflict-free for ldmatrix and the layout wgmma reads, and nothing
// else of the pipeline issues copies. A 64-row tile's two warpgroups each copy their own half of
// every tile (WG_PIPE below: boxes of at most 32 positions, one mbarrier set per warpgroup).
// Measured (H200, benchmarks/kv_load_probe.py, load-only kernels of the decode shape, 8k, batch
// 64): TMA 104-106% of the read bandwidth (a torch sum) against 97-100% with the 16-byte cp.async
// copies, D = 64 and 128, both layouts; a padded box (8 columns past the head dim, zero-filled by
// the unit) lost it (80-101%).
#ifndef JK_SD_TMA
#define JK_SD_TMA 0
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr bool TMA = false;   // no TMA there: kv_tma changes nothing (the host sizes shared memory
                              // for either layout, shared_bytes)
#else
// (whole 128-byte boxes of head-dim columns: 128 e4m3 or 64 16-bit values)
constexpr bool TMA = JK_SD_TMA && DQ % (JK_KV_FP8 ? 128 : 64) == 0 && (QT <= 32 || WG);
#endif
// positions per box: a page, or the rows one pipeline copies of a larger page (the host's
// tma_box_rows mirrors this)
constexpr int TMA_BOX_ROWS = QT == 64 ? (PS < TILE / 2 ? PS : TILE / 2) : (PS < TILE ? PS : TILE);
// Shared rows are padded by 16 bytes: consecutive rows then start 4 banks apart, which makes the
// ldmatrix (16-bit KV) and the 32-bit fragment loads (fp8 KV) below conflict-free. TMA tiles are
// dense and swizzled instead.
constexpr int KV_ROW = D * KV_BYTES + 16;
constexpr int KV_TILE_BYTES = TMA ? TILE * D * KV_BYTES : TILE * KV_ROW;
// fp8_qk (opt-in: the op's allow_fp8_qk): with an fp8 cache, a bf16 query, warpgroup MMAs and
// head dim 128 or 256, S = Q K^T runs as e4m3 wgmma on the K tile as it landed (swizzled), so K
// is never converted. The query is split once into two e4m3 terms, hi + lo, after a per-row
// power-of-two scale that puts the row's largest magnitude in [128, 256) (undone in the softmax
// scale, exactly): a bf16 value has 8 significant bits, hi takes 4 and the rounding residual lo
// the rest, so hi + lo is the bf16 value exactly wherever lo stays in e4m3's normal range (values
// above 2^-9 of the row's max; below, lo rounds to a multiple of 2^-9, under 2^-16 of the max).
// Two k32 e4m3 MMAs take the time of one k16 16-bit MMA, so the MMA time is unchanged; what goes
// is the conversion of K (a quarter of the tile's shared-memory traffic) and half of the K
// operand's reads. Measured (H200, BENCHMARKS.md): 64-row tiles 1.08-1.24x on fp8 trees;
// 128-row tiles 0.97-1.00x (their 128-register budget spills a few values a tile), so the op
// asks for it on 64-row tiles only. V still converts to fp16: 8-bit wgmma takes B only K-major,
// and V's contraction runs down its rows.
// Why opt-in: Hopper's e4m3 MMAs add their products with about 13 fraction bits (not fp32), so
// scores carry errors of roughly 2^-11 of their magnitude, which the softmax turns into
// probability errors proportional to the logits: measured worst-row output errors 0.6-0.7% at
// logit std 2, 2.3% at 8, 6-9% at 32 (the fp16 path: 0.2%); Frobenius errors stay within the
// 1e-2 bound (2.5-2.9e-3, 3.7-4.5e-3, 6.4-8.2e-3; benchmarks/fp8_qk_error.py). Moving the sum to fp32 registers halfway halved those
// errors but spilled (0.84-0.91x); after every k32 step it still left 10x the fp16 path's: the
// loss is inside each instruction. fp16 queries (11 significant bits) keep the fp16 path.
#ifndef JK_FP8_QK
#define JK_FP8_QK 0
#endif
constexpr bool FP8_QK = JK_FP8_QK && WG && JK_KV_FP8 && JK_IN_BF16 && D % 128 == 0;
// Direct fp8 fragments: 1 converts a K word's two halves as 16-bit registers and builds two V
// column pairs per byte permute (fp8x4_to_f16x4, fp8_cols2); 0 is the earlier one permute or
// shift per pair, kept for the probe.
#ifndef JK_SD_FP8_PAIRS
#define JK_SD_FP8_PAIRS 1
#endif
constexpr bool FP8_PAIRS = JK_SD_FP8_PAIRS;
// Online softmax: how far (log2 units) a row's max may run ahead of the reference its
// probabilities use before the reference and the O accumulators are rescaled (see the tile loop).
// 8 keeps probabilities below 256; 0 rescales whenever the max grows (the probe's "eager").
#ifndef JK_SD_RESCALE_TAU
#define JK_SD_RESCALE_TAU 8
#endif
constexpr float RESCALE_TAU = JK_SD_RESCALE_TAU;
// Probe switches for two instruction-count cuts (1 = on, the default): JK_SD_TILE_BASE, one
// 64-bit base per K/V tile instead of an address per row (the loader); JK_SD_Q_PERMUTED, the fp8
// path's query permuted in shared memory for ldmatrix (q_frag). Both measured within 1% of the
// earlier code on fp8 decode and chains, so those paths are not bound by instruction count alone.
#ifndef JK_SD_TILE_BASE
#define JK_SD_TILE_BASE 1
#endif
#ifndef JK_SD_Q_PERMUTED
#define JK_SD_Q_PERMUTED 1
#endif
constexpr bool TILE_BASE = JK_SD_TILE_BASE;
constexpr bool Q_PERMUTED = JK_SD_Q_PERMUTED;
constexpr int CV_ROW = D * 2 + 16;                     // fp16 row of the converted tile
constexpr int CV_TILE_BYTES = JK_KV_FP8 && (QT >= 128 || WG_SHAPE) ? TILE * CV_ROW : 0;
constexpr int ROW16 = FP8_SMEM ? CV_ROW : KV_ROW;      // row stride the 16-bit path reads
// Memory-bound (small query tiles) shapes need about 128 KB of K/V in flight per SM to cover
// HBM latency: 5 stages of 8 KB (K) tiles (64 positions of 128-byte rows: fp8 D=128, 16-bit D=64)
// or 3 of 16 KB, two CTAs per SM. Compute-bound tiles (trees) and 32 KB tiles take 2, keeping
// two CTAs per SM; except 64-row tiles of 8 KB 16-bit stages (D = 64 trees, which stay
// memory-bound): 3, measured (H200, 16/16/64 64-node trees, 8k, batch 64) 4% faster than 2
// (4 and 5 stages: 3% and 2%). fp8 D = 128 64-row tiles (converted, compute-bound) lost 2% with 3.
constexpr int STAGE_KB = D * KV_BYTES * TILE / 1024;   // K bytes of one stage, in KB
constexpr int STAGES = JK_KV_STAGES > 0 ? JK_KV_STAGES
                     : QT >= 64 ? (QT == 64 && KV_BYTES == 2 && STAGE_KB <= 8 ? 3 : 2)
                     : STAGE_KB >= 32 ? 2 : (STAGE_KB <= 8 ? 5 : 3);
constexpr int Q_ROW = (D + 8) * 2;
constexpr int CPR = D * KV_BYTES / 16;         // 16-byte chunks per KV row (padded)
constexpr int CPR_Q = DQ * KV_BYTES / 16;      // ... of them that exist in memory
constexpr int O_ROW = D + 4;                   // floats per row of the epilogue staging
constexpr bool Q_IN_REGS = D <= 128 && QT < 64; // else Q fragments are reloaded (register budget)
// CTAs per SM the register budget must allow: 16-row tiles (~160 registers) fit three, which a
// shallow pipeline (kv_stages 2) can use; 8-warp tiles two; the rest as registers fall.
constexpr int MIN_BLOCKS = (NT >= 256 && D <= 128) ? 2 : (QT == 16 && D <= 128) ? 3 : 1;
constexpr int SMEM_PIPE = STAGES * 2 * KV_TILE_BYTES + 2 * CV_TILE_BYTES;
constexpr int SMEM_EPI = (WN * QT * O_ROW + 2 * WN * QT) * 4;
constexpr int SMEM_ALIGN_SLACK = WG_SHAPE || TMA ? 1024 : 0;   // swizzled tiles start 1024-aligned
// the K/V pipeline's offset: after the query rows (1024-aligned for TMA's swizzled tiles)
constexpr int KV_OFF = TMA ? (QT * Q_ROW + 1023) / 1024 * 1024 : QT * Q_ROW;
constexpr int SMEM_BYTES = KV_OFF + (SMEM_PIPE > SMEM_EPI ? SMEM_PIPE : SMEM_EPI) +
                           SMEM_ALIGN_SLACK;
static_assert(NJ % 2 == 0, "tile shape");
// Warp-private pipeline: with one row slab (WM == 1: decode, short chains) each warp reads only
// its own NW positions of every tile, so it copies them itself and publishes them with
// __syncwarp; the tile loop then has no CTA-wide barrier (the query rows still need one, once),
// and the warps of a CTA no longer wait for each other's arithmetic. Measured (H200, 8k,
// benchmarks/probe_cache_hints.py): fp8 caches, where decode and chains are bound by the
// conversions, 5-8% faster; 16-bit decode at D >= 128 0.4-1.3%; 16-bit 4-chains at 32k 2%
// slower and 16-bit at D = 64 up to 2% slower, so not there. JK_SD_WARP_PIPE 0 restores the
// CTA-wide pipeline for the probe.
constexpr bool WARP_PIPE = JK_SD_WARP_PIPE && WM == 1 && !FP8_SMEM && !TMA &&
                           (JK_KV_FP8 || (MODE == 0 && D >= 128));
// Warpgroup-private pipeline, the same idea one level up: a 64-row tile with warpgroup MMAs runs
// two warpgroups over the two halves of every KV tile (WN == 2), so each warpgroup copies its
// own half (and converts it, with an fp8 cache) and synchronizes with a named barrier of its 128
// threads. The CTA's two warpgroups then drift freely; with a CTA-wide pipeline every tile cost
// three CTA barriers and the fp8 trees spent most cycles with no eligible warp (profile in
// BENCHMARKS.md). JK_SD_WG_PIPE 0 restores the CTA-wide pipeline for the probe.
#ifndef JK_SD_WG_PIPE
#define JK_SD_WG_PIPE 1
#endif
constexpr bool WG_PIPE = JK_SD_WG_PIPE && WG && WN == 2 && NWARPS == 8;
constexpr bool PRIVATE_PIPE = WARP_PIPE || WG_PIPE;
constexpr int PIPE_T = WARP_PIPE ? 32 : WG_PIPE ? 128 : NT;   // threads of one pipeline
constexpr int PIPE_ROWS = PRIVATE_PIPE ? NW : TILE;           // KV rows of a tile it copies
constexpr int TMA_PIPES = TMA && WG_PIPE ? 2 : 1;             // TMA barrier sets (pipelines)
static_assert(!TMA || (PIPE_ROWS % TMA_BOX_ROWS == 0 && !WARP_PIPE), "TMA pipeline shape");
constexpr int RSTEP = PIPE_T / CPR;            // a thread copies rows r0 + k * RSTEP of a tile,
constexpr int RCOPY = PIPE_ROWS / RSTEP;       // k < RCOPY (K and V)
static_assert(PIPE_T % CPR == 0 && RSTEP > 0 && PIPE_ROWS % RSTEP == 0, "pipeline shape");
// Pages one pipeline's rows of a tile span (its page-table slots): pages smaller than a tile
// (16 or 32 positions) split a pipeline's rows over several. Slots are numbered from the
// pipeline's first row, so which slot a copied row or box reads is a compile-time constant
// wherever a thread's rows step by a divisor of the page (SLOT_BASE): one 64-bit base per slot
// and tile, and no run-time index into the slots (which put them in local memory, and 128-row
// tiles spilled, at page 16).
// (Pages and steps are powers of two, so a step either divides the page or spans whole pages.)
constexpr int PIPE_PAGES = PS >= PIPE_ROWS ? 1 : PIPE_ROWS / PS;
static_assert((PS & (PS - 1)) == 0 && (RSTEP & (RSTEP - 1)) == 0, "page and step sizes");
constexpr bool SLOT_BASE = TILE_BASE && PS < TILE && RSTEP <= PS;
// 128-row tiles copying with tensor maps at page 16 (four slots) read their page ids when they
// issue a tile's copies instead of holding them a tile ahead: one thread issues them, but every
// thread of these 128-register tiles paid the four registers (ptxas: 84 bytes spilled).
// Measured (H200, 64-node trees at page 16): 1.11-1.24x at batch 64. The 16- and 32-row tiles,
// not register-bound, keep the prefetch (reading at issue: 0.99x decode at 8k batch 64, 0.93x
// at head_dim 64). JK_SD_PAGES_AT_ISSUE 0 restores the prefetch for the probe.
#ifndef JK_SD_PAGES_AT_ISSUE
#define JK_SD_PAGES_AT_ISSUE 1
#endif
constexpr bool PAGES_AT_ISSUE = JK_SD_PAGES_AT_ISSUE && TMA && QT >= 128 && PIPE_PAGES > 2;
// cp.async copies whose thread steps over whole pages (RSTEP a multiple of PS: fp8 128-row
// tiles at page 16, 256 threads of 8 chunks a row) read each copied row's page id when they issue
// it, and a row's offset in its page is then the thread's own constant. The pipeline's four
// slots and a run-time pick among them spilled 56 bytes there (ptxas), and so did two ids a
// thread held a tile ahead. JK_SD_THREAD_PAGES 0 restores the slots for the probe.
#ifndef JK_SD_THREAD_PAGES
#define JK_SD_THREAD_PAGES 1
#endif
constexpr bool THREAD_PAGES = JK_SD_THREAD_PAGES && !TMA && TILE_BASE && PS < TILE && RSTEP > PS;
// page ids held one tile ahead (load_pages), as against read when a copy is issued
constexpr bool PAGES_AHEAD = !PAGES_AT_ISSUE && !THREAD_PAGES;
static_assert(D % 32 == 0, "head dim");

// bar.sync on barrier ID (1..15; 0 is __syncthreads) for N threads; immediate operands, so
// ptxas reserves only the barriers named
template <int ID, int N>
__device__ __forceinline__ void named_bar() {
    asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(N) : "memory");
}

struct Params {
    const in_t* q;              // [total_q, hq, DQ]
    const u8* k_cache;     // paged pools, NHD [pages, PS, hkv, DQ] or HND [pages, hkv, PS, DQ]
    const u8* v_cache;
    const int* block_tables;    // [Bt, bt_stride]
    const int* seq_lens;        // [Bt]
    const int* q_cu;            // [Bt + 1] or null (uniform q_len)
    const u32* mask;       // [total_q, mask_words] (tree mode)
    in_t* out;                  // [total_q, hq, DQ]
    float* ws_o;                // [num_splits, total_q, hq, DQ] partial outputs (split path)
    float2* ws_ml;              // [num_splits, total_q, hq] (m in log2 units, l)
    int* counters;              // always null (the host passes none): see the epilogue
    const float* kv_scale_ptr;  // null: use kv_scale
    int total_q, hq, hkv, group, q_len, bt_stride, mask_words, num_splits, row_tiles, window;
    int kv_tiles;               // 64-position KV tiles of the longest sequence (host bound):
                                // sizes the splits
    float scale_log2;           // softmax scale * log2(e)
    float kv_scale;
    TensorMap k_map, v_map;     // TMA: 3-D views of the caches (zeros when TMA is off)
};

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000u); }

__device__ __forceinline__ u32 lds32(const u8* p) { return *reinterpret_cast<const u32*>(p); }

// One pass of online (max, sum) rescaling over the split partials of one (row, head) and four
// head-dim elements, U splits loaded at once: the merge is a chain of L2 round trips, so it is
// kept short. Partials are read through L2 (written by other CTAs).
constexpr int MERGE_U = 16;

template <int U = MERGE_U>
__device__ __forceinline__ void merge_quad(const float* ws_o, const float2* ws_ml, in_t* out,
                                           size_t stride, int num_splits, size_t idx, int d) {
    float M = neg_inf(), Ls = 0.f;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < num_splits; s0 += U) {
        float2 ml[U];
        float4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const size_t w = (size_t)(s0 + u) * stride + idx;
            if (s0 + u < num_splits) {
                ml[u] = __ldcg(&ws_ml[w]);
                v[u] = __ldcg(reinterpret_cast<const float4*>(ws_o + w * DQ + d));
            } else {
                ml[u] = make_float2(neg_inf(), 0.f);
                v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (ml[u].x == neg_inf()) continue;   // an empty split (or past the last)
            const float mn = fmaxf(M, ml[u].x);
            const float fa = exp2f(M - mn), fb = exp2f(ml[u].x - mn);
            Ls = Ls * fa + ml[u].y * fb;
            o.x = o.x * fa + v[u].x * fb; o.y = o.y * fa + v[u].y * fb;
            o.z = o.z * fa + v[u].z * fb; o.w = o.w * fa + v[u].w * fb;
            M = mn;
        }
    }
    const float inv = Ls > 0.f ? 1.f / Ls : 0.f;
    uint2 packed;
    packed.x = pack_in2(o.x * inv, o.y * inv);
    packed.y = pack_in2(o.z * inv, o.w * inv);
    *reinterpret_cast<uint2*>(out + idx * DQ + d) = packed;
}

// The merge kernel after a split launch is a programmatic dependent launch (the host's
// MERGE_PDL): once every CTA here has executed griddepcontrol.launch_dependents (or
// exited), its CTAs may take SM slots instead of waiting for this grid to drain; they wait for
// its completion before reading a partial. Where the trigger sits: 2 after the tile loop (the
// default), 1 at the start, 0 nowhere (measurements). At the start, merge CTAs waited on the SMs
// through the whole tile loop, and 16/16/64 64-node trees at 8k batch 1 ran 4% slower than
// without the programmatic launch; after the loop the launch still hides most of the merge's
// start (H200: 3.5% faster there than without it, 2-6% on most other batch-1 trees;
// BENCHMARKS.md). Without such a launch after it, the trigger does nothing.
#ifndef JK_SD_PDL
#define JK_SD_PDL 2
#endif

// (__grid_constant__: the TMA copies address the tensor maps in the parameter space)
__global__ void __launch_bounds__(NT, MIN_BLOCKS) spec_dec_attention(const __grid_constant__ Params p) {
    extern __shared__ __align__(128) u8 smem_raw[];
    // Swizzled (wgmma, TMA) tiles must start 1024-byte aligned; every region size below is a
    // multiple of 1024 there, so aligning the base is enough (the host adds the slack).
    u8* smem = smem_raw + (SMEM_ALIGN_SLACK ? (1024 - (smem_u32(smem_raw) & 1023)) & 1023 : 0);
    u8* q_s = smem;
    u8* kv_s = smem + KV_OFF;
    // TMA: stage s of pipeline i landed (one set of barriers per pipeline, TMA_PIPES)
    __shared__ __align__(8) unsigned long long kv_full[TMA ? TMA_PIPES * STAGES : 1];

#if JK_SPLIT_KV && JK_SD_PDL == 1 && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");   // see JK_SD_PDL
#endif
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp % WM, wn = warp / WM;
    const int g = lane >> 2, t4 = lane & 3;
    const int rt = blockIdx.x % p.row_tiles, hk = blockIdx.x / p.row_tiles;
    const int split = blockIdx.y, b = blockIdx.z;
    if (TMA && tid == 0) {   // one arrival (the issuing thread's) plus the copies' bytes a phase
#pragma unroll
        for (int s = 0; s < TMA_PIPES * STAGES; ++s) mbar_init(smem_u32(&kv_full[s]), 1);
        mbar_init_fence();
    }
    auto pipe_sync = [&]() {   // the threads of one K/V pipeline (see PRIVATE_PIPE)
        if constexpr (WARP_PIPE) __syncwarp();
        else if constexpr (WG_PIPE) { if (wn == 0) named_bar<1, 128>(); else named_bar<2, 128>(); }
        else __syncthreads();
    };

    // KV tiles of this split: the host's bound on the longest sequence (kv_tiles; the op's
    // contract: no sequence exceeds it) is cut into num_splits equal ranges. The range needs no
    // device data, so the first page-table reads below go out together with the seq_lens / q_cu
    // reads instead of one round trip after them.
    const int kv_tiles = (p.kv_tiles * 64 + TILE - 1) / TILE;   // host units: 64 positions
    const int per0 = (kv_tiles + p.num_splits - 1) / p.num_splits;
    const int* bt = p.block_tables + (size_t)b * p.bt_stride;
    // the id of logical page lp + j (-1 past the table; written as the sum the callers form)
    auto page_id = [&](int lp, int j) { return lp + j < p.bt_stride ? __ldg(bt + lp + j) : -1; };
    int pg[PAGES_AHEAD ? PIPE_PAGES : 1];
    // page ids of the pipeline's rows of `tile`, loaded one tile ahead (PAGES_AHEAD): slot j
    // holds logical page (tile * TILE + row_lo) / PS + j (row_lo: the pipeline's first row, below)
    auto load_pages = [&](int tile) {
        if constexpr (!PAGES_AHEAD) {
            return;
        } else if constexpr (PS >= TILE) {
            pg[0] = page_id((tile * TILE) / PS, 0);
        } else {
            const int lp0 = (tile * TILE + (PRIVATE_PIPE ? wn * NW : 0)) / PS;
#pragma unroll
            for (int j = 0; j < PIPE_PAGES; ++j)
                pg[j] = page_id(lp0, j);
        }
    };
    load_pages(split * per0);

    int q_start, n;
    if (MODE == 0) { q_start = b; n = 1; }
    else if (p.q_cu != nullptr) { q_start = p.q_cu[b]; n = p.q_cu[b + 1] - q_start; }
    else { q_start = b * p.q_len; n = p.q_len; }
    const int G = p.group;
    const int R = n * G;
    const int row0 = rt * QT;
    if (row0 >= R) return;   // no query rows here (ragged drafts): nothing to write

    const int L = p.seq_lens[b];
    const int ctx = L - n;   // first draft position
    const int window = (MODE == 1) ? p.window : 0;

    const int ntiles = (L + TILE - 1) / TILE;
    int t_begin = split * per0;
    int t_end = min(t_begin + per0, ntiles);
    if (window > 0) {
        // sliding window: tiles before the earliest visible position (of draft token 0) are
        // skipped outright, and the splits share the rest (the pages are read again)
        const int first = max(0, ctx - window + 1) / TILE;
        const int per = (max(ntiles - first, 0) + p.num_splits - 1) / p.num_splits;
        t_begin = first + split * per;
        t_end = min(t_begin + per, ntiles);
        load_pages(t_begin);
    }
#ifdef JK_SD_PROBE_EMPTY
    if (JK_SD_PROBE_EMPTY) t_end = t_begin;   // measurement: launch, prologue, epilogue, merge
#endif

    const float ks = p.kv_scale_ptr != nullptr ? *p.kv_scale_ptr : p.kv_scale;
    const float sl2 = JK_KV_FP8 ? p.scale_log2 * ks : p.scale_log2;
    const float vscale = JK_KV_FP8 ? ks : 1.0f;
    // the softmax scale: folded into the maxima and exponents when positive, else applied to
    // the scores first (see the tile loop)
    const bool prescale = !(sl2 > 0.f);

    // ---- Q rows -> shared (zero rows past the end, so padded MMA rows stay finite) ----------
    for (int i = tid; i < QT * (D / 8); i += NT) {
        const int r = i / (D / 8), c = i % (D / 8);
        const int gr = row0 + r;
        const in_t* src = p.q;
        int bytes = 0;
        if (gr < R && c < DQ / 8) {
            const int t = gr / G, gq = gr - t * G;
            src = p.q + ((size_t)(q_start + t) * p.hq + hk * G + gq) * DQ + c * 8;
            bytes = 16;
        }
        const int qo = WG ? swz_chunk(r, c, QT) : r * Q_ROW + c * 16;   // swizzled for wgmma
        cp_async16(smem_u32(q_s + qo), src, bytes);
    }

    // ---- K/V tile loader: logical page -> physical page through the block table -------------
    // (a page id read past the sequence's end is never used: such rows are zero-filled)
    // A thread copies the same rows of every tile, r0 + k * RSTEP, and chunk cc of each. When a
    // tile lies in one page (PS >= TILE), a row's byte offset from the tile's first row is fixed:
    // a tile costs one 64-bit base and each row a compare, a select and two adds. The general
    // form (a page and a 64-bit address per row) took about 125 instructions per warp and tile
    // on the fp8 decode path (4 rows of K and V), this one about 80. Measured (H200, probe,
    // JK_SD_TILE_BASE 0 for the general form): within 1% on decode and chains, 16-node trees
    // 1.3% faster.
    // A private pipeline (warp or warpgroup wn) copies rows wn * NW .. + NW of every tile.
    const int pt = tid % PIPE_T;
    const int cc = pt % CPR;
    const int row_lo = PRIVATE_PIPE ? wn * NW : 0;   // the pipeline's first row of a tile
    const int r0 = row_lo + pt / CPR;
    // TMA: the pipeline's issuing thread, and which barrier set it completes
    const bool issuer = !TMA || pt == 0;
    const int tma_pipe = TMA_PIPES > 1 ? wn : 0;
    const bool c_ok = CPR_Q == CPR || cc < CPR_Q;   // chunks past DQ (padded head dims): zeros
#if JK_KV_HND
    const u32 row_bytes = DQ * KV_BYTES;                   // a head's positions are contiguous
    const u32 off0 = r0 * row_bytes + cc * 16;
#else
    const u32 row_bytes = (u32)p.hkv * DQ * KV_BYTES;      // positions interleave the KV heads
    const u32 off0 = r0 * row_bytes + (u32)hk * DQ * KV_BYTES + cc * 16;
#endif
    auto issue = [&](int tile, int stage) {
        u8* ksm = kv_s + stage * 2 * KV_TILE_BYTES;
        u8* vsm = ksm + KV_TILE_BYTES;
        if constexpr (TMA) {
            // the pipeline's issuing thread (the caller) copies its rows of the tile: per box of
            // them (TMA_BOX_ROWS positions of one page) and 128 bytes of head-dim columns, one box
            // of K and one of V. A page id past the table (-1) or any other out-of-range coordinate reads
            // nothing and lands zeros (the unit bounds-checks); rows past the sequence end land
            // whatever the pool holds there (see the tail below).
            const u32 bar = smem_u32(&kv_full[tma_pipe * STAGES + stage]);
            mbar_expect_tx(bar, 2 * PIPE_ROWS * D * KV_BYTES);
#pragma unroll
            for (int k = 0; k < PIPE_ROWS / TMA_BOX_ROWS; ++k) {
                const int r = row_lo + k * TMA_BOX_ROWS;   // the box's first row in the tile
                int page;   // (a box lies in one page)
                if constexpr (PAGES_AT_ISSUE) {
                    page = page_id((tile * TILE + r) / PS, 0);
                } else {
                    page = pg[k * TMA_BOX_ROWS / PS];
                }
                const int tpos = (tile * TILE + r) % PS;
#if JK_KV_HND
                const int c1 = tpos, c2 = page * p.hkv + hk;
#else
                const int c1 = hk, c2 = page * PS + tpos;
#endif
#pragma unroll
                for (int cb = 0; cb < D * KV_BYTES / 128; ++cb) {   // 128-byte column blocks
                    const int o = cb * TILE * 128 + r * 128;
                    const int c0 = cb * (128 / KV_BYTES);
                    tma_load_3d(smem_u32(ksm + o), &p.k_map, c0, c1, c2, bar);
                    tma_load_3d(smem_u32(vsm + o), &p.v_map, c0, c1, c2, bar);
                }
            }
            return;
        }
        constexpr bool ONE_PAGE = PS >= TILE && TILE_BASE;
        size_t base = 0;   // whole-page tile: byte offset of its first row; the rows that exist
        int rows = 0;
        if constexpr (ONE_PAGE) {
            const size_t page = max(pg[0], 0);              // -1 (past the table): nothing read
            const u32 tpos = ((u32)tile * TILE) % PS;       // the tile's first position in it
#if JK_KV_HND
            base = ((page * p.hkv + hk) * PS + tpos) * row_bytes;
#else
            base = (page * PS + tpos) * row_bytes;
#endif
            rows = pg[0] >= 0 && c_ok ? L - tile * TILE : 0;
        }
        // SLOT_BASE (pages smaller than a tile): per slot, the byte offset of tile row 0 as if
        // the slot's page held the whole tile (modulo 2^64: rows before the slot's page wrap; no
        // row of another slot adds to it), and the rows that exist (none past the table)
        size_t sbase[PIPE_PAGES];
        int srows[PIPE_PAGES];
        if constexpr (SLOT_BASE) {
            const int lp0 = (tile * TILE + row_lo) / PS;
#pragma unroll
            for (int j = 0; j < PIPE_PAGES; ++j) {
                const size_t page = max(pg[j], 0);
                const size_t shift = (size_t)tile * TILE - (size_t)(lp0 + j) * PS;
#if JK_KV_HND
                sbase[j] = ((page * p.hkv + hk) * PS + shift) * row_bytes;
#else
                sbase[j] = (page * PS + shift) * row_bytes;
#endif
                srows[j] = pg[j] >= 0 && c_ok ? L - tile * TILE : 0;
            }
        }
#pragma unroll
        for (int k = 0; k < RCOPY; ++k) {
            const int r = r0 + k * RSTEP;
            bool ok;
            size_t src;   // byte offset in the caches (0 when the row is zero-filled)
            if constexpr (ONE_PAGE) {
                ok = r < rows;
                src = base + (ok ? off0 + k * RSTEP * row_bytes : 0u);
            } else if constexpr (THREAD_PAGES) {
                // the row's offset in its page is the thread's (off0 less whole pages): tiles and
                // steps are whole pages
                const int page = page_id((tile * TILE + r) / PS, 0);
                ok = r < L - tile * TILE && page >= 0 && c_ok;
                const u32 in_page = off0 - r0 / PS * PS * row_bytes;
#if JK_KV_HND
                src = ok ? ((size_t)page * p.hkv + hk) * (PS * row_bytes) + in_page : 0;
#else
                src = ok ? (size_t)page * (PS * row_bytes) + in_page : 0;
#endif
            } else if constexpr (SLOT_BASE) {
                // the row's slot: k * RSTEP <= r - row_lo < (k + 1) * RSTEP, and RSTEP divides PS
                const int j = k * RSTEP / PS;
                ok = r < srows[j];
                if constexpr (PIPE_PAGES == 1)   // (the base is a row of the page)
                    src = sbase[0] + (ok ? off0 + k * RSTEP * row_bytes : 0u);
                else
                    src = ok ? sbase[j] + off0 + k * RSTEP * row_bytes : 0;
            } else {
                const int pos = tile * TILE + r;
                int page = pg[0];
#pragma unroll
                for (int s = 1; s < PIPE_PAGES; ++s)
                    if ((r - row_lo) / PS == s) page = pg[s];
                const int off = pos % PS;
                ok = pos < L && page >= 0 && c_ok;
#if JK_KV_HND
                const size_t elem = (((size_t)page * p.hkv + hk) * PS + off) * DQ;
#else
                const size_t elem = (((size_t)page * PS + off) * p.hkv + hk) * DQ;
#endif
                src = ok ? elem * KV_BYTES + cc * 16 : 0;
            }
            // 16-bit tiles for wgmma land swizzled, and so do fp8 ones for the e4m3 S MMAs
            // (FP8_QK; V too, for one offset per row); other fp8 ones stay in padded rows
            const int so = (WG && !JK_KV_FP8) || FP8_QK ? swz_chunk(r, cc, TILE)
                                                       : r * KV_ROW + cc * 16;
            cp_async16(smem_u32(ksm + so), p.k_cache + src, ok ? 16 : 0);
            cp_async16(smem_u32(vsm + so), p.v_cache + src, ok ? 16 : 0);
        }
    };

    // prologue: STAGES-1 tiles in flight (the Q copies ride in the first group)
    if (TMA) __syncthreads();   // the barriers' initialization -> every waiting thread
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (t_begin + s < t_end && issuer) {
            issue(t_begin + s, s);
            load_pages(t_begin + s + 1);
        }
        cp_async_commit();
    }
    u32 phase = 0;   // TMA: bit s = the parity of stage s's next phase

    // FP8_QK: 2^-e of each query row's scale, in the Q area's slack, read where the softmax
    // needs it (two shared loads a tile; holding them in registers instead was not timed)
    float* qexp = reinterpret_cast<float*>(q_s + 2 * QT * D);
    if constexpr (FP8_QK) {
        cp_async_wait<STAGES - 2>();   // the first group: the query (with the first K/V tile)
        __syncthreads();
        // bf16 query -> e4m3 hi and lo terms (see FP8_QK), in place: hi takes the first
        // D/128 column blocks, lo the next, so row r's terms land in the 128-byte row
        // slots its bf16 values held. Four lanes of one warp own a row, so a warp barrier
        // between the loads and the stores is enough.
        constexpr int CPT = D / 64;   // 16-value e4m3 chunks per thread
        for (int rb = 0; rb < QT; rb += NT / 4) {
            const int r = rb + tid / 4, part = tid % 4;
            uint4 x[CPT][2];
            float amax = 0.f;
#pragma unroll
            for (int k = 0; k < CPT; ++k)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    x[k][hh] = *reinterpret_cast<const uint4*>(
                        q_s + swz_chunk(r, 2 * (part * CPT + k) + hh, QT));
                    const u32 w[4] = {x[k][hh].x, x[k][hh].y, x[k][hh].z, x[k][hh].w};
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float2 f = bf16x2_to_f2(w[e]);
                        amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
                    }
                }
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
            __syncwarp();   // (the row's loads before its in-place stores, formally)
            int ex;
            frexpf(amax, &ex);                       // amax in [2^(ex-1), 2^ex)
            const int e = amax > 0.f ? min(max(8 - ex, -100), 100) : 0;
            const float up = __int_as_float((127 + e) << 23);
#pragma unroll
            for (int k = 0; k < CPT; ++k) {
                u32 hw[4], lw[4];
#pragma unroll
                for (int q = 0; q < 4; ++q) {   // output word q: values 4q .. 4q+3
                    const uint4& xv = x[k][q >> 1];
                    const u32 w0 = (q & 1) ? xv.z : xv.x, w1 = (q & 1) ? xv.w : xv.y;
                    const float2 a = bf16x2_to_f2(w0), b = bf16x2_to_f2(w1);
                    u32 h0, l0, h1, l1;
                    split_e4m3x2(a.x * up, a.y * up, h0, l0);
                    split_e4m3x2(b.x * up, b.y * up, h1, l1);
                    hw[q] = h0 | (h1 << 16);
                    lw[q] = l0 | (l1 << 16);
                }
                const int o = swz_chunk(r, part * CPT + k, QT);
                *reinterpret_cast<uint4*>(q_s + o) = make_uint4(hw[0], hw[1], hw[2], hw[3]);
                *reinterpret_cast<uint4*>(q_s + QT * D + o) =
                    make_uint4(lw[0], lw[1], lw[2], lw[3]);
            }
            if (part == 0) qexp[r] = __int_as_float((127 - e) << 23);
        }
        fence_async_smem();
        __syncthreads();
    }

    // per-thread rows (g and g+8 of this warp's slab): draft token index and mask row
    int tok[2];
    const u32* mrow[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int gr = row0 + wm * 16 + g + 8 * h;
        tok[h] = gr < R ? gr / G : 0;
        mrow[h] = MODE == 2 ? p.mask + (size_t)(q_start + tok[h]) * p.mask_words : nullptr;
    }

    float acc[NDC][4];
#pragma unroll
    for (int i = 0; i < NDC; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float m_run[2] = {neg_inf(), neg_inf()}, l_run[2] = {0.f, 0.f};
    u32 qf[Q_IN_REGS ? NKC : 1][4];

    auto q_frag = [&](int kc, u32 a[4]) {   // the A fragment of this warp's 16 rows, k16 chunk kc
        const u8* base = q_s + (wm * 16) * Q_ROW;
        if constexpr (FP8_DIRECT && !Q_PERMUTED) {   // the earlier gather (probe variant)
            const u8* row = base + g * Q_ROW + (16 * kc + 4 * t4) * 2;
            const uint2 lo = *reinterpret_cast<const uint2*>(row);
            const uint2 hi = *reinterpret_cast<const uint2*>(row + 8 * Q_ROW);
            a[0] = lo.x; a[2] = lo.y; a[1] = hi.x; a[3] = hi.y;
            return;
        }
        ldsm_x4(a, smem_u32(base + (lane & 15) * Q_ROW + (16 * kc + 8 * (lane >> 4)) * 2));
    };

    // byte offset of 16-byte chunk c of row r in a K/V tile the 16-bit mma.sync path reads
    auto kv_at = [](int r, int c) {
        return TMA ? swz_chunk(r, c, TILE) : r * ROW16 + c * 16;
    };
    // byte offset of byte `col` of row r in a landed fp8 tile the direct path reads (FP8_DIRECT:
    // padded rows, or the tensor maps' swizzled ones, where the 32-bit fragment loads of a warp
    // stay on distinct banks: rows g of one load sit in distinct 16-byte chunks). The same
    // offsets as kv_at's chunks plus a byte, but written through kv_at the compiler laid the
    // fp8 decode kernels out differently (other cubins), so it stays spelled out.
    auto kv8_at = [](int r, int col) {
        return TMA ? swz_chunk(r, col >> 4, TILE) + (col & 15) : r * KV_ROW + col;
    };

    // the pipeline stage read this round, and the one refilled (read the round before)
    int st_rd = 0, st_wr = STAGES - 1;
    for (int tile = t_begin; tile < t_end;
         ++tile, st_wr = st_rd, st_rd = st_rd + 1 == STAGES ? 0 : st_rd + 1) {
        {   // keep STAGES-1 tiles in flight: issue tile+STAGES-1 into the buffer freed last round
            const int nt = tile + STAGES - 1;
            if (nt < t_end && issuer) {
                issue(nt, st_wr);
                load_pages(nt + 1);
            }
            cp_async_commit();
        }
        if constexpr (TMA) {
            // each thread waits for the stage itself (no barrier: the mbarrier's phase makes the
            // bytes visible); the query's cp.async copies ride in the first group
            if (tile == t_begin) cp_async_wait<0>();
            mbar_wait(smem_u32(&kv_full[tma_pipe * STAGES + st_rd]), (phase >> st_rd) & 1);
            phase ^= 1u << st_rd;
            if (tile == t_begin || (tile + 1) * TILE > L) {
                // rows past the sequence end hold whatever the pool has there: V's are zeroed
                // (a NaN times a zero probability would poison the output; K's scores are
                // masked), each pipeline its own rows
                if ((tile + 1) * TILE > L) {
                    u8* vz = kv_s + st_rd * 2 * KV_TILE_BYTES + KV_TILE_BYTES;
                    const int r_end = L - tile * TILE;
                    for (int i = pt; i < PIPE_ROWS * CPR; i += PIPE_T) {
                        const int r = row_lo + i % PIPE_ROWS, c = i / PIPE_ROWS;
                        if (r >= r_end)
                            *reinterpret_cast<uint4*>(vz + swz_chunk(r, c, TILE)) =
                                make_uint4(0u, 0u, 0u, 0u);
                    }
                    // (before wgmma's reads, and before a later copy into the stage)
                    fence_async_smem();
                }
                // Q (every thread's copies; wgmma reads it through the async proxy) -> all
                // threads; the zeroed rows -> the pipeline's
                if (tile == t_begin) {
                    if (WG) fence_async_smem();
                    __syncthreads();
                } else {
                    pipe_sync();
                }
            }
        } else {
            cp_async_wait<STAGES - 1>();
            if (tile == t_begin) {   // Q (every thread's copies) -> all threads, and wgmma
                if (WG) fence_async_smem();
                __syncthreads();
            } else if constexpr (!FP8_SMEM) {   // (fp8 SMEM: see the conversion below)
                if (WG) fence_async_smem();   // the landed tile -> wgmma's reads
                pipe_sync();                  // the pipeline's rows -> its threads
            }
        }
        if (tile == t_begin) {
            if constexpr (FP8_DIRECT) {
                // The K fragments of an fp8 cache take four head-dim values from one 32-bit word:
                // logical k (2t, 2t+1 | 2t+8, 2t+9) of a 16-wide chunk is head-dim (4t, 4t+1 |
                // 4t+2, 4t+3). The query's columns are permuted to match, once, in place (and
                // converted from bf16: the MMAs run in fp16), so its A fragments come from
                // ldmatrix into register quads. (Gathered by 64-bit loads instead, they sat in
                // register pairs and were copied into a quad before every MMA: 32 moves a tile.)
                for (int i = tid; i < QT * (D / 16); i += NT) {
                    u8* ch = q_s + (i / (D / 16)) * Q_ROW + (i % (D / 16)) * 32;
                    const uint4 lo = *reinterpret_cast<const uint4*>(ch);
                    const uint4 hi = *reinterpret_cast<const uint4*>(ch + 16);
                    u32 w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
                    for (int e = 0; e < 8; ++e) w[e] = JK_IN_BF16 ? bf16x2_to_f16x2(w[e]) : w[e];
                    if (Q_PERMUTED) {
                        *reinterpret_cast<uint4*>(ch) = make_uint4(w[0], w[2], w[4], w[6]);
                        *reinterpret_cast<uint4*>(ch + 16) = make_uint4(w[1], w[3], w[5], w[7]);
                    } else {
                        *reinterpret_cast<uint4*>(ch) = make_uint4(w[0], w[1], w[2], w[3]);
                        *reinterpret_cast<uint4*>(ch + 16) = make_uint4(w[4], w[5], w[6], w[7]);
                    }
                }
                __syncthreads();
            }
#if JK_IN_BF16 && !JK_SD_MMA_BF16
            else if constexpr (!FP8_QK) {
                // fp8 cache with large tiles: the MMAs run in fp16, so the bf16 query is
                // converted once, in place
                for (int i = tid; i < QT * (D / 2); i += NT) {
                    u32* w = WG ? reinterpret_cast<u32*>(q_s) + i   // swizzled rows are dense
                                : reinterpret_cast<u32*>(q_s + (i / (D / 2)) * Q_ROW) + i % (D / 2);
                    *w = bf16x2_to_f16x2(*w);
                }
                if (WG) fence_async_smem();
                __syncthreads();
            }
#endif
#pragma unroll
            for (int kc = 0; kc < (Q_IN_REGS ? NKC : 0); ++kc) q_frag(kc, qf[kc]);
        }

        const u8* const vst = kv_s + st_rd * 2 * KV_TILE_BYTES + KV_TILE_BYTES;   // V as landed
        const u8* ksm = vst - KV_TILE_BYTES;   // the tiles the MMAs read (fp8: converted below)
        const u8* vsm = vst;
        const int kv_row0 = wn * NW;            // this warp's slice of the tile
        // fp8 cache, large tiles: the pipeline's rows of K (m = 0) and V (1) -> fp16 rows after
        // the pipeline (16 fp8 -> 32 bytes per step; exact: every e4m3 value is an fp16 value).
        // Thread pt converts the chunks it copied, chunk cc of rows r0 + k * RSTEP, so a landed
        // tile needs no barrier before the conversion, only the thread's own cp.async wait (the
        // loop top skips it; with TMA each thread's mbarrier wait); the barrier after the
        // conversion publishes the fp16 rows.
        // All loads go out before the first store: a store might alias a later load, so the
        // compiler would not hoist them, and each conversion waited out its load's latency (ncu).
        // The previous round's readers of the converted rows are past its closing barrier.
        // (Loading the chunks into registers instead, and converting from there with no fp8 copy
        // in shared memory, measured 11-13% slower on 16-node trees, H200.)
        if constexpr (FP8_SMEM) {
            u8* const cv = kv_s + STAGES * 2 * KV_TILE_BYTES;
            uint4 w[2][RCOPY];
#pragma unroll
            for (int m = FP8_QK ? 1 : 0; m < 2; ++m)   // FP8_QK: V only
#pragma unroll
                for (int k = 0; k < RCOPY; ++k)
                    w[m][k] = *reinterpret_cast<const uint4*>(
                        vst - (1 - m) * KV_TILE_BYTES +
                        (FP8_QK || TMA ? swz_chunk(r0 + k * RSTEP, cc, TILE)
                                       : (r0 + k * RSTEP) * KV_ROW + cc * 16));
#pragma unroll
            for (int m = FP8_QK ? 1 : 0; m < 2; ++m)
#pragma unroll
                for (int k = 0; k < RCOPY; ++k) {
                    const int r = r0 + k * RSTEP;
                    uint4 lo, hi;
                    fp8x4_to_f16x4(w[m][k].x, lo.x, lo.y);
                    fp8x4_to_f16x4(w[m][k].y, lo.z, lo.w);
                    fp8x4_to_f16x4(w[m][k].z, hi.x, hi.y);
                    fp8x4_to_f16x4(w[m][k].w, hi.z, hi.w);
                    u8* dst = cv + m * CV_TILE_BYTES;              // swizzled rows for wgmma
                    const int o0 = WG ? swz_chunk(r, 2 * cc, TILE) : r * CV_ROW + cc * 32;
                    const int o1 = WG ? swz_chunk(r, 2 * cc + 1, TILE) : r * CV_ROW + cc * 32 + 16;
                    *reinterpret_cast<uint4*>(dst + o0) = lo;
                    *reinterpret_cast<uint4*>(dst + o1) = hi;
                }
            if (WG) fence_async_smem();
            pipe_sync();
            if constexpr (!FP8_QK) ksm = cv;   // (FP8_QK: K as it landed)
            vsm = cv + CV_TILE_BYTES;
        }

#ifdef JK_SD_PROBE_LOAD_ONLY
        if (JK_SD_PROBE_LOAD_ONLY) {   // measurement: loads only
            pipe_sync();
            continue;
        }
#endif
        // ---- S = Q K^T over the warp's NW positions ----
        float s[NJ][4];
#pragma unroll
        for (int j = 0; j < NJ; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
        if constexpr (WG) {
            // the warpgroup's 64 rows against its NW positions, k16 steps along the head dim: Q
            // and K column blocks are QT and TILE rows of 128 bytes
            const u64 qd = wg_desc(smem_u32(q_s) + (wm >> 2) * 64 * 128, 16, 1024);
            const u64 kd = wg_desc(smem_u32(ksm) + kv_row0 * 128, 16, 1024);
            wg_fence();
            if constexpr (FP8_QK) {
                // k32 steps of e4m3: the hi and lo query terms against the same K columns
#pragma unroll
                for (int kc = 0; kc < D / 32; ++kc) {
                    const u32 qo = (kc >> 2) * QT * 128 + (kc & 3) * 32;
                    const u64 kk = wg_desc_at(kd, (kc >> 2) * TILE * 128 + (kc & 3) * 32);
                    wg_ss_f8(s, wg_desc_at(qd, qo), kk, kc > 0);
                    wg_ss_f8(s, wg_desc_at(qd, QT * D + qo), kk, 1);
                }
            } else {
#pragma unroll
                for (int kc = 0; kc < NKC; ++kc)
                    wg_ss(s, wg_desc_at(qd, (kc >> 2) * QT * 128 + (kc & 3) * 32),
                          wg_desc_at(kd, (kc >> 2) * TILE * 128 + (kc & 3) * 32), kc > 0);
            }
            wg_commit();
            wg_wait<0>();
            wg_pin(s);
        }
#pragma unroll
        for (int kc = 0; kc < (WG ? 0 : NKC); ++kc) {
            u32 a_buf[4];
            const u32* a;
            if (Q_IN_REGS) a = qf[Q_IN_REGS ? kc : 0];
            else { q_frag(kc, a_buf); a = a_buf; }
            if constexpr (FP8_DIRECT) {
#pragma unroll
                for (int j = 0; j < NJ; ++j) {
                    const u32 w = lds32(ksm + kv8_at(kv_row0 + 8 * j + g, 16 * kc + 4 * t4));
                    u32 b0, b1;
                    if (FP8_PAIRS) fp8x4_to_f16x4(w, b0, b1);
                    else { b0 = fp8_lo(w); b1 = fp8_hi(w); }
                    mma16816(s[j], a, b0, b1);
                }
            } else {
#pragma unroll
                for (int j = 0; j < NJ; j += 2) {
                    u32 bb[4];
                    ldsm_x4(bb, smem_u32(ksm + kv_at(kv_row0 + 8 * j + (lane & 7) + 8 * (lane >> 4),
                                                     2 * kc + ((lane >> 3) & 1))));
                    mma16816(s[j], a, bb[0], bb[1]);
                    mma16816(s[j + 1], a, bb[2], bb[3]);
                }
            }
        }

        // ---- mask (only on tiles that need it), online softmax ----
        // The masked form is one branch per tile and branch-free inside (the mask word index is
        // clamped, so its load needs no guard): per-score branches around the mask loads spread
        // the tile loop over enough code to miss the instruction cache (ncu: "no instruction").
        // With a positive softmax scale the scores stay unscaled: the scale enters the maxima,
        // which it keeps exact (rounding is monotonic), and the exponents as one FMA (bf16 64-node
        // trees 4-11% faster than scaling every score first, H200). A zero or negative scale (a
        // negative one turns the smallest product into the max) scales first, and the softmax
        // then uses 1 (scu).
        // the score scale (log2 units) of this thread's two rows: sl2, times the rows' query
        // scales with FP8_QK
        float sc2[2] = {sl2, sl2};
        if constexpr (FP8_QK) {
            sc2[0] = sl2 * qexp[wm * 16 + g];
            sc2[1] = sl2 * qexp[wm * 16 + g + 8];
        }
        if (prescale) {
#pragma unroll
            for (int j = 0; j < NJ; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] *= sc2[e >> 1];
        }
        const int pos0 = tile * TILE + kv_row0;
        const bool need_mask = (tile + 1) * TILE > ctx || (window > 0 && tile * TILE < L - window);
        if (need_mask) {
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int pos = pos0 + 8 * j + 2 * t4 + (e & 1);
                    const int h = e >> 1;
                    const int jd = pos - ctx;   // draft index; < 0: the prefix, always visible
                    bool vis = pos < L;
                    if (MODE == 1) vis = vis & (jd <= tok[h]);
                    if (MODE == 2) {   // (a word past the row is never needed where pos < L)
                        const u32 word = __ldg(mrow[h] + min(max(jd, 0) >> 5, p.mask_words - 1));
                        vis = vis & ((jd < 0) | (bool)((word >> (jd & 31)) & 1u));
                    }
                    if (MODE == 1 && window > 0) vis = vis & (pos > ctx + tok[h] - window);
                    if (!vis) s[j][e] = neg_inf();
                }
            }
        }
        // Lazy rescaling: a row's reference max moves only when a score exceeds it by more than
        // RESCALE_TAU (log2 units; the first finite score always moves it), so probabilities stay
        // below 2^TAU (exact in fp32, in range for the 16-bit P). Whether any score of the warp's
        // rows does is one vote; only then does the warp reduce the rows' maxima across their
        // quads (two rounds of shuffles, which stalled every tile) and rescale its O accumulators
        // (NDC x 4 multiplies a thread). The result is the same as reducing on every tile.
        float alpha[2] = {1.f, 1.f}, tmx[2];
        const float scu[2] = {prescale ? 1.f : sc2[0], prescale ? 1.f : sc2[1]};
        bool over = false;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            tmx[h] = neg_inf();
#pragma unroll
            for (int j = 0; j < NJ; ++j) tmx[h] = fmaxf(tmx[h], fmaxf(s[j][2 * h], s[j][2 * h + 1]));
            over |= tmx[h] * scu[h] > m_run[h] + RESCALE_TAU;   // -inf + TAU stays -inf
        }
        if (__any_sync(0xffffffffu, over)) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float mx = warp_max4(tmx[h]) * scu[h];
                if (mx > m_run[h] + RESCALE_TAU) {
                    alpha[h] = exp2f(m_run[h] - mx);
                    m_run[h] = mx;
                }
            }
#pragma unroll
            for (int i = 0; i < NDC; ++i) {
                acc[i][0] *= alpha[0]; acc[i][1] *= alpha[0];
                acc[i][2] *= alpha[1]; acc[i][3] *= alpha[1];
            }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float m_ref = m_run[h] == neg_inf() ? 0.f : m_run[h];   // all masked: p = 0
            float rs = 0.f;
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                s[j][2 * h] = exp2f(fmaf(s[j][2 * h], scu[h], -m_ref));
                s[j][2 * h + 1] = exp2f(fmaf(s[j][2 * h + 1], scu[h], -m_ref));
                rs += s[j][2 * h] + s[j][2 * h + 1];
            }
            l_run[h] = l_run[h] * alpha[h] + rs;
        }

        // ---- O += P V (P rounded to the input type) ----
        if constexpr (WG) {
            // P as the register A operand, V (N-major: head-dim blocks TILE rows apart) from
            // shared memory, one k16 step per 16 positions
            u32 pa[NJ / 2][4];
#pragma unroll
            for (int i = 0; i < NJ / 2; ++i) {
                pa[i][0] = pack_mma2(s[2 * i][0], s[2 * i][1]);
                pa[i][1] = pack_mma2(s[2 * i][2], s[2 * i][3]);
                pa[i][2] = pack_mma2(s[2 * i + 1][0], s[2 * i + 1][1]);
                pa[i][3] = pack_mma2(s[2 * i + 1][2], s[2 * i + 1][3]);
            }
            const u64 vd = wg_desc(smem_u32(vsm) + kv_row0 * 128, TILE * 128, 1024);
            wg_fence();
#pragma unroll
            for (int i = 0; i < NJ / 2; ++i)
                wg_rs(acc, pa[i], wg_desc_at(vd, i * 16 * 128));
            wg_commit();
            wg_wait<0>();
            wg_pin(acc);
        }
#pragma unroll
        for (int i = 0; i < (WG ? 0 : NJ / 2); ++i) {
            u32 a[4];
            a[0] = pack_mma2(s[2 * i][0], s[2 * i][1]);
            a[1] = pack_mma2(s[2 * i][2], s[2 * i][3]);
            a[2] = pack_mma2(s[2 * i + 1][0], s[2 * i + 1][1]);
            a[3] = pack_mma2(s[2 * i + 1][2], s[2 * i + 1][3]);
            if constexpr (FP8_DIRECT) {
            // thread (g, t) gathers V[pos 2t, 2t+1, 2t+8, 2t+9][d = 32q + 4g + j], j = 0..3: the
            // four bytes of one 32-bit load per position feed four n8 chunks (output column g of
            // chunk 4q+j is head-dim 32q + 4g + j; the epilogue undoes this order).
            const int vr = kv_row0 + 16 * i + 2 * t4;
#pragma unroll
            for (int qd = 0; qd < D / 32; ++qd) {
                const int vc = 32 * qd + 4 * g;
                const u32 w0 = lds32(vsm + kv8_at(vr, vc)), w1 = lds32(vsm + kv8_at(vr + 1, vc));
                const u32 w2 = lds32(vsm + kv8_at(vr + 8, vc)), w3 = lds32(vsm + kv8_at(vr + 9, vc));
                if (FP8_PAIRS) {   // one permute per two column pairs
                    u32 b0[4], b1[4];
                    fp8_cols2<0>(w0, w1, b0[0], b0[1]);
                    fp8_cols2<2>(w0, w1, b0[2], b0[3]);
                    fp8_cols2<0>(w2, w3, b1[0], b1[1]);
                    fp8_cols2<2>(w2, w3, b1[2], b1[3]);
#pragma unroll
                    for (int j = 0; j < 4; ++j) mma16816(acc[4 * qd + j], a, b0[j], b1[j]);
                    continue;
                }
                mma16816(acc[4 * qd + 0], a, fp8_cols<0>(w0, w1), fp8_cols<0>(w2, w3));
                mma16816(acc[4 * qd + 1], a, fp8_cols<1>(w0, w1), fp8_cols<1>(w2, w3));
                mma16816(acc[4 * qd + 2], a, fp8_cols<2>(w0, w1), fp8_cols<2>(w2, w3));
                mma16816(acc[4 * qd + 3], a, fp8_cols<3>(w0, w1), fp8_cols<3>(w2, w3));
            }
            } else {
#pragma unroll
            for (int dc = 0; dc < NDC; dc += 2) {
                u32 bb[4];
                ldsm_x4_t(bb, smem_u32(vsm + kv_at(kv_row0 + 16 * i + (lane & 7) + 8 * ((lane >> 3) & 1),
                                                   dc + (lane >> 4))));
                mma16816(acc[dc], a, bb[0], bb[1]);
                mma16816(acc[dc + 1], a, bb[2], bb[3]);
            }
            }
        }
        // this stage's buffer is refilled by the next round's issue
        pipe_sync();
    }
    cp_async_wait<0>();
    __syncthreads();

#if JK_SPLIT_KV && JK_SD_PDL == 2 && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");   // see JK_SD_PDL
#endif

    // ---- epilogue: merge the WN warps of each row slab, then write ----
    float* o_s = reinterpret_cast<float*>(kv_s);      // [WN][QT][O_ROW] (reuses the pipeline)
    float* m_s = o_s + WN * QT * O_ROW;                // [WN][QT]
    float* l_s = m_s + WN * QT;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l_run[h] = warp_sum4(l_run[h]);
        if (t4 == 0) {
            m_s[wn * QT + wm * 16 + g + 8 * h] = m_run[h];
            l_s[wn * QT + wm * 16 + g + 8 * h] = l_run[h];
        }
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = wm * 16 + g + 8 * h;
        float M = neg_inf();
#pragma unroll
        for (int w = 0; w < WN; ++w) M = fmaxf(M, m_s[w * QT + r]);
        const float f = m_run[h] == neg_inf() ? 0.f : exp2f(m_run[h] - M);
        float* orow = o_s + (wn * QT + r) * O_ROW;
#pragma unroll
        for (int i = 0; i < NDC; ++i) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = 2 * t4 + e;
                const int d = FP8_DIRECT ? 32 * (i >> 2) + 4 * col + (i & 3) : 8 * i + col;
                orow[d] = acc[i][2 * h + e] * f;
            }
        }
    }
    __syncthreads();

    const bool direct = !JK_SPLIT_KV || p.num_splits == 1;
    for (int i = tid; i < QT * (D / 4); i += NT) {
        const int r = i / (D / 4), d = (i % (D / 4)) * 4;
        const int gr = row0 + r;
        if (gr >= R || d >= DQ) continue;
        float M = neg_inf();
#pragma unroll
        for (int w = 0; w < WN; ++w) M = fmaxf(M, m_s[w * QT + r]);
        float Ls = 0.f;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int w = 0; w < WN; ++w) {
            if (M != neg_inf()) Ls += l_s[w * QT + r] * exp2f(m_s[w * QT + r] - M);
            const float4 v = *reinterpret_cast<const float4*>(o_s + (w * QT + r) * O_ROW + d);
            o.x += v.x; o.y += v.y; o.z += v.z; o.w += v.w;
        }
        const int t = gr / G, gq = gr - t * G;
        const size_t idx = (size_t)(q_start + t) * p.hq + hk * G + gq;
        if (direct) {
            const float inv = Ls > 0.f ? vscale / Ls : 0.f;
            uint2 packed;
            packed.x = pack_in2(o.x * inv, o.y * inv);
            packed.y = pack_in2(o.z * inv, o.w * inv);
            *reinterpret_cast<uint2*>(p.out + idx * DQ + d) = packed;
        } else {
            const size_t widx = (size_t)split * p.total_q * p.hq + idx;
            *reinterpret_cast<float4*>(p.ws_o + widx * DQ + d) =
                make_float4(o.x * vscale, o.y * vscale, o.z * vscale, o.w * vscale);
            if (d == 0) p.ws_ml[widx] = make_float2(M, Ls);
        }
    }
#if JK_SPLIT_KV
    // Partials written: spec_dec_merge combines them (a programmatic dependent launch on sm_90+).
    // A fused merge by the last CTA of each (b, hk, rt) ran 1.08-1.5x slower on every split row
    // of 16-row tiles (H200, decode and chains at batch 1-8: one CTA's L2 round trips against a
    // grid-wide merge kernel; BENCHMARKS.md), so no tile merges in the kernel.
    if (direct) return;
    if constexpr (QT > 16) {
        // Code layout, not logic: the host passes no counters, so this block never runs past its
        // first line. Compiled out, the 128-row tree kernels ran 8-15% slower (H200, one
        // machine, 8k batch 1 64-node trees 33.5 -> 37.5 us, fp8 38.7 -> 42.0; the same register
        // count; 64-row tiles unchanged; 16-row tiles, which never had it, unchanged): that
        // kernel's speed follows its instruction layout in ways not understood (BENCHMARKS.md).
        if (p.counters == nullptr) return;
        __shared__ int s_last;
        __threadfence();
        __syncthreads();
        int* ctr = p.counters + ((size_t)b * p.hkv + hk) * p.row_tiles + rt;
        if (tid == 0) {
            const int prev = atomicAdd(ctr, 1);
            s_last = prev == p.num_splits - 1;
            if (s_last) *ctr = 0;
        }
        __syncthreads();
        if (!s_last) return;
        __threadfence();
        const size_t stride = (size_t)p.total_q * p.hq;
        for (int i = tid; i < QT * (D / 4); i += NT) {
            const int r = i / (D / 4), d = (i % (D / 4)) * 4;
            const int gr = row0 + r;
            if (gr >= R || d >= DQ) continue;
            const int t = gr / G, gq = gr - t * G;
            const size_t idx = (size_t)(q_start + t) * p.hq + hk * G + gq;
            merge_quad(p.ws_o, p.ws_ml, p.out, stride, p.num_splits, idx, d);
        }
    }
#endif
}

// ---- split-KV merge (its own kernel, after every split launch) ---------------------------------
// One thread per (query row, head, four head-dim elements), MERGE_KERNEL_U splits per round trip.
// The grid is latency bound (a few round trips through L2), so it must fit one wave: 8 splits a
// round keep a thread under 80 registers (six CTAs of 128 threads per SM). Loading 16 at once
// took 193 registers, two CTAs per SM, and two waves for 2048 rows: 4.3 us against 1 round trip
// of work (H200, ncu, 64-node tree at 1k, batch 1, 4 splits).
constexpr int MERGE_KERNEL_U = 8;
constexpr int MERGE_THREADS = 128;

struct MergeParams {
    const float* ws_o;     // [num_splits, rows, DQ]
    const float2* ws_ml;   // [num_splits, rows]
    in_t* out;             // [rows, DQ]
    int rows;              // total_q * hq
    int num_splits;
};

__global__ void __launch_bounds__(MERGE_THREADS, 6) spec_dec_merge(const MergeParams p) {
    const int i = blockIdx.x * MERGE_THREADS + threadIdx.x;
    const int idx = i / (DQ / 4), d = (i - idx * (DQ / 4)) * 4;
    if (idx >= p.rows) return;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // launched as a programmatic dependent of the attention grid: its partials are complete and
    // visible only after this (returns at once after an ordinary launch)
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    merge_quad<MERGE_KERNEL_U>(p.ws_o, p.ws_ml, p.out, (size_t)p.rows, p.num_splits, idx, d);
}

}  // namespace jk_sd
