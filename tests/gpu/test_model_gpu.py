"""The model on CUDA (Triton kernels) against the CPU torch reference, in every weight format.

Whole-model comparisons follow SPEC.md 10: float32 working dtype, count the leading positions
whose greedy tokens agree exactly, and require tight logits on those positions."""
import pytest
import torch

from dsv4.cache.kv_cache import ModelCache
from dsv4.config import ModelConfig
from dsv4.model.batch import ForwardBatch, SeqChunk
from dsv4.model.init import init_random_
from dsv4.model.model import DeepseekV4Model

pytestmark = pytest.mark.gpu

FORMATS = {
    "bf16": dict(quantization_config=None, expert_dtype=None),
    "fp8": dict(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]},
                expert_dtype=None),
    "fp4": dict(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]},
                expert_dtype="fp4"),
    "nvfp4": dict(quantization_config={"quant_method": "modelopt", "quant_algo": "NVFP4",
                                       "exclude_modules": ["*.attn.*"]}, expert_dtype=None),
    # ModelOpt's exports leave the shared experts unquantised: the routed experts take the
    # kernels, the bf16 shared expert its own linears
    "nvfp4-bf16-shared": dict(quantization_config={
        "quant_method": "modelopt", "quant_algo": "NVFP4",
        "exclude_modules": ["*.attn.*", "*.ffn.shared_experts.*"]}, expert_dtype=None),
}


def greedy(model, prompt, steps, device):
    cfg = model.cfg
    cache = ModelCache(cfg, num_slots=2, num_blocks=8, margin=8, dtype=model.dtype, device=device,
                       index_fp4=model.qat)  # as the engine: packed indexer keys
    ids, logits = list(prompt), []
    pos, chunk = 0, list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            b = ForwardBatch([SeqChunk(chunk, pos, 0, list(range(8)))], cfg.sliding_window,
                             cache.window_rows, cache.num_slots, device=device)
            lg = model.logits(model(b, cache)[b.logits_indices])[0].float().cpu()
            logits.append(lg)
            pos += len(chunk)
            chunk = [int(lg.argmax())]
            ids += chunk
    return ids[len(prompt):], torch.stack(logits)


PROMPTS = 3


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_cuda_model_agrees_with_cpu_reference(fmt, record_property):
    """Three prompts per format. A random tiny model is chaotic (SPEC.md 10): one rounding
    difference near an FP8/FP4 boundary or a routing near-tie changes the logits by O(1) from
    that position on, and which prompt meets one depends on every kernel's summation order
    (the fp8 model's first prompt meets one in its prefill with the 2026-11-29 kernels, and
    not when any one of RoPE, RMSNorm, pooling or attention runs the torch op instead). A real
    error shows on every prompt, so a majority of the prompts must agree tightly."""
    cfg = ModelConfig.preset("tiny").replace(**FORMATS[fmt])
    cpu = init_random_(DeepseekV4Model(cfg, dtype="float32").eval(), seed=3)
    gpu = DeepseekV4Model(cfg, dtype="float32").eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    agreements, clean = [], 0
    for seed in range(1, PROMPTS + 1):
        prompt = torch.randint(16, cfg.vocab_size, (150,),
                               generator=torch.Generator().manual_seed(seed)).tolist()
        a, la = greedy(cpu, prompt, 40, "cpu")
        b, lb = greedy(gpu, prompt, 40, "cuda")
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        diff = (la[:agree + 1] - lb[:agree + 1]).abs().amax(-1)
        print(f"{fmt} prompt {seed}: greedy tokens agree on the first {agree}/{len(a)} positions; "
              f"max |dlogit| before divergence {diff[:max(agree, 1)].max():.2e}")
        agreements.append(agree)
        # FP8/FP4 kernels differ from the reference by summation order only, but FP8
        # re-rounding inside the MoE turns that into logit differences of up to ~0.1; a
        # boundary flip or a real error gives differences of order 1 and different tokens.
        clean += bool(diff[0] < 0.25 and agree >= 8)
    record_property("agreement", agreements)
    assert 2 * clean > PROMPTS, f"{fmt}: only {clean} of {PROMPTS} prompts agree ({agreements})"
