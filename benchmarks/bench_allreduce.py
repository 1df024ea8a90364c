"""Tensor-parallel all-reduce latency at decode and prefill sizes: NCCL's ring against the
engine's default for messages of up to 1 MiB, torch's symmetric-memory one-shot kernel
(`dsv4.distributed.enable_one_shot_all_reduce`: P2P reads over NVLink, no multicast), both
replayed from CUDA graphs as the decode graphs replay them.

    NCCL_NVLS_ENABLE=0 PYTHONPATH=. python benchmarks/bench_allreduce.py [--gpus 2]

Prints per size the time of one all-reduce and its bus bandwidth (2 (n-1)/n x bytes / time,
NCCL's convention) against the H200's NVLink (450 GB/s a direction), and the largest
difference between the two results (they sum the same values; 0 expected).
"""
from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv4.distributed import (ONE_SHOT_MAX_BYTES, ParallelGroup, disable_one_shot_all_reduce,
                              enable_one_shot_all_reduce)

# [tokens, hidden] bf16: decode batches of Flash (4096) and Pro (7168), then prefill-sized
SIZES = [(1, 4096), (8, 4096), (64, 4096), (1, 7168), (64, 7168), (256, 4096), (2048, 4096)]
REPS = 50
NVLINK_GBS = 450.0


def graph_us(fn, x: torch.Tensor) -> float:
    """Mean microseconds of fn(x) over graph replays of REPS calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            fn(x)
    g.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * REPS)


def worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0",
                      DSV4_TP_ALLREDUCE="one-shot")
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
    group = ParallelGroup(rank, world, dist.group.WORLD)
    if not enable_one_shot_all_reduce(torch.bfloat16, dev):
        raise SystemExit("the one-shot all-reduce is off on this machine (see the log)")
    if rank == 0:
        print("| tokens x hidden | MB | NCCL us | NCCL bus GB/s | engine path us | engine bus "
              "GB/s | path | max diff |\n|---|---|---|---|---|---|---|---|", flush=True)
    for t, d in SIZES:
        x = torch.randn(t, d, device=dev, dtype=torch.bfloat16) * (rank + 1)
        want = x.clone()
        dist.all_reduce(want)
        got = group.all_reduce(x.clone())
        diff = (got.float() - want.float()).abs().max().item()
        nccl = graph_us(lambda y: dist.all_reduce(y), x.clone())
        ours = graph_us(lambda y: group.all_reduce(y), x.clone())
        if rank == 0:
            nbytes = t * d * 2
            bus = 2 * (world - 1) / world * nbytes / 1e3  # GB/s at 1 us
            path = "one-shot" if nbytes <= ONE_SHOT_MAX_BYTES else "NCCL"
            print(f"| {t} x {d} | {nbytes / 1e6:.2f} | {nccl:.1f} | {bus / nccl:.0f} | "
                  f"{ours:.1f} | {bus / ours:.0f} ({bus / ours / NVLINK_GBS:.0%}) | {path} | "
                  f"{diff:.0e} |", flush=True)
    disable_one_shot_all_reduce()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=2)
    args = ap.parse_args()
    if torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"bench_allreduce.py needs {args.gpus} GPUs, "
                         f"this machine has {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.gpus, port), nprocs=args.gpus)


if __name__ == "__main__":
    main()
