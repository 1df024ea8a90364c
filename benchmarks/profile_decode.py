"""Where a decode step's time goes: GPU kernel time per op for one batch of decode steps.

    python benchmarks/profile_decode.py --preset flash --layers 4 --format fp4 --batch 1

Builds the dummy-weight model on the GPU (as engine_gpu.py), prefills `--batch` prompts, then
runs `--steps` decode steps under torch.profiler, eagerly and then with CUDA graphs, and prints
the kernels sorted by total GPU time per step plus the wall time per step of both modes.

With programmatic dependent launch (the default on sm_90 for steps of up to 64 tokens) a
kernel starts while its predecessor runs and waits on the GPU, so the profiler's time of each
kernel includes that wait and the per-kernel sum exceeds the step (batch 1: 1.60 ms of
"kernel time" in a 1.06 ms step). For per-kernel times run with `DSV4_PDL=0`.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dsv4.config import EngineConfig
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.sampler import SamplingParams
from dsv4.loader import load_model, tiny_config


def decode_steps(engine: LLMEngine, batch: int, input_len: int, steps: int, prof: bool):
    g = torch.Generator().manual_seed(0)
    # tokens enough for every sequence to decode through the profiled steps: a large batch's
    # prompts start decoding over several prefill steps, and a sequence that finished early
    # would shrink the measured batch
    params = SamplingParams(temperature=0.0, ignore_eos=True,
                            max_tokens=min(steps + 8 + batch * input_len // 1024,
                                           engine.max_model_len - input_len))
    for i in range(batch):
        ids = torch.randint(0, engine.model_config.vocab_size, (input_len,), generator=g).tolist()
        engine.add_request(f"p{i}-{time.monotonic_ns()}", {"prompt_token_ids": ids}, params)
    # until every prompt is prefilled (a sequence decodes once only its last token is new)
    while (engine.scheduler.waiting
           or any(s.num_uncomputed > 1 for s in engine.scheduler.running)):
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    p = profile(activities=[ProfilerActivity.CUDA]) if prof else None
    if p:
        p.__enter__()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    if p:
        p.__exit__(None, None, None)
    if len(engine.scheduler.running) != batch:
        print(f"note: {len(engine.scheduler.running)} of {batch} sequences decoding at the end "
              f"of the measured steps (preempted or finished): a smaller batch was measured")
    while engine.has_unfinished_requests():
        engine.step()
    return dt, p


def print_kernels(p, steps: int, top: int) -> None:
    """The profiled kernels sorted by GPU time per step, with their total."""
    rows = [(ev.key, ev.device_time_total / steps, ev.count / steps)
            for ev in p.key_averages() if ev.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    from dsv4.kernels.pdl import launch_policy
    pol = launch_policy()
    print(f"GPU kernel time per step: {total / 1e3:.3f} ms ({pol}"
          f"{'; kernel times include PDL waits: DSV4_PDL=0 for per-kernel times' if 'programmatic' in pol else ''})")
    for name, us, n in rows[:top]:
        print(f"{us:9.1f} us {n:6.1f}x  {name[:110]}")


def print_sequence(p, steps: int) -> None:
    """One step's kernels in launch order with their GPU times (the profiled steps' kernels
    split evenly: the last step's share), for spotting what could be fused."""
    evs = [ev for ev in p.events() if ev.device_time_total > 0 and ev.device_type.name == "CUDA"]
    evs.sort(key=lambda ev: ev.time_range.start)
    per = len(evs) // max(steps, 1)
    print(f"\n-- one step's {per} kernels in order (start offset, duration)")
    last = evs[-per:] if per else []
    t0 = last[0].time_range.start if last else 0
    for ev in last:
        print(f"{ev.time_range.start - t0:9.1f} {ev.device_time_total:7.1f} us  {ev.name[:100]}")


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--preset, --layers, --format of the dummy-weight model (`dummy_model`), and --top."""
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--format", default="fp4")
    ap.add_argument("--top", type=int, default=40, help="kernels listed")


def dummy_model(preset: str, layers: int, fmt: str):
    """The dummy-weight model of engine_gpu.py, built on the GPU."""
    cfg = tiny_config(fmt, preset, layers)
    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    return load_model(d, dtype="bfloat16", device="cuda", load_format="dummy")


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cprofile", action="store_true",
                    help="also cProfile the steps (host time per Python function)")
    ap.add_argument("--graphs-only", action="store_true", help="skip the eager run")
    ap.add_argument("--sequence", action="store_true",
                    help="also list one step's kernels in launch order")
    ap.add_argument("--enable-prefix-caching", action="store_true",
                    help="prefix caching on, as the engine's default (off here unless given)")
    a = ap.parse_args()
    loaded = dummy_model(a.preset, a.layers, a.format)
    for eager in ((False,) if a.graphs_only else (True, False)):
        ec = EngineConfig(dtype="bfloat16", max_num_seqs=max(8, a.batch), max_num_batched_tokens=8192,
                          max_model_len=4096, gpu_memory_utilization=0.8, enforce_eager=eager,
                          cuda_graph_max_len=4096,
                          enable_prefix_caching=a.enable_prefix_caching)
        e = LLMEngine(loaded.model, loaded.config, loaded.tokenizer, ec, loaded.generation_config)
        dt, p = decode_steps(e, a.batch, a.input_len, a.steps, prof=True)
        print(f"\n== {'eager' if eager else 'CUDA graphs'}: batch {a.batch}, "
              f"{dt * 1e3:.2f} ms per decode step (wall, under the profiler)")
        print_kernels(p, a.steps, a.top)
        if a.sequence:
            print_sequence(p, a.steps)
        dt2, _ = decode_steps(e, a.batch, a.input_len, a.steps, prof=False)
        print(f"without the profiler: {dt2 * 1e3:.2f} ms per decode step")
        if a.cprofile:  # host time per Python function (eager steps: the launches' cost)
            pr = cProfile.Profile()
            pr.enable()
            decode_steps(e, a.batch, a.input_len, a.steps, prof=False)
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        e.close()
        del e
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
