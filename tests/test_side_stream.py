"""`kernels/side_stream.py` off the GPU: the modes, the branch is a no-op (program order), and the
compressor's `prepare` (what the attention calls before forking) builds exactly the batch
tensors its forward reads, leaving the outputs unchanged."""
from __future__ import annotations

import pytest
import torch

from dsv4.kernels.side_stream import SideBranch
from dsv4.model.batch import ForwardBatch, SeqChunk
from model_helpers import make_cache, make_model, run_chunks


def test_cpu_branch_is_program_order(monkeypatch):
    monkeypatch.setenv("DSV4_SIDE_STREAM", "1")
    branch = SideBranch(torch.device("cpu"))
    assert not branch.on
    out = []
    with branch.run():
        out.append(1)
    out.append(2)
    branch.join()
    assert out == [1, 2]


def test_modes(monkeypatch):
    from dsv4.kernels.side_stream import (SIDE_MAX_TOKENS, side_stream_on,
                                          side_stream_policy, side_streams_wide)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv("DSV4_SIDE_STREAM", raising=False)  # auto: decode-sized steps only
    assert side_stream_on(cuda, 1) and side_stream_on(cuda, SIDE_MAX_TOKENS)
    assert not side_stream_on(cuda, SIDE_MAX_TOKENS + 1)  # prefill chunks stay on one stream
    assert "64 tokens" in side_stream_policy()
    assert not SideBranch(cuda, 1, enabled=False).on  # layers without a compressor
    assert not side_streams_wide()
    monkeypatch.setenv("DSV4_SIDE_STREAM", "wide")  # auto's steps, three streams in CSA layers
    assert side_streams_wide() and side_stream_on(cuda, 1)
    assert not side_stream_on(cuda, SIDE_MAX_TOKENS + 1) and "three" in side_stream_policy()
    monkeypatch.setenv("DSV4_SIDE_STREAM", "1")
    assert side_stream_on(cuda, 8192) and not side_streams_wide()
    monkeypatch.setenv("DSV4_SIDE_STREAM", "0")
    assert not side_stream_on(cuda, 1) and side_stream_policy() == ""
    for mode in ("auto", "wide", "1", "0"):
        monkeypatch.setenv("DSV4_SIDE_STREAM", mode)
        assert not side_stream_on(cpu, 1)
    monkeypatch.setenv("DSV4_SIDE_STREAM", "yes")
    with pytest.raises(ValueError, match="DSV4_SIDE_STREAM must be auto, wide, 0 or 1"):
        side_stream_on(cuda, 1)


def test_compressor_prepare_builds_what_forward_reads():
    model = make_model()
    ids = list(range(3, 3 + 150))
    want = run_chunks(model, make_cache(model), ids, [150])
    cache = make_cache(model)
    b = ForwardBatch([SeqChunk(ids, 0, 0, list(range(4)))], model.cfg.sliding_window,
                     cache.window_rows, cache.num_slots, logits_indices=list(range(150)))
    for layer in model.layers:  # as the attention does before forking
        if layer.ratio:
            layer.attn.compressor.prepare(b, cache.layers[layer.layer].state)
        if layer.ratio == 4:
            layer.attn.indexer.compressor.prepare(b, cache.layers[layer.layer].idx_state)
    built = dict(b._plans)
    assert any(k[0] == "plan" for k in built) and any(k[0] == "ring" for k in built)
    with torch.inference_mode():
        got = model.logits(model(b, cache)[b.logits_indices])
    assert all(b._plans[k] is v for k, v in built.items())  # forward reused them
    assert torch.equal(got, want)
