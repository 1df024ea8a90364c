"""Two H200s (kind nvidia-h200-x2, NCCL_NVLS_ENABLE=0): tensor-parallel attention and
expert-parallel MoE over NCCL against one GPU. Skipped with fewer than 2 GPUs.

SPEC.md 10: the exact comparison runs the tiny model in float32 (logits of prefill, decode and
MTP steps); the Flash-shaped bf16 engine run compares teacher-forced log-probabilities, since
a random bf16 model's greedy tokens part at its first near-tie."""
import json
import statistics
import tempfile
from pathlib import Path

import pytest
import torch
from test_tensor_parallel import run_one_process, run_two_ranks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


@pytest.mark.parametrize("lockstep", [False, True], ids=["eager", "graphs"])
def test_two_nccl_ranks_give_the_logits_of_one_gpu(lockstep):
    """Tiny model, float32, the GPU kernels on both sides: each rank's MoE computes only its
    own experts (others' slots left out of the routing plan) and its slice of the shared
    expert outside the kernels. `graphs`: rank 0 drives the worker as the engine does, the
    prefill eagerly and the decode steps through CUDA graphs captured on both ranks with their
    all-reduces inside (`LockstepModel.capture_graphs`), every other one with its token
    written on the device. A real error shows on every prompt; a rounding flip at an FP8
    boundary on one at most."""
    clean, report = 0, []
    for seed in (1, 2, 3):
        prompt = torch.randint(16, 512, (40,), generator=torch.Generator().manual_seed(seed)).tolist()
        want, want_toks = run_one_process(prompt, "cuda:0")
        got, toks = run_two_ranks(prompt, "nccl", lockstep=lockstep)
        diff = (got - want[:, :got.shape[1]]).abs().amax(-1)
        report.append(f"prompt {seed}: tokens {'agree' if toks == want_toks else 'differ'}, "
                      f"max |dlogit| per step {[f'{d:.1e}' for d in diff.tolist()]}")
        clean += bool(toks == want_toks and diff.max() < 5e-3)
    print("\n".join(report))
    assert clean >= 2, report


@pytest.mark.parametrize("allreduce,bands", [("nccl", False), ("one-shot", False),
                                              ("one-shot", True)])
def test_engine_with_tp_graphs_generates_what_one_gpu_generates(allreduce, bands, monkeypatch):
    """The tensor-parallel engine decodes through CUDA graphs captured on every rank, with
    async scheduling (device-sampled ids broadcast to the workers), by default; small
    all-reduces through torch's symmetric-memory kernel (the default) or NCCL's ring.
    `bands`: decode graphs in two context bands (136 tokens, which the 130-token prompt
    crosses while decoding, and the full length), rank 0's bands on every rank."""
    from dsv4 import LLM, SamplingParams
    from dsv4.distributed import _one_shot, _rendezvoused
    from dsv4.engine import cuda_graph
    monkeypatch.setenv("DSV4_TP_ALLREDUCE", allreduce)
    if bands:
        monkeypatch.setattr(cuda_graph, "SHORT_LEN", 136)
    prompts = [[20 + (i * 7 + j) % 400 for j in range(n)] for i, n in enumerate((3, 40, 130))]
    params = SamplingParams(temperature=0, max_tokens=12)
    kw = {"model": "tiny", "dtype": "float32", "device": "cuda", "max_num_seqs": 4,
          "gpu_memory_utilization": 0.3, "warmup": False}
    one = LLM(**kw)
    want = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
    del one
    torch.cuda.empty_cache()
    # a second one-shot engine in this process keeps NCCL (`enable_one_shot_all_reduce`)
    one_shot = allreduce == "one-shot" and not _rendezvoused
    two = LLM(**kw, tensor_parallel_size=2)
    try:
        assert two.llm_engine.runner.graphs is not None, "no CUDA graphs under TP"
        assert len(two.llm_engine.runner.graphs.bands) == (2 if bands else 1)
        assert two.llm_engine.async_scheduling
        assert bool(_one_shot) == one_shot
        got = [o.outputs[0].token_ids for o in two.generate(prompts, params, use_tqdm=False)]
    finally:
        two.llm_engine.close()
    print(f"TP=2 with graphs, {allreduce}, bands {bands}: {sum(a == b for a, b in zip(want, got))} of 3 "
          "prompts agree")
    assert sum(a == b for a, b in zip(want, got)) >= 2, (want, got)


def test_two_gpus_serve_flash_shapes_like_one_gpu():
    """Flash-shaped 4-layer FP4 model (dummy weights), bf16, through `LLM`: greedy on one GPU,
    then both engines score prompt + that continuation (prompt_logprobs). Rank r holds experts
    [128 r, 128 r + 128) and half the heads, as on a real pair of GPUs. The exact check is the
    float32 test above; this one bounds the bf16 spread (2026-11-29 on two H200s: median 0.056,
    max 0.39 over 480 positions, 77% within 0.1) so that a split that drops or doubles a part
    of the sum, which moves every position, fails."""
    from dsv4 import LLM, SamplingParams
    from dsv4.loader import tiny_config
    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(json.dumps(tiny_config("fp4", "flash", 4).to_dict()))
    prompts = [[100 + (i * 7 + j) % 5000 for j in range(n)] for i, n in enumerate((5, 130, 300))]
    greedy = SamplingParams(temperature=0, max_tokens=16)
    score = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    kw = {"model": str(d), "load_format": "dummy", "device": "cuda", "max_num_seqs": 4,
          "max_model_len": 1024, "gpu_memory_utilization": 0.6, "warmup": False}

    def scored(llm, texts):
        outs = llm.generate([{"prompt_token_ids": t} for t in texts], score, use_tqdm=False)
        return [[next(iter(p.values())).logprob for p in o.prompt_logprobs[1:]] for o in outs]

    one = LLM(**kw)
    cont = [p + o.outputs[0].token_ids
            for p, o in zip(prompts, one.generate(prompts, greedy, use_tqdm=False))]
    want = scored(one, cont)
    one.llm_engine.close()
    del one
    torch.cuda.empty_cache()
    two = LLM(**kw, tensor_parallel_size=2)
    try:
        got = scored(two, cont)
    finally:
        two.llm_engine.close()
    diffs = [abs(a - b) for w, g in zip(want, got) for a, b in zip(w, g)]
    close = sum(d < 0.1 for d in diffs) / len(diffs)
    print(f"TP=2 vs 1 GPU, teacher-forced log-probs over {len(diffs)} positions: median |d| "
          f"{statistics.median(diffs):.3f}, max {max(diffs):.3f}, {close:.1%} within 0.1")
    assert statistics.median(diffs) < 0.15 and max(diffs) < 1.0 and close > 0.5
