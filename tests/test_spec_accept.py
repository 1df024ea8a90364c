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


def test_second_position_follows_its_target_after_an_acceptance():
    """Two drafts: whenever the first is accepted, the second emitted token follows p_1 (the
    targets here do not depend on the first token), whatever q_1 is; and the number of tokens
    emitted matches the acceptance probability sum_x min(p_0(x), q_0(x))."""
    g = torch.Generator().manual_seed(1)
    V = 6
    p0, p1, p2 = (torch.softmax(torch.randn(V, generator=g), 0) for _ in range(3))
    q0, q1 = (torch.softmax(torch.randn(V, generator=g) * 2, 0) for _ in range(2))
    second = torch.zeros(V)
    accepted_first = 0
    n = 12000
    for _ in range(n):
        d0 = int(torch.multinomial(q0, 1, generator=g))
        d1 = int(torch.multinomial(q1, 1, generator=g))
        out = accept_drafts(torch.stack([p0, p1, p2]), torch.stack([q0, q1]), [d0, d1], g)
        assert 1 <= len(out) <= 3 and out[:len(out) - 1] == [d0, d1][:len(out) - 1]
        if len(out) >= 2:
            accepted_first += 1
            second[out[1]] += 1
    rate = float(torch.minimum(p0, q0).sum())
    assert abs(accepted_first / n - rate) < 4 * (rate * (1 - rate) / n) ** 0.5
    stat, pval = chisquare(second.numpy(), (p1 * accepted_first).numpy())
    assert pval > 1e-3, f"second tokens do not follow p_1: chi2={stat:.1f}, p={pval:.2g}"
