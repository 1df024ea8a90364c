"""End-to-end engine numbers on one GPU for a Flash- (or Pro-) shaped model cut to a few layers.

    python benchmarks/engine_gpu.py --preset flash --layers 4 --format fp4 --json out.json

Builds the model from its config with seeded random weights directly on the GPU
(`load_format="dummy"`, same formats as the official checkpoint), then, on one model:
decode latency at batch 1, decode throughput at batch 64 and 256 (batch 1 and 64 also without
async scheduling, the "sync" rows), prefill tokens/s for 8K and 32K prompts (and the time to
first token of 300- and 1024-token prompts, which replay prefill graphs), and MTP
speculative decoding (K = 1..3) with the real (random) MTP drafts and with drafts forced to be
accepted; `--only prefix` adds 32 prompts of 512 tokens after a shared 4096-token prefix, and
one prompt of 128 tokens after 8064 an earlier prompt had, with and without prefix caching;
`--only longctx` adds decode at long context (8 sequences of 32K tokens, 32 of 16K: the CSA
layers' indexer reads every compressed key of each, and the attention its top-k), on an
engine whose decode graphs cover that context. Prints one table; every number comes from
`dsv4.bench.measure`.
The attention rows are packed FP8 (the CUDA default); `--kv-cache-dtype bfloat16` runs the
same rows with plain bf16 rows; `--no-mtp` skips the speculative rows and `--only
decode,prefill,mtp,prefix,longctx` picks row groups (default: all but prefix and longctx).
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from dsv4.bench import measure
from dsv4.config import EngineConfig
from dsv4.engine.llm_engine import LLMEngine
from dsv4.loader import load_model, tiny_config


def engine_for(loaded, kv_cache_dtype: str = "auto", **kw) -> LLMEngine:
    ec = EngineConfig(dtype="bfloat16", cpu_cache_bytes=1 << 30, kv_cache_dtype=kv_cache_dtype, **kw)
    return LLMEngine(loaded.model, loaded.config, loaded.tokenizer, ec, loaded.generation_config)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--format", default="fp4")
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto (fp8 rows on CUDA), fp8 or bfloat16")
    ap.add_argument("--no-mtp", action="store_true", help="skip the speculative decoding rows")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192,
                    help="the decode and prefill rows' chunked-prefill budget")
    ap.add_argument("--only", default="decode,prefill,mtp",
                    help="comma list of the row groups to run: decode, prefill, mtp, prefix")
    a = ap.parse_args()
    only = set(a.only.split(","))
    if only - {"decode", "prefill", "mtp", "prefix", "longctx"}:
        ap.error(f"--only takes decode, prefill, mtp, prefix, longctx; got {a.only}")
    if a.no_mtp:
        only.discard("mtp")
    cfg = tiny_config(a.format, a.preset, a.layers)
    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    t = time.perf_counter()
    loaded = load_model(d, dtype="bfloat16", device=a.device, load_format="dummy")
    if a.device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    weights_gb = sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 1e9
    print(f"loaded {a.preset}-{a.layers}L {a.format}: {weights_gb:.1f} GB of weights in {load_s:.1f} s",
          flush=True)
    rows = []

    def run(label, engine, mode, n, inp, out, iters=1, prefix_len=0):
        r = measure(engine, mode, n, inp, out, label=label, iters=iters, prefix_len=prefix_len)
        r["label"] = label
        rows.append(r)
        print(json.dumps(r), flush=True)

    e = engine_for(loaded, a.kv_cache_dtype, max_num_seqs=256,
                   max_num_batched_tokens=a.max_num_batched_tokens,
                   max_model_len=min(40960, cfg.max_position_embeddings),
                   gpu_memory_utilization=0.85, cuda_graph_max_len=4096)
    g = e.runner.graphs
    print(e.capacity, "| CUDA graphs:", f"{g.sizes}, prefill {sorted(g.prefill)}" if g else "off",
          flush=True)
    # async scheduling (the default): each step launched before the previous one's tokens are
    # read; the "sync" rows switch it off on the same engine
    for b, mode in ((1, "latency"), (64, "throughput")) if "decode" in only else ():
        inp, out = (1024, 64) if not a.quick or b > 1 else (64, 8)
        run(f"decode b={b}", e, mode, b, inp, out)
        e.async_scheduling = False
        run(f"decode b={b} sync", e, mode, b, inp, out)
        e.async_scheduling = True
    if not a.quick and "decode" in only:
        run("decode b=256", e, "throughput", 256, 512, 32)
    # one prompt per pass: the median of 3 passes (a single pass moved by ~10% run to run)
    if "prefill" in only:
        run("prefill 8K", e, "latency", 1, 8192 if not a.quick else 512, 2, iters=3)
    if not a.quick and "prefill" in only:
        run("prefill 32K", e, "latency", 1, 32768, 2, iters=3)
        for n in (300, 1024):  # short prompts: their TTFT is a prefill graph's replay
            run(f"prefill {n}", e, "latency", 1, n, 2, iters=3)
    del e
    gc.collect()
    torch.cuda.empty_cache()
    for cached in (False, True) if "prefix" in only else ():
        e = engine_for(loaded, a.kv_cache_dtype, max_num_seqs=64,
                       max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=8704,
                       gpu_memory_utilization=0.85, enable_prefix_caching=cached)
        state = 'on' if cached else 'off'
        run(f"4K shared prefix + 512, 32 prompts, prefix cache {state}", e,
            "throughput", 32, 512, 32, prefix_len=4096)
        # a conversation's next turn: an 8K prompt whose first 8064 tokens an earlier one had
        run(f"8064 shared + 128, one prompt, prefix cache {state}", e, "latency", 1, 128, 2,
            iters=3, prefix_len=8064)
        del e
        gc.collect()
        torch.cuda.empty_cache()
    if "longctx" in only:
        e = engine_for(loaded, a.kv_cache_dtype, max_num_seqs=32,
                       max_num_batched_tokens=a.max_num_batched_tokens,
                       max_model_len=min(32768 + 64, cfg.max_position_embeddings),
                       gpu_memory_utilization=0.85)
        for b, ctx in ((8, 32768), (32, 16384)):
            run(f"decode b={b} at {ctx // 1024}K context", e, "throughput", b,
                min(ctx, e.max_model_len - 64), 32)
        del e
        gc.collect()
        torch.cuda.empty_cache()
    for k in (1, 2, 3) if "mtp" in only else ():
        e = engine_for(loaded, a.kv_cache_dtype, max_num_seqs=8, max_num_batched_tokens=8192,
                       max_model_len=min(8192, cfg.max_position_embeddings),
                       gpu_memory_utilization=0.85, speculative_tokens=k, cuda_graph_max_len=4096)
        for force in (False, True):
            e.runner.proposer.force_accept = force
            e.runner.proposer.reset_stats()
            for b in ((1, 8) if not a.quick else (1,)):
                run(f"mtp K={k} {'forced' if force else 'real'} b={b}", e, "latency", b, 256, 32)
        del e
        gc.collect()
        torch.cuda.empty_cache()
    print("\n| run | step ms | TPOT ms | out tok/s (decode) | prefill tok/s | TTFT ms | roofline | peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda v, s: "n/a" if v is None else format(v, s)  # noqa: E731
        print(f"| {r['label']} | {f(r['decode_step_ms_median'], '.2f')} | "
              f"{f(r['tpot_ms_median'], '.2f')} | {f(r['decode_tokens_per_s'], '.0f')} | "
              f"{f(r['prefill_tokens_per_s'], '.0f')} | {f(r['ttft_ms_median'], '.0f')} | "
              f"{f(r['decode_roofline_fraction'], '.1%')} | {f(r['peak_gpu_memory_gb'], '.1f')} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"load_s": load_s, "weights_gb": weights_gb,
                                            "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
