"""Each component against its direct formula (SPEC.md 4-8)."""

import pytest
import torch

from model_helpers import make_cache, make_model
from dsv4.cache.kv_cache import CompressorState
from dsv4.kernels.mhc import sinkhorn
from dsv4.kernels.sparse_attention import sparse_attention_ref
from dsv4.model.batch import ForwardBatch, SeqChunk
from dsv4.model.compressor import Compressor
from dsv4.model.rope import apply_rope, rope_frequencies
from dsv4.quant.sim import E2M1_VALUES, fp4_sim, fp8_sim, hadamard, pow2ceil

g = torch.Generator().manual_seed(0)


def test_sinkhorn_is_doubly_stochastic():
    c = sinkhorn(torch.randn(16, 4, 4, generator=g), iters=20, eps=1e-6)
    assert torch.allclose(c.sum(-1), torch.ones(16, 4), atol=1e-2)
    assert torch.allclose(c.sum(-2), torch.ones(16, 4), atol=1e-5)
    assert (c > 0).all()


def test_inverse_rope_undoes_rope():
    cfg = make_model().cfg
    for ratio in (0, 4):
        f = rope_frequencies(cfg, ratio)
        x = torch.randn(10, 3, cfg.qk_rope_head_dim, generator=g)
        pos = torch.arange(10) * 977
        y = apply_rope(x, pos, f)
        assert not torch.allclose(x, y)
        assert torch.allclose(apply_rope(y, pos, f, inverse=True), x, atol=1e-4)


def test_yarn_only_on_compressed_layers():
    cfg = make_model().cfg
    f0, f4 = rope_frequencies(cfg, 0), rope_frequencies(cfg, 4)
    r = cfg.qk_rope_head_dim
    assert torch.allclose(f0, cfg.rope_theta ** (-torch.arange(0, r, 2).double() / r).float())
    plain = cfg.compress_rope_theta ** (-torch.arange(0, r, 2).double() / r).float()
    assert torch.allclose(f4[:1], plain[:1])  # the highest frequency is untouched
    assert torch.allclose(f4[-1], plain[-1] / cfg.rope_scaling["factor"])  # low ones divided


def test_fp8_sim_lands_on_e4m3_grid_with_pow2_scales():
    x = torch.randn(6, 128, generator=g) * 10
    y = fp8_sim(x, 64)
    s = pow2ceil(x.view(6, 2, 64).abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448)
    q = y.view(6, 2, 64) / s
    assert torch.equal(q, q.to(torch.float8_e4m3fn).float()), "not e4m3 values"
    assert torch.equal(fp8_sim(y, 64), y), "round trip is not idempotent"


def test_fp4_sim_lands_on_e2m1_grid_with_ties_to_even():
    x = torch.randn(4, 64, generator=g)
    y = fp4_sim(x, 32)
    s = pow2ceil(x.view(4, 2, 32).abs().amax(-1, keepdim=True) / 6)
    grid = torch.tensor(E2M1_VALUES)
    assert torch.isin((y.view(4, 2, 32) / s).abs(), grid).all()
    assert torch.equal(fp4_sim(y, 32), y)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] + [6.0] * 25)
    assert fp4_sim(ties, 32)[:7].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_hadamard_is_orthonormal():
    x = torch.randn(3, 128, generator=g)
    assert torch.allclose(hadamard(hadamard(x)), x, atol=1e-5)


def test_sparse_attention_with_everything_selected_equals_dense_attention_with_sink():
    T, H, D, N = 5, 4, 64, 7
    q, rows = torch.randn(T, H, D, generator=g), torch.randn(N, D, generator=g)
    sink = torch.randn(H, generator=g)
    causal = torch.arange(N)[None, :] <= torch.arange(T)[:, None] + 2  # [T, N]
    idx = torch.where(causal, torch.arange(N)[None, :], -1)
    empty = torch.empty(0, D)
    out = sparse_attention_ref(q, sink, D ** -0.5, empty, rows, idx[:, :4], rows, idx[:, 4:] - 0)
    # The same with a plain masked softmax over all N rows plus the sink column.
    logits = torch.einsum("thd,nd->thn", q, rows) * D ** -0.5
    logits = logits.masked_fill(~causal[:, None, :], float("-inf"))
    p = torch.softmax(torch.cat([logits, sink[None, :, None].expand(T, H, 1)], -1), -1)[..., :N]
    assert torch.allclose(out, torch.einsum("thn,nd->thd", p, rows), atol=1e-5)


@pytest.mark.parametrize("ratio", [4, 128])
def test_compressor_equals_naive_window_loop(ratio):
    model = make_model()
    cfg = model.cfg
    C, L = 128, (3 * ratio + 1 if ratio == 4 else 2 * ratio + 5)
    comp = Compressor(cfg, ratio, C, rope_frequencies(cfg, ratio), kind="attn")
    with torch.no_grad():
        for p in comp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5))
    u = torch.randn(L, cfg.hidden_size, generator=g)
    state = CompressorState(kv=torch.zeros(1, 2 * ratio + 8, comp.k * C),
                            score=torch.zeros(1, 2 * ratio + 8, comp.k * C))
    out = torch.zeros(4, 128 // ratio, C)
    cut = L // 2  # two chunks, so windows straddle the state
    for lo, hi in ((0, cut), (cut, L)):
        b = ForwardBatch([SeqChunk([0] * (hi - lo), lo, 0, [0, 1, 2, 3])], 8, 16, 1)
        comp(u[lo:hi], b, state, lambda dst, rows: out.view(-1, C).index_copy_(0, dst, rows))
    a, sc = comp.wkv(u), comp.wgate(u) + comp.ape[torch.arange(L) % ratio]
    for i in range(L // ratio):
        cur = range(i * ratio, i * ratio + ratio)
        if ratio == 4:
            prev = range((i - 1) * ratio, i * ratio) if i else range(0)
            items = [(a[t, :C], sc[t, :C]) for t in prev] + [(a[t, C:], sc[t, C:]) for t in cur]
        else:
            items = [(a[t], sc[t]) for t in cur]
        kv, s = torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
        c = (torch.softmax(s, 0) * kv).sum(0)
        c = comp.norm(c[None])[0]
        c = torch.cat([c[:C - 64], apply_rope(c[None, C - 64:], torch.tensor([i * ratio]),
                                               comp.freqs)[0]])
        c = torch.cat([fp8_sim(c[None, :C - 64], 64)[0], c[C - 64:]])
        got = out.view(-1, C)[i]
        assert torch.allclose(got, c, atol=1e-5), f"window {i}: max diff {(got - c).abs().max()}"


def test_mtp_logits_have_vocab_shape_and_depend_on_next_token(tiny):
    cache = make_cache(tiny)
    ids = torch.randint(0, 512, (12,), generator=g).tolist()
    b = ForwardBatch([SeqChunk(ids, 0, 0, [0])], tiny.cfg.sliding_window, cache.window_rows,
                     cache.num_slots, logits_indices=list(range(12)))
    with torch.inference_mode():
        h = tiny(b, cache)
        outs = []
        for shift in (1, 2):
            c2 = make_cache(tiny)
            nxt = torch.tensor(ids[1:] + [0]) if shift == 1 else torch.tensor(ids[1:] + [0]) + 1
            x = tiny.mtp_forward(h, nxt % 512, b, c2)
            outs.append(tiny.mtp_logits(x))
    assert outs[0].shape == (12, tiny.cfg.vocab_size)
    assert torch.isfinite(outs[0]).all()
    assert (outs[0] - outs[1]).abs().amax(-1).min() > 1e-3, "MTP logits ignore the next token"


def test_mtp_is_chunk_consistent(tiny):
    ids = torch.randint(0, 512, (20,), generator=g).tolist()
    res = []
    for sizes in ([20], [7, 13]):
        cache = make_cache(tiny)
        outs, p = [], 0
        for n in sizes:
            b = ForwardBatch([SeqChunk(ids[p:p + n], p, 0, [0])], tiny.cfg.sliding_window,
                             cache.window_rows, cache.num_slots, logits_indices=list(range(n)))
            with torch.inference_mode():
                h = tiny(b, cache)
                nxt = torch.tensor((ids + [0])[p + 1:p + n + 1])
                outs.append(tiny.mtp_logits(tiny.mtp_forward(h, nxt, b, cache)))
            p += n
        res.append(torch.cat(outs))
    assert (res[0] - res[1]).abs().max() < 1e-4
