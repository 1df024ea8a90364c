"""`dsv4 bench latency|throughput`: engine speed in the style of `vllm bench`.

Prints prefill tokens/s, time to first token, time per output token, output tokens/s, peak GPU
memory, and how close decode comes to the H200 memory roofline: the bytes a decode step must
read (weights it touches + the cache rows it attends to) divided by 4.8 TB/s, over the measured
step time.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from .kernels.index_fp4 import index_fp4_row_bytes
from .kernels.kv_fp8 import kv_fp8_row_bytes

HBM_BYTES_PER_S = 4.8e12


def decode_bytes_per_step(model, batch: int, context: int, kv_fp8: bool = False) -> float:
    """Bytes one decode step of `batch` sequences at `context` tokens must read at least once
    (`kv_fp8`: attention rows in the packed FP8 layout)."""
    cfg = model.cfg
    dense = experts = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if ".experts." in name:
            experts += size
        elif name.startswith("mtp."):
            continue
        elif name != "embed.weight":
            dense += size
    # Expected distinct routed experts hit per layer by `batch` tokens choosing top-k of E.
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    hit = E * (1 - (1 - k / E) ** batch)
    mtp_experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if n.startswith("mtp.") and ".experts." in n)
    expert_bytes = (experts - mtp_experts) * hit / E
    row = (kv_fp8_row_bytes(cfg.head_dim, cfg.qk_rope_head_dim) if kv_fp8
           else cfg.head_dim * model.dtype.itemsize)
    key = (index_fp4_row_bytes(cfg.index_head_dim) if model.qat  # packed as the engine does
           else cfg.index_head_dim * model.dtype.itemsize)
    cache = 0
    for m in cfg.compress_ratios[:cfg.num_hidden_layers]:
        rows = min(context, cfg.sliding_window)
        if m == 128:
            rows += context // 128
        elif m == 4:
            rows += min(cfg.index_topk, context // 4)
            cache += (context // 4) * key  # indexer keys
        cache += rows * row
    return dense + expert_bytes + batch * cache


def _engine(args):
    from .cli import engine_kwargs
    from .engine.llm_engine import LLMEngine
    return LLMEngine.from_args(**engine_kwargs(args))


def _prompts(vocab: int, n: int, length: int, seed: int, prefix: list[int] = ()
             ) -> list[list[int]]:
    # seeded by the length and count too: another run's prompts (an 8K row's before a 32K
    # row's, say) must not be a prefix of these, or the prefix cache serves part of them
    g = torch.Generator().manual_seed(seed + 1_000_003 * length + 7_919 * n)
    # Leave the special-token ids (the low ids of our tokenizers) out of random prompts.
    lo = min(16, vocab - 1)
    return [list(prefix) + p for p in torch.randint(lo, vocab, (n, length), generator=g).tolist()]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_bench(args) -> dict:
    engine = _engine(args)
    n = args.batch_size if args.mode == "latency" else args.num_prompts
    try:
        return measure(engine, args.mode, n, args.input_len, args.output_len, args.seed, args.model,
                       iters=args.num_iters, prefix_len=args.prefix_len)
    finally:
        engine.close()


def measure(engine, mode: str, n: int, input_len: int, output_len: int, seed: int = 0,
            label: str = "", iters: int = 1, prefix_len: int = 0) -> dict:
    """Submit n random prompts of input_len tokens at once, generate output_len tokens each;
    `iters` times (new prompts each time). Prefill rate: from the median iteration's prefill
    time (its last first token); TTFT and decode step: medians over every request and step.
    `prefix_len`: every prompt, warm-up included, starts with the same prefix_len random tokens
    (a shared system prompt; vLLM's `--random-prefix-len`)."""
    from .engine.outputs import RequestOutputKind
    from .engine.sampler import SamplingParams
    cfg = engine.model_config
    prefix = _prompts(cfg.vocab_size, 1, prefix_len, seed + 10_000)[0] if prefix_len else []
    # DELTA outputs: the first token's arrival shows without a per-step copy of every output
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    # Warm-up with the measured shapes (other prompts, a few tokens each; at most one full
    # batch): Triton compiles a kernel per shape class on first use (prefill chunks, MoE batch
    # sizes), which a short warm-up prompt would leave inside the measured prefill.
    n_warm = min(n, getattr(engine, "max_num_seqs", n))
    warm = SamplingParams(temperature=0.0, ignore_eos=True,
                          max_tokens=warmup_tokens(engine, n_warm, input_len, output_len))
    for i, p in enumerate(_prompts(cfg.vocab_size, n_warm, input_len, seed + 1, prefix)):
        engine.add_request(f"warmup-{i}-{time.monotonic_ns()}", p, warm)
    while engine.has_unfinished_requests():
        engine.step()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    ttft: list[float] = []
    prefill_times: list[float] = []
    decode_steps: list[float] = []  # steps in which every request was already decoding
    elapsed = 0.0
    pc = getattr(engine, "prefix_cache", None)
    pc_before = (pc.queries, pc.hits) if pc is not None else None
    compiles_before = (getattr(engine, "triton_compiles", 0),
                       getattr(engine, "triton_compile_seconds", 0.0))
    for it in range(iters):
        prompts = _prompts(cfg.vocab_size, n, input_len, seed if it == 0 else seed + 1 + it,
                           prefix)
        first, steps, dt = _one_pass(engine, prompts, params)
        ttft += first
        prefill_times.append(max(first) if first else float("nan"))
        decode_steps += steps
        elapsed += dt
    ttft.sort()
    prefill_time = sorted(prefill_times)[len(prefill_times) // 2]
    step = sorted(decode_steps)[len(decode_steps) // 2] if decode_steps else float("nan")
    spec = engine.spec_stats() if hasattr(engine, "spec_stats") else None
    per_step = spec["mean_accepted_length"] if spec and spec["mean_accepted_length"] else 1.0
    tpot = step / per_step
    batch = min(n, engine.max_num_seqs)
    ctx = prefix_len + input_len + output_len // 2
    step_bytes = decode_bytes_per_step(engine.model, batch, ctx,
                                       getattr(getattr(engine, "cache", None), "kv_fp8", False))
    result = {
        "mode": mode, "model": label, "requests": n, "input_len": input_len,
        "output_len": output_len,
        "prefill_tokens_per_s": n * (prefix_len + input_len) / prefill_time,
        "ttft_ms_median": 1e3 * ttft[len(ttft) // 2] if ttft else None,
        "tpot_ms_median": 1e3 * tpot,
        "decode_step_ms_median": 1e3 * step,
        "output_tokens_per_s": iters * n * output_len / elapsed,
        "decode_tokens_per_s": batch * per_step / step if decode_steps else None,
        "peak_gpu_memory_gb": (torch.cuda.max_memory_allocated() / 1e9
                               if torch.cuda.is_available() else None),
        "decode_bytes_per_step_gb": step_bytes / 1e9,
        "decode_roofline_fraction": (step_bytes / HBM_BYTES_PER_S) / step if decode_steps else None,
    }
    if iters > 1:
        result["iterations"] = iters
        result["prefill_tokens_per_s_per_iteration"] = [n * (prefix_len + input_len) / t
                                                        for t in prefill_times]
    if prefix_len:
        result["prefix_len"] = prefix_len
    if pc is not None:
        queries, hits = pc.queries - pc_before[0], pc.hits - pc_before[1]
        result["prefix_cache_hit_rate"] = hits / queries if queries else 0.0
    if spec:
        result["speculative"] = spec
    compiles = getattr(engine, "triton_compiles", 0) - compiles_before[0]
    if compiles:  # the warm-up above missed a shape: those passes include its compile
        result["triton_compiles"] = compiles
        result["triton_compile_seconds"] = engine.triton_compile_seconds - compiles_before[1]
    return result


def warmup_tokens(engine, n: int, input_len: int, output_len: int) -> int:
    """Tokens each warm-up request generates: enough that the first prompts still decode when
    the last prompt's prefill ends, so the warm-up's mixed steps (prefill chunks + decodes) have
    the measured pass's shapes (with 4 tokens each, those steps had fewer decodes, and kernels
    first seen in the measured pass compiled inside it), then a few decode-only steps."""
    sched = getattr(engine, "scheduler", None)
    budget = getattr(sched, "max_num_batched_tokens", None) or n * input_len
    per_step = max(1, budget - n)  # decodes share a step's token budget with the chunks
    return min(output_len, -(-n * input_len // per_step) + 4)


def _one_pass(engine, prompts, params) -> tuple[list[float], list[float], float]:
    """Run the prompts to completion: (times to first token, decode step times, wall time)."""
    n = len(prompts)
    _sync()
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{i}-{time.monotonic_ns()}", p, params)
    first_token: dict[str, float] = {}
    decode_steps: list[float] = []  # steps in which every request was already decoding
    # With async scheduling a step returns while the next one runs on the GPU: no device sync
    # per step, or the overlap it measures would be gone.
    overlap = getattr(engine, "async_scheduling", False)
    while engine.has_unfinished_requests():
        ts = time.perf_counter()
        outs = engine.step()
        if not overlap:
            _sync()
        te = time.perf_counter()
        all_decoding = len(first_token) == n
        for o in outs:
            if o.request_id not in first_token and o.outputs and o.outputs[0].token_ids:
                first_token[o.request_id] = te
        if all_decoding and outs:
            decode_steps.append(te - ts)
    return [v - t0 for v in first_token.values()], decode_steps, time.perf_counter() - t0


def print_result(r: dict) -> None:
    def f(v, fmt):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)
    iters = f", {r['iterations']} passes" if r.get("iterations") else ""
    prefix = f"{r['prefix_len']} shared + " if r.get("prefix_len") else ""
    print(f"== dsv4 bench {r['mode']}: {r['model']}, {r['requests']} requests, "
          f"{prefix}{r['input_len']} in / {r['output_len']} out{iters}")
    print(f"prefill throughput      {f(r['prefill_tokens_per_s'], '.1f')} tok/s")
    print(f"time to first token     {f(r['ttft_ms_median'], '.2f')} ms (median)")
    print(f"time per output token   {f(r['tpot_ms_median'], '.3f')} ms (median decode step)")
    print(f"output throughput       {f(r['output_tokens_per_s'], '.1f')} tok/s (end to end)")
    print(f"decode throughput       {f(r['decode_tokens_per_s'], '.1f')} tok/s")
    print(f"peak GPU memory         {f(r['peak_gpu_memory_gb'], '.2f')} GB")
    print(f"decode bytes per step   {f(r['decode_bytes_per_step_gb'], '.4f')} GB; "
          f"roofline fraction {f(r['decode_roofline_fraction'], '.1%')} of 4.8 TB/s")
    if r.get("triton_compiles"):
        print(f"Triton compiles         {r['triton_compiles']} in the measured passes "
              f"({r['triton_compile_seconds']:.2f} s): the times above include them")
    if r.get("prefix_cache_hit_rate") is not None:
        print(f"prefix cache hit rate   {r['prefix_cache_hit_rate']:.1%} of prompt tokens")
    if r.get("speculative"):
        print(f"speculative decoding    {json.dumps(r['speculative'])}")


def add_bench_cli(subparsers) -> None:
    from .cli import add_engine_args
    p = subparsers.add_parser(
        "bench", help="measure latency or throughput (an engine in this process), or a "
                      "running OpenAI-compatible server (serve)")
    p.add_argument("mode", choices=["latency", "throughput", "serve"])
    add_engine_args(p)
    s = p.add_argument_group("serve (`dsv4 bench serve --base-url URL --model NAME`; any "
                             "OpenAI-compatible server: dsv4, vLLM, SGLang)")
    s.add_argument("--base-url", default="http://127.0.0.1:8000")
    s.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests a second, Poisson arrivals (default inf: all at once)")
    s.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at most (default: no limit)")
    s.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    s.add_argument("--vocab-size", type=int, default=32000,
                   help="random prompt ids are drawn below this (default 32000)")
    s.add_argument("--backend", default="openai", choices=["openai", "openai-chat"],
                   help="openai: token-id prompts to /v1/completions; openai-chat: messages "
                        "of random words to /v1/chat/completions")
    s.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="each request's input and output lengths uniform within +-R of "
                        "--input-len / --output-len (vLLM's; default 0)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=0,
                   help="every prompt starts with the same PREFIX_LEN random tokens (a shared "
                        "system prompt; with --enable-prefix-caching they resume from the cache)")
    p.add_argument("--num-iters", type=int, default=1,
                   help="measured passes, each with new prompts; medians over all of them")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    for name in ("input_len", "output_len", "batch_size", "num_prompts", "num_iters"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.prefix_len < 0:
        raise SystemExit("--prefix-len must be >= 0")
    if args.mode == "serve":
        return _serve(args)
    r = run_bench(args)
    print_result(r)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=2)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from . import bench_serve
    if not args.request_rate > 0:
        raise SystemExit("--request-rate must be > 0 (inf: all at once)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit("--max-concurrency must be >= 1")
    if args.vocab_size <= 16:
        raise SystemExit("--vocab-size must be > 16")
    try:
        ins = bench_serve.random_lengths(args.num_prompts, args.input_len,
                                         args.random_range_ratio, args.seed)
        outs = bench_serve.random_lengths(args.num_prompts, args.output_len,
                                          args.random_range_ratio, args.seed + 1)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    prompts = (bench_serve.random_texts(args.num_prompts, ins, args.seed)
               if args.backend == "openai-chat"
               else bench_serve.random_prompts(args.num_prompts, ins, args.vocab_size, args.seed))
    r = asyncio.run(bench_serve.run(args.base_url, args.model, prompts, outs,
                                    args.request_rate, args.max_concurrency, args.api_key,
                                    args.seed, args.backend))
    bench_serve.print_summary(r, args.base_url)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=2)
    return 0 if r["completed"] else 1
