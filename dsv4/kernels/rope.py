"""RoPE on the last `rope_dim` channels of each row, in place, optionally after the per-head
q normalisation (SPEC.md 5.1 and 5.3).

`rope_(x, pos, freqs, rope_dim, inverse=False, norm_eps=None)`: x [T, ..., D]; token t's rows
x[t, ...] are rotated by pos[t]. Pairs (x[2i], x[2i+1]) of the rope channels turn by pos * f_i
(by -pos * f_i when inverse), computed in fp32 and rounded once to x's dtype. With `norm_eps`
each row is first scaled by rsqrt(mean(x^2) + eps) with the reference's working-dtype
rounding after every op (square, mean, + eps, rsqrt, product: bf16 ops in the reference).

Reference: the torch composition (`rope_ref_`), a dozen small ops per call. GPU: one Triton
kernel per call; without the normalisation it reads and writes only the rope channels.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, use_triton
from .pdl import pdl


def apply_rope(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor,
               inverse: bool = False) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [T, ..., r] by angle pos*f_i (by -pos*f_i if inverse)."""
    ang = pos.float()[:, None] * freqs.to(x.device)[None, :]  # [T, r/2]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (ang.shape[-1],)
    cos, sin = ang.cos().view(shape), ang.sin().view(shape)
    if inverse:
        sin = -sin
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)
    return out.to(x.dtype)


def rope_ref_(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, rope_dim: int,
              inverse: bool = False, norm_eps: float | None = None) -> torch.Tensor:
    if norm_eps is not None:
        x.copy_(x * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps))
    n = x.shape[-1] - rope_dim
    x[..., n:] = apply_rope(x[..., n:], pos, freqs, inverse)
    return x


def rope_(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, rope_dim: int,
          inverse: bool = False, norm_eps: float | None = None) -> torch.Tensor:
    """In place; returns x. See the module docstring."""
    if pos.shape[0] != x.shape[0]:
        raise ValueError(f"rope: {pos.shape[0]} positions for {x.shape[0]} tokens")
    if not 0 < rope_dim <= x.shape[-1] or rope_dim % 2 or freqs.numel() != rope_dim // 2:
        raise ValueError(f"rope: rope_dim {rope_dim} with {freqs.numel()} frequencies does not fit "
                         f"rows of {x.shape[-1]}")
    if use_triton(x) and x.is_contiguous() and x.numel() and (x.shape[-1] - rope_dim) % 2 == 0:
        return _rope_cuda(x, pos, freqs, rope_dim, inverse, norm_eps)
    return rope_ref_(x, pos, freqs, rope_dim, inverse, norm_eps)


def _rope_cuda(x, pos, freqs, rope_dim, inverse, norm_eps):
    d = x.shape[-1]
    heads = x.numel() // d // x.shape[0]
    norm = norm_eps is not None
    bp = triton.next_power_of_2(d // 2 if norm else rope_dim // 2)
    # rows a CTA: 512 pairs (whole rows, normalised) or 256 (rope pairs only), one warp,
    # unless a decode step's handful of tokens would then make too few CTAs; H200, 8192 x 64
    # heads: 280 us (3.8 TB/s) for q and 49 us for o against 619 and 275 with 4096 pairs
    # and 4 warps (scratch sweep, 2026-11-29)
    spread = triton.next_power_of_2(triton.cdiv(heads * x.shape[0], 128))
    bh = max(1, min(triton.next_power_of_2(heads), (512 if norm else 256) // bp, spread))
    programs = x.shape[0] * triton.cdiv(heads, bh)
    warps = 1 if programs >= 4096 else max(1, min(4, bh * bp // 128))
    _rope_kernel[(x.shape[0], triton.cdiv(heads, bh))](
        x, pos, freqs.to(device=x.device, dtype=torch.float32), heads,
        float(norm_eps or 0.0), D=d, NOPE=d - rope_dim, NORM=norm, INV=inverse, BH=bh, BP=bp,
        num_warps=warps, **pdl())
    return x


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start

    @triton.jit
    def cos_sin(ang, rot):
        """cos and sin of the angles where rot, else 1 and 0 (pairs that do not turn)."""
        return tl.where(rot, tl.cos(ang), 1.0), tl.where(rot, tl.sin(ang), 0.0)

    @triton.jit
    def turn(e, o, cs, sn):
        """Pairs (e, o) turned by the angles of cs, sn: (e cos - o sin, e sin + o cos), fp32."""
        return e * cs - o * sn, e * sn + o * cs

    @triton.jit
    def _rope_kernel(x_ptr, pos_ptr, f_ptr, heads, eps, D: tl.constexpr, NOPE: tl.constexpr,
                     NORM: tl.constexpr, INV: tl.constexpr, BH: tl.constexpr, BP: tl.constexpr,
                     PDL: tl.constexpr = False):
        """One token, BH of its rows (heads); pairs j of each row (all D/2 with NORM, else the
        rope pairs only). The angles depend on the token alone: cos and sin once per program."""
        pdl_start(PDL)
        dt = x_ptr.dtype.element_ty
        t = tl.program_id(0)
        h = tl.program_id(1) * BH + tl.arange(0, BH)
        ok = h < heads
        if NORM:
            j = tl.arange(0, BP)
        else:
            j = NOPE // 2 + tl.arange(0, BP)
        fi = j - NOPE // 2
        rot = (fi >= 0) & (j < D // 2)
        ang = tl.load(pos_ptr + t).to(tl.float32) * tl.load(f_ptr + fi, mask=rot, other=0.0)
        c, s = cos_sin(ang, rot)
        c, s = c[None, :], s[None, :]
        if INV:
            s = -s
        m = ok[:, None] & (j < D // 2)[None, :]
        rows = t.to(tl.int64) * heads + h
        ptr = x_ptr + rows[:, None, None] * D + 2 * j[None, :, None] + tl.arange(0, 2)[None, None, :]
        m3 = m[:, :, None] & (tl.arange(0, 2) < 2)[None, None, :]
        e, o = tl.split(tl.load(ptr, mask=m3, other=0.0).to(tl.float32))
        if NORM:  # the reference's working-dtype ops: square, mean, + eps, rsqrt, product
            ss = tl.sum((e * e).to(dt).to(tl.float32) + (o * o).to(dt).to(tl.float32), 1)
            ms = (ss / D).to(dt).to(tl.float32)
            r = tl.math.div_rn(1.0, tl.math.sqrt_rn((ms + eps).to(dt).to(tl.float32)))
            r = r.to(dt).to(tl.float32)
            e = (e * r[:, None]).to(dt).to(tl.float32)
            o = (o * r[:, None]).to(dt).to(tl.float32)
        e, o = turn(e, o, c, s)
        tl.store(ptr, tl.join(e, o).to(dt), mask=m3)
