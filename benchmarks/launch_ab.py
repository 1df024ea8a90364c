"""Decode time per output token by batch size under the kernels' launch policies, one model:

- `plain`: no programmatic dependent launch (PDL_MAX_TOKENS = 0), no side stream,
- `pdl`: PDL at every batch size, no side stream,
- `pdl+prefetch`: PDL and the L2 weight prefetch (DSV4_L2_PREFETCH=4: 4 K-blocks ahead in
  the MoE), no side stream,
- `side`: the default launches with each compressing attention layer's kv row and compressors
  on a side stream in every step (DSV4_SIDE_STREAM=1; the default forks steps of up to 64
  tokens, so the two differ past 64),
- `no-side`: the default launches on one stream (DSV4_SIDE_STREAM=0),
- `wide`: the default's steps with three side streams in CSA layers (DSV4_SIDE_STREAM=wide),
- `mhc-apart`: the default launches, but the hyper-connection between sub-layers in its
  four launches (`mhc_fused.FUSED = False`, as DSV4_MHC_FUSED=0),
- `default`: what the engine does now.

Each policy gets its own engine (the CUDA graphs keep the launches of their capture); the
model is built once (Flash-shaped, 4 layers, FP4 experts, dummy weights). 1K prompts, 32
tokens each, CUDA graphs and async scheduling on. Beside each TPOT, `gpu`: the batch size's
decode graph replayed back to back (100 replays, CUDA events), the step's GPU time without
the host: at batch 1 this 4-layer model's host work is close to its 0.83 ms of GPU work, and
on a slower host (the H200's is a VM's, whose speed varies between engines of one process)
TPOT takes the host's time instead (thirty-seventh session: 0.84 to 1.47 ms over a graph
that replays in 0.83), so compare policies by `gpu` where the two part. The table says where PDL_MAX_TOKENS
belongs and whether the prefetch and the side stream pay (decode only: `engine_gpu.py` also
shows what the side stream does to prefill).

    PYTHONPATH=. python3 benchmarks/launch_ab.py [--batches 1 8 16 32 64 256] [--policies ...]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
from pathlib import Path

import torch

from dsv4.bench import measure
from dsv4.kernels import mhc_fused
from dsv4.kernels import pdl as pdl_mod
from dsv4.loader import load_model, tiny_config
from engine_gpu import engine_for

ENV = {"DSV4_L2_PREFETCH": "0", "DSV4_SIDE_STREAM": "auto"}  # and their defaults
DEFAULT = tuple(os.environ.get(v, d) for v, d in ENV.items())
POLICIES = {  # PDL_MAX_TOKENS, then the values of ENV
    "plain": (0, "0", "0"),
    "pdl": (1 << 20, "0", "0"),
    "pdl+prefetch": (1 << 20, "4", "0"),
    "side": (pdl_mod.PDL_MAX_TOKENS, DEFAULT[0], "1"),
    "no-side": (pdl_mod.PDL_MAX_TOKENS, DEFAULT[0], "0"),
    "wide": (pdl_mod.PDL_MAX_TOKENS, DEFAULT[0], "wide"),
    "mhc-apart": (pdl_mod.PDL_MAX_TOKENS, *DEFAULT),
    "default": (pdl_mod.PDL_MAX_TOKENS, *DEFAULT),
}


def replay_ms(engine, batch: int, n: int = 100) -> float:
    """GPU time of one replay of the decode graph that serves `batch` sequences (its widest
    context band), replayed n times back to back."""
    g = engine.runner.graphs
    key = max(k for k in g.graphs if k[1] == g.size_for(batch))
    graph = g.graphs[key][0]
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32, 64, 256])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--format", default="fp4")
    a = ap.parse_args()
    cfg = tiny_config(a.format, a.preset, a.layers)
    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    loaded = load_model(d, dtype="bfloat16", device="cuda", load_format="dummy")
    rows = {}
    for name in a.policies:
        max_tokens, *env = POLICIES[name]
        pdl_mod.PDL_MAX_TOKENS = max_tokens
        mhc_fused.FUSED = name != "mhc-apart" and os.environ.get("DSV4_MHC_FUSED", "1") != "0"
        os.environ.update(zip(ENV, env))
        e = engine_for(loaded, max_num_seqs=max(a.batches), max_model_len=4096,
                       gpu_memory_utilization=0.85)
        for b in a.batches:
            r = measure(e, "latency" if b == 1 else "throughput", b, 1024, 32,
                        label=f"{name} b={b}")
            rows[(name, b)] = r["tpot_ms_median"], replay_ms(e, b)
            print(f"{name:>13} batch {b:>4}: TPOT {rows[(name, b)][0]:.3f} ms, graph replayed "
                  f"back to back {rows[(name, b)][1]:.3f} ms", flush=True)
        del e
        gc.collect()
        torch.cuda.empty_cache()
    print("\n| batch | " + " | ".join(f"{n} TPOT / gpu ms" for n in a.policies) + " |")
    print("|---" * (len(a.policies) + 1) + "|")
    for b in a.batches:
        print(f"| {b} | " + " | ".join("%.3f / %.3f" % rows[(n, b)] for n in a.policies) + " |")


if __name__ == "__main__":
    main()
