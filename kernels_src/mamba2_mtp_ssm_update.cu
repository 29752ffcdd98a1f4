// Mamba2 multi-token (MTP) SSM state update, with tree-based speculative decoding, and the
// commit of an accepted draft node into the state pool.
//
// The math is the spec's (mamba2_mtp_ssm_update.md): for each live sequence b, head h and step t
//     h_t = h_{t-1} * exp(A * dt_t) + B_t (outer) (x_t * dt_t)        [P, N] per head
//     y_t = sum_N(h_t * C_t) (+ x_t * D) (* z_t * sigmoid(z_t))
// where, in tree mode, h_{t-1} is replaced by the stored node of parent p when 0 <= p < t.
//
// Work split. The op is memory bound: per live sequence it reads the state [H, P, N] once and
// writes it T+1 times (T intermediate nodes + the final state). One thread block owns one
// (sequence b, head h, slice of ROWS consecutive rows p of the head), so batch 1 still launches
// H * P / ROWS blocks. Inside the block TPR consecutive threads (a row group) own RPT rows
// (grp, grp + GROUPS, ...): each thread keeps K 16-byte vectors of each of its rows (N / TPR
// elements per row) in fp32 registers for all T steps, so the state is read from memory once and
// every intermediate write is a coalesced 16-byte store. A thread's rows share every B/C read
// from shared memory and the per-step scalars (measured: shared-memory traffic and per-thread
// overhead, not DRAM, limited the one-row version). y is the sum of a row's TPR partial sums,
// taken with xor-shuffles inside the group's lanes.
//
// Shared memory holds what every row of the block needs for all T steps, loaded once before the
// step loop: B and C of the head's group ([T][N] fp32 each, dynamic), and per step the head's
// processed dt and exp(A*dt), this block's x and z rows, and the tree parent.
//
// Tree mode: a step whose parent is the previous step rounds its registers to the stored dtype
// (the same value a re-read would give); any other parent 0 <= p < t is re-read from the
// intermediate states (written by this same thread, so a plain load sees them). Two ways, by
// TREE_PREFETCH: loaded one step ahead into registers of their own (the latency hides behind a
// whole step, at RPT * K * 4 more live registers), or loaded right after the current node is
// stored into registers that replace the state (dead by then; the latency overlaps the step's
// reduction and output). 2-byte states need the second: the first costs them occupancy.
//
// Compile-time (macros set by the family): N, TPR, ROWS, RPT, the dtypes, and the flags HAS_D,
// HAS_Z, HAS_DT_BIAS, DT_SOFTPLUS, TREE, TREE_PREFETCH, INTERMEDIATE. Run-time: T, Bt (grid), H, P, G, strides,
// indices, pad_slot_id, disable_state_update. All element offsets are 64-bit.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef JK_N
#error "JK_N (d_state) must be defined"
#endif

namespace jk_mamba2 {

using state_t = JK_STATE_DTYPE;   // state pool and intermediate states
using input_t = JK_INPUT_DTYPE;   // x, B, C, z, out
using dt_t = JK_DT_DTYPE;         // dt
using a_t = JK_A_DTYPE;           // A
using d_t = JK_D_DTYPE;           // D
using bias_t = JK_DT_BIAS_DTYPE;  // dt_bias

constexpr int N = JK_N;
constexpr int TPR = JK_TPR;                       // threads per state row
constexpr int ROWS = JK_ROWS;                     // state rows (p) per block
constexpr int RPT = JK_RPT;                       // rows per thread (they share B/C reads)
constexpr int GROUPS = ROWS / RPT;                // row groups of TPR threads
constexpr int THREADS = GROUPS * TPR;
constexpr int VEC = 16 / (int)sizeof(state_t);    // state elements per 16-byte access
constexpr int IVEC = 16 / (int)sizeof(input_t);   // B/C elements per 16-byte access
constexpr int CHUNKS = N / VEC;                   // 16-byte chunks per row
constexpr int K = CHUNKS / TPR;                   // chunks per thread
constexpr int MAX_T = 16;
// Blocks per SM the register budget must allow: 256-thread blocks need 48 registers or fewer for
// five per SM (measured: fp32 16 x 1 x 256 at 60 registers, four blocks per SM, was 6% slower at
// T = 4, batch 256, than the same code held to 48).
#ifndef JK_MIN_BLOCKS
#define JK_MIN_BLOCKS (THREADS >= 256 ? 5 : 0)
#endif
constexpr int MIN_BLOCKS = JK_MIN_BLOCKS;
// The step loop unrolled twice for tree kernels with 2-byte states: two steps' shared-memory
// reads, reductions and parent checks interleave. Measured (H200, engine mode): bf16 trees 2-6%
// faster (T = 4 and 8, batch 1 to 256); chain kernels even, fp32 trees 1% slower.
#ifndef JK_STEP_UNROLL
#define JK_STEP_UNROLL (JK_TREE && sizeof(state_t) == 2 ? 2 : 1)
#endif
constexpr int STEP_UNROLL = JK_STEP_UNROLL;
// Staging loads in flight per thread (each of B and C; x and z). B/C move in 16-byte vectors
// whenever their rows are 16-byte aligned (measured, H200: 5-11% faster for bf16 state at batch
// 32, up to 13% at batch 1; with the one-round-trip prologue below also for fp32 state: 4-9%
// faster at batch 1, even at batch 32 and 256), else in scalars. 256-thread blocks take fewer,
// to stay within the 48 registers of five blocks per SM without spilling.
constexpr bool TIGHT = THREADS >= 256;
constexpr int STAGE = TIGHT ? 2 : 4;              // scalar loads
constexpr int STAGE_V = TIGHT ? 1 : 2;            // 16-byte loads

static_assert(N % 16 == 0 && N >= 16 && N <= 512, "N must be a multiple of 16 in [16, 512]");
static_assert((TPR & (TPR - 1)) == 0 && TPR <= 32, "TPR must be a power of two <= 32");
static_assert(CHUNKS % TPR == 0, "TPR must divide the row's 16-byte chunks");
static_assert(ROWS % RPT == 0, "RPT must divide ROWS");
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "ROWS / RPT * TPR must be whole warps");

// ---- scalar conversions (fp32 is the compute type) ----
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// ---- one 16-byte vector of state elements <-> VEC floats ----
__device__ __forceinline__ void unpack(const uint4& u, float (&f)[VEC]) {
    const state_t* e = reinterpret_cast<const state_t*>(&u);
#pragma unroll
    for (int i = 0; i < VEC; ++i) f[i] = to_f(e[i]);
}
__device__ __forceinline__ uint4 pack(const float (&f)[VEC]) {
    uint4 u;
    state_t* e = reinterpret_cast<state_t*>(&u);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_f<state_t>(f[i]);
    return u;
}

// ---- state traffic: 16-byte loads and stores ----
// Chain kernels store streaming (st.global.cs, evict-first in L2): they never read the
// intermediate and final states back, and without the hint those crowd the lines still to be
// read out of L2. Measured (H200, benchmarks/probe_cache_hints.py): bf16 batch 32 T = 1
// 58.4 -> 54.7 us (81% -> 87% of copy), T = 8 +2%, fp32 T = 4 +5-7%. An explicit L2 evict_first
// policy measured the same; load hints (an L2 prefetch size of 256 bytes, no L1 allocation)
// gained <= 2% alone and lost with streaming stores. Tree kernels read parent nodes back: with
// every store streaming they were 6-12% slower (the nodes came back from DRAM), with only the
// nodes never read back streaming still 1-4% slower than plain stores, which they keep.
// Plain decoding (no intermediate states: the state is read and written back in place) loads
// with .L1::no_allocate.L2::256B: at batch 256 6.5% (fp32) and 9.4% (bf16) faster, even at
// batch 32 (probe_cache_hints.py --engine). With intermediate states the load hints were within
// 1.5% either way, so those kernels keep plain loads.
// JK_LD_HINT / JK_ST_HINT select the variants for the probe.
#ifndef JK_LD_HINT
#define JK_LD_HINT (JK_INTERMEDIATE ? 0 : 2)   // 1: ld .L2::256B, 2: ld .L1::no_allocate.L2::256B
#endif
#ifndef JK_ST_HINT
#define JK_ST_HINT (JK_TREE ? 0 : 1)   // 0: plain st, 1: st.cs, 2: st, L2 evict_first policy
#endif
__device__ __forceinline__ uint4 ld_state(const void* p) {
    uint4 v;
#if JK_LD_HINT == 1
    asm volatile("ld.global.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
#elif JK_LD_HINT == 2
    asm volatile("ld.global.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
#else
    v = *reinterpret_cast<const uint4*>(p);
#endif
    return v;
}
__device__ __forceinline__ void st_state(void* p, const uint4& v) {
#if JK_ST_HINT == 1
    __stcs(reinterpret_cast<uint4*>(p), v);   // st.global.cs
#elif JK_ST_HINT == 2
    asm volatile("{ .reg .b64 pol;\n createpolicy.fractional.L2::evict_first.b64 pol, 1.0;\n"
                 " st.global.L2::cache_hint.v4.u32 [%0], {%1,%2,%3,%4}, pol; }\n"
                 :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
#else
    *reinterpret_cast<uint4*>(p) = v;
#endif
}

// 16 bytes of B/C (input dtype) -> IVEC floats in shared memory (16-byte aligned: N % 16 == 0)
__device__ __forceinline__ void unpack_in(const uint4& u, float* dst) {
    const input_t* e = reinterpret_cast<const input_t*>(&u);
#pragma unroll
    for (int i = 0; i < IVEC; i += 4)
        *reinterpret_cast<float4*>(dst + i) =
            make_float4(to_f(e[i]), to_f(e[i + 1]), to_f(e[i + 2]), to_f(e[i + 3]));
}

__device__ __forceinline__ float softplus(float v) {
    // Thresholded like the reference: exp overflows past ~88, and log1p(exp(v)) == v above 20.
    return v > 20.f ? v : log1pf(expf(v));
}

// Kernel arguments, one struct by value (the family declares the same fields in this order).
struct UpdateParams {
    state_t* state;                 // [S, H, P, N], slot stride state_ss, rows contiguous
    const input_t* x;               // [Bt, T, H, P]
    const dt_t* dt;                 // [Bt, T, H] (any stride over a P axis is ignored)
    const a_t* A;                   // [H]
    const input_t* B;               // [Bt, T, G, N]
    const input_t* C;               // [Bt, T, G, N]
    const d_t* D;                   // [H] or null
    const input_t* z;               // [Bt, T, H, P] or null
    const bias_t* dt_bias;          // [H] or null
    input_t* out;                   // [Bt, T, H, P]
    state_t* inter;                 // [S2, T, H, P, N] or null; slot stride inter_ss
    const int* state_idx;           // [Bt] or null (slot = b)
    const int* inter_idx;           // [Bt] or null (row = slot)
    const int* parent;              // [Bt, T] contiguous, or null
    long long state_ss, inter_ss;
    long long x_sb, x_st, x_sh;
    long long dt_sb, dt_st, dt_sh;
    long long B_sb, B_st, B_sg;
    long long C_sb, C_st, C_sg;
    long long z_sb, z_st, z_sh;
    long long out_sb, out_st, out_sh;
    long long A_sh, D_sh, bias_sh;
    int T, H, P, heads_per_group, S, S2, pad_slot_id, disable_state_update;
};

// Grid: (ceil(P / ROWS), H, Bt). Block: THREADS. Dynamic shared memory: 2 * T * N floats.
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) mtp_ssm_update(const UpdateParams prm) {
    extern __shared__ float smem[];   // sB[T][N], then sC[T][N]
    __shared__ float s_dt[MAX_T];     // processed dt (bias, softplus) of this head
    __shared__ float s_dA[MAX_T];     // exp(A * dt)
    __shared__ float s_x[MAX_T][ROWS];
#if JK_HAS_Z
    __shared__ float s_z[MAX_T][ROWS];
#endif
#if JK_TREE
    __shared__ int s_parent[MAX_T];
#endif

    const int T = prm.T;
    const int grp = threadIdx.x / TPR;          // row group: rows grp + j * GROUPS, j < RPT
    const int lane = threadIdx.x % TPR;         // which chunks of those rows
    const int h = blockIdx.y;
    const long long b = blockIdx.z;
    const int p0 = blockIdx.x * ROWS;
    const int g = h / prm.heads_per_group;
    // Rows past P exist only when ROWS does not divide P: they load and store nothing but still
    // take part in the shuffles and the barrier.
    bool active[RPT];
#pragma unroll
    for (int j = 0; j < RPT; ++j) active[j] = p0 + grp + j * GROUPS < prm.P;

    // The prologue is one round trip, not a chain of them: at small batches a block's prologue
    // is on the kernel's critical path (ncu, batch 1, H = 32: six dependent round trips before
    // the first step, 55% of the samples at T = 8). So every load that does not depend on the
    // sequence's slot is issued before anything waits on the slot, no load sits behind a branch
    // (indices are clamped instead; only the stores are predicated), and values stay in their
    // stored type until they are stored, so no conversion waits on a load before the next one
    // is issued. The pad / bad-index exit comes after the barrier.

    // 1. The slot, then everything that does not depend on it.
    const int slot = prm.state_idx ? prm.state_idx[b] : (int)b;
#if JK_INTERMEDIATE
    const int crow = prm.inter_idx ? prm.inter_idx[b] : slot;
#endif
    // Per-step scalars: thread t < T loads step t (the others load step T - 1 and drop it).
    const int ts = min((int)threadIdx.x, T - 1);
    const dt_t dt_r = prm.dt[b * prm.dt_sb + ts * prm.dt_st + (long long)h * prm.dt_sh];
    const a_t a_r = prm.A[(long long)h * prm.A_sh];
#if JK_HAS_DT_BIAS
    const bias_t bias_r = prm.dt_bias[(long long)h * prm.bias_sh];
#endif
#if JK_TREE
    const int par_r = prm.parent[b * T + ts];
#endif
#if JK_HAS_D
    const d_t D_r = prm.D[(long long)h * prm.D_sh];
#endif

    // B and C of this group, in 16-byte vectors when their rows allow it, and this block's x
    // (and z) rows: the first round of each is loaded here (the scalar B/C fallback, for
    // misaligned rows, loads all its rounds below).
    const input_t* Bb = prm.B + b * prm.B_sb + (long long)g * prm.B_sg;
    const input_t* Cb = prm.C + b * prm.C_sb + (long long)g * prm.C_sg;
    constexpr int RV = N / IVEC;   // 16-byte vectors per B/C row
    const bool vec_bc =
        ((reinterpret_cast<unsigned long long>(Bb) | reinterpret_cast<unsigned long long>(Cb)) & 15) == 0 &&
        prm.B_st % IVEC == 0 && prm.C_st % IVEC == 0;
    auto load_bc_v = [&](int i0, uint4 (&vb)[STAGE_V], uint4 (&vc)[STAGE_V]) {
#pragma unroll
        for (int u = 0; u < STAGE_V; ++u) {
            const int i = min(i0 + u * THREADS, T * RV - 1), t = i / RV, c = i % RV;
            vb[u] = __ldg(reinterpret_cast<const uint4*>(Bb + t * prm.B_st + c * IVEC));
            vc[u] = __ldg(reinterpret_cast<const uint4*>(Cb + t * prm.C_st + c * IVEC));
        }
    };
    auto load_bc_s = [&](int i0, input_t (&vb)[STAGE], input_t (&vc)[STAGE]) {
#pragma unroll
        for (int u = 0; u < STAGE; ++u) {
            const int i = min(i0 + u * THREADS, T * N - 1), t = i / N, n = i % N;
            vb[u] = __ldg(Bb + t * prm.B_st + n);
            vc[u] = __ldg(Cb + t * prm.C_st + n);
        }
    };
    auto load_x = [&](int i0, input_t (&vx)[STAGE], input_t (&vz)[STAGE]) {
#pragma unroll
        for (int u = 0; u < STAGE; ++u) {
            const int i = min(i0 + u * THREADS, T * ROWS - 1), t = i / ROWS;
            const long long p = min(p0 + i % ROWS, prm.P - 1);
            vx[u] = __ldg(prm.x + b * prm.x_sb + t * prm.x_st + (long long)h * prm.x_sh + p);
#if JK_HAS_Z
            vz[u] = __ldg(prm.z + b * prm.z_sb + t * prm.z_st + (long long)h * prm.z_sh + p);
#endif
        }
    };
    uint4 vb0[STAGE_V], vc0[STAGE_V];
    input_t vx0[STAGE], vz0[STAGE];
    if (vec_bc) load_bc_v(threadIdx.x, vb0, vc0);
    load_x(threadIdx.x, vx0, vz0);

    // 2. The state loads, once the slot is known.
#if JK_INTERMEDIATE
    const bool bad_index = slot < 0 || slot >= prm.S || crow < 0 || crow >= prm.S2;
#else
    const bool bad_index = slot < 0 || slot >= prm.S;
#endif
    const bool pad = slot == prm.pad_slot_id;   // a pad id may lie outside the pool
    const bool live = !pad && !bad_index;
    // Row-major [P, N] inside a head: this thread's first element of its first row. Row j is
    // j * GROUPS rows further, chunk k is k * TPR * VEC elements further.
    const long long head_off = ((long long)h * prm.P + p0 + grp) * N + (long long)lane * VEC;
    constexpr int ROW_J = GROUPS * N;   // elements between a thread's consecutive rows
    state_t* st_row = prm.state + (long long)(live ? slot : 0) * prm.state_ss + head_off;
#if JK_INTERMEDIATE
    const long long step_stride = (long long)prm.H * prm.P * N;   // one node of intermediate
    state_t* it_row = prm.inter + (long long)(live ? crow : 0) * prm.inter_ss + head_off;
#endif
    uint4 raw[RPT][K];
#pragma unroll
    for (int j = 0; j < RPT; ++j)
#pragma unroll
        for (int k = 0; k < K; ++k)
            raw[j][k] = active[j] && live ? ld_state(st_row + j * ROW_J + k * TPR * VEC)
                                          : make_uint4(0, 0, 0, 0);

    // 3. Stage B, C, x, z and the per-step scalars in shared memory (further rounds, when T
    //    needs them, load and store in turn).
    float* sB = smem;
    float* sC = smem + T * N;
    // Round i0's values to shared memory (round 0 from the registers loaded above: it is
    // stored before the loop over further rounds, so those registers die here).
    auto store_bc_v = [&](int i0, const uint4 (&vb)[STAGE_V], const uint4 (&vc)[STAGE_V]) {
#pragma unroll
        for (int u = 0; u < STAGE_V; ++u) {
            const int i = i0 + u * THREADS;
            if (i < T * RV) {
                // i / RV * N + i % RV * IVEC == i * IVEC: the rows are dense in shared
                unpack_in(vb[u], sB + i * IVEC);
                unpack_in(vc[u], sC + i * IVEC);
            }
        }
    };
    auto store_bc_s = [&](int i0, const input_t (&vb)[STAGE], const input_t (&vc)[STAGE]) {
#pragma unroll
        for (int u = 0; u < STAGE; ++u) {
            const int i = i0 + u * THREADS;
            if (i < T * N) {
                sB[i] = to_f(vb[u]);
                sC[i] = to_f(vc[u]);
            }
        }
    };
    auto store_x = [&](int i0, const input_t (&vx)[STAGE], const input_t (&vz)[STAGE]) {
#pragma unroll
        for (int u = 0; u < STAGE; ++u) {
            const int i = i0 + u * THREADS, t = i / ROWS, r = i % ROWS;
            if (i < T * ROWS && p0 + r < prm.P) {
                s_x[t][r] = to_f(vx[u]);
#if JK_HAS_Z
                s_z[t][r] = to_f(vz[u]);
#endif
            }
        }
        (void)vz;
    };
    if (vec_bc) {
        store_bc_v(threadIdx.x, vb0, vc0);
        for (int i0 = threadIdx.x + THREADS * STAGE_V; i0 < T * RV; i0 += THREADS * STAGE_V) {
            uint4 vb[STAGE_V], vc[STAGE_V];
            load_bc_v(i0, vb, vc);
            store_bc_v(i0, vb, vc);
        }
    } else {
        for (int i0 = threadIdx.x; i0 < T * N; i0 += THREADS * STAGE) {
            input_t vb[STAGE], vc[STAGE];
            load_bc_s(i0, vb, vc);
            store_bc_s(i0, vb, vc);
        }
    }
    store_x(threadIdx.x, vx0, vz0);
    for (int i0 = threadIdx.x + THREADS * STAGE; i0 < T * ROWS; i0 += THREADS * STAGE) {
        input_t vx[STAGE], vz[STAGE];
        load_x(i0, vx, vz);
        store_x(i0, vx, vz);
    }
    if (threadIdx.x < T) {
        float d = to_f(dt_r);
#if JK_HAS_DT_BIAS
        d += to_f(bias_r);
#endif
#if JK_DT_SOFTPLUS
        d = softplus(d);
#endif
        s_dt[threadIdx.x] = d;
        s_dA[threadIdx.x] = expf(to_f(a_r) * d);
#if JK_TREE
        s_parent[threadIdx.x] = par_r;
#endif
    }
    __syncthreads();

    // A padded sequence writes zeros and leaves its state alone; an out-of-range index (not
    // checked on the host: that would sync) writes NaN. Uniform per block: the whole block
    // leaves here.
    if (!live) {
        const float fill = pad ? 0.f : __int_as_float(0x7fc00000);
        input_t* out_b = prm.out + b * prm.out_sb + (long long)h * prm.out_sh + p0;
        for (int i = threadIdx.x; i < T * ROWS; i += THREADS)
            if (p0 + i % ROWS < prm.P)
                out_b[i / ROWS * prm.out_st + i % ROWS] = from_f<input_t>(fill);
        return;
    }
    input_t* out_b = prm.out + b * prm.out_sb + (long long)h * prm.out_sh + p0 + grp;

    float hs[RPT][K][VEC];   // this thread's parts of its rows, fp32, for all steps
#pragma unroll
    for (int j = 0; j < RPT; ++j)
#pragma unroll
        for (int k = 0; k < K; ++k) unpack(raw[j][k], hs[j][k]);

#if JK_HAS_D
    const float Dh = to_f(D_r);
#endif
#if JK_TREE && JK_TREE_PREFETCH
    // The parent node of the next step, loaded one step ahead so its latency hides behind the
    // current step. This thread wrote exactly these elements earlier, so a plain load sees them.
    // Costs RPT * K * 4 live registers for the whole loop (fp32 state has them to spare).
    uint4 pre[RPT][K];
#pragma unroll
    for (int j = 0; j < RPT; ++j)
#pragma unroll
        for (int k = 0; k < K; ++k) pre[j][k] = make_uint4(0, 0, 0, 0);
#endif

    // y of step t: the sum of each row's TPR partial sums (consecutive lanes of one warp), then
    // D, the gate, and the store by the row's first lane.
    auto finish_step = [&](int t, const float (&xv)[RPT], float (&y)[RPT]) {
#pragma unroll
        for (int o = TPR / 2; o > 0; o >>= 1)
#pragma unroll
            for (int j = 0; j < RPT; ++j) y[j] += __shfl_xor_sync(0xffffffffu, y[j], o);
        if (lane == 0) {
#pragma unroll
            for (int j = 0; j < RPT; ++j) {
                if (!active[j]) continue;
                float yj = y[j];
#if JK_HAS_D
                yj = fmaf(xv[j], Dh, yj);
#endif
#if JK_HAS_Z
                const float zv = s_z[t][grp + j * GROUPS];
                yj *= zv / (1.f + expf(-zv));
#endif
                out_b[t * prm.out_st + j * GROUPS] = from_f<input_t>(yj);
            }
        }
    };

    // 4. The T steps.
#pragma unroll STEP_UNROLL
    for (int t = 0; t < T; ++t) {
#if JK_TREE && JK_TREE_PREFETCH
        if (t > 0) {
            const int par = s_parent[t];
            if (par == t - 1) {
                // The parent is the previous step, still in registers: the stored node is its
                // rounded value, so round in place (a no-op for fp32 state).
                if (sizeof(state_t) != sizeof(float)) {
#pragma unroll
                    for (int j = 0; j < RPT; ++j)
#pragma unroll
                        for (int k = 0; k < K; ++k) unpack(pack(hs[j][k]), hs[j][k]);
                }
            } else if (par >= 0 && par < t) {
#pragma unroll
                for (int j = 0; j < RPT; ++j)
#pragma unroll
                    for (int k = 0; k < K; ++k) unpack(pre[j][k], hs[j][k]);
            }
        }
        if (t + 1 < T) {   // prefetch step t+1's parent when it is already stored (< t)
            const int np = s_parent[t + 1];
            if (np >= 0 && np < t) {
#pragma unroll
                for (int j = 0; j < RPT; ++j)
#pragma unroll
                    for (int k = 0; k < K; ++k)
                        if (active[j])
                            pre[j][k] = *reinterpret_cast<const uint4*>(
                                it_row + (long long)np * step_stride + j * ROW_J + k * TPR * VEC);
            }
        }
#endif
        const float dA = s_dA[t];
        const float dtt = s_dt[t];
        float xv[RPT], xdt[RPT], y[RPT];
#pragma unroll
        for (int j = 0; j < RPT; ++j) {
            xv[j] = s_x[t][grp + j * GROUPS];
            xdt[j] = xv[j] * dtt;
            y[j] = 0.f;
        }
        const float* Bt = sB + t * N + lane * VEC;
        const float* Ct = sC + t * N + lane * VEC;
#pragma unroll
        for (int k = 0; k < K; ++k) {
#pragma unroll
            for (int v = 0; v < VEC; v += 4) {
                // one read of B and C serves all RPT rows of this thread
                const float4 bv = *reinterpret_cast<const float4*>(Bt + k * TPR * VEC + v);
                const float4 cv = *reinterpret_cast<const float4*>(Ct + k * TPR * VEC + v);
#pragma unroll
                for (int j = 0; j < RPT; ++j) {
                    float* hv = &hs[j][k][v];
                    hv[0] = fmaf(hv[0], dA, bv.x * xdt[j]);
                    hv[1] = fmaf(hv[1], dA, bv.y * xdt[j]);
                    hv[2] = fmaf(hv[2], dA, bv.z * xdt[j]);
                    hv[3] = fmaf(hv[3], dA, bv.w * xdt[j]);
                    y[j] = fmaf(hv[0], cv.x, y[j]);
                    y[j] = fmaf(hv[1], cv.y, y[j]);
                    y[j] = fmaf(hv[2], cv.z, y[j]);
                    y[j] = fmaf(hv[3], cv.w, y[j]);
                }
            }
        }
#if JK_INTERMEDIATE
#pragma unroll
        for (int j = 0; j < RPT; ++j) {
            if (active[j]) {
#pragma unroll
                for (int k = 0; k < K; ++k)
                    st_state(it_row + (long long)t * step_stride + j * ROW_J + k * TPR * VEC,
                             pack(hs[j][k]));
            }
        }
#endif
#if JK_TREE && !JK_TREE_PREFETCH
        // Lean tree path: the next step's parent is decided here, after this step's node is
        // stored. A parent stored earlier (np < t) is loaded into registers that replace hs (dead
        // once stored), so the tree costs no registers beyond the chain kernel's; the load's
        // latency overlaps this step's reduction and output store.
        const int np = t + 1 < T ? s_parent[t + 1] : -1;
        if (np >= 0 && np < t) {
            uint4 node[RPT][K];
#pragma unroll
            for (int j = 0; j < RPT; ++j)
#pragma unroll
                for (int k = 0; k < K; ++k)
                    node[j][k] = active[j] ? *reinterpret_cast<const uint4*>(
                                                 it_row + (long long)np * step_stride +
                                                 j * ROW_J + k * TPR * VEC)
                                           : make_uint4(0, 0, 0, 0);
            finish_step(t, xv, y);
#pragma unroll
            for (int j = 0; j < RPT; ++j)
#pragma unroll
                for (int k = 0; k < K; ++k) unpack(node[j][k], hs[j][k]);
            continue;
        }
        if (np == t && sizeof(state_t) != sizeof(float)) {
            // The parent is this step, still in registers: the stored node is its rounded
            // value, so round in place (fp32 state: nothing to do).
#pragma unroll
            for (int j = 0; j < RPT; ++j)
#pragma unroll
                for (int k = 0; k < K; ++k) unpack(pack(hs[j][k]), hs[j][k]);
        }
#endif
        finish_step(t, xv, y);
    }

    // 5. The state after the last step.
    if (!prm.disable_state_update) {
#pragma unroll
        for (int j = 0; j < RPT; ++j)
            if (active[j])
#pragma unroll
                for (int k = 0; k < K; ++k)
                    st_state(st_row + j * ROW_J + k * TPR * VEC, pack(hs[j][k]));
    }
}

// ---- commit: state[s] = intermediate_states[ci, accepted_step[b]] ----

struct CommitParams {
    state_t* state;                 // [S, H, P, N], slot stride state_ss
    const state_t* inter;           // [S2, T, H, P, N], slot stride inter_ss
    const int* accepted;            // [Bt]: step to commit, -1 = keep the state
    const int* state_idx;           // [Bt] or null
    const int* inter_idx;           // [Bt] or null
    long long state_ss, inter_ss;
    long long step_stride;          // H * P * N elements
    long long vecs;                 // 16-byte vectors per node (H * P * N / VEC)
    int T, S, S2, pad_slot_id;
};

constexpr int COMMIT_THREADS = 256;
constexpr int COMMIT_UNROLL = 4;    // 16-byte vectors in flight per thread

// Grid: (ceil(vecs / (COMMIT_THREADS * COMMIT_UNROLL)), Bt). A plain copy of one node per
// sequence; sequences that accepted nothing, are padded, or carry an out-of-range index or step
// are skipped.
__global__ void __launch_bounds__(COMMIT_THREADS) commit_accepted_state(const CommitParams prm) {
    const long long b = blockIdx.y;
    const int step = prm.accepted[b];
    if (step < 0 || step >= prm.T) return;
    const int slot = prm.state_idx ? prm.state_idx[b] : (int)b;
    if (slot == prm.pad_slot_id || slot < 0 || slot >= prm.S) return;
    const int crow = prm.inter_idx ? prm.inter_idx[b] : slot;
    if (crow < 0 || crow >= prm.S2) return;

    const uint4* src = reinterpret_cast<const uint4*>(
        prm.inter + (long long)crow * prm.inter_ss + (long long)step * prm.step_stride);
    uint4* dst = reinterpret_cast<uint4*>(prm.state + (long long)slot * prm.state_ss);
    const long long base = (long long)blockIdx.x * COMMIT_THREADS * COMMIT_UNROLL + threadIdx.x;
    uint4 v[COMMIT_UNROLL];
#pragma unroll
    for (int u = 0; u < COMMIT_UNROLL; ++u) {
        const long long i = base + (long long)u * COMMIT_THREADS;
        if (i < prm.vecs) v[u] = src[i];
    }
#pragma unroll
    for (int u = 0; u < COMMIT_UNROLL; ++u) {
        const long long i = base + (long long)u * COMMIT_THREADS;
        if (i < prm.vecs) dst[i] = v[u];
    }
}

}  // namespace jk_mamba2
