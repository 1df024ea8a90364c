"""Prefill-sized MoE through bf16 grouped GEMMs (`torch._grouped_mm`, CUTLASS on sm_90).

The fused Triton kernels of `moe.py` decode the FP4 experts inside the GEMM, which holds large
batches near 230 TFLOP/s on an H200 (FP8 experts too: the decode's layout, not its arithmetic,
is what limits them). CUTLASS's bf16 grouped GEMM runs those GEMMs at ~600 TFLOP/s, at the
price of a dequantised copy of the layer's experts per call. Each call here:

1. dequantises every expert of the layer, the shared one included (plan expert 0), into bf16
   buffers `w13 [E+1, 2I, d]` and `w2 [E+1, d, I]` (`_dequant_kernel`). MXFP4 codes times
   their e8m0 scales and e4m3 codes times their e8m0 block scales are bf16 values, so these
   are the experts' exact weights (NVFP4's e4m3 scales times a global fp32 scale are not:
   NVFP4 experts stay on the fused kernels). An FP8 shared expert (the official checkpoints')
   is left out of the plan, the copies and the grouped GEMMs: it runs apart on cuBLAS's
   block-scaled FP8 GEMM (`_shared_fp8`, 1.5-1.6x the bf16 GEMM's rate on an H200), and the
   combine reads its rows from there;
2. builds the routing plan of `moe.py` with 16-row blocks, and copies each slot's FP8
   activation values (`act_quant_values`: exact in bf16) to its padded position, so every
   expert's rows are one contiguous group (`offs` = the groups' ends, from the plan's slot
   counts on the device: no host synchronisation);
3. `g|v = grouped_mm(x, w13)` in bf16 (fp32 accumulation; the output rounded to bf16, as the
   reference rounds each linear's output), then `moe._swiglu_kernel` (clamped SwiGLU, routing
   weight, h as the exact bf16 values of its FP8 quantisation), `y = grouped_mm(h, w2)`;
4. sums a token's slots with `moe._combine_kernel`, which reads each slot's row at its
   padded position.

When it pays: the copy is written and read once per call (Flash: 12.9 GB a layer, 4.1 ms on
an H200) and needs memory for its larger half (w1|w3: 8.6 GB for Flash; w2 reuses it), one
buffer per device kept from the first such call on (`workspace`).
Measured (`bench_linear_moe.py --only moe --grouped-mm --moe-tokens 2048 8192 16384`), fused
against grouped: Flash 2048 / 8192 / 16384 tokens 4.2 / 12.8 / 22.5 ms against 8.5 / 9.9 /
15.4 ms; Pro 8192 / 16384 tokens 34.9 / 60.0 ms against 35.7 / 47.0 ms. The saving grows with
the routed slots per expert and the copy's cost does not, so the break-even is a slot count:
~130 slots per expert (Pro 8192 tokens: 128) with bf16 copies; with the e4m3 copies (below)
between 48 and 96 (H200, fused against grouped on e4m3 copies, `scratch/s27k.py`: Flash 2048 /
4096 / 6144 tokens 4.16 / 8.2 / 11.8 ms against 4.98 / 6.05 / 7.38 ms, Pro 4096 / 8192 21.9 /
34.5 against 21.2-21.5 / 28.7 ms). By default calls with at least `MIN_SLOTS_PER_EXPERT` (72)
slots per expert come here (Flash from 3072 tokens a step, Pro from 4608): prefill chunks;
MXFP4 experts that need no copy (below) from `FP4_MIN_SLOTS` (32: Flash 1366, Pro 2048).
`DSV4_MOE_GROUPED_MM=n` sets a token threshold instead (0: never). If the copy does not fit
in free memory, the first failure logs a warning and the fused kernels serve every later call.

Calls of up to `FP8_MAX_SLOTS` (256) routed slots per expert (Flash and Pro prefill steps of
8192 tokens) copy the experts to e4m3 instead (`to_fp8`: a scale per row and 128 columns, the
MXFP4 block's four per-32 scales folded into it) and run `grouped_fp8_gemm` on the
activations' FP8 codes: half the copy's bytes (Flash 2.6 against 4.1 ms a layer) at about the
bf16 GEMM's rate, exact unless a layer's MXFP4 scales spread beyond 2^11 within 128 columns
(a layer's first call reads a flag back; such a layer stays on bf16, with a warning). That
first call also finds whether each row's scales fold into the row's largest (within 2^11 of it
across all the row's columns): then the copies take one scale per row, which the FP8 GEMM
applies once after its K loop (~1.45x its block-scaled rate), and every size runs on them.
Otherwise (and for FP8 experts) larger calls keep the bf16 copies, where CUTLASS's GEMM is the
larger part and faster at Pro's shapes. `DSV4_MOE_FP8_GEMM=1` / `0` forces either copy.
Up to `FP4_MAX_SLOTS` (128) slots per expert (Flash 5461 tokens a step, Pro 8192) MXFP4 experts
skip the copy: `grouped_mxfp4_gemm` decodes each K-block of their weights to the same folded
e4m3 codes in the kernel, once a layer's first call (on the copy) has found it exact.
`DSV4_MOE_FP4_GEMM=1` / `0` forces it on / off.
"""
from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch

from . import HAS_TRITON
from .pdl import pdl
from .grouped_fp8_gemm import _tile_map, grouped_fp8_gemm
from .moe_plan import route_plan
from .quant_linear import (FMT_FP8, FMT_MXFP4, _act_quant_cuda, _fp32_scales,
                           _scaled_mm_blockwise, act_quant_values)

logger = logging.getLogger(__name__)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # runs no inline PTX

# plan block rows: each expert's group is padded to a multiple of this, and the grouped GEMMs
# compute the padding too (128-row blocks would add ~28% to the FLOPs at 8192 Flash tokens)
BT = 16


# average routed slots per expert from which a call takes this path (module docstring); with
# expert parallelism, of all ranks' experts (a rank's experts see t * k / all of them each)
MIN_SLOTS_PER_EXPERT = 72
# the same for calls whose MXFP4 experts can be decoded in place (`in_place_ready`: no copy).
# H200, one MoE layer (`bench_linear_moe.py --only moe --grouped-variants`, twenty-ninth
# session), fused kernels -> in place: Flash 1024 tokens (24 slots an expert) 2.40 -> 2.72 ms,
# 1536 (36) 3.96 -> 2.83, 2048 (48) 4.19 -> 2.92; Pro 1024 (16) 9.23 -> 9.31, 1536 (24) 8.73
# -> 9.54, 2048 (32) 11.8 -> 9.71, 3072 (48) 15.4 -> 10.1
FP4_MIN_SLOTS = 32
# routed slots per expert up to which a call on block scales runs on e4m3 copies of the experts
# and the grouped FP8 GEMM (`fp8_gemm_for`; on row scales: any). H200 (`scratch/s27i.py`,
# layer A/B in one process, bf16 copies -> e4m3 copies on block scales): Flash 8192 tokens
# (192 slots an expert) 9454 -> 8265 us, Pro 8192 (128) 34.9 -> 29.7 ms, Flash 32768 (768)
# 23.9 -> 23.3 ms, Pro 32768 (512) 65.7 -> 73.3 ms (the FP8 GEMM's launches were tuned at
# Flash's shapes)
FP8_MAX_SLOTS = 256
# routed slots per expert up to which MXFP4 experts skip the e4m3 copy: `grouped_mxfp4_gemm`
# decodes them where they lie (`fp4_gemm_for`). H200, one process (`bench_linear_moe.py --only
# moe --grouped-variants`, twenty-ninth session), e4m3 copies -> in place: Flash 4096 tokens
# (96 slots an expert) 6.11 -> 5.12 ms, 8192 (192) 8.21 -> 8.71, 16384 13.2 -> 15.8; Pro 4096
# (64) 21.5 -> 13.8, 8192 (128) 28.5 -> 23.9, 16384 (256) 44.5 -> 41.0, 32768 71.5 -> 76.3
FP4_MAX_SLOTS = 128
# set after a call ran out of memory: the fused kernels serve the rest of the process
_OUT_OF_MEMORY = [False]
# set after cuBLAS's block-scaled FP8 GEMM failed: the shared expert joins the grouped GEMMs
_CUBLAS_FAILED = [False]
# device -> the bf16 buffer the experts are dequantised into (`workspace`)
_WORKSPACE: dict[torch.device, torch.Tensor] = {}


def grouped_mm_min_tokens() -> int | None:
    """`DSV4_MOE_GROUPED_MM`: the smallest MoE call that takes this path, in tokens (0: none);
    None when unset (the slots-per-expert default)."""
    env = os.environ.get("DSV4_MOE_GROUPED_MM", "")
    if env == "":
        return None
    try:
        return max(0, int(env))
    except ValueError:
        raise ValueError("DSV4_MOE_GROUPED_MM must be a whole number of tokens (0: off)") from None


def takes(t: int, k: int, n_routed: int, main=None, extra=None) -> bool:
    """Whether a call of t tokens, top-k of n_routed experts (all ranks'), takes this path:
    from MIN_SLOTS_PER_EXPERT routed slots per expert, from FP4_MIN_SLOTS when its experts
    (the pointer tables main / extra) can be decoded in place."""
    if _OUT_OF_MEMORY[0]:
        return False
    n = grouped_mm_min_tokens()
    if n is None:
        if t * k >= MIN_SLOTS_PER_EXPERT * n_routed:
            return True  # (decode-sized calls stop at the next test, before any switch is read)
        return t * k >= FP4_MIN_SLOTS * n_routed and in_place_ready(main, extra)
    return n > 0 and t >= n


def in_place_ready(main, extra) -> bool:
    """MXFP4 routed experts the grouped FP8 GEMM may decode in place at small calls: not
    forced off, and not found inexact in e4m3 (unknown until a layer's first call here, which
    copies them to find out). An FP8 shared expert runs apart (CUDA); another format beside
    them would need a copy of its own."""
    if main is None or main.fmt != FMT_MXFP4 or _fp8_env() is False or _fp4_env() is False:
        return False
    return (getattr(main, "fp8_exact", None) is not False
            and (extra is None or (extra.fmt == FMT_FP8 and not _CUBLAS_FAILED[0])))


def policy(n_routed: int, k: int) -> str:
    """The startup log's words for when MoE calls come here."""
    n = grouped_mm_min_tokens()
    by_size = n is None
    if by_size:
        n = -(-MIN_SLOTS_PER_EXPERT * n_routed // k)
    if not n:
        return ""
    fp8_env, fp4_env = _fp8_env(), _fp4_env()
    m = FP8_MAX_SLOTS * n_routed // k + 1 if fp8_env is None else None
    if fp8_env is False or (m is not None and m <= n):
        return f"MXFP4 / FP8 MoE on bf16 copies of the experts and grouped GEMMs from {n} tokens a step"
    words = f"MXFP4 / FP8 MoE on grouped GEMMs from {n} tokens a step: FP8 GEMMs on e4m3 copies"
    if fp4_env is not False:
        first = -(-FP4_MIN_SLOTS * n_routed // k) if by_size else n
        last = (f" up to {FP4_MAX_SLOTS * n_routed // k} tokens" if fp4_env is None
                else " tokens, DSV4_MOE_FP4_GEMM=1")
        words += f" (MXFP4 experts: decoded in place, from {first}{last})"
    return words + (f", bf16 copies from {m} for FP8 experts and MXFP4 layers whose rows do not "
                     "fold into e4m3" if m is not None else "")


def out_of_memory(err: Exception) -> None:
    """A call's dequantised copy did not fit: warn once and leave MoE to the fused kernels."""
    _OUT_OF_MEMORY[0] = True
    logger.warning("MoE grouped GEMM path off for this process: its dequantised experts did "
                   "not fit in free GPU memory (%s); the fused FP4 kernels serve every call. "
                   "Lower gpu_memory_utilization to keep it, or set DSV4_MOE_GROUPED_MM=0.",
                   str(err).split("\n")[0])


def applies(u: torch.Tensor, main, extra) -> bool:
    """Whether a call of these experts can take this path: bf16 working dtype, MXFP4 or FP8
    experts (and shared expert), torch with a grouped GEMM, not under CUDA-graph capture."""
    fmts = {main.fmt} | ({extra.fmt} if extra is not None else set())
    return (u.dtype == torch.bfloat16 and fmts <= {FMT_FP8, FMT_MXFP4}
            and hasattr(torch, "_grouped_mm")
            and not (u.is_cuda and torch.cuda.is_current_stream_capturing()))


def moe_grouped_mm(u, idx, wgt, experts, shared, main, extra,
                   total_experts: int | None = None) -> torch.Tensor:
    """The MoE layer (`moe.moe_forward`'s contract) for a large batch; main / extra: the
    pointer tables of `moe._tables`; total_experts: all ranks' routed experts."""
    from . import moe as km
    t, d = u.shape
    k = idx.shape[1]
    n_routed = len(experts)
    n_exp, k1 = n_routed + 1, k + 1
    n_slots = t * k1
    dev = u.device

    idx = idx.contiguous()
    wgt = wgt.float().contiguous()
    # an FP8 shared expert (the official checkpoints') runs on cuBLAS's block-scaled FP8 GEMM
    # (`_shared_fp8`) and is left out of the plan, the copies and the grouped GEMMs
    y_sh = None
    if shared is not None and shared_apart(u, main, extra):
        try:
            y_sh = _shared_fp8(u, shared, wgt, k1)
        except _SharedFailed as exc:
            _CUBLAS_FAILED[0] = True
            logger.warning("MoE grouped path: cuBLAS block-scaled FP8 GEMM failed for the "
                           "shared expert (%s); it joins the grouped GEMMs from now on", exc)
    sh_apart = y_sh is not None
    in_plan = shared is not None and not sh_apart
    (slots, blk_exp, blk_rows), counts, n_blocks, _, _ = route_plan(idx, t, n_routed, BT,
                                                                    in_plan)
    n_pos = n_blocks * BT
    if counts is None:  # the one-program plan of small batches: count the slots here
        # (entries n_routed: another rank's expert, counted past the end and dropped)
        counts = torch.bincount(idx.reshape(-1).long() + 1, minlength=n_exp + 1)[:n_exp]
        counts = counts.to(torch.int32)
        counts[0] = t if in_plan else 0
    offs = ((counts + BT - 1) // BT * BT).cumsum(0).to(torch.int32)
    pos = torch.arange(n_pos, device=dev)
    pos_ok = (pos % BT) < blk_rows.repeat_interleave(BT)
    src = torch.where(pos_ok, slots // k1, 0)  # each padded position's token
    plan = _Plan(slots, blk_exp, blk_rows, n_blocks, wgt, offs, src)
    y2 = None
    tabs = [tab for tab in (main, extra) if tab is not None]
    per_expert = t * k / (total_experts or n_routed)
    if (fp8_gemm_for(per_expert, row_scales(main, extra, sh_apart))
            and all(getattr(tab, "fp8_exact", True) for tab in tabs)):
        if fp4_gemm_for(per_expert) and _fp4_gemm_applies(main, extra, sh_apart, tabs):
            y2 = _experts_fp4(u, experts, main, extra, plan)
        else:
            y2 = _experts_fp8(u, experts, main, extra, plan, tabs, skip_shared=sh_apart)
    if y2 is None:
        y2 = _experts_bf16(u, experts, main, extra, plan, skip_shared=sh_apart)
    # slot -> its padded position (padding positions all land on the extra last entry); the
    # combine reads each slot's row of y2 there (the shared expert's, when apart, in y_sh)
    at = torch.empty(n_slots + 1, dtype=torch.int64, device=dev)
    at.index_copy_(0, torch.where(pos_ok, slots.long(), n_slots), pos)
    out = torch.empty_like(u)
    km._combine_kernel[(t, triton.cdiv(d, 1024))](y2, out, d, 0, at, idx, n_routed, K1=k1,
                                                  SPLIT=1, ROUND=False, BD=1024, HAS_POS=True,
                                                  HAS_SHARED=shared is not None, sh_ptr=y_sh,
                                                  SH_ROWS=sh_apart, num_warps=4, **pdl())
    return out


def shared_apart(u: torch.Tensor, main, extra) -> bool:
    """Whether this path runs the shared expert apart, on cuBLAS's block-scaled FP8 GEMM: an
    FP8 shared expert on CUDA, unless that GEMM failed before (cuBLAS < 12.9)."""
    return (u.is_cuda and (extra if extra is not None else main).fmt == FMT_FP8
            and not _CUBLAS_FAILED[0])


class _SharedFailed(RuntimeError):
    """cuBLAS's block-scaled GEMM is not available (`_shared_fp8`)."""


def _shared_fp8(u: torch.Tensor, shared, wgt: torch.Tensor, k1: int) -> torch.Tensor:
    """The FP8 shared expert on every token, on cuBLAS's block-scaled FP8 GEMM (1 x 128
    activation scales, the checkpoint's 128 x 128 weight scales): y [>= T, d] in u's dtype.
    The same products as the grouped path's (exact bf16 copies of the codes times their
    scales), summed in another order: H200, Flash 8192 / 32768 tokens, 541 / 2516 us as a bf16
    GEMM against 346 / 1502 us (+ 50 / 166 us of activation quantisation). w1 and w3 run as one
    GEMM on their rows stacked (a 17 MB copy for Flash a call), so that `moe._swiglu_kernel`
    finds g | v in one row as in the grouped path, on a plan of the shared rows alone."""
    from . import moe as km
    t = u.shape[0]
    inter = shared.w1.out_features
    q, s = _act_quant_cuda(u, pad_to=4, scales_t=True)
    w13 = torch.cat([shared.w1.weight, shared.w3.weight])
    # (the weights' fp32 scales are kept on their parameters; a per-call tensor made in
    # inference mode could not be: it has no version counter)
    s13 = torch.cat([_fp32_scales(shared.w1.scale), _fp32_scales(shared.w3.scale)])
    nb = triton.cdiv(t, BT)
    rows = torch.arange(nb * BT, dtype=torch.int32, device=u.device)
    slots = rows * k1  # token p's shared slot (j = 0): routing weight 1
    blk_rows = (t - torch.arange(nb, dtype=torch.int32, device=u.device) * BT).clamp_(max=BT)
    blk_exp = torch.zeros(nb, dtype=torch.int32, device=u.device)
    hq = torch.empty(nb * BT, inter, dtype=torch.float8_e4m3fn, device=u.device)
    hs = torch.empty(nb * BT, inter // 128, dtype=torch.float32, device=u.device)
    limit = float(shared.limit)
    try:
        y13 = _scaled_mm_blockwise(q, s, w13, s13, torch.bfloat16)  # [T4, 2I]: g then v
        km._swiglu_kernel[(inter // 128, nb)](
            y13, slots, blk_exp, blk_rows, wgt, hq, hs, inter, 1, k1, limit, 0, ROUND=True,
            HAS_LIMIT=limit > 0, BT=BT, SPLIT=1, HBF=False, num_warps=4, **pdl())
        t4 = q.shape[0]
        return _scaled_mm_blockwise(hq[:t4], hs[:t4], shared.w2.weight, shared.w2.scale,
                                    u.dtype)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError) as exc:  # cuBLAS < 12.9, say
        raise _SharedFailed(str(exc).splitlines()[0][:200]) from exc


class _Plan(NamedTuple):
    """A call's routing plan (`moe_plan.route_plan`, BT-row blocks) and what the GEMMs take from it:
    the groups' padded ends `offs` and each padded position's token `src`."""
    slots: torch.Tensor
    blk_exp: torch.Tensor
    blk_rows: torch.Tensor
    n_blocks: int
    wgt: torch.Tensor
    offs: torch.Tensor
    src: torch.Tensor


def _swiglu(y13, experts, plan: _Plan) -> torch.Tensor:
    """h [n_pos, I] bf16: clamped SwiGLU of g|v times the routing weight, the exact values of
    its FP8 quantisation (`moe._swiglu_kernel`)."""
    from . import moe as km
    inter = experts[0].w1.out_features
    limit = float(experts[0].limit)
    h = torch.empty(plan.n_blocks * BT, inter, dtype=torch.bfloat16, device=y13.device)
    km._swiglu_kernel[(inter // 128, plan.n_blocks)](
        y13, plan.slots, plan.blk_exp, plan.blk_rows, plan.wgt, h, h.new_empty(0), inter,
        len(experts) + 1, plan.wgt.shape[1] + 1, limit, 0, ROUND=True, HAS_LIMIT=limit > 0,
        BT=BT, SPLIT=1, HBF=True, num_warps=4, **pdl())
    return h


def _experts_bf16(u, experts, main, extra, plan, skip_shared: bool = False) -> torch.Tensor:
    """y2 [n_pos, d]: every padded position through its expert, on bf16 copies of the
    experts and torch's grouped GEMM. `skip_shared`: the plan has no shared-expert rows, so
    its copy is not made (its group is empty: its weights are never read)."""
    d, inter, n_exp = u.shape[1], experts[0].w1.out_features, len(experts) + 1
    offs = plan.offs
    x = act_quant_values(u, plan.src)  # [n_pos, d], gathered
    # one layer's bf16 w1|w3, then its w2: the second dequantised copy reuses the first's memory
    w13 = dequantize(main, extra, ("w1", "w3"), n_exp, inter, d, u.device, into_workspace=True,
                     skip_shared=skip_shared)
    y13 = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)  # [n_pos, 2I]: g then v
    del w13, x
    h = _swiglu(y13, experts, plan)
    del y13
    w2 = dequantize(main, extra, ("w2",), n_exp, d, inter, u.device, into_workspace=True,
                    skip_shared=skip_shared)
    return torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)  # [n_pos, d]


def _forced(name: str, on: str, off: str) -> bool | None:
    """A 1 / 0 / unset switch: forced on, forced off, or None (by the call's size)."""
    env = os.environ.get(name, "")
    if env not in ("", "0", "1"):
        raise ValueError(f"{name} must be 1 ({on}), 0 ({off}) or unset (by the call's size)")
    return None if env == "" else env == "1"


def _fp8_env() -> bool | None:
    """`DSV4_MOE_FP8_GEMM`: 1 / 0 forces the FP8 copies and GEMMs on / off; unset, by size."""
    return _forced("DSV4_MOE_FP8_GEMM", "FP8 grouped GEMMs", "bf16")


def fp8_gemm_for(slots_per_expert: float, rows: bool | None = False) -> bool:
    """Whether a call with this many routed slots per expert (all ranks') runs on e4m3 copies
    of the experts and the grouped FP8 GEMM (`_experts_fp8`). By default: at any size on row
    scales (`rows` True: `row_scales`) or while a layer's MXFP4 experts are unchecked (None:
    its first call finds out); on block scales up to FP8_MAX_SLOTS, where the copy's bytes
    dominate the call, and beyond that on the bf16 copies and CUTLASS's bf16 grouped GEMM,
    faster than the block-scaled FP8 GEMM at Pro's shapes. H200, one MoE layer
    (`bench_linear_moe.py --only moe --grouped-variants`, thirty-first session), bf16 copies ->
    e4m3 copies on row scales: Flash 16384 / 32768 tokens 14.4 -> 12.3 / 26.5 -> 20.5 ms, Pro
    16384 / 32768 45.9 -> 38.8 / 66.2 -> 57.9 ms."""
    env = _fp8_env()
    if env is not None:
        return env
    return rows is not False or slots_per_expert <= FP8_MAX_SLOTS


def _experts_fp8(u, experts, main, extra, plan, tabs, skip_shared: bool = False
                 ) -> torch.Tensor | None:
    """`_experts_bf16` with FP8 GEMMs (`grouped_fp8_gemm`): the activations' FP8 codes and
    scales, and e4m3 copies of the experts with a scale per row and 128 columns (`to_fp8`:
    MXFP4's 4 per-32 scales of a block folded into its largest, exact while they are within
    2^11 of it), or one scale per row where every block of a row folds into the row's largest
    (`row_scales`: the faster GEMM). Half the bytes of the bf16 copy, and the FP8 tensor cores.
    A layer's first call (on block scales) reads back whether its experts were exact either
    way (one host synchronisation a layer); if not even by blocks, that layer stays on the
    bf16 path (None)."""
    d, inter, n_exp = u.shape[1], experts[0].w1.out_features, len(experts) + 1
    offs = plan.offs
    row = row_scales(main, extra, skip_shared) is True
    flag = torch.zeros(1, dtype=torch.int32, device=u.device)
    # (scales of a 128-column block contiguous over the rows, as the GEMM reads them)
    xq, xs = _act_quant_cuda(u, rows=plan.src, scales_t=True)
    w13, s13 = to_fp8(main, extra, ("w1", "w3"), n_exp, inter, d, u.device, flag, skip_shared,
                      row)
    y13 = grouped_fp8_gemm(xq, xs, w13, s13, offs)
    del w13, s13, xq, xs
    h = _swiglu(y13, experts, plan)
    del y13
    hq, hs = _act_quant_cuda(h, scales_t=True)
    del h
    w2, s2 = to_fp8(main, extra, ("w2",), n_exp, d, inter, u.device, flag, skip_shared, row)
    y2 = grouped_fp8_gemm(hq, hs, w2, s2, offs)
    if any(not hasattr(tab, "fp8_exact") for tab in tabs):
        bits = int(flag.item())
        for tab in tabs:
            tab.fp8_exact = not bits & 1
            tab.fp8_row_exact = bits == 0 and tab.fmt == FMT_MXFP4
        if bits & 1:
            logger.warning("MoE FP8 GEMM: a layer's MXFP4 scales differ by more than 2^11 within "
                           "128 columns (not exact in e4m3): that layer runs on bf16 copies")
            return None
    return y2


def row_scales(main, extra, skip_shared: bool) -> bool | None:
    """Whether a call's e4m3 experts take one scale per row (`to_fp8(row=True)`): every expert
    copied is MXFP4 (an FP8 shared expert apart, or none beside them) and the layer's first
    call found that each row's blocks fold into its largest scale exactly (`fp8_row_exact`).
    None: such MXFP4 experts, not yet checked (the first call runs on block scales)."""
    if main.fmt != FMT_MXFP4 or not (extra is None or skip_shared):
        return False
    return getattr(main, "fp8_row_exact", None)


def _fp4_env() -> bool | None:
    """`DSV4_MOE_FP4_GEMM`: 1 / 0 forces the in-place MXFP4 decode on / off; unset, by size."""
    return _forced("DSV4_MOE_FP4_GEMM", "decode MXFP4 in the grouped GEMM", "e4m3 copies")


def fp4_gemm_for(slots_per_expert: float) -> bool:
    """Whether a call on the FP8 GEMMs with this many routed slots per expert decodes its
    MXFP4 experts in place (`_experts_fp4`) rather than copying them to e4m3: by default up to
    FP4_MAX_SLOTS, where the copy's cost outweighs the in-kernel decode's."""
    env = _fp4_env()
    return slots_per_expert <= FP4_MAX_SLOTS if env is None else env


def _fp4_gemm_applies(main, extra, sh_apart: bool, tabs) -> bool:
    """MXFP4 routed experts known to fold exactly into e4m3 (an earlier call's copy found
    them so: `fp8_exact`), and no FP8 shared expert in the plan (apart, or none beside them)."""
    return (main.fmt == FMT_MXFP4 and (extra is None or sh_apart)
            and all(getattr(tab, "fp8_exact", None) is True for tab in tabs))


def _experts_fp4(u, experts, main, extra, plan) -> torch.Tensor:
    """`_experts_fp8` without the e4m3 copies: the grouped FP8 GEMM decodes the MXFP4 weights
    where they lie (`grouped_mxfp4_gemm`: the same folded e4m3 codes and scales as `to_fp8`,
    the same products and sums). Plan expert g is entry g of main's tables when main holds the
    shared expert too (extra None), else entry g - 1 (plan expert 0, the shared one, is apart
    and has no rows)."""
    d, inter = u.shape[1], experts[0].w1.out_features
    g_off = 0 if extra is None else 1
    p = main.ptrs
    row = getattr(main, "fp8_row_exact", None) is True
    xq, xs = _act_quant_cuda(u, rows=plan.src, scales_t=True)
    y13 = grouped_mxfp4_gemm(xq, xs, (p["w1w"], p["w3w"]), (p["w1s"], p["w3s"]), inter,
                             plan.offs, g_off, row=row)
    del xq, xs
    h = _swiglu(y13, experts, plan)
    del y13
    hq, hs = _act_quant_cuda(h, scales_t=True)
    del h
    return grouped_mxfp4_gemm(hq, hs, (p["w2w"],), (p["w2s"],), d, plan.offs, g_off, row=row)


def grouped_mxfp4_gemm(a: torch.Tensor, sa: torch.Tensor, w_tabs, s_tabs, n_half: int,
                       ends: torch.Tensor, g_off: int, bm: int = 64, bn: int = 128,
                       warps: int = 4, stages: int = 3, row: bool = False) -> torch.Tensor:
    """`grouped_fp8_gemm` with MXFP4 weights decoded in the kernel: y [M, len(w_tabs) *
    n_half] bf16, rows ends[g-1] .. ends[g] of a (e4m3 codes, sa their 1 x 128 scales, any
    strides) times the weights of table entry g - g_off of each pointer table in w_tabs
    (weights in the kernels' layout, `FP4Linear.to_kernel_layout`; s_tabs their scales), the
    tables' rows side by side (w1 then w3). Each K-block of a weight row decodes to e4m3 with
    its 4 per-32 scales folded into one (`_mxfp4_e4m3_folded`, as `to_fp8` copies them; `row`:
    every block of a row folded into the row's largest scale, as `to_fp8(row=True)`): exact
    only for weights whose copy was (`fp8_exact`, `fp8_row_exact`), which the caller checks."""
    m, k = a.shape
    n = len(w_tabs) * n_half
    y = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    if m == 0:
        return y
    if n_half % bn or k % 128:
        raise ValueError(f"grouped MXFP4 GEMM: {n_half} rows a table / K {k} do not fit "
                         f"{bn}-row tiles and 128-deep blocks")
    tiles = _tile_map(ends, m, bm)
    w3, s3 = (w_tabs[1], s_tabs[1]) if len(w_tabs) > 1 else (w_tabs[0], s_tabs[0])
    _grouped_mx_kernel[(tiles.shape[1] * (n // bn),)](
        a, sa, w_tabs[0], s_tabs[0], w3, s3, y, tiles, tiles.shape[1], n_half, k, g_off,
        sa.stride(0), sa.stride(1), TWO=len(w_tabs) > 1, BM=bm, BN=bn, ASM=not _INTERPRET,
        ROW=row, num_warps=warps, num_stages=stages)
    return y


def to_fp8(main, extra, names, n_exp: int, rows: int, cols: int, dev, flag: torch.Tensor,
           skip_shared: bool = False, row: bool = False):
    """e4m3 codes [n_exp, len(names) * rows, cols] and fp32 scales [.., cols / 128] (one per
    row and 128 columns; a view of [n_exp, cols / 128, len(names) * rows] storage) of the
    linears `names` of every plan expert, in the workspace; flag[0] gets bit 1 where a block's
    values would not be exact, bit 2 where a row's would not (`_to_fp8_kernel`). `row` (MXFP4
    experts only): scales [n_exp, len(names) * rows], each row's codes folded into its largest
    scale (`grouped_fp8_gemm`'s row scales). `skip_shared`: plan expert 0 is left unwritten."""
    r = len(names) * rows
    n_codes, n_scales = n_exp * r * cols, n_exp * r * (1 if row else cols // 128)
    buf = workspace((n_codes + 4 * n_scales + 1) // 2, dev).view(torch.uint8)
    q = buf[:n_codes].view(torch.float8_e4m3fn).view(n_exp, r, cols)
    sc = buf[n_codes:n_codes + 4 * n_scales].view(torch.float32)
    sc = sc.view(n_exp, r) if row else sc.view(n_exp, cols // 128, r)
    # each MXFP4 row's largest scale byte (the row fold's reference; its exactness is flagged
    # on block scales too); laid out as the row scales, [n_exp, r]
    top = torch.empty(n_exp, r, dtype=torch.int32, device=dev)
    for tab, first, e0 in _parts(main, extra, skip_shared):
        if row and tab.fmt != FMT_MXFP4:
            raise ValueError("to_fp8: row scales are for MXFP4 experts only")
        for j, name in enumerate(names):
            ws, ss = tab.ptrs[name + "w"][first:], tab.ptrs[name + "s"][first:]
            if len(ws):
                if tab.fmt == FMT_MXFP4:
                    _row_top_kernel[(rows // 64, len(ws))](
                        ws, ss, top, cols, e0, r, j * rows,
                        NKB=triton.next_power_of_2(cols // 128), num_warps=4, **pdl())
                _to_fp8_kernel[(rows // 64, cols // 128, len(ws))](
                    ws, ss, q, sc, top, flag, cols, e0, q.stride(0), sc.stride(0), j * rows, r,
                    W_FMT=tab.fmt, ROW=row, ASM=not _INTERPRET, num_warps=4, **pdl())
    return q, (sc if row else sc.transpose(1, 2))


def _parts(main, extra, skip_shared: bool):
    """(table, its first entry, where that entry goes) of the plan experts to copy."""
    if skip_shared:
        return [(main, 1, 1)] if extra is None else [(main, 0, 1)]
    return [(main, 0, 0)] if extra is None else [(extra, 0, 0), (main, 0, 1)]


def workspace(numel: int, dev: torch.device) -> torch.Tensor:
    """A bf16 buffer of at least `numel` elements on `dev`, kept for the next call: every layer
    and call dequantises into the same memory. Allocating and freeing 8.6 GB a layer instead
    fragmented the caching allocator's pool under async scheduling (the engine's batch-64 row:
    prefill 113K -> 26K tok/s, against 93K on the fused kernels)."""
    buf = _WORKSPACE.get(dev)
    if buf is None or buf.numel() < numel:
        _WORKSPACE.pop(dev, None)
        del buf  # the old buffer's memory is free for the new one
        buf = _WORKSPACE[dev] = torch.empty(numel, dtype=torch.bfloat16, device=dev)
    return buf[:numel]


def release_workspace() -> None:
    """Free the dequantisation buffers (benchmarks switching models; tests)."""
    _WORKSPACE.clear()


def dequantize(main, extra, names, n_exp: int, rows: int, cols: int, dev,
               into_workspace: bool = False, skip_shared: bool = False) -> torch.Tensor:
    """bf16 [n_exp, len(names) * rows, cols]: the linears `names` (each [rows, cols]) of every
    plan expert (0 = the shared expert) stacked along the rows, exactly (module docstring); in
    the device's workspace when `into_workspace`. `skip_shared`: plan expert 0 is left
    unwritten."""
    shape = (n_exp, len(names) * rows, cols)
    out = (workspace(n_exp * len(names) * rows * cols, dev).view(shape) if into_workspace
           else torch.empty(shape, dtype=torch.bfloat16, device=dev))
    for tab, first, e0 in _parts(main, extra, skip_shared):
        for j, name in enumerate(names):
            ws, ss = tab.ptrs[name + "w"][first:], tab.ptrs[name + "s"][first:]
            if len(ws):
                _dequant_kernel[(rows // 64, cols // 128, len(ws))](
                    ws, ss, out, cols, e0, out.stride(0), j * rows, W_FMT=tab.fmt,
                    num_warps=4, **pdl())
    return out


def dequantize_experts(main, extra, n_exp: int, d: int, inter: int, dev):
    """bf16 w13 [n_exp, 2I, d] (w1 rows then w3 rows) and w2 [n_exp, d, I] of every plan
    expert."""
    return (dequantize(main, extra, ("w1", "w3"), n_exp, inter, d, dev),
            dequantize(main, extra, ("w2",), n_exp, d, inter, dev))


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .grouped_fp8_gemm import _row_tile
    from .moe import _mxfp4_bf16
    from .pdl import pdl_start
    from .quant_linear import _e8m0_f32

    @triton.jit
    def _mxfp4_block(w_tab, s_tab, wi, tile, kb, K):
        """MXFP4 weight wi of a pointer table, rows tile*64 .. +64, K-block kb, in the kernels'
        layout (64-row groups: per K-block 64 rows x 64 bytes, the rows' 4 scale bytes a word):
        the pointers of its packed bytes [64, 64] and its scale words (int32 [64])."""
        w = tl.multiple_of(tl.load(w_tab + wi).to(tl.pointer_type(tl.uint8)), 16)
        ws = tl.multiple_of(tl.load(s_tab + wi).to(tl.pointer_type(tl.uint8)), 16)
        r = tl.arange(0, 64)
        w_row = w + tile.to(tl.int64) * (32 * K) + r[:, None] * 64 + tl.arange(0, 64)[None, :]
        s_row = (ws + tile.to(tl.int64) * (2 * K) + r * 4).to(tl.pointer_type(tl.int32))
        return w_row + kb * 4096, tl.load(s_row + kb * 64)

    @triton.jit
    def _fp8_block(w_tab, s_tab, wi, tile, kb, K):
        """FP8 weight wi of a pointer table (row-major, 128 x 128 e8m0 scales), rows tile*64 ..
        +64, K-block kb: its e4m3 codes [64, 128] and its block's scale byte (int32)."""
        w = tl.multiple_of(tl.load(w_tab + wi).to(tl.pointer_type(tl.float8e4nv)), 16)
        ws = tl.multiple_of(tl.load(s_tab + wi).to(tl.pointer_type(tl.uint8)), 16)
        rows = tile * 64 + tl.arange(0, 64)
        q = tl.load(w + rows.to(tl.int64)[:, None] * K + kb * 128 + tl.arange(0, 128)[None, :])
        return q, tl.load(ws + (tile // 2) * (K // 128) + kb).to(tl.int32)

    @triton.jit(do_not_specialize=["e0", "row0"])
    def _dequant_kernel(w_tab, s_tab, out_ptr, K, e0, e_stride, row0,
                        W_FMT: tl.constexpr, PDL: tl.constexpr = False):
        """Rows [64 tile] x K-block kb of expert program_id(2) of a pointer table -> exact bf16
        at out[e0 + e, row0 + rows, kb*128:]. MXFP4 in the kernels' layout (64-row groups,
        contiguous K-blocks, `moe._mxfp4_bf16`), FP8 row-major with 128 x 128 e8m0 scales."""
        pdl_start(PDL)
        tile = tl.program_id(0)
        kb = tl.program_id(1)
        wi = tl.program_id(2)
        rows = tile * 64 + tl.arange(0, 64)
        cols = tl.arange(0, 128)
        if W_FMT == 1:
            p, sw = _mxfp4_block(w_tab, s_tab, wi, tile, kb, K)
            wc = _mxfp4_bf16(p, sw, 0, rows >= 0, 128)
        else:
            q, sb = _fp8_block(w_tab, s_tab, wi, tile, kb, K)
            wc = (q.to(tl.float32) * _e8m0_f32(sb)).to(tl.bfloat16)
        dst = out_ptr + (e0 + wi).to(tl.int64) * e_stride \
            + (row0 + rows).to(tl.int64)[:, None] * K + kb * 128 + cols[None, :]
        tl.store(dst, wc)

    @triton.jit(do_not_specialize=["e0", "row0"])
    def _row_top_kernel(w_tab, s_tab, top_ptr, K, e0, t_stride, row0, NKB: tl.constexpr,
                        PDL: tl.constexpr = False):
        """The largest e8m0 scale byte of each row of an MXFP4 weight (`_to_fp8_kernel`'s row
        reference): rows [64 tile] of pointer-table entry program_id(1) -> top[e0 + e, row0 +
        rows] (int32); all the rows' scale words (K / 128 <= NKB of them) in one load."""
        pdl_start(PDL)
        tile = tl.program_id(0)
        wi = tl.program_id(1)
        ws = tl.multiple_of(tl.load(s_tab + wi).to(tl.pointer_type(tl.uint8)), 16)
        kbs = tl.arange(0, NKB)
        s_row = (ws + tile.to(tl.int64) * (2 * K) + tl.arange(0, 64) * 4).to(
            tl.pointer_type(tl.int32))
        w = tl.load(s_row[:, None] + kbs[None, :] * 64, mask=kbs[None, :] < K // 128, other=0)
        top = tl.maximum(tl.maximum(w & 0xFF, (w >> 8) & 0xFF),
                         tl.maximum((w >> 16) & 0xFF, (w >> 24) & 0xFF))
        tl.store(top_ptr + (e0 + wi).to(tl.int64) * t_stride + row0 + tile * 64
                 + tl.arange(0, 64), tl.max(top, 1))

    @triton.jit(do_not_specialize=["e0", "row0"])
    def _to_fp8_kernel(w_tab, s_tab, q_ptr, sc_ptr, top_ptr, flag_ptr, K, e0, q_stride,
                       s_stride, row0, n_rows, W_FMT: tl.constexpr, ROW: tl.constexpr = False,
                       ASM: tl.constexpr = False, PDL: tl.constexpr = False):
        """Rows [64 tile] x K-block kb of expert program_id(2) of a pointer table -> e4m3 codes
        at q[e0 + e, row0 + rows, kb*128:] and the rows' scales: the block's at sc[e0 + e, kb,
        row0 + rows] (the scales [K/128, n_rows] of an expert: a block's scales are one
        contiguous vector), or with ROW one a row at sc[e0 + e, row0 + rows] (written by the
        first block). MXFP4: the 4 per-32 scales 2^s_j of a block become 2^(S - 6) (S their
        largest; with ROW, the row's largest, top[e0 + e, row0 + rows] from `_row_top_kernel`)
        times 2^(s_j - S + 6) folded into the codes (`_mxfp4_e4m3_folded`): e2m1 values times
        2^-5 .. 2^6 are e4m3 values, so codes are exact where nonzero only for s_j >= S - 11
        (and S >= 7: 2^(S - 133) a normal fp32). flag[0] gets bit 1 where the block's fold
        would not be exact, bit 2 where the row's would not (whichever is written). FP8: the
        codes as they are and the 128 x 128 block's scale on each row."""
        pdl_start(PDL)
        tile = tl.program_id(0)
        kb = tl.program_id(1)
        wi = tl.program_id(2)
        rows = tile * 64 + tl.arange(0, 64)
        cols = tl.arange(0, 128)
        e = (e0 + wi).to(tl.int64)
        if W_FMT == 1:
            p_ptr, sw = _mxfp4_block(w_tab, s_tab, wi, tile, kb, K)
            s = _scale_bytes(sw)  # [64, 4]
            top = tl.max(s, 1)
            top_row = tl.load(top_ptr + e * n_rows + row0 + rows)  # (top: [n_exp, n_rows])
            p = tl.load(p_ptr)
            nz = tl.max(tl.reshape((p & 0x77).to(tl.int32), (64, 4, 16)), 2) > 0
            lost = nz & ((s - top[:, None] + 12 < 1) | (top[:, None] < 7))
            bad = tl.max(tl.max(lost.to(tl.int32), 1), 0)
            lost = nz & ((s - top_row[:, None] + 12 < 1) | (top_row[:, None] < 7))
            bad += 2 * tl.max(tl.max(lost.to(tl.int32), 1), 0)
            if bad > 0:
                tl.atomic_or(flag_ptr, bad)
            ref = top_row if ROW else top
            wc = _mxfp4_e4m3_folded(p, tl.maximum(s - ref[:, None] + 12, 1), ASM)
            scale = _fold_scale(ref)
        else:
            wc, sb = _fp8_block(w_tab, s_tab, wi, tile, kb, K)
            scale = tl.zeros((64,), dtype=tl.float32) + _e8m0_f32(sb)
        tl.store(q_ptr + e * q_stride + (row0 + rows).to(tl.int64)[:, None] * K + kb * 128
                 + cols[None, :], wc)
        if ROW:
            if kb == 0:
                tl.store(sc_ptr + e * s_stride + row0 + rows, scale)
        else:
            tl.store(sc_ptr + e * s_stride + kb * n_rows + row0 + rows, scale)

    @triton.jit
    def _scale_bytes(sw):
        """A K-block's 4 scale bytes of each row (its scale word) -> int32 [R, 4]."""
        return (sw[:, None] >> (8 * tl.arange(0, 4)[None, :])) & 0xFF

    @triton.jit
    def _fold_scale(top):
        """The fp32 scale 2^(S - 6 - 127) of folded codes whose largest e8m0 scale byte is S
        (`_to_fp8_kernel`; S below 7 is flagged there)."""
        return ((tl.maximum(top, 7) - 6) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _mxfp4_e4m3_folded(p, d, ASM: tl.constexpr):
        """One K-block of MXFP4 rows in the kernels' layout (p [R, 64] bytes: byte b of each 16
        holds codes b and b + 16 of its 32-block) -> e4m3 [R, 128] in code order, each code's
        value times 2^(d - 6) for its block's d [R, 4] in 1..12, through two byte tables per
        block (the e4m3 codes of the magnitudes 0, 0.5, 1, 1.5 and 2, 3, 4, 6 times 2^(d - 6):
        their exponent fields are d's plus a constant) and `prmt`: one for every 4 codes, one
        more to put the low and the high nibbles' codes in their own registers; the sign bit is
        copied (the indexer's keys, `indexer._keys_folded`, take the same tables)."""
        R: tl.constexpr = p.shape[0]
        t0 = 0x0C080000 + d * 0x08080800
        t1 = 0x1C181410 + d * 0x08080808
        t0 = tl.reshape(tl.broadcast_to(t0[:, :, None], (R, 4, 16)), (R, 64))
        t1 = tl.reshape(tl.broadcast_to(t1[:, :, None], (R, 4, 16)), (R, 64))
        if ASM:  # pack=4: a register's 4 bytes lie in one 32-block (its tables: $3, $7)
            lo, hi = tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 m, s, q, a, c;
                and.b32 m, $2, 0x77777777;
                prmt.b32 a, $3, $7, m;
                shr.b32 m, m, 16;
                prmt.b32 c, $3, $7, m;
                shr.b32 s, $2, 3;
                and.b32 s, s, 0x1111;
                prmt.b32 q, 0x8000, 0, s;
                or.b32 a, a, q;
                shr.b32 s, $2, 19;
                and.b32 s, s, 0x1111;
                prmt.b32 q, 0x8000, 0, s;
                or.b32 c, c, q;
                prmt.b32 $0, a, c, 0x6420;
                prmt.b32 $1, a, c, 0x7531;
                }""",
                constraints="=r,=r,r,r,r,r,r,r,r,r,r", args=[p, t0, t1],
                dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)
        else:
            lo = _table_code((p & 0xF).to(tl.int32), t0, t1)
            hi = _table_code((p >> 4).to(tl.int32), t0, t1)
        w = tl.join(tl.reshape(lo, (R, 4, 16)), tl.reshape(hi, (R, 4, 16)))  # [R, 4, 16, 2]
        w = tl.reshape(tl.permute(w, (0, 1, 3, 2)), (R, 128))
        return w.to(tl.float8e4nv, bitcast=True)

    @triton.jit
    def _table_code(code, t0, t1):
        """e2m1 codes (int32 0..15) -> their e4m3 bytes from the block's tables t0, t1."""
        m = code & 7
        tab = tl.where(m < 4, t0, t1)
        return (((tab >> (8 * (m & 3))) & 0xFF) | ((code & 8) << 4)).to(tl.uint8)

    @triton.jit(do_not_specialize=["n_tiles", "g_off"])
    def _grouped_mx_kernel(a_ptr, sa_ptr, w_tab, s_tab, w3_tab, s3_tab, y_ptr, tile_ptr,
                           n_tiles, N1, K, g_off, sa_m, sa_k, TWO: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, ASM: tl.constexpr,
                           ROW: tl.constexpr = False):
        """`grouped_fp8_gemm._grouped_fp8_kernel` whose weight tile is MXFP4 in the kernels'
        layout, decoded to folded e4m3 each K-block (`grouped_mxfp4_gemm`); row tile
        program_id // (N / BN), column tile program_id % (N / BN), N = N1 (x 2 with TWO: the
        columns past N1 are w3's rows). ROW: folded into each row's largest scale (found in a
        first pass over the scale words), applied after the K loop."""
        pid = tl.program_id(0)
        n_col = (2 * N1 if TWO else N1) // BN
        tm = pid // n_col
        pn = pid % n_col
        g, r0, r1 = _row_tile(tile_ptr, n_tiles, tm)
        if r0 >= r1:
            return
        rows = r0 + tl.arange(0, BM)
        rok = rows < r1
        cols = pn * BN + tl.arange(0, BN)
        wrow = cols  # the weight rows of this tile in its table's weight
        wi = g - g_off
        w_addr = tl.load(w_tab + wi)
        s_addr = tl.load(s_tab + wi)
        if TWO:
            up = pn * BN >= N1
            wrow = cols - up.to(tl.int32) * N1
            w_addr = tl.where(up, tl.load(w3_tab + wi), w_addr)
            s_addr = tl.where(up, tl.load(s3_tab + wi), s_addr)
        w = tl.multiple_of(w_addr.to(tl.pointer_type(tl.uint8)), 16)
        ws = tl.multiple_of(s_addr.to(tl.pointer_type(tl.uint8)), 16)
        grp = (wrow // 64).to(tl.int64)
        r64 = wrow % 64
        w_row = w + grp[:, None] * (32 * K) + r64[:, None] * 64 + tl.arange(0, 64)[None, :]
        s_row = (ws + grp * (2 * K) + r64 * 4).to(tl.pointer_type(tl.int32))
        kk = tl.arange(0, 128)
        a_row = a_ptr + rows.to(tl.int64)[:, None] * K + kk[None, :]
        sa_row = sa_ptr + rows.to(tl.int64) * sa_m
        top_row = tl.zeros((BN,), dtype=tl.int32)
        if ROW:
            for kb in range(0, K // 128):
                top_row = tl.maximum(top_row, tl.max(_scale_bytes(tl.load(s_row + kb * 64)), 1))
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kb in range(0, K // 128):
            a = tl.load(a_row + kb * 128, mask=rok[:, None], other=0.0)
            p = tl.load(w_row + kb * 4096)
            sw = tl.load(s_row + kb * 64)
            sa = tl.load(sa_row + kb * sa_k, mask=rok, other=0.0)
            s4 = _scale_bytes(sw)  # [BN, 4]
            if ROW:
                w8 = _mxfp4_e4m3_folded(p, tl.maximum(s4 - top_row[:, None] + 12, 1), ASM)
                acc += tl.dot(a, tl.trans(w8)) * sa[:, None]
            else:
                top = tl.max(s4, 1)
                w8 = _mxfp4_e4m3_folded(p, tl.maximum(s4 - top[:, None] + 12, 1), ASM)
                acc += tl.dot(a, tl.trans(w8)) * sa[:, None] * _fold_scale(top)[None, :]
        if ROW:
            acc = acc * _fold_scale(top_row)[None, :]
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * (2 * N1 if TWO else N1) + cols[None, :],
                 acc.to(tl.bfloat16), mask=rok[:, None])
