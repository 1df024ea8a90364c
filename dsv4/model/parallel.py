"""Which part of each checkpoint tensor a tensor-parallel rank holds.

One rule per tensor name (official checkpoint names), used both to read a checkpoint shard by
shard straight into each rank's slice and to shard an in-memory model for tests:
- vocabulary rows of `embed` (the head is replicated: rank 0 samples without a collective);
- attention heads: rows of `wq_b` (H*D) and `attn_sink` (H), rows of `wo_a` (G*o_lora), columns
  of `wo_b`; indexer heads: rows of `indexer.wq_b` and `indexer.weights_proj`;
- routed experts: the whole tensor on the rank that owns the expert, nothing elsewhere;
- shared expert: rows of w1/w3 and columns of w2 (intermediate channels);
- everything else (latent kv, compressors, norms, mHC, gates) is replicated.
FP8 block scales follow their weight's slice in units of 128.
"""
from __future__ import annotations

import re

import torch

from ..distributed import ParallelGroup

_ROWS = [  # (pattern, how many rows one unit of the split covers: a function of cfg)
    (r"(^|\.)embed\.weight$", "vocab"),
    (r"\.attn\.wq_b\.(weight|scale)$", "heads"), (r"\.attn\.attn_sink$", "heads"),
    (r"\.attn\.wo_a\.(weight|scale)$", "groups"),
    (r"\.indexer\.wq_b\.(weight|scale)$", "iheads"), (r"\.indexer\.weights_proj\.weight$", "iheads"),
    (r"\.shared_experts\.w[13]\.(weight|scale|weight_scale)$", "inter"),
]
_COLS = [(r"\.attn\.wo_b\.(weight|scale)$", "groups"),
         (r"\.shared_experts\.w2\.(weight|scale|weight_scale)$", "inter")]
_EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.")


def _total(kind: str, cfg) -> int:
    return {"vocab": cfg.vocab_size, "heads": cfg.num_attention_heads, "groups": cfg.o_groups,
            "iheads": cfg.index_n_heads, "inter": cfg.moe_intermediate_size}[kind]


def tp_slice(name: str, shape: tuple[int, ...], cfg, tp: ParallelGroup):
    """The index (tuple of slices) of rank `tp.rank`'s part of tensor `name` of full `shape`,
    `()` for a replicated tensor, or None when this rank holds none of it."""
    if tp.size == 1:
        return ()
    m = _EXPERT.search(name)
    if m:
        first, n = tp.split(cfg.n_routed_experts, "n_routed_experts")
        return () if first <= int(m.group(1)) < first + n else None
    for pats, dim in ((_ROWS, 0), (_COLS, 1)):
        for pat, kind in pats:
            if re.search(pat, name) and len(shape) > dim:
                start, n = tp.split(_total(kind, cfg), kind)
                per = shape[dim] // _total(kind, cfg) if shape[dim] >= _total(kind, cfg) else 0
                if per == 0:  # a block-scale tensor smaller than the unit count: 128-row blocks
                    full = shape[dim] * 128
                    per_unit = full // _total(kind, cfg)
                    lo, hi = start * per_unit // 128, -(-(start + n) * per_unit // 128)
                else:
                    lo, hi = start * per, (start + n) * per
                idx = [slice(None)] * len(shape)
                idx[dim] = slice(lo, hi)
                return tuple(idx)
    return ()


def shard_state_dict(full: dict[str, torch.Tensor], cfg, tp: ParallelGroup) -> dict[str, torch.Tensor]:
    """This rank's part of a full (unsharded) state dict."""
    out = {}
    for name, t in full.items():
        idx = tp_slice(name, tuple(t.shape), cfg, tp)
        if idx is not None:
            out[name] = t[idx].clone() if idx else t
    return out
