"""Which Triton kernels compile after the engine's warm-up, for which request shapes, and for how
long each first request of a new shape waits on them.

    python benchmarks/jit_compiles.py --preset flash --layers 4 [--budget 8192] [--no-prefix-caching]

Builds a Flash- (or Pro-) shaped model cut to a few layers with dummy weights (the warm-up runs
as in `dsv4 serve`), then serves requests of assorted shapes one group at a time (a long prompt,
the same again, a next turn, short and odd lengths, concurrent mid-sized prompts, decodes at
odd batch sizes) and prints, per group, its wall time and every kernel compiled in it with the
launch argument that differs from the closest variant compiled before (Triton's hooks
`jit_cache_hook` / `jit_post_compile_hook`). A warm-up that covers serving prints no compile
after the start-up line.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dsv4.engine.llm_engine import LLMEngine
from dsv4.kernels.compile_watch import Compile, CompileWatch
from dsv4.engine.sampler import SamplingParams
from dsv4.loader import tiny_config


def serve(engine: LLMEngine, log: list[Compile], tag: str, prompts: list[list[int]],
          max_tokens: int = 2) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    first = len(log)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    new = log[first:]
    print(f"{tag:24s} {time.perf_counter() - t0:7.2f} s, {len(new)} compiles "
          f"({sum(c.seconds for c in new):.2f} s)", flush=True)
    for c in new:
        print(f"    {c.kernel:32s} {c.seconds:5.2f} s  {c.new or c.constants()}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="flash", choices=["flash", "pro"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--format", default="fp4")
    ap.add_argument("--budget", type=int, default=8192, help="max_num_batched_tokens")
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                    help="prefix caching, on as in the engine's default")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("jit_compiles.py measures Triton compiles: it needs a CUDA GPU")
    log: list[Compile] = []
    CompileWatch(log.append)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_config(args.format, args.preset, args.layers)
        (Path(tmp) / "config.json").write_text(json.dumps(cfg.to_dict()))
        t0 = time.perf_counter()
        engine = LLMEngine.from_args(tmp, load_format="dummy", max_model_len=args.max_model_len,
                                     max_num_batched_tokens=args.budget,
                                     enable_prefix_caching=args.prefix_caching,
                                     gpu_memory_utilization=0.8)
        print(f"{'start-up':24s} {time.perf_counter() - t0:7.2f} s, {len(log)} compiles "
              f"({sum(c.seconds for c in log):.1f} s)", flush=True)

        def tokens(n, seed):
            return [100 + (seed * 13 + 7 * i) % 5000 for i in range(n)]

        long = tokens(args.budget, 1)
        serve(engine, log, f"{args.budget} tokens", [long])
        serve(engine, log, "the same again", [long])
        serve(engine, log, "next turn (+500)", [long + tokens(500, 2)])
        serve(engine, log, "500 tokens", [tokens(500, 3)])
        serve(engine, log, "501 tokens", [tokens(501, 4)])
        serve(engine, log, "16 x 1000 tokens", [tokens(1000, 10 + j) for j in range(16)])
        serve(engine, log, "3000 tokens", [tokens(3000, 5)])
        if args.max_model_len > 2 * args.budget + 16:
            serve(engine, log, f"{2 * args.budget + 16} tokens", [tokens(2 * args.budget + 16, 6)])
        serve(engine, log, "48 x 100, 16 out", [tokens(100, 30 + j) for j in range(48)], 16)
        serve(engine, log, "7 x 37, 16 out", [tokens(37, 90 + j) for j in range(7)], 16)
        engine.close()


if __name__ == "__main__":
    main()
