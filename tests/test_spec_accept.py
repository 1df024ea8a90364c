"""Rejection sampling of drafts keeps the target distribution exactly (chi-square test)."""
import torch
from scipy.stats import chisquare

from dsv4.engine.spec_decode import accept_drafts


def test_greedy_accepts_matching_prefix_then_corrects():
    V = 6
    target = torch.nn.functional.one_hot(torch.tensor([2, 4, 1, 0]), V).float()
    draft = torch.nn.functional.one_hot(torch.tensor([2, 4, 3]), V).float()
    assert accept_drafts(target, draft, [2, 4, 3], None) == [2, 4, 1]
    assert accept_drafts(target, draft[:2], [2, 4], None) == [2, 4, 1]  # bonus token


def test_first_token_distribution_equals_target_at_1e3_significance():
    """Over 20000 draws from a fixed seed, the first emitted token follows p, not q."""
    g = torch.Generator().manual_seed(0)
    V = 8
    p = torch.softmax(torch.randn(V, generator=g), 0)
    q = torch.softmax(torch.randn(V, generator=g) * 2, 0)
    counts = torch.zeros(V)
    n = 20000
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        counts[accept_drafts(torch.stack([p, p]), q[None], [d], g)[0]] += 1
    stat, pval = chisquare(counts.numpy(), (p * n).numpy())
    assert pval > 1e-3, f"emitted tokens do not follow p: chi2={stat:.1f}, p={pval:.2g}"
