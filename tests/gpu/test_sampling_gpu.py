"""The fused greedy kernel against torch's argmax and log_softmax, on the real vocabulary size."""
from __future__ import annotations

import pytest
import torch

from dsv4.kernels import HAS_TRITON
from dsv4.kernels.greedy import greedy_logprob, greedy_logprob_ref

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA and Triton")]


@pytest.mark.parametrize("b,v", [(1, 129280), (7, 129280), (256, 129280), (3, 4097), (2, 1)])
def test_greedy_logprob_matches_torch(b, v):
    gen = torch.Generator(device="cuda").manual_seed(b)
    x = torch.randn(b, v, generator=gen, device="cuda") * 4
    x[0, v // 3] = x[0].max() + 1
    x[0, v - 1] = x[0, v // 3]          # a tie across slices: the lowest id wins
    if b > 1:
        x[1, : v // 2] = float("-inf")  # masked vocabulary
    ids, lp = greedy_logprob(x)
    want_ids, want_lp = greedy_logprob_ref(x)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-4)
    ids2, lp2, rows = greedy_logprob(x, packed=True)  # the engine's one copy to the host
    assert torch.equal(ids2, ids) and torch.equal(lp2, lp)
    assert torch.equal(rows, torch.stack([ids.double(), lp.double(), torch.ones_like(rows[2])]))
