"""What a long `max_model_len` costs a short-context decode step: TPOT at 1K-token contexts with
CUDA graphs up to 16K tokens, with graphs up to 1M tokens (their candidate lists are then
1M / 4 and 1M / 128 wide whatever the context, and the kernels stop at each token's visible
count; 1K-token contexts replay the graphs of the short context band, `engine/cuda_graph.py`),
the same without that band (one graph a batch size: the top-k of 262144-column lists), and
eagerly (what a context past the graphs' length gets). Flash-shaped model cut to 4 layers, FP4
experts, dummy weights; batch 1 and 64, 32 tokens each.

    PYTHONPATH=. python3 benchmarks/long_context_graphs.py
"""
from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from dsv4.bench import measure
from dsv4.engine import cuda_graph
from dsv4.loader import load_model, tiny_config
from engine_gpu import engine_for


def main() -> None:
    cfg = tiny_config("fp4", "flash", 4)
    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    loaded = load_model(d, dtype="bfloat16", device="cuda", load_format="dummy")
    short = cuda_graph.SHORT_LEN
    for name, max_len, eager, bands in (("graphs to 16K", 16384, False, True),
                                        ("graphs to 1M", 1 << 20, False, True),
                                        ("graphs to 1M, one band", 1 << 20, False, False),
                                        ("eager", 16384, True, True)):
        # the band's length is read when the graphs are captured: past every context, no band
        cuda_graph.SHORT_LEN = short if bands else 1 << 40
        t0 = time.time()
        e = engine_for(loaded, max_num_seqs=64, max_num_batched_tokens=8192,
                       max_model_len=max_len, gpu_memory_utilization=0.85,
                       cuda_graph_max_len=max_len, enforce_eager=eager)
        free = torch.cuda.mem_get_info()[0] / 2 ** 30
        print(f"{name}: engine up in {time.time() - t0:.1f} s, {free:.1f} GiB free", flush=True)
        for b in (1, 64):
            r = measure(e, "latency" if b == 1 else "throughput", b, 1024, 32,
                        label=f"{name} b={b}")
            print(f"{name} batch {b}: TPOT {r['tpot_ms_median']:.3f} ms", flush=True)
        del e
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
