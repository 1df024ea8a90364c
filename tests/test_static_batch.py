"""A StaticBatch (the fixed shapes CUDA graphs replay) computes what a ForwardBatch computes."""
import pytest
import torch

from model_helpers import make_cache, run_chunks
from dsv4.model.batch import ForwardBatch, SeqChunk, StaticBatch


def test_padded_static_batch_gives_the_same_logits_and_cache(tiny):
    """Two different steps replayed on one StaticBatch (a larger one, then a smaller one that
    must not see the first one's indices) equal their ForwardBatch forwards."""
    cfg = tiny.cfg
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (11, 6, 14)]
    caches = [make_cache(tiny, num_slots=5, num_blocks=8) for _ in range(2)]
    for cache in caches:  # prefill each sequence in its own slot
        for s, ids in enumerate(prompts):
            run_chunks(tiny, cache, ids[:-3], [len(ids) - 3], slot=s, blocks=[s])
    ratios = {m for m in cfg.compress_ratios if m}
    sb = StaticBatch(num_seqs=4, tokens_per_seq=2, ratios=ratios,
                     state_rows={m: caches[1].state_rows(m) for m in ratios},
                     window=cfg.sliding_window, window_rows=caches[1].window_rows, num_slots=5,
                     max_model_len=512, pad_slot=4, pad_block=7, device="cpu")
    steps = [[SeqChunk(ids[-3:-1], len(ids) - 3, s, [s]) for s, ids in enumerate(prompts)],
             [SeqChunk(ids[-1:], len(ids) - 1, s, [s]) for s, ids in enumerate(prompts[:2])]]
    for chunks in steps:
        n = sum(len(c.tokens) for c in chunks)
        fb = ForwardBatch(chunks, cfg.sliding_window, caches[0].window_rows, 5,
                          logits_indices=list(range(n)))
        assert sb.fits(chunks)
        sb.load(ForwardBatch(chunks, cfg.sliding_window, caches[1].window_rows, 5,
                             logits_indices=list(range(n))))
        sb.prepare()
        with torch.inference_mode():
            ref = tiny.logits(tiny(fb, caches[0])[fb.logits_indices])
            got = tiny.logits(tiny(sb, caches[1])[sb.logits_indices])[:n]
        assert (ref - got).abs().max() < 1e-4
        for a, b in zip(caches[0].layers, caches[1].layers):
            assert torch.allclose(a.win[:3], b.win[:3], atol=1e-5)
            if a.cmp is not None:
                assert torch.allclose(a.cmp[:3], b.cmp[:3], atol=1e-5)
    assert not sb.fits([SeqChunk([1] * 9, 0, 0, [0])])  # more tokens than captured


def test_fp8_kv_cache_gives_the_same_logits_as_bf16_rows():
    """The packed FP8 row layout stores exactly the values the model computes (bf16 model)."""
    from model_helpers import make_model
    from dsv4.cache.kv_cache import ModelCache
    model = make_model(dtype="bfloat16")
    ids = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(9)).tolist()
    outs = []
    for fp8 in (False, True):
        cache = ModelCache(model.cfg, num_slots=2, num_blocks=4, margin=8, dtype=model.dtype,
                           kv_fp8=fp8)
        outs.append(run_chunks(model, cache, ids, [20, 1, 1, 8]))
        if fp8:
            assert cache.layers[1].win.dtype == torch.uint8
    assert torch.equal(outs[0], outs[1])


def test_a_block_table_too_short_for_a_write_is_refused(tiny):
    from dsv4.model.batch import ForwardBatch, SeqChunk
    b = ForwardBatch([SeqChunk(list(range(20)), 120, 0, [3])], 8, 16, 2)  # reaches 140 > 128
    with pytest.raises(ValueError, match="block table has only 1 blocks"):
        b.compress_plan(4, 16)


def test_window_index_on_the_device_equals_the_host_one():
    """Eager GPU steps build the [T, w] window index with torch where they run
    (`ForwardBatch.window_index_torch`); it is the host's numpy index entry for entry: ragged
    chunks, chunks starting inside and past the first window, a ring shorter than positions."""
    g = torch.Generator().manual_seed(3)
    for window, rows in ((8, 12), (128, 136)):
        chunks = []
        for slot, (start, n) in enumerate(((0, 1), (0, 300), (5, 3), (window - 1, 2),
                                           (1000, 1), (517, 260))):
            ids = torch.randint(0, 512, (n,), generator=g).tolist()
            chunks.append(SeqChunk(ids, start, slot, list(range((start + n) // 128 + 1))))
        b = ForwardBatch(chunks, window, rows, num_slots=7)
        got = b.window_index_torch()
        assert got.dtype == torch.int64
        assert torch.equal(got, torch.from_numpy(b.window_index_host))


def test_graph_length_fits_the_lists_into_the_memory_left():
    """With cuda_graph_max_len unset the graphs serve all of max_model_len unless their
    context-wide lists (int64 rows per ratio, fp32 indexer scores) would take more than the
    budget: then the length halves, not below 16384 (or max_model_len if smaller)."""
    from dsv4.engine.cuda_graph import (MIN_AUTO_LEN, SHORT_LEN, fit_graph_len,
                                        graph_list_bytes)
    ratios = [0, 0, 4, 128, 4, 0]
    assert graph_list_bytes(ratios, (2, 3), 1024) == 2 * (8 * 256 + 8 * 8) + 3 * 4 * 256
    assert graph_list_bytes([0, 0], (64, 64), 1 << 20) == 0  # no compressed layers, no lists
    # the short band's lists, its MTP drafting graphs' chained steps (up to 8 positions past
    # it) included, stay within the top-k's one-program width, and the band is no shorter
    # than that needs
    from dsv4.kernels.topk import MAX_KERNEL_N
    assert -(-(SHORT_LEN + 8) // 4) <= MAX_KERNEL_N < -(-(SHORT_LEN + 8 + 4 * 8) // 4)
    # past SHORT_LEN the short context band's lists come on top
    assert graph_list_bytes(ratios, (2, 3), 1 << 16) == (
        2 * (8 * (1 << 14) + 8 * (1 << 9)) + 3 * 4 * (1 << 14)
        + 2 * (8 * -(-SHORT_LEN // 4) + 8 * -(-SHORT_LEN // 128)))
    one_m, t64 = 1 << 20, (64, 64)
    per_64 = graph_list_bytes(ratios, t64, one_m)
    assert fit_graph_len(ratios, t64, one_m, per_64) == one_m
    assert fit_graph_len(ratios, t64, one_m, per_64 - 1) == one_m // 2
    assert fit_graph_len(ratios, t64, one_m, per_64 // 5) == one_m // 8
    assert fit_graph_len(ratios, t64, one_m, 0) == MIN_AUTO_LEN
    assert fit_graph_len(ratios, t64, 3000, 0) == 3000
    t = (1024, 1024)
    n = fit_graph_len(ratios, t, 1_000_000, 3 << 30)
    assert graph_list_bytes(ratios, t, n) <= 3 << 30 < graph_list_bytes(ratios, t, 2 * n)


def test_engine_picks_the_graph_length_from_the_free_memory(monkeypatch, caplog):
    """LLMEngine._graph_len: an explicit cuda_graph_max_len wins (capped at max_model_len);
    unset, all of max_model_len if the lists fit half the free memory, else halved, with a
    warning naming the settings."""
    from types import SimpleNamespace

    from dsv4.config import EngineConfig, ModelConfig
    from dsv4.engine.cuda_graph import graph_list_bytes, graph_tokens
    from dsv4.engine.llm_engine import LLMEngine
    cfg = ModelConfig.preset("flash")
    eng = SimpleNamespace(max_model_len=1 << 20, device=torch.device("cpu"))
    need = graph_list_bytes(cfg.compress_ratios, graph_tokens(64, 0), 1 << 20)
    ec = EngineConfig(max_num_seqs=64)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * need, 4 * need))
    assert LLMEngine._graph_len(eng, cfg, ec) == 1 << 20
    half = graph_list_bytes(cfg.compress_ratios, graph_tokens(64, 0), 1 << 19)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * half, 4 * need))
    with caplog.at_level("WARNING"):
        assert LLMEngine._graph_len(eng, cfg, ec) == 1 << 19
    assert "cuda_graph_max_len" in caplog.text and "decode eagerly" in caplog.text
    assert LLMEngine._graph_len(eng, cfg, EngineConfig(cuda_graph_max_len=4096)) == 4096
    # one set of lists for every graph, as long as the largest batch (1 + K tokens a
    # sequence; K > 1 drafts chain one-token steps with lists of their own)
    assert graph_tokens(64, 0) == (64, 64)
    assert graph_tokens(64, 1) == (128, 128)
    assert graph_tokens(3, 2) == (12, 9)
    assert LLMEngine._graph_len(eng, cfg, EngineConfig(cuda_graph_max_len=1 << 30)) == 1 << 20


def test_block_tables_upload_resets_what_earlier_steps_wrote():
    """The block tables live block-major at the end of the ints arena and a step uploads only
    the blocks in use plus those an earlier step wrote: the device view always equals this
    step's tables, padded with the pad block past them, whatever came before (wide, narrow,
    wider)."""
    sb = StaticBatch(num_seqs=3, tokens_per_seq=1, ratios={4, 128}, state_rows={4: 8, 128: 128},
                     window=128, window_rows=128, num_slots=4, max_model_len=4096, pad_slot=3,
                     pad_block=99, device="cpu")
    for tables in ([[1, 2, 3, 4, 5], [6, 7]], [[8]], [[9, 10], [11, 12, 13], [14]], [[15] * 20]):
        chunks = [SeqChunk([0], 0, s, t) for s, t in enumerate(tables)]
        sb.load(ForwardBatch(chunks, 128, 128, 4))
        want = torch.full((3, sb.max_blocks), 99)
        want[:len(tables), :max(map(len, tables))] = 0  # the batch pads its rows with 0
        for s, t in enumerate(tables):
            want[s, :len(t)] = torch.tensor(t)
        assert torch.equal(sb.block_tables, want)
        assert sb.block_tables.shape == (3, sb.max_blocks)


def test_static_batches_share_their_lists():
    """StaticBatches given one `lists` dict (the CUDA graphs) build their compressed-row lists
    in shared buffers (views of one allocation per ratio and width) with the same contents as
    their own; a buffer outgrown by a larger batch stays referenced."""
    kw = dict(ratios={4, 128}, state_rows={4: 8, 128: 128}, window=128, window_rows=128,
              num_slots=6, max_model_len=2048, pad_slot=5, pad_block=99, device="cpu")
    shared = {}
    small = StaticBatch(num_seqs=2, tokens_per_seq=1, lists=shared, **kw)
    big = StaticBatch(num_seqs=5, tokens_per_seq=1, lists=shared, **kw)
    for sb, n in ((small, 2), (big, 5), (small, 2)):
        own = StaticBatch(num_seqs=sb.num_seqs, tokens_per_seq=1, **kw)
        chunks = [SeqChunk([0], 100 * s + 37 * n, s, list(range(5 * s, 5 * s + 5)))
                  for s in range(n)]
        for b in (sb, own):
            b.load(ForwardBatch(chunks, 128, 128, 6))
            b.prepare()
        for m in (4, 128):
            for got, want in zip(sb.candidates(m), own.candidates(m)):
                assert torch.equal(got, want)
    rows = big.candidates(4)[0]
    assert rows.data_ptr() == shared[(4, 512)][0].data_ptr() == small.candidates(4)[0].data_ptr()
    assert len(shared["outgrown"]) == 2  # the small batch's first buffers (ratios 4 and 128)


def _cache_tensors(cache):
    """Every per-slot and per-block buffer of a cache (windows, compressed rows, states)."""
    out = []
    for layer in cache.layers:
        out.append(layer.win)
        for buf in (layer.cmp, layer.idx):
            if buf is not None:
                out.append(buf)
        for st in (layer.state, layer.idx_state):
            if st is not None:
                out.extend((st.kv, st.score))
    return out


def test_ragged_steps_replay_a_static_batch(tiny):
    """A graph's StaticBatch also replays ragged steps that fit its capacities (CUDA graphs
    for short prefills): a prefill chunk beside decode tokens, then a chunk writing a prefix
    snapshot into a copied slot, give the logits and caches of their ForwardBatch forwards;
    steps over the token, window or ring-write capacity do not fit."""
    cfg = tiny.cfg
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (20, 7, 15)]
    starts = (11, 6, 14)  # tokens already in the cache
    caches = [make_cache(tiny, num_slots=6, num_blocks=8) for _ in range(2)]
    for cache in caches:
        for s, (ids, p) in enumerate(zip(prompts, starts)):
            run_chunks(tiny, cache, ids[:p], [p], slot=s, blocks=[s])
    ratios = {m for m in cfg.compress_ratios if m}
    sb = StaticBatch(num_seqs=4, tokens_per_seq=4, ratios=ratios,
                     state_rows={m: caches[1].state_rows(m) for m in ratios},
                     window=cfg.sliding_window, window_rows=caches[1].window_rows, num_slots=6,
                     max_model_len=512, pad_slot=5, pad_block=7, device="cpu")
    ragged = [SeqChunk(ids[p:p + n], p, s, [s])
              for s, (ids, p, n) in enumerate(zip(prompts, starts, (9, 1, 1)))]
    # seq 0 continues to 20 with a snapshot at 16 into slot 3, a copy of its slot
    snap = [SeqChunk(prompts[0][11:20], 11, 0, [0], ((16, 3),))]
    for chunks in (ragged, snap):
        assert sb.fits(chunks) and max(len(c.tokens) for c in chunks) > sb.tokens_per_seq
        n = sum(len(c.tokens) for c in chunks)
        outs = []
        for cache, b in zip(caches, (ForwardBatch, ForwardBatch)):
            if chunks is snap:
                cache.copy_slots([(0, 3)])
            fb = b(chunks, cfg.sliding_window, cache.window_rows, 6, logits_indices=list(range(n)))
            if cache is caches[1]:
                sb.load(fb)
                sb.prepare()
                fb = sb
            with torch.inference_mode():
                outs.append(tiny.logits(tiny(fb, cache)[fb.logits_indices])[:n])
        assert (outs[0] - outs[1]).abs().max() < 1e-4
        for a, b in zip(_cache_tensors(caches[0]), _cache_tensors(caches[1])):
            assert torch.allclose(a[:5], b[:5], atol=1e-5)  # all but the padding's slot/block
        if chunks is ragged:  # the next step continues from this one
            for cache in caches:
                cache.copy_slots([(0, 4)])  # (keeps seq 0 before the snapshot step in slot 4)
    # over capacity: 17 tokens; 5 windows of ratio 4 (4 fit); ring writes past 16 entries
    assert not sb.fits([SeqChunk([1] * 17, 0, 0, [0])])
    assert not sb.fits([SeqChunk([1] * 13, 3, 0, [0]), SeqChunk([1], 7, 1, [1])])
    assert sb.fits([SeqChunk([1] * 12, 3, 0, [0])])
    assert not sb.fits([SeqChunk([1] * 12, 0, 0, [0], ((12, 3), (8, 4)))])


def test_graph_runner_picks_the_smallest_graph_a_step_fits():
    """Decode steps take the next batch size up; a ragged step the smallest decode graph whose
    token, window and ring capacities hold it, else the smallest prefill graph (contexts up to
    its own length); a step no graph holds, none (it runs eagerly). With a short context band,
    steps whose longest context fits it replay its graphs."""
    from dsv4.engine.cuda_graph import CUDAGraphRunner, prefill_sizes
    kw = dict(ratios={4, 128}, state_rows={4: 16, 128: 136}, window=128, window_rows=136,
              num_slots=9, pad_slot=8, pad_block=99, device="cpu")
    r = CUDAGraphRunner.__new__(CUDAGraphRunner)
    r.tokens_per_seq, r.max_len, r.prefill_len, r.sizes = 1, 4096, 1024, [1, 2, 4, 8]
    r._memo, r.bands = None, [4096]
    r.graphs = {(4096, b): (None, StaticBatch(b, 1, max_model_len=4096, **kw), None, None)
                for b in r.sizes}
    r.prefill = {t: (None, StaticBatch(8, 1, max_model_len=1024, num_tokens=t, ring_extra=t,
                                       **kw), None, None) for t in (16, 32)}
    dec = [SeqChunk([0], 300 + s, s, [0, 1, 2]) for s in range(3)]
    assert r._select(dec) == (r.graphs, (4096, 4)) and r.decode_key(dec) == (4096, 4)
    short = [SeqChunk([0] * 5, 0, 3, [3])] + dec  # a 5-token prompt beside 3 decodes
    assert r._select(short) == (r.graphs, (4096, 8)) and r.decode_key(short) == (4096, 8)
    longer = [SeqChunk([0] * 20, 0, 3, [3])] + dec
    assert r._select(longer) == (r.prefill, 32) and r.decode_key(longer) is None
    snap = [SeqChunk([0] * 12, 120, 3, [3, 4], ((128, 5),))]  # a snapshot: 8 more ring rows
    assert r._select(snap) == (r.prefill, 16)
    assert not r.fits([SeqChunk([0] * 33, 0, 3, [3])])  # more tokens than any graph holds
    assert not r.fits([SeqChunk([0] * 20, 1020, 3, list(range(9)))])  # past the prefill length
    assert r.fits([SeqChunk([0] * 2, 1020, 3, list(range(9)))])  # a decode graph's is longer
    assert not r.fits([SeqChunk([0] * 8, 4090, 3, list(range(33)))])  # past max_len
    # a short context band: steps whose longest context it holds replay its graphs
    r.bands, r._memo = [512, 4096], None
    r.graphs.update({(512, b): (None, StaticBatch(b, 1, max_model_len=512, **kw), None, None)
                     for b in r.sizes})
    assert r._select(dec) == (r.graphs, (512, 4))
    assert r._select(short) == (r.graphs, (512, 8))
    far = dec + [SeqChunk([0], 600, 3, list(range(5)))]  # one context past the band
    assert r._select(far) == (r.graphs, (4096, 4))
    at = [SeqChunk([0], 511, 3, list(range(4)))]  # ends at 512: the band still holds it
    assert r.decode_key(at) == (512, 1)
    assert r._select(longer) == (r.prefill, 32)  # ragged past the decode graphs: prefill
    # prefill graphs: past the decode graphs' tokens, up to the scheduler's step
    assert prefill_sizes(256, 1, 8192) == [384, 512, 640, 768, 896, 1024, 1280, 1536, 1792,
                                           2048]
    assert prefill_sizes(256, 2, 1024) == [640, 768, 896, 1024]
    assert prefill_sizes(8, 1, 300) == []
