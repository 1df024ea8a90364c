"""Prefill in one call, in chunks, and token by token give the same logits (SPEC.md 9), and a
ragged batch gives each sequence's own logits. Float32 with bf16-free arithmetic: the only
differences left are fp32 summation order, so agreement must be tight at every position."""
import pytest
import torch

from model_helpers import make_cache, make_model, run_chunks
from dsv4.model.batch import ForwardBatch, SeqChunk

ATOL = 1e-4


def _ids(n, seed=1, vocab=512):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _assert_same(a, b, what):
    diff = (a - b).abs().amax(-1)
    bad = (diff > ATOL).nonzero().flatten().tolist()
    assert not bad, f"{what}: positions {bad[:10]} differ, max |dlogit| {diff.max():.3g}"


# Lengths crossing 1, m-1, m, m+1 (m = 4 and 128), w-1, w, w+1 and 2w+3 for the tiny w = 8.
LENGTHS = [1, 3, 4, 5, 7, 8, 9, 19]


@pytest.mark.parametrize("topk", [4, 64], ids=["topk<available", "topk>=available"])
def test_full_prefill_equals_token_by_token_and_chunks(topk):
    model = make_model(index_topk=topk)
    ids = _ids(131)  # crosses the HCA edges 127, 128, 129 as well
    full = run_chunks(model, make_cache(model), ids, [131])
    _assert_same(full, run_chunks(model, make_cache(model), ids, [1] * 131), "token by token")
    for sizes in ([3, 5, 1, 9, 100, 13], [64, 64, 3], [127, 1, 1, 2]):
        _assert_same(full, run_chunks(model, make_cache(model), ids, sizes), f"chunks {sizes}")


@pytest.mark.parametrize("length", LENGTHS)
def test_short_prefills_equal_token_by_token(tiny, length):
    ids = _ids(length, seed=length)
    full = run_chunks(tiny, make_cache(tiny), ids, [length])
    _assert_same(full, run_chunks(tiny, make_cache(tiny), ids, [1] * length), f"L={length}")


def test_ragged_batch_equals_each_sequence_alone(tiny):
    """Three sequences at different positions (two prefilling a chunk, one decoding) in one call."""
    seqs = [_ids(23, 2), _ids(9, 3), _ids(14, 4)]
    history = [15, 0, 13]  # tokens already cached before the batched step
    alone = []
    for s, (ids, h) in enumerate(zip(seqs, history)):
        cache = make_cache(tiny)
        sizes = [h, len(ids) - h] if h else [len(ids)]
        alone.append(run_chunks(tiny, cache, ids, sizes, slot=s)[h:])
    cache = make_cache(tiny)
    for s, (ids, h) in enumerate(zip(seqs, history)):
        if h:
            run_chunks(tiny, cache, ids[:h], [h], slot=s)
    chunks = [SeqChunk(ids[h:], h, s, list(range(s * 4, s * 4 + 4)))
              for s, (ids, h) in enumerate(zip(seqs, history))]
    b = ForwardBatch(chunks, tiny.cfg.sliding_window, cache.window_rows, cache.num_slots,
                     logits_indices=list(range(sum(len(c.tokens) for c in chunks))))
    with torch.inference_mode():
        batched = tiny.logits(tiny(b, cache))
    for s in range(3):
        _assert_same(batched[b.cu[s]:b.cu[s + 1]], alone[s], f"sequence {s}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_fp4_indexer_keys_change_nothing(dtype):
    """With QAT the indexer keys are e2m1 x power-of-two values: the packed cache (80 bytes a
    key) gives bit-identical logits to keys kept in the working dtype, across CSA selections
    (top-k smaller than what is available)."""
    model = make_model(dtype=dtype, index_topk=4)
    ids = _ids(131, seed=5)
    sizes = [40, 1, 1, 60, 29]
    cache = make_cache(model, index_fp4=True)
    csa = [layer for layer in cache.layers if layer.idx is not None]
    assert csa and all(layer.idx.dtype == torch.uint8 and layer.idx.shape[-1] == 80
                       for layer in csa)
    packed = run_chunks(model, cache, ids, sizes)
    assert any(layer.idx.any() for layer in csa)
    plain = run_chunks(model, make_cache(model, index_fp4=False), ids, sizes)
    assert torch.equal(packed, plain)


def test_config_sizes_are_not_hard_coded():
    """Another window, top-k and group count: still consistent."""
    model = make_model(sliding_window=5, index_topk=2, o_groups=4, hc_mult=2)
    ids = _ids(30, 7)
    full = run_chunks(model, make_cache(model), ids, [30])
    _assert_same(full, run_chunks(model, make_cache(model), ids, [1] * 30), "w=5, topk=2")


def test_logits_are_finite_and_not_degenerate(tiny):
    logits = run_chunks(tiny, make_cache(tiny), _ids(40), [40])
    assert torch.isfinite(logits).all()
    assert logits.std(-1).min() > 0.1, "logits nearly constant over the vocabulary"
    top = torch.softmax(logits, -1).amax(-1)
    assert top.max() < 0.999 and logits.argmax(-1).unique().numel() > 5


def test_bfloat16_tracks_float32(tiny):
    """bf16 rounding makes random tiny models chaotic (SPEC.md 10): require close logits on
    the leading positions and a high top-1 agreement overall, not equality."""
    bf = make_model(dtype="bfloat16")
    ids = _ids(40)
    a = run_chunks(tiny, make_cache(tiny), ids, [40])
    b = run_chunks(bf, make_cache(bf), ids, [40]).float()
    assert (a[:4] - b[:4]).abs().max() < 0.25
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree >= 0.8, f"bf16 top-1 agrees with fp32 on only {agree:.0%} of positions"


def test_indexer_slices_of_a_long_chunk_change_nothing(monkeypatch):
    """A prefill chunk whose candidate lists would be large is scored and selected in slices
    of tokens (`indexer.MAX_SCORES`): every token's selection is its own, so the logits are
    bit-identical to one pass, in a ragged batch too."""
    from dsv4.model import indexer as model_indexer
    model = make_model(dtype="float32", seed=3)
    ids = [5 + (7 * j) % 400 for j in range(170)]
    chunks = lambda: [SeqChunk(ids[:170], 0, 0, list(range(4))),  # noqa: E731
                      SeqChunk(ids[:90], 0, 1, list(range(4, 8)))]

    def logits():
        cache = make_cache(model)
        b = ForwardBatch(chunks(), model.cfg.sliding_window, cache.window_rows, cache.num_slots,
                         logits_indices=list(range(260)))
        with torch.inference_mode():
            return model.logits(model(b, cache)[b.logits_indices])
    want = logits()
    calls = []
    real = model_indexer.indexer_topk
    monkeypatch.setattr(model_indexer, "indexer_topk",
                        lambda q, *a, **k: calls.append(q.shape[0]) or real(q, *a, **k))
    monkeypatch.setattr(model_indexer, "MAX_SCORES", 42 * 16)  # 170 // 4 = 42 entries: 16 tokens
    got = logits()
    assert torch.equal(got, want)
    # each CSA layer: 17 slices of at most 16 of the step's 260 tokens
    assert max(calls) == 16 and len(calls) % 17 == 0 and sum(calls) == 260 * (len(calls) // 17)
