"""Which Triton kernels compile after the engine's warm-up, for which request shapes, and for how
long each first request of a new shape waits on them.

    python benchmarks/jit_compiles.py --preset flash --layers 4 [--budget 8192] [--prefix-caching]

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
from collections import defaultdict
from pathlib import Path

import torch
import triton

from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.sampler import SamplingParams
from dsv4.loader import tiny_config


class CompileLog:
    """Every Triton compile: kernel, seconds, and its launch arguments (constexpr values, and
    for the others the type with `/16` where Triton specialised on divisibility by 16)."""

    def __init__(self):
        self.events: list[tuple[str, float, dict | str]] = []
        self._variants: dict[str, list[dict]] = defaultdict(list)
        self._start: dict[str, float] = {}
        triton.knobs.runtime.jit_cache_hook = self._before
        triton.knobs.runtime.jit_post_compile_hook = self._after

    def _before(self, *, key, **_):
        self._start[str(key)] = time.perf_counter()
        return False  # compile

    def _after(self, *, key, fn, compile, **_):
        seconds = time.perf_counter() - self._start.pop(str(key), time.perf_counter())
        args = {}
        attrs = compile["configs"][0]
        for i, name in enumerate(fn.jit_function.arg_names):
            if (i,) in compile["constants"]:
                value = compile["constants"][(i,)]
                args[name] = getattr(value, "value", value)
            else:
                div16 = any(a[0] == "tt.divisibility" for a in attrs.get((i,), []))
                args[name] = compile["signature"].get(name, "?") + ("/16" if div16 else "")
        args["num_warps"], args["num_stages"] = compile["num_warps"], compile["num_stages"]
        seen = self._variants[fn.name]
        if seen:
            near = min(seen, key=lambda v: sum(v.get(k) != x for k, x in args.items()))
            what = {k: f"{near.get(k)} -> {x}" for k, x in args.items() if near.get(k) != x}
        else:
            what = "first variant"
        seen.append(args)
        self.events.append((fn.name, seconds, what))


def serve(engine: LLMEngine, log: CompileLog, tag: str, prompts: list[list[int]],
          max_tokens: int = 2) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    first = len(log.events)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    new = log.events[first:]
    print(f"{tag:24s} {time.perf_counter() - t0:7.2f} s, {len(new)} compiles "
          f"({sum(e[1] for e in new):.2f} s)", flush=True)
    for name, seconds, what in new:
        print(f"    {name:32s} {seconds:5.2f} s  {what}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="flash", choices=["flash", "pro"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--format", default="fp4")
    ap.add_argument("--budget", type=int, default=8192, help="max_num_batched_tokens")
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--prefix-caching", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("jit_compiles.py measures Triton compiles: it needs a CUDA GPU")
    log = CompileLog()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_config(args.format, args.preset, args.layers)
        (Path(tmp) / "config.json").write_text(json.dumps(cfg.to_dict()))
        t0 = time.perf_counter()
        engine = LLMEngine.from_args(tmp, load_format="dummy", max_model_len=args.max_model_len,
                                     max_num_batched_tokens=args.budget,
                                     enable_prefix_caching=args.prefix_caching,
                                     gpu_memory_utilization=0.8)
        print(f"{'start-up':24s} {time.perf_counter() - t0:7.2f} s, {len(log.events)} compiles "
              f"({sum(e[1] for e in log.events):.1f} s)", flush=True)

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
