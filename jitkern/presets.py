"""Model presets: the kernel configurations a model's serving run asks for, for ``jitkern warmup``.

A preset names the model's shapes (attention heads and head_dim; Mamba2 heads, head_dim and
d_state), its dtypes (activations, KV cache, SSM state cache), the KV page sizes and layout, and
the speculative-decoding shapes it verifies (chain drafts of 1..k query tokens per sequence,
draft trees of n nodes). ``Preset.configs(tp)`` turns that into family configurations the same
way the ops pick them at run time, so a warmed cache holds what the first request needs:

- attention: the ops choose the mode (decode for one uniform query token, chain otherwise, tree
  with a tree mask) and the query tile from ``rows = query tokens * G``, where
  ``G = query heads / KV heads`` on one tensor-parallel rank (KV heads are replicated when the
  ranks outnumber them). So ``--tp`` changes G and with it the query tiles. A 128-row tile
  brings its 64-row half along (the op halves it on small grids).
- Mamba2: the tiling comes from (N, state dtype, head_dim); heads, groups and batch are run-time.

This module imports no torch (warm-up must start fast).
"""

from __future__ import annotations

from dataclasses import dataclass

from .families.mamba2 import GRID_LAYOUTS, nemotron_config
from .families.spec_dec_attention import op_configs, q_tiles_for

ATTENTION_FAMILY = "spec_dec_attention"
MAMBA2_FAMILY = "mamba2_mtp_ssm_update"


@dataclass(frozen=True)
class Attention:
    """Paged attention layers: heads of the whole model (before tensor parallelism)."""

    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "bf16"
    kv_dtypes: tuple = ("bf16", "fp8_e4m3")
    kv_layout: str = "NHD"
    page_sizes: tuple = (16, 64)

    def group(self, tp: int) -> int:
        """G = query heads per KV head on one rank (KV heads replicated when tp > kv_heads)."""
        kv_per_rank = max(1, self.kv_heads // tp)
        return (self.q_heads // tp) // kv_per_rank


@dataclass(frozen=True)
class Mamba2:
    """Mamba2 layers: heads H, head_dim P, d_state N, groups G of the whole model."""

    heads: int
    head_dim: int
    d_state: int
    groups: int
    state_dtypes: tuple = ("bf16", "fp32")


@dataclass(frozen=True)
class SpecDecode:
    """Speculative-decoding shapes a verification pass runs.

    ``chain``: most query tokens per sequence in a chain pass (draft length + 1; ragged batches
    run every length from 1 up to it). ``tree``: (fewest, most) nodes of a draft tree, or None."""

    chain: int = 8
    tree: tuple | None = (4, 64)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    attention: Attention | None = None
    mamba2: Mamba2 | None = None
    spec: SpecDecode = SpecDecode()
    default_tp: int = 1

    def check_tp(self, tp: int) -> None:
        """ValueError unless ``tp`` splits every layer's heads evenly."""
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"--tp must be a positive integer, got {tp!r}")
        bad = []
        if self.attention is not None:
            a = self.attention
            if a.q_heads % tp:
                bad.append(f"{a.q_heads} attention query heads")
            if a.kv_heads % tp and tp % a.kv_heads:
                bad.append(f"{a.kv_heads} KV heads (nor is it a multiple of them)")
        if self.mamba2 is not None and self.mamba2.heads % tp:
            bad.append(f"{self.mamba2.heads} Mamba2 heads")
        if bad:
            raise ValueError(f"preset {self.name}: --tp {tp} does not divide the "
                             f"{' and the '.join(bad)}")

    def configs(self, tp: int | None = None) -> list[tuple[str, dict]]:
        """[(family name, configuration), ...] without duplicates, in a stable order."""
        tp = self.default_tp if tp is None else tp
        self.check_tp(tp)
        out: list[tuple[str, dict]] = []
        if self.mamba2 is not None:
            out += [(MAMBA2_FAMILY, c) for c in self._mamba2_configs()]
        if self.attention is not None:
            out += [(ATTENTION_FAMILY, c) for c in self._attention_configs(tp)]
        seen, unique = set(), []
        for fam, cfg in out:
            k = (fam, tuple(sorted(cfg.items())))
            if k not in seen:
                seen.add(k)
                unique.append((fam, cfg))
        return unique

    def _mamba2_configs(self) -> list[dict]:
        """The op's choices (jitkern.ops.mamba2): tree kernel only with a parent index and more
        than one token, tiling from (N, state dtype, P, tree, one token or more, the grid's
        layout: GRID_LAYOUTS), Nemotron dtypes and flags; plus the accepted-state commit's
        configuration."""
        m = self.mamba2
        modes = [(False, False, 1)]                    # (tree, intermediate, T): plain decode
        if self.spec.chain > 1 or self.spec.tree is not None:
            modes += [(False, True, 1),                # a verification pass of one token
                      (False, True, None)]             # chain drafts (MTP), T > 1
        if self.spec.tree is not None:
            modes.append((True, True, None))           # draft trees, T > 1
        out = []
        for sd in m.state_dtypes:
            for tree, inter, T in modes:
                # default, small (batch 1 of a few heads per rank) and coarse (2-byte chains on
                # the grids coarse_pays picks out) layouts
                out += [nemotron_config(sd, tree=tree, intermediate=inter, T=T, N=m.d_state,
                                        P=m.head_dim, **lay) for lay in GRID_LAYOUTS]
            if len(modes) > 1:  # the accepted-state commit runs this one, whatever N and P are
                out.append(nemotron_config(sd, tree=False))
        return out

    def _attention_configs(self, tp: int) -> list[dict]:
        a = self.attention
        g = a.group(tp)

        def tiles(fp8):   # (mode, query tile) pairs the op may run
            out = sorted({("decode", qt) for qt in q_tiles_for(g, fp8)})
            out += sorted({("chain", qt) for n in range(1, self.spec.chain + 1)
                           for qt in q_tiles_for(n * g, fp8)})
            if self.spec.tree is not None:
                lo, hi = self.spec.tree
                out += sorted({("tree", qt) for n in range(lo, hi + 1)
                               for qt in q_tiles_for(n * g, fp8)})
            return out
        return [c for kv in a.kv_dtypes for ps in a.page_sizes
                for mode, qt in tiles(kv == "fp8_e4m3")
                for c in op_configs(dict(head_dim=a.head_dim, dtype=a.dtype, kv_dtype=kv,
                                         kv_layout=a.kv_layout, page_size=ps, mode=mode,
                                         q_tile=qt, split_kv=True))]

    def describe(self, tp: int | None = None) -> dict:
        """The preset's shapes and choices as plain data (for ``jitkern presets``)."""
        tp = self.default_tp if tp is None else tp
        d = {"name": self.name, "description": self.description, "default_tp": self.default_tp,
             "tp": tp, "spec_decode": {"chain_max_tokens": self.spec.chain,
                                       "tree_nodes": list(self.spec.tree) if self.spec.tree else None}}
        if self.attention is not None:
            a = self.attention
            d["attention"] = {"q_heads": a.q_heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
                              "dtype": a.dtype, "kv_dtypes": list(a.kv_dtypes),
                              "kv_layout": a.kv_layout, "page_sizes": list(a.page_sizes),
                              "group_per_rank": a.group(tp)}
        if self.mamba2 is not None:
            m = self.mamba2
            d["mamba2"] = {"heads": m.heads, "head_dim": m.head_dim, "d_state": m.d_state,
                           "groups": m.groups, "state_dtypes": list(m.state_dtypes)}
        return d


# Shapes from the models' published configurations (config.json on their model cards).
PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("nemotron-h-8b",
           "Nemotron-H 8B: hybrid, Mamba2 layers (H=128, P=64, N=128, 8 groups) and GQA attention "
           "(32 query / 8 KV heads, head_dim 128); bf16, SSM state cache bf16 or fp32",
           attention=Attention(32, 8, 128),
           mamba2=Mamba2(heads=128, head_dim=64, d_state=128, groups=8)),
    Preset("nemotron-3-nano-30b",
           "Nemotron 3 Nano 30B-A3B: hybrid MoE, Mamba2 layers (H=64, P=64, N=128, 8 groups) and "
           "GQA attention (32 query / 2 KV heads, head_dim 128); bf16, SSM state bf16 or fp32",
           attention=Attention(32, 2, 128),
           mamba2=Mamba2(heads=64, head_dim=64, d_state=128, groups=8)),
    Preset("llama-3.1-8b",
           "Llama-3.1-8B: GQA attention, 32 query / 8 KV heads, head_dim 128; bf16, KV bf16 or fp8",
           attention=Attention(32, 8, 128)),
    Preset("llama-3.1-70b",
           "Llama-3.1-70B: GQA attention, 64 query / 8 KV heads, head_dim 128; bf16, KV bf16 or "
           "fp8; served at TP=8 by default",
           attention=Attention(64, 8, 128), default_tp=8),
)}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError listing the presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None
