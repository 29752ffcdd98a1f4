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
constexpr int CHUNKS = N / VEC;                   // 16-byte chunks per row
constexpr int K = CHUNKS / TPR;                   // chunks per thread
constexpr int MAX_T = 16;
constexpr int STAGE = 4;                          // B/C staging loads in flight per thread

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
__global__ void __launch_bounds__(THREADS) mtp_ssm_update(const UpdateParams prm) {
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

    const int slot = prm.state_idx ? prm.state_idx[b] : (int)b;
    input_t* out_b = prm.out + b * prm.out_sb + (long long)h * prm.out_sh + p0 + grp;

    if (slot == prm.pad_slot_id) {   // padded sequence: zeros out, state untouched
        if (lane == 0)
#pragma unroll
            for (int j = 0; j < RPT; ++j)
                if (active[j])
                    for (int t = 0; t < T; ++t)
                        out_b[t * prm.out_st + j * GROUPS] = from_f<input_t>(0.f);
        return;
    }
#if JK_INTERMEDIATE
    const int crow = prm.inter_idx ? prm.inter_idx[b] : slot;
    const bool bad_index = slot < 0 || slot >= prm.S || crow < 0 || crow >= prm.S2;
#else
    const bool bad_index = slot < 0 || slot >= prm.S;
#endif
    if (bad_index) {   // out-of-range index (not checked on the host: that would sync): NaN out
        if (lane == 0)
#pragma unroll
            for (int j = 0; j < RPT; ++j)
                if (active[j])
                    for (int t = 0; t < T; ++t)
                        out_b[t * prm.out_st + j * GROUPS] =
                            from_f<input_t>(__int_as_float(0x7fc00000));
        return;
    }

    // Row-major [P, N] inside a head: this thread's first element of its first row. Row j is
    // j * GROUPS rows further, chunk k is k * TPR * VEC elements further.
    const long long head_off = ((long long)h * prm.P + p0 + grp) * N + (long long)lane * VEC;
    constexpr int ROW_J = GROUPS * N;   // elements between a thread's consecutive rows
    state_t* st_row = prm.state + (long long)slot * prm.state_ss + head_off;
#if JK_INTERMEDIATE
    const long long step_stride = (long long)prm.H * prm.P * N;   // one node of intermediate
    state_t* it_row = prm.inter + (long long)crow * prm.inter_ss + head_off;
#endif

    // 1. Issue the state loads first: their latency overlaps the staging below.
    uint4 raw[RPT][K];
#pragma unroll
    for (int j = 0; j < RPT; ++j)
#pragma unroll
        for (int k = 0; k < K; ++k)
            raw[j][k] = active[j] ? *reinterpret_cast<const uint4*>(st_row + j * ROW_J + k * TPR * VEC)
                                  : make_uint4(0, 0, 0, 0);

    // 2. Stage B and C of this group, and the per-step scalars, in shared memory.
    float* sB = smem;
    float* sC = smem + T * N;
    {
        const input_t* Bb = prm.B + b * prm.B_sb + (long long)g * prm.B_sg;
        const input_t* Cb = prm.C + b * prm.C_sb + (long long)g * prm.C_sg;
        // Loads first, stores after: STAGE loads per thread in flight instead of one.
        for (int i0 = threadIdx.x; i0 < T * N; i0 += THREADS * STAGE) {
            float vb[STAGE], vc[STAGE];
#pragma unroll
            for (int u = 0; u < STAGE; ++u) {
                const int i = i0 + u * THREADS, t = i / N, n = i % N;
                if (i < T * N) {
                    vb[u] = to_f(__ldg(Bb + t * prm.B_st + n));
                    vc[u] = to_f(__ldg(Cb + t * prm.C_st + n));
                }
            }
#pragma unroll
            for (int u = 0; u < STAGE; ++u) {
                const int i = i0 + u * THREADS;
                if (i < T * N) {
                    sB[i] = vb[u];
                    sC[i] = vc[u];
                }
            }
        }
        for (int i = threadIdx.x; i < T * ROWS; i += THREADS) {
            const int t = i / ROWS, r = i % ROWS;
            if (p0 + r >= prm.P) continue;
            const long long xo = b * prm.x_sb + t * prm.x_st + (long long)h * prm.x_sh + p0 + r;
            s_x[t][r] = to_f(prm.x[xo]);
#if JK_HAS_Z
            s_z[t][r] = to_f(prm.z[b * prm.z_sb + t * prm.z_st + (long long)h * prm.z_sh + p0 + r]);
#endif
        }
        if (threadIdx.x < T) {
            const int t = threadIdx.x;
            float d = to_f(prm.dt[b * prm.dt_sb + t * prm.dt_st + (long long)h * prm.dt_sh]);
#if JK_HAS_DT_BIAS
            d += to_f(prm.dt_bias[(long long)h * prm.bias_sh]);
#endif
#if JK_DT_SOFTPLUS
            d = softplus(d);
#endif
            s_dt[t] = d;
            s_dA[t] = expf(to_f(prm.A[(long long)h * prm.A_sh]) * d);
#if JK_TREE
            s_parent[t] = prm.parent[b * T + t];
#endif
        }
    }
    __syncthreads();

    float hs[RPT][K][VEC];   // this thread's parts of its rows, fp32, for all steps
#pragma unroll
    for (int j = 0; j < RPT; ++j)
#pragma unroll
        for (int k = 0; k < K; ++k) unpack(raw[j][k], hs[j][k]);

#if JK_HAS_D
    const float Dh = to_f(prm.D[(long long)h * prm.D_sh]);
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

    // 3. The T steps.
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
                    *reinterpret_cast<uint4*>(it_row + (long long)t * step_stride + j * ROW_J +
                                              k * TPR * VEC) = pack(hs[j][k]);
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

    // 4. The state after the last step.
    if (!prm.disable_state_update) {
#pragma unroll
        for (int j = 0; j < RPT; ++j)
            if (active[j])
#pragma unroll
                for (int k = 0; k < K; ++k)
                    *reinterpret_cast<uint4*>(st_row + j * ROW_J + k * TPR * VEC) = pack(hs[j][k]);
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
