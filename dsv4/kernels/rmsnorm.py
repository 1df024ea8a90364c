"""RMSNorm: x.float() * rsqrt(mean(x^2) + eps) * weight, cast back to x's dtype.

The Triton kernel normalises one row a CTA in a single pass (rows up to 16384 wide fit).

`rmsnorm_split(parts, weight, eps, dtype, rope=, fp8_width=)` normalises the output of a
split-K linear (`Linear.split_k`): x = the fp32 sum of the partials rounded to `dtype` (what the
linear itself returns), then RMSNorm; optionally RoPE on the last channels (`rope_`) and the FP8
QAT rounding of the first (`fp8_round_`), each rounded to `dtype` as the separate ops are. The
attention's q latent and kv row (SPEC.md 5.2) in one launch where a decode step took four or
five (sum, norm, rope, rounding).
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, use_triton
from .pdl import pdl
from .qat import fp8_round_ref_
from .quant_linear import sum_parts
from .rope import rope_ref_

MAX_TRITON_WIDTH = 16384


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rmsnorm_split_ref(parts: torch.Tensor, weight: torch.Tensor, eps: float,
                      dtype: torch.dtype, rope=None, fp8_width: int = 0) -> torch.Tensor:
    y = rmsnorm_ref(sum_parts(parts, dtype), weight, eps)
    if rope is not None:
        pos, freqs, rope_dim = rope
        rope_ref_(y, pos, freqs, rope_dim)
    if fp8_width:
        fp8_round_ref_(y, fp8_width)
    return y


def _split_warps(block: int, s: int) -> int:
    """A warp per 256 channels, and enough that the [S, N] partials stay within 128 values a
    thread: Pro's kv row (32 partials of 512, 2 warps) spilled (255 registers, ptxas -v of an
    offline sm_90 compile); 16 x 512 and 16 x 1024 / 2048 fit in ~145 registers."""
    sp = triton.next_power_of_2(s)
    return min(16, max(1, block // 256, sp * block // 4096))


def rmsnorm_split(parts: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype,
                  rope: tuple | None = None, fp8_width: int = 0) -> torch.Tensor:
    """parts [S, T, N] -> [T, N] in `dtype` (module docstring). rope: (pos [T], freqs [r/2],
    rope_dim r); fp8_width: a multiple of 64 (0: none)."""
    if parts.dim() != 3 or weight.shape != parts.shape[2:]:
        raise ValueError(f"rmsnorm_split: partials {tuple(parts.shape)} and weight "
                         f"{tuple(weight.shape)} do not fit [S, T, N] and [N]")
    S, T, N = parts.shape
    r = rope[2] if rope is not None else 0
    if rope is not None and (rope[0].shape != (T,) or not 0 < r <= N or r % 2
                             or rope[1].numel() != r // 2):
        raise ValueError(f"rmsnorm_split: rope {tuple(rope[0].shape)} positions, {r} channels "
                         f"and {rope[1].numel()} frequencies do not fit [{T}, {N}]")
    if fp8_width % 64 or not 0 <= fp8_width <= N:
        raise ValueError(f"rmsnorm_split: fp8_width {fp8_width} is not a multiple of 64 within {N}")
    if not (use_triton(parts) and N <= MAX_TRITON_WIDTH and (N - r) % 2 == 0):
        return rmsnorm_split_ref(parts, weight, eps, dtype, rope, fp8_width)
    parts = parts.contiguous()
    out = torch.empty(T, N, dtype=dtype, device=parts.device)
    if T:
        block = triton.next_power_of_2(N)
        pos, freqs = (rope[0], rope[1].to(device=parts.device, dtype=torch.float32)) if rope \
            else (parts, parts)
        _rmsnorm_split_kernel[(T,)](parts, weight.contiguous(), out, pos, freqs, S, T, N, eps,
                                    BLOCK=block, SP=triton.next_power_of_2(S), ROPE=r,
                                    FP8=fp8_width, num_warps=_split_warps(block, S), **pdl())
    return out


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start
    from .qat import _fp8_sim
    from .rope import cos_sin, turn

    @triton.jit(do_not_specialize=["S", "T"])
    def _rmsnorm_split_kernel(p_ptr, w_ptr, out_ptr, pos_ptr, f_ptr, S, T, N, eps,
                              BLOCK: tl.constexpr, SP: tl.constexpr, ROPE: tl.constexpr,
                              FP8: tl.constexpr, PDL: tl.constexpr = False):
        """One row: the partials' sum, RMSNorm, then RoPE on the last ROPE channels and the
        FP8 round trip of the first FP8 (0: none), each rounded to out's dtype."""
        pdl_start(PDL)
        dt = out_ptr.dtype.element_ty
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        mask = c < N
        sp = tl.arange(0, SP)  # every partial's load in flight at once (a loop would wait
        # on each in turn: 16 partials of the kv row took 3.7 us)
        x = tl.load(p_ptr + (sp[:, None] * T + row) * N + c[None, :],
                    mask=(sp < S)[:, None] & mask[None, :], other=0.0).to(tl.float32)
        x = tl.sum(x, 0).to(dt).to(tl.float32)  # the linear's output
        r = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
        w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
        y = (x * r * w).to(dt).to(tl.float32)
        if ROPE > 0:  # pairs (2i, 2i+1) of the last ROPE channels turn by pos * f_i
            e, o = tl.split(tl.reshape(y, (BLOCK // 2, 2)))
            j = tl.arange(0, BLOCK // 2)
            fi = j - (N - ROPE) // 2
            rot = (fi >= 0) & (j < N // 2)
            ang = tl.load(pos_ptr + row).to(tl.float32) * tl.load(f_ptr + fi, mask=rot, other=0.0)
            cs, sn = cos_sin(ang, rot)
            y = tl.reshape(tl.join(*turn(e, o, cs, sn)), (BLOCK,))
            y = y.to(dt).to(tl.float32)
        if FP8 > 0:
            q = tl.reshape(_fp8_sim(tl.reshape(y, (1, BLOCK // 64, 64))), (BLOCK,))
            y = tl.where(c < FP8, q.to(dt).to(tl.float32), y)
        tl.store(out_ptr + row * N + c, y.to(dt), mask=mask)

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, N, stride_x, eps, BLOCK: tl.constexpr,
                        PDL: tl.constexpr = False):
        pdl_start(PDL)
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        mask = c < N
        x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
        w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + c, (x * r * w).to(out_ptr.dtype.element_ty), mask=mask)

    def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Launcher: x [..., N] (any float dtype), weight [N] -> x's shape and dtype."""
        N = x.shape[-1]
        if weight.shape != (N,) or N > MAX_TRITON_WIDTH:
            raise ValueError(f"x [..., {N}] and weight {tuple(weight.shape)} do not fit "
                             f"(width at most {MAX_TRITON_WIDTH})")
        x2 = x.reshape(-1, N)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        if x2.shape[0]:
            block = triton.next_power_of_2(N)
            _rmsnorm_kernel[(x2.shape[0],)](x2, weight.contiguous(), out, N, x2.stride(0), eps,
                                            BLOCK=block, num_warps=min(16, max(1, block // 256)),
                                            **pdl())
        return out.view(x.shape)


def rmsnorm(x, weight, eps):
    if use_triton(x) and x.shape[-1] <= MAX_TRITON_WIDTH:
        return rmsnorm_triton(x, weight, eps)
    return rmsnorm_ref(x, weight, eps)
