"""Mixture-of-experts op: routed experts plus the shared expert on one batch (SPEC.md 7).

`moe_forward(u, idx, wgt, experts, shared)` -> [T, d]: expert e is `experts[e]`, a module with
linears `w1`, `w2`, `w3` and a SwiGLU clamp `limit`; token t goes to experts idx[t, :] with
routing weights wgt[t, :] (from the model's fp32 Gate) and always to `shared` with weight 1.
With expert parallelism an entry equal to len(experts) marks a slot whose expert lives on
another rank: it adds nothing here and is left out of the routing plan (no rows computed);
`shared` None leaves the shared expert out (the model adds its slice of it: each rank holds
a slice of its intermediate channels, of another width than the routed experts').

Reference (CPU and tests): loop over the experts that received tokens, as the model always did.

GPU (no host synchronisation, a fixed number of launches whatever the routing):
1. `act_quant_fp8(u)`: every expert's w1/w3 sees the same per-token FP8 input.
2. The routing plan (`moe_plan.py`): slots grouped by expert into blocks of BT rows, so
   every GEMM CTA learns its expert from one load. (`moe_gate_forward`, the model's entry on
   one rank, starts from the gate instead: for 1-4 tokens the gate, the routing, this plan
   and step 1 are one launch, `moe_gate.py`.)
3. `_moe_gemm_kernel` GATE_UP: per block, g = w1 x and v = w3 x for BW intermediate channels
   (FP4 decoded in the kernel, or FP8). MXFP4 decodes either to bf16 with the scale folded in
   (one bf16 MMA per chunk) or, by default for up to 16 tokens per expert, to e4m3 for FP8
   tensor cores (`_mxfp4_mma8`: one 32-deep MMA per scale block, promoted to fp32 with the
   scale). FP4 experts are re-laid out in place on first use (`to_kernel_layout`): each 64-row
   group's 128-deep K-blocks are contiguous, so a CTA's weight tile is one 4 KB run of memory
   (MXFP4: 1.3-1.75x faster than 64-byte runs 2 KB apart), and MXFP4 bytes hold codes b and
   b + 16 of each 32-block, so a thread's loaded bytes decode straight into its MMA fragment.
   Large batches (`abf`, with the bf16 decode) feed the MMA the exact bf16 values of the FP8
   activations and of h (`act_quant_values`; e4m3 times a power of two is a bf16 value), so
   those loads go straight to the tensor cores (pipelined by Triton) instead of being scaled
   per chunk in registers, and the MXFP4 scales come one K-block ahead as one word per row;
   the FP8 shared expert quantises those values again (same products, same bits).
   With the fused epilogue (`moe_config`: BW=128, unsplit) both
   products share a CTA, with the clamped SwiGLU, the routing weight and the FP8 quantisation
   of h that w2's input needs (per token, per 128). Otherwise (small batches, which are
   memory-bound and would leave most SMs idle, and the largest, where it measured faster) g and
   v go to separate CTAs, K may be split across CTAs, each writes fp32 partial sums, and
   `_swiglu_kernel` sums them and applies the same epilogue; with K splits, the last CTA of
   each 128 channels does that instead (`FINISH_SWIGLU`, one launch fewer).
   On sm_90, MXFP4 experts at decode batches (the e4m3 decode with 64-row tiles and 16-row
   blocks) run these launches on a Gluon kernel instead (`moe_mx_gluon.py`, bit-equal, fewer
   instructions per weight byte; `DSV4_MOE_GLUON=0` keeps this one).
4. `_moe_gemm_kernel` DOWN: y_slot = w2 h, written to the slot's own row (the un-permute);
   small batches split K here too (fp32 partials).
5. `_combine_kernel`: out[t] = sum over the token's k+1 slot rows (each the sum of its K-split
   partials, rounded to the working dtype) in fp32, cast once; or, with `parts`, the slot
   rows themselves for the hyper-connection's post update to sum in its own pass.
Partial sums are reduced in a fixed order, so results do not depend on scheduling. The GEMM
loops load each K-block's scales one block ahead (Triton's pipeliner prefetches only the loads
that feed a dot: the weight and activation bytes).
The shared expert is plan expert 0 and rides in the same launches when its weight format equals
the routed experts' (FP8 or NVFP4 checkpoints); official FP4 checkpoints keep the shared expert
in FP8, so each GEMM is then launched twice, once per format, over disjoint blocks; for small
batches the shared expert's launch runs on a side stream, beside the routed experts' launch.
A bf16 shared expert beside quantised routed experts (NVFP4 checkpoints whose exclude list
names `shared_experts`) runs through its own linears instead, its output (bf16, as the
reference's) written into each token's slot-0 row for the combine or the slot rows.
Rounding follows the reference: each linear's output is rounded to the working dtype before
the fp32 SwiGLU / sum, h is rounded before its quantisation.
bf16 experts (bf16 checkpoints, in the bf16 working dtype) take the same launches with bf16
weights (`FMT_BF16`): their linears quantise nothing, so the GEMMs read u and h as they are
(the `abf` loads) and h is stored unquantised. In float32 mode they keep the torch path.
Prefill-sized calls can instead run on dequantised bf16 experts and torch's grouped GEMM
(from 72 routed slots per expert: `moe_grouped_mm.py`), with this routing plan and the SwiGLU
and combine kernels.
"""
from __future__ import annotations

import os
import weakref
from typing import Protocol, Sequence

import torch

from . import HAS_TRITON, gluon_failed, num_sms, use_triton
from .pdl import l2_prefetch_depth, pdl
from .f32_linear import linear_f32
from .moe_plan import route_plan
from .quant_linear import (FMT_BF16, FMT_FP8, FMT_MXFP4, FMT_NVFP4, act_quant_fp8,
                           act_quant_values, sum_parts)
from .routing import route

_FMT_CODES = {"fp8": FMT_FP8, "fp4": FMT_MXFP4, "nvfp4": FMT_NVFP4, "bf16": FMT_BF16}
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class ExpertLike(Protocol):
    """A SwiGLU expert: linears w1, w2, w3 (dsv4.quant.linear) and the clamp `limit`."""
    limit: float

    def __call__(self, u: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor: ...


# ------------------------------------------------------------------------------- reference
def moe_forward_ref(u: torch.Tensor, idx: torch.Tensor, wgt: torch.Tensor,
                    experts: Sequence[ExpertLike], shared: ExpertLike | None) -> torch.Tensor:
    """u [T, d], idx [T, k] int, wgt [T, k] fp32 -> [T, d] in u's dtype."""
    y = torch.zeros(u.shape[0], u.shape[1], dtype=torch.float32, device=u.device)

    def finish(y: torch.Tensor) -> torch.Tensor:
        return (y if shared is None else y + shared(u).float()).to(u.dtype)
    if u.is_cuda and torch.cuda.is_current_stream_capturing():
        # No host synchronisation under CUDA-graph capture: every expert sees every token, with
        # weight 0 where it was not chosen (which adds exactly 0).
        for e, expert in enumerate(experts):
            w = torch.where(idx == e, wgt, 0.0).sum(-1)
            y += expert(u, w).float()
        return finish(y)
    for e in idx.unique().tolist():
        if e >= len(experts):  # another rank's expert
            continue
        tok, slot = (idx == e).nonzero(as_tuple=True)
        y.index_add_(0, tok, experts[e](u[tok], wgt[tok, slot]).float())
    return finish(y)


def sum_slots(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The output [T, d] that `moe_forward(parts=True)` stands for: y [T, d] passes through;
    slot rows [S, T, k+1, d] are summed as the combine step sums them (each slot's S partials
    in fp32, rounded to dtype; the token's slots in fp32, rounded)."""
    if y.dim() == 2:
        return y
    return sum_parts(y, dtype).float().sum(1).to(dtype)


def moe_forward(u: torch.Tensor, idx: torch.Tensor, wgt: torch.Tensor,
                experts: Sequence[ExpertLike], shared: ExpertLike | None,
                total_experts: int | None = None, parts: bool = False) -> torch.Tensor:
    """The MoE layer's expert part; see the module docstring. total_experts: the routed
    experts of all ranks (default len(experts)), for the grouped-GEMM rule. `parts` (with the
    shared expert, one rank): the GPU kernels may return the slot rows [S, T, k+1, d] (each
    slot's output as S split-K partials) instead of their sum, for a consumer that sums them
    as the combine step would (`mhc.hc_post`); otherwise the output [T, d]."""
    if use_triton(u) and _kernel_supported(u, experts, shared):
        return _moe_cuda(u, idx, wgt, experts, shared, total_experts=total_experts,
                         parts=parts and shared is not None and total_experts is None)
    return moe_forward_ref(u, idx, wgt, experts, shared)


# ------------------------------------------------------------------------------- weights
def _kernel_supported(u, experts, shared) -> bool:
    e0 = experts[0]
    return (u.dtype in (torch.bfloat16, torch.float32) and u.shape[-1] == e0.w1.in_features
            and _tables(experts, shared, u.device) is not None)


def _tensors(lin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, block scale, global scale) of one linear; FP8/MXFP4 have no global scale, bf16
    no scale at all: the weight stands in (never read)."""
    if lin.fmt == "nvfp4":
        return lin.weight, lin.weight_scale, lin.weight_scale_2
    if lin.fmt == "bf16":
        return lin.weight, lin.weight, lin.weight
    return lin.weight, lin.scale, lin.weight


class _Tables:
    """Device pointer tables of one group of same-format experts: for each of w1, w3, w2 an
    int64 [E] tensor of weight, scale and global-scale addresses. The kernels read the weights
    where the model keeps them (packed FP4 stays packed, nothing is copied); parameters must
    therefore stay where they are after the first forward (in-place loads are fine)."""

    def __init__(self, mods: Sequence, device: torch.device):
        self.fmt = _FMT_CODES[mods[0].w1.fmt]
        self.ptrs = {}
        for name in ("w1", "w3", "w2"):
            if self.fmt in (FMT_MXFP4, FMT_NVFP4):  # the kernels' layout, in place
                for m in mods:
                    getattr(m, name).to_kernel_layout()
            ts = [_tensors(getattr(m, name)) for m in mods]
            for i, part in enumerate(("w", "s", "g")):
                self.ptrs[name + part] = torch.tensor([t[i].data_ptr() for t in ts],
                                                      dtype=torch.int64, device=device)


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _tables(experts, shared, device) -> tuple[_Tables, _Tables | None] | None:
    """Pointer tables for the kernels, cached per expert list: (plan experts [shared,
    routed...], None) when all share one format, else (routed, shared); None when the kernels
    do not cover these experts (sizes not multiples of 128, mixed routed formats, bf16 routed
    experts beside a quantised shared one, bf16 weights held in another dtype (float32 mode),
    weights not 16-byte aligned). A bf16 shared expert beside quantised routed ones (NVFP4
    checkpoints that leave `shared_experts` unquantised) gets a table of format FMT_BF16:
    `_moe_cuda` runs it through its own linears."""
    # Keyed by the shared expert: one per MoE layer, and a module (the routed experts may come
    # as a plain list).
    # without a shared expert, routed expert 0 stands in as plan expert 0 (it gets no slots)
    lead = shared if shared is not None else experts[0]
    key = (str(device), len(experts), experts[0].w1.weight.data_ptr(),
           experts[-1].w2.weight.data_ptr(), lead.w1.weight.data_ptr(), shared is None)
    hit = _TABLES.get(lead)
    if hit is not None and hit[0] == key:
        return hit[1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # building the tables re-orders MXFP4 weights in place: a graph would replay that
        raise RuntimeError("MoE experts first used inside CUDA graph capture: run one eager "
                           "forward before capturing")
    d, inter = experts[0].w1.in_features, experts[0].w1.out_features
    fmts = {lin.fmt for m in experts for lin in (m.w1, m.w2, m.w3)}
    shared_fmts = {lin.fmt for lin in (lead.w1, lead.w2, lead.w3)}
    # a bf16 shared expert beside quantised routed ones runs its own linears (any dtype); the
    # kernels read bf16 weights only as bf16
    own_shared = shared_fmts == {"bf16"} and fmts != shared_fmts
    read = list(experts) + ([] if own_shared else [lead])
    bf16_off = ((fmts == {"bf16"} and shared_fmts != fmts)
                or any(lin.fmt == "bf16" and lin.weight.dtype != torch.bfloat16
                       for m in read for lin in (m.w1, m.w3, m.w2)))
    if (len(fmts) != 1 or len(shared_fmts) != 1 or not (fmts | shared_fmts) <= set(_FMT_CODES)
            or bf16_off
            or d % 128 or inter % 128 or lead.w1.out_features != inter
            or any(t.data_ptr() % 16 for m in (lead, *experts) for n in ("w1", "w3", "w2")
                   for t in _tensors(getattr(m, n))[:2])):  # the kernel assumes 16-byte rows
        val = None
    elif fmts == shared_fmts:
        val = (_Tables([lead, *experts], device), None)
    else:
        val = (_Tables(list(experts), device), _Tables([lead], device))
    _TABLES[lead] = (key, val)
    return val


# ------------------------------------------------------------------------------- launcher



def _block_tokens(t: int, k: int, n_exp: int) -> int:
    """Rows per block: the expected tokens per routed expert, rounded up to an MMA width."""
    per_expert = t * k / n_exp
    return 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64 if per_expert <= 96 else 128


def moe_config(t: int, k: int, n_routed: int, d: int, inter: int, sms: int) -> dict:
    """Launch parameters per batch size. Small batches are memory-bound and leave most of the
    GPU idle with one CTA per (weight tile, expert): they split K across CTAs (fp32 partial
    sums, reduced by the SwiGLU and combine kernels, so results stay deterministic). The
    splits are the best of a sweep on an H200 (`bench_linear_moe.py --only sweep`, Flash
    shapes: T = 1 -> 2/2 with a register cap, 2-16 -> 2/1, 64 -> 1/1 with the e4m3 decode),
    scaled by the SM count.
    `dec` picks the MXFP4 decode (`_mxfp4_mma8`): 0 bf16 MMA, 1-2 e4m3 MMA per 32-block (2 =
    4 bytes per instruction: 18-20% faster than 0 at T = 1-64 on the H200)."""
    bt = _block_tokens(t, k, n_routed)
    small = t * k <= 4 * n_routed
    if not small and bt <= 16:  # T = 512 Flash: 4.3 ms, against 7.4 with the fused epilogue
        # (the Gluon kernel: T = 256 1092.2 us with 128-row tiles, 128 registers and 2 stages;
        # 1262.9 with 64-row tiles; the Triton kernel 1569.7; 977.6 with the weights through
        # the shared ring, 3 stages)
        return dict(bt=bt, bw1=64, bw2=64, kc=128, split1=1, split2=1, warps=4, stages=3, dec=2,
                    gstages=3, gwsmem=True, gbw1=128, gbw2=128, gmaxnreg=128)
    if not small and bt == 32:  # 16-32 slots an expert (Flash: 683-1365 tokens): the e4m3
        # decode, no K split, 4 warps. H200, Flash, same run (`--only sweep --tokens 1024`, then
        # an A/B): T = 768 / 1024 3180 / 3423 -> 2249 / 2412 us against the bf16-MMA
        # launch below; at T = 2048 (bt = 64) the same launch is slower (4257 -> 5856 us)
        return dict(bt=bt, bw1=128, bw2=128, kc=64, split1=1, split2=1, warps=4, stages=3,
                    dec=2, prefetch=0)
    if not small:  # Flash, H200 (scratch A/Bs, same run): T = 8192 13.8 ms with abf, against
        # 18.4 without (8 warps; 13.6 with 4 warps), and 12.7 with the fused epilogue (split1
        # 1, which is 8% slower at T = 2048); T = 2048 4.2 against 4.5 ms
        return dict(bt=bt, bw1=128, bw2=64 if t * (k + 1) <= 1024 else 128, kc=64,
                    split1=1 if bt >= 128 else 2, split2=1, warps=4 if bt <= 16 else 8,
                    stages=3, dec=0, abf=True)
    scale = sms / 132
    # T = 2 and 8 (H200, `--only sweep --tokens 1 2 8`, twenty-fifth session): split 2 / 1
    # 96.6 / 267.8 us against 102.0 / 278.6 for 4 / 4 and 2 / 2. T = 1 (twenty-ninth session,
    # `--only sweep --tokens 1`): split 2 / 2 with registers capped at 72 (7 CTAs an SM, not
    # 6) 54.7-54.8 us against 63.4 for 4 / 4 uncapped, 69.2 for 2 / 2 uncapped, 60.0 capped at
    # 64 (spills); at T = 8 the cap changes nothing (272.0 against 271.8 us)
    split1, split2 = (2, 2) if t <= 1 else (2, 1) if t <= 16 else (1, 1)
    # the Gluon kernel's (MXFP4 experts, `moe_mx_gluon.py`): K-blocks a CTA and the
    # activations' ring depth from a grid sweep (H200, Flash, CUDA-graph timed, the SwiGLU in
    # the launch; `bench_linear_moe.py --only sweep --tokens ...` searches the same choices):
    # T = 1 46.7 us (split 2 / 2, 72 registers, 4 stages; the Triton kernel 54.1), T = 2 73.9
    # (1 / 1; 95.1), T = 8 207.3 (2 / 1, 72 registers; 273.4), T = 16 388.8 (2 / 1, 2 stages;
    # 472.2), T = 64 931.7 (2 / 1; 1110.0). Pro at T = 1: 4 / 4 (d = 7168: 14 K-blocks a
    # gate/up CTA, as Flash's 16)
    # From 8 tokens 128-row tiles (two wgmmas sharing the activations, ~20% fewer instructions
    # a weight byte; 128 registers): T = 8 204.0 -> 199.3 us, 64 907.6 -> 787.8, 256 1268.4 ->
    # 1092.2; at T = 1 slower (45.4 -> 52.2: half the CTAs). With them, no gate/up K split
    # from 32 tokens (`--only sweep --tokens 2 4 8 16 32 64 128 256`, thirty-third session:
    # Flash T = 32 543.6 -> 535.7 us, 64 794.1 -> 760.5, Pro 64 2466.9 -> 2368.5; at 16 slower,
    # 332.9 -> 337.1)
    # From 2 tokens the weight words travel through a 3-deep shared ring (`gwsmem`, bit-equal;
    # `scratch/wsmem.py`-style A/B, thirty-third session, Flash T = 2 / 8 / 64 / 256 73.7 /
    # 198.7 / 755.3 / 1083.7 -> 71.2 / 192.9 / 725.5 / 977.6 us, Pro 8 / 64 472.9 / 2279.0 ->
    # 445.1 / 2127.6; T = 16 and Pro's 1 equal; at one token 44.9 -> 45.7, deeper rings slower)
    g1 = max(1, round(d / 2048)) if t <= 1 else 1 if t <= 2 else 2 if t < 32 else 1
    wide = t >= 8
    gluon = dict(gsplit1=max(1, min(d // 256, round(g1 * scale))),
                 gsplit2=max(1, min(inter // 256, round((g1 if t <= 1 else 1) * scale))),
                 gstages=4 if t <= 1 else 3, gwsmem=t >= 2,
                 gmaxnreg=128 if wide else 72, gbw1=128 if wide else 64, gbw2=128 if wide else 64)
    # `overlap`: a separate shared-expert launch (FP8 beside FP4 experts) runs on a side
    # stream; H200, Flash, same run: T = 1 72.5 -> 64.8 us, 8: 283 -> 273, 64: 1101 -> 1115
    # `finish`: the K-split gate/up's SwiGLU in its own launch's last CTAs (FINISH_SWIGLU,
    # measured at these batches only)
    return dict(bt=bt, bw1=64, bw2=64, kc=128,
                split1=max(1, min(d // 256, round(split1 * scale))),
                split2=max(1, min(inter // 256, round(split2 * scale))),
                warps=4 if bt <= 16 else 8, stages=3, dec=2, overlap=t <= 32, finish=True,
                **gluon, **(dict(maxnreg=72) if t <= 1 else {}))


# K-split gate/up partials finished (SwiGLU, FP8 h) by the last CTA of each 128 channels in
# the GEMM launch instead of a `_swiglu_kernel` launch (DSV4_MOE_FINISH=0 turns it off). H200,
# Flash layer (`scratch`-style A/B, graph-timed, bit-equal outputs): 1 token 67.3 -> 65.0 us,
# 8 tokens 234.9 -> 234.2; unsplit 64-wide tiles (64 tokens) 431.4 -> 433.1, so only K splits
FINISH_SWIGLU = os.environ.get("DSV4_MOE_FINISH", "1") != "0"
# MXFP4 experts at decode batches (the e4m3 decode, 64-row tiles, 16-row blocks) on the Gluon
# kernel (`moe_mx_gluon.py`) where it builds; DSV4_MOE_GLUON=0 keeps the Triton kernel
MOE_GLUON = os.environ.get("DSV4_MOE_GLUON", "1") != "0"
_GLUON_FAILED: list[str] = []  # set once the Gluon kernel failed to build: Triton from then on


def _gluon_applies(c: dict, fmt: int) -> bool:
    """Whether a launch of `c` over experts of format fmt runs `_moe_mx_wg_kernel`."""
    if not (MOE_GLUON and not _GLUON_FAILED and not _INTERPRET and fmt == FMT_MXFP4
            and c["dec"] == 2 and c["bt"] == 16 and c["bw1"] == 64 and c["bw2"] == 64
            and not c.get("abf") and c.get("gluon", True)):
        return False
    from .moe_mx_gluon import HAS_GLUON
    return HAS_GLUON


_COUNTS: dict[torch.device, torch.Tensor] = {}


def _counts(dev: torch.device, n: int) -> torch.Tensor | None:
    """The device's zeroed int32 counters for `_finish_swiglu` (at least n; the kernels put
    them back to zero), or None when they would have to be allocated during a CUDA graph
    capture (whose memset would not run before eager calls)."""
    have = _COUNTS.get(dev)
    if have is not None and have.numel() >= n:
        return have
    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if have is not None:  # still referenced by the graphs that captured it: kept alive
        _KEEP.append(have)
    _COUNTS[dev] = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=dev)
    return _COUNTS[dev]


_KEEP: list = []
_SIDE: dict[torch.device, torch.cuda.Stream] = {}


def _run_groups(groups, launch, overlap: bool) -> None:
    """Launch a GEMM for each weight-format group. With two groups (the FP8 shared expert of
    an FP4 checkpoint) and `overlap`, the shared expert's launch runs on a side stream beside
    the routed experts' (also inside CUDA-graph capture): its small grid alone would leave
    the GPU half idle. The groups write disjoint rows; the caller's stream waits for both."""
    if len(groups) == 1 or not overlap:
        for g in groups:
            launch(*g)
        return
    cur = torch.cuda.current_stream()
    side = _SIDE.get(cur.device)
    if side is None:
        side = _SIDE[cur.device] = torch.cuda.Stream(cur.device)
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        launch(*groups[0])
    launch(*groups[1])
    cur.wait_stream(side)


def _gluon_gemm(blocks: int, splits: int, a, sa, plan, w_tab, s_tab, w3_tab, s3_tab, out, n,
                k, e_lo, e_hi, b_lo, k1, per, part_stride, gate_up: bool, split: bool, c: dict,
                max8: bool, finish: tuple | None = None) -> bool:
    """One `_moe_mx_wg_kernel` launch (`moe_mx_gluon.py`) over `blocks` plan blocks and
    `splits` K splits; False, after a warning, once the Gluon kernel has failed to build (the
    caller then runs the Triton kernel). max8: no block holds more than 8 rows. From the
    launch config `c`: `gstages` (the activations' ring, default 3), `gmaxnreg` (a register
    cap), `gbw1` / `gbw2` (weight rows a CTA, 64 or 128), `gwsmem` (the weight words through
    the shared ring instead of straight into registers). `finish`: (routing weights,
    counters, h, h's scales, limit, ROUND) for the SwiGLU in the gate/up launch."""
    from .moe_mx_gluon import _moe_mx_wg_kernel
    if _GLUON_FAILED:
        return False
    opt = dict(maxnreg=c["gmaxnreg"]) if c.get("gmaxnreg") else {}
    bw = c.get("gbw1" if gate_up else "gbw2", 64)
    grid = ((2 if gate_up else 1) * n // bw, blocks, splits)  # gate/up: w1's tiles, then w3's
    try:
        wgt, counts, h, hs, limit, rnd = finish or (out, out, out, out, 0.0, True)
        _moe_mx_wg_kernel[grid](a, sa, *plan, w_tab, s_tab, w3_tab, s3_tab, out, n, k, e_lo,
                                e_hi, b_lo, k1, per, part_stride, wgt, counts, h, hs, limit,
                                GATE_UP=gate_up, SPLIT=split, BT=16, BW=bw,
                                WSMEM=c.get("gwsmem", False),
                                NUM_BUF=c.get("gstages", 3), MAX8=max8, FINISH=finish is not None,
                                ROUND=rnd, HAS_LIMIT=limit > 0, num_warps=4, **opt, **pdl())
    except Exception as exc:  # noqa: BLE001
        gluon_failed(_GLUON_FAILED, exc, "Gluon MoE kernel", "Triton kernel")
        return False
    return True


def moe_gate_forward(u: torch.Tensor, gate, experts: Sequence[ExpertLike],
                     shared: ExpertLike | None, parts: bool = False) -> torch.Tensor:
    """The gate's routing (`moe_gate.GateArgs`: fp32 logits u W^T, then `routing.route`) and
    `moe_forward` on one rank. Decode batches take the gate, the routing, the routing plan and
    the activation quantisation in one launch (`moe_gate.py`)."""
    from . import moe_gate
    if use_triton(u) and moe_gate.applies(u, gate) and _kernel_supported(u, experts, shared):
        d, inter = u.shape[1], experts[0].w1.out_features
        c = moe_config(u.shape[0], gate.topk, len(experts), d, inter, num_sms(u.device))
        got = moe_gate.gate_route_plan(u, gate, len(experts), c["bt"], shared is not None)
        if got is not None:
            idx, wgt, pre = got
            return _moe_cuda(u, idx, wgt, experts, shared,
                             parts=parts and shared is not None, pre=pre)
    z = linear_f32(u, gate.weight)
    idx, wgt = route(z, gate.func, gate.topk, gate.scaling, gate.bias, gate.table, gate.ids)
    return moe_forward(u, idx, wgt, experts, shared, parts=parts)


def _moe_cuda(u, idx, wgt, experts, shared, cfg: dict | None = None,
              total_experts: int | None = None, parts: bool = False,
              pre: tuple | None = None) -> torch.Tensor:
    """`pre`: the routing plan (tensors, blocks, shared-expert blocks, routed blocks) and u's
    FP8 codes and scales, made by `moe_gate.gate_route_plan` (small batches only)."""
    t, d = u.shape
    k = idx.shape[1]
    n_routed = len(experts)
    inter = experts[0].w1.out_features
    dev = u.device
    if t == 0:
        return u.clone()
    # (expert parallelism: a local expert sees t * k / total_experts slots on average)
    c = moe_config(t, k, total_experts or n_routed, d, inter, num_sms(dev))
    c.update(cfg or {})
    # prefill-sized calls through dequantised bf16 experts and torch's grouped GEMM
    # (`moe_grouped_mm.py`, which uses this module's kernels); `grouped_mm` in cfg forces the
    # choice either way
    from . import moe_grouped_mm as gm
    main, extra = _tables(experts, shared, dev)
    if pre is None and (c.get("grouped_mm", None) or (
            "grouped_mm" not in c and gm.takes(t, k, total_experts or n_routed, main, extra))):
        if gm.applies(u, main, extra):
            try:
                return gm.moe_grouped_mm(u, idx, wgt, experts, shared, main, extra,
                                         total_experts)
            except torch.OutOfMemoryError as err:
                if "grouped_mm" in c:
                    raise
                gm.out_of_memory(err)
    if _INTERPRET:  # Triton's CPU interpreter runs no inline PTX
        c["dec"], c["prefetch"] = min(c["dec"], 1), 0
    u = u.contiguous()
    idx = idx.contiguous()  # int32 or int64: the routing kernels read either
    wgt = wgt.float().contiguous()
    n_exp, k1 = n_routed + 1, k + 1
    n_slots = t * k1
    bt = c["bt"]
    if pre is None:
        plan, _, n_blocks, shared_blocks, routed_blocks = route_plan(idx, t, n_routed, bt,
                                                                     shared is not None)
    else:
        plan, n_blocks, shared_blocks, routed_blocks = pre[:4]
    n_pos = n_blocks * bt

    # 1. and 3. gate/up with the SwiGLU epilogue: h in FP8, rows = padded positions. With
    # `abf` (FP4 experts, bf16 MMA decode) the activations and h are their exact bf16 values:
    # the inputs reach the tensor cores straight from memory instead of being scaled per chunk
    limit = float(experts[0].limit)
    # bf16 experts (bf16 checkpoints) take the working-dtype activations and h as they are:
    # their linears quantise nothing (SPEC.md 3 applies to FP8 / FP4 weights)
    unq = main.fmt == FMT_BF16
    abf = unq or (bool(c.get("abf")) and c["dec"] == 0 and main.fmt != FMT_FP8)
    if unq:
        q, s = u, u.new_empty(0, dtype=torch.float32)
    elif abf:
        q, s = act_quant_values(u), u.new_empty(0, dtype=torch.float32)
    elif pre is not None:
        q, s = pre[4:]
    else:
        q, s = act_quant_fp8(u)
    hq = torch.empty(n_pos, inter, dtype=torch.bfloat16 if abf else torch.float8_e4m3fn,
                     device=dev)
    hs = torch.empty(n_pos, 0 if abf else inter // 128, dtype=torch.float32, device=dev)
    # launches: (tables, first plan expert, end plan expert, first block, blocks)
    # a bf16 shared expert beside quantised routed experts: its own linears (below), its
    # plan blocks left to them
    own_shared = extra is not None and extra.fmt == FMT_BF16
    if extra is None:
        groups = [(main, 0, n_exp, 0, n_blocks)]
    elif own_shared:
        groups = [(main, 1, n_exp, shared_blocks, routed_blocks)]
    else:
        groups = [(extra, 0, 1, 0, shared_blocks), (main, 1, n_exp, shared_blocks, routed_blocks)]
    common = dict(ROUND=u.dtype == torch.bfloat16, HAS_LIMIT=limit > 0, BT=bt,
                  KC=c["kc"], DEC=c["dec"], ABF=abf, QH=not unq, num_warps=c["warps"],
                  num_stages=c["stages"], PREFETCH=int(c.get("prefetch", l2_prefetch_depth())))
    if c.get("maxnreg"):  # a register cap (launch sweeps: more CTAs an SM, a few spills)
        common["maxnreg"] = c["maxnreg"]
    # MXFP4 experts at decode batches: the Gluon kernel, with its own launch choices
    gluon = _gluon_applies(c, main.fmt)
    split1, split2 = ((c.get("gsplit1", c["split1"]), c.get("gsplit2", c["split2"])) if gluon
                      else (c["split1"], c["split2"]))
    per1 = triton.cdiv(d // 128, split1)
    split1 = triton.cdiv(d // 128, per1)
    # the fused SwiGLU epilogue quantises h per 128 channels: it needs whole 128-wide tiles
    partial1 = split1 > 1 or c["bw1"] != 128
    part1 = (torch.empty(split1, n_pos, 2 * inter, dtype=torch.float32, device=dev)
             if partial1 else hq)
    overlap = c.get("overlap", False) and u.is_cuda
    if unq:  # a K-block of bf16 weights and inputs is 4x MXFP4's bytes: the pipeline's stages
        # (each the 128-deep K-block's tiles) must fit in shared memory (227 KB a CTA on an H200)
        per_stage = 256 * max((1 if partial1 else 2) * c["bw1"] + bt, c["bw2"] + bt)
        common["num_stages"] = max(1, min(common["num_stages"], (192 << 10) // per_stage))

    # the SwiGLU of split partials in the gate/up launch's last CTA of each 128 channels
    # (allocated by any eager call, so that the CUDA graphs captured later find them)
    counts = _counts(dev, n_blocks * (inter // 128)) if FINISH_SWIGLU else None
    finish = counts is not None and c.get("finish", False) and split1 > 1 and c["bw1"] <= 128
    counts = hs if counts is None else counts

    def gate_up(tab, e_lo, e_hi, b_lo, nb):
        p = tab.ptrs
        if gluon and tab.fmt == FMT_MXFP4 and _gluon_gemm(
                nb, split1, q, s, plan, p["w1w"], p["w1s"], p["w3w"], p["w3s"], part1, inter, d,
                e_lo, e_hi, b_lo, k1, per1, n_pos * 2 * inter, True, True, c, t <= 8,
                (wgt, counts, hq, hs, limit, common["ROUND"]) if finish else None):
            return
        _moe_gemm_kernel[((2 if partial1 else 1) * inter // c["bw1"], nb, split1)](
            q, s, *plan, p["w1w"], p["w1s"], p["w1g"], p["w3w"], p["w3s"], p["w3g"], wgt,
            part1, hs, hq, counts, inter, d, n_exp, e_lo, e_hi, b_lo, k1, limit, per1,
            n_pos * 2 * inter, W_FMT=tab.fmt, GATE_UP=True, SPLIT=partial1, TWO=not partial1,
            BW=c["bw1"], FINISH=finish,
            **common, **pdl())
    _run_groups(groups, gate_up, overlap)
    if partial1 and not finish:
        _swiglu_kernel[(inter // 128, n_blocks)](
            part1, *plan, wgt, hq, hs, inter, n_exp, k1, limit, n_pos * 2 * inter,
            ROUND=common["ROUND"], HAS_LIMIT=limit > 0, BT=bt, SPLIT=split1, HBF=abf,
            QH=not unq, num_warps=4, **pdl())
    # 4. down: y rows = slots (split K: fp32 partial sums per split)
    per2 = triton.cdiv(inter // 128, split2)
    split2 = triton.cdiv(inter // 128, per2)
    ys = torch.empty(split2, n_slots, d, dtype=u.dtype if split2 == 1 else torch.float32,
                     device=dev)

    def down(tab, e_lo, e_hi, b_lo, nb):
        p = tab.ptrs
        if gluon and tab.fmt == FMT_MXFP4 and _gluon_gemm(
                nb, split2, hq, hs, plan, p["w2w"], p["w2s"], p["w2w"], p["w2s"], ys, d, inter,
                e_lo, e_hi, b_lo, k1, per2, n_slots * d, False, split2 > 1, c, t <= 8):
            return
        _moe_gemm_kernel[(triton.cdiv(d, c["bw2"]), nb, split2)](
            hq, hs, *plan, p["w2w"], p["w2s"], p["w2g"], p["w2w"], p["w2s"], p["w2g"], wgt,
            ys, hs, ys, hs, d, inter, n_exp, e_lo, e_hi, b_lo, k1, limit, per2, n_slots * d,
            W_FMT=tab.fmt, GATE_UP=False, SPLIT=split2 > 1, TWO=False, BW=c["bw2"], **common,
            **pdl())
    _run_groups(groups, down, overlap)
    if own_shared:  # slot 0 of each token: the shared expert's output (bf16, as its reference
        # returns it), in the first K split's row (the others zero)
        rows = ys.view(split2, t, k1, d)[:, :, 0]
        rows[0] = shared(u)
        if split2 > 1:
            rows[1:] = 0
    if parts:  # step 5 left to the consumer: every slot row is written (one rank, shared)
        return ys.view(split2, t, k1, d)
    # 5. sum the slots of each token (and the K-splits of each slot)
    out = torch.empty_like(u)
    bd = 256 if t <= 16 else 1024  # small batches: more CTAs, each with its loads in flight
    _combine_kernel[(t, triton.cdiv(d, bd))](ys, out, d, n_slots * d, ys, idx, n_routed, K1=k1,
                                             SPLIT=split2, ROUND=common["ROUND"] and split2 > 1,
                                             BD=bd, HAS_SHARED=shared is not None, num_warps=4,
                                             **pdl())
    return out


# ------------------------------------------------------------------------------- kernels
if HAS_TRITON:
    import triton
    import triton.language as tl

    from .moe_plan import _block_rows
    from .pdl import l2_prefetch, l2_prefetch_one, pdl_start
    from .quant_linear import (_act_chunk, _act_scale, _e2m1_e4m3_nibbles, _e2m1_f32,
                               _e8m0_f32, _fp4_chunk, _fp8_act, _fp8_scales, _fp8_wscale,
                               _mma_fp8, _quant_block)

    @triton.jit
    def _swiglu_quant(g, v, rw, limit, ROUND: tl.constexpr, HAS_LIMIT: tl.constexpr,
                      QH: tl.constexpr = True):
        """g = w1 x, v = w3 x [R, 128] fp32, routing weights rw [R] -> w2's FP8 input
        (e4m3 [R, 128], scale [R]): the clamped SwiGLU of SPEC.md 7, rounded as the reference
        rounds (the linears return the working dtype, h is rounded before its quantisation).
        Without QH (bf16 experts) h itself (fp32, rounded when ROUND) and scales of 1."""
        if ROUND:
            g = g.to(tl.bfloat16).to(tl.float32)
            v = v.to(tl.bfloat16).to(tl.float32)
        if HAS_LIMIT:
            v = tl.minimum(tl.maximum(v, -limit), limit)
            g = tl.minimum(g, limit)
        h = g / (1.0 + tl.exp(-g)) * v * rw[:, None]
        if ROUND:
            h = h.to(tl.bfloat16).to(tl.float32)
        if QH:
            hq, hs = _quant_block(h)
        else:
            hq, hs = h, tl.full((h.shape[0],), 1.0, tl.float32)
        return hq, hs

    @triton.jit
    def _routing_weight(wgt_ptr, slot, ok, k1):
        """Routing weight of each slot; 1 for the shared expert's slots (j = 0)."""
        j = slot % k1
        return tl.load(wgt_ptr + (slot // k1) * (k1 - 1) + j - 1, mask=ok & (j > 0), other=1.0)

    @triton.jit(do_not_specialize=["e_lo", "e_hi", "blk_lo"])
    def _moe_gemm_kernel(a_ptr, sa_ptr, slots_ptr, blk_exp_ptr, blk_rows_ptr,
                         w_tab, s_tab, g_tab, w3_tab, s3_tab, g3_tab, wgt_ptr,
                         out_ptr, out_s_ptr, h_ptr, count_ptr, N, K, n_exp, e_lo, e_hi,
                         blk_lo, k1, limit, kb_per, part_stride,
                         W_FMT: tl.constexpr, GATE_UP: tl.constexpr, SPLIT: tl.constexpr,
                         ROUND: tl.constexpr, HAS_LIMIT: tl.constexpr, BW: tl.constexpr,
                         BT: tl.constexpr, KC: tl.constexpr,
                         TWO: tl.constexpr, DEC: tl.constexpr = 0, ABF: tl.constexpr = False,
                         PREFETCH: tl.constexpr = 0, FINISH: tl.constexpr = False,
                         QH: tl.constexpr = True, PDL: tl.constexpr = False):
        """One (weight tile, block, K-split) of a grouped GEMM; grid (N/BW, blocks of this
        launch, splits). Without SPLIT the tile is finished here (GATE_UP: SwiGLU + FP8 h;
        else y in the working dtype); with SPLIT it writes fp32 partial sums. ABF (bf16 MMA
        decode only): the input rows are the exact bf16 values of the FP8 activations (no
        scales, loads that feed the MMA directly) and GATE_UP writes h that way too.
        PREFETCH (n > 0): once its expert is known, the CTA keeps n K-blocks of its weights
        requested into L2 ahead of the pipeline's loads (`pdl.l2_prefetch`), n at first and
        then one a step. FINISH (GATE_UP and SPLIT, BW <= 128): the last CTA to write a
        partial of a (block, 128 channels) finishes it as `_swiglu_kernel` would (h into h_ptr
        and out_s_ptr), counted in count_ptr [blocks, N / 128] (zero between launches: the
        last CTA puts it back), which saves that kernel's launch. W_FMT 3 (FMT_BF16, with ABF
        and not QH): bf16 weights [N, K] and inputs, h written unquantised."""
        pdl_start(PDL)
        b = blk_lo + tl.program_id(1)
        e, ok, pos, slot = _block_rows(b, slots_ptr, blk_exp_ptr, blk_rows_ptr, BT)
        if (e < e_lo) | (e >= e_hi):
            return
        # TWO (GATE_UP, not SPLIT): two products per CTA, g and v, for the fused epilogue.
        # GATE_UP and SPLIT: one; tiles past N/BW compute v = w3 x (half the registers, twice
        # the CTAs for small batches).
        tile = tl.program_id(0)
        wi = e - e_lo
        w_addr = tl.load(w_tab + wi)
        s_addr = tl.load(s_tab + wi)
        g_addr = tl.load(g_tab + wi)
        up = False
        if GATE_UP and SPLIT:
            up = tile >= N // BW
            tile = tile - up.to(tl.int32) * (N // BW)
            w_addr = tl.where(up, tl.load(w3_tab + wi), w_addr)
            s_addr = tl.where(up, tl.load(s3_tab + wi), s_addr)
            g_addr = tl.where(up, tl.load(g3_tab + wi), g_addr)
        rows = tile * BW + tl.arange(0, BW)
        row_ok = rows < N
        # addresses read from a table carry no alignment: without the hint every weight byte
        # is its own load instruction (the tables hold torch allocations, 256-byte aligned)
        ws = tl.multiple_of(s_addr.to(tl.pointer_type(tl.uint8)), 16)
        ws3 = tl.multiple_of(tl.load(s3_tab + wi).to(tl.pointer_type(tl.uint8)), 16)
        ty = tl.float8e4nv if W_FMT == 0 else (tl.bfloat16 if W_FMT == 3 else tl.uint8)
        w = tl.multiple_of(w_addr.to(tl.pointer_type(ty)), 16)
        w3 = tl.multiple_of(tl.load(w3_tab + wi).to(tl.pointer_type(ty)), 16)
        if GATE_UP:
            arow = slot // k1
        else:
            arow = pos
        kb0 = tl.program_id(2) * kb_per
        kb1 = tl.minimum(kb0 + kb_per, K // 128)
        if PREFETCH > 0:
            _prefetch_w(w, w3, tile, rows, N, K, kb0,
                        tl.maximum(tl.minimum(kb1 - kb0, PREFETCH), 1), W_FMT, BW, TWO)
        acc = tl.zeros((BW, BT), dtype=tl.float32)
        acc3 = tl.zeros((BW, BT), dtype=tl.float32)
        if W_FMT == 1:  # row pointers hoisted: the loop only adds kb offsets
            # the kernels' layout (mxfp4_to_kernel_layout): per 64-row group, per K-block,
            # 64 rows x 64 bytes (x 4 scales) contiguous
            grp = (rows // 64).to(tl.int64)
            r64 = rows % 64
            if DEC > 0:
                j = tl.arange(0, 16)
            else:
                j = tl.arange(0, KC // 2)
            w_row = w + grp[:, None] * (32 * K) + r64[:, None] * 64 + j[None, :]
            w3_row = w3 + grp[:, None] * (32 * K) + r64[:, None] * 64 + j[None, :]
            # a row's 4 scale bytes of one K-block, as one 32-bit word
            s_row = (ws + grp * (2 * K) + r64 * 4).to(tl.pointer_type(tl.int32))
            s3_row = (ws3 + grp * (2 * K) + r64 * 4).to(tl.pointer_type(tl.int32))
            a_row = a_ptr + arow[:, None].to(tl.int64) * K + tl.arange(0, 32)[None, :]
            sa_row = sa_ptr + arow.to(tl.int64) * (K // 128)
            # the first K-block's scales; each iteration then loads the next block's before its
            # MMAs (Triton pipelines the weight and activation bytes but not these scale loads,
            # which would otherwise stall every iteration for a memory round trip; loading two
            # blocks ahead stops Triton from pipelining the rest)
            sw, sw3, s = _mx_scales(s_row, s3_row, sa_row, ok, row_ok, kb0, kb0 < kb1, TWO,
                                    not ABF)
        if W_FMT == 0:  # scales one K-block ahead (`_fp8_scales`)
            sn, wn = _fp8_scales(sa_ptr, ws, arow, ok, rows, row_ok, kb0, K, kb0 < kb1,
                                 not ABF)
            wn3 = wn
            if TWO:
                wn3 = _fp8_wscale(ws3, rows, row_ok, kb0, K, kb0 < kb1)
        for kb in range(kb0, kb1):
            if PREFETCH > 0:  # PREFETCH blocks ahead (past the end: the last block again)
                _prefetch_w(w, w3, tile, rows, N, K, tl.minimum(kb + PREFETCH, kb1 - 1), 1,
                            W_FMT, BW, TWO)
            if W_FMT == 0:
                sc, wc, wc3 = sn, wn, wn3
                sn, wn = _fp8_scales(sa_ptr, ws, arow, ok, rows, row_ok, kb + 1, K, kb + 1 < kb1,
                                     not ABF)
                if TWO:
                    wn3 = _fp8_wscale(ws3, rows, row_ok, kb + 1, K, kb + 1 < kb1)
                # ABF: the exact bf16 values of the FP8 activations, quantised again here (the
                # same products: the codes and the scale can only move by a common power of two)
                q, s = _fp8_act(sc, a_ptr, arow, ok, kb, K, ABF)
                acc = _mma_fp8(acc, q, s, w, wc, rows, row_ok, kb, K)
                if TWO:
                    acc3 = _mma_fp8(acc3, q, s, w3, wc3, rows, row_ok, kb, K)
            elif W_FMT == 1 and DEC > 0:
                cw, cw3, cs = sw, sw3, s
                sw, sw3, s = _mx_scales(s_row, s3_row, sa_row, ok, row_ok, kb + 1, kb + 1 < kb1,
                                        TWO)
                acc = _mxfp4_mma8(acc, a_row + kb * 128, ok, cs, w_row + kb * 4096, cw, row_ok,
                                  DEC == 2)
                if TWO:
                    acc3 = _mxfp4_mma8(acc3, a_row + kb * 128, ok, cs, w3_row + kb * 4096, cw3,
                                       row_ok, DEC == 2)
            else:
                if W_FMT == 1:  # MXFP4: this block's scales were loaded one block ahead
                    cw, cw3, cs = sw, sw3, s
                    sw, sw3, s = _mx_scales(s_row, s3_row, sa_row, ok, row_ok, kb + 1,
                                            kb + 1 < kb1, TWO, not ABF)
                elif not ABF:
                    cs, _ = _act_scale(a_ptr, sa_ptr, arow, ok, kb, K, False)
                for c in tl.static_range(128 // KC):
                    if ABF:  # exact bf16 inputs: this load feeds the MMA (Triton pipelines it)
                        k = kb * 128 + c * KC + tl.arange(0, KC)
                        a = tl.trans(tl.load(a_ptr + arow[:, None].to(tl.int64) * K + k[None, :],
                                             mask=ok[:, None], other=0.0))
                    else:
                        a = tl.trans(_act_chunk(a_ptr, arow, ok, kb, c, K, cs, cs, False, KC))
                    # FP4 experts hold the kernels' layout (mxfp4_to_kernel_layout)
                    if W_FMT == 1:
                        wc = _mxfp4_bf16(w_row + kb * 4096, cw, c, row_ok, KC)
                    elif W_FMT == 3:
                        wc = _bf16_chunk(w, rows, row_ok, kb * 128 + c * KC, K, KC)
                    else:
                        wc = _fp4_chunk(w, ws, rows, row_ok, kb, c, K, True, KC, True)
                    acc = tl.dot(wc, a, acc)
                    if TWO:
                        if W_FMT == 1:
                            wc = _mxfp4_bf16(w3_row + kb * 4096, cw3, c, row_ok, KC)
                        elif W_FMT == 3:
                            wc = _bf16_chunk(w3, rows, row_ok, kb * 128 + c * KC, K, KC)
                        else:
                            wc = _fp4_chunk(w3, ws3, rows, row_ok, kb, c, K, True, KC, True)
                        acc3 = tl.dot(wc, a, acc3)
        if W_FMT == 2:
            acc = acc * tl.load(g_addr.to(tl.pointer_type(tl.float32)))
            if TWO:
                acc3 = acc3 * tl.load(tl.load(g3_tab + wi).to(tl.pointer_type(tl.float32)))
        mask = row_ok[:, None] & ok[None, :]
        if SPLIT:
            part = out_ptr + tl.program_id(2).to(tl.int64) * part_stride
            if GATE_UP:  # rows [pos, 2N]: g then v
                col = rows + up.to(tl.int32) * N
                tl.store(part + pos[None, :].to(tl.int64) * (2 * N) + col[:, None], acc, mask=mask)
                if FINISH:
                    _finish_swiglu(out_ptr, count_ptr, h_ptr, out_s_ptr, wgt_ptr, b, tile, pos,
                                   ok, slot, N, k1, limit, part_stride, ROUND, HAS_LIMIT, BW,
                                   BT, ABF, QH)
            else:
                tl.store(part + slot[None, :].to(tl.int64) * N + rows[:, None], acc, mask=mask)
        elif GATE_UP:
            rw = _routing_weight(wgt_ptr, slot, ok, k1)
            hq, hs = _swiglu_quant(tl.trans(acc), tl.trans(acc3), rw, limit, ROUND, HAS_LIMIT,
                                   QH)
            _store_h(out_ptr, out_s_ptr, pos, ok, rows, tl.program_id(0), N, hq, hs, ABF)
        else:
            tl.store(out_ptr + slot[None, :].to(tl.int64) * N + rows[:, None], acc, mask=mask)

    @triton.jit
    def _prefetch_w(w, w3, tile, rows, N, K, kb, n, W_FMT: tl.constexpr, BW: tl.constexpr,
                    TWO: tl.constexpr):
        """Request K-blocks kb .. kb+n-1 of this CTA's weight tile (and w3's) into L2."""
        if W_FMT == 0 or W_FMT == 3:  # [N, K] rows: a run of n * 128 elements a row
            r = tl.minimum(rows, N - 1).to(tl.int64) * K + kb * 128
            nbytes = n * 128 * (2 if W_FMT == 3 else 1)
            l2_prefetch(w + r, nbytes, True)
            if TWO:
                l2_prefetch(w3 + r, nbytes, True)
        else:  # the kernels' layout: a 64-row group's K-blocks are one run of bytes
            for g in tl.static_range(BW // 64):
                at = (tile * (BW // 64) + g).to(tl.int64) * (32 * K) + kb * 4096
                l2_prefetch_one(w + at, n * 4096, True)
                if TWO:
                    l2_prefetch_one(w3 + at, n * 4096, True)

    @triton.jit
    def _bf16_chunk(w, rows, row_ok, k0, K, KC: tl.constexpr):
        """Columns k0 .. k0+KC of bf16 weight rows [N, K] (rows [BW]) -> [BW, KC]."""
        k = k0 + tl.arange(0, KC)
        return tl.load(w + rows[:, None].to(tl.int64) * K + k[None, :], mask=row_ok[:, None],
                       other=0.0)

    @triton.jit
    def _store_h(h_ptr, hs_ptr, pos, ok, cols, cb, N, hq, hs, BF: tl.constexpr):
        """Store w2's input h for positions pos [R], channels cols (128-block cb): FP8 codes
        and scales, or (BF) their exact products in bf16 (e4m3 times a power of two)."""
        if BF:
            tl.store(h_ptr + pos[:, None].to(tl.int64) * N + cols[None, :],
                     (hq.to(tl.float32) * hs[:, None]).to(tl.bfloat16), mask=ok[:, None])
        else:
            tl.store(h_ptr + pos[:, None].to(tl.int64) * N + cols[None, :], hq,
                     mask=ok[:, None])
            tl.store(hs_ptr + pos.to(tl.int64) * (N // 128) + cb, hs, mask=ok)

    @triton.jit
    def _mxfp4_bf16(w_ptr, sw, c, row_ok, KC: tl.constexpr):
        """Chunk c (KC codes) of one 128-deep K-block of MXFP4 rows in the kernels' layout
        (w_ptr [BW, KC/2]: the block's first bytes per row) -> exact bf16 [BW, KC] with the
        block scales folded in, from the rows' 4 scale bytes sw (int32, loaded one block
        ahead) instead of a scale load per chunk."""
        p = tl.load(w_ptr + c * (KC // 2), mask=row_ok[:, None], other=0)
        NS: tl.constexpr = KC // 32
        si = c * NS + tl.arange(0, NS)
        return _mxfp4_scaled(p, _e8m0_f32((sw[:, None] >> (8 * si[None, :])) & 0xFF),
                             tl.bfloat16)

    @triton.jit
    def _mxfp4_scaled(p, f, DT: tl.constexpr):
        """Packed MXFP4 codes p [R, KC/2] in the kernels' layout times one factor per 32-code
        block f [R, KC/32] (fp32) -> DT [R, KC] in code order."""
        lo, hi = _e2m1_f32(p)
        R: tl.constexpr = p.shape[0]
        KC: tl.constexpr = 2 * p.shape[1]
        f = tl.reshape(tl.broadcast_to(f[:, :, None], (R, KC // 32, 16)), (R, KC // 2))
        lo = (lo * f).to(DT)
        hi = (hi * f).to(DT)
        # byte b of each 16 holds codes b and b + 16 of the 32-block (fp4_to_halves)
        w = tl.reshape(tl.join(lo, hi), (R, KC // 32, 16, 2))
        return tl.reshape(tl.permute(w, (0, 1, 3, 2)), (R, KC))

    @triton.jit
    def _e2m1_e4m3(p, ASM: tl.constexpr):
        """One 32-code block of packed e2m1 bytes [R, 16] in the kernels' order (byte b holds
        codes b and b + 16, `fp4_to_halves`) -> e4m3 bytes [R, 32] in code order, each the
        code's value times 2^-6 (`quant_linear._e2m1_e4m3_nibbles`). A thread's 4 packed bytes
        become exactly the two 32-bit registers of codes its FP8 MMA fragment holds (codes
        4t..4t+3 and 16+4t..16+4t+3), so the decoded weights reach the tensor cores without a
        shared-memory pass or byte shuffles."""
        R: tl.constexpr = p.shape[0]
        C: tl.constexpr = p.shape[1]
        lo, hi = _e2m1_e4m3_nibbles(p, ASM)
        w = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (R, 2 * C))
        return w.to(tl.float8e4nv, bitcast=True)

    @triton.jit
    def _mx_scales(s_row, s3_row, sa_row, ok, row_ok, kb, live, TWO: tl.constexpr,
                   LOAD_S: tl.constexpr = True):
        """The scales of K-block kb of an MXFP4 product (zero unless live): each weight row's
        4 scale bytes as one int32 word (w1's and, when TWO, w3's), the tokens' activation
        scale [BT] when LOAD_S."""
        sw = tl.load(s_row + kb * 64, mask=row_ok & live, other=0)
        sw3 = sw
        if TWO:
            sw3 = tl.load(s3_row + kb * 64, mask=row_ok & live, other=0)
        s = tl.zeros(ok.shape, dtype=tl.float32)
        if LOAD_S:
            s = tl.load(sa_row + kb, mask=ok & live, other=0.0)
        return sw, sw3, s

    @triton.jit
    def _mxfp4_mma8(acc, a_ptr, ok, s, w_ptr, sw, row_ok, ASM: tl.constexpr):
        """acc [BW, BT] += MXFP4 W (one 128-deep K-block) @ (e4m3 activations * s)^T on FP8
        tensor cores: the e2m1 codes decode exactly to e4m3 (`_e2m1_e4m3`), one 32-deep MMA per
        scale block is promoted to fp32 with 2^6 x its block scale, the token scale s once per
        K-block. Pointers: w_ptr [BW, 16] bytes of the block's first 32 codes per row, a_ptr
        [BT, 32] its first 32 activations; sw [BW] the rows' 4 scale bytes (int32, scale c in
        byte c)."""
        blk = tl.zeros(acc.shape, dtype=tl.float32)
        for c in tl.static_range(4):
            p = tl.load(w_ptr + c * 16, mask=row_ok[:, None], other=0)
            w8 = _e2m1_e4m3(p, ASM)
            q = tl.load(a_ptr + c * 32, mask=ok[:, None], other=0.0)
            # 2^6 x the block scale 2^(b-127), built as a float directly: exact for every
            # byte, b = 0 too (2^-121 is a normal float), with no select and no multiply
            f = ((((sw >> (8 * c)) & 0xFF) + 6) << 23).to(tl.float32, bitcast=True)
            blk += tl.dot(w8, tl.trans(q)) * f[:, None]
        return acc + blk * s[None, :]

    @triton.jit
    def _finish_swiglu(part_ptr, count_ptr, h_ptr, hs_ptr, wgt_ptr, b, tile, pos, ok, slot, N,
                       k1, limit, part_stride, ROUND: tl.constexpr, HAS_LIMIT: tl.constexpr,
                       BW: tl.constexpr, BT: tl.constexpr, HBF: tl.constexpr,
                       QH: tl.constexpr):
        """After a CTA's partial of block b: count it for its 128 channels (g and v tiles of
        every K split); the last one sums the partials (in split order, as `_swiglu_kernel`)
        and writes h. The partial stores are released by the barrier and the counter's
        acq_rel atomic, and read back past L1 (`.cg`)."""
        last, cb, splits = _last_partial(count_ptr, b, tile, N, BW)
        if last:
            g = tl.zeros((BT, 128), dtype=tl.float32)
            _finish_rows(part_ptr, h_ptr, hs_ptr, wgt_ptr, pos, ok, slot,
                         cb * 128 + tl.arange(0, 128), cb, g, g, N, k1, limit, part_stride,
                         splits, ROUND, HAS_LIMIT, HBF, QH)

    @triton.jit
    def _last_partial(count_ptr, b, tile, N, BW: tl.constexpr):
        """Count this CTA's partial of block b for its 128 channels (g and v tiles of every K
        split, counters [blocks, N / 128]): (whether it was the last, the 128-channel block,
        the splits). The last one puts the counter back to zero for the next launch."""
        cb = tile * BW // 128
        cnt = count_ptr + b * (N // 128) + cb
        splits = tl.num_programs(2)
        tl.debug_barrier()
        last = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == 2 * (128 // BW) * splits - 1
        if last:
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")
        return last, cb, splits

    @triton.jit
    def _finish_rows(part_ptr, h_ptr, hs_ptr, wgt_ptr, pos, ok, slot, cols, cb, g, v, N, k1,
                     limit, part_stride, splits, ROUND: tl.constexpr, HAS_LIMIT: tl.constexpr,
                     HBF: tl.constexpr, QH: tl.constexpr):
        """The finishing CTA's work (`_finish_swiglu`, and the Gluon kernel's `_finish`, which
        passes tensors of its own layouts): g and v [R, 128] (zeros) += the partials of rows
        pos, channels cols, in split order, read past L1 (`.cg`); then h into h_ptr, hs_ptr."""
        p = part_ptr + pos[:, None].to(tl.int64) * (2 * N) + cols[None, :]
        for sp in range(splits):
            off = part_stride.to(tl.int64) * sp
            g += tl.load(p + off, mask=ok[:, None], other=0.0, cache_modifier=".cg")
            v += tl.load(p + off + N, mask=ok[:, None], other=0.0, cache_modifier=".cg")
        hq, hs = _swiglu_quant(g, v, _routing_weight(wgt_ptr, slot, ok, k1), limit, ROUND,
                               HAS_LIMIT, QH)
        _store_h(h_ptr, hs_ptr, pos, ok, cols, cb, N, hq, hs, HBF)

    @triton.jit
    def _swiglu_kernel(part_ptr, slots_ptr, blk_exp_ptr, blk_rows_ptr, wgt_ptr, hq_ptr, hs_ptr,
                       N, n_exp, k1, limit, part_stride, ROUND: tl.constexpr,
                       HAS_LIMIT: tl.constexpr, BT: tl.constexpr, SPLIT: tl.constexpr,
                       HBF: tl.constexpr = False, QH: tl.constexpr = True,
                       PDL: tl.constexpr = False):
        """Split-K gate/up: sum the partial g, v of one (128 channels, block), then SwiGLU and
        FP8 h as the unsplit kernel's epilogue; grid (N/128, blocks)."""
        pdl_start(PDL)
        b = tl.program_id(1)
        e, ok, pos, slot = _block_rows(b, slots_ptr, blk_exp_ptr, blk_rows_ptr, BT)
        if e >= n_exp:
            return
        cols = tl.program_id(0) * 128 + tl.arange(0, 128)
        p = part_ptr + pos[:, None].to(tl.int64) * (2 * N) + cols[None, :]
        g = tl.zeros((BT, 128), dtype=tl.float32)
        v = tl.zeros((BT, 128), dtype=tl.float32)
        for sp in tl.static_range(SPLIT):  # unrolled: every partial's load in flight at once
            off = part_stride.to(tl.int64) * sp
            g += tl.load(p + off, mask=ok[:, None], other=0.0)
            v += tl.load(p + off + N, mask=ok[:, None], other=0.0)
        hq, hs = _swiglu_quant(g, v, _routing_weight(wgt_ptr, slot, ok, k1), limit, ROUND,
                               HAS_LIMIT, QH)
        _store_h(hq_ptr, hs_ptr, pos, ok, cols, tl.program_id(0), N, hq, hs, HBF)

    @triton.jit
    def _combine_kernel(ys_ptr, out_ptr, D, part_stride, pos_ptr, idx_ptr, n_routed,
                        K1: tl.constexpr, SPLIT: tl.constexpr, ROUND: tl.constexpr,
                        BD: tl.constexpr, HAS_POS: tl.constexpr = False,
                        HAS_SHARED: tl.constexpr = True, sh_ptr=None,
                        SH_ROWS: tl.constexpr = False, PDL: tl.constexpr = False):
        """out[t] = sum over the token's K1 slots of y_slot (= the sum of its K-split partials,
        rounded to the working dtype as the expert's output is when ROUND); slot s's row of ys
        is s, or pos[s] when HAS_POS. Slots of another rank's expert (idx = n_routed) have no
        row and add nothing. SH_ROWS: the shared expert's slot (j = 0) is row t of sh_ptr
        (its own [T, D] output, computed apart) instead."""
        pdl_start(PDL)
        t = tl.program_id(0)
        c = tl.program_id(1) * BD + tl.arange(0, BD)
        ok = c < D
        acc = tl.zeros((BD,), dtype=tl.float32)
        for j in tl.static_range(K1):
            y = tl.zeros((BD,), dtype=tl.float32)
            keep = ok
            if j == 0 and not HAS_SHARED:
                keep = ok & False
            if j > 0:
                keep = ok & (tl.load(idx_ptr + t.to(tl.int64) * (K1 - 1) + j - 1) < n_routed)
            if j == 0 and SH_ROWS:
                y += tl.load(sh_ptr + t.to(tl.int64) * D + c, mask=keep, other=0.0).to(tl.float32)
            else:
                if HAS_POS:
                    slot_row = tl.load(pos_ptr + t * K1 + j).to(tl.int64)
                else:
                    slot_row = (t * K1 + j).to(tl.int64)
                for sp in tl.static_range(SPLIT):  # unrolled: all K1 x SPLIT loads in flight
                    row = part_stride.to(tl.int64) * sp + slot_row * D
                    y += tl.load(ys_ptr + row + c, mask=keep, other=0.0).to(tl.float32)
            if ROUND:
                y = y.to(tl.bfloat16).to(tl.float32)
            acc += y
        tl.store(out_ptr + t.to(tl.int64) * D + c, acc, mask=ok)
