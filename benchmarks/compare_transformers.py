"""dsv4 against Hugging Face transformers' DeepseekV4ForCausalLM, in one process, on one device,
on the same bf16 checkpoint: greedy decode tokens/s at several batch sizes, and whether the
greedy tokens agree.

    python benchmarks/compare_transformers.py --preset flash --layers 4 --device cuda
    python benchmarks/compare_transformers.py --preset tiny --device cpu      # smoke run

Speed: both in bf16 (dsv4 with its QAT simulations, as served). Tokens: both in float32 with
dsv4's `qat=False`, since transformers has no QAT simulation (SPEC.md 5.2, 6) and bf16 rounding
makes random models chaotic (SPEC.md 10); the agreement length per sequence is printed, not a
pass/fail.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch


def hf_decode(model, prompts: torch.Tensor, steps: int) -> tuple[list[list[int]], float]:
    """Greedy decode with transformers' own cache; returns tokens and decode tokens/s. Some
    transformers releases mix fp32 and bf16 inside DeepseekV4 in bf16 mode (a dtype error in a
    linear); then bf16 runs under autocast, as a user of that release would have to."""
    try:
        return _hf_decode(model, prompts, steps)
    except RuntimeError as exc:
        if "dtype" not in str(exc) or model.dtype != torch.bfloat16:
            raise
        print(f"transformers bf16 failed ({exc}); retrying under torch.autocast(bfloat16)")
        with torch.autocast(prompts.device.type, dtype=torch.bfloat16):
            return _hf_decode(model, prompts, steps)


def _hf_decode(model, prompts: torch.Tensor, steps: int) -> tuple[list[list[int]], float]:
    with torch.inference_mode():
        out = model(input_ids=prompts, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        toks = [nxt]
        sync()
        t = time.perf_counter()
        for _ in range(steps - 1):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
        sync()
        dt = time.perf_counter() - t
    return torch.cat(toks, 1).tolist(), prompts.shape[0] * (steps - 1) / dt


def dsv4_decode(engine, prompts: torch.Tensor, steps: int) -> tuple[list[list[int]], float]:
    from dsv4.engine.sampler import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    ids = [f"r{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts.tolist()):
        engine.add_request(rid, p, params)
    outs, t = {}, None
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id] = o
        sync()
        if t is None and len(outs) == len(prompts):  # every request has its first token
            t = time.perf_counter()
    dt = time.perf_counter() - t
    return [outs[r].outputs[0].token_ids for r in ids], len(prompts) * (steps - 1) / dt


def free(device: str) -> None:
    import gc
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    import transformers

    from dsv4.config import EngineConfig
    from dsv4.engine.llm_engine import LLMEngine
    from dsv4.loader import load_model, write_tiny_checkpoint
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", default="1,8,64")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--experts", type=int, help="routed experts per layer (fewer fit in memory)")
    ap.add_argument("--phases", default="speed,tokens", help="speed (bf16), tokens (float32)")
    a = ap.parse_args()
    layers = a.layers if a.preset != "tiny" else None
    path = write_tiny_checkpoint(tempfile.mkdtemp() + "/ckpt", fmt="bf16", preset=a.preset,
                                 layers=layers, device=a.device, experts=a.experts)
    sizes = [int(b) for b in a.batch_sizes.split(",")]
    prompts = {b: torch.randint(16, 512 if a.preset == "tiny" else 129280, (b, a.input_len),
                                generator=torch.Generator().manual_seed(b)).to(a.device)
               for b in sizes}
    speed, agree = {}, {}
    phases = [ph for ph in (("speed", "bfloat16", True), ("tokens", "float32", False))
              if ph[0] in a.phases.split(",")]
    for phase, dtype, qat in phases:
        # one model on the device at a time: both in float32 would not fit beside each other
        loaded = load_model(path, dtype=dtype, device=a.device, qat=qat)
        ec = EngineConfig(dtype=dtype, max_num_seqs=max(sizes), max_num_batched_tokens=8192,
                          gpu_memory_utilization=0.5, max_model_len=a.input_len + a.steps + 8,
                          cpu_cache_bytes=1 << 30)
        engine = LLMEngine(loaded.model, loaded.config, loaded.tokenizer, ec,
                           loaded.generation_config)
        ours = {b: dsv4_decode(engine, prompts[b], a.steps) for b in sizes}
        engine.close()
        del engine, loaded
        free(a.device)
        hf = transformers.DeepseekV4ForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype)).to(a.device).eval()
        theirs = {b: hf_decode(hf, prompts[b], a.steps) for b in sizes}
        del hf
        free(a.device)
        for b in sizes:  # printed as soon as known: a long run may be cut short
            if phase == "speed":
                speed[b] = (ours[b][1], theirs[b][1])
                print(f"speed b={b}: dsv4 {speed[b][0]:.1f} tok/s, transformers "
                      f"{speed[b][1]:.1f} tok/s", flush=True)
            else:
                agree[b] = [agreement(x, y) for x, y in zip(ours[b][0], theirs[b][0])]
                print(f"tokens b={b}: agreement per sequence {agree[b]}", flush=True)
    if not (speed and agree):
        return
    rows = [(b, *speed[b], agree[b]) for b in sizes]
    print(f"\n{a.preset} x {a.layers if layers else 'all'} layers"
          f"{f' x {a.experts} routed experts' if a.experts else ''}, bf16 checkpoint, {a.device}, "
          f"{a.input_len}-token prompts, {a.steps} greedy steps")
    print("| batch | dsv4 decode tok/s | transformers decode tok/s | speed-up | greedy tokens agreeing (per sequence, dsv4 qat=False) |")
    print("|---|---|---|---|---|")
    for b, ours, theirs, agree in rows:
        print(f"| {b} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.1f}x | "
              f"min {min(agree)}, median {sorted(agree)[len(agree) // 2]} of {a.steps} |")


if __name__ == "__main__":
    main()
