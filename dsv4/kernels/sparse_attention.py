"""Sparse attention with an attention sink over a shared latent key/value (SPEC.md 5.3-5.4).

Each token attends to its own list of window rows and compressed rows; keys and values are the
same `[D]` row, shared by all H heads; one softmax covers both lists plus the per-head sink.
"""
from __future__ import annotations

import torch


def gather_rows(idx: torch.Tensor, cache: torch.Tensor, new: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of cat(cache, new) at idx (any shape); -1 gives a zero row."""
    n = cache.shape[0]
    safe = idx.clamp(min=0)
    if n == 0:
        return new[(safe - n).clamp(0, new.shape[0] - 1)]
    if new is None:
        return cache[safe.clamp(max=n - 1)]
    from_new = (safe >= n)[..., None]
    return torch.where(from_new, new[(safe - n).clamp(0, new.shape[0] - 1)],
                       cache[safe.clamp(max=n - 1)])


def sparse_attention_ref(q: torch.Tensor, sink: torch.Tensor, scale: float,
                         win_cache: torch.Tensor, win_new: torch.Tensor, win_idx: torch.Tensor,
                         cmp_cache: torch.Tensor | None = None,
                         cmp_idx: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D]; sink [H] fp32 raw logits; win_idx [T, Kw] into cat(win_cache [Nw, D],
    win_new [T, D]); cmp_idx [T, Kc] into cmp_cache [Nc, D]; -1 marks an empty slot.
    Returns o [T, H, D] in q's dtype. Scores, softmax and the weighted sum run in fp32."""
    rows = gather_rows(win_idx, win_cache, win_new)  # [T, Kw, D]
    valid = win_idx >= 0
    if cmp_idx is not None and cmp_idx.shape[1]:
        rows = torch.cat([rows, gather_rows(cmp_idx, cmp_cache)], 1)
        valid = torch.cat([valid, cmp_idx >= 0], 1)
    rows = rows.float()
    logits = torch.einsum("thd,tkd->thk", q.float(), rows) * scale  # [T, H, K]
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    sink_l = sink.float()[None, :, None].expand(q.shape[0], -1, 1)
    probs = torch.softmax(torch.cat([logits, sink_l], -1), -1)[..., :-1]
    return torch.einsum("thk,tkd->thd", probs, rows).to(q.dtype)


def sparse_attention(q, sink, scale, win_cache, win_new, win_idx, cmp_cache=None, cmp_idx=None):
    return sparse_attention_ref(q, sink, scale, win_cache, win_new, win_idx, cmp_cache, cmp_idx)
