"""Benchmark of the attention-path kernels against their torch references on one GPU.

    PYTHONPATH=. python3 benchmarks/bench_attention.py [--quick] [--configs] [--triton] [--rank-heads]
        [--ws]

Prints, per case, the median time of the Triton kernel and of the torch reference (same inputs,
same run, `triton.testing.do_bench`), the bytes the kernel must move (each input row read once,
each output written once) over its time, its FLOP rate, and both as fractions of the H200's
limits (4.8 TB/s HBM, 989 TFLOP/s dense bf16). Inputs rotate over sets larger than L2 where one
call would otherwise fit in cache.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from dsv4.kernels.compressor import compress_pool_ref, compress_pool_triton
from dsv4.kernels.index_fp4 import pack_index_fp4
from dsv4.kernels.indexer import indexer_scores_triton, indexer_topk_ref
from dsv4.kernels.topk import _topk_split_cuda, select_topk
from dsv4.kernels.kv_fp8 import kv_fp8_row_bytes, pack_kv_fp8
from dsv4.kernels.mhc import hc_post_ref, hc_post_triton, hc_pre_ref, hc_pre_triton
from dsv4.kernels.rmsnorm import rmsnorm_ref, rmsnorm_triton
from dsv4.kernels.sparse_attention import AttnConfig, sparse_attention_ref, sparse_attention_triton
from dsv4.quant.sim import fp4_sim, fp8_sim

HBM_BPS, BF16_FLOPS = 4.8e12, 989e12
ROTATE_BYTES = 256 << 20  # several times the 60 MB L2
DEV = "cuda"
ROWS: list[str] = []


def bench(fns: list, rep: int = 60) -> float:
    """Median ms of one call, the calls rotating over fns (input sets). Timed as CUDA-graph
    replays of one pass over all sets, so that Python launch overhead (~50-100 us a call here,
    which a serving engine removes with graphs) does not hide the GPU time."""
    def run_all():
        for f in fns:
            f()
    # do_bench_cudagraph runs on a new stream that does not wait for the default one: without
    # this, its first calls may read index tensors still being written (garbage row indices)
    torch.cuda.synchronize()
    try:
        return do_bench_cudagraph(run_all, rep=rep, return_mode="median") / len(fns)
    except Exception as e:  # not capturable: eager timing
        print(f"# graph capture failed ({type(e).__name__}: {str(e)[:80]}), timing eagerly")
        it = iter(range(1 << 62))
        return do_bench(lambda: fns[next(it) % len(fns)](), warmup=10, rep=rep, return_mode="median")


def report(name: str, ms: float, ref_ms: float | None, nbytes: float, flops: float) -> None:
    gbs, tfl = nbytes / ms / 1e6, flops / ms / 1e9
    ref = f"{ref_ms * 1e3:9.1f}" if ref_ms is not None else "        -"
    speed = f"{ref_ms / ms:6.1f}x" if ref_ms is not None else "      -"
    line = (f"{name:<44} {ms * 1e3:9.1f} {ref}  {speed} {gbs:8.0f} {100 * gbs * 1e9 / HBM_BPS:5.1f}% "
            f"{tfl:7.1f} {100 * tfl * 1e12 / BF16_FLOPS:5.1f}%")
    ROWS.append(line)
    print(line, flush=True)


def header() -> str:
    return (f"{'case':<44} {'us':>9} {'ref us':>9}  {'speedup':>7} {'GB/s':>8} {'%HBM':>6} "
            f"{'TFLOP/s':>7} {'%peak':>6}")


def kv_rows(n: int, gen) -> torch.Tensor:
    x = torch.randn(n, 512, generator=gen, device=DEV)
    return torch.cat([fp8_sim(x[:, :448], 64), x[:, 448:]], 1).bfloat16()


# ------------------------------------------------------------------------------ attention
def bench_attention(H: int, topk: int, B: int, fp8: bool, configs: list[AttnConfig] | None,
                    with_ref: bool) -> None:
    """Decode: B tokens, each with a 128-row window (127 cached + its own new row) and `topk`
    compressed rows, all distinct rows of large caches."""
    gen = torch.Generator(device=DEV).manual_seed(0)
    D, Kw = 512, 128
    row_bytes = kv_fp8_row_bytes(D, 64) if fp8 else 2 * D
    per_call = B * (Kw + topk) * row_bytes
    sets = max(1, min(256, math.ceil(ROTATE_BYTES / per_call)))
    nw, nc = sets * B * (Kw - 1), sets * B * topk
    win_cache, cmp_cache = kv_rows(nw, gen), kv_rows(nc, gen)
    if fp8:
        win_p, cmp_p = pack_kv_fp8(win_cache), pack_kv_fp8(cmp_cache)
    inputs = []
    wperm = torch.randperm(nw, device=DEV, generator=gen)
    cperm = torch.randperm(nc, device=DEV, generator=gen)
    for s in range(sets):
        q = torch.randn(B, H, D, generator=gen, device=DEV)
        q = (q * torch.rsqrt(q.square().mean(-1, keepdim=True))).bfloat16()
        wi = wperm[s * B * (Kw - 1):(s + 1) * B * (Kw - 1)].view(B, Kw - 1)
        wi = torch.cat([wi, nw + torch.arange(B, device=DEV)[:, None]], 1)
        ci = cperm[s * B * topk:(s + 1) * B * topk].view(B, topk)
        inputs.append((q, kv_rows(B, gen), wi, ci))
    sink = torch.randn(H, generator=gen, device=DEV)
    wc, cc = (win_p, cmp_p) if fp8 else (win_cache, cmp_cache)
    nbytes = per_call + 2 * 2 * B * H * D
    flops = 4.0 * B * H * (Kw + topk) * D
    ref_ms = None
    if with_ref:
        try:
            ref_fns = [lambda a=a: sparse_attention_ref(a[0], sink, D ** -0.5, wc, a[1], a[2], cc, a[3])
                       for a in inputs[:2]]
            ref_ms = bench(ref_fns, rep=30)
        except torch.OutOfMemoryError:
            ref_ms = None
        torch.cuda.empty_cache()
    for cfg in configs or [None]:
        fns = [lambda a=a: sparse_attention_triton(a[0], sink, D ** -0.5, wc, a[1], a[2], cc, a[3],
                                                   config=cfg) for a in inputs]
        tag = "" if cfg is None else (f" h{cfg.block_h}k{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}"
                                      + (f" split{cfg.splits}" if cfg.splits else "")
                                      + (f" {cfg.kernel}" if cfg.kernel != "auto" else ""))
        try:
            ms = bench(fns)
        except Exception as e:  # a config that does not compile on this GPU
            print(f"attn H={H} B={B}{tag}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        fmt = "fp8" if fp8 else "bf16"
        report(f"attn H={H} k={topk}+{Kw} B={B} {fmt}{tag}", ms, ref_ms, nbytes, flops)


# ------------------------------------------------------------------------------ indexer
INDEXER_WAVES = [False]  # --indexer-waves

def bench_indexer(ctx: int, B: int, topk: int, with_ref: bool) -> None:
    gen = torch.Generator(device=DEV).manual_seed(1)
    nI, c, N = 64, 128, ctx // 4
    per_call = B * N * c * 2
    sets = max(1, min(16, math.ceil(ROTATE_BYTES / per_call)))
    keys = fp4_sim(torch.randn(sets * B * N, c, generator=gen, device=DEV), 32).bfloat16()
    inputs = []
    for s in range(sets):
        q = fp4_sim(torch.randn(B, nI, c, generator=gen, device=DEV), 32).bfloat16()
        w = (torch.randn(B, nI, generator=gen, device=DEV) * (c * nI) ** -0.5).bfloat16()
        cand = (s * B * N + torch.arange(B * N, device=DEV)).view(B, N)
        inputs.append((q, w, cand))
    nbytes = per_call + B * N * 8 + B * N * 4
    flops = 2.0 * B * N * nI * c
    ref_ms = None
    if with_ref:
        ref_ms = bench([lambda a=a: indexer_topk_ref(a[0], a[1], keys, a[2], topk) for a in inputs[:2]],
                       rep=30)
    ms = bench([lambda a=a: indexer_scores_triton(a[0], a[1], keys, a[2]) for a in inputs])
    report(f"indexer scores ctx={ctx // 1024}K B={B}", ms, None, nbytes, flops)
    ms = bench([lambda a=a: select_topk(indexer_scores_triton(a[0], a[1], keys, a[2]), a[2], topk)
                for a in inputs])
    report(f"indexer scores+topk{topk} ctx={ctx // 1024}K B={B}", ms, ref_ms, nbytes, flops)
    scores = [indexer_scores_triton(a[0], a[1], keys, a[2]) for a in inputs[:2]]
    ms = bench([lambda s=s, a=a: select_topk(s, a[2], topk) for s, a in zip(scores, inputs)])
    t_ms = bench([lambda s=s: torch.topk(s, topk, dim=-1, sorted=False) for s in scores])
    report(f"top-{topk} alone ctx={ctx // 1024}K B={B} (torch.topk {t_ms * 1e3:.1f} us)", ms,
           None, B * N * 4, 0.0)
    ms = bench([lambda s=s, a=a: _topk_split_cuda(s, a[2], topk) for s, a in zip(scores, inputs)])
    report(f"top-{topk} split over 4K-column programs ctx={ctx // 1024}K B={B}", ms, None,
           B * N * 4, 0.0)
    # the engine's layout: packed FP4 keys (80 bytes instead of 256), same values
    packed = pack_index_fp4(keys)
    pbytes = nbytes - per_call + B * N * packed.shape[1]
    ms = bench([lambda a=a: indexer_scores_triton(a[0], a[1], packed, a[2]) for a in inputs])
    report(f"indexer scores ctx={ctx // 1024}K B={B} packed keys", ms, None, pbytes, flops)
    # the same on FP8 tensor cores (queries on the FP4 grid, as the model's QAT makes them)
    ms = bench([lambda a=a: indexer_scores_triton(a[0], a[1], packed, a[2], q_fp4=True,
                                                   fold=False) for a in inputs])
    report(f"indexer scores ctx={ctx // 1024}K B={B} packed keys, FP8 MMA", ms, None, pbytes,
           flops)
    # the same with each head's query scales folded into one, and each key's (`indexer.py`,
    # `fold`; the default from 8 tokens)
    if INDEXER_WAVES[0]:  # key blocks a CTA: T x blocks / (4 x SMs) rounded up (the default:
        # one wave of 4 CTAs an SM), rounded down (a second, short wave), for 3 and 2 an SM
        n_blocks = -(-N // 64)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for bpc in sorted({max(1, B * n_blocks // (4 * sms)), -(-B * n_blocks // (4 * sms)),
                           -(-B * n_blocks // (3 * sms)), -(-B * n_blocks // (2 * sms))}):
            ms = bench([lambda a=a: indexer_scores_triton(a[0], a[1], packed, a[2], q_fp4=True,
                                                           blocks_per_cta=bpc) for a in inputs])
            ctas = B * -(-n_blocks // bpc)
            report(f"indexer scores ctx={ctx // 1024}K B={B} packed, FP8 MMA, {bpc} blocks a "
                   f"CTA ({ctas} CTAs)", ms, None, pbytes, flops)
    ms = bench([lambda a=a: indexer_scores_triton(a[0], a[1], packed, a[2], q_fp4=True,
                                                   fold=True) for a in inputs])
    report(f"indexer scores ctx={ctx // 1024}K B={B} packed keys, FP8 MMA, folded", ms, None,
           pbytes, flops)
    # the Gluon kernel (`indexer_wg.py`: keys decoded in place as the wgmma's A operand; the
    # default where it builds), at 128 registers (4 CTAs an SM, the default) and uncapped, and
    # with two warpgroups a CTA (128 keys a step)
    for reg, bn in ((128, 64), (None, 64), (128, 128)):
        ms = bench([lambda a=a: indexer_scores_triton(a[0], a[1], packed, a[2], q_fp4=True,
                                                       gluon=True, maxnreg=reg, gluon_block_n=bn)
                    for a in inputs])
        report(f"indexer scores ctx={ctx // 1024}K B={B} packed keys, Gluon kernel, "
               f"{bn} keys a step, maxnreg {reg}", ms, None, pbytes, flops)
    if INDEXER_WAVES[0]:
        for bpc in sorted({-(-B * n_blocks // (4 * sms)), -(-B * n_blocks // (3 * sms)),
                           -(-B * n_blocks // (8 * sms))}):
            ms = bench([lambda a=a: indexer_scores_triton(a[0], a[1], packed, a[2], q_fp4=True,
                                                           gluon=True, blocks_per_cta=bpc)
                        for a in inputs])
            report(f"indexer scores ctx={ctx // 1024}K B={B} packed, Gluon kernel, {bpc} blocks "
                   f"a CTA ({B * -(-n_blocks // bpc)} CTAs)", ms, None, pbytes, flops)


# ------------------------------------------------------------------------------ compressor
def bench_compressor(tokens: int, m: int, C: int) -> None:
    gen = torch.Generator(device=DEV).manual_seed(2)
    k = 2 if m == 4 else 1
    W, items = tokens // m, k * m
    kv = torch.randn(W, items, C, generator=gen, device=DEV)
    score = torch.randn(W, items, C, generator=gen, device=DEV)
    valid = torch.ones(W, items, dtype=torch.bool, device=DEV)
    nbytes = 2 * kv.numel() * 4 + W * C * 4
    ref_ms = bench([lambda: compress_pool_ref(kv, score, valid)])
    ms = bench([lambda: compress_pool_triton(kv, score, valid)])
    report(f"compress_pool {tokens} tok m={m} C={C}", ms, ref_ms, nbytes, 0.0)


# ------------------------------------------------------------------------------ mHC, RMSNorm
# (tokens, K columns, warps, stages) a CTA of hc_pre's mix kernel, for --mhc-sweep; sm_90
# offline: 64/64/4/3 118 registers, 52 KB shared (4 CTAs an SM); 128/64/8/3 98 registers, 68 KB
# (3 an SM); 128/64/4/3 180 registers
MIX_CONFIGS = [(64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 3),
               (256, 64, 8, 2), (64, 128, 4, 2)]

def bench_mhc(T: int, d: int, mix_sweep: bool = False) -> None:
    gen = torch.Generator(device=DEV).manual_seed(3)
    n = 4
    sets = max(1, math.ceil(ROTATE_BYTES / (T * n * d * 2)))
    xs = [torch.randn(T, n, d, generator=gen, device=DEV).bfloat16() for _ in range(sets)]
    fn = torch.randn((2 + n) * n, n * d, generator=gen, device=DEV) * (n * d) ** -0.5
    scale, base = torch.rand(3, device=DEV), torch.randn((2 + n) * n, device=DEV)
    pre_bytes = T * n * d * 2 + T * d * 2 + fn.numel() * 4
    ref_ms = bench([lambda x=x: hc_pre_ref(x, fn, scale, base, 1e-6, 1e-6, 20) for x in xs[:2]], rep=30)
    ms = bench([lambda x=x: hc_pre_triton(x, fn, scale, base, 1e-6, 1e-6, 20) for x in xs])
    report(f"hc_pre {T} tok d={d}", ms, ref_ms, pre_bytes, 2.0 * T * n * d * (2 + n) * n)
    if mix_sweep:  # the mix kernel's tiles and K splits (its bytes from L2: fn's three bf16
        # parts are 9 KB a K-block against 8 KB of X at 64 tokens a CTA)
        for cfg in MIX_CONFIGS:
            for splits in (0, 2, 3, 4, 6, 8):
                try:
                    alt = bench([lambda x=x: hc_pre_triton(x, fn, scale, base, 1e-6, 1e-6, 20,
                                                           splits=splits, mix_cfg=cfg)
                                 for x in xs])
                except Exception as e:  # out of shared memory or registers: say so, go on
                    print(f"# mix {cfg} splits {splits}: {type(e).__name__}", flush=True)
                    continue
                report(f"hc_pre {T} tok d={d} mix {cfg} splits {splits or 'auto'} (ref: default)",
                       alt, ms, pre_bytes, 2.0 * T * n * d * (2 + n) * n)
    # with the RMSNorm after y fused (the model's path from mhc.FUSE_NORM_FROM tokens), against
    # the pre kernel and a norm launch
    w = torch.rand(d, generator=gen, device=DEV) + 0.5
    ms_apart = bench([lambda x=x: rmsnorm_triton(hc_pre_triton(x, fn, scale, base, 1e-6, 1e-6,
                                                               20)[0], w, 1e-6) for x in xs])
    ms = bench([lambda x=x: hc_pre_triton(x, fn, scale, base, 1e-6, 1e-6, 20,
                                          norm=(w, 1e-6)) for x in xs])
    report(f"hc_pre + rmsnorm fused {T} tok d={d} (ref: apart)", ms, ms_apart, pre_bytes,
           2.0 * T * n * d * (2 + n) * n)
    f = torch.randn(T, d, generator=gen, device=DEV).bfloat16()
    post, comb = torch.rand(T, n, device=DEV), torch.rand(T, n, n, device=DEV)
    post_bytes = 2 * T * n * d * 2 + T * d * 2
    ref_ms = bench([lambda x=x: hc_post_ref(x, f, post, comb) for x in xs[:2]], rep=30)
    ms = bench([lambda x=x: hc_post_triton(x, f, post, comb) for x in xs])
    report(f"hc_post {T} tok d={d}", ms, ref_ms, post_bytes, 0.0)
    w = torch.randn(d, device=DEV)
    ys = [x[:, 0] .contiguous() for x in xs]
    ref_ms = bench([lambda y=y: rmsnorm_ref(y, w, 1e-6) for y in ys[:2]], rep=30)
    ms = bench([lambda y=y: rmsnorm_triton(y, w, 1e-6) for y in ys])
    report(f"rmsnorm {T} tok d={d}", ms, ref_ms, 2 * T * d * 2, 0.0)


# (channels, warps) a CTA of the one-launch mHC (`mhc_fused.py`), for --mhc-sweep
STEP_CONFIGS = [(64, 2), (32, 1), (64, 1), (128, 2), (128, 4)]


def bench_mhc_step(T: int, d: int, slots: bool, sweep: bool = False) -> None:
    """The hyper-connection between two sub-layers of a decode batch: the post update of the
    one that ended (f: wo_b's 4 split-K partials, or the MoE's 7 slot rows in 2 K splits) and
    the pre + RMSNorm of the next, in one launch (`mhc_fused.hc_fused`) against the separate
    kernels (hc_post, the mix and pre kernels, rmsnorm) as the model ran them before."""
    from dsv4.kernels.mhc_fused import hc_fused
    gen = torch.Generator(device=DEV).manual_seed(4)
    n = 4
    # a layer's fn (1.5 / 2.8 MB) is cold in L2 when its step comes: sets of inputs and fn
    # over more than L2 holds
    sets = math.ceil(ROTATE_BYTES / ((2 + n) * n * n * d * 4))
    xs = [torch.randn(T, n, d, generator=gen, device=DEV).bfloat16() for _ in range(sets)]
    fns = [torch.randn((2 + n) * n, n * d, generator=gen, device=DEV) * (n * d) ** -0.5
           for _ in range(sets)]
    f = (torch.randn(2, T, 7, d, generator=gen, device=DEV) if slots
         else torch.randn(4, T, d, generator=gen, device=DEV))
    fn = fns[0]
    scale, base = torch.rand(3, device=DEV), torch.randn((2 + n) * n, device=DEV)
    post, comb = torch.rand(T, n, device=DEV), torch.rand(T, n, n, device=DEV)
    w = torch.rand(d, generator=gen, device=DEV) + 0.5
    nbytes = 2 * T * n * d * 2 + f.numel() * f.element_size() + fn.numel() * 4 + T * d * 2
    args = (fn, scale, base, 1e-6, 1e-6, 20)

    def apart(x, fn):
        xo = hc_post_triton(x, f, post, comb)
        return rmsnorm_triton(hc_pre_triton(xo, fn, *args[1:])[0], w, 1e-6)
    ms_apart = bench([lambda x=x, fn=fn: apart(x, fn) for x, fn in zip(xs, fns)])
    what = "MoE slot rows" if slots else "wo_b partials"
    # one eager call first: it allocates the counters, which a capture cannot
    assert hc_fused(xs[0], *args, (f, post, comb), False, (w, 1e-6)) is not None
    for cfg in (STEP_CONFIGS if sweep else STEP_CONFIGS[:1]):
        ms = bench([lambda x=x, fn=fn: hc_fused(x, fn, *args[1:], (f, post, comb), False,
                                                (w, 1e-6), cfg=cfg) for x, fn in zip(xs, fns)])
        report(f"mhc step {T} tok d={d} {what} {cfg} (ref: 4 launches)", ms, ms_apart, nbytes,
               0.0)


def copy_ceiling() -> None:
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms = bench([lambda: y.copy_(x)])
    print(f"# device-to-device copy: {2 * x.numel() / ms / 1e6:.0f} GB/s (read + write)", flush=True)
    x = y = None  # freed
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the torch references")
    ap.add_argument("--configs", action="store_true", help="also try other attention tile shapes")
    ap.add_argument("--triton", action="store_true",
                    help="also time the Triton attention kernel where the Gluon one runs")
    ap.add_argument("--only", default="",
                    help="comma list of: attn,indexer,compressor,mhc,mhc_step")
    ap.add_argument("--indexer-waves", action="store_true",
                    help="indexer: also time the FP8 kernel with other key blocks a CTA")
    ap.add_argument("--mhc-sweep", action="store_true",
                    help="mhc: also time hc_pre's mix kernel over MIX_CONFIGS and K splits; "
                         "mhc_step: the one launch over STEP_CONFIGS")
    ap.add_argument("--ws", action="store_true",
                    help="FP8 rows: also time the plain Gluon kernel (decode and products in "
                         "turns) and three bf16 tiles beside the default warp-specialised one, "
                         "and both at prefill sizes (512 / 2048 / 8192 tokens)")
    ap.add_argument("--rank-heads", action="store_true",
                    help="attention of a tensor-parallel rank's 16 / 32 heads: the Gluon "
                         "kernel's masked 64-head block (the default) against the Triton kernel")
    args = ap.parse_args()
    parts = set(args.only.split(",")) if args.only else {"attn", "indexer", "compressor", "mhc",
                                                           "mhc_step"}
    INDEXER_WAVES[0] = args.indexer_waves
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    copy_ceiling()
    print(header(), flush=True)
    if "attn" in parts:
        for H, topk in ((64, 512), (128, 1024)):
            for fp8 in (False, True):
                for B in (1, 32, 128):
                    bench_attention(H, topk, B, fp8, None, not args.quick)
                    if args.ws and fp8:  # the plain Gluon kernel with its default tiles, and
                        # the warp-specialised one with three bf16 tiles instead of two
                        plain = AttnConfig(64, 32 if B * H <= 1024 else 64, 8, 2, kernel="gluon")
                        bench_attention(H, topk, B, fp8, [plain] + [
                            AttnConfig(64, 32, 8, 3, kernel="ws")], False)
                    if args.triton:  # the Triton kernel with its own tile shapes, same inputs
                        shape = (32, 2) if fp8 else ((64, 2) if H >= 128 else (32, 3))
                        tri = AttnConfig(64, shape[0], 8, shape[1], kernel="triton")
                        bench_attention(H, topk, B, fp8, [tri], False)
            if args.ws:  # prefill sizes, FP8 rows: the default against the plain Gluon kernel
                for B in (512, 2048, 8192):
                    bench_attention(H, topk, B, True,
                                    [None, AttnConfig(64, 64, 8, 2, kernel="gluon")], False)
        if args.rank_heads:  # Flash over 2 / 4 GPUs, Pro over 4 / 8: 32 / 16 heads a rank
            for H, topk in ((32, 512), (16, 512), (32, 1024), (16, 1024)):
                for fp8 in (False, True):
                    for B in (1, 32, 128):
                        bench_attention(H, topk, B, fp8, [None, AttnConfig(
                            64, 32, 8, 2 if fp8 else 3, kernel="triton")], False)
        if args.configs:
            alts = [AttnConfig(64, 16, 8, 3), AttnConfig(64, 32, 8, 2), AttnConfig(64, 32, 8, 3),
                    AttnConfig(64, 64, 8, 2), AttnConfig(64, 16, 8, 2), AttnConfig(64, 32, 4, 2)]
            for H, topk in ((64, 512), (128, 1024)):
                for fp8 in (False, True):
                    bench_attention(H, topk, 128, fp8, alts, False)
            bench_attention(64, 512, 128, False, [AttnConfig(64, 32, 8, 3, splits=s) for s in (1, 2)], False)
            bench_attention(64, 512, 32, False, [AttnConfig(64, 32, 8, 3, splits=s) for s in (1, 2, 4, 8)], False)
    if "indexer" in parts:
        for ctx in (8192, 32768, 131072):
            bench_indexer(ctx, 32, 1024, not args.quick)
    if "compressor" in parts:
        for m, C in ((4, 512), (128, 512), (4, 128)):
            bench_compressor(8192, m, C)
    if "mhc" in parts:
        for d in (4096, 7168):
            bench_mhc(8192, d, args.mhc_sweep)
    if "mhc_step" in parts:
        for d in (4096, 7168):
            for T in (1, 2, 4, 8, 16):
                for slots in (False, True):
                    bench_mhc_step(T, d, slots, args.mhc_sweep and T in (1, 8) and d == 4096)
    print("\n" + header())
    print("\n".join(ROWS))


if __name__ == "__main__":
    sys.exit(main())
