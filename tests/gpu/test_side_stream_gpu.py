"""The side stream of an attention layer (`kernels/side_stream.py`): the kv row and the
compressor run beside the query path; the model's outputs are bit-identical to the one-stream
run, in prefill chunks (DSV4_SIDE_STREAM=1) and decode steps (1, the default auto, and
wide: three side streams in CSA layers),
eagerly (and through the engine's CUDA graphs in tests/gpu/test_engine_gpu.py, which run the
default)."""
import pytest
import torch

from dsv4.config import ModelConfig
from dsv4.model.init import init_random_
from dsv4.model.model import DeepseekV4Model

from test_model_gpu import FORMATS, greedy

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("fmt", ["fp4", "bf16"])
def test_side_stream_changes_no_output(fmt, monkeypatch):
    cfg = ModelConfig.preset("tiny").replace(**FORMATS[fmt])
    model = init_random_(DeepseekV4Model(cfg, dtype="bfloat16").eval(), seed=4).cuda()
    prompt = list(range(5, 5 + 300))  # past the window and several compressed entries
    monkeypatch.setenv("DSV4_SIDE_STREAM", "0")
    ids, logits = greedy(model, prompt, 12, "cuda")
    for mode in ("1", "auto", "wide"):
        monkeypatch.setenv("DSV4_SIDE_STREAM", mode)
        ids2, logits2 = greedy(model, prompt, 12, "cuda")
        assert ids2 == ids
        assert torch.equal(logits2, logits)
