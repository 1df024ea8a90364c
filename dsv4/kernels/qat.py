"""The model's QAT roundings as single kernels (SPEC.md 5.2 and 6).

- `fp8_round_(x, width)`: x[..., :width] <- FP8 e4m3 round trip with a power-of-two scale per
  64 channels, in place (the no-rope dims of every key/value row).
- `hadamard_fp4(x, qat)`: the indexer's rotation x @ H_C * C^-0.5 in fp32, rounded to x's dtype,
  then (with `qat`) the FP4 e2m1 round trip with a power-of-two scale per 32 (indexer queries
  and keys).
- `rope_hadamard_fp4(parts, heads, pos, freqs, rope_dim, qat, dtype)`: the indexer's queries
  from its `wq_b`'s split-K partials: their sum rounded to `dtype` (`sum_parts`), RoPE on the
  last `rope_dim` channels of each head (`rope_`), then `hadamard_fp4`; on the GPU one launch
  instead of three (the partials' sum, the RoPE, the rotation).

References: `dsv4.quant.sim` (fp8_sim, fp4_sim, hadamard), a few dozen small torch ops per call.
GPU: one Triton launch per call with the same fp32 formulas (IEEE division for the scales,
round-to-nearest-even e4m3 conversion, the e2m1 thresholds of `e2m1_round`); only the
Hadamard product's summation order differs from torch's matmul.
"""
from __future__ import annotations

import torch

from ..quant.sim import fp4_sim, fp8_sim, hadamard, hadamard_matrix
from . import HAS_TRITON, use_triton
from .pdl import pdl
from .quant_linear import sum_parts
from .rope import rope_, rope_ref_

FP8_BLOCK, FP4_BLOCK = 64, 32


def fp8_round_ref_(x: torch.Tensor, width: int) -> torch.Tensor:
    x[..., :width] = fp8_sim(x[..., :width], FP8_BLOCK)
    return x


def fp8_round_(x: torch.Tensor, width: int) -> torch.Tensor:
    """In place on the first `width` channels (a multiple of 64); returns x."""
    if width % FP8_BLOCK or not 0 < width <= x.shape[-1]:
        raise ValueError(f"fp8_round_: width {width} is not a multiple of {FP8_BLOCK} within "
                         f"rows of {x.shape[-1]}")
    if use_triton(x) and x.is_contiguous() and x.numel():
        d = x.shape[-1]
        rows = x.numel() // d
        nb = triton.next_power_of_2(width // FP8_BLOCK)
        br = max(1, min(64, 64 // nb))
        _fp8_round_kernel[(triton.cdiv(rows, br),)](x, rows, d, width // FP8_BLOCK, BR=br,
                                                     NB=nb, num_warps=4, **pdl())
        return x
    return fp8_round_ref_(x, width)


def hadamard_fp4_ref(x: torch.Tensor, qat: bool) -> torch.Tensor:
    y = hadamard(x.float()).to(x.dtype)
    return fp4_sim(y, FP4_BLOCK) if qat else y


def hadamard_fp4(x: torch.Tensor, qat: bool) -> torch.Tensor:
    """x [..., C] (C a power of two, >= 32) -> same shape and dtype."""
    c = x.shape[-1]
    if use_triton(x) and x.numel() and c >= 32 and c & (c - 1) == 0 and c <= 256:
        x2 = x.contiguous()
        rows = x2.numel() // c
        out = torch.empty_like(x2)
        h = hadamard_matrix(c, torch.float32, x.device)
        # the MMA path (bf16) takes the larger tile for prefill-sized calls; up to 64 tokens
        # of 64 heads, 16 rows a CTA (H200, CUDA-graph loop: 64 / 512 rows 3.0 us against 7.4
        # for 64-row tiles, whose CTAs each build H's signs and round 4x the rows)
        br = 64 if x.dtype == torch.bfloat16 and rows > 4096 else 16
        _hadamard_fp4_kernel[(triton.cdiv(rows, br),)](x2, h, out, rows, C=c, QAT=qat, BR=br,
                                                        num_warps=4, **pdl())
        return out
    return hadamard_fp4_ref(x, qat)


def rope_hadamard_fp4_ref(parts: torch.Tensor, heads: int, pos: torch.Tensor,
                          freqs: torch.Tensor, rope_dim: int, qat: bool,
                          dtype: torch.dtype) -> torch.Tensor:
    q = _summed(parts, dtype)
    q = rope_ref_(q.view(q.shape[0], heads, -1), pos, freqs, rope_dim)
    return hadamard_fp4_ref(q, qat)


DECODE_ROWS = 512  # (token, head) rows of a decode batch: `rope_hadamard_fp4`'s small launch
_SIGNS: dict = {}


def _signs(c: int, device) -> torch.Tensor:
    """Sylvester's H_c without its scale, bf16 [c, c] of +-1 (what `_hadamard_signs` makes)."""
    key = (c, str(device))
    if key not in _SIGNS:
        h = hadamard_matrix(c, torch.float64, "cpu") * c ** 0.5
        _SIGNS[key] = h.round().to(device=device, dtype=torch.bfloat16)
    return _SIGNS[key]


def _summed(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`sum_parts`, never a view of the partials (the RoPE after it works in place)."""
    q = sum_parts(parts, dtype)
    return q.clone() if q.data_ptr() == parts.data_ptr() else q


def rope_hadamard_fp4(parts: torch.Tensor, heads: int, pos: torch.Tensor, freqs: torch.Tensor,
                      rope_dim: int, qat: bool, dtype: torch.dtype) -> torch.Tensor:
    """parts [S, T, heads * C] (`Linear.split_k`; S = 1: the product itself) -> [T, heads, C]
    in `dtype` (module docstring)."""
    if parts.dim() != 3 or parts.shape[2] % heads:
        raise ValueError(f"rope_hadamard_fp4: partials {tuple(parts.shape)} are not "
                         f"[S, T, {heads} heads x C]")
    S, T, N = parts.shape
    c = N // heads
    if (pos.shape != (T,) or rope_dim % 2 or not 0 < rope_dim <= c
            or freqs.numel() != rope_dim // 2):
        raise ValueError(f"rope_hadamard_fp4: {tuple(pos.shape)} positions, rope_dim {rope_dim} "
                         f"and {freqs.numel()} frequencies do not fit [{T}, {heads}, {c}]")
    if (use_triton(parts) and dtype == torch.bfloat16 and T and 32 <= c <= 256
            and c & (c - 1) == 0):
        rows = T * heads
        out = torch.empty(T, heads, c, dtype=dtype, device=parts.device)
        # decode batches (up to DECODE_ROWS rows): 8-row programs of one warp that load H's
        # signs (H200, 64 heads, 4 partials: 9.5 -> 5.9 us at one token; the 16-row programs
        # of 4 warps spent ~10 us on the partials' sum and the FP4 rounding alone, their
        # layouts converted through shared memory; `scratch`-style A/B, thirty-sixth session).
        # Larger: as hadamard_fp4's bf16 tiles
        small = rows <= DECODE_ROWS
        br = 8 if small else 64 if rows > 4096 and S == 1 else 16
        h = hadamard_matrix(c, torch.float32, parts.device)
        _rope_hadamard_fp4_kernel[(triton.cdiv(rows, br),)](
            parts.contiguous(), pos, freqs.to(device=parts.device, dtype=torch.float32),
            h, _signs(c, parts.device) if small else h, out, S, rows, heads, C=c,
            ROPE=rope_dim, QAT=qat, BR=br, SP=triton.next_power_of_2(S),
            ONE_TOKEN=heads % br == 0, SIGNS=small, num_warps=1 if small else 4, **pdl())
        return out
    q = _summed(parts, dtype)
    return hadamard_fp4(rope_(q.view(T, heads, c), pos, freqs, rope_dim), qat)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start
    from .quant_linear import _pow2ceil
    from .rope import cos_sin, turn

    @triton.jit
    def _fp8_sim(x):
        """fp32 [R, B, 64] -> the e4m3 round trip with a power-of-two scale per 64-block
        (SPEC.md 5.2), fp32."""
        amax = tl.maximum(tl.max(tl.abs(x), 2), 1e-4)
        s, inv = _pow2ceil(tl.math.div_rn(amax, 448.0))
        q = tl.minimum(tl.maximum(x * inv[:, :, None], -448.0), 448.0).to(tl.float8e4nv)
        return q.to(tl.float32) * s[:, :, None]

    @triton.jit
    def _fp4_sim(y, BR: tl.constexpr, C: tl.constexpr):
        """fp32 [BR, C] -> the e2m1 round trip with a power-of-two scale per 32 (SPEC.md 6,
        `e2m1_round`'s thresholds), fp32."""
        yb = tl.reshape(y, (BR, C // 32, 32))
        amax = tl.maximum(tl.max(tl.abs(yb), 2), 6.0 * 1.1754943508222875e-38)
        s, inv = _pow2ceil(tl.math.div_rn(amax, 6.0))
        v = tl.minimum(tl.maximum(yb * inv[:, :, None], -6.0), 6.0)
        a = tl.abs(v)
        code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
                + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32)
                + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
        e = tl.where(code <= 4, code.to(tl.float32) * 0.5,
                     tl.where(code == 5, 3.0, tl.where(code == 6, 4.0, 6.0)))
        e = tl.where(v < 0, -e, e)
        return tl.reshape(e * s[:, :, None], (BR, C))

    @triton.jit
    def _hadamard_rows(x_ptr, h_ptr, rows, ok, C: tl.constexpr, BR: tl.constexpr):
        """fp32 [BR, C] = rows of x (C wide, read from memory) @ H. bf16 rows: one bf16 MMA
        with the signs of H (Sylvester's: (-1)^popcount(i & j), made here), whose products
        are exact and summed in fp32, then H's scale C^-0.5 (h[0, 0], as the reference's
        fp32 matrix holds it). fp32 rows: FMA dots over H in 32-deep slices (which keep H's
        registers small)."""
        c = tl.arange(0, C)
        if x_ptr.dtype.element_ty == tl.bfloat16:
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * C + c[None, :], mask=ok[:, None],
                        other=0.0)
            return tl.dot(x, _hadamard_signs(C)) * tl.load(h_ptr)
        kc = tl.arange(0, 32)
        y = tl.zeros((BR, C), dtype=tl.float32)
        for k0 in tl.static_range(0, C, 32):
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * C + k0 + kc[None, :],
                        mask=ok[:, None], other=0.0).to(tl.float32)
            h = tl.load(h_ptr + (k0 + kc[:, None]) * C + c[None, :])
            y = tl.dot(x, h, y, input_precision="ieee")
        return y

    @triton.jit
    def _hadamard_signs(C: tl.constexpr):
        """Sylvester's H_C without its scale: (-1)^popcount(i & j), bf16 [C, C]."""
        c = tl.arange(0, C)
        v = c[:, None] & c[None, :]
        v = v ^ (v >> 16)
        v = v ^ (v >> 8)
        v = v ^ (v >> 4)
        v = v ^ (v >> 2)
        v = v ^ (v >> 1)
        return tl.where((v & 1) == 0, 1.0, -1.0).to(tl.bfloat16)

    @triton.jit(do_not_specialize=["S", "R", "HEADS"])
    def _rope_hadamard_fp4_kernel(p_ptr, pos_ptr, f_ptr, h_ptr, sg_ptr, out_ptr, S, R, HEADS,
                                  C: tl.constexpr, ROPE: tl.constexpr, QAT: tl.constexpr,
                                  BR: tl.constexpr, SP: tl.constexpr, ONE_TOKEN: tl.constexpr,
                                  SIGNS: tl.constexpr = False, PDL: tl.constexpr = False):
        """BR rows (token, head) of `rope_hadamard_fp4`: the S partials' fp32 sum rounded to
        out's dtype, RoPE on the last ROPE channels (fp32, rounded), the bf16 MMA with H's
        signs (`_hadamard_rows`; SIGNS: loaded from sg_ptr [C, C] instead of made), rounded,
        and the FP4 round trip with QAT."""
        pdl_start(PDL)
        dt = out_ptr.dtype.element_ty
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        ok = rows < R
        c = tl.arange(0, C)
        sp = tl.arange(0, SP)  # every partial's load in flight at once
        x = tl.load(p_ptr + (sp[:, None, None] * R + rows[None, :, None]).to(tl.int64) * C
                    + c[None, None, :], mask=(sp < S)[:, None, None] & ok[None, :, None],
                    other=0.0).to(tl.float32)
        x = tl.sum(x, 0).to(dt).to(tl.float32)  # the linear's output
        e, o = tl.split(tl.reshape(x, (BR, C // 2, 2)))  # pairs (2i, 2i+1)
        j = tl.arange(0, C // 2)
        fi = j - (C - ROPE) // 2
        rot = fi >= 0
        f = tl.load(f_ptr + fi, mask=rot, other=0.0)
        if ONE_TOKEN:  # the program's rows are one token's heads: cos and sin once
            p0 = tl.load(pos_ptr + (tl.program_id(0) * BR) // HEADS).to(tl.float32)
            cs, sn = cos_sin(p0 * f, rot)
            cs, sn = cs[None, :], sn[None, :]
        else:
            pos = tl.load(pos_ptr + rows // HEADS, mask=ok, other=0).to(tl.float32)
            cs, sn = cos_sin(pos[:, None] * f[None, :], rot[None, :])
        x = tl.reshape(tl.join(*turn(e, o, cs, sn)), (BR, C)).to(tl.bfloat16)
        if SIGNS:
            sg = tl.load(sg_ptr + c[:, None] * C + c[None, :])
        else:
            sg = _hadamard_signs(C)
        y = (tl.dot(x, sg) * tl.load(h_ptr)).to(dt).to(tl.float32)
        if QAT:
            y = _fp4_sim(y, BR, C)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * C + c[None, :], y.to(dt),
                 mask=ok[:, None])

    @triton.jit(do_not_specialize=["R"])
    def _fp8_round_kernel(x_ptr, R, D, nb, BR: tl.constexpr, NB: tl.constexpr,
                          PDL: tl.constexpr = False):
        pdl_start(PDL)
        dt = x_ptr.dtype.element_ty
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        b = tl.arange(0, NB)
        j = tl.arange(0, 64)
        m = (rows < R)[:, None, None] & (b < nb)[None, :, None] & (j < 64)[None, None, :]
        ptr = (x_ptr + rows[:, None, None].to(tl.int64) * D + b[None, :, None] * 64
               + j[None, None, :])
        x = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
        tl.store(ptr, _fp8_sim(x).to(dt), mask=m)

    @triton.jit(do_not_specialize=["R"])
    def _hadamard_fp4_kernel(x_ptr, h_ptr, out_ptr, R, C: tl.constexpr, QAT: tl.constexpr,
                             BR: tl.constexpr, PDL: tl.constexpr = False):
        pdl_start(PDL)
        dt = x_ptr.dtype.element_ty
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        ok = rows < R
        y = _hadamard_rows(x_ptr, h_ptr, rows, ok, C, BR).to(dt).to(tl.float32)
        if QAT:
            y = _fp4_sim(y, BR, C)
        c = tl.arange(0, C)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * C + c[None, :], y.to(dt),
                 mask=ok[:, None])
