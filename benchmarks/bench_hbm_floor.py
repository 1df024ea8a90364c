"""Benchmark: how fast one plain streaming kernel reads N bytes of HBM on this GPU, at the
sizes our kernels read (a yardstick for the "% of HBM" columns of the other benchmarks; a
floor of this kernel, not of the chip).

    PYTHONPATH=. python3 benchmarks/bench_hbm_floor.py [--sizes-mb 4.2 33.5 ...]

A pure streaming kernel (each CTA XORs its contiguous share of the bytes, 4 or 8 KB a loop
step, Triton's cp.async pipeline) over launch shapes (bytes a CTA, warps, stages); the best
shape a size. Timed as the decode kernels are (`bench_linear_moe.t_graph_us`: a CUDA graph of
launches over rotating buffers, > 200 MB, so the bytes come from HBM; the time a launch
includes its ramp-up, its tail and the gap to the next). What a kernel cannot beat at a size:
a few microseconds of ramp and tail weigh on reads of tens of MB (at 4.8 TB/s, 33.5 MB take
7 us). Before timing, `check_reads_all` confirms every launch shape reads each word once.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import triton
import triton.language as tl

from bench_linear_moe import HBM, t_graph_us

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # (cpu: TRITON_INTERPRET=1 only)


@triton.jit(do_not_specialize=["n_words", "PER"])
def _stream_kernel(x_ptr, out_ptr, n_words, PER, CH: tl.constexpr):
    """XOR of this CTA's PER words (CH a step) of x, stored per lane (kept, never read)."""
    base = tl.program_id(0).to(tl.int64) * PER
    acc = tl.zeros([CH], tl.int32)
    for i in range(0, tl.cdiv(PER, CH)):
        offs = base + i * CH + tl.arange(0, CH)
        acc ^= tl.load(x_ptr + offs, mask=offs < n_words, other=0)
    tl.store(out_ptr + tl.program_id(0) * CH + tl.arange(0, CH), acc)


PER_KB, STEP_WORDS = (8, 16, 32, 64, 128, 256), (1024, 2048)


def check_reads_all(words: int = 786_437) -> None:
    """Every launch shape of the sweep reads each word once: the XOR of the CTAs' outputs
    is the XOR of the buffer (an odd length: the last CTA's mask is exercised). A timing of a
    kernel that skipped bytes would be no floor."""
    x = torch.randint(0, 2**30, (words,), dtype=torch.int32, device=DEV)
    want = int(np.bitwise_xor.reduce(x.cpu().numpy()))
    for per_kb in PER_KB:
        for ch in STEP_WORDS:
            ctas = triton.cdiv(words, per_kb * 256)
            out = torch.empty(ctas * ch, dtype=torch.int32, device=DEV)
            _stream_kernel[(ctas,)](x, out, words, per_kb * 256, CH=ch)
            got = int(np.bitwise_xor.reduce(out.cpu().numpy()))
            if got != want:
                raise AssertionError(f"stream kernel, {per_kb} KB a CTA, {ch}-word steps: "
                                     "does not read every word once")


def floor_us(nbytes: int) -> tuple[float, str]:
    """(best graph-timed us, its launch shape) of reading nbytes once."""
    words = nbytes // 4
    copies = max(2, -(-200_000_000 // nbytes))
    bufs = [torch.randint(0, 2**30, (words,), dtype=torch.int32, device=DEV)
            for _ in range(copies)]
    best = (float("inf"), "")
    for per_kb in PER_KB:
        per = per_kb * 256  # words a CTA
        if per > words:
            continue
        ctas = triton.cdiv(words, per)
        for ch in STEP_WORDS:
            out = torch.empty(ctas * ch, dtype=torch.int32, device=DEV)
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    us = t_graph_us([lambda b=b: _stream_kernel[(ctas,)](
                        b, out, words, per, CH=ch, num_warps=warps, num_stages=stages)
                        for b in bufs])
                    best = min(best, (us, f"{per_kb} KB a CTA ({ctas} CTAs), {4 * ch // 1024} "
                                          f"KB steps, {warps} warps, {stages} stages"))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mb", type=float, nargs="*",
                    default=[4.2, 11.0, 33.5, 52.0, 104.0, 300.0, 1060.0],
                    help="MB to read (default: Flash wq_a, Pro wq_a, Flash wq_b / wo_a / wo_b, "
                         "a one-token MoE's routed gate/up and whole layer, a 64-token MoE "
                         "layer, the fp32 head's bf16 weight)")
    a = ap.parse_args()
    check_reads_all()
    print("\n## One kernel reading N MB from HBM: the best launch (CUDA-graph timed)\n")
    print("| MB | us | TB/s | % of 4.8 TB/s | launch |")
    print("|---|---|---|---|---|")
    for mb in a.sizes_mb:
        nbytes = int(mb * 1e6) // 16 * 16
        us, shape = floor_us(nbytes)
        print(f"| {mb:g} | {us:.1f} | {nbytes / us / 1e6:.2f} | {100 * nbytes / us / 1e-6 / HBM:.0f}% "
              f"| {shape} |", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
