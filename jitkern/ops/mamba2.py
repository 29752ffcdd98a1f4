"""Mamba2 multi-token SSM update (chain or draft tree) and the accepted-state commit.

``mamba2_mtp_ssm_update`` runs T decode steps of a Mamba2 layer's SSM for a batch of sequences
whose states live in a pool, optionally storing every step's state (for speculative-decoding
verification) and following a draft tree. ``mamba2_commit_accepted_state`` then copies the
accepted step's stored state into the pool. Both launch kernels of the
``mamba2_mtp_ssm_update`` family (kernels_src/mamba2_mtp_ssm_update.cu) on the tensors' device,
on torch's current stream there.

Compile-time (one specialization each): d_state N, the tiling (threads per state row, rows per
block, rows per thread, and in tree mode how parent nodes are read back; derived from N, the
state dtype, P, tree mode, T == 1 and whether the grid would leave SMs idle by
families.mamba2.layout_for_grid), the dtypes of state /
x,B,C,z,out / dt / A / D / dt_bias, and the flags D given, z given, dt_bias given, dt_softplus,
tree mode, intermediate states given. Run-time: T, Bt, H, P, G, every stride, the index
tensors, pad_slot_id and disable_state_update. P and T are run-time because they only enter
address arithmetic: one specialization then serves every head_dim, draft length and TP slice of
a model.

Validation runs once per call signature (shapes, strides, dtypes, devices, flags): the prepared
launch is cached, so a repeated call only checks pointer alignment and packs the arguments.
Index *values* are not checked on the host (that would synchronize): a sequence whose slot or
intermediate row is out of range gets NaN outputs and touches no state; the commit skips it.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..families.mamba2 import (COMMIT_THREADS, COMMIT_UNROLL, ESIZE, MAMBA2, MAX_T,
                               layout_for_grid, nemotron_config, update_grid)
from ..service import get_kernel
from ..torch_ops import custom_op
from .device import sm_count
from .signature import PlanCache, require_aligned, tensor_meta as _meta

_DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_FLOAT_TYPES = "float32, bfloat16 or float16"
_MAX_GRID_YZ = 65535

_plans = PlanCache()          # call signature -> _Plan (validated, kernel loaded)
_commit_plans = PlanCache()


# ----------------------------------------------------------------------------- checks

def _tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _float_dtype(name: str, t: torch.Tensor) -> str:
    d = _DTYPE_NAME.get(t.dtype)
    if d is None:
        raise TypeError(f"{name} must be {_FLOAT_TYPES}, got {t.dtype}")
    return d


def _same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def _int32_vector(name: str, t, Bt: int) -> torch.Tensor:
    _tensor(name, t)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != Bt:
        raise ValueError(f"{name} must have shape [Bt] = [{Bt}], got {list(t.shape)}")
    if Bt > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}")
    return t


def _pool(name: str, owner: str, t: torch.Tensor, slots: int, vec: int, dims: str) -> None:
    """A pool of ``slots`` slots: each slot's rows contiguous (``dims``), slots 16-byte aligned
    (``vec`` elements); ``owner`` is the name's possessive form, for the message."""
    _inner_contiguous(name, t, 1, dims)
    if slots > 1 and t.stride(0) % vec:
        raise ValueError(f"{owner} slot stride must be a multiple of {vec} elements (16 bytes), "
                         f"got {t.stride(0)}")


def _state_slots(state: torch.Tensor, S: int, vec: int, sbi, Bt: int) -> None:
    """The pool's [H, P, N] rows are contiguous with 16-byte aligned slots, and every sequence
    has a slot: through state_batch_indices (int32 [Bt]) or, without it, slot b (S >= Bt)."""
    _pool("state", "state's", state, S, vec, "H, P, N")
    if sbi is not None:
        _int32_vector("state_batch_indices", sbi, Bt)
    elif S < Bt:
        raise ValueError(f"state has {S} slots but the batch has Bt = {Bt} sequences: without "
                         f"state_batch_indices sequence b uses slot b, so S >= Bt is needed")


def _intermediate_slots(inter: torch.Tensor, S2: int, vec: int, iidx, Bt: int, S: int,
                        sbi) -> None:
    """intermediate_states' [T, H, P, N] rows are contiguous with 16-byte aligned slots, and
    intermediate_state_indices is an int32 [Bt] vector, or, without it, every sequence's row
    (its state slot) exists in intermediate_states' S2 rows."""
    _pool("intermediate_states", "intermediate_states'", inter, S2, vec, "T, H, P, N")
    if iidx is not None:
        _int32_vector("intermediate_state_indices", iidx, Bt)
        return
    need = Bt if sbi is None else S
    if S2 < need:
        raise ValueError(
            f"intermediate_states has {S2} rows but without intermediate_state_indices "
            f"sequence b uses the row of its state slot, so S2 >= "
            f"{'Bt' if sbi is None else 'S'} = {need} is needed")


def _shape(name: str, t: torch.Tensor, expected: tuple, letters: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape [{letters}] = {list(expected)}, got {list(t.shape)}")


def _inner_contiguous(name: str, t: torch.Tensor, first: int, letters: str) -> None:
    """Dims first.. are row-major contiguous (size-1 dims may have any stride)."""
    expect = 1
    for d in range(t.dim() - 1, first - 1, -1):
        if t.shape[d] > 1 and t.stride(d) != expect:
            raise ValueError(f"{name} must be contiguous over [{letters}] (strides "
                             f"{_contig_strides(t, first)}), got strides {list(t.stride())[first:]}")
        expect *= t.shape[d]


def _contig_strides(t: torch.Tensor, first: int) -> list:
    out, s = [], 1
    for d in range(t.dim() - 1, first - 1, -1):
        out.append(s)
        s *= t.shape[d]
    return out[::-1]


def _last_dim_unit(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 in its last dimension, got strides "
                         f"{list(t.stride())}")


def _per_head(name: str, t, H: int, P: int, N: int | None, full: str) -> tuple:
    """A per-head argument in compact [H] or expanded stride-0 form. Returns (dtype, head stride)."""
    _tensor(name, t)
    dt = _float_dtype(name, t)
    if t.dim() == 1:
        if t.shape[0] != H:
            raise ValueError(f"{name} must have shape [H] = [{H}] (or {full} with stride 0 after "
                             f"H), got {list(t.shape)}")
    else:
        expected = (H, P) if N is None else (H, P, N)
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape [H] = [{H}] or {full} = {list(expected)}, "
                             f"got {list(t.shape)}")
        if any(s != 0 for s in t.stride()[1:]):
            raise ValueError(f"{name} given as {full} must have stride 0 over every dimension "
                             f"after H (one value per head), got strides {list(t.stride())}")
    return dt, t.stride(0)


def _flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def _pad_id(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"pad_slot_id must be an int, got {type(v).__name__}")
    if not -2**31 <= v < 2**31:
        raise ValueError(f"pad_slot_id must fit in int32, got {v}")
    return v


def _same_device(names_tensors, device: torch.device) -> None:
    for name, t in names_tensors:
        if t is not None and t.device != device:
            raise ValueError(f"{name} must be on {device} (the device of state), got {t.device}")


# ----------------------------------------------------------------------------- update

class _Plan:
    __slots__ = ("kernel", "grid", "block", "smem", "static", "align")

    def __init__(self, kernel, grid, block, smem, static, align):
        self.kernel = kernel
        self.grid = grid
        self.block = block
        self.smem = smem
        self.static = static        # the i64/i32 fields that depend only on the signature
        self.align = align          # tensors whose data pointer must be 16-byte aligned


def _prepare_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, sbi, pad_slot_id, inter,
                    iidx, parent, disable_state_update, out, tiling=None) -> _Plan:
    """Validate everything that depends on the call signature; load the kernel; build the plan."""
    # --- dtypes and shapes
    _tensor("state", state)
    state_dt = _float_dtype("state", state)
    if state.dim() != 4:
        raise ValueError(f"state must have shape [S, H, P, N], got {list(state.shape)}")
    S, H, P, N = state.shape
    if N % 16 or not 16 <= N <= 512:
        raise ValueError(f"state's d_state N must be a multiple of 16 in [16, 512], got {N}")
    if P % 8 or P == 0:
        raise ValueError(f"state's head_dim P must be a positive multiple of 8, got {P}")
    if H == 0 or H > _MAX_GRID_YZ:
        raise ValueError(f"state's head count H must be in [1, {_MAX_GRID_YZ}], got {H}")
    if S == 0:
        raise ValueError("state must have at least one slot (S >= 1), got S = 0")

    _tensor("x", x)
    in_dt = _float_dtype("x", x)
    if x.dim() == 3:
        squeeze, T = True, 1
        Bt = x.shape[0]
        _shape("x", x, (Bt, H, P), "Bt, H, P")
    elif x.dim() == 4:
        squeeze = False
        Bt, T = x.shape[0], x.shape[1]
        _shape("x", x, (Bt, T, H, P), "Bt, T, H, P")
    else:
        raise ValueError(f"x must have shape [Bt, T, H, P] or [Bt, H, P], got {list(x.shape)}")
    if not 1 <= T <= MAX_T:
        raise ValueError(f"x's token count T must be in [1, {MAX_T}], got {T}")
    if Bt > _MAX_GRID_YZ:
        raise ValueError(f"x's batch Bt must be at most {_MAX_GRID_YZ}, got {Bt}")
    _last_dim_unit("x", x)
    lead = (Bt,) if squeeze else (Bt, T)
    lead_s = "Bt, " if squeeze else "Bt, T, "

    for name, t in (("B", B), ("C", C)):
        _tensor(name, t)
        _same_dtype(name, t, "x", x)
        if t.dim() != len(lead) + 2 or tuple(t.shape[:len(lead)]) != lead or t.shape[-1] != N:
            raise ValueError(f"{name} must have shape [{lead_s}G, N] = {list(lead) + ['G', N]}, "
                             f"got {list(t.shape)}")
        _last_dim_unit(name, t)
    G = B.shape[-2]
    if C.shape[-2] != G:
        raise ValueError(f"C must have the group count of B ({G}), got {C.shape[-2]}")
    if G == 0 or H % G:
        raise ValueError(f"the group count G (B.shape[-2] = {G}) must be positive and divide "
                         f"the head count H = {H}")

    _tensor("dt", dt)
    dt_dt = _float_dtype("dt", dt)
    if tuple(dt.shape) == lead + (H,):
        dt_s = dt.stride()
    elif tuple(dt.shape) == lead + (H, P):
        if P > 1 and dt.stride(-1) != 0:
            raise ValueError(f"dt given as [{lead_s}H, P] must have stride 0 over P (one value "
                             f"per head), got strides {list(dt.stride())}")
        dt_s = dt.stride()[:-1]
    else:
        raise ValueError(f"dt must have shape [{lead_s}H] = {list(lead + (H,))} or "
                         f"[{lead_s}H, P] with stride 0 over P, got {list(dt.shape)}")

    A_dt, A_sh = _per_head("A", A, H, P, N, "[H, P, N]")
    D_dt, D_sh = _per_head("D", D, H, P, None, "[H, P]") if D is not None else ("fp32", 0)
    bias_dt, bias_sh = (_per_head("dt_bias", dt_bias, H, P, None, "[H, P]")
                        if dt_bias is not None else ("fp32", 0))

    if z is not None:
        _tensor("z", z)
        _same_dtype("z", z, "x", x)
        _shape("z", z, tuple(x.shape), "Bt, T, H, P" if not squeeze else "Bt, H, P")
        _last_dim_unit("z", z)
    _tensor("out", out)
    _same_dtype("out", out, "x", x)
    _shape("out", out, tuple(x.shape), "Bt, T, H, P" if not squeeze else "Bt, H, P")
    _last_dim_unit("out", out)

    _flag("dt_softplus", dt_softplus)
    _flag("disable_state_update", disable_state_update)
    _pad_id(pad_slot_id)

    vec = 16 // ESIZE[state_dt]
    _state_slots(state, S, vec, sbi, Bt)

    S2 = 0
    if inter is None:
        if iidx is not None:
            raise ValueError("intermediate_state_indices needs intermediate_states")
        if parent is not None:
            raise ValueError("retrieve_parent_token (tree mode) needs intermediate_states: parent "
                             "nodes are read back from them")
    else:
        _tensor("intermediate_states", inter)
        _same_dtype("intermediate_states", inter, "state", state)
        if (inter.dim() != 5 or tuple(inter.shape[2:]) != (H, P, N) or inter.shape[1] < T
                or inter.shape[0] == 0):
            raise ValueError(f"intermediate_states must have shape [S2, T, H, P, N] = "
                             f"['S2', {T}, {H}, {P}, {N}] (S2 >= 1; a longer step axis is "
                             f"allowed), got {list(inter.shape)}")
        S2 = inter.shape[0]
        _intermediate_slots(inter, S2, vec, iidx, Bt, S, sbi)
        if parent is not None:
            _tensor("retrieve_parent_token", parent)
            if parent.dtype != torch.int32:
                raise TypeError(f"retrieve_parent_token must be int32, got {parent.dtype}")
            _shape("retrieve_parent_token", parent, (Bt, T), "Bt, T")
            if parent.numel() > 1 and not parent.is_contiguous():
                raise ValueError(f"retrieve_parent_token must be contiguous, got strides "
                                 f"{list(parent.stride())}")

    # --- devices last: everything above also runs on CPU / meta tensors
    dev = state.device
    if dev.type != "cuda":
        raise ValueError(f"state must be a CUDA tensor, got device {dev}")
    _same_device((("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                  ("dt_bias", dt_bias), ("state_batch_indices", sbi), ("intermediate_states", inter),
                  ("intermediate_state_indices", iidx), ("retrieve_parent_token", parent),
                  ("out", out)), dev)

    # --- the specialization and its launch geometry
    # With one token there is no step t > 0 whose parent could matter: the chain kernel computes
    # the same (and is faster: the tree's prefetch registers cost occupancy).
    tree = parent is not None and T > 1
    layout = layout_for_grid(N, state_dt, P, tree, T, H, Bt, sm_count(dev))
    if tiling is not None:   # (TPR, ROWS, RPT[, tree_prefetch]): benchmarks and tests
        layout.update(zip(("TPR", "ROWS", "RPT"), tiling[:3]))
        if len(tiling) > 3:
            layout["tree_prefetch"] = bool(tiling[3]) and tree
    rows, rpt, tpr = layout["ROWS"], layout["RPT"], layout["TPR"]
    cfg = dict(N=N, **layout, state_dtype=state_dt, input_dtype=in_dt, dt_dtype=dt_dt,
               A_dtype=A_dt, D_dtype=D_dt, dt_bias_dtype=bias_dt, has_D=D is not None,
               has_z=z is not None, has_dt_bias=dt_bias is not None, dt_softplus=dt_softplus,
               tree=tree, intermediate=inter is not None)
    kernel = get_kernel(MAMBA2, cfg, dev)

    def s3(t, sq):   # (batch, token, head-or-group) strides of a [Bt, (T,) X, Y] tensor
        if t is None:
            return (0, 0, 0)
        st = t.stride()
        return (st[0], 0, st[1]) if sq else (st[0], st[1], st[2])

    out_s = s3(out, squeeze)
    if squeeze:
        dt3 = (dt_s[0], 0, dt_s[1])
    else:
        dt3 = tuple(dt_s[:3])
    static = ((state.stride(0), inter.stride(0) if inter is not None else 0)
              + s3(x, squeeze) + dt3 + s3(B, squeeze) + s3(C, squeeze) + s3(z, squeeze) + out_s
              + (A_sh, D_sh, bias_sh, T, H, P, H // G, S, S2))
    grid = update_grid(P, rows, H, Bt)
    smem = 2 * T * N * 4
    align = tuple(n for n, t in (("state", state), ("intermediate_states", inter)) if t is not None)
    return _Plan(kernel, grid, (rows // rpt * tpr, 1, 1), smem, static, align)


def _update_impl(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                 B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor],
                 z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor], dt_softplus: bool,
                 state_batch_indices: Optional[torch.Tensor], pad_slot_id: int,
                 intermediate_states: Optional[torch.Tensor],
                 intermediate_state_indices: Optional[torch.Tensor],
                 retrieve_parent_token: Optional[torch.Tensor], disable_state_update: bool,
                 out: torch.Tensor) -> None:
    inter = intermediate_states
    # Scalars first (1 == True as a dict key: a non-bool must not hit a cached plan).
    if dt_softplus.__class__ is not bool:
        _flag("dt_softplus", dt_softplus)
    if disable_state_update.__class__ is not bool:
        _flag("disable_state_update", disable_state_update)
    if pad_slot_id.__class__ is not int:
        _pad_id(pad_slot_id)
    try:
        # the required tensors inline (a flat tuple: fewer allocations than one tuple each)
        # (state's device whole, the others' by index: see signature.tensor_meta)
        key = (state.shape, state.stride(), state.dtype, state.device,
               x.shape, x.stride(), x.dtype, x.get_device(),
               dt.shape, dt.stride(), dt.dtype, dt.get_device(),
               A.shape, A.stride(), A.dtype, A.get_device(),
               B.shape, B.stride(), B.dtype, B.get_device(),
               C.shape, C.stride(), C.dtype, C.get_device(),
               out.shape, out.stride(), out.dtype, out.get_device(),
               _meta(D), _meta(z), _meta(dt_bias), _meta(state_batch_indices), _meta(inter),
               _meta(intermediate_state_indices), _meta(retrieve_parent_token), dt_softplus)
        plan = _plans.get(key)
    except (AttributeError, TypeError):   # not tensors: the full checks below say what is wrong
        key, plan = None, None
    if plan is None:
        plan = _prepare_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                               state_batch_indices, pad_slot_id, inter, intermediate_state_indices,
                               retrieve_parent_token, disable_state_update, out)
        _plans.put(key, plan)
    elif not -2**31 <= pad_slot_id < 2**31:
        _pad_id(pad_slot_id)
    _launch_update(plan, state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, pad_slot_id,
                   inter, intermediate_state_indices, retrieve_parent_token,
                   disable_state_update, out)


def _launch_update(plan, state, x, dt, A, B, C, D, z, dt_bias, sbi, pad_slot_id, inter, iidx,
                   parent, disable_state_update, out) -> None:
    """Launch a prepared plan (the per-call part: alignment of the pools, argument packing)."""
    for name in plan.align:
        t = state if name == "state" else inter
        if t.data_ptr() % 16:
            require_aligned(name, t)
    args = (state, x, dt, A, B, C, D, z, dt_bias, out, inter, sbi, iidx, parent) + plan.static + (
                pad_slot_id, int(disable_state_update))
    plan.kernel.launch("update", plan.grid, plan.block, args, plan.smem)


@custom_op("jitkern::mamba2_mtp_ssm_update",
           mutates_args=("state", "intermediate_states", "out"))
def _update_op(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
               B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor],
               z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor], dt_softplus: bool,
               state_batch_indices: Optional[torch.Tensor], pad_slot_id: int,
               intermediate_states: Optional[torch.Tensor],
               intermediate_state_indices: Optional[torch.Tensor],
               retrieve_parent_token: Optional[torch.Tensor], disable_state_update: bool,
               out: torch.Tensor) -> None:
    _update_impl(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices,
                 pad_slot_id, intermediate_states, intermediate_state_indices,
                 retrieve_parent_token, disable_state_update, out)


def mamba2_mtp_ssm_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                          dt_softplus=False, *, state_batch_indices=None, pad_slot_id=-1,
                          intermediate_states=None, intermediate_state_indices=None,
                          retrieve_parent_token=None, disable_state_update=False, out=None):
    """T steps of the Mamba2 SSM for a batch of sequences whose states live in a pool.

    Letters: S state slots, Bt sequences, T tokens per sequence (1..16), H heads, P head_dim
    (multiple of 8), N d_state (multiple of 16, <= 512), G groups (G divides H; head h uses
    group h // (H // G)).

    Args:
        state: ``[S, H, P, N]`` fp32/bf16/fp16; the pool, updated in place (slot stride free,
            [H, P, N] contiguous, 16-byte aligned).
        x: ``[Bt, T, H, P]`` (or ``[Bt, H, P]`` for T = 1), fp32/bf16/fp16, stride 1 over P.
        dt: ``[Bt, T, H]``, or ``[Bt, T, H, P]`` with stride 0 over P; fp32/bf16/fp16.
        A: ``[H]``, or ``[H, P, N]`` with strides ``(a, 0, 0)``; fp32/bf16/fp16.
        B, C: ``[Bt, T, G, N]`` (or ``[Bt, G, N]``), x's dtype, stride 1 over N.
        D, dt_bias: optional ``[H]`` or ``[H, P]`` with stride 0 over P; fp32/bf16/fp16.
        z: optional gate, like x.
        dt_softplus: apply softplus (thresholded at 20) to dt + dt_bias.
        state_batch_indices: optional int32 ``[Bt]``: slot of sequence b (default b).
        pad_slot_id: a sequence whose slot equals it is skipped; its out rows are zeros.
        intermediate_states: optional ``[S2, T', H, P, N]`` (T' >= T), state's dtype: step t's
            state of sequence b is stored at ``[ci, t]``.
        intermediate_state_indices: optional int32 ``[Bt]``: row ci of sequence b (default: its
            slot).
        retrieve_parent_token: optional int32 ``[Bt, T]``, the draft tree (needs
            intermediate_states): step t > 0 starts from stored node p when 0 <= p < t, else
            from step t - 1.
        disable_state_update: leave ``state`` untouched (verification passes).
        out: optional output like x (x's dtype and shape, stride 1 over P).

    Returns ``out`` (allocated like x when not given). Accumulates in fp32.
    Index values are not checked on the host: an out-of-range slot or intermediate row gives
    NaN outputs for that sequence and touches no state. Graph-capturable once warmed (call it
    once before capture with the same shapes, and pass ``out``).
    """
    if out is None:
        _tensor("x", x)
        _float_dtype("x", x)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    args = (state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id,
            intermediate_states, intermediate_state_indices, retrieve_parent_token,
            disable_state_update, out)
    if torch.compiler.is_compiling():
        _update_op(*args)
    else:   # eager: the same function without the dispatcher's per-call overhead
        _update_impl(*args)
    return out


# ----------------------------------------------------------------------------- commit

class _CommitPlan:
    __slots__ = ("kernel", "grid", "static")

    def __init__(self, kernel, grid, static):
        self.kernel = kernel
        self.grid = grid
        self.static = static


def _prepare_commit(state, inter, accepted, sbi, iidx, pad_slot_id) -> _CommitPlan:
    _tensor("state", state)
    state_dt = _float_dtype("state", state)
    if state.dim() != 4:
        raise ValueError(f"state must have shape [S, H, P, N], got {list(state.shape)}")
    S, H, P, N = state.shape
    _tensor("intermediate_states", inter)
    _same_dtype("intermediate_states", inter, "state", state)
    if inter.dim() != 5 or tuple(inter.shape[2:]) != (H, P, N) or inter.shape[1] == 0:
        raise ValueError(f"intermediate_states must have shape [S2, T, H, P, N] = "
                         f"['S2', 'T', {H}, {P}, {N}] with T >= 1, got {list(inter.shape)}")
    S2, T = inter.shape[0], inter.shape[1]
    _tensor("accepted_step", accepted)
    if accepted.dtype != torch.int32:
        raise TypeError(f"accepted_step must be int32, got {accepted.dtype}")
    if accepted.dim() != 1:
        raise ValueError(f"accepted_step must have shape [Bt], got {list(accepted.shape)}")
    Bt = accepted.shape[0]
    _int32_vector("accepted_step", accepted, Bt)
    if Bt > _MAX_GRID_YZ:
        raise ValueError(f"accepted_step's batch Bt must be at most {_MAX_GRID_YZ}, got {Bt}")
    _pad_id(pad_slot_id)
    vec = 16 // ESIZE[state_dt]
    if (H * P * N) % vec:
        raise ValueError(f"state's [H, P, N] must hold a whole number of 16-byte vectors, got "
                         f"{H}*{P}*{N} elements of {state.dtype}")
    _state_slots(state, S, vec, sbi, Bt)
    _intermediate_slots(inter, S2, vec, iidx, Bt, S, sbi)
    dev = state.device
    if dev.type != "cuda":
        raise ValueError(f"state must be a CUDA tensor, got device {dev}")
    _same_device((("intermediate_states", inter), ("accepted_step", accepted),
                  ("state_batch_indices", sbi), ("intermediate_state_indices", iidx)), dev)
    kernel = get_kernel(MAMBA2, nemotron_config(state_dt, tree=False), dev)
    vecs = H * P * N // vec
    per_block = COMMIT_THREADS * COMMIT_UNROLL
    grid = (-(-vecs // per_block), Bt, 1)
    static = (state.stride(0), inter.stride(0), H * P * N, vecs, T, S, S2)
    return _CommitPlan(kernel, grid, static)


def _commit_impl(state: torch.Tensor, intermediate_states: torch.Tensor,
                 accepted_step: torch.Tensor, state_batch_indices: Optional[torch.Tensor],
                 intermediate_state_indices: Optional[torch.Tensor], pad_slot_id: int) -> None:
    inter = intermediate_states
    try:
        key = (state.shape, state.stride(), state.dtype, state.device, _meta(inter),
               _meta(accepted_step), _meta(state_batch_indices),
               _meta(intermediate_state_indices))
        plan = _commit_plans.get(key)
    except (AttributeError, TypeError):
        key, plan = None, None
    if plan is None:
        plan = _prepare_commit(state, inter, accepted_step, state_batch_indices,
                               intermediate_state_indices, pad_slot_id)
        _commit_plans.put(key, plan)
    elif pad_slot_id.__class__ is not int or not -2**31 <= pad_slot_id < 2**31:
        _pad_id(pad_slot_id)
    for name, t in (("state", state), ("intermediate_states", inter)):
        if t.data_ptr() % 16:
            require_aligned(name, t)
    args = (state, inter, accepted_step, state_batch_indices, intermediate_state_indices) + \
        plan.static + (pad_slot_id,)
    plan.kernel.launch("commit", plan.grid, (COMMIT_THREADS, 1, 1), args, 0)


@custom_op("jitkern::mamba2_commit_accepted_state", mutates_args=("state",))
def _commit_op(state: torch.Tensor, intermediate_states: torch.Tensor,
               accepted_step: torch.Tensor, state_batch_indices: Optional[torch.Tensor],
               intermediate_state_indices: Optional[torch.Tensor], pad_slot_id: int) -> None:
    _commit_impl(state, intermediate_states, accepted_step, state_batch_indices,
                 intermediate_state_indices, pad_slot_id)


def mamba2_commit_accepted_state(state, intermediate_states, accepted_step, *,
                                 state_batch_indices=None, intermediate_state_indices=None,
                                 pad_slot_id=-1):
    """Copy each sequence's accepted draft node into the state pool.

    ``state[s] = intermediate_states[ci, accepted_step[b]]`` for every sequence b with
    ``accepted_step[b] >= 0`` (-1: nothing accepted, the state is kept), where s is b's slot
    (``state_batch_indices[b]``, default b; pad slots are skipped) and ci its intermediate row
    (``intermediate_state_indices[b]``, default s).

    Args:
        state: ``[S, H, P, N]`` fp32/bf16/fp16, [H, P, N] contiguous, 16-byte aligned.
        intermediate_states: ``[S2, T, H, P, N]``, state's dtype, [T, H, P, N] contiguous.
        accepted_step: int32 ``[Bt]`` in [-1, T); values >= T are skipped like -1.
        state_batch_indices, intermediate_state_indices: optional int32 ``[Bt]``.

    Returns ``state``. Graph-capturable once warmed.
    """
    args = (state, intermediate_states, accepted_step, state_batch_indices,
            intermediate_state_indices, pad_slot_id)
    if torch.compiler.is_compiling():
        _commit_op(*args)
    else:
        _commit_impl(*args)
    return state
