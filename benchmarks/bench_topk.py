"""The indexer's top-k on the H200 (`dsv4/kernels/topk.py`), against torch.topk in the same run.

Two shapes of call:
- decode under CUDA graphs: T rows as wide as the graphs' context / 4 (a static width), of which
  only the first `avail` columns are visible (the token's context); `select_topk` against the
  split select and the one-program select forced;
- prefill: T rows of N columns with a causal visible prefix (row t sees about t N / T), where
  `select_topk` launches 512-column programs once there are 4 rows an SM.

Each case first checks the selected set against the reference (a stable sort). GB/s counts
the score bytes of the visible columns (each read at least once), against 4.8 TB/s.

    PYTHONPATH=. python3 benchmarks/bench_topk.py [--only decode|prefill]
"""
from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench_cudagraph

from dsv4.kernels import topk as tk

DEV = "cuda"
HBM_BPS = 4.8e12


def us(f) -> float:
    torch.cuda.synchronize()
    return do_bench_cudagraph(f, rep=50, return_mode="median") * 1e3


def case(T: int, N: int, k: int, avail: torch.Tensor, gen) -> tuple:
    s = torch.rand(T, N, generator=gen, device=DEV) * 3
    cols = torch.arange(N, device=DEV)[None]
    vis = cols < avail[:, None]
    cand = torch.where(vis, torch.arange(T * N, device=DEV).view(T, N), -1)
    want = tk.select_topk_ref(torch.where(vis, s, float("-inf")), cand, k).sort(1).values
    got = tk.select_topk(s, cand, k, avail).sort(1).values
    assert torch.equal(got, want), (T, N, k)
    return s, cand, float(avail.sum()) * 4


def line(name: str, t: float, nbytes: float, others: str) -> None:
    gbs = nbytes / t / 1e3
    print(f"{name:<44} {t:8.1f} us {gbs:7.0f} GB/s {100 * gbs * 1e9 / HBM_BPS:5.1f}% | {others}",
          flush=True)


def decode(gen) -> None:
    for T in (1, 64):
        for N in (4096, 65536, 262144):
            for a in (256, 4096, 16384, 65536):
                if a > N:
                    continue
                avail = torch.full((T,), a, device=DEV)
                s, cand, nbytes = case(T, N, 1024, avail, gen)
                t = us(lambda: tk.select_topk(s, cand, 1024, avail))
                split = us(lambda: tk._topk_split_cuda(s, cand, 1024, avail))
                one = us(lambda: tk._topk_cuda(s, cand, 1024, avail))
                ref = us(lambda: torch.topk(s, 1024, dim=-1, sorted=False))
                line(f"decode T={T} width={N} visible={a}", t, nbytes,
                     f"split {split:.1f} us, one program {one:.1f} us, torch.topk {ref:.1f} us")


def prefill(gen) -> None:
    for T, N, k in ((64, 8192, 1024), (2048, 2048, 512), (2048, 8192, 512), (8192, 8192, 1024)):
        avail = torch.linspace(1, N, T, device=DEV).long()  # causal: later tokens see more
        s, cand, nbytes = case(T, N, k, avail, gen)
        t = us(lambda: tk.select_topk(s, cand, k, avail))
        out = torch.empty(T, min(k, N), dtype=cand.dtype, device=DEV)
        wide = us(lambda: tk._topk_kernel[(T,)](s, cand, avail, out, N, min(k, N), HAS_AVAIL=True,
                                                BLOCK=min(4096, N), num_warps=8))
        ref = us(lambda: torch.topk(s, min(k, N), dim=-1, sorted=False))
        line(f"prefill T={T} N={N} k={k}", t, nbytes,
             f"one {min(4096, N)}-column program a row {wide:.1f} us, torch.topk {ref:.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("decode", "prefill"), default=None)
    args = ap.parse_args()
    gen = torch.Generator(device=DEV).manual_seed(0)
    if args.only in (None, "decode"):
        decode(gen)
    if args.only in (None, "prefill"):
        prefill(gen)


if __name__ == "__main__":
    main()
