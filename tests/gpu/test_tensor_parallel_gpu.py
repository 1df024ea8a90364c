"""Two H200s (kind nvidia-h200-x2): tensor-parallel attention + expert-parallel MoE over NCCL
give the greedy tokens of one GPU on a Flash-shaped 4-layer FP4 model (dummy weights).
Skipped with fewer than 2 GPUs."""
import json
import tempfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_generate_what_one_gpu_generates():
    from dsv4 import LLM, SamplingParams
    from dsv4.loader import tiny_config
    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(json.dumps(tiny_config("fp4", "flash", 4).to_dict()))
    prompts = [[100 + (i * 7 + j) % 5000 for j in range(n)] for i, n in enumerate((5, 130, 300))]
    params = SamplingParams(temperature=0, max_tokens=16)
    kw = dict(model=str(d), load_format="dummy", device="cuda", max_num_seqs=4,
              max_model_len=1024, gpu_memory_utilization=0.6)
    one = LLM(**kw, enforce_eager=True)
    want = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
    del one
    torch.cuda.empty_cache()
    two = LLM(**kw, tensor_parallel_size=2)
    try:
        got = [o.outputs[0].token_ids for o in two.generate(prompts, params, use_tqdm=False)]
    finally:
        two.llm_engine.close()
    agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
             for x, y in zip(want, got)]
    print(f"TP=2 vs 1 GPU: greedy tokens agree on {agree} of {params.max_tokens}")
    assert min(agree) >= 4, agree
