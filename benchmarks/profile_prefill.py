"""Where a prefill step's time goes: GPU kernel time per op for one prompt's prefill.

    python benchmarks/profile_prefill.py --preset flash --layers 4 --format fp4 --tokens 8192

Builds the dummy-weight model on the GPU (as engine_gpu.py), prefills `--iters` prompts of
`--tokens` tokens each in one step apiece (`max_num_batched_tokens` = tokens; the first,
unprofiled, compiles), and prints the kernels sorted by GPU time per prefill and the wall
time per prefill. Prefill steps of more than 64 tokens launch without PDL, so the kernel times
are their own.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dsv4.config import EngineConfig
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.sampler import SamplingParams

from profile_decode import add_model_args, dummy_model, print_kernels


def prefill(engine: LLMEngine, tokens: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, engine.model_config.vocab_size, (tokens,), generator=g).tolist()
    engine.add_request(f"p{seed}-{time.monotonic_ns()}", {"prompt_token_ids": ids},
                       SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()


def print_ops(p, steps: int, top: int) -> None:
    """torch ops by the GPU time of the kernels they launch themselves, per input shapes: which
    call site a copy, gather or GEMM of the kernel list comes from."""
    rows = [(ev.self_device_time_total / steps, ev.count / steps, ev.key, ev.input_shapes)
            for ev in p.key_averages(group_by_input_shape=True) if ev.self_device_time_total > 0]
    rows.sort(key=lambda r: -r[0])
    print("\ntorch ops by their own GPU time per step:")
    for us, n, name, shapes in rows[:top]:
        print(f"{us:9.1f} us {n:6.1f}x  {name[:40]:40s} {str(shapes)[:150]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--ops", type=int, default=0,
                    help="also list this many torch ops (with input shapes) by their own GPU time")
    a = ap.parse_args()
    loaded = dummy_model(a.preset, a.layers, a.format)
    ec = EngineConfig(dtype="bfloat16", max_num_seqs=8, max_num_batched_tokens=a.tokens,
                      max_model_len=a.tokens + 16, gpu_memory_utilization=0.8,
                      cuda_graph_max_len=4096)
    e = LLMEngine(loaded.model, loaded.config, loaded.tokenizer, ec, loaded.generation_config)
    prefill(e, a.tokens, 0)
    torch.cuda.synchronize()
    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if a.ops else [])
    with profile(activities=acts, record_shapes=bool(a.ops)) as p:
        t = time.perf_counter()
        for i in range(a.iters):
            prefill(e, a.tokens, i + 1)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / a.iters
    print(f"\n== prefill of {a.tokens} tokens: {dt * 1e3:.2f} ms (wall, under the profiler)")
    print_kernels(p, a.iters, a.top)
    if a.ops:
        print_ops(p, a.iters, a.ops)
    t = time.perf_counter()
    for i in range(a.iters):
        prefill(e, a.tokens, 100 + i)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / a.iters
    print(f"without the profiler: {dt * 1e3:.2f} ms per prefill ({a.tokens / dt:.0f} tok/s)")


if __name__ == "__main__":
    main()
