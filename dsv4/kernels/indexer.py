"""Lightning indexer scores and top-k selection for CSA layers (SPEC.md 6).

score(p, i) = sum_h w[p, h] * relu(q[p, h] . K[i]) over the entries i visible to p;
the `min(topk, visible)` best entries are returned (exact ties broken arbitrarily).
"""
from __future__ import annotations

import torch


def indexer_topk_ref(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor,
                     cand: torch.Tensor, topk: int) -> torch.Tensor:
    """q [T, nI, c]; w [T, nI]; keys [Nk, c] (flat cache rows); cand [T, N] rows visible to each
    token (-1 = not visible). Returns [T, min(topk, N)] selected rows, -1 where fewer visible."""
    k = keys[cand.clamp(min=0)].float()  # [T, N, c]
    s = torch.relu(torch.einsum("thc,tnc->thn", q.float(), k))
    score = torch.einsum("thn,th->tn", s, w.float())
    score = score.masked_fill(cand < 0, float("-inf"))
    kk = min(topk, cand.shape[1])
    # A stable sort breaks exact ties (frequent: relu zeros) towards older entries, the same way
    # whatever the batch looks like.
    val, order = score.sort(dim=-1, descending=True, stable=True)
    sel = cand.gather(1, order[:, :kk])
    return torch.where(torch.isfinite(val[:, :kk]), sel, -1)


def indexer_topk(q, w, keys, cand, topk):
    return indexer_topk_ref(q, w, keys, cand, topk)
