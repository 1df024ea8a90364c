"""Benchmark: FP8 linear and FP4 MoE kernels against torch's own paths, on one GPU, one run.

    PYTHONPATH=. python3 benchmarks/bench_linear_moe.py [--quick]

Times are medians of triton.testing.do_bench (which flushes L2 before every run, so weights
come from HBM). Small batches (M <= 128 linears, <= 64-token MoE) are timed as CUDA-graph
replays over rotating weight copies / routings (> 200 MB), as the engine runs decode; larger
ones eagerly. Limits used for the fractions: 4.8 TB/s HBM, 1979 TFLOP/s dense FP8, 989 bf16.
Linear bytes = weight + scales + x + y; MoE "expert bytes" = the weights and scales of the
experts that received tokens plus the shared expert (what must be read at least once).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from dsv4.kernels import quant_linear as ql
from dsv4.kernels.moe import moe_forward, moe_forward_ref
from dsv4.model.moe import Expert
from dsv4.quant.formats import dequant_fp8, quantize_fp8

HBM, FP8_PEAK, BF16_PEAK = 4.8e12, 1979e12, 989e12
SWEEP_TOKENS: list[int] = []  # --tokens
SWEEP_MODEL = ["flash"]  # --sweep-model
SWEEP_KERNEL = ["fp8"]  # --sweep-kernel
GROUPED_MM = [False]  # --grouped-mm
MOE_TOKENS: list[int] = []  # --moe-tokens
DEV = "cuda"


def t_us(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def t_graph_us(fns) -> float:
    """GPU time per call, launch overhead excluded (the engine replays CUDA graphs for small
    batches): one graph runs every fn once; the fns use different weights or routings, so
    their bytes come from HBM, not L2."""
    for f in fns:
        f()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return do_bench(g.replay, warmup=5, rep=30, return_mode="median") * 1e3 / len(fns)


def copies_for(nbytes: int) -> int:
    """How many weight copies make a rotation well past the 60 MB L2."""
    return max(1, min(64, -(-200_000_000 // nbytes)))


def linear_table(quick: bool) -> None:
    shapes = [(4096, 1024, "Flash wq_a"), (1024, 32768, "Flash wq_b"), (8192, 4096, "Flash wo_b"),
              (7168, 1536, "Pro wq_a")]
    ms = [1, 16, 128, 4096, 16384]
    print("\n## FP8 linear (bf16 in/out, 128x128 e4m3 weights, per-token FP8 activations)\n")
    print("| K x N | M | dsv4 us | TFLOP/s | GB/s | %HBM | %FP8 peak | path | triton fused-quant us | triton us | "
          "act_quant+_scaled_mm us | deq+bf16 mm us | bf16 mm (pre-dequantised) us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, n, name in shapes:
        wts = [quantize_fp8(torch.randn(n, k, device=DEV) / k ** 0.5)
               for _ in range(copies_for(n * k))]
        wbs = [dequant_fp8(w, s).bfloat16() for w, s in wts[:copies_for(2 * n * k)]]
        for m in ms:
            x = torch.randn(m, k, device=DEV).bfloat16()
            flops = 2 * m * n * k
            nbytes = n * k + wts[0][1].numel() + m * k * 2 + m * n * 2
            small = m <= ql.SMALL_M

            def timed(call, ws=wts):
                if small:  # graphs over rotating weight copies
                    return t_graph_us([lambda w=w: call(w) for w in ws])
                return t_us(lambda: call(ws[0]))

            path = ("fused" if m <= ql.FUSED_QUANT_MAX_M else "triton" if small else
                    "scaled_mm" if m >= ql.SCALED_MM_MIN_M and ql._SCALED_MM_OK.get((x.device, n, k), True)
                    else "triton")
            auto = timed(lambda w: ql.fp8_linear(x, *w))
            if path == "scaled_mm" and not ql._SCALED_MM_OK.get((x.device, n, k), True):
                path = "triton"
            tri = timed(lambda w: ql._qlinear_cuda(x, ql.FMT_FP8, w[0], w[1].view(torch.uint8),
                                                   None, path="triton"))
            fused = (f"{timed(lambda w: ql._qlinear_cuda(x, ql.FMT_FP8, w[0], w[1].view(torch.uint8), None, path='fused')):.1f}"
                     if small else "-")
            try:
                sc = timed(lambda w: ql._scaled_mm_blockwise(*ql.act_quant_fp8(x), w[0],
                                                             w[1].view(torch.uint8), torch.bfloat16))
                sc = f"{sc:.1f}"
            except Exception as exc:  # noqa: BLE001 - report, keep benchmarking
                sc = f"n/a ({type(exc).__name__})"
            deq = (timed(lambda w: F.linear(x, dequant_fp8(*w).bfloat16()), wts[:1])
                   if not quick else float("nan"))
            bf = timed(lambda wb: F.linear(x, wb), wbs)
            print(f"| {k}x{n} ({name}) | {m} | {auto:.1f} | {flops / auto / 1e6:.1f} | "
                  f"{nbytes / auto / 1e3:.0f} | {100 * nbytes / auto / 1e-6 / HBM:.0f}% | "
                  f"{100 * flops / auto / 1e-6 / FP8_PEAK:.0f}% | {path} | {fused} | {tri:.1f} | {sc} | "
                  f"{deq:.1f} | {bf:.1f} |", flush=True)
        del wts, wbs
        torch.cuda.empty_cache()


def wo_a_table(quick: bool) -> None:
    """The grouped output projection wo_a kept in FP8 against the bf16 einsum of its
    dequantised weight (what the model ran before), graph-timed over rotating weights."""
    from dsv4.kernels.grouped_linear import _grouped_fp8_cuda, grouped_linear
    print("\n## Grouped wo_a (bf16 activations, FP8 weight applied as bf16; SPEC.md 5.5)\n")
    print("| model | G x O x I | T | dsv4 FP8 us | GB/s | %HBM | MMA kernel us (split auto / none / 4 stages; CUDA-core us up to T=4) "
          "| bf16 einsum us | GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, g, i in [("Flash", 8, 4096), ("Pro", 16, 4096)]:
        o = 1024
        wts = [quantize_fp8(torch.randn(g * o, i, device=DEV) / i ** 0.5)
               for _ in range(copies_for(g * o * i))]
        wbs = [dequant_fp8(w, s).bfloat16().view(g, o, i) for w, s in wts[:copies_for(2 * g * o * i)]]
        for t in [1, 2, 16, 64, 256] if quick else [1, 2, 4, 16, 32, 64, 128, 256]:
            x = torch.randn(t, g, i, device=DEV).bfloat16()
            fp8 = t_graph_us([lambda w=w: grouped_linear(x, *w) for w in wts])
            variants = [dict(gemv=False), dict(gemv=False, split=1), dict(gemv=False, stages=4)]
            variants += [dict(gemv=True)] if t <= 4 else []
            mma = " / ".join(f"{t_graph_us([lambda w=w: _grouped_fp8_cuda(x, *w, o, v) for w in wts]):.1f}"
                             for v in variants)
            bf = t_graph_us([lambda w=w: torch.einsum("tgi,goi->tgo", x, w) for w in wbs])
            b8 = g * o * i + g * o * i // 16384 + 2 * t * g * (i + o)
            b16 = 2 * g * o * i + 2 * t * g * (i + o)
            print(f"| {name} | {g}x{o}x{i} | {t} | {fp8:.1f} | {b8 / fp8 / 1e3:.0f} | "
                  f"{100 * b8 / fp8 / 1e-6 / HBM:.0f}% | {mma} | {bf:.1f} | {b16 / bf / 1e3:.0f} |",
                  flush=True)
        del wts, wbs
        torch.cuda.empty_cache()
    from dsv4.kernels.f32_linear import linear_f32
    print("\n## fp32 linears of one decode token (bf16 weight, fp32 products and sums)\n")
    print("| weight N x K | dsv4 us | GB/s | %HBM | cuBLAS bf16 mm(out_dtype=fp32) us | "
          "fp32-held weight F.linear us |")
    print("|---|---|---|---|---|---|")
    for n, k, name in [(256, 4096, "Flash gate"), (1024, 4096, "Flash CSA wkv"),
                       (512, 4096, "Flash HCA wkv"), (384, 7168, "Pro gate")]:
        ws = [torch.randn(n, k, device=DEV).bfloat16() for _ in range(copies_for(2 * n * k))]
        w32 = [w.float() for w in ws[:copies_for(4 * n * k)]]
        x = torch.randn(1, k, device=DEV).bfloat16()
        ours = t_graph_us([lambda w=w: linear_f32(x, w) for w in ws])
        mm = t_graph_us([lambda w=w: torch.mm(x, w.t(), out_dtype=torch.float32) for w in ws])
        old = t_graph_us([lambda w=w: F.linear(x.float(), w) for w in w32])
        print(f"| {name} {n}x{k} | {ours:.1f} | {2 * n * k / ours / 1e3:.0f} | "
              f"{100 * 2 * n * k / ours / 1e-6 / HBM:.0f}% | {mm:.1f} | {old:.1f} |", flush=True)


EXPERT_FORMAT = ["fp4"]  # --experts: the routed experts' format (fp4 = official MXFP4)


def random_experts(n_exp: int, d: int, inter: int):
    """Official layout: MXFP4 routed experts (or `--experts`), FP8 shared expert (bf16 beside
    bf16 experts, as in a bf16 checkpoint), random codes and scales."""
    fmt = EXPERT_FORMAT[0]
    with torch.device(DEV):
        experts = torch.nn.ModuleList(Expert(d, inter, fmt, 10.0, torch.bfloat16)
                                      for _ in range(n_exp))
        shared = Expert(d, inter, shared_format(), 10.0, torch.bfloat16)
    for m in experts:
        for lin in (m.w1, m.w2, m.w3):
            if fmt == "fp4":
                e = 127 - 2 - (lin.in_features.bit_length() - 1) // 2
                lin.weight.view(torch.uint8).random_(0, 256)
                lin.scale.view(torch.uint8).random_(e - 1, e + 2)
            else:
                w = torch.randn(lin.out_features, lin.in_features, device=DEV)
                lin.set_float(w / lin.in_features ** 0.5)
    for lin in (shared.w1, shared.w2, shared.w3):
        if shared_format() == "bf16":
            lin.set_float(torch.randn(lin.out_features, lin.in_features, device=DEV)
                          / lin.in_features ** 0.5)
            continue
        w, s = quantize_fp8(torch.randn(lin.out_features, lin.in_features, device=DEV)
                            / lin.in_features ** 0.5)
        lin.weight.copy_(w), lin.scale.copy_(s)
    return experts, shared


def shared_format() -> str:
    return "bf16" if EXPERT_FORMAT[0] == "bf16" else "fp8"


def expert_bytes(lin) -> int:
    return sum(p.numel() * p.element_size() for p in lin.parameters())


def coordinate_search(base: dict, choices: dict, timed, label: str) -> dict:
    """Greedy coordinate search over launch parameters from `base`; prints base and best. A
    choice that is a dict sets several parameters at once (parameters that only work
    together, such as the bf16 decode and its exact bf16 inputs)."""
    best = dict(base)
    print(f"{label} default {base}: {timed(best):.1f} us", flush=True)
    for _ in range(2):
        for name, vals in choices.items():
            for v in vals:
                cand = dict(best, **(v if isinstance(v, dict) else {name: v}))
                if timed(cand) < timed(best):
                    best = cand
    print(f"{label} best {best}: {timed(best):.1f} us", flush=True)
    return best


def memo_timer(fn, label: str):
    seen: dict = {}

    def timed(cfg):
        key = tuple(sorted(cfg.items()))
        if key not in seen:
            try:
                seen[key] = fn(cfg)
                print(f"  {label} {cfg}: {seen[key]:.1f} us", flush=True)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile
                print(f"  {label} {cfg}: {type(exc).__name__} {str(exc)[:100]}", flush=True)
                seen[key] = float("inf")
                if "illegal memory access" in str(exc):  # the CUDA context is lost: stop here
                    raise
        return seen[key]
    return timed


def linear_sweep(quick: bool) -> None:
    """Launch-parameter sweep of the Triton FP8 linear at decode sizes."""
    print("\n## FP8 linear launch sweep (fused-quant path up to M=16)\n")
    for k, n in [(4096, 1024), (1024, 32768), (8192, 4096), (7168, 1536)]:
        wts = [quantize_fp8(torch.randn(n, k, device=DEV) / k ** 0.5)
               for _ in range(copies_for(n * k))]
        nbytes = n * k + wts[0][1].numel()
        for m in (1, 16, 128):
            x = torch.randn(m, k, device=DEV).bfloat16()
            path = "fused" if m <= ql.FUSED_QUANT_MAX_M else "triton"
            timed = memo_timer(lambda cfg: t_graph_us(
                [lambda w=w: ql._qlinear_cuda(x, ql.FMT_FP8, w[0], w[1].view(torch.uint8), None,
                                              path=path, cfg=cfg) for w in wts]), f"{k}x{n} M={m}")
            bw, bt, warps, stages = ql._small_m_config(m, n)
            best = coordinate_search(
                dict(bw=bw, bt=bt, warps=warps, split=None, stages=stages),
                dict(bw=[32, 64, 128, 256], warps=[2, 4, 8], stages=[2, 3, 4, 5, 6],
                     split=[None, 1, 2, 4, 8, 16], prefetch=[False, True]), timed,
                f"{k}x{n} M={m}")
            print(f"   -> {100 * nbytes / timed(best) / 1e-6 / HBM:.0f}% HBM on weight bytes")
        wts = None  # freed (None, not del: the lambdas above name it)
        torch.cuda.empty_cache()


def moe_sweep(quick: bool) -> None:
    """Launch-parameter sweep of the MoE kernels at decode batch sizes (Flash shapes): a
    coordinate search from moe_config's choice, CUDA-graph timed as in the table. MXFP4
    experts on the Gluon kernel search its choices (tile rows, K splits, ring depth, register
    cap, the weights through registers or a shared ring); `DSV4_MOE_GLUON=0` searches the
    Triton kernel's."""
    from dsv4.kernels import moe as km
    from dsv4.kernels import num_sms
    n_exp, d, inter = (384, 7168, 3072) if SWEEP_MODEL[0] == "pro" else (256, 4096, 2048)
    k = 6
    experts, shared = random_experts(n_exp, d, inter)
    print(f"\n## MoE launch sweep ({SWEEP_MODEL[0].title()}, {EXPERT_FORMAT[0]} experts + "
          f"{shared_format()} shared)\n")
    for t in SWEEP_TOKENS or ((1, 8, 64) if quick else (1, 8, 64, 4096)):
        u = torch.randn(t, d, device=DEV).bfloat16()
        routes = []
        for _ in range(4):
            idx = torch.rand(t, n_exp, device=DEV).topk(k, dim=-1).indices
            routes.append((idx, torch.rand(t, k, device=DEV) + 0.05))
        base = km.moe_config(t, k, n_exp, d, inter, num_sms(DEV))
        if t <= 64:
            timed = memo_timer(lambda cfg: t_graph_us(
                [lambda r=r: km._moe_cuda(u, *r, experts, shared, cfg) for r in routes]),
                f"T={t}")
        else:
            timed = memo_timer(lambda cfg: t_us(
                lambda: km._moe_cuda(u, *routes[0], experts, shared, cfg)), f"T={t}")
        # the decode first: it changes which tile shapes pay; then the tiles, the pipeline,
        # the L2 prefetch depth (`DSV4_L2_PREFETCH`) and, for large batches, the token tile
        # (`abf` needs the bf16 decode: the pair is one choice; with KC = 128 its MMAs
        # pipeline, 7 in flight, where the e4m3 decode waits for each 32-deep MMA)
        space = dict(dec=[dict(dec=0, abf=False), dict(dec=0, abf=True), dict(dec=1, abf=False),
                          dict(dec=2, abf=False)], kc=[32, 64, 128], bw1=[64, 128],
                     bw2=[32, 64, 128], stages=[2, 3, 4, 5], warps=[2, 4, 8],
                     split1=[1, 2, 4, 8, 16], split2=[1, 2, 4, 8], prefetch=[0, 2, 4, 8],
                     # a register cap: the e4m3-decode launch holds 80 registers (6 CTAs of 4
                     # warps an SM); 64 makes 8, with one local load a K-block (sm_90 offline)
                     maxnreg=[0, 64, 72])
        if t > 64:
            space["bt"] = [16, 32, 64, 128, 256]
        if EXPERT_FORMAT[0] != "fp4":  # the decode choice is MXFP4's
            del space["dec"]
        if EXPERT_FORMAT[0] == "fp4" and km._gluon_applies(base, km.FMT_MXFP4):
            # the Gluon kernel takes these launches (`moe_mx_gluon.py`): its own choices
            # (`DSV4_MOE_GLUON=0`: the Triton kernel's, above)
            space = dict(gbw=[dict(gbw1=64, gbw2=64), dict(gbw1=128, gbw2=128)],
                         gsplit1=[1, 2, 3, 4, 8], gsplit2=[1, 2, 4], gstages=[2, 3, 4],
                         gmaxnreg=[0, 72, 96, 128], gwsmem=[False, True])
        coordinate_search(base, space, timed, f"MoE T={t}")
    experts = shared = None  # freed
    torch.cuda.empty_cache()


def gemm_sweep(quick: bool) -> None:
    """Launch sweep of the grouped FP8 GEMM (`grouped_fp8_gemm`, the prefill MoE's on e4m3
    copies) at the layer's shapes (--sweep-model flash|pro, --tokens, default 8192 and 32768):
    w1|w3 (N = 2I, K = d) and w2 (N = d, K = I) over the routed experts, rows per expert as
    top-6 routing of random tokens gives them, padded to the plan's 16-row blocks; scales
    laid out as the path makes them (block-major)."""
    from dsv4.kernels import grouped_fp8_gemm as gfg
    n_exp, d, inter = (384, 7168, 3072) if SWEEP_MODEL[0] == "pro" else (256, 4096, 2048)
    if SWEEP_KERNEL[0] == "mxfp4":
        return mxfp4_gemm_sweep(n_exp, d, inter)
    row = SWEEP_KERNEL[0] == "fp8-row"  # one scale a weight row (the MXFP4 copies')
    print(f"\n## Grouped FP8 GEMM launch sweep ({SWEEP_MODEL[0].title()}, {n_exp} experts, "
          f"{'row' if row else 'block'} scales)\n")

    def codes(*shape):  # random finite e4m3 codes (no NaN), made as bytes
        c = torch.randint(0, 0x7E, shape, dtype=torch.uint8, device=DEV)
        c |= torch.randint(0, 2, shape, dtype=torch.uint8, device=DEV) << 7
        return c.view(torch.float8_e4m3fn)

    for t in SWEEP_TOKENS or (8192, 32768):
        idx = torch.rand(t, n_exp, device=DEV).topk(6, dim=-1).indices
        counts = torch.bincount(idx.flatten(), minlength=n_exp)
        ends = ((counts + 15) // 16 * 16).cumsum(0).to(torch.int32)
        m = int(ends[-1])
        for name, n, k in (("w1|w3", 2 * inter, d), ("w2", d, inter)):
            a = codes(m, k)
            sa = (2.0 ** torch.randint(-8, 0, (k // 128, m), device=DEV).float()).t()
            b = codes(n_exp, n, k)
            sb = (2.0 ** torch.randint(-12, -6, (n_exp, k // 128, n), device=DEV).float()
                  ).transpose(1, 2)
            if row:
                sb = sb[..., 0].contiguous()
            flops = 2.0 * m * n * k
            label = f"{name} T={t} (M={m}, N={n}, K={k})"
            timed = memo_timer(lambda cfg: t_us(
                lambda: gfg.grouped_fp8_gemm(a, sa, b, sb, ends, cfg)), label)
            base = gfg.launch_config(m, n, k)
            best = coordinate_search(base, dict(
                bm=[64, 128], bn=[128, 256], warps=[4, 8], stages=[3, 4, 5], ctas=[1, 2],
                tma=[False, True],
                # 128-row tiles need 8 warps (two warpgroups) to hold their accumulators
                tile=[dict(bm=128, bn=128, warps=8, ctas=1), dict(bm=128, bn=256, warps=8, ctas=2),
                      dict(bm=128, bn=256, warps=8, ctas=1)]), timed, label)
            for tag, cfg in (("default", base), ("best", best)):
                print(f"   -> {tag}: {flops / timed(cfg) / 1e6:.0f} TFLOP/s", flush=True)
            a = b = sa = sb = None  # freed
            torch.cuda.empty_cache()


def mxfp4_gemm_sweep(n_exp: int, d: int, inter: int) -> None:
    """`--sweep-kernel mxfp4`: launch sweep of the grouped FP8 GEMM that decodes MXFP4 experts
    in place (`moe_grouped_mm.grouped_mxfp4_gemm`) at the layer's shapes, random MXFP4
    experts in the kernels' layout (FP8 shared expert apart: plan group 0 empty), rows per
    expert as top-6 routing of random tokens gives them, padded to the plan's 16-row blocks.
    A larger row tile amortises each K-block's decode of the weight tile over more rows."""
    from dsv4.kernels import moe as km
    from dsv4.kernels import moe_grouped_mm as gm
    print(f"\n## In-place MXFP4 grouped GEMM launch sweep ({SWEEP_MODEL[0].title()}, {n_exp} "
          "experts)\n")
    experts, shared = random_experts(n_exp, d, inter)
    main, extra = km._tables(experts, shared, torch.device(DEV))
    pt, g_off = main.ptrs, 0 if extra is None else 1
    for t in SWEEP_TOKENS or (4096, 8192, 32768):
        idx = torch.rand(t, n_exp, device=DEV).topk(6, dim=-1).indices
        counts = torch.bincount(idx.flatten(), minlength=n_exp)
        counts = torch.cat([counts.new_zeros(g_off), counts])  # the shared expert's group
        ends = ((counts + 15) // 16 * 16).cumsum(0).to(torch.int32)
        m = int(ends[-1])
        for name, k, tabs, n_half in (("w1|w3", d, (("w1w", "w3w"), ("w1s", "w3s")), inter),
                                      ("w2", inter, (("w2w",), ("w2s",)), d)):
            a = torch.randint(0, 0x7E, (m, k), dtype=torch.uint8, device=DEV).view(
                torch.float8_e4m3fn)
            sa = (2.0 ** torch.randint(-8, 0, (k // 128, m), device=DEV).float()).t()
            w_tabs, s_tabs = (tuple(pt[n] for n in names) for names in tabs)
            flops = 2.0 * m * len(w_tabs) * n_half * k
            label = f"{name} T={t} (M={m}, N={len(w_tabs) * n_half}, K={k})"
            timed = memo_timer(lambda cfg: t_us(lambda: gm.grouped_mxfp4_gemm(
                a, sa, w_tabs, s_tabs, n_half, ends, g_off, **cfg)), label)
            base = dict(bm=64, bn=128, warps=4, stages=3)
            best = coordinate_search(base, dict(bm=[64, 128, 256], bn=[64, 128, 256],
                                                warps=[4, 8], stages=[2, 3, 4]), timed, label)
            for tag, cfg in (("default", base), ("best", best)):
                print(f"   -> {tag}: {flops / timed(cfg) / 1e6:.0f} TFLOP/s", flush=True)
            a = sa = None  # freed
            torch.cuda.empty_cache()


def moe_table(quick: bool) -> None:
    from dsv4.kernels import moe as km
    from dsv4.kernels import moe_grouped_mm as gm
    cfgs = [("Flash", 256, 4096, 2048), ("Pro", 384, 7168, 3072)]
    tokens = MOE_TOKENS or [1, 8, 64, 512, 4096, 32768]
    k = 6
    print(f"\n## MoE layer (top-6 {EXPERT_FORMAT[0]} experts + {shared_format()} shared expert, "
          "bf16, routing given)\n")
    print("| model | tokens | dsv4 us | TFLOP/s | %bf16 peak | expert GB/s | %HBM | experts read | "
          "torch reference us |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n_exp, d, inter in cfgs:
        experts, shared = random_experts(n_exp, d, inter)
        per_expert = sum(expert_bytes(getattr(experts[0], w)) for w in ("w1", "w2", "w3"))
        shared_bytes = sum(expert_bytes(getattr(shared, w)) for w in ("w1", "w2", "w3"))
        for t in tokens:
            if quick and t > 4096 and not MOE_TOKENS:
                continue
            u = torch.randn(t, d, device=DEV).bfloat16()
            routes = []
            for _ in range(4 if t <= 64 else 1):  # small batches: rotate routings (new experts)
                idx = torch.rand(t, n_exp, device=DEV).topk(k, dim=-1).indices
                wgt = torch.rand(t, k, device=DEV) + 0.05
                routes.append((idx, wgt * (1.5 / wgt.sum(-1, keepdim=True))))
            idx, wgt = routes[0]
            used = sum(r[0].unique().numel() for r in routes) / len(routes)
            nbytes = used * per_expert + shared_bytes
            flops = 2 * t * (k + 1) * 3 * d * inter
            if t <= 64:
                us = t_graph_us([lambda r=r: moe_forward(u, *r, experts, shared) for r in routes])
            else:
                us = t_us(lambda: moe_forward(u, idx, wgt, experts, shared))
            ref = "-"
            if t <= 64:
                os.environ["DSV4_DISABLE_TRITON"] = "1"
                ref = f"{t_us(lambda: moe_forward_ref(u, idx, wgt, experts, shared)):.0f}"
                del os.environ["DSV4_DISABLE_TRITON"]
            print(f"| {name} | {t} | {us:.1f} | {flops / us / 1e6:.1f} | "
                  f"{100 * flops / us / 1e-6 / BF16_PEAK:.0f}% | {nbytes / us / 1e3:.0f} | "
                  f"{100 * nbytes / us / 1e-6 / HBM:.0f}% | {used:.0f}+1 | {ref} |", flush=True)
            if GROUPED_MM[0] and t >= 512:  # dequantised experts + torch's grouped GEMM
                try:
                    for label, env in GROUPED_VARIANTS[0]:
                        with _environ(env):
                            gus = t_us(lambda: km._moe_cuda(u, idx, wgt, experts, shared,
                                                            dict(grouped_mm=True)))
                        print(f"| {name} grouped_mm{label} | {t} | {gus:.1f} | "
                              f"{flops / gus / 1e6:.1f} | "
                              f"{100 * flops / gus / 1e-6 / BF16_PEAK:.0f}% | - | - | all | - |",
                              flush=True)
                    if t in (4096, 8192):
                        profile(lambda: km._moe_cuda(u, idx, wgt, experts, shared,
                                                     dict(grouped_mm=True)),
                                f"{name} T={t} grouped_mm")
                except torch.OutOfMemoryError:
                    print(f"| {name} grouped_mm | {t} | out of memory | | | | | | |", flush=True)
                torch.cuda.empty_cache()
            if t in (1, 4096):
                profile(lambda: moe_forward(u, idx, wgt, experts, shared), f"{name} T={t}")
        experts = shared = None  # freed
        gm.release_workspace()
        torch.cuda.empty_cache()


# --grouped-variants: the grouped path's copies A/B in one process, each (label, environment)
GROUPED_VARIANTS: list = [[("", {})]]
_VARIANTS = [(" bf16 copies", {"DSV4_MOE_FP8_GEMM": "0"}),
             (" e4m3 copies", {"DSV4_MOE_FP8_GEMM": "1", "DSV4_MOE_FP4_GEMM": "0"}),
             # (after the e4m3 copies: the in-place decode needs a layer's copy found exact)
             (" MXFP4 in place", {"DSV4_MOE_FP8_GEMM": "1", "DSV4_MOE_FP4_GEMM": "1"})]


@contextlib.contextmanager
def _environ(env: dict):
    """Set these environment variables for the block (the MoE reads them per call)."""
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, val in old.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val


_PROFILES: list[str] = []


def profile(fn, label: str) -> None:
    """Per-kernel GPU time of one call, printed at the end."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    _PROFILES.append(f"{label}: " + ", ".join(f"{key[:40]} {us:.0f}us" for key, us in rows[:10]))


def kernel_resources() -> None:
    """Registers and spills of every compiled variant (Triton's compiled-kernel metadata)."""
    from dsv4.kernels import moe as km
    for name, fn in [("qlinear", ql._qlinear_kernel), ("moe_gemm", km._moe_gemm_kernel)]:
        try:
            for cache in fn.device_caches.values():
                for key, kern in cache[0].items():
                    consts = [v for t, v in key[1] if t == "constexpr"] if isinstance(key, tuple) \
                        and len(key) > 1 and isinstance(key[1], (list, tuple)) else str(key)[-60:]
                    print(f"{name} {consts}: regs {kern.n_regs} spills {kern.n_spills}")
        except Exception as exc:  # noqa: BLE001
            print(f"{name}: no resource info ({exc})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["linear", "wo_a", "moe", "sweep", "linear-sweep",
                                       "gemm-sweep"], default=None)
    ap.add_argument("--tokens", type=int, nargs="*", default=[],
                    help="MoE / grouped GEMM sweep batch sizes")
    ap.add_argument("--sweep-model", choices=["flash", "pro"], default="flash",
                    help="MoE / grouped GEMM sweep shapes (Flash 256 x 4096 x 2048, Pro 384 x "
                         "7168 x 3072)")
    ap.add_argument("--sweep-kernel", choices=["fp8", "fp8-row", "mxfp4"], default="fp8",
                    help="gemm-sweep: the grouped FP8 GEMM on e4m3 copies (block or row "
                         "scales), or the one decoding MXFP4 experts in place")
    ap.add_argument("--moe-tokens", type=int, nargs="*", default=[],
                    help="MoE table batch sizes (default 1 8 64 512 4096 32768)")
    ap.add_argument("--grouped-mm", action="store_true",
                    help="MoE table: also time the dequantise + torch grouped GEMM path "
                         "(DSV4_MOE_GROUPED_MM) from 512 tokens")
    ap.add_argument("--grouped-variants", action="store_true",
                    help="with --grouped-mm: time the grouped path on bf16 copies, e4m3 copies "
                         "and MXFP4 decoded in place (DSV4_MOE_FP8_GEMM / DSV4_MOE_FP4_GEMM), "
                         "in one process")
    ap.add_argument("--experts", choices=["fp4", "nvfp4", "fp8", "bf16"], default="fp4",
                    help="routed experts' format in the MoE table and sweep")
    args = ap.parse_args()
    SWEEP_TOKENS.extend(args.tokens)
    SWEEP_MODEL[0] = args.sweep_model
    SWEEP_KERNEL[0] = args.sweep_kernel
    GROUPED_MM[0] = args.grouped_mm or args.grouped_variants
    if args.grouped_variants:
        GROUPED_VARIANTS[0] = _VARIANTS
    MOE_TOKENS.extend(args.moe_tokens)
    EXPERT_FORMAT[0] = args.experts
    p = torch.cuda.get_device_properties(0)
    print(f"# {p.name}, {p.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    for name, fn in [("linear", linear_table), ("wo_a", wo_a_table), ("moe", moe_table), ("sweep", moe_sweep),
                     ("linear-sweep", linear_sweep), ("gemm-sweep", gemm_sweep)]:
        if args.only == name or (args.only is None and "sweep" not in name):
            try:
                fn(args.quick)
            except Exception:  # noqa: BLE001 - keep the other table
                traceback.print_exc(file=sys.stdout)
    print("\n## Per-kernel GPU time of one MoE call")
    for line in _PROFILES:
        print(line)
    print("\n## Kernel resources")
    kernel_resources()


if __name__ == "__main__":
    main()
