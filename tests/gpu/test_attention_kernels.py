"""Triton kernels of the attention path against their torch references, on realistic shapes.

Index lists come from a real `ForwardBatch` (ragged prefill chunks and decode tokens at the edge
positions of the window and of the compressor), so the kernels see the -1 patterns the model
produces. Run on a GPU: `PYTHONPATH=. python3 -m pytest -m gpu tests/gpu/test_attention_kernels.py`.
"""
from __future__ import annotations

import pytest
import torch

from dsv4.cache.kv_cache import BLOCK_TOKENS
from dsv4.kernels import HAS_TRITON
from dsv4.model.batch import ForwardBatch, SeqChunk
from dsv4.quant.sim import fp4_sim, fp8_sim

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA and Triton")]

D, R, W, MARGIN = 512, 64, 128, 8
DEV = "cuda"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def kv_rows(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Rows as the model makes them: FP8-simulated no-rope dims, plain rope dims."""
    x = torch.randn(n, D, generator=gen, device=DEV)
    return torch.cat([fp8_sim(x[:, :D - R], 64), x[:, D - R:]], 1).to(dtype)


def make_batch(chunks: list[tuple[int, int]]) -> ForwardBatch:
    """One sequence per (start_pos, new tokens); each gets its own slot and blocks."""
    seqs, next_block = [], 0
    for slot, (start, n) in enumerate(chunks):
        nb = -(-(start + n) // BLOCK_TOKENS)
        seqs.append(SeqChunk([1] * n, start, slot, list(range(next_block, next_block + nb))))
        next_block += nb
    return ForwardBatch(seqs, W, W + MARGIN, len(chunks), device=DEV)


def attention_inputs(batch: ForwardBatch, H: int, ratio: int, topk: int, dtype, seed: int):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    T = batch.num_tokens
    q = torch.randn(T, H, D, generator=gen, device=DEV)
    q = (q * torch.rsqrt(q.square().mean(-1, keepdim=True))).to(dtype)
    sink = torch.randn(H, generator=gen, device=DEV)
    win_cache = kv_rows(batch.num_slots * batch.window_rows, dtype, gen)
    win_new = kv_rows(T, dtype, gen)
    cmp_cache = cmp_idx = None
    if ratio:
        nblocks = int(batch.block_tables_cpu.max()) + 1
        cmp_cache = kv_rows(nblocks * (BLOCK_TOKENS // ratio), dtype, gen)
        cand, _ = batch.candidates(ratio)
        if ratio == 4:  # an indexer's choice: the top-k of random scores among visible entries
            score = torch.rand(cand.shape, generator=gen, device=DEV).masked_fill(cand < 0, -1)
            kk = min(topk, cand.shape[1])
            val, order = score.topk(kk, dim=1)
            cmp_idx = torch.where(val >= 0, cand.gather(1, order), -1)
        else:
            cmp_idx = cand
    return q, sink, win_cache, win_new, batch.window_index, cmp_cache, cmp_idx


# decode tokens at the edges: first token, w-1, w, w+1 tokens of history, m-1/m/m+1 for CSA,
# one long sequence whose visible entries exceed top-k
DECODE_EDGES = [(0, 1), (W - 2, 1), (W - 1, 1), (W, 1), (2, 1), (3, 1), (4, 1), (5000, 1)]
PREFILL = [(0, 200), (300, 57), (127, 3)]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_rows", "fp8_rows"])
@pytest.mark.parametrize("H,ratio,topk,chunks", [
    (64, 4, 512, DECODE_EDGES), (128, 4, 1024, DECODE_EDGES), (64, 128, 0, DECODE_EDGES),
    (128, 4, 1024, PREFILL), (64, 0, 0, PREFILL)], ids=["flash-csa-decode", "pro-csa-decode",
                                                        "flash-hca-decode", "pro-csa-prefill",
                                                        "flash-swa-prefill"])
def test_sparse_attention_matches_reference(H, ratio, topk, chunks, fp8):
    from dsv4.kernels.kv_fp8 import pack_kv_fp8
    from dsv4.kernels.sparse_attention import sparse_attention, sparse_attention_ref
    batch = make_batch(chunks)
    q, sink, wc, wn, wi, cc, ci = attention_inputs(batch, H, ratio, topk, torch.bfloat16, seed=H)
    ref = sparse_attention_ref(q, sink, D ** -0.5, wc, wn, wi, cc, ci)
    if fp8:  # packing model-made rows is lossless, so the reference is the same
        wc, cc = pack_kv_fp8(wc), (pack_kv_fp8(cc) if cc is not None else None)
    out = sparse_attention(q, sink, D ** -0.5, wc, wn, wi, cc, ci)
    assert not out.isnan().any(), "NaN in the output"
    err = rel_err(out, ref)
    max_err = (out.float() - ref.float()).abs().max().item()
    assert err < 1e-2 and max_err < 3e-2 * ref.float().abs().max().item(), \
        f"rel err {err:.2e}, max abs err {max_err:.2e} (ref max {ref.abs().max().item():.3f})"


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_rows", "fp8_rows"])
@pytest.mark.parametrize("H", [16, 32])
@pytest.mark.parametrize("block_k,splits", [(32, 0), (64, 0), (32, 3)])
def test_gluon_kernel_masks_a_ranks_fewer_heads(H, block_k, splits, fp8):
    """A tensor-parallel rank's 16 or 32 heads run through the Gluon kernel by default (one
    64-head block, masked): the reference's outputs, the Triton kernel's within rounding."""
    from dsv4.kernels.kv_fp8 import pack_kv_fp8
    from dsv4.kernels.sparse_attention import (AttnConfig, sparse_attention_ref,
                                               sparse_attention_triton, wg_applies)
    batch = make_batch(DECODE_EDGES + [(300, 9), (127, 3)])
    q, sink, wc, wn, wi, cc, ci = attention_inputs(batch, H, 4, 512, torch.bfloat16, seed=H)
    ref = sparse_attention_ref(q, sink, D ** -0.5, wc, wn, wi, cc, ci)
    if fp8:
        wc, cc = pack_kv_fp8(wc), pack_kv_fp8(cc)
    assert wg_applies(q, fp8)
    cfg = AttnConfig(block_k=block_k, num_stages=2, splits=splits)
    out = sparse_attention_triton(q, sink, D ** -0.5, wc, wn, wi, cc, ci, config=cfg)
    tri = sparse_attention_triton(q, sink, D ** -0.5, wc, wn, wi, cc, ci,
                                  config=AttnConfig(block_k=32, num_stages=2, splits=splits,
                                                    kernel="triton"))
    assert out.shape == (q.shape[0], H, D) and not out.isnan().any()
    assert rel_err(out, ref) < 1e-2, f"rel err {rel_err(out, ref):.2e}"
    assert rel_err(out, tri) < 1e-2, f"rel err against Triton {rel_err(out, tri):.2e}"


@pytest.mark.parametrize("kernel", ["gluon", "triton"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_rows", "fp8_rows"])
@pytest.mark.parametrize("ratio,splits", [(4, 0), (4, 3), (128, 0), (128, 5), (128, 16)])
def test_sparse_attention_stops_at_cmp_len(ratio, splits, fp8, kernel, monkeypatch):
    """With cmp_len (the valid prefix of each compressed row list, as the model passes it)
    the kernels skip the tiles past it: rows planted there change nothing, bit for bit, while
    the same lists without cmp_len would attend to them. Fresh buffers hold NaN: the splits
    past a token's rows write no partial output, and the merge must not read one."""
    from dsv4.kernels.kv_fp8 import pack_kv_fp8
    from dsv4.kernels.sparse_attention import AttnConfig, sparse_attention_triton
    empty = torch.empty

    def nan_empty(*args, **kw):
        out = empty(*args, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out
    monkeypatch.setattr(torch, "empty", nan_empty)
    batch = make_batch(DECODE_EDGES + [(300, 9)])
    H, topk = 64, 512
    q, sink, wc, wn, wi, cc, ci = attention_inputs(batch, H, ratio, topk, torch.bfloat16, seed=3)
    if fp8:
        wc, cc = pack_kv_fp8(wc), pack_kv_fp8(cc)
    bk = 32
    cfg = AttnConfig(block_k=bk, num_stages=2, splits=splits, kernel=kernel)
    n = (ci >= 0).sum(1)
    assert torch.equal(ci >= 0, torch.arange(ci.shape[1], device=DEV)[None, :] < n[:, None])
    col = torch.arange(ci.shape[1], device=DEV)[None, :]
    planted = torch.randint(0, cc.shape[0], ci.shape, device=DEV, dtype=ci.dtype)
    dirty = torch.where(col < ((n + bk - 1) // bk * bk)[:, None], ci, planted)
    want = sparse_attention_triton(q, sink, D ** -0.5, wc, wn, wi, cc, ci, config=cfg)
    got = sparse_attention_triton(q, sink, D ** -0.5, wc, wn, wi, cc, dirty, config=cfg, cmp_len=n)
    assert torch.equal(got, want)
    if ci.shape[1] > bk * 2:  # the planted rows are reachable without cmp_len
        other = sparse_attention_triton(q, sink, D ** -0.5, wc, wn, wi, cc, dirty, config=cfg)
        assert not torch.equal(other, want)


@pytest.mark.parametrize("splits", [1, 3])
def test_sparse_attention_fp32_is_exact_to_fp32_noise(splits):
    from dsv4.kernels.sparse_attention import AttnConfig, sparse_attention_ref, sparse_attention_triton
    batch = make_batch(DECODE_EDGES[:6] + [(700, 5)])
    q, sink, wc, wn, wi, cc, ci = attention_inputs(batch, 64, 4, 512, torch.float32, seed=1)
    ref = sparse_attention_ref(q, sink, D ** -0.5, wc, wn, wi, cc, ci)
    cfg = AttnConfig(block_h=16, block_k=16, num_warps=4, num_stages=1, splits=splits)
    out = sparse_attention_triton(q, sink, D ** -0.5, wc, wn, wi, cc, ci, config=cfg)
    assert rel_err(out, ref) < 1e-5, f"rel err {rel_err(out, ref):.2e}"


# FP8 rows stage their packed bytes in shared memory (cp.async) besides the bf16 tiles the
# dequantisation produces: 32 rows x 3 stages and 64 x 2 exceed the 227 KiB of an sm_90 CTA
@pytest.mark.parametrize("block_k,stages,fp8", [
    (16, 3, False), (32, 2, False), (32, 3, False), (64, 2, False),
    (16, 2, True), (16, 3, True), (32, 1, True), (32, 2, True)])
def test_sparse_attention_tile_shapes_agree(block_k, stages, fp8):
    from dsv4.kernels.kv_fp8 import pack_kv_fp8
    from dsv4.kernels.sparse_attention import AttnConfig, sparse_attention_ref, sparse_attention_triton
    batch = make_batch([(5000, 1), (3, 1), (W, 1), (300, 9)])
    q, sink, wc, wn, wi, cc, ci = attention_inputs(batch, 128, 4, 1024, torch.bfloat16, seed=7)
    ref = sparse_attention_ref(q, sink, D ** -0.5, wc, wn, wi, cc, ci)
    if fp8:
        wc, cc = pack_kv_fp8(wc), pack_kv_fp8(cc)
    cfg = AttnConfig(block_k=block_k, num_stages=stages)
    out = sparse_attention_triton(q, sink, D ** -0.5, wc, wn, wi, cc, ci, config=cfg)
    assert rel_err(out, ref) < 1e-2, f"rel err {rel_err(out, ref):.2e}"


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_rows", "fp8_rows"])
@pytest.mark.parametrize("H,topk", [(64, 512), (128, 1024)])
@pytest.mark.parametrize("block_k,stages,splits", [
    (32, 3, 0), (64, 2, 0), (32, 2, 1), (64, 2, 5), (32, 4, 3)])
def test_sparse_attention_gluon_kernel_matches_reference(H, topk, block_k, stages, splits, fp8):
    """The Gluon warpgroup kernel, forced on: every tile shape and split the launcher may
    choose, bf16 and packed FP8 rows, against the reference and against the Triton kernel."""
    from dsv4.kernels.kv_fp8 import pack_kv_fp8
    from dsv4.kernels.sparse_attention import AttnConfig, sparse_attention_ref, sparse_attention_triton
    batch = make_batch(DECODE_EDGES + [(300, 9), (127, 3)])
    q, sink, wc, wn, wi, cc, ci = attention_inputs(batch, H, 4, topk, torch.bfloat16, seed=H + block_k)
    ref = sparse_attention_ref(q, sink, D ** -0.5, wc, wn, wi, cc, ci)
    if fp8:  # lossless on model-made rows: the same reference
        wc, cc = pack_kv_fp8(wc), pack_kv_fp8(cc)
    cfg = AttnConfig(block_k=block_k, num_stages=stages, splits=splits, kernel="gluon")
    out = sparse_attention_triton(q, sink, D ** -0.5, wc, wn, wi, cc, ci, config=cfg)
    tri = sparse_attention_triton(q, sink, D ** -0.5, wc, wn, wi, cc, ci,
                                  config=AttnConfig(block_k=32 if fp8 else block_k,  # what fits
                                                    num_stages=2 if fp8 else stages,
                                                    splits=splits, kernel="triton"))
    assert not out.isnan().any(), "NaN in the output"
    assert rel_err(out, ref) < 1e-2, f"rel err {rel_err(out, ref):.2e}"
    assert rel_err(out, tri) < 1e-2, f"rel err against Triton {rel_err(out, tri):.2e}"


@pytest.mark.parametrize("H,topk", [(64, 512), (128, 1024), (32, 512), (16, 1024)])
@pytest.mark.parametrize("splits", [0, 1, 3, 16])
@pytest.mark.parametrize("with_len", [False, True])
@pytest.mark.parametrize("tiles", [2, 3])
def test_warp_specialised_fp8_kernel_is_bit_identical(H, topk, splits, with_len, tiles):
    """FP8 rows with the decode in load warps of their own (`sparse_attention_ws.py`, the
    default): bit-identical to the plain Gluon kernel with the same 32-row tiles (same products
    in the same order), over decode edges, prefill chunks, a rank's fewer heads, splits (16:
    more than a short list has tiles) and cmp_len; and the reference within rounding."""
    from dsv4.kernels.kv_fp8 import pack_kv_fp8
    from dsv4.kernels.sparse_attention import AttnConfig, sparse_attention_ref, sparse_attention_triton
    batch = make_batch(DECODE_EDGES + [(300, 9), (127, 3), (0, 40)])
    q, sink, wc, wn, wi, cc, ci = attention_inputs(batch, H, 4, topk, torch.bfloat16, seed=H + splits)
    ref = sparse_attention_ref(q, sink, D ** -0.5, wc, wn, wi, cc, ci)
    wc, cc = pack_kv_fp8(wc), pack_kv_fp8(cc)
    cmp_len = None
    if with_len:  # as the model passes it: each row's valid entries first, -1 after
        order = torch.argsort((ci < 0).to(torch.int8), dim=1, stable=True)
        ci = ci.gather(1, order)
        cmp_len = (ci >= 0).sum(1).to(torch.int32)
    outs = [sparse_attention_triton(q, sink, D ** -0.5, wc, wn, wi, cc, ci, cmp_len=cmp_len,
                                    config=AttnConfig(block_k=32, num_stages=st, splits=splits,
                                                      kernel=k))
            for k, st in (("ws", tiles), ("gluon", 2))]
    assert not outs[0].isnan().any(), "NaN in the output"
    assert torch.equal(outs[0], outs[1]), \
        f"differs from the plain Gluon kernel: max {(outs[0].float() - outs[1].float()).abs().max():.3e}"
    assert rel_err(outs[0], ref) < 1e-2, f"rel err {rel_err(outs[0], ref):.2e}"


@pytest.mark.parametrize("kernel,block_k", [("ws", 32), ("gluon", 32), ("gluon", 64)])
@pytest.mark.parametrize("H,ratio,topk", [(64, 0, 0), (64, 128, 0), (64, 4, 512), (128, 4, 1024)])
def test_packed_new_rows_are_bit_identical(kernel, block_k, H, ratio, topk):
    """FP8 rows: a step's own (new) rows packed like the cached ones and gathered with them
    (`pack_new`, as the model asks in prefill chunks) give the bits of reading them as bf16:
    model-made rows are exact in the packed layout. Prefill chunks (one at 5000 tokens of
    history, its window part cached, part new) beside decode edges."""
    from dsv4.kernels.kv_fp8 import pack_kv_fp8
    from dsv4.kernels.sparse_attention import AttnConfig, sparse_attention_ref, sparse_attention_triton
    batch = make_batch(PREFILL + DECODE_EDGES + [(5000, 300)])
    q, sink, wc, wn, wi, cc, ci = attention_inputs(batch, H, ratio, topk, torch.bfloat16,
                                                   seed=H + ratio)
    ref = sparse_attention_ref(q, sink, D ** -0.5, wc, wn, wi, cc, ci)
    wc, cc = pack_kv_fp8(wc), (pack_kv_fp8(cc) if cc is not None else None)
    cfg = AttnConfig(block_k=block_k, num_stages=2, kernel=kernel)
    outs = [sparse_attention_triton(q, sink, D ** -0.5, wc, wn, wi, cc, ci, config=cfg,
                                    pack_new=p) for p in (False, True)]
    assert not outs[1].isnan().any(), "NaN in the output"
    assert torch.equal(outs[0], outs[1]), \
        f"packed new rows differ: max {(outs[0].float() - outs[1].float()).abs().max():.3e}"
    assert rel_err(outs[1], ref) < 1e-2, f"rel err {rel_err(outs[1], ref):.2e}"


@pytest.mark.parametrize("kernel", ["gluon", "triton"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_rows", "fp8_rows"])
@pytest.mark.parametrize("H,splits", [(64, 0), (64, 5), (128, 1), (128, 3)])
def test_sparse_attention_out_rope_is_rope_after(H, splits, fp8, kernel):
    """The output's inverse RoPE inside the attention op (`out_rope`: in the split merge, or
    `rope_` after an unsplit launch) is `rope_(inverse=True)` on its output: the same fp32
    operations, equal but where the two kernels' compiled FMAs round a pair differently (a
    bf16 step at most; 4 of these 16 cases had such elements on the H200)."""
    from dsv4.config import ModelConfig
    from dsv4.kernels.kv_fp8 import pack_kv_fp8
    from dsv4.kernels.rope import rope_
    from dsv4.kernels.sparse_attention import AttnConfig, sparse_attention_triton
    from dsv4.model.rope import rope_frequencies
    batch = make_batch([(5000, 1), (3, 1), (W + 1, 1), (300, 1)])
    q, sink, wc, wn, wi, cc, ci = attention_inputs(batch, H, 4, 512, torch.bfloat16, seed=H)
    if fp8:
        wc, cc = pack_kv_fp8(wc), pack_kv_fp8(cc)
    pos = torch.randint(0, 131072, (q.shape[0],), device=DEV)
    freqs = rope_frequencies(ModelConfig.preset("flash"), 4)
    for qq in (q, q[:1]):  # batch 4 and batch 1
        cfg = AttnConfig(block_k=32, num_stages=2, splits=splits, kernel=kernel)
        plain = sparse_attention_triton(qq, sink, D ** -0.5, wc, wn[:len(qq)], wi[:len(qq)], cc,
                                        ci[:len(qq)], config=cfg)
        got = sparse_attention_triton(qq, sink, D ** -0.5, wc, wn[:len(qq)], wi[:len(qq)], cc,
                                      ci[:len(qq)], config=cfg, out_rope=(pos[:len(qq)], freqs))
        want = rope_(plain, pos[:len(qq)], freqs, R, inverse=True).float()
        got = got.float()
        assert torch.equal(got[..., :D - R], want[..., :D - R])  # the other dims untouched
        assert ((got - want).abs() <= want.abs() * 2.0 ** -7 + 1e-6).all()
        assert (got == want).float().mean().item() > 0.99


def test_sparse_attention_split_matches_unsplit():
    from dsv4.kernels.sparse_attention import AttnConfig, sparse_attention_triton
    batch = make_batch([(5000, 1), (3, 1)])
    q, sink, wc, wn, wi, cc, ci = attention_inputs(batch, 128, 4, 1024, torch.bfloat16, seed=2)
    one = sparse_attention_triton(q, sink, D ** -0.5, wc, wn, wi, cc, ci, config=AttnConfig(splits=1))
    many = sparse_attention_triton(q, sink, D ** -0.5, wc, wn, wi, cc, ci, config=AttnConfig(splits=7))
    assert rel_err(many, one) < 1e-2, f"rel err {rel_err(many, one):.2e}"


@pytest.mark.parametrize("d,n", [(512, 1), (512, 37), (128, 5), (192, 300)])
def test_store_kv_fp8_packs_and_scatters_as_torch(d, n):
    """The one-launch pack + scatter of the cache writes (optionally gathering its rows) gives
    torch's packed bytes exactly, on model-made rows and on arbitrary ones (tiny to huge
    magnitudes, an all-zero group)."""
    from dsv4.kernels.kv_fp8 import kv_fp8_row_bytes, pack_kv_fp8, store_kv_fp8_
    gen = torch.Generator(device=DEV).manual_seed(d + n)
    x = torch.randn(n, d, generator=gen, device=DEV)
    model = torch.cat([fp8_sim(x[:, :d - R], 64), x[:, d - R:]], 1).bfloat16()
    wild = (x * torch.logspace(-8, 6, d, device=DEV)).bfloat16()
    wild[0, :64] = 0
    rb = kv_fp8_row_bytes(d, R)
    for rows in (model, wild):
        dst = torch.randperm(2 * n + 3, generator=gen, device=DEV)[:n]
        buf = torch.randint(0, 256, (2 * n + 3, rb), generator=gen, device=DEV, dtype=torch.uint8)
        want = buf.clone()
        want[dst] = pack_kv_fp8(rows, R)
        store_kv_fp8_(buf, dst, rows, R)
        assert torch.equal(buf, want), f"{(buf != want).sum().item()} bytes differ"
        src = torch.randperm(n, generator=gen, device=DEV)[:max(1, n // 2)]  # rows[src]
        want[dst[:src.numel()]] = pack_kv_fp8(rows[src], R)
        store_kv_fp8_(buf, dst[:src.numel()], rows, R, src)
        assert torch.equal(buf, want), f"gathered: {(buf != want).sum().item()} bytes differ"


try:  # the Gluon attention kernel's FP8-row decode, alone (`_e4m3_bf16`)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from dsv4.kernels.sparse_attention_wg import HAS_GLUON, _e4m3_bf16
except Exception:  # noqa: BLE001 - no Gluon: the test below skips
    HAS_GLUON = False

if HAS_GLUON:
    @gluon.jit
    def _e4m3_decode_kernel(code_ptr, s_ptr, out_ptr, R, L: gl.constexpr):
        """out[r, c] = _e4m3_bf16(code[r, c], s[r]) over [R, 256] codes, 32 x 64 a program."""
        r = gl.program_id(0) * 32 + gl.arange(0, 32, gl.SliceLayout(1, L))
        c = gl.program_id(1) * 64 + gl.arange(0, 64, gl.SliceLayout(0, L))
        ok = (r < R)[:, None] & (c < 256)[None, :]
        code = gl.load(code_ptr + r[:, None] * 256 + c[None, :], mask=ok, other=0)
        sb = gl.load(s_ptr + r, mask=r < R, other=127)
        gl.store(out_ptr + r[:, None] * 256 + c[None, :], _e4m3_bf16(code, sb[:, None]), mask=ok)


@pytest.mark.skipif(not HAS_GLUON, reason="needs Gluon")
def test_gluon_fp8_row_decode_is_exact_for_every_code_and_scale():
    """Every e4m3 code (but NaN's) times every scale byte 0..254 through the Gluon kernel's
    decode (integer bit placement + two bf16 products, subnormals included): the bits of the
    reference unpacking (`unpack_kv_fp8`), as the CPU emulation of its PTX found
    (tests/test_kernel_refs.py)."""
    codes = torch.arange(256, device=DEV).to(torch.uint8).repeat(255, 1)  # [scale byte, code]
    s = torch.arange(255, device=DEV, dtype=torch.int32)
    out = torch.empty(255, 256, dtype=torch.bfloat16, device=DEV)
    L = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    _e4m3_decode_kernel[(triton_cdiv(255, 32), 4)](codes, s, out, 255, L, num_warps=4)
    ref = (codes.view(torch.float8_e4m3fn).float()
           * torch.ldexp(torch.ones(255, 1, device=DEV), s[:, None].float() - 127)).bfloat16()
    finite = (torch.arange(256, device=DEV) & 0x7F) != 0x7F
    bad = (out.view(torch.int16) != ref.view(torch.int16)) & finite[None, :]
    assert not bad.any(), f"{bad.sum().item()} values differ, first at {bad.nonzero()[0].tolist()}"


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_kv_fp8_round_trip_is_exact_on_model_rows():
    from dsv4.kernels.kv_fp8 import pack_kv_fp8, unpack_kv_fp8
    rows = kv_rows(4096, torch.bfloat16, torch.Generator(device=DEV).manual_seed(3))
    packed = pack_kv_fp8(rows)
    assert packed.shape == (4096, 584)
    assert torch.equal(unpack_kv_fp8(packed, D), rows)


@pytest.mark.parametrize("block_major", [False, True])
@pytest.mark.parametrize("m", [4, 128])
def test_candidates_kernel_writes_the_visible_prefix_as_torch(m, block_major):
    """The compressed-row lists of a graph step: avail and each row's first columns up to the
    next multiple of 128 past avail equal the torch composition; later columns are left as
    they were (no consumer reads past avail). Block tables row-major or block-major (a
    transposed view, as StaticBatch holds them)."""
    from dsv4.kernels.candidates import PAD_COLS, _candidates_cuda, candidates_, candidates_ref_
    gen = torch.Generator(device=DEV).manual_seed(m)
    rpb, nb = BLOCK_TOKENS // m, 40
    bt = torch.randint(0, 1000, (7, nb), generator=gen, device=DEV)
    if block_major:
        bt = bt.t().contiguous().t()
    tok_seq = torch.randint(0, 7, (33,), generator=gen, device=DEV)
    pos = torch.cat([torch.tensor([0, 3, 4, 5, 127, 128, 129], device=DEV),
                     torch.randint(0, nb * BLOCK_TOKENS + 500, (26,), generator=gen, device=DEV)])
    N = nb * rpb + 64
    rows, avail = torch.full((33, N), 12345, device=DEV), torch.zeros(33, dtype=torch.long, device=DEV)
    want, want_avail = rows.clone(), avail.clone()
    candidates_(rows, avail, bt, tok_seq, pos, m, rpb)
    candidates_ref_(want, want_avail, bt, tok_seq, pos, m, rpb)
    assert torch.equal(avail, want_avail)
    # and with one program a token looping over the column blocks (256 columns each)
    looped = torch.full_like(rows, 12345)
    _candidates_cuda(looped, avail.clone(), bt, tok_seq, pos, m, rpb, block=256, programs=1)
    for t in range(33):
        end = min(N, -(-int(avail[t]) // PAD_COLS) * PAD_COLS)
        for got in (rows, looped):
            assert torch.equal(got[t, :end], want[t, :end]), f"token {t}"
        assert (rows[t, end:] == 12345).all(), f"token {t}: wrote past its prefix"


# ------------------------------------------------------------------------------------ indexer
def indexer_inputs(chunks, dtype, seed, nI=64, c=128):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    batch = make_batch(chunks)
    T = batch.num_tokens
    cand, _ = batch.candidates(4)
    nblocks = int(batch.block_tables_cpu.max()) + 1
    q = fp4_sim(torch.randn(T, nI, c, generator=gen, device=DEV), 32).to(dtype)
    keys = fp4_sim(torch.randn(nblocks * 32, c, generator=gen, device=DEV), 32).to(dtype)
    w = (torch.randn(T, nI, generator=gen, device=DEV) * (c * nI) ** -0.5).to(dtype)
    return q, w, keys, cand


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_indexer_scores_match_reference(dtype):
    from dsv4.kernels.indexer import indexer_scores_ref, indexer_scores_triton
    q, w, keys, cand = indexer_inputs(DECODE_EDGES + [(9000, 3)], dtype, seed=4)
    ref = indexer_scores_ref(q, w, keys, cand)
    out = indexer_scores_triton(q, w, keys, cand)
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(out)), "visibility pattern differs"
    assert rel_err(out[fin], ref[fin]) < 1e-5, f"rel err {rel_err(out[fin], ref[fin]):.2e}"


@pytest.mark.parametrize("fold", [False, True], ids=["per_block", "folded"])
@pytest.mark.parametrize("block_n,num_warps", [(64, 8), (64, 4), (128, 8)])
@pytest.mark.parametrize("nI", [64, 32])
def test_indexer_fp8_path_matches_reference(block_n, num_warps, nI, fold):
    """Packed keys and FP4-grid queries on FP8 tensor cores (`q_fp4`): the reference's scores
    up to fp32 summation order (every product is exact), keys and query blocks of extreme
    magnitudes and all-zero ones, invisible candidates, `avail`; heads of one TP rank (32).
    `folded`: one query scale per head where a token's blocks allow and one key scale per
    key (bit-identical to the per-block scales there), per-block scales 16 heads at a time
    where not (token 1's 2^-90 block; keys 0, 2, 3: zero, blocks 60 and 12 binades apart);
    keys at powers of two from 2^-30 to 2^29 (each key row has its own decode tables)."""
    from dsv4.kernels.index_fp4 import pack_index_fp4
    from dsv4.kernels.indexer import indexer_scores_ref, indexer_scores_triton
    q, w, keys, cand = indexer_inputs(DECODE_EDGES + [(9000, 3)], torch.bfloat16, seed=7, nI=nI)
    keys *= torch.exp2(torch.randint(-30, 30, (keys.shape[0], 1), device=DEV).float())
    keys[0] = 0.0
    keys[1] *= 2.0 ** -100
    keys[2, :32] *= 2.0 ** 60
    keys[3, 96:] *= 2.0 ** -12
    q[0, 1] = 0.0
    q[1, 2, 32:64] *= 2.0 ** -90
    packed = pack_index_fp4(keys)
    ref = indexer_scores_ref(q, w, packed, cand)
    got = indexer_scores_triton(q, w, packed, cand, q_fp4=True, block_n=block_n,
                                num_warps=num_warps, fold=fold)
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(got)), "visibility pattern differs"
    assert rel_err(got[fin], ref[fin]) < 1e-6, f"rel err {rel_err(got[fin], ref[fin]):.2e}"
    if fold:
        per_block = indexer_scores_triton(q, w, packed, cand, q_fp4=True, block_n=block_n,
                                          num_warps=num_warps, fold=False)
        assert torch.equal(got[0], per_block[0]) and torch.equal(got[2:], per_block[2:])
    avail = (cand >= 0).sum(1)
    bounded = indexer_scores_triton(q, w, packed, cand, avail, q_fp4=True, block_n=block_n,
                                    num_warps=num_warps, fold=fold)
    for t in range(cand.shape[0]):
        end = min(cand.shape[1], -(-int(avail[t]) // block_n) * block_n)
        assert torch.equal(bounded[t, :end], got[t, :end]), f"token {t}"


@pytest.mark.parametrize("bn,maxnreg", [(64, 128), (64, None), (128, 128)],
                         ids=["bn64", "bn64_uncapped", "bn128"])
@pytest.mark.parametrize("extreme", [False, True], ids=["model_like", "extreme"])
@pytest.mark.parametrize("nI", [64, 32, 16])
def test_indexer_gluon_kernel_matches_reference(nI, extreme, bn, maxnreg):
    """The Gluon kernel (`indexer_wg.py`, keys decoded in place as the wgmma's A operand) on
    packed keys and FP4-grid queries: the reference's scores up to fp32 summation order,
    decode edges and a 9000-token prefill chunk (up to 36 key blocks a CTA), one CTA a key
    block and 3 blocks a CTA; heads of TP ranks (32, 16); steps of 64 keys (one warpgroup)
    and 128 (two), registers capped at 128 or not. `extreme` (as the Triton test): keys
    at powers of two from 2^-30 to 2^29, keys that do not fold (0: zero, 2 and 3: blocks 60 and
    12 binades apart: the per-block pass) and a token whose queries do not (1: a block at
    2^-90: its CTAs take per-block scales throughout). `avail` leaves the scores up to it
    unchanged."""
    from dsv4.kernels import indexer as ix
    from dsv4.kernels.index_fp4 import pack_index_fp4
    from dsv4.kernels.indexer_wg import HAS_GLUON
    assert HAS_GLUON, "no Gluon in this Triton"
    q, w, keys, cand = indexer_inputs(DECODE_EDGES + [(9000, 3)], torch.bfloat16, seed=11, nI=nI)
    if extreme:
        keys *= torch.exp2(torch.randint(-30, 30, (keys.shape[0], 1), device=DEV).float())
        keys[0] = 0.0
        keys[2, :32] *= 2.0 ** 60
        keys[3, 96:] *= 2.0 ** -12
        q[0, 1] = 0.0
        q[1, 2, 32:64] *= 2.0 ** -90
    packed = pack_index_fp4(keys)
    ref = ix.indexer_scores_ref(q, w, packed, cand)
    fin = torch.isfinite(ref)
    for bpc in (None, 1, 3):
        got = ix.indexer_scores_triton(q, w, packed, cand, q_fp4=True, gluon=True,
                                       maxnreg=maxnreg, blocks_per_cta=bpc, gluon_block_n=bn)
        assert not ix._GLUON_FAILED, ix._GLUON_FAILED
        assert torch.equal(fin, torch.isfinite(got)), f"visibility pattern differs ({bpc})"
        err = rel_err(got[fin], ref[fin])
        assert err < 1e-6, f"{bpc} blocks a CTA: rel err {err:.2e}"
    avail = (cand >= 0).sum(1)
    bounded = ix.indexer_scores_triton(q, w, packed, cand, avail, q_fp4=True, gluon=True,
                                       maxnreg=maxnreg, gluon_block_n=bn)
    for t in range(cand.shape[0]):
        end = min(cand.shape[1], -(-int(avail[t]) // bn) * bn)
        assert torch.equal(bounded[t, :end], got[t, :end]), f"token {t}"


@pytest.mark.parametrize("block_n", [64, 128])
@pytest.mark.parametrize("packed", [False, True])
def test_indexer_scores_with_avail_skip_only_columns_past_it(packed, block_n):
    """`avail` (the batches' visible prefix per token): the same scores up to it, -inf to the
    end of its block, and the columns after that never written."""
    from dsv4.kernels.index_fp4 import pack_index_fp4
    from dsv4.kernels.indexer import indexer_scores_triton
    q, w, keys, cand = indexer_inputs(DECODE_EDGES + [(9000, 3)], torch.bfloat16, seed=6)
    keys = pack_index_fp4(keys) if packed else keys
    avail = (cand >= 0).sum(1)
    want = indexer_scores_triton(q, w, keys, cand, block_n=block_n)
    got = indexer_scores_triton(q, w, keys, cand, avail, block_n=block_n)
    for t in range(cand.shape[0]):
        end = min(cand.shape[1], -(-int(avail[t]) // block_n) * block_n)
        assert torch.equal(got[t, :end], want[t, :end]), f"token {t}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_indexer_scores_from_packed_fp4_keys_equal_the_float_keys(dtype):
    """Packed keys (80 bytes, decoded in the kernel) give bit-identical scores to the same keys
    in the working dtype, and the store kernel writes exactly the torch packer's bytes."""
    from dsv4.kernels.index_fp4 import pack_index_fp4, store_index_fp4_
    from dsv4.kernels.indexer import indexer_scores_triton
    q, w, keys, cand = indexer_inputs(DECODE_EDGES + [(9000, 3)], dtype, seed=5)
    keys[0] = 0.0  # an all-zero key; and magnitudes far from 1
    keys[1] *= 2.0 ** -100
    keys[2] *= 2.0 ** 100
    packed = torch.zeros(keys.shape[0] + 7, 80, dtype=torch.uint8, device=DEV)
    dst = torch.randperm(packed.shape[0], device=DEV)[:keys.shape[0]]
    store_index_fp4_(packed, dst, keys)
    assert torch.equal(packed[dst], pack_index_fp4(keys))
    # the same candidates, as rows of the packed cache
    cand_p = torch.where(cand >= 0, dst[cand.clamp(min=0)], -1)
    want = indexer_scores_triton(q, w, keys, cand)
    got = indexer_scores_triton(q, w, packed, cand_p)
    assert torch.equal(got, want)


@pytest.mark.parametrize("topk", [512, 1024])
def test_indexer_topk_selects_the_reference_top_scores(topk):
    """Same selected set modulo near-ties (the kernel's scores are ~1e-6 from the reference's):
    every pick is visible and unique, and the picked scores equal the reference's best scores
    as multisets."""
    from dsv4.kernels.indexer import indexer_scores_ref, indexer_topk, indexer_topk_ref
    q, w, keys, cand = indexer_inputs(DECODE_EDGES + [(9000, 3)], torch.bfloat16, seed=topk)
    sel, ref_sel = indexer_topk(q, w, keys, cand, topk), indexer_topk_ref(q, w, keys, cand, topk)
    assert sel.shape == ref_sel.shape
    score = indexer_scores_ref(q, w, keys, cand)
    by_row = torch.full((keys.shape[0] + 1,), float("nan"), device=DEV)
    for t in range(cand.shape[0]):
        by_row.fill_(float("nan"))
        vis = cand[t] >= 0
        by_row[cand[t][vis]] = score[t][vis]
        picked = sel[t][sel[t] >= 0]
        assert (sel[t] >= 0).sum() == (ref_sel[t] >= 0).sum(), f"token {t}: count differs"
        assert picked.unique().numel() == picked.numel(), f"token {t}: duplicate picks"
        got = by_row[picked]
        assert not got.isnan().any(), f"token {t}: picked a row that is not visible"
        want = by_row[ref_sel[t][ref_sel[t] >= 0]]
        torch.testing.assert_close(got.sort().values, want.sort().values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("T,N,k", [(5, 40, 8), (4, 1024, 512), (3, 1100, 1024), (2, 5000, 1024),
                                   (2, 262144, 512), (33, 8192, 1024), (4, 700, 1024),
                                   (600, 3000, 512)])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_kernel_selects_exactly_the_reference_set(T, N, k, ties):
    """The radix select picks the stable sort's set (ties toward lower columns), -1 past the
    visible entries; rows with none, fewer than k, exactly k, k + 1 and all visible. 600 rows
    (over 4 an SM): the prefill launch of small programs."""
    from dsv4.kernels.topk import _topk_cuda, _topk_split_cuda, select_topk_ref
    gen = torch.Generator(device=DEV).manual_seed(N + k)
    s = torch.randn(T, N, generator=gen, device=DEV)
    if ties:  # relu zeros and repeated values, -0.0 beside +0.0
        s = (s * 2).round().clamp(min=0) * torch.where(torch.rand(T, N, generator=gen, device=DEV)
                                                       < 0.5, -1.0, 1.0)
    cand = torch.randperm(2 * T * N, generator=gen, device=DEV)[:T * N].view(T, N)
    edges = [0, 1, k - 1, k, k + 1, N // 2, N]
    for t in range(T):
        v = min(N, max(0, edges[(3 * t + 5) % len(edges)]))  # N // 2, 1, k + 1, 0, k, ...
        s[t, v:] = float("-inf")
        cand[t, v:] = -1
    for c in (cand, cand.int()):
        got, want = _topk_cuda(s, c, k), select_topk_ref(s, c, k)
        assert got.shape == want.shape and got.dtype == c.dtype
        assert torch.equal(got.sort(1).values, want.sort(1).values)
    # with avail (the visible prefix of each row) nothing past it is read: NaN there
    avail = (cand >= 0).sum(1)
    cols = torch.arange(N, device=DEV)[None, :]
    dirty = torch.where(cols < avail[:, None], s, float("nan"))
    got = _topk_cuda(dirty, cand, k, avail)
    assert torch.equal(got.sort(1).values, want.sort(1).values)
    # the row spread over programs (wide rows): same set, the picks first; 4096 columns a
    # program, and 256 for many programs a row
    # (and fewer programs than chunks: each takes every 3rd chunk of its row)
    for chunk, programs in ((4096, None), (256, None), (256, 3)):
        for sc, av in ((s, None), (dirty, avail)):
            got = _topk_split_cuda(sc, cand, k, av, chunk=chunk, programs=programs)
            assert torch.equal(got.sort(1).values, want.sort(1).values)
            n = (got >= 0).sum(1)
            assert torch.equal(got >= 0, torch.arange(got.shape[1], device=DEV)[None, :] < n[:, None])


def test_topk_early_stop_keeps_keys_equal_to_the_threshold():
    """The selects stop once the chosen digit holds exactly the entries still needed; keys
    equal to the bits fixed so far (2.0 beside 4.0: same top 8 key bits) are still taken."""
    from dsv4.kernels.topk import _topk_cuda, _topk_split_cuda, select_topk_ref
    s = torch.ones(3, 9000, device=DEV)
    s[:, [3, 900, 8000]], s[:, [5, 4100]] = 4.0, 2.0
    cand = torch.arange(s.numel(), device=DEV).view(s.shape)
    want = select_topk_ref(s, cand, 5).sort(1).values
    for got in (_topk_cuda(s, cand, 5), _topk_split_cuda(s, cand, 5),
                _topk_split_cuda(s, cand, 5, chunk=256, programs=3)):
        assert torch.equal(got.sort(1).values, want)


@pytest.mark.parametrize("T,k", [(12, 512), (12, 1024), (64, 1024)])
def test_select_topk_wide_static_rows_by_visible_prefix(T, k):
    """Rows as CUDA graphs give them: wide static lists (the graphs' context / 4) whose visible
    prefix (avail) varies; short prefixes take the one-program select, long ones the split
    select, within one call. NaN past each prefix: nothing there may be read."""
    from dsv4.kernels.topk import MAX_KERNEL_N, select_topk, select_topk_ref
    N = 4 * MAX_KERNEL_N + 3
    gen = torch.Generator(device=DEV).manual_seed(T + k)
    s = (torch.randn(T, N, generator=gen, device=DEV) * 2).round().clamp(min=0)  # many ties
    cand = torch.arange(T * N, device=DEV).view(T, N)
    edges = [0, 1, k - 1, k, k + 1, MAX_KERNEL_N - 1, MAX_KERNEL_N, MAX_KERNEL_N + 1,
             2 * MAX_KERNEL_N + 7, N - 1, N, 3000]
    avail = torch.tensor([edges[t % len(edges)] for t in range(T)], device=DEV)
    cols = torch.arange(N, device=DEV)[None, :]
    cand = torch.where(cols < avail[:, None], cand, -1)
    s = torch.where(cols < avail[:, None], s, float("-inf"))
    want = select_topk_ref(s, cand, k)
    dirty = torch.where(cols < avail[:, None], s, float("nan"))
    got = select_topk(dirty, cand, k, avail)
    assert torch.equal(got.sort(1).values, want.sort(1).values)
    n = (got >= 0).sum(1)
    assert torch.equal(got >= 0, torch.arange(got.shape[1], device=DEV)[None, :] < n[:, None])


# ------------------------------------------------------------------------------------ compressor
@pytest.mark.parametrize("windows,items,C", [(64, 128, 512), (2048, 8, 512), (2048, 8, 128), (3, 8, 96)])
def test_compress_pool_matches_reference(windows, items, C):
    from dsv4.kernels.compressor import compress_pool, compress_pool_ref
    gen = torch.Generator(device=DEV).manual_seed(5)
    kv = torch.randn(windows, items, C, generator=gen, device=DEV)
    score = torch.randn(windows, items, C, generator=gen, device=DEV) * 3
    valid = torch.ones(windows, items, dtype=torch.bool, device=DEV)
    valid[0, :items // 2] = False  # window 0 of an overlapping compressor has no predecessor
    out, ref = compress_pool(kv, score, valid), compress_pool_ref(kv, score, valid)
    assert rel_err(out, ref) < 1e-6, f"rel err {rel_err(out, ref):.2e}"



@pytest.mark.parametrize("m,k,C,windows", [(4, 2, 512, 1), (4, 2, 512, 300), (128, 1, 512, 3),
                                           (4, 2, 128, 64)])
def test_compress_windows_gathers_as_reference(m, k, C, windows):
    """Items gathered from this step's rows or the state ring (and, for overlapping windows,
    the two channel halves) inside the pooling kernel, against the gathered copy + pooling."""
    from dsv4.kernels.compressor import compress_windows, compress_windows_ref
    gen = torch.Generator(device=DEV).manual_seed(windows)
    T, rows = 40, 1000
    a, g = (torch.randn(T, k * C, generator=gen, device=DEV) for _ in range(2))
    kr, sr = (torch.randn(rows, k * C, generator=gen, device=DEV) * 3 for _ in range(2))
    is_new = torch.rand(windows, k * m, generator=gen, device=DEV) < 0.4
    new_idx = torch.randint(0, T, (windows, k * m), generator=gen, device=DEV)
    state_idx = torch.randint(0, rows, (windows, k * m), generator=gen, device=DEV)
    valid = torch.ones(windows, k * m, dtype=torch.bool, device=DEV)
    if k == 2:  # the overlapping window 0 has no predecessor (a whole window is never absent)
        valid[0, :m] = False
    ape = torch.randn(m, k * C, generator=gen, device=DEV)
    args = (a, g, kr, sr, is_new, new_idx, state_idx, valid, m, ape)
    out, ref = compress_windows(*args), compress_windows_ref(*args)
    assert rel_err(out, ref) < 1e-6, f"rel err {rel_err(out, ref):.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("qat", [True, False])
@pytest.mark.parametrize("kind,C,m,W", [("attn", 512, 4, 1), ("attn", 512, 128, 37),
                                        ("index", 128, 4, 1), ("index", 128, 4, 9),
                                        ("index", 128, 4, 64), ("index", 128, 4, 65),
                                        ("index", 128, 4, 300)])
def test_compress_finish_matches_reference_chain(kind, C, m, W, qat, dtype):
    """Pooled rows -> cache rows in one kernel (cast, RMSNorm, RoPE, FP8 or Hadamard + FP4)
    against the reference ops one after another. The row norm's fp32 sum may end one ulp
    apart, and a value on a rounding boundary then lands on the next e4m3 / e2m1 step: allow
    that for a few elements, one working-dtype ulp for the rest."""
    from dsv4.config import ModelConfig
    from dsv4.kernels.compressor import compress_finish, compress_finish_ref
    from dsv4.model.rope import rope_frequencies
    gen = torch.Generator(device=DEV).manual_seed(W)
    freqs = rope_frequencies(ModelConfig.preset("flash"), m).float().to(DEV)
    pooled = torch.randn(W, C, generator=gen, device=DEV) * 3
    weight = torch.rand(C, generator=gen, device=DEV) + 0.5
    index = torch.randint(0, 30000, (W,), generator=gen, device=DEV)
    args = (pooled, weight, 1e-6, index, m, freqs, 64, kind == "index", qat, dtype)
    got, ref = compress_finish(*args), compress_finish_ref(*args)
    assert got.dtype == dtype and got.shape == (W, C)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -20
    # as test_rope_matches_reference: a rounding step, or fp32 noise where the rotation cancels
    far = (got.float() - ref.float()).abs() > ref.float().abs() * ulp * 1.01 + 2e-5
    assert far.float().mean().item() <= (2e-3 if qat else 0.0), f"{far.sum().item()} elements off"
    assert rel_err(got, ref) < 2e-2


@pytest.mark.parametrize("n,width", [(1, 1024), (37, 1024), (300, 256), (5, 96)])
def test_ring_write_matches_reference(n, width):
    """Raw rows into the state rings, the gate rows with their positional bias: exact."""
    from dsv4.kernels.compressor import ring_write_, ring_write_ref_
    gen = torch.Generator(device=DEV).manual_seed(n)
    T, rows, m = 400, 1000, 4
    a, g = (torch.randn(T, width, generator=gen, device=DEV) for _ in range(2))
    ape = torch.randn(m, width, generator=gen, device=DEV)
    pos = torch.randint(0, 10 ** 5, (T,), generator=gen, device=DEV)
    tok = torch.randperm(T, generator=gen, device=DEV)[:n]
    dst = torch.randperm(rows, generator=gen, device=DEV)[:n]
    rings = [torch.randn(rows, width, generator=gen, device=DEV) for _ in range(2)]
    want = [r.clone() for r in rings]
    ring_write_(*rings, a, g, ape, pos, tok, dst)
    ring_write_ref_(*want, a, g, ape, pos, tok, dst)
    assert torch.equal(rings[0], want[0]) and torch.equal(rings[1], want[1])


# ------------------------------------------------------------------------------------ mHC
def assert_within_one_bf16_ulp(out, ref):
    tol = ref.float().abs() * 2.0 ** -7 + 1e-6
    bad = ((out.float() - ref.float()).abs() > tol).sum().item()
    assert bad == 0, f"{bad} elements differ by more than one bf16 ulp"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,d", [(1, 4096), (37, 4096), (300, 7168)])
def test_hc_pre_matches_reference(T, d, dtype):
    from dsv4.kernels.mhc import hc_pre, hc_pre_ref
    gen = torch.Generator(device=DEV).manual_seed(T)
    n = 4
    x = torch.randn(T, n, d, generator=gen, device=DEV).to(dtype)
    fn = torch.randn((2 + n) * n, n * d, generator=gen, device=DEV) * (n * d) ** -0.5
    scale = torch.rand(3, generator=gen, device=DEV) + 0.5
    base = torch.randn((2 + n) * n, generator=gen, device=DEV)
    y, post, comb = hc_pre(x, fn, scale, base, 1e-6, 1e-6, 20)
    yr, postr, combr = hc_pre_ref(x, fn, scale, base, 1e-6, 1e-6, 20)
    # the mix is an fp32 sum of n*d products in another order than cuBLAS's: ~1e-6 apart
    torch.testing.assert_close(post, postr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comb, combr, atol=1e-5, rtol=1e-5)
    # y = sum_j pre_j X_j can cancel, so its tolerance scales with the terms, not with y
    terms = (x.float().abs() * 2).sum(1)
    bad = ((y.float() - yr.float()).abs() > terms * 1e-5 + yr.float().abs() * 2.0 ** -7).sum().item()
    assert bad == 0, f"{bad} elements of y differ by more than one bf16 ulp + fp32 noise"


def test_hc_pre_fn_parts_follow_the_parameter():
    """fn's bf16 parts (`mhc.fn_parts`) are split once and reused, redone in the same buffer
    after an in-place update of fn, and give the reference's mix at a prefill size (8192
    tokens)."""
    from dsv4.kernels.mhc import fn_parts, hc_pre, hc_pre_ref
    gen = torch.Generator(device=DEV).manual_seed(11)
    n, d, T = 4, 4096, 8192
    x = torch.randn(T, n, d, generator=gen, device=DEV).bfloat16()
    fn = torch.nn.Parameter(torch.randn((2 + n) * n, n * d, generator=gen, device=DEV)
                            * (n * d) ** -0.5, requires_grad=False)
    scale = torch.rand(3, generator=gen, device=DEV) + 0.5
    base = torch.randn((2 + n) * n, generator=gen, device=DEV)
    p1 = fn_parts(fn)
    assert fn_parts(fn) is p1 and torch.equal(p1.float().sum(0), fn)
    for _ in range(2):  # the second pass: after fn changed in place
        _, post, comb = hc_pre(x, fn, scale, base, 1e-6, 1e-6, 20)
        _, postr, combr = hc_pre_ref(x, fn, scale, base, 1e-6, 1e-6, 20)
        torch.testing.assert_close(post, postr, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(comb, combr, atol=1e-5, rtol=1e-5)
        fn.mul_(-0.5)
    assert fn_parts(fn) is p1 and torch.equal(p1.float().sum(0), fn)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,d", [(1, 4096), (5, 4096), (300, 7168)])
def test_hc_head_matches_reference(T, d, dtype):
    """hc_head through hc_pre's kernels (n mix columns, one scale, no post / comb)."""
    from dsv4.kernels.mhc import hc_head, hc_head_ref
    gen = torch.Generator(device=DEV).manual_seed(T + 2)
    n = 4
    x = torch.randn(T, n, d, generator=gen, device=DEV).to(dtype)
    fn = torch.randn(n, n * d, generator=gen, device=DEV) * (n * d) ** -0.5
    scale = torch.rand(1, generator=gen, device=DEV) + 0.5
    base = torch.randn(n, generator=gen, device=DEV)
    y, yr = hc_head(x, fn, scale, base, 1e-6, 1e-6), hc_head_ref(x, fn, scale, base, 1e-6, 1e-6)
    terms = (x.float().abs() * 2).sum(1)
    bad = ((y.float() - yr.float()).abs() > terms * 1e-5 + yr.float().abs() * 2.0 ** -7).sum().item()
    assert bad == 0, f"{bad} elements of y differ by more than one bf16 ulp + fp32 noise"


@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,d", [(1, 4096), (37, 4096), (1, 7168), (300, 7168), (2048, 4096)])
def test_hc_pre_with_the_rmsnorm_fused(T, d, dtype, head):
    """`norm=`: y comes out through the RMSNorm that follows it (whole rows a CTA): the
    unfused kernel's y at the same launch shape normalised by `rmsnorm_ref`, up to fp32
    rounding; post and comb as without it (hc_pre and hc_head). And the dispatch
    (`hc_pre`, fused from FUSE_NORM_FROM tokens) against the reference ops."""
    from dsv4.kernels.mhc import (hc_head, hc_head_ref, hc_pre, hc_pre_ref, hc_pre_triton,
                                  norm_cfg)
    from dsv4.kernels.rmsnorm import rmsnorm_ref
    gen = torch.Generator(device=DEV).manual_seed(T + 3)
    n = 4
    nout = n if head else (2 + n) * n
    x = torch.randn(T, n, d, generator=gen, device=DEV).to(dtype)
    fn = torch.randn(nout, n * d, generator=gen, device=DEV) * (n * d) ** -0.5
    scale = torch.rand(1 if head else 3, generator=gen, device=DEV) + 0.5
    base = torch.randn(nout, generator=gen, device=DEV)
    w = torch.rand(d, generator=gen, device=DEV) + 0.5
    args = (x, fn, scale, base, 1e-6, 1e-6, 0 if head else 20)
    cfg = norm_cfg(T, d)
    y0, p0, c0 = hc_pre_triton(*args, head=head, pre_cfg=cfg)
    yn, pn, cn = hc_pre_triton(*args, head=head, pre_cfg=cfg, norm=(w, 1e-6))
    # the two kernels may sum the mix's split partials in another order (their layouts
    # follow their register use): post and comb agree to fp32 rounding
    torch.testing.assert_close(pn, p0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cn, c0, rtol=1e-6, atol=1e-6)
    # y = sum_j pre_j X_j can cancel, and the fused kernel may contract its products into
    # FMAs otherwise: a tolerance on the terms (as in test_hc_pre_matches_reference) times the
    # norm's scale; and a bf16 y or output may round to the neighbouring value (2 ulps)
    r = torch.rsqrt(y0.float().square().mean(-1, keepdim=True) + 1e-6)
    terms = (x.float().abs() * 2).sum(1) * r * w
    want = rmsnorm_ref(y0, w, 1e-6).float()
    err = (yn.float() - want).abs()
    assert (err <= want.abs() * 2.0 ** -6 + terms * 1e-5).all(), "off the unfused ops"
    assert (err <= want.abs() * (0 if dtype == torch.bfloat16 else 1e-6)).float().mean() > 0.99
    # the dispatch against the reference ops
    if head:
        yd, yr = hc_head(*args[:6], norm=(w, 1e-6)), hc_head_ref(*args[:6])
    else:
        yd, yr = hc_pre(*args, norm=(w, 1e-6))[0], hc_pre_ref(*args)[0]
    ref = rmsnorm_ref(yr, w, 1e-6).float()
    bad = ((yd.float() - ref).abs() > terms * 1e-5 + ref.abs() * 2.0 ** -6).sum().item()
    assert bad == 0, f"{bad} elements of norm(y) off the reference"


def _hc_step_inputs(T, d, kind, gen, n=4):
    x = torch.randn(T, n, d, generator=gen, device=DEV).bfloat16()
    f = {"none": None, "tensor": torch.randn(T, d, generator=gen, device=DEV).bfloat16(),
         "partials": torch.randn(4, T, d, generator=gen, device=DEV),  # wo_b's split K
         "slots": torch.randn(2, T, 7, d, generator=gen, device=DEV)}[kind]  # the MoE's rows
    post = torch.rand(T, n, generator=gen, device=DEV) * 2
    comb = torch.rand(T, n, n, generator=gen, device=DEV)
    fn = torch.randn((2 + n) * n, n * d, generator=gen, device=DEV) * (n * d) ** -0.5
    scale = torch.rand(3, generator=gen, device=DEV) + 0.5
    base = torch.randn((2 + n) * n, generator=gen, device=DEV)
    w = torch.rand(d, generator=gen, device=DEV) + 0.5
    return x, None if f is None else (f, post, comb), (fn, scale, base), w


@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("kind", ["none", "tensor", "partials", "slots"])
@pytest.mark.parametrize("T,d", [(1, 4096), (2, 7168), (5, 4096), (8, 4096), (4, 7168)])
def test_hc_fused_matches_the_separate_kernels(T, d, kind, head):
    """The one-launch mHC of decode batches (`mhc_fused.py`, up to MAX_TOKENS tokens): X'
    as the post kernels form it (bit for bit where they sum f's rows in the same order),
    y through the RMSNorm, post and comb as the reference ops of that X' give them."""
    from dsv4.kernels.mhc import hc_head_ref, hc_post_ref, hc_post_triton, hc_pre_ref
    from dsv4.kernels.mhc_fused import hc_fused
    from dsv4.kernels.rmsnorm import rmsnorm_ref
    gen = torch.Generator(device=DEV).manual_seed(T * 7 + d)
    x, pa, (fn, scale, base), w = _hc_step_inputs(T, d, kind, gen)
    n = x.shape[1]
    if head:
        fn, scale, base = fn[:n], scale[:1], base[:n]
    xo, y, post, comb = hc_fused(x, fn, scale, base, 1e-6, 1e-6, 20, pa, head, (w, 1e-6))
    if pa is None:
        assert xo is x
    elif kind == "partials":  # the 2-D post kernel sums the 4 partials as a tree
        assert_within_one_bf16_ulp(xo, hc_post_ref(x, *pa))
    else:
        assert torch.equal(xo, hc_post_triton(x, *pa))
    if head:
        yr = hc_head_ref(xo, fn, scale, base, 1e-6, 1e-6)
        assert post.numel() == 0 and comb.numel() == 0
    else:
        yr, postr, combr = hc_pre_ref(xo, fn, scale, base, 1e-6, 1e-6, 20)
        torch.testing.assert_close(post, postr, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(comb, combr, atol=1e-5, rtol=1e-5)
    ref = rmsnorm_ref(yr, w, 1e-6).float()
    r = torch.rsqrt(yr.float().square().mean(-1, keepdim=True) + 1e-6)
    terms = (xo.float().abs() * 2).sum(1) * r * w
    bad = ((y.float() - ref).abs() > terms * 1e-5 + ref.abs() * 2.0 ** -6).sum().item()
    assert bad == 0, f"{bad} elements of norm(y) off the reference"


def test_hc_fused_in_a_cuda_graph_and_the_model_dispatch():
    """The counters put themselves back: a captured launch replayed over new inputs gives the
    eager results, and `hc_post_pre` takes the one launch up to MAX_CTAS channel CTAs (and the
    separate kernels past it, with the same results to fp32 rounding)."""
    from dsv4.kernels import mhc, mhc_fused
    gen = torch.Generator(device=DEV).manual_seed(5)
    x, pa, prm, w = _hc_step_inputs(4, 4096, "slots", gen)
    want = mhc_fused.hc_fused(x, *prm, 1e-6, 1e-6, 20, pa, False, (w, 1e-6))
    xs, fs = x.clone(), pa[0].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        got = mhc_fused.hc_fused(xs, *prm, 1e-6, 1e-6, 20, (fs, *pa[1:]), False, (w, 1e-6))
    assert got is not None
    for _ in range(2):
        xs.copy_(torch.randn(xs.shape, generator=gen, device=DEV))
        fs.copy_(torch.randn(fs.shape, generator=gen, device=DEV))
        g.replay()
        torch.cuda.synchronize()
        eager = mhc_fused.hc_fused(xs, *prm, 1e-6, 1e-6, 20, (fs, *pa[1:]), False, (w, 1e-6))
        assert all(torch.equal(a, b) for a, b in zip(got, eager))
    assert not all(torch.equal(a, b) for a, b in zip(got, want))
    last = mhc_fused.MAX_CTAS // (4096 // mhc_fused.BC)  # the most tokens at d = 4096
    for T in (last, last + 1):
        x, pa, prm, w = _hc_step_inputs(T, 4096, "partials", gen)
        calls = []
        real = mhc_fused._hc_fused_kernel
        try:
            mhc_fused._hc_fused_kernel = type("Spy", (), {"__getitem__": lambda _, grid: (
                calls.append(grid), real[grid])[1]})()
            xo, y, post, comb = mhc.hc_post_pre(x, pa, *prm, 1e-6, 1e-6, 20, (w, 1e-6))
        finally:
            mhc_fused._hc_fused_kernel = real
        assert len(calls) == (T <= last)
        xo2 = mhc.hc_post_triton(x, *pa)
        y2, post2, comb2 = mhc.hc_pre_triton(xo2, *prm, 1e-6, 1e-6, 20)
        assert_within_one_bf16_ulp(xo, xo2)
        torch.testing.assert_close(post, post2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(comb, comb2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("S,J", [(0, 1), (1, 1), (3, 1), (1, 7), (2, 7), (4, 9)])
@pytest.mark.parametrize("T,d", [(1, 4096), (300, 7168)])
def test_hc_post_matches_reference(T, d, S, J):
    """f as a tensor (S = 0), as wo_b's split-K partials [S, T, d], or as the MoE's slot rows
    [S, T, J, d] (Flash / Pro: k + 1 = 7 / 9 slots), summed by the kernel."""
    from dsv4.kernels.mhc import hc_post, hc_post_ref
    from dsv4.kernels.moe import sum_slots
    gen = torch.Generator(device=DEV).manual_seed(T + 1)
    n = 4
    x = torch.randn(T, n, d, generator=gen, device=DEV).bfloat16()
    f = torch.randn(T, d, generator=gen, device=DEV).bfloat16()
    if S:
        f = torch.randn(S, T, J, d, generator=gen, device=DEV) if J > 1 else \
            torch.randn(S, T, d, generator=gen, device=DEV)
        f = f.bfloat16() if S == 1 else f
    post = torch.rand(T, n, generator=gen, device=DEV) * 2
    comb = torch.rand(T, n, n, generator=gen, device=DEV)
    got = hc_post(x, f, post, comb)
    assert_within_one_bf16_ulp(got, hc_post_ref(x, f, post, comb))
    if S:  # the same as summing first (sum_splits' rounding), then the plain update
        plain = f[0] if S == 1 else f.sum(0).to(x.dtype)  # sum_splits' fp32 sum, one rounding
        if J > 1:  # the combine's: each slot rounded, the slots summed in fp32, rounded
            plain = plain.float().sum(1).to(x.dtype)
            if S <= 2:  # sum_slots adds the same fp32 terms in the same order
                assert torch.equal(plain, sum_slots(f, x.dtype))
        assert_within_one_bf16_ulp(got, hc_post(x, plain, post, comb))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("S,T,N,rope,fp8w", [
    (1, 1, 512, True, 448),     # the kv row, one decode token, unsplit linear
    (4, 1, 512, True, 448),     # the kv row of a split-K decode product
    (3, 37, 512, True, 448),    # ragged
    (1, 300, 512, True, 448),   # prefill (cuBLAS path: one part)
    (2, 5, 1024, False, 0),     # Flash q latent
    (6, 3, 1536, False, 0),     # Pro q latent
    (1, 4099, 1024, False, 0),  # prefill q latent
])
def test_rmsnorm_split_matches_reference(S, T, N, rope, fp8w, dtype):
    """The partials' sum, RMSNorm, RoPE and the FP8 rounding in one kernel against the torch
    composition: one rounding step apart at most, where fp32 noise (the split sum's order,
    rsqrt, cos / sin) tips a rounding; then by an FP8 step in the rounded channels."""
    from dsv4.config import ModelConfig
    from dsv4.kernels.rmsnorm import rmsnorm_split, rmsnorm_split_ref
    from dsv4.model.rope import rope_frequencies
    gen = torch.Generator(device=DEV).manual_seed(S * T + N)
    parts = torch.randn(S, T, N, generator=gen, device=DEV) * 3
    if S == 1:
        parts = parts.to(dtype)
    w = torch.rand(N, generator=gen, device=DEV) + 0.5
    pos = torch.randint(0, 131072, (T,), generator=gen, device=DEV)
    rp = (pos, rope_frequencies(ModelConfig.preset("flash"), 4), 64) if rope else None
    got = rmsnorm_split(parts, w, 1e-6, dtype, rp, fp8w).float()
    want = rmsnorm_split_ref(parts, w, 1e-6, dtype, rp, fp8w).float()
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -21
    diff = (got - want).abs()
    tipped = diff > want.abs() * ulp * 1.01 + 2e-5
    assert (diff[..., fp8w:] <= want[..., fp8w:].abs() * ulp * 1.01 + 2e-5).all(), diff.max()
    assert (diff <= want.abs() * 2.0 ** -3 + 2e-5).all()
    assert tipped.float().mean().item() < 0.01


def test_kv_row_in_one_kernel_equals_the_separate_ops():
    """The model's kv row and q latent: an FP8 linear's split-K partials through
    `rmsnorm_split` give the separate kernels' result (sum, RMSNorm, RoPE, FP8 rounding)
    bit for bit, or a rounding step apart where the sum's order differs."""
    from dsv4.config import ModelConfig
    from dsv4.kernels.qat import fp8_round_
    from dsv4.kernels.rmsnorm import rmsnorm, rmsnorm_split
    from dsv4.kernels.rope import rope_
    from dsv4.model.rope import rope_frequencies
    from dsv4.quant.linear import FP8Linear
    gen = torch.Generator(device=DEV).manual_seed(3)
    freqs = rope_frequencies(ModelConfig.preset("flash"), 4)
    for T in (1, 3, 64, 300):
        for n_out in (512, 1024):
            lin = FP8Linear(4096, n_out).to(DEV)
            lin.set_float(torch.randn(n_out, 4096, generator=gen, device=DEV) / 64)
            u = torch.randn(T, 4096, generator=gen, device=DEV).bfloat16()
            w = torch.rand(n_out, generator=gen, device=DEV) + 0.5
            pos = torch.randint(0, 131072, (T,), generator=gen, device=DEV)
            parts = lin.split_k(u)
            assert parts.dim() == 3 and parts.shape[1:] == (T, n_out)
            if n_out == 512:
                got = rmsnorm_split(parts, w, 1e-6, u.dtype, (pos, freqs, 64), 448)
                want = fp8_round_(rope_(rmsnorm(lin(u), w, 1e-6), pos, freqs, 64), 448)
            else:
                got, want = rmsnorm_split(parts, w, 1e-6, u.dtype), rmsnorm(lin(u), w, 1e-6)
            same = (got == want).float().mean().item()
            assert same > 0.99, f"T={T} N={n_out}: {same:.4f} of the elements equal"
            assert ((got.float() - want.float()).abs() <= want.float().abs() * 2.0 ** -3 + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("S,T,nq", [(16, 1, 1024), (16, 4, 1024), (3, 5, 1536), (1, 16, 1024)])
def test_rmsnorm_split_pair_matches_two_launches(S, T, nq, dtype):
    """The kv row (RoPE, FP8 rounding) and the q latent in one launch: each what its own
    `rmsnorm_split` launch gives, up to a rounding step where the fp32 sums' order differs
    (the pair runs on the larger launch's warps), and within the reference's tolerance."""
    from dsv4.config import ModelConfig
    from dsv4.kernels.rmsnorm import rmsnorm_split, rmsnorm_split_pair, rmsnorm_split_ref
    from dsv4.model.rope import rope_frequencies
    gen = torch.Generator(device=DEV).manual_seed(S * T + nq)
    pos = torch.randint(0, 131072, (T,), generator=gen, device=DEV)
    rp = (pos, rope_frequencies(ModelConfig.preset("flash"), 4), 64)
    a = (torch.randn(S, T, 512, generator=gen, device=DEV) * 3,
         torch.rand(512, generator=gen, device=DEV) + 0.5, 1e-6, rp, 448)
    b = (torch.randn(S, T, nq, generator=gen, device=DEV) * 3,
         torch.rand(nq, generator=gen, device=DEV) + 0.5, 1e-6, None, 0)
    got = rmsnorm_split_pair(a, b, dtype)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -21
    for g, (p, w, eps, rope, fp8w) in zip(got, (a, b)):
        one = rmsnorm_split(p, w, eps, dtype, rope, fp8w).float()
        want = rmsnorm_split_ref(p, w, eps, dtype, rope, fp8w).float()
        g = g.float()
        assert ((g - one).abs() <= one.abs() * ulp * 1.01 + 2e-5).float().mean().item() > 0.99
        assert ((g - want).abs() <= want.abs() * 2.0 ** -3 + 2e-5).all()
        assert ((g - want).abs()[..., fp8w:] <= want.abs()[..., fp8w:] * ulp * 1.01 + 2e-5).all()


# ------------------------------------------------------------------------------------ RMSNorm
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 4096), (5, 7168), (1, 512), (2, 3, 1536), (4, 128)])
def test_rmsnorm_matches_reference(shape, dtype):
    from dsv4.kernels.rmsnorm import rmsnorm, rmsnorm_ref
    gen = torch.Generator(device=DEV).manual_seed(6)
    x = torch.randn(shape, generator=gen, device=DEV).to(dtype)
    w = torch.randn(shape[-1], generator=gen, device=DEV)
    out, ref = rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6)
    if dtype == torch.bfloat16:
        assert_within_one_bf16_ulp(out, ref)
    else:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,norm,inverse", [
    ((1, 64, 512), True, False),      # Flash q, one decode token
    ((37, 128, 512), True, False),    # Pro q, ragged prefill
    ((300, 512), False, False),       # kv rows / compressed rows
    ((37, 64, 512), False, True),     # inverse RoPE of the attention output
    ((5, 64, 128), False, False),     # indexer q
    ((3, 64), False, False),          # rope dims only
    ((4, 3, 512), True, True),        # a head count that leaves a partial head block
    ((4099, 64, 512), True, False),   # Flash q, prefill: one warp a CTA
    ((4099, 64, 512), False, True),   # inverse RoPE, prefill
], ids=["q-flash", "q-pro", "kv", "o-inverse", "indexer-q", "rope-only", "odd-heads",
        "q-prefill", "o-prefill"])
def test_rope_matches_reference(shape, norm, inverse, dtype):
    """In-place RoPE (and the per-head q normalisation) against the torch composition: the
    same fp32 formula and the same working-dtype roundings, so at most one rounding step apart
    (cos/sin and rsqrt implementations can differ in the last fp32 bit)."""
    from dsv4.config import ModelConfig
    from dsv4.kernels.rope import rope_, rope_ref_
    from dsv4.model.rope import rope_frequencies
    gen = torch.Generator(device=DEV).manual_seed(shape[0])
    freqs = rope_frequencies(ModelConfig.preset("flash"), 4)
    x = (torch.randn(*shape, generator=gen, device=DEV) * 3).to(dtype)
    pos = torch.randint(0, 131072, (shape[0],), generator=gen, device=DEV)
    pos[0] = 0
    eps = 1e-6 if norm else None
    got = rope_(x.clone(), pos, freqs, 64, inverse, eps)
    want = rope_ref_(x.clone(), pos, freqs, 64, inverse, eps)
    diff = (got.float() - want.float()).abs()
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -22
    # one rounding step of the result, or fp32 noise of the rotation where it cancels
    assert (diff <= ulp * want.float().abs() * 1.01 + 2e-5).all(), diff.max()
    if dtype == torch.bfloat16:  # a rounding step apart only where fp32 noise crosses a tie
        assert (diff > 0).float().mean().item() < 0.05
    if not norm:  # channels before the rope dims are untouched
        assert torch.equal(got[..., :shape[-1] - 64], x[..., :shape[-1] - 64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,width", [((1, 512), 448), ((300, 512), 448), ((5, 3, 128), 64)])
def test_fp8_round_is_bit_exact(shape, width, dtype):
    from dsv4.kernels.qat import fp8_round_, fp8_round_ref_
    gen = torch.Generator(device=DEV).manual_seed(shape[0])
    x = (torch.randn(*shape, generator=gen, device=DEV) * 5).to(dtype)
    x[0, ..., :64] = 0                    # an all-zero block (scale from the 1e-4 floor)
    x.view(-1, shape[-1])[-1, 64:128] *= 1e-6
    assert torch.equal(fp8_round_(x.clone(), width), fp8_round_ref_(x.clone(), width))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("qat", [True, False])
@pytest.mark.parametrize("shape", [(1, 64, 128), (37, 64, 128), (300, 128), (1025, 64, 128)])
def test_hadamard_fp4_matches_reference(shape, qat, dtype):
    """Same formulas; the fp32 Hadamard sums in another order, which can move a value across a
    rounding boundary: rare, and then by one rounding step."""
    from dsv4.kernels.qat import hadamard_fp4, hadamard_fp4_ref
    gen = torch.Generator(device=DEV).manual_seed(shape[0])
    x = (torch.randn(*shape, generator=gen, device=DEV) * 3).to(dtype)
    got, want = hadamard_fp4(x, qat), hadamard_fp4_ref(x, qat)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert rel_err(got, want) < (2e-2 if qat else 1e-5 if dtype == torch.float32 else 5e-3)
    if qat or dtype == torch.bfloat16:
        assert (got != want).float().mean().item() < 0.01


@pytest.mark.parametrize("qat", [True, False])
@pytest.mark.parametrize("S,T,heads", [(1, 1, 64), (4, 1, 64), (4, 8, 64), (4, 9, 64),
                                       (2, 37, 64), (1, 300, 64), (1, 1, 8), (2, 37, 24),
                                       (3, 5, 24)])
def test_rope_hadamard_fp4_matches_reference(S, T, heads, qat):
    """The indexer's queries in one launch (Flash: 64 heads x 128, RoPE on the last 64) from
    wq_b's split-K partials (S = 1: the bf16 product; 300 tokens: the 64-row tiles) against
    the sum, RoPE and Hadamard references, and against the three GPU kernels it replaces;
    8 and 24 heads (tensor parallel ranks): programs whose rows are not one token's; up to
    512 rows (8 tokens of 64 heads, 5 of 24) the decode launch (8-row programs, H's signs
    loaded), past it the larger tiles.
    Only summation orders differ: rare values one rounding step apart."""
    from dsv4.kernels.qat import hadamard_fp4, rope_hadamard_fp4, rope_hadamard_fp4_ref
    from dsv4.kernels.quant_linear import sum_parts
    from dsv4.kernels.rope import rope_
    gen = torch.Generator(device=DEV).manual_seed(S * 1000 + T)
    parts = torch.randn(S, T, heads * 128, generator=gen, device=DEV) * 2
    parts = parts.bfloat16() if S == 1 else parts
    pos = torch.randint(0, 131072, (T,), generator=gen, device=DEV)
    freqs = torch.rand(32, generator=gen, device=DEV)
    kept = parts.clone()
    got = rope_hadamard_fp4(parts, heads, pos, freqs, 64, qat, torch.bfloat16)
    assert torch.equal(parts, kept)
    for want in (rope_hadamard_fp4_ref(parts, heads, pos, freqs, 64, qat, torch.bfloat16),
                 hadamard_fp4(rope_(sum_parts(parts, torch.bfloat16).clone().view(T, heads, 128),
                                    pos, freqs, 64), qat)):
        assert got.shape == want.shape == (T, heads, 128) and got.dtype == torch.bfloat16
        assert rel_err(got, want) < (2e-2 if qat else 5e-3)
        assert (got != want).float().mean().item() < 0.01
