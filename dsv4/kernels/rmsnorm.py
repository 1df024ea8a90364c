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


def _check_split(parts, weight, rope, fp8_width) -> None:
    if parts.dim() != 3 or weight.shape != parts.shape[2:]:
        raise ValueError(f"rmsnorm_split: partials {tuple(parts.shape)} and weight "
                         f"{tuple(weight.shape)} do not fit [S, T, N] and [N]")
    _, T, N = parts.shape
    r = rope[2] if rope is not None else 0
    if rope is not None and (rope[0].shape != (T,) or not 0 < r <= N or r % 2
                             or rope[1].numel() != r // 2):
        raise ValueError(f"rmsnorm_split: rope {tuple(rope[0].shape)} positions, {r} channels "
                         f"and {rope[1].numel()} frequencies do not fit [{T}, {N}]")
    if fp8_width % 64 or not 0 <= fp8_width <= N:
        raise ValueError(f"rmsnorm_split: fp8_width {fp8_width} is not a multiple of 64 within {N}")


def _triton_ok(parts, rope) -> bool:
    r = rope[2] if rope is not None else 0
    return use_triton(parts) and parts.shape[2] <= MAX_TRITON_WIDTH and (parts.shape[2] - r) % 2 == 0


def _row_args(parts, weight, rope):
    """The kernel arguments of one norm: partials, weight, positions, frequencies, S, N."""
    pos, freqs = (rope[0], rope[1].to(device=parts.device, dtype=torch.float32)) if rope \
        else (parts, parts)
    return parts.contiguous(), weight.contiguous(), pos, freqs, parts.shape[0], parts.shape[2]


def rmsnorm_split(parts: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype,
                  rope: tuple | None = None, fp8_width: int = 0) -> torch.Tensor:
    """parts [S, T, N] -> [T, N] in `dtype` (module docstring). rope: (pos [T], freqs [r/2],
    rope_dim r); fp8_width: a multiple of 64 (0: none)."""
    _check_split(parts, weight, rope, fp8_width)
    if not _triton_ok(parts, rope):
        return rmsnorm_split_ref(parts, weight, eps, dtype, rope, fp8_width)
    S, T, N = parts.shape
    out = torch.empty(T, N, dtype=dtype, device=parts.device)
    if T:
        p, w, pos, freqs, _, _ = _row_args(parts, weight, rope)
        block = triton.next_power_of_2(N)
        _rmsnorm_split_kernel[(T,)](p, w, out, pos, freqs, S, T, N, eps,
                                    BLOCK=block, SP=triton.next_power_of_2(S),
                                    ROPE=rope[2] if rope else 0, FP8=fp8_width,
                                    num_warps=_split_warps(block, S), **pdl())
    return out


def rmsnorm_split_pair(a: tuple, b: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm_split(*a, dtype, ...), rmsnorm_split(*b, dtype, ...)) in one launch: a and b
    are (parts [S, T, N], weight, eps, rope, fp8_width) of the same T (the attention's kv row
    and q latent: one kernel fewer a layer). Each row is computed as `rmsnorm_split` computes
    it, on the larger of the two launches' warp counts (the fp32 sums may take another order:
    equal to the reference within its rounding, not always bit for bit to the single launch)."""
    for p, w, _, rope, f8 in (a, b):
        _check_split(p, w, rope, f8)
    if (a[0].shape[1] != b[0].shape[1] or not (_triton_ok(a[0], a[3]) and _triton_ok(b[0], b[3]))
            or a[0].device != b[0].device):
        return (rmsnorm_split(*a[:2], a[2], dtype, a[3], a[4]),
                rmsnorm_split(*b[:2], b[2], dtype, b[3], b[4]))
    T = a[0].shape[1]
    outs = [torch.empty(T, x[0].shape[2], dtype=dtype, device=x[0].device) for x in (a, b)]
    if T:
        pa, pb = _row_args(a[0], a[1], a[3]), _row_args(b[0], b[1], b[3])
        blocks = [triton.next_power_of_2(x[5]) for x in (pa, pb)]
        warps = max(_split_warps(blocks[0], pa[4]), _split_warps(blocks[1], pb[4]))
        _rmsnorm_split_pair_kernel[(T, 2)](
            *pa[:4], outs[0], pa[4], pa[5], a[2], *pb[:4], outs[1], pb[4], pb[5], b[2], T,
            BLOCK_A=blocks[0], SP_A=triton.next_power_of_2(pa[4]), ROPE_A=a[3][2] if a[3] else 0,
            FP8_A=a[4], BLOCK_B=blocks[1], SP_B=triton.next_power_of_2(pb[4]),
            ROPE_B=b[3][2] if b[3] else 0, FP8_B=b[4], num_warps=warps, **pdl())
    return outs[0], outs[1]


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
        pdl_start(PDL)
        _split_row(p_ptr, w_ptr, out_ptr, pos_ptr, f_ptr, S, T, N, eps,
                   tl.program_id(0).to(tl.int64), BLOCK, SP, ROPE, FP8)

    @triton.jit(do_not_specialize=["S_A", "S_B", "T"])
    def _rmsnorm_split_pair_kernel(pa_ptr, wa_ptr, pos_a, fa_ptr, out_a, S_A, N_A, eps_a,
                                   pb_ptr, wb_ptr, pos_b, fb_ptr, out_b, S_B, N_B, eps_b, T,
                                   BLOCK_A: tl.constexpr, SP_A: tl.constexpr,
                                   ROPE_A: tl.constexpr, FP8_A: tl.constexpr,
                                   BLOCK_B: tl.constexpr, SP_B: tl.constexpr,
                                   ROPE_B: tl.constexpr, FP8_B: tl.constexpr,
                                   PDL: tl.constexpr = False):
        """Two `_rmsnorm_split_kernel` launches in one: grid (T, 2), norm a then norm b."""
        pdl_start(PDL)
        row = tl.program_id(0).to(tl.int64)
        if tl.program_id(1) == 0:
            _split_row(pa_ptr, wa_ptr, out_a, pos_a, fa_ptr, S_A, T, N_A, eps_a, row, BLOCK_A,
                       SP_A, ROPE_A, FP8_A)
        else:
            _split_row(pb_ptr, wb_ptr, out_b, pos_b, fb_ptr, S_B, T, N_B, eps_b, row, BLOCK_B,
                       SP_B, ROPE_B, FP8_B)

    @triton.jit
    def _split_row(p_ptr, w_ptr, out_ptr, pos_ptr, f_ptr, S, T, N, eps, row,
                   BLOCK: tl.constexpr, SP: tl.constexpr, ROPE: tl.constexpr,
                   FP8: tl.constexpr):
        """One row: the partials' sum, RMSNorm, then RoPE on the last ROPE channels and the
        FP8 round trip of the first FP8 (0: none), each rounded to out's dtype."""
        dt = out_ptr.dtype.element_ty
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
