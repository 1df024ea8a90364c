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


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=3)
    a = ap.parse_args()
    loaded = dummy_model(a.preset, a.layers, a.format)
    ec = EngineConfig(dtype="bfloat16", max_num_seqs=8, max_num_batched_tokens=a.tokens,
                      max_model_len=a.tokens + 16, gpu_memory_utilization=0.8,
                      cuda_graph_max_len=4096)
    e = LLMEngine(loaded.model, loaded.config, loaded.tokenizer, ec, loaded.generation_config)
    prefill(e, a.tokens, 0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        t = time.perf_counter()
        for i in range(a.iters):
            prefill(e, a.tokens, i + 1)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / a.iters
    print(f"\n== prefill of {a.tokens} tokens: {dt * 1e3:.2f} ms (wall, under the profiler)")
    print_kernels(p, a.iters, a.top)
    t = time.perf_counter()
    for i in range(a.iters):
        prefill(e, a.tokens, 100 + i)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / a.iters
    print(f"without the profiler: {dt * 1e3:.2f} ms per prefill ({a.tokens / dt:.0f} tok/s)")


if __name__ == "__main__":
    main()
