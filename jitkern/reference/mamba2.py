"""Float64 references of the Mamba2 multi-token SSM update and of the accepted-state commit.

They follow the spec's math line by line, on the tensors' own device, and mutate ``state`` and
``intermediate_states`` in place exactly like the ops (values rounded to those tensors' dtypes),
so a test can run the op and the reference on clones of the same inputs and compare everything.
They accept the same argument forms as the ops (compact ``dt [Bt, T, H]`` / ``A [H]`` or the
expanded stride-0 views) and check index values, which the kernels cannot do without a sync.
"""

from __future__ import annotations

import torch


def _per_head(t: torch.Tensor | None, ndim_compact: int) -> torch.Tensor | None:
    """Compact per-head view of an argument given compact or expanded (stride-0) form."""
    if t is None:
        return None
    while t.dim() > ndim_compact:
        t = t[..., 0]
    return t


def mamba2_mtp_ssm_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                              dt_softplus=False, state_batch_indices=None, pad_slot_id=-1,
                              intermediate_states=None, intermediate_state_indices=None,
                              retrieve_parent_token=None, disable_state_update=False):
    """Float64 reference of ``jitkern.ops.mamba2_mtp_ssm_update``.

    Shapes as in the op: state ``[S, H, P, N]``; x ``[Bt, T, H, P]`` (or ``[Bt, H, P]``);
    dt ``[Bt, T, H]`` (or ``[Bt, T, H, P]`` stride 0 over P); A ``[H]`` (or ``[H, P, N]``);
    B, C ``[Bt, T, G, N]``; D, dt_bias ``[H]`` (or ``[H, P]``); z like x; intermediate_states
    ``[S2, >=T, H, P, N]``; index tensors ``[Bt]``; retrieve_parent_token ``[Bt, T]``.

    Mutates ``state`` (unless ``disable_state_update``) and ``intermediate_states`` (rounded to
    their dtypes). Returns the output as a float64 tensor of x's shape; padded sequences get 0.
    """
    squeeze = x.dim() == 3
    if squeeze:   # the T = 1 form
        x = x.unsqueeze(1)
        B, C = B.unsqueeze(1), C.unsqueeze(1)
        dt = dt.unsqueeze(1)
        z = z.unsqueeze(1) if z is not None else None
    Bt, T, H, P = x.shape
    G = B.shape[2]
    dev = x.device
    f64 = torch.float64
    dt_h = _per_head(dt, 3).to(f64)                     # [Bt, T, H]
    A_h = _per_head(A, 1).to(f64)                       # [H]
    D_h = _per_head(D, 1)
    bias_h = _per_head(dt_bias, 1)
    group = torch.arange(H, device=dev) // (H // G)     # head -> group
    out = torch.zeros(Bt, T, H, P, dtype=f64, device=dev)

    slots = (state_batch_indices.long() if state_batch_indices is not None
             else torch.arange(Bt, device=dev))
    for b in range(Bt):
        s = int(slots[b])
        if s == pad_slot_id:
            continue                                    # out stays 0; nothing else touched
        if not 0 <= s < state.shape[0]:
            raise IndexError(f"state_batch_indices[{b}] = {s} is outside [0, {state.shape[0]})")
        ci = s
        if intermediate_states is not None:
            ci = int(intermediate_state_indices[b]) if intermediate_state_indices is not None else s
            if not 0 <= ci < intermediate_states.shape[0]:
                raise IndexError(f"intermediate row {ci} of sequence {b} is outside "
                                 f"[0, {intermediate_states.shape[0]})")
        h = state[s].to(f64)                            # [H, P, N]
        for t in range(T):
            if retrieve_parent_token is not None and t > 0:
                par = int(retrieve_parent_token[b, t])
                if 0 <= par < t:                        # only an already computed node
                    h = intermediate_states[ci, par].to(f64)
            d = dt_h[b, t]
            if bias_h is not None:
                d = d + bias_h.to(f64)
            if dt_softplus:
                d = torch.where(d > 20, d, torch.log1p(torch.exp(d)))
            dA = torch.exp(A_h * d)                     # [H]
            Bg = B[b, t].to(f64)[group]                 # [H, N]
            Cg = C[b, t].to(f64)[group]
            xb = x[b, t].to(f64)                        # [H, P]
            h = h * dA[:, None, None] + (xb * d[:, None])[:, :, None] * Bg[:, None, :]
            if intermediate_states is not None:
                intermediate_states[ci, t] = h.to(intermediate_states.dtype)
            y = (h * Cg[:, None, :]).sum(-1)            # [H, P]
            if D_h is not None:
                y = y + xb * D_h.to(f64)[:, None]
            if z is not None:
                zb = z[b, t].to(f64)
                y = y * zb * torch.sigmoid(zb)
            out[b, t] = y
        if not disable_state_update:
            state[s] = h.to(state.dtype)
    return out[:, 0] if squeeze else out


def mamba2_commit_accepted_state_ref(state, intermediate_states, accepted_step, *,
                                     state_batch_indices=None, intermediate_state_indices=None,
                                     pad_slot_id=-1):
    """Reference of ``jitkern.ops.mamba2_commit_accepted_state`` (a plain copy, no arithmetic).

    For every sequence b with ``accepted_step[b] >= 0`` and a slot that is not the pad:
    ``state[s] = intermediate_states[ci, accepted_step[b]]``. Mutates ``state``; returns it."""
    Bt = accepted_step.shape[0]
    for b in range(Bt):
        k = int(accepted_step[b])
        if k < 0:
            continue
        s = int(state_batch_indices[b]) if state_batch_indices is not None else b
        if s == pad_slot_id:
            continue
        ci = int(intermediate_state_indices[b]) if intermediate_state_indices is not None else s
        state[s] = intermediate_states[ci, k]
    return state
