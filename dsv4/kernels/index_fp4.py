"""Packed FP4 layout of the indexer keys (SPEC.md 6).

With QAT on, the model stores each indexer key `[C]` (C=128) already rounded to e2m1 with a
power-of-two scale per 32 (Hadamard + `fp4_sim`), so a key packs losslessly into
`index_fp4_row_bytes(C)` bytes, 80 for C=128 instead of 256 in bf16:

    [0, C/2)            e2m1 codes, two a byte, in 4-byte words (below)
    [C/2, C/2 + C/32)   one e8m0 byte per 32 elements: scale = 2^(byte-127)
    then zero padding   to a multiple of 16 bytes (whole 16-byte loads per row)

The codes are ordered for the GPU kernel (`indexer_wg.py`), whose FP8 tensor-core products take
the keys as the A operand in registers: of a 32-dim scale block b (nb = C/32 blocks), the thread
of a quad with lane index c (0..3) holds dims 4c..4c+3 and 16+4c..16+4c+3. Word (c, b), at bytes
4 (c nb + b) .. + 3, holds those 8 codes in nibble order (nibble 2s the low one of byte s): so a
thread's codes of a row are one contiguous 4 nb bytes (one 16-byte load for C=128), and they
decode in place. `key_dims` / `code_byte_offsets` give the order; the Triton kernels read the
words back into blocks of 16 bytes (`code_byte_offsets`) and take the dims of each block in the
words' order (`key_dims`: the queries are loaded permuted alike, so their dot products are
unchanged).

Packing re-derives each block's scale from its amax, as `quantize_mxfp4` does; for values that
are e2m1 times a power of two, that scale is the original one or a smaller power of two under
which every value is still an e2m1 code, so unpacking gives back exactly the stored values.

`store_index_fp4_(cache, dst, rows)`: pack rows [W, C] and write them to the flat cache rows dst,
one Triton kernel on CUDA (it replaces the scatter an unpacked cache needs), torch elsewhere.
"""
from __future__ import annotations

import functools

import torch

from . import HAS_TRITON, use_triton
from .pdl import pdl
from ..quant.formats import MXFP4_BLOCK, dequant_mxfp4, quantize_mxfp4


def index_fp4_row_bytes(c: int) -> int:
    """Bytes of one packed key (80 for C=128)."""
    if c % MXFP4_BLOCK:
        raise ValueError(f"indexer key width {c} is not a multiple of {MXFP4_BLOCK}")
    return -(-(c // 2 + c // MXFP4_BLOCK) // 16) * 16


def key_dim(n: int) -> int:
    """The dim (within its 32-dim block) of nibble n (0..31) of a block read in word order: word
    n // 8 (the quad lane c) holds dims 4c..4c+3 and then 16+4c..16+4c+3."""
    return 4 * (n // 8) + n % 4 + 16 * (n % 8 // 4)


@functools.lru_cache(maxsize=None)
def key_dims(c: int) -> torch.Tensor:
    """[C]: the dim of each position of a key read block by block in word order (CPU, cached)."""
    n = torch.arange(c)
    return n // 32 * 32 + torch.tensor([key_dim(i) for i in range(32)])[n % 32]


@functools.lru_cache(maxsize=None)
def code_byte_offsets(c: int) -> torch.Tensor:
    """[C/2]: where byte j of the codes read block by block (16 bytes a block, word order) is
    stored: block j // 16, word (j % 16) // 4 of it (its lane c), byte j % 4 of the word."""
    j, nb = torch.arange(c // 2), c // MXFP4_BLOCK
    return 4 * ((j % 16 // 4) * nb + j // 16) + j % 4


def pack_index_fp4(rows: torch.Tensor) -> torch.Tensor:
    """rows [N, C] (e2m1 x power-of-two per 32, any float dtype) -> uint8 [N, row bytes]."""
    n, c = rows.shape
    out = torch.zeros(n, index_fp4_row_bytes(c), dtype=torch.uint8, device=rows.device)
    codes, scales = quantize_mxfp4(rows.float()[:, key_dims(c).to(rows.device)])
    out[:, code_byte_offsets(c).to(rows.device)] = codes.view(torch.uint8)
    out[:, c // 2:c // 2 + c // MXFP4_BLOCK] = scales.view(torch.uint8)
    return out


def unpack_index_fp4(packed: torch.Tensor, c: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [N, row bytes] -> keys [N, C] in `dtype` (exact for bf16 and fp32)."""
    if packed.shape[-1] != index_fp4_row_bytes(c):
        raise ValueError(f"packed keys have {packed.shape[-1]} bytes, expected "
                         f"{index_fp4_row_bytes(c)} for C={c}")
    codes = packed[:, code_byte_offsets(c).to(packed.device)]
    scales = packed[:, c // 2:c // 2 + c // MXFP4_BLOCK].contiguous().view(torch.float8_e8m0fnu)
    vals = dequant_mxfp4(codes, scales).to(dtype)
    out = torch.empty_like(vals)
    out[:, key_dims(c).to(packed.device)] = vals
    return out


def store_index_fp4_(cache: torch.Tensor, dst: torch.Tensor, rows: torch.Tensor) -> None:
    """cache [Nk, row bytes] uint8; writes pack_index_fp4(rows) at cache rows dst."""
    w, c = rows.shape
    if cache.shape[-1] != index_fp4_row_bytes(c) or dst.shape != (w,):
        raise ValueError(f"packed key cache {tuple(cache.shape)}, dst {tuple(dst.shape)} and rows "
                         f"{tuple(rows.shape)} do not fit")
    if w == 0:
        return
    if use_triton(rows) and c & (c - 1) == 0 and cache.is_contiguous():
        _store_kernel[(triton.cdiv(w, 16),)](rows.contiguous(), dst.contiguous(), cache, w,
                                             cache.stride(0), C=c, BR=16, num_warps=4, **pdl())
    else:
        cache[dst] = pack_index_fp4(rows)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start

    @triton.jit
    def _key_dims(i):
        """`key_dims` in a kernel: the dim at position i of a key read in word order."""
        n = i % 32
        return i - n + 4 * (n // 8) + n % 4 + 16 * (n % 8 // 4)

    @triton.jit
    def _code_byte_offsets(j, NB: tl.constexpr):
        """`code_byte_offsets` in a kernel (NB scale blocks a key)."""
        return 4 * ((j % 16 // 4) * NB + j // 16) + j % 4

    @triton.jit(do_not_specialize=["W"])
    def _store_kernel(rows_ptr, dst_ptr, cache_ptr, W, row_bytes, C: tl.constexpr,
                      BR: tl.constexpr, PDL: tl.constexpr = False):
        """BR rows: per 32-block, scale = 2^ceil(log2(max(amax, 6 * 2^-126) / 6)) from the fp32
        exponent bits (as `pow2ceil`), e2m1 codes by the same thresholds as `e2m1_codes`
        (values already on the grid), two codes a byte in word order, then the e8m0 scale bytes."""
        pdl_start(PDL)
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        ok = r < W
        x = tl.load(rows_ptr + r[:, None].to(tl.int64) * C + _key_dims(tl.arange(0, C))[None, :],
                    mask=ok[:, None], other=0.0).to(tl.float32)  # the dims in word order
        xb = tl.reshape(x, (BR, C // 32, 32))
        amax = tl.maximum(tl.max(tl.abs(xb), 2), 6.0 * 1.1754943508222875e-38)
        v = tl.math.div_rn(amax, 6.0)
        bits = v.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)  # biased ceil exponent
        inv = ((254 - e) << 23).to(tl.float32, bitcast=True)  # 2^-(e-127), exact
        a = tl.abs(xb * inv[:, :, None])
        code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
                + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
                + (a > 5.0).to(tl.int32))
        code = code | (((xb < 0) & (code > 0)).to(tl.int32) << 3)  # -0 packs as +0
        lo, hi = tl.split(tl.reshape(code, (BR, C // 2, 2)))
        byte = (lo | (hi << 4)).to(tl.uint8)
        d = tl.load(dst_ptr + r, mask=ok, other=0).to(tl.int64)
        base = cache_ptr + d * row_bytes
        tl.store(base[:, None] + _code_byte_offsets(tl.arange(0, C // 2), C // 32)[None, :], byte,
                 mask=ok[:, None])
        tl.store(base[:, None] + C // 2 + tl.arange(0, C // 32)[None, :], e.to(tl.uint8),
                 mask=ok[:, None])
