"""CPU specifications of the torch references added with the attention-path kernels."""
from __future__ import annotations

import pytest
import torch

from dsv4.kernels.kv_fp8 import kv_fp8_row_bytes, pack_kv_fp8, unpack_kv_fp8
from dsv4.kernels.sparse_attention import sparse_attention_ref
from dsv4.quant.sim import fp8_sim

D, R = 512, 64


def model_rows(n: int, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """Rows as the model writes them: FP8-simulated no-rope dims, plain rope dims, with row
    magnitudes over many binades (the per-64 scales differ)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g) * torch.logspace(-5, 3, n)[:, None]
    return torch.cat([fp8_sim(x[:, :D - R], 64), x[:, D - R:]], 1).to(dtype)


def test_published_row_is_584_bytes():
    assert kv_fp8_row_bytes(512, 64) == 584


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packing_model_rows_is_lossless(dtype):
    rows = model_rows(257, dtype)
    rows[3] = 0  # an all-zero row takes the minimum scale
    packed = pack_kv_fp8(rows)
    assert packed.dtype == torch.uint8 and packed.shape == (257, 584)
    back = unpack_kv_fp8(packed, D, R, dtype)
    if dtype == torch.float32:  # the layout keeps rope dims in bf16
        rows = torch.cat([rows[:, :D - R], rows[:, D - R:].bfloat16().float()], 1)
    assert torch.equal(back, rows), f"max diff {(back - rows).abs().max().item()}"


def test_layout_places_codes_rope_and_scales():
    row = torch.zeros(1, D)
    row[0, 0] = 3.0          # amax 3 -> scale pow2ceil(3/448) = 2^-7, code 384
    row[0, D - R] = -1.5     # first rope dim, stored as bf16
    p = pack_kv_fp8(row)[0]
    assert p[0].item() == torch.tensor([384.0]).to(torch.float8_e4m3fn).view(torch.uint8).item()
    assert p[448:450].view(torch.bfloat16).item() == -1.5
    assert p[576].item() == 127 - 7
    assert p[583].item() == 0  # padding


def test_unpack_rejects_a_wrong_row_width():
    with pytest.raises(ValueError, match="584"):
        unpack_kv_fp8(torch.zeros(2, 576, dtype=torch.uint8), D, R)


def _prmt(a: torch.Tensor, sel: int) -> torch.Tensor:
    """PTX `prmt.b32 d, a, 0, sel` (default mode) on int64-held 32-bit words: byte i of d is
    byte (sel >> 4i) & 7 of the 8 bytes {a, 0} (bit 3 of the nibble, sign replication, unused)."""
    out = torch.zeros_like(a)
    for i in range(4):
        src = (sel >> (4 * i)) & 0xF
        assert src < 8
        byte = (a >> (8 * src)) & 0xFF if src < 4 else torch.zeros_like(a)
        out |= byte << (8 * i)
    return out


def test_gluon_fp8_row_decode_arithmetic_is_exact():
    """The Gluon attention kernel's FP8-row decode (`sparse_attention_wg._e4m3_bf16`), its PTX
    emulated op by op: 4 e4m3 codes a register -> two bf16 pairs (each code's value times
    2^-120), then two bf16 products by powers of two. Every code but NaN's, every scale byte:
    the same bf16 bits as the reference unpacking (`unpack_kv_fp8`: code times 2^(byte-127));
    byte 255 (2^128, past fp32, e8m0's NaN) is never written: a scale comes from a finite amax."""
    codes = torch.arange(256, dtype=torch.int64)
    words = codes.view(64, 4)
    x = words[:, 0] | words[:, 1] << 8 | words[:, 2] << 16 | words[:, 3] << 24
    halves = []
    for sel in (0x1404, 0x3424):  # codes 0, 1 then 2, 3 of each register
        y = _prmt(x, sel)
        h = ((y >> 4) & 0x07F007F0) | (y & 0x80008000)
        halves += [h & 0xFFFF, h >> 16]
    bits = torch.stack([halves[0], halves[1], halves[2], halves[3]], 1).reshape(256)
    h = bits.to(torch.int16).view(torch.bfloat16)  # (values in 0..65535 wrap to int16 bits)
    s = torch.arange(255, dtype=torch.int64)[:, None]
    s1 = s.clamp(max=134)
    m1 = ((s1 + 120) << 7).to(torch.int16).view(torch.bfloat16)
    m2 = ((s - s1 + 127) << 7).to(torch.int16).view(torch.bfloat16)
    got = h[None, :] * m1 * m2  # [scale byte, code], bf16 products
    ref = (codes.to(torch.uint8).view(torch.float8_e4m3fn).float()[None, :]
           * torch.ldexp(torch.ones(255, 1), s - 127)).to(torch.bfloat16)
    finite = (codes & 0x7F) != 0x7F  # e4m3fn's NaN codes: never stored (codes are clamped)
    assert torch.equal(got[:, finite].view(torch.int16), ref[:, finite].view(torch.int16))


def test_reference_attention_reads_packed_caches_like_float_ones():
    g = torch.Generator().manual_seed(1)
    T, H = 3, 4
    q = torch.randn(T, H, D, generator=g).bfloat16()
    sink = torch.randn(H, generator=g)
    win, new, cmp = model_rows(10, seed=2), model_rows(T, seed=3), model_rows(6, seed=4)
    wi = torch.tensor([[0, 5, 10, -1], [11, 2, -1, -1], [12, 11, 10, 9]])
    ci = torch.tensor([[0, 5], [-1, -1], [3, -1]])
    want = sparse_attention_ref(q, sink, D ** -0.5, win, new, wi, cmp, ci)
    got = sparse_attention_ref(q, sink, D ** -0.5, pack_kv_fp8(win), new, wi, pack_kv_fp8(cmp), ci)
    assert torch.equal(got, want)


def test_reference_attention_with_only_new_rows():
    """An empty window cache (first chunk) reads every row from this step's rows."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 64, generator=g)
    new = torch.randn(2, 64, generator=g)
    out = sparse_attention_ref(q, torch.zeros(4), 0.125, torch.zeros(0, 64), new,
                               torch.tensor([[0, -1], [1, 0]]))
    p0 = torch.softmax(torch.stack([(q[0] @ new[0]) * 0.125, torch.zeros(4)], -1), -1)[:, 0]
    torch.testing.assert_close(out[0], p0[:, None] * new[0])


def test_fp32_split_into_three_bf16_parts_is_exact():
    """linear_f32's GPU path rests on x == hi + mid + lo (bf16 parts) for every fp32 x, so
    that each part times a bf16 weight is an exact fp32 product."""
    from dsv4.kernels.f32_linear import linear_f32, linear_f32_ref, split_bf16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 300, generator=g) * torch.logspace(-30, 30, 300)
    x[0, :4] = torch.tensor([0.0, -0.0, 1.0 + 2 ** -23, -(2 - 2 ** -22)])
    parts = split_bf16(x)
    assert parts.dtype == torch.bfloat16 and parts.shape == (3, 7, 300)
    assert torch.equal((parts[0].float() + parts[1].float()) + parts[2].float(), x)
    w = torch.randn(5, 300, generator=g).bfloat16().double()
    # every product part x weight is exact, and so is their sum: the element products of x
    prods = [p.double()[:, None, :] * w[None] for p in parts]
    assert torch.equal((prods[0] + prods[1]) + prods[2], x.double()[:, None, :] * w[None])
    w = w.bfloat16()
    assert torch.equal(linear_f32(x, w), linear_f32_ref(x, w))  # CPU: the reference itself


# ------------------------------------------------------------------ references of the fused ops
def test_rope_in_place_matches_the_composition_and_rejects_mismatches():
    from dsv4.kernels.rope import apply_rope, rope_
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 128, generator=g)
    pos = torch.tensor([0, 7, 70000])
    f = 10000.0 ** (-torch.arange(0, 64, 2) / 64)
    want = torch.cat([x[..., :64], apply_rope(x[..., 64:], pos, f)], -1)
    assert torch.equal(rope_(x.clone(), pos, f, 64), want)
    normed = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    want = torch.cat([normed[..., :64], apply_rope(normed[..., 64:], pos, f)], -1)
    assert torch.equal(rope_(x.clone(), pos, f, 64, norm_eps=1e-6), want)
    back = rope_(rope_(x.clone(), pos, f, 64), pos, f, 64, inverse=True)
    assert torch.allclose(back, x, atol=1e-4)
    with pytest.raises(ValueError, match="positions"):
        rope_(x, pos[:2], f, 64)
    with pytest.raises(ValueError, match="rope_dim"):
        rope_(x, pos, f, 48)


def test_qat_roundings_match_the_simulations():
    from dsv4.kernels.qat import fp8_round_, hadamard_fp4
    from dsv4.quant.sim import fp4_sim, hadamard
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 512, generator=g) * 4
    want = torch.cat([fp8_sim(x[:, :448], 64), x[:, 448:]], 1)
    assert torch.equal(fp8_round_(x.clone(), 448), want)
    with pytest.raises(ValueError, match="multiple of 64"):
        fp8_round_(x.clone(), 100)
    q = torch.randn(2, 8, 128, generator=g).bfloat16()
    assert torch.equal(hadamard_fp4(q, True), fp4_sim(hadamard(q.float()).bfloat16(), 32))
    assert torch.equal(hadamard_fp4(q, False), hadamard(q.float()).bfloat16())


def test_rope_hadamard_fp4_is_the_three_steps():
    """The indexer's queries from wq_b's split-K partials: sum rounded, RoPE, Hadamard + FP4."""
    from dsv4.kernels.qat import hadamard_fp4, rope_hadamard_fp4
    from dsv4.kernels.rope import rope_
    g = torch.Generator().manual_seed(2)
    parts = torch.randn(3, 4, 2 * 128, generator=g)
    pos, f = torch.tensor([0, 5, 77, 4096]), torch.rand(32, generator=g)
    q = rope_(parts.sum(0).bfloat16().view(4, 2, 128), pos, f, 64)
    got = rope_hadamard_fp4(parts, 2, pos, f, 64, True, torch.bfloat16)
    assert torch.equal(got, hadamard_fp4(q, True))
    one = parts[:1].bfloat16()  # S = 1 in the working dtype: the product itself, kept intact
    kept = one.clone()
    got = rope_hadamard_fp4(one, 2, pos, f, 64, False, torch.bfloat16)
    assert torch.equal(one, kept)
    assert torch.equal(got, hadamard_fp4(rope_(kept[0].view(4, 2, 128), pos, f, 64), False))
    with pytest.raises(ValueError, match="heads"):
        rope_hadamard_fp4(parts, 3, pos, f, 64, True, torch.bfloat16)
    with pytest.raises(ValueError, match="rope_dim"):
        rope_hadamard_fp4(parts, 2, pos, f, 48, True, torch.bfloat16)


@pytest.mark.parametrize("func", ["sqrtsoftplus", "sigmoid", "softmax"])
def test_routing_reference_and_its_errors(func):
    from dsv4.kernels.routing import route
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 16, generator=g)
    bias = torch.randn(16, generator=g)
    idx, wgt = route(z, func, 3, 2.0, bias=bias)
    s = {"sqrtsoftplus": torch.nn.functional.softplus(z).sqrt(), "sigmoid": z.sigmoid(),
         "softmax": z.softmax(-1)}[func]
    assert torch.equal(idx, (s + bias).topk(3, -1).indices)
    w = s.gather(1, idx)
    if func != "softmax":
        w = w / w.sum(-1, keepdim=True)
    assert torch.allclose(wgt, 2.0 * w)
    table = torch.randint(0, 16, (10, 3), generator=g, dtype=torch.int32)
    ids = torch.tensor([1, 9, 9, 0])
    assert torch.equal(route(z, func, 3, 2.0, table=table, ids=ids)[0], table[ids].long())
    with pytest.raises(ValueError, match="scoring function"):
        route(z, "relu", 3, 1.0, bias=bias)
    with pytest.raises(ValueError, match="either a hash table"):
        route(z, func, 3, 1.0)


def test_greedy_logprob_reference_and_its_errors():
    from dsv4.kernels.greedy import greedy_logprob
    x = torch.tensor([[0.0, 2.0, 2.0, -1.0], [float("-inf"), 1.0, 0.0, 0.0]])
    ids, lp = greedy_logprob(x)
    assert ids.tolist() == [1, 1]  # the lowest id among equal maxima
    assert torch.allclose(lp, torch.log_softmax(x, -1)[[0, 1], [1, 1]])
    _, _, rows = greedy_logprob(x, packed=True)  # ids, logprobs, ranks for one host copy
    assert rows.dtype == torch.float64 and rows.tolist() == [[1, 1], lp.double().tolist(), [1, 1]]
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        greedy_logprob(torch.zeros(3))


def test_compress_windows_reference_gathers_new_rows_and_ring_rows():
    """Items come from this step's rows (gate rows plus the positional bias of their place in
    the window) or from the ring (bias already in); overlapping windows split the channels."""
    from dsv4.kernels.compressor import compress_pool_ref, compress_windows
    g = torch.Generator().manual_seed(3)
    m, C = 4, 8
    a, s = torch.randn(3, 2 * C, generator=g), torch.randn(3, 2 * C, generator=g)
    ape = torch.randn(m, 2 * C, generator=g)
    ring_a, ring_s = torch.randn(20, 2 * C, generator=g), torch.randn(20, 2 * C, generator=g)
    is_new = torch.tensor([[False] * 5 + [True] * 3])
    new_idx = torch.tensor([[0] * 5 + [0, 1, 2]])
    state_idx = torch.arange(8)[None] + 4
    valid = torch.ones(1, 8, dtype=torch.bool)
    out = compress_windows(a, s, ring_a, ring_s, is_new, new_idx, state_idx, valid, m, ape)
    items_a = torch.where(is_new[0, :, None], a[new_idx[0]], ring_a[state_idx[0]])
    items_s = torch.where(is_new[0, :, None], s[new_idx[0]] + ape[torch.arange(8) % m],
                          ring_s[state_idx[0]])
    kv = torch.cat([items_a[:m, :C], items_a[m:, C:]])[None]
    sc = torch.cat([items_s[:m, :C], items_s[m:, C:]])[None]
    assert torch.equal(out, compress_pool_ref(kv, sc, valid))


def test_ring_write_keeps_raw_rows_with_the_positional_bias():
    from dsv4.kernels.compressor import ring_write_
    g = torch.Generator().manual_seed(4)
    m, W = 4, 6
    a, s = torch.randn(5, W, generator=g), torch.randn(5, W, generator=g)
    ape = torch.randn(m, W, generator=g)
    pos = torch.tensor([7, 8, 9, 30, 31])
    tok, dst = torch.tensor([1, 2, 4]), torch.tensor([9, 2, 17])
    kv, sc = torch.zeros(20, W), torch.zeros(20, W)
    ring_write_(kv, sc, a, s, ape, pos, tok, dst)
    assert torch.equal(kv[dst], a[tok]) and torch.equal(sc[dst], s[tok] + ape[pos[tok] % m])
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[dst] = False
    assert not kv[untouched].any() and not sc[untouched].any()


@pytest.mark.parametrize("index_keys,C", [(False, 512), (True, 128)])
def test_compress_finish_reference_rows(index_keys, C):
    """Cache rows from pooled rows, checked by their properties: RMSNorm (computed here from
    the formula), RoPE as a rotation that is the identity at position 0 and keeps each pair's
    length, and the QAT grid: attention rows' no-rope channels are fixed points of the FP8
    rounding; indexer keys are the Hadamard rotation (its own inverse) of the rotated row,
    then fixed points of the FP4 rounding."""
    from dsv4.config import ModelConfig
    from dsv4.kernels.compressor import compress_finish
    from dsv4.model.rope import rope_frequencies
    from dsv4.quant.sim import fp4_sim, fp8_sim, hadamard
    g = torch.Generator().manual_seed(6)
    freqs = rope_frequencies(ModelConfig.preset("tiny"), 4).float()
    r = 2 * freqs.numel()
    pooled, w = torch.randn(5, C, generator=g) * 3, torch.rand(C, generator=g) + 0.5
    index = torch.tensor([0, 1, 7, 100, 3])
    x = pooled.bfloat16().float()
    normed = (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * w).bfloat16().float()

    def pair_len(v):
        return v[:, C - r:].unflatten(-1, (-1, 2)).norm(dim=-1)

    for qat in (True, False):
        got = compress_finish(pooled, w, 1e-6, index, 4, freqs, r, index_keys, qat,
                              torch.bfloat16)
        assert got.dtype == torch.bfloat16 and got.shape == (5, C)
        y = got.float()
        if index_keys:
            if qat:
                assert torch.equal(fp4_sim(got, 32), got)
                continue
            y = hadamard(y)  # back to the rotated row, up to bf16 rounding
        elif qat:
            assert torch.equal(fp8_sim(got[:, :C - r], 64), got[:, :C - r])
        tol = 3 * 2.0 ** -8 * normed.abs().amax()
        if not qat or index_keys:
            assert (y[:, :C - r] - normed[:, :C - r]).abs().max() <= tol
        assert (y[0, C - r:] - normed[0, C - r:]).abs().max() <= tol  # position 0: no turn
        assert (pair_len(y) - pair_len(normed)).abs().max() <= tol
        assert not torch.allclose(y[1:, C - r:], normed[1:, C - r:], atol=tol.item())


def _model_keys(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Indexer keys as the model stores them with QAT: Hadamard + FP4 per 32, over magnitudes
    from 1e-30 to 1e30, with an all-zero row."""
    from dsv4.kernels.qat import hadamard_fp4_ref
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 128, generator=g) * torch.logspace(-30, 30, n)[:, None]
    x[0] = 0.0
    return hadamard_fp4_ref(x.to(dtype), qat=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_indexer_keys_are_lossless(dtype):
    from dsv4.kernels.index_fp4 import (index_fp4_row_bytes, pack_index_fp4, store_index_fp4_,
                                        unpack_index_fp4)
    from dsv4.quant.formats import quantize_mxfp4
    keys = _model_keys(300, dtype)
    packed = pack_index_fp4(keys)
    assert index_fp4_row_bytes(128) == 80 and packed.shape == (300, 80)
    assert torch.equal(unpack_index_fp4(packed, 128, dtype), keys)
    # codes in 4-byte words, then one e8m0 byte per 32, then zeros: word (c, b) at bytes
    # 4 (4 c + b) holds dims 32 b + 4 c + (0, 1, 2, 3, 16, 17, 18, 19), two a byte, low first
    codes, scales = quantize_mxfp4(keys.float())
    nat = codes.view(torch.uint8)  # byte j: dims 2j (low nibble), 2j + 1
    nib = torch.stack([nat & 15, nat >> 4], -1).flatten(1)  # [N, 128] codes in dim order
    for c in range(4):
        for b in range(4):
            dims = 32 * b + 4 * c + torch.tensor([0, 1, 2, 3, 16, 17, 18, 19])
            word = packed[:, 4 * (4 * c + b):4 * (4 * c + b) + 4]
            assert torch.equal(torch.stack([word & 15, word >> 4], -1).flatten(1), nib[:, dims])
    assert torch.equal(packed[:, 64:68], scales.view(torch.uint8))
    assert not packed[:, 68:].any()
    cache = torch.zeros(400, 80, dtype=torch.uint8)
    dst = torch.randperm(400)[:300]
    store_index_fp4_(cache, dst, keys)
    assert torch.equal(cache[dst], packed)
    with pytest.raises(ValueError, match="expected 80"):
        unpack_index_fp4(packed[:, :68], 128, dtype)
    with pytest.raises(ValueError, match="do not fit"):
        store_index_fp4_(cache[:, :64], dst, keys)


def test_indexer_reference_reads_packed_keys_like_float_ones():
    from dsv4.kernels.index_fp4 import pack_index_fp4
    from dsv4.kernels.indexer import indexer_scores_ref
    from dsv4.kernels.qat import hadamard_fp4_ref
    g = torch.Generator().manual_seed(3)
    keys = hadamard_fp4_ref(torch.randn(64, 128, generator=g), qat=True)
    q, w = torch.randn(3, 4, 128, generator=g), torch.randn(3, 4, generator=g)
    cand = torch.tensor([[5, 0, -1, 63], [1, 2, 3, -1], [-1, -1, -1, -1]])
    want = indexer_scores_ref(q, w, keys, cand)
    assert torch.equal(indexer_scores_ref(q, w, pack_index_fp4(keys), cand), want)


def test_out_of_memory_does_not_switch_gemm_paths_for_good(monkeypatch):
    """A failure of cuBLAS's block-scaled FP8 GEMM or of mm(out_dtype=) switches that path
    off for good; an out-of-memory error is transient and must reach the caller instead."""
    from dsv4.kernels import f32_linear as fl
    from dsv4.kernels import quant_linear as ql

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(fl, "_MM_DTYPE_OK", {})
    monkeypatch.setattr(fl, "use_triton", lambda x: True)
    monkeypatch.setattr(torch, "mm", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fl.linear_f32(torch.randn(fl.GEMV_MAX_M + 1, 8), torch.randn(4, 8).bfloat16())
    assert fl._MM_DTYPE_OK == {}

    monkeypatch.setattr(ql, "_SCALED_MM_OK", {})
    monkeypatch.setattr(ql, "_act_quant_cuda", lambda x, values=False, pad_to=1, **kw: (x, x))
    monkeypatch.setattr(ql, "_scaled_mm_blockwise", oom)
    x = torch.randn(ql.SCALED_MM_MIN_M, 128)
    w = torch.zeros(4, 128, dtype=torch.float8_e4m3fn)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        ql._qlinear_cuda(x, ql.FMT_FP8, w, torch.zeros(1, 1, dtype=torch.uint8), None)
    assert ql._SCALED_MM_OK == {}


def test_attention_kernel_choice_and_its_triton_fallback_shapes(monkeypatch):
    """Which sparse-attention kernel the launcher takes, and the tile shapes it asks for. The
    Gluon kernel applies to bf16 queries, D = 512, whole 64-head blocks; once it fails to build,
    the shapes fall back to ones the Triton kernel can hold (FP8 rows: 32-row tiles, 2 stages;
    64 x 2 would not fit its shared memory)."""
    from dsv4.kernels import sparse_attention as sa
    from dsv4.kernels import sparse_attention_wg as wg
    monkeypatch.setattr(wg, "HAS_GLUON", True)
    monkeypatch.setattr(sa, "_WG_FAILED", [])
    q = lambda t, h, d=512, dt=torch.bfloat16: torch.zeros(t, h, d, dtype=dt)  # noqa: E731
    assert sa.wg_applies(q(1, 64)) and sa.wg_applies(q(3, 128), fp8=True)
    assert not sa.wg_applies(q(1, 64, dt=torch.float32))
    assert not sa.wg_applies(q(1, 64, d=128)) and not sa.wg_applies(q(1, 96))
    assert not sa.wg_applies(q(1, 64), fp8=True, rope_dim=32)
    assert not sa.wg_applies(q(1, 64), cfg=sa.AttnConfig(kernel="triton"))
    assert not sa.wg_applies(q(1, 64), cfg=sa.AttnConfig(block_k=16))
    assert sa.wg_applies(q(1, 64), True, cfg=sa.AttnConfig(block_k=32, num_stages=4))
    # a tensor-parallel rank's 16 / 32 heads: one masked 64-head block (their tiles by their
    # real heads: 32 rows up to 1024 token-heads), unless the Triton kernel is asked for
    gluon = sa.AttnConfig(kernel="gluon")
    assert sa.wg_applies(q(1, 32)) and sa.wg_applies(q(4, 16), fp8=True)
    triton_cfg = sa.AttnConfig(kernel="triton")
    assert sa.wg_applies(q(1, 32), cfg=gluon) and not sa.wg_applies(q(1, 32), cfg=triton_cfg)
    assert not sa.wg_applies(q(1, 48), cfg=gluon) and not sa.wg_applies(q(1, 8))
    assert sa.default_config(q(32, 32)).block_k == 32 and sa.default_config(q(33, 32)).block_k == 64
    assert sa.default_config(q(64, 16), fp8=True).block_k == 32
    big, few = q(128, 128), q(1, 64)
    assert (sa.default_config(big).block_k, sa.default_config(big).num_stages) == (64, 2)
    assert (sa.default_config(big, fp8=True).block_k, sa.default_config(big, True).num_stages) == (64, 2)
    assert (sa.default_config(few).block_k, sa.default_config(few).num_stages) == (32, 3)
    assert (sa.default_config(few, fp8=True).block_k, sa.default_config(few, True).num_stages) == (32, 2)
    monkeypatch.setattr(sa, "_WG_FAILED", ["built nothing"])
    assert not sa.wg_applies(big)
    assert (sa.default_config(big, fp8=True).block_k, sa.default_config(big, True).num_stages) == (32, 2)
    assert sa.default_config(q(1, 64)).block_k == 32
    monkeypatch.setattr(wg, "HAS_GLUON", False)
    monkeypatch.setattr(sa, "_WG_FAILED", [])
    assert not sa.wg_applies(big)


def test_warp_specialised_fp8_attention_choice(monkeypatch):
    """FP8 rows bound for the Gluon kernel take its warp-specialised form by default
    (`sparse_attention_ws.py`), not with DSV4_ATTN_WS=0, not once it failed to build, and
    always when asked for by name; the plain Gluon kernel when that is asked for."""
    from dsv4.kernels import sparse_attention as sa
    monkeypatch.setattr(sa, "_WS_FAILED", [])
    monkeypatch.setattr(sa, "ATTN_WS", True)
    assert sa._ws_applies(sa.AttnConfig()) and sa._ws_applies(sa.AttnConfig(kernel="ws"))
    assert not sa._ws_applies(sa.AttnConfig(kernel="gluon"))
    assert not sa._ws_applies(sa.AttnConfig(kernel="triton"))
    monkeypatch.setattr(sa, "_WS_FAILED", ["built nothing"])
    assert not sa._ws_applies(sa.AttnConfig()) and sa._ws_applies(sa.AttnConfig(kernel="ws"))
    monkeypatch.setattr(sa, "_WS_FAILED", [])
    monkeypatch.setattr(sa, "ATTN_WS", False)
    assert not sa._ws_applies(sa.AttnConfig())


@pytest.mark.parametrize("new_fp8", [False, True], ids=["new_bf16", "new_packed"])
def test_warp_specialised_fp8_attention_builds_for_sm90(monkeypatch, new_fp8):
    """The warp-specialised kernel compiles for an H200 (sm_90) without a GPU, with the
    launcher's constants, within an sm_90 CTA's 227 KiB of shared memory (the step's new rows
    read as bf16, or packed like the cached ones: `pack_new`)."""
    from dsv4.kernels import sparse_attention_ws as ws
    if not ws.HAS_GLUON:
        pytest.skip("no Gluon in this Triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    kern = ws._sparse_attn_ws_kernel
    ptr = dict(q_ptr="*bf16", sink_ptr="*fp32", o_ptr="*bf16", part_o_ptr="*fp32",
               part_ml_ptr="*fp32", win_cache_ptr="*u8",
               win_new_ptr="*u8" if new_fp8 else "*bf16",
               win_idx_ptr="*i32", cmp_cache_ptr="*u8", cmp_idx_ptr="*i32", cmp_len_ptr="*i32")
    const = dict(D=512, BLOCK_H=64, BLOCK_K=32, NUM_BUF=2, SPLIT=True, NOPE=448, ROPE=64,
                 HAS_LEN=True, LOAD_WARPS=4, LOAD_REGS=64, NEW_FP8=new_fp8, PDL=True)
    sig = {n: ("constexpr" if n in const else ptr.get(n, "fp32" if n == "qk_scale" else "i32"))
           for n in kern.arg_names}
    # torch's allocations are 16-byte aligned, q's and o's strides multiples of 512 (the
    # packed rows' 584-byte stride is not a multiple of 16)
    attrs = {(kern.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in list(ptr) + ["stride_qt", "stride_qh", "stride_ot", "stride_oh"]}
    try:
        k = triton.compile(GluonASTSource(kern, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=8, maxnreg=160))
    except (FileNotFoundError, RuntimeError) as exc:  # no ptxas with this Triton
        if "ptxas" in str(exc).lower():
            pytest.skip(f"no ptxas: {exc}")
        raise
    assert 0 < k.metadata.shared <= 227 * 1024, k.metadata.shared


@pytest.mark.parametrize("bh,avail,bn", [(64, True, 64), (32, False, 64), (16, True, 64),
                                         (64, False, 128)])
def test_gluon_indexer_kernel_builds_for_sm90(bh, avail, bn):
    """The Gluon indexer kernel (`indexer_wg.py`) compiles for an H200 (sm_90) without a GPU,
    with the launcher's constants and register cap (64 / 32 / 16 heads a token; 64 or 128
    keys a step), its folded
    key loop free of barriers and spills (these may only touch the rare per-block pass)."""
    from dsv4.kernels import indexer_wg as iw
    if not iw.HAS_GLUON:
        pytest.skip("no Gluon in this Triton")
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from dsv4.kernels.indexer import GLUON_MAXNREG
    kern = iw._indexer_fp8_wg_kernel
    ptr = dict(q_ptr="*bf16", w_ptr="*bf16", keys_ptr="*u8", cand_ptr="*i32",
               avail_ptr="*i32", out_ptr="*fp32")
    const = dict(BH=bh, HAS_AVAIL=avail, BN=bn, PDL=True)
    sig = {n: ("constexpr" if n in const else ptr.get(n, "i32")) for n in kern.arg_names}
    # as the engine launches it: torch's allocations 16-byte aligned, and so the strides (64
    # heads of 128, the packed keys' 80 bytes, candidate rows padded to whole blocks) and NI
    attrs = {(kern.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in list(ptr) + ["NI", "stride_qt", "stride_qh", "stride_wt", "stride_kn",
                                   "stride_ct", "stride_ot"]}
    try:
        k = triton.compile(GluonASTSource(kern, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=bn // 16, maxnreg=GLUON_MAXNREG))
    except (FileNotFoundError, RuntimeError) as exc:  # no ptxas with this Triton
        if "ptxas" in str(exc).lower():
            pytest.skip(f"no ptxas: {exc}")
        raise
    assert k.metadata.shared <= 227 * 1024
    # the folded key loop (the loop with 4 wgmmas, sm_90 SASS) neither spills nor reloads
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
        sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    labels = {m.group(1): i for i, line in enumerate(sass)
              if (m := re.match(r"\s*\.(L_x_\d+):", line))}
    loops = [sass[labels[m.group(1)]:i] for i, line in enumerate(sass)
             if (m := re.search(r"BRA `?\(?\.(L_x_\d+)", line)) and labels.get(m.group(1), i) < i]
    # (the per-block pass's loop has 4 too, with a barrier around each query block's store)
    folded = [body for body in loops
              if sum("QGMMA" in x for x in body) == 4 and not any("BAR.SYNC" in x for x in body)]
    assert len(folded) == 1, f"{len(loops)} loops, {len(folded)} with 4 wgmmas and no barrier"
    assert not any(op in x for x in folded[0] for op in ("LDL", "STL")), "the key loop spills"


def test_a_gluon_kernel_that_fails_is_remembered_with_a_warning_naming_it(caplog):
    """`gluon_failed`, the one fallback record of the Gluon kernels (indexer, MoE, attention):
    the error is kept (out of memory raised again) (its caller then keeps the other kernel) and the warning names the kernel,
    the error's first line and what runs instead."""
    import logging

    from dsv4.kernels import gluon_failed
    failed: list[str] = []
    with caplog.at_level(logging.WARNING, logger="dsv4.kernels"):
        gluon_failed(failed, RuntimeError("PassManager::run failed\nnoise"),
                     "Gluon indexer kernel", "Triton kernel")
    assert failed == [repr(RuntimeError("PassManager::run failed\nnoise"))]
    assert ("Gluon indexer kernel unavailable (PassManager::run failed); using the Triton kernel"
            in caplog.text)
    with pytest.raises(torch.OutOfMemoryError):  # memory, not the kernel: raised, not recorded
        gluon_failed(failed, torch.OutOfMemoryError("CUDA out of memory"), "Gluon MoE kernel",
                     "Triton kernel")
    assert len(failed) == 1


def test_fp8_rows_are_the_default_only_where_lossless():
    """kv_cache_dtype auto: packed FP8 rows on CUDA for bf16 weights with the QAT and a row
    layout that fits; the working dtype on the CPU, in float32 and without the QAT."""
    from types import SimpleNamespace as NS

    from dsv4.engine.llm_engine import LLMEngine
    from dsv4.loader import tiny_config
    cfg = tiny_config("bf16", "tiny")
    pick = lambda dev, dtype=torch.bfloat16, qat=True, c=cfg: LLMEngine._fp8_rows_by_default(  # noqa: E731
        NS(device=torch.device(dev)), NS(dtype=dtype, qat=qat), c)
    assert pick("cuda")
    assert not pick("cpu") and not pick("cuda", torch.float32) and not pick("cuda", qat=False)
    odd = NS(head_dim=96, qk_rope_head_dim=64)  # 32 no-rope dims: no 64-wide scale groups
    assert not pick("cuda", c=odd)


def test_topk_reference_breaks_ties_toward_older_entries_and_rejects_bad_input():
    from dsv4.kernels.topk import select_topk
    score = torch.tensor([[1.0, 2.0, 2.0, -0.0, 0.0, float("-inf")],
                          [float("-inf")] * 6])
    cand = torch.tensor([[10, 11, 12, 13, 14, -1], [-1] * 6])
    sel = select_topk(score, cand, 4)
    assert sel[0].tolist() == [11, 12, 10, 13]  # the tie at 2.0 and at 0.0: lower column first
    assert sel[1].tolist() == [-1] * 4  # nothing visible
    assert select_topk(score, cand, 100).shape == (2, 6)  # k above N: every column
    with pytest.raises(ValueError, match="same"):
        select_topk(score, cand[:, :3], 2)
    with pytest.raises(ValueError, match="positive"):
        select_topk(score, cand, 0)
    with pytest.raises(ValueError, match="avail"):
        select_topk(score, cand, 2, torch.tensor([1, 2, 3]))
    assert torch.equal(select_topk(score, cand, 4, torch.tensor([5, 0])), sel)


def test_moe_grouped_mm_switch(monkeypatch, caplog):
    """When MoE calls take the grouped-GEMM path: by default from 72 routed slots per expert
    (Flash: 3072 tokens), from 32 for MXFP4 experts the GEMM can decode in place (not known
    inexact, an FP8 shared expert apart or none), DSV4_MOE_GROUPED_MM=n from n tokens (0:
    never), a clear error for anything else; after a call ran out of memory, never (with one
    warning). The path takes bf16 MXFP4 / FP8 experts only."""
    from types import SimpleNamespace

    from dsv4.kernels import moe_grouped_mm as gm
    from dsv4.kernels.quant_linear import FMT_FP8, FMT_MXFP4, FMT_NVFP4
    monkeypatch.delenv("DSV4_MOE_GROUPED_MM", raising=False)
    monkeypatch.setattr(gm, "_OUT_OF_MEMORY", [False])
    assert gm.grouped_mm_min_tokens() is None
    assert gm.takes(3072, 6, 256) and not gm.takes(3071, 6, 256)
    assert gm.takes(4608, 6, 384) and not gm.takes(4607, 6, 384)
    mx, fp8 = SimpleNamespace(fmt=FMT_MXFP4), SimpleNamespace(fmt=FMT_FP8)
    assert gm.takes(1366, 6, 256, mx, fp8) and not gm.takes(1365, 6, 256, mx, fp8)
    assert gm.takes(2048, 6, 384, mx, None) and not gm.takes(2047, 6, 384, mx, None)
    assert not gm.takes(2048, 6, 256, fp8, None)  # FP8 experts: copies, from 72
    assert not gm.takes(2048, 6, 256, mx, SimpleNamespace(fmt=FMT_NVFP4))
    mx.fp8_exact = False  # a layer whose scales do not fold exactly: bf16 copies, from 72
    assert not gm.takes(2048, 6, 256, mx, fp8) and gm.takes(3072, 6, 256, mx, fp8)
    mx.fp8_exact = True
    assert gm.takes(2048, 6, 256, mx, fp8)
    monkeypatch.setenv("DSV4_MOE_FP4_GEMM", "0")
    assert not gm.takes(2048, 6, 256, mx, fp8)
    monkeypatch.delenv("DSV4_MOE_FP4_GEMM")
    # up to 256 routed slots an expert on FP8 GEMMs (MXFP4 decoded in place up to 128, e4m3
    # copies beyond), bf16 beyond
    assert gm.policy(256, 6) == ("MXFP4 / FP8 MoE on grouped GEMMs from 3072 tokens a step: FP8 "
                                 "GEMMs on e4m3 copies (MXFP4 experts: decoded in place, from "
                                 "1366 up to 5461 tokens), bf16 copies from 10923 for FP8 "
                                 "experts and MXFP4 layers whose rows do not fold into e4m3")
    assert gm.fp8_gemm_for(256) and not gm.fp8_gemm_for(256.1)
    # row scales (or MXFP4 experts not yet checked): e4m3 copies at any size
    assert gm.fp8_gemm_for(10**4, True) and gm.fp8_gemm_for(10**4, None)
    assert gm.row_scales(mx, None, False) is None  # MXFP4 experts not yet checked
    assert gm.row_scales(mx, fp8, False) is False  # an FP8 shared expert in the copies
    assert gm.row_scales(fp8, None, False) is False
    mx.fp8_row_exact = True
    assert gm.row_scales(mx, fp8, True) is True  # the FP8 shared expert apart
    del mx.fp8_row_exact
    assert gm.fp4_gemm_for(128) and not gm.fp4_gemm_for(128.1)
    monkeypatch.setenv("DSV4_MOE_FP8_GEMM", "1")
    assert gm.policy(256, 6).endswith("5461 tokens)")  # no bf16 copies
    assert gm.fp8_gemm_for(1000)
    monkeypatch.setenv("DSV4_MOE_FP8_GEMM", "0")
    assert gm.policy(256, 6) == ("MXFP4 / FP8 MoE on bf16 copies of the experts and grouped "
                                 "GEMMs from 3072 tokens a step")
    assert not gm.fp8_gemm_for(10)
    monkeypatch.setenv("DSV4_MOE_FP8_GEMM", "yes")
    with pytest.raises(ValueError, match="DSV4_MOE_FP8_GEMM must be"):
        gm.fp8_gemm_for(10)
    monkeypatch.delenv("DSV4_MOE_FP8_GEMM")
    monkeypatch.setenv("DSV4_MOE_FP4_GEMM", "1")
    assert gm.fp4_gemm_for(1000)
    assert "(MXFP4 experts: decoded in place, from 1366 tokens, DSV4_MOE_FP4_GEMM=1)" in \
        gm.policy(256, 6)
    monkeypatch.setenv("DSV4_MOE_FP4_GEMM", "0")
    assert not gm.fp4_gemm_for(10)
    assert "FP8 GEMMs on e4m3 copies, bf16 copies from 10923" in gm.policy(256, 6)
    monkeypatch.setenv("DSV4_MOE_FP4_GEMM", "on")
    with pytest.raises(ValueError, match="DSV4_MOE_FP4_GEMM must be"):
        gm.policy(256, 6)  # at start-up
    with pytest.raises(ValueError, match="DSV4_MOE_FP4_GEMM must be"):
        gm.fp4_gemm_for(10)
    monkeypatch.delenv("DSV4_MOE_FP4_GEMM")
    monkeypatch.setenv("DSV4_MOE_GROUPED_MM", "2048")
    assert gm.grouped_mm_min_tokens() == 2048
    assert gm.takes(2048, 6, 256) and not gm.takes(2047, 6, 256)
    assert "from 2048 tokens a step: " in gm.policy(256, 6)
    assert "in place, from 2048 up to 5461 tokens" in gm.policy(256, 6)
    monkeypatch.setenv("DSV4_MOE_GROUPED_MM", "0")
    assert not gm.takes(10**6, 6, 256) and gm.policy(256, 6) == ""
    monkeypatch.setenv("DSV4_MOE_GROUPED_MM", "many")
    with pytest.raises(ValueError, match="DSV4_MOE_GROUPED_MM must be a whole number"):
        gm.grouped_mm_min_tokens()
    monkeypatch.delenv("DSV4_MOE_GROUPED_MM")
    with caplog.at_level("WARNING", logger="dsv4.kernels.moe_grouped_mm"):
        gm.out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB\nmore"))
    assert not gm.takes(10**6, 6, 256)
    assert "DSV4_MOE_GROUPED_MM=0" in caplog.text and "Tried to allocate 8 GiB" in caplog.text
    assert "more" not in caplog.text
    u = torch.zeros(4, 128, dtype=torch.bfloat16)
    tab = lambda fmt: SimpleNamespace(fmt=fmt)  # noqa: E731
    assert gm.applies(u, tab(FMT_MXFP4), tab(FMT_FP8)) and gm.applies(u, tab(FMT_FP8), None)
    assert not gm.applies(u, tab(FMT_NVFP4), tab(FMT_FP8))
    assert not gm.applies(u.float(), tab(FMT_MXFP4), None)


@pytest.mark.parametrize("sizes,bm", [([0, 130, 1, 0, 256, 127], 64), ([128, 128], 128),
                                      ([5], 16), ([0, 0, 0], 32)])
def test_grouped_fp8_gemm_tile_map_covers_each_group_once(sizes, bm):
    """Row tiles of the grouped FP8 GEMM, built on the device from the groups' ends: every row
    of every group in exactly one tile of that group, no tile crossing a group's end, the rest
    of the launched bound empty."""
    from dsv4.kernels.grouped_fp8_gemm import _tile_map
    ends = torch.tensor(sizes).cumsum(0).to(torch.int32)
    m = int(ends[-1])
    grp, first, end = _tile_map(ends, m, bm).long()
    assert grp.numel() == m // bm + len(sizes)
    covered = torch.zeros(m, dtype=torch.long)
    starts = [0] + ends.tolist()[:-1]
    for g, f, e in zip(grp.tolist(), first.tolist(), end.tolist()):
        if f >= e:
            continue
        assert starts[g] <= f < ends[g] and e == ends[g], (g, f, e)
        covered[f:min(f + bm, e)] += 1
    assert torch.equal(covered, torch.ones(m, dtype=torch.long))


def test_grouped_fp8_gemm_rejects_mismatched_shapes():
    from dsv4.kernels.grouped_fp8_gemm import grouped_fp8_gemm
    a = torch.zeros(10, 256, dtype=torch.float8_e4m3fn)
    b = torch.zeros(2, 128, 256, dtype=torch.float8_e4m3fn)
    ends = torch.tensor([4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="do not fit"):
        grouped_fp8_gemm(a, torch.ones(10, 1), b, torch.ones(2, 128, 2), ends)
    y = grouped_fp8_gemm(a, torch.ones(10, 2), b, torch.ones(2, 128, 2), ends)  # the reference
    assert y.shape == (10, 128) and y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="do not fit"):  # row scales: one a weight row
        grouped_fp8_gemm(a, torch.ones(10, 2), b, torch.ones(2, 127), ends)
    assert torch.equal(grouped_fp8_gemm(a, torch.ones(10, 2), b, torch.ones(2, 128), ends), y)


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "fp4", "nvfp4"])
def test_split_k_partials_sum_to_the_linear(fmt):
    """`Linear.split_k` on the CPU: one part, equal to forward (the GPU's split-K partials sum
    to it, tests/gpu); the kv row from it is the separate ops' chain exactly."""
    from dsv4.kernels.mhc import hc_post_ref
    from dsv4.kernels.qat import fp8_round_ref_
    from dsv4.kernels.rmsnorm import rmsnorm_ref, rmsnorm_split, rmsnorm_split_ref
    from dsv4.kernels.rope import rope_ref_
    from dsv4.quant.linear import make_linear
    g = torch.Generator().manual_seed(1)
    lin = make_linear(256, 512, fmt, torch.bfloat16)
    lin.set_float(torch.randn(512, 256, generator=g) / 16)
    u = torch.randn(5, 256, generator=g).bfloat16()
    parts = lin.split_k(u)
    assert parts.shape == (1, 5, 512) and torch.equal(parts[0], lin(u))
    w = torch.rand(512, generator=g) + 0.5
    pos = torch.tensor([0, 1, 7, 100, 65535])
    freqs = torch.rand(32, generator=g)
    want = fp8_round_ref_(rope_ref_(rmsnorm_ref(lin(u), w, 1e-6), pos, freqs, 64), 448)
    assert torch.equal(rmsnorm_split(parts, w, 1e-6, torch.bfloat16, (pos, freqs, 64), 448), want)
    # several fp32 partials: summed in fp32, rounded once to the working dtype
    many = torch.randn(3, 5, 512, generator=g)
    assert torch.equal(rmsnorm_split_ref(many, w, 1e-6, torch.bfloat16),
                       rmsnorm_ref(many.sum(0).bfloat16(), w, 1e-6))
    x = torch.randn(5, 4, 512, generator=g).bfloat16()
    post, comb = torch.rand(5, 4, generator=g), torch.rand(5, 4, 4, generator=g)
    assert torch.equal(hc_post_ref(x, many, post, comb),
                       hc_post_ref(x, many.sum(0).bfloat16(), post, comb))


def test_rmsnorm_split_rejects_what_does_not_fit():
    from dsv4.kernels.rmsnorm import rmsnorm_split
    parts, w = torch.randn(2, 3, 512), torch.ones(512)
    pos, freqs = torch.arange(3), torch.ones(32)
    with pytest.raises(ValueError, match="do not fit"):
        rmsnorm_split(parts[0], w, 1e-6, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        rmsnorm_split(parts, torch.ones(256), 1e-6, torch.float32)
    with pytest.raises(ValueError, match="rope"):
        rmsnorm_split(parts, w, 1e-6, torch.float32, (torch.arange(4), freqs, 64))
    with pytest.raises(ValueError, match="rope"):
        rmsnorm_split(parts, w, 1e-6, torch.float32, (pos, torch.ones(16), 64))
    with pytest.raises(ValueError, match="fp8_width"):
        rmsnorm_split(parts, w, 1e-6, torch.float32, fp8_width=100)


def test_fp32_weight_scales_are_converted_once_per_weight_and_version():
    """cuBLAS's block-scaled GEMM takes fp32 weight scales: converted once and kept on the
    parameter, redone into the same buffer after an in-place change (graphs read it)."""
    from dsv4.kernels.quant_linear import _fp32_scales
    p = torch.nn.Parameter(torch.tensor([[1.0, 0.5], [4.0, 2.0 ** -3]]).to(torch.float8_e8m0fnu),
                           requires_grad=False)
    a = _fp32_scales(p)
    assert a.tolist() == [[1.0, 0.5], [4.0, 0.125]]
    assert _fp32_scales(p) is a
    assert torch.equal(_fp32_scales(p.view(torch.uint8)), a)  # bytes: converted, not kept
    with torch.no_grad():
        p.copy_(torch.tensor([[2.0, 2.0], [2.0, 2.0]]).to(torch.float8_e8m0fnu))
    b = _fp32_scales(p)
    assert b is a and b.tolist() == [[2.0, 2.0], [2.0, 2.0]]
    q = torch.nn.Parameter(p.detach().clone(), requires_grad=False)  # another weight
    assert _fp32_scales(q) is not a
