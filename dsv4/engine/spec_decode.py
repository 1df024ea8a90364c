"""Exact acceptance of speculative drafts (Leviathan et al. / Chen et al. rejection sampling).

Draft token d_j was sampled from the draft distribution q_j; the target model gives p_j at the
same position. Accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection
sample from normalise(max(0, p_j - q_j)) and stop; if all K drafts are accepted, sample a bonus
token from p_{K+1}. The emitted tokens are then distributed exactly as sampling from p alone.
With greedy sampling p and q are one-hot, so this accepts exactly the drafts equal to the
target's argmax and emits the target's argmax at the first mismatch: the greedy output is the
non-speculative greedy output token for token.
"""
from __future__ import annotations

import torch


def _uniform(generator: torch.Generator | None, device) -> float:
    dev = generator.device if generator is not None else device
    return torch.rand((), generator=generator, device=dev).item()


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    dev = generator.device if generator is not None else probs.device
    q = torch.empty(probs.shape, device=dev).exponential_(generator=generator).to(probs.device)
    return int((probs / q.clamp_min(torch.finfo(torch.float32).tiny)).argmax())


def accept_drafts(target: torch.Tensor, draft: torch.Tensor, drafts: list[int],
                  generator: torch.Generator | None) -> list[int]:
    """target [K+1, V] and draft [K, V] distributions (rows sum to 1), drafts the K sampled draft
    tokens. Returns the emitted tokens: the accepted drafts plus one corrected or bonus token."""
    out: list[int] = []
    for j, d in enumerate(drafts):
        p, q = target[j], draft[j]
        pd, qd = float(p[d]), float(q[d])
        if qd > 0 and (pd >= qd or _uniform(generator, p.device) < pd / qd):
            out.append(d)
            continue
        residual = (p - q).clamp_min(0)
        total = float(residual.sum())
        out.append(_sample(residual / total, generator) if total > 0 else _sample(p, generator))
        return out
    out.append(_sample(target[len(drafts)], generator))
    return out
