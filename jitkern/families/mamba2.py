"""The Mamba2 multi-token SSM update family: ``kernels_src/mamba2_mtp_ssm_update.cu``.

Two entries in one module: ``update`` (the T-step state update with optional intermediate
states and draft tree) and ``commit`` (copy an accepted intermediate node into the state pool).

Compile-time parameters are those that change the code a thread runs: the row length ``N`` (the
register array of a thread and the unrolled inner loop), the tiling (``TPR`` threads per state
row, ``ROWS`` rows per block, ``RPT`` rows per thread; in tree mode ``tree_prefetch``, how a
parent node is read back), the six dtypes, and the optional-tensor / mode flags. Everything
that only enters address arithmetic (T, Bt, H, P, G, strides, indices, pad id,
disable_state_update) is a run-time argument, so one specialization serves every batch, draft
length and head count of a model. See jitkern.ops.mamba2 for how the tiling is chosen.
"""

from __future__ import annotations

from .. import dtypes
from ..family import Entry, IntRange, KernelFamily, Param, register_family

FLOAT_DTYPES = ("fp32", "bf16", "fp16")
ESIZE = {"fp32": 4, "bf16": 2, "fp16": 2}

# Field order and C types of jk_mamba2::UpdateParams / CommitParams (one struct by value).
UPDATE_SIGNATURE = tuple(
    [(n, "ptr") for n in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "out", "inter",
                          "state_idx", "inter_idx", "parent")]
    + [(n, "i64") for n in ("state_ss", "inter_ss", "x_sb", "x_st", "x_sh", "dt_sb", "dt_st",
                            "dt_sh", "B_sb", "B_st", "B_sg", "C_sb", "C_st", "C_sg", "z_sb",
                            "z_st", "z_sh", "out_sb", "out_st", "out_sh", "A_sh", "D_sh",
                            "bias_sh")]
    + [(n, "i32") for n in ("T", "H", "P", "heads_per_group", "S", "S2", "pad_slot_id",
                            "disable_state_update")])

COMMIT_SIGNATURE = tuple(
    [(n, "ptr") for n in ("state", "inter", "accepted", "state_idx", "inter_idx")]
    + [(n, "i64") for n in ("state_ss", "inter_ss", "step_stride", "vecs")]
    + [(n, "i32") for n in ("T", "S", "S2", "pad_slot_id")])

MAX_T = 16                # the kernel's per-step shared arrays
COMMIT_THREADS = 256      # jk_mamba2::COMMIT_THREADS
COMMIT_UNROLL = 4         # jk_mamba2::COMMIT_UNROLL


def chunks_per_row(N: int, state_dtype: str) -> int:
    """16-byte vectors in one state row of N elements."""
    return N * ESIZE[state_dtype] // 16


# The compile-time choices by state element size, tree mode and one token (T == 1) or more:
# (threads per block, threads per row, rows per thread). Chosen by measurement on an H200
# (BENCHMARKS.md: variants, tiling sweep and table).
# fp32: 16 threads x 2 rows, in 128-thread blocks with T > 1. In the calls an engine makes (T > 1:
# intermediates stored, the state not written) it was 15-16% faster than 16 x 1 x 256 at T = 4
# (batch 32 and 256) and even at T = 8 (benchmarks/probe_cache_hints.py --engine); 16 x 1 x 256
# had been 1-3% faster only when the state is written back as well (64-thread blocks: 1-2% faster
# from batch 32, 6-14% slower at H = 32 batch 8). At T = 1 16 x 2 x 128 reached 89-93% of copy
# against 77-80% for 256-thread blocks (per-block fixed costs dominate one step), and 64-thread
# blocks (8 rows) 1.006-1.039x of that again on all 17 plain-decoding rows of H = 32 and 128,
# batch 1-256, so T = 1 takes those.
# 2-byte state, T > 1: 8 x 2 in 64-thread blocks (16 rows); with B/C staged in 16-byte vectors
# it was 1-3% faster than 128-thread blocks at batch 32 and 256 (before that change, 3-8%
# slower); 4 x 1, 4 x 2, 8 x 1, 16 x 2 and 256-thread blocks were 3-36% slower. T = 1 keeps
# 8 x 2 x 128.
# Tree kernels read a parent node into the registers of the state it replaces: prefetching it one
# step ahead costs 16 registers (bf16: 80 per thread, 6 blocks per SM instead of 8; 9-23% slower
# at batch >= 32) and gained fp32 at most 0.8%, so tree_prefetch is never chosen (the parameter
# stays for measurements).
DEFAULT_TILING = {
    (4, False, False): (128, 16, 2), (4, False, True): (64, 16, 2),
    (4, True, False): (128, 16, 2), (4, True, True): (64, 16, 2),
    (2, False, False): (64, 8, 2), (2, False, True): (128, 8, 2),
    (2, True, False): (64, 8, 2), (2, True, True): (128, 8, 2),
}


def pick_tiling(N: int, state_dtype: str, P: int, tree: bool = False, T: int | None = None,
                threads: int | None = None, tpr: int | None = None,
                rpt: int | None = None) -> tuple:
    """(TPR, ROWS, RPT) for rows of N state elements and head_dim P (a multiple of 8).

    TPR threads per row: the largest power of two <= ``tpr`` dividing the row's 16-byte chunks.
    RPT rows per thread. ROWS rows per block: the most with ROWS / RPT * TPR <= ``threads``,
    whole warps, ROWS dividing P. Unset arguments come from DEFAULT_TILING (T: tokens per
    sequence, when known; one step favours a different tiling)."""
    d_threads, d_tpr, d_rpt = DEFAULT_TILING[(ESIZE[state_dtype], bool(tree), T == 1)]
    threads = threads or d_threads
    t = tpr or d_tpr
    r = rpt or d_rpt
    chunks = chunks_per_row(N, state_dtype)
    while chunks % t:
        t //= 2
    for rows in (128, 64, 32, 16, 8, 4, 2, 1):
        th = rows // r * t
        if rows % r == 0 and th <= max(threads, 32) and th % 32 == 0 and P % rows == 0:
            return t, rows, r
    # no divisor of P makes whole warps (P = 8 with 2 threads per row): one warp of one-row
    # threads; the kernel masks the rows past P
    return t, 32 // t, 1


def pick_layout(N: int, state_dtype: str, P: int, tree: bool = False,
                T: int | None = None, small_grid: bool = False, coarse: bool = False) -> dict:
    """The layout parameters of a configuration: TPR, ROWS, RPT (pick_tiling) and tree_prefetch
    (tree kernels: load the next step's parent one step ahead into registers of its own instead
    of into the registers of the state it replaces; measured slower or even, never chosen).

    ``small_grid``: the default tiling's grid (grid_blocks) would leave SMs without a block. A
    2-byte state with T > 1 then takes twice the threads per row in the same block size: half
    the rows per block, twice the blocks, and half the step's work per thread. Measured (H200,
    H = 32, batch 1, 128 blocks of the default on 132 SMs): bf16 chains T = 4 / 8 1.06x / 1.10x,
    trees T = 8 1.09x; at 512 blocks and more (H = 128 batch 1, H = 32 batch 8) it was 1%
    slower to 7% faster, so larger grids keep the default. fp32 states gained nothing (at most
    1%) from finer tilings at any grid size.

    ``coarse``: the opposite step, for 2-byte chains with T > 1 whose default tiling gives a
    thread what it held in the measurements (two rows of 16 state elements): half the
    threads per row in the same block size, twice the rows per block, half the blocks
    (coarse_pays says on which grids). Trees keep their tiling (measured: 0.80-1.01x coarse
    at T = 8, 0.86-1.10x at T = 4)."""
    tpr, rows, rpt = pick_tiling(N, state_dtype, P, tree, T)
    threads = rows // rpt * tpr
    if small_grid and ESIZE[state_dtype] == 2 and T != 1:
        t2, r2, p2 = pick_tiling(N, state_dtype, P, tree, T, threads=threads, tpr=2 * tpr, rpt=rpt)
        if r2 < rows:
            tpr, rows, rpt = t2, r2, p2
    elif (coarse and ESIZE[state_dtype] == 2 and T != 1 and not tree
          and N // tpr == COARSE_ROW_SHARE and rpt == 2):
        t2, r2, p2 = pick_tiling(N, state_dtype, P, tree, T, threads=threads, tpr=tpr // 2, rpt=rpt)
        if r2 == 2 * rows:
            tpr, rows, rpt = t2, r2, p2
    return dict(TPR=tpr, ROWS=rows, RPT=rpt, tree_prefetch=False)


# The coarse layout of 2-byte chains (pick_layout) is measured for state rows of which a thread
# of the default tiling holds 16 elements (N = 128 at TPR 8: Nemotron's d_state), where the
# registers below hold. ptxas gives the Nemotron chain kernels (sm_90, any T) 72 registers a
# thread in the default tiling and 120 in the coarse one: 14 and 8 resident 64-thread blocks per
# SM. tests/test_mamba2_validation.py recompiles both and checks these numbers.
COARSE_ROW_SHARE = 16
CHAIN_REGISTERS = {"default": 72, "coarse": 120}
CHAIN_THREADS = DEFAULT_TILING[(2, False, False)][0]   # both layouts' block size

# The layouts layout_for_grid chooses among (pick_layout's keywords): warm-up sets carry each.
GRID_LAYOUTS = ({}, {"small_grid": True}, {"coarse": True})


def resident_blocks(registers: int, threads: int, regs_per_sm: int = 65536,
                    max_blocks: int = 32, max_threads: int = 2048) -> int:
    """Blocks of ``threads`` threads at ``registers`` registers a thread one SM holds at once
    (registers are allocated per warp in units of 256)."""
    per_warp = -(-registers * 32 // 256) * 256
    return max(1, min(max_blocks, max_threads // threads,
                      regs_per_sm // per_warp // (threads // 32)))


def coarse_pays(blocks: int, coarse_blocks: int, sm_count: int) -> bool:
    """Whether a 2-byte chain grid of ``blocks`` default-tiling blocks runs faster as
    ``coarse_blocks`` coarse ones (twice the work each) on ``sm_count`` SMs.

    Two cases, both measured (H200, 132 SMs; bf16 and fp16, T = 2-16, H = 32 and 128):
    - at most 4 default blocks on the busiest SM, and the coarse grid puts no more work there:
      the coarse threads' extra ILP (and one shuffle level less per row reduction) wins, 1.04-
      1.08x at 256 and 512 blocks; at 5-8 per SM (640-1024 blocks) it lost 1-9%.
    - the default grid takes 2 or 3 rounds of its resident blocks per SM (14) and the coarse
      grid fewer (of 8): the default's last round runs nearly empty. 1920-2048 blocks (1.04-1.11
      waves): 1.06-1.30x; 4096 (2.2 waves): 1.005-1.09x. Where both take as many rounds
      (1280-3584 and 4608-5120 blocks) the coarse grid was 0.90-1.01x, and past 3 rounds
      (6144 blocks and more, bandwidth-bound) 0.95-0.99x."""
    busiest = -(-blocks // sm_count)
    busiest_c = -(-coarse_blocks // sm_count)
    if busiest <= 4:
        return 2 * busiest_c == busiest
    rounds = -(-busiest // resident_blocks(CHAIN_REGISTERS["default"], CHAIN_THREADS))
    rounds_c = -(-busiest_c // resident_blocks(CHAIN_REGISTERS["coarse"], CHAIN_THREADS))
    return 2 <= rounds <= 3 and rounds_c < rounds


def update_grid(P: int, rows: int, H: int, Bt: int) -> tuple:
    """The update launch's grid: a block per (row slice of ``rows`` rows, head, sequence)."""
    return (-(-P // rows), H, Bt)


def grid_blocks(P: int, rows: int, H: int, Bt: int) -> int:
    """Thread blocks of an update launch (update_grid's product)."""
    x, y, z = update_grid(P, rows, H, Bt)
    return x * y * z


def layout_for_grid(N: int, state_dtype: str, P: int, tree: bool, T: int, H: int, Bt: int,
                    sm_count: int) -> dict:
    """The op's layout for a launch of H heads x Bt sequences on a GPU of ``sm_count`` SMs:
    pick_layout's, with ``small_grid`` when its grid would leave SMs without a block, or
    ``coarse`` where coarse_pays says so."""
    layout = pick_layout(N, state_dtype, P, tree, T)
    blocks = grid_blocks(P, layout["ROWS"], H, Bt)
    if blocks < sm_count:
        return pick_layout(N, state_dtype, P, tree, T, small_grid=True)
    coarse = pick_layout(N, state_dtype, P, tree, T, coarse=True)
    if coarse != layout and coarse_pays(blocks, grid_blocks(P, coarse["ROWS"], H, Bt), sm_count):
        return coarse
    return layout


def _validate(cfg: dict) -> None:
    if cfg["tree"] and not cfg["intermediate"]:
        raise ValueError("mamba2_mtp_ssm_update: tree=True needs intermediate=True (the parent "
                         "nodes are read back from the intermediate states)")
    if cfg["tree_prefetch"] and not cfg["tree"]:
        raise ValueError("mamba2_mtp_ssm_update: tree_prefetch=True needs tree=True (it is how "
                         "the tree kernel reads parent nodes)")
    chunks = chunks_per_row(cfg["N"], cfg["state_dtype"])
    if chunks % cfg["TPR"]:
        raise ValueError(f"mamba2_mtp_ssm_update: TPR={cfg['TPR']} must divide the {chunks} "
                         f"16-byte chunks of a row (N={cfg['N']}, state {cfg['state_dtype']})")
    if cfg["ROWS"] % cfg["RPT"]:
        raise ValueError(f"mamba2_mtp_ssm_update: RPT={cfg['RPT']} must divide ROWS={cfg['ROWS']}")
    threads = cfg["ROWS"] // cfg["RPT"] * cfg["TPR"]
    if threads % 32 or threads > 1024:
        raise ValueError(f"mamba2_mtp_ssm_update: ROWS / RPT * TPR = {threads} threads must be a "
                         f"multiple of 32 and at most 1024")


def _dtype_param(name: str) -> Param:
    return Param(name, FLOAT_DTYPES, render=dtypes.C_TYPE)


def nemotron_config(state_dtype: str, tree: bool, intermediate: bool = True,
                    T: int | None = None, N: int = 128, P: int = 64,
                    small_grid: bool = False, coarse: bool = False) -> dict:
    """The Nemotron-H / Nemotron 3 decode configuration: bf16 x/B/C and dt/D/dt_bias (one dtype
    for the three, as FlashInfer and TensorRT-LLM callers pass them), fp32 A, softplus on, no z
    (the gate is applied by the gated RMSNorm after the op); d_state N and head_dim P (the
    layout's inputs) default to Nemotron-H's 128 and 64; ``small_grid`` and ``coarse`` as in
    pick_layout."""
    return dict(N=N, **pick_layout(N, state_dtype, P, tree, T, small_grid, coarse),
                state_dtype=state_dtype,
                input_dtype="bf16", dt_dtype="bf16", A_dtype="fp32", D_dtype="bf16",
                dt_bias_dtype="bf16", has_D=True, has_z=False, has_dt_bias=True, dt_softplus=True,
                tree=tree, intermediate=intermediate)


def _warmup() -> tuple:
    out = []
    for sd in ("fp32", "bf16"):
        for tree in (True, False):
            out += [nemotron_config(sd, tree=tree, **lay) for lay in GRID_LAYOUTS]
        out.append(nemotron_config(sd, tree=False, T=1))                  # MTP with T = 1
        out.append(nemotron_config(sd, tree=False, intermediate=False, T=1))   # plain decode
    unique = []   # layouts that change nothing (fp32, trees' coarse): drop the repeats
    for c in out:
        if c not in unique:
            unique.append(c)
    return tuple(unique)


MAMBA2 = register_family(KernelFamily(
    name="mamba2_mtp_ssm_update",
    source="mamba2_mtp_ssm_update.cu",
    description="Mamba2 multi-token SSM state update (chain or draft tree) and accepted-state commit",
    params=(
        Param("N", IntRange(16, 512, multiple_of=16)),
        Param("TPR", (1, 2, 4, 8, 16, 32)),
        Param("ROWS", (1, 2, 4, 8, 16, 32, 64, 128)),
        Param("RPT", (1, 2, 4)),
        _dtype_param("state_dtype"),
        _dtype_param("input_dtype"),
        _dtype_param("dt_dtype"),
        _dtype_param("A_dtype"),
        _dtype_param("D_dtype"),
        _dtype_param("dt_bias_dtype"),
        Param("has_D", (False, True), macro="JK_HAS_D"),
        Param("has_z", (False, True), macro="JK_HAS_Z"),
        Param("has_dt_bias", (False, True), macro="JK_HAS_DT_BIAS"),
        Param("dt_softplus", (False, True), macro="JK_DT_SOFTPLUS"),
        Param("tree", (False, True), macro="JK_TREE"),
        Param("intermediate", (False, True), macro="JK_INTERMEDIATE"),
        Param("tree_prefetch", (False, True), macro="JK_TREE_PREFETCH", default=False),
    ),
    entries={
        "update": Entry("jk_mamba2::mtp_ssm_update", signature=UPDATE_SIGNATURE, packed=True),
        "commit": Entry("jk_mamba2::commit_accepted_state", signature=COMMIT_SIGNATURE,
                        packed=True),
    },
    options=("-std=c++17",),
    validate=_validate,
    warmup=_warmup(),
))
