"""The MTP drafting that CUDA graphs replay (engine/draft_graph.py), run eagerly on the CPU over
the same static batches: it drafts exactly what the eager proposer drafts, step after step,
through acceptances at every offset (so the catch-up over every row of a step, rejected rows
included, leaves the MTP caches as the eager catch-up over the accepted rows does)."""
import random

import pytest

import torch

from dsv4 import LLM, SamplingParams
from dsv4.engine.cuda_graph import CUDAGraphRunner
from dsv4.engine.draft_graph import DraftGraph, DraftGraphs


class _EagerGraph:
    """A captured graph's stand-in: replay runs its body again into the first run's output
    buffers (a tuple of tensors, or None)."""

    def __init__(self, body):
        self.body = body
        self.out = body()

    def replay(self):
        for buf, new in zip(self.out, self.body()):
            if buf is not None:
                buf.copy_(new)


class EagerGraphs(CUDAGraphRunner):
    """CPU stand-in for CUDAGraphRunner: the same StaticBatches, step selection and output
    buffers, each "graph" run eagerly instead of replayed (no prefill graphs)."""

    def __init__(self, engine, tokens_per_seq: int, max_prefill_tokens: int = 0,
                 short_len: int = 0):
        r = engine.runner
        super().__init__(r.model, r.cache, engine.scheduler.max_num_seqs, tokens_per_seq,
                         engine.max_model_len, pad_slot=r.cache.num_slots - 1,
                         pad_block=r.cache.num_blocks - 1,
                         max_prefill_tokens=max_prefill_tokens, short_len=short_len)

    @torch.inference_mode()
    def _graph(self, body):
        g = _EagerGraph(body)
        return g, g.out


class EagerDraftGraphs(DraftGraphs):
    def _capture(self, key):
        r = self.runner
        band, bs = key
        dg = DraftGraph(r.model, r.cache, r.graphs[key][2], bs, self.k, r.static_args(band))
        self._dummy(dg, bs)
        self.graphs[key] = (None, dg)

    @torch.inference_mode()
    def _replay(self, g, dg):
        dg.body()


PARAMS = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 4, 8)]


def _run(k: int, graphs: bool, prompts, seed: int, ref=None, force: bool = False):
    llm = LLM(model="tiny", dtype="float32", device="cpu", speculative_tokens=k, max_num_seqs=4)
    eng = llm.llm_engine
    if force:
        eng.runner.proposer.force_accept = True
    eng.graph_drafts, eng.fused_drafts = [], []
    if graphs:  # a short context band of 14 tokens: sequences cross it while decoding
        eng.runner.graphs = EagerGraphs(eng, 1 + k, short_len=14)
        eng.runner.draft_graphs = dg = EagerDraftGraphs(eng.runner.graphs, k)
        run, run_verified = dg.run, dg.run_verified
        dg.run = lambda *a: eng.graph_drafts.append(a[0]) or run(*a)
        dg.run_verified = lambda *a: eng.fused_drafts.append(a[0]) or run_verified(*a)
    rng = random.Random(seed)
    raw = []

    def override(seq, post):  # record the MTP's own drafts, then draft the reference with
        # errors: acceptances of every length
        prompt = tuple(seq.request.prompt_token_ids)
        raw.append((prompt, len(post), list(seq.drafts)))
        cont = ref[prompt][len(post) - len(prompt):]
        return [t if rng.random() < 0.7 else (t + 1) % 512 for t in cont[:len(seq.drafts)]] or [0]

    if ref is not None:
        eng.runner.proposer.override = override
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)  # batches of 3, 2 and 1
    return [o.outputs[0].token_ids for o in outs], raw, eng


def test_graph_drafting_drafts_what_eager_drafting_drafts():
    g = random.Random(0)
    prompts = [[g.randrange(16, 512) for _ in range(n)] for n in (5, 9, 3)]
    ref_tokens, _, _ = _run(0, False, prompts, seed=0)
    ref = {tuple(p): t for p, t in zip(prompts, ref_tokens)}
    for k in (1, 3):
        want_tokens, want_raw, _ = _run(k, False, prompts, seed=k, ref=ref)
        got_tokens, got_raw, eng = _run(k, True, prompts, seed=k, ref=ref)
        assert got_tokens == want_tokens == ref_tokens
        assert got_tokens == want_tokens
        assert len(got_raw) == len(want_raw) and got_raw == want_raw
        # the decode steps drafted through the graphs, at more than one batch size; with one
        # draft, verification and drafting ran together (the verified tokens stayed on the
        # device: `ModelRunner._verify_and_draft`) on every step that verified
        used = eng.fused_drafts if k == 1 else eng.graph_drafts
        assert len(used) >= 3 and len({bs for _, bs in used}) >= 2
        assert {band for band, _ in used} == {14, eng.max_model_len}, used  # both bands
        if k > 1:
            assert not eng.fused_drafts
        accepted = eng.runner.proposer.stats()["acceptance_rate_per_position"]
        assert all(0 < a < 1 for a in accepted), accepted


def test_forced_acceptance_with_graph_drafting_emits_what_eager_drafting_emits():
    """Benchmarks' `force_accept` (every draft accepted, whatever it is) through the fused K=1
    verify-and-draft (`DraftGraphs.run_verified` accepts on the device) and through eager
    drafting: the same emitted tokens, every draft accepted."""
    g = random.Random(1)
    prompts = [[g.randrange(16, 512) for _ in range(n)] for n in (5, 9, 3)]
    want, _, ref_eng = _run(1, False, prompts, seed=0, force=True)
    got, _, eng = _run(1, True, prompts, seed=0, force=True)
    assert got == want
    assert len(eng.fused_drafts) >= 3
    assert eng.runner.proposer.stats()["acceptance_rate_per_position"] == [1.0]
    assert ref_eng.runner.proposer.stats()["acceptance_rate_per_position"] == [1.0]


def test_sampled_requests_keep_the_eager_drafting():
    prompts = [[7, 8, 9, 10]]
    llm = LLM(model="tiny", dtype="float32", device="cpu", speculative_tokens=2, max_num_seqs=2)
    eng = llm.llm_engine
    eng.runner.graphs = EagerGraphs(eng, 3)
    eng.runner.draft_graphs = EagerDraftGraphs(eng.runner.graphs, 2)
    calls = []
    run = eng.runner.draft_graphs.run
    eng.runner.draft_graphs.run = lambda *a: calls.append(1) or run(*a)
    llm.generate(prompts, SamplingParams(temperature=0.7, seed=1, max_tokens=6), use_tqdm=False)
    assert not calls
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert calls


@pytest.mark.parametrize("k", [0, 1])
def test_ragged_steps_through_the_graph_runner_give_the_eager_tokens(k):
    """The engine with (CPU stand-ins of) decode and prefill graphs: short prompts arriving
    beside decodes replay decode graphs (of a 64-token context band and of the full one),
    longer chunks prefill graphs of 384 / 512 tokens, snapshot chunks too; the greedy tokens are the eager engine's, with MTP drafts (k = 1:
    drafting graphs after decode-shaped steps, eager drafting after the others) too."""
    from dsv4.engine.cuda_graph import CUDAGraphRunner
    prompts = [[16 + (i * 31 + j * 17) % 490 for j in range(n)]
               for i, n in enumerate([5, 3, 140, 2, 300, 9])]
    params = SamplingParams(temperature=0, max_tokens=6)
    outs = []
    for graphs in (False, True):
        llm = LLM(model="tiny", dtype="float32", device="cpu", max_num_seqs=4,
                  max_num_batched_tokens=512, speculative_tokens=k)
        eng, replayed = llm.llm_engine, []
        if graphs:
            eng.runner.graphs = EagerGraphs(eng, 1 + k, max_prefill_tokens=512, short_len=64)
            assert sorted(eng.runner.graphs.prefill) == [384, 512]
            if k:
                eng.runner.draft_graphs = EagerDraftGraphs(eng.runner.graphs, k)
            run = eng.runner.graphs.run
            eng.runner.graphs.run = lambda b, *a: replayed.append(b) or run(b, *a)
        got, pending = {}, list(enumerate(prompts))
        while pending or eng.has_unfinished_requests():
            if pending:
                i, p = pending.pop(0)
                eng.add_request(str(i), {"prompt_token_ids": p}, params)
            for o in eng.step():
                if o.finished:
                    got[int(o.request_id)] = o.outputs[0].token_ids
        outs.append([got[i] for i in range(len(prompts))])
    assert outs[0] == outs[1]
    assert isinstance(eng.runner.graphs, CUDAGraphRunner)
    decode_tokens = 4 * (1 + k)
    assert any(max(b.lens) > 1 + k and b.num_tokens <= decode_tokens for b in replayed)
    assert any(b.num_tokens > decode_tokens for b in replayed)  # prefill graphs
    assert any(c.snapshots for b in replayed for c in b.chunks)
    ends = [max(c.start_pos + len(c.tokens) for c in b.chunks) for b in replayed
            if b.num_tokens <= decode_tokens]  # decode graphs of both context bands
    assert min(ends) <= 64 < max(ends)


def test_prefill_graphs_larger_than_the_context_are_captured_as_several_chunks():
    """max_model_len below a prefill graph's token capacity (seen on two H200s: 1024-token
    contexts, graphs up to 2048 tokens): the capture batch splits the capacity into chunks of
    at most the context (one chunk of t tokens did not fit the graph's block tables), no
    capacity exceeds what max_num_seqs such chunks hold, and the graphs replay the eager
    engine's tokens."""
    prompts = [[16 + (i * 31 + j * 17) % 490 for j in range(n)]
               for i, n in enumerate([5, 140, 300, 9, 250])]
    params = SamplingParams(temperature=0, max_tokens=6)
    outs = []
    for graphs in (False, True):
        llm = LLM(model="tiny", dtype="float32", device="cpu", max_num_seqs=2,
                  max_model_len=320, max_num_batched_tokens=768)
        eng, replayed = llm.llm_engine, []
        if graphs:
            eng.runner.graphs = EagerGraphs(eng, 1, max_prefill_tokens=768)
            # 2 sequences of at most 320 tokens: 640 at most
            assert sorted(eng.runner.graphs.prefill) == [384, 512, 640]
            run = eng.runner.graphs.run
            eng.runner.graphs.run = lambda b, *a: replayed.append(b) or run(b, *a)
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                   use_tqdm=False)])
    assert outs[0] == outs[1]
    assert any(b.num_tokens > 2 for b in replayed)  # prefill graphs replayed


def test_plain_greedy_steps_sample_from_the_greedy_graph():
    """One-token decode graphs come with a graph of the plain-greedy sampling of their logits
    (`CUDAGraphRunner.greedy`): a step in which every row samples that way takes its ids,
    logprobs and ranks from it, with the tokens and logprobs of the eager engine; steps that
    sample otherwise (a temperature, top logprobs) and ragged steps take the sampler's
    path. Sync and async scheduling."""
    prompts = [[16 + (i * 31 + j * 17) % 490 for j in range(n)] for i, n in enumerate([5, 9, 3])]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=None)
    mixed = [greedy, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2),
             greedy]
    for async_scheduling in (True, False):
        outs, used = [], []
        for graphs in (False, True):
            llm = LLM(model="tiny", dtype="float32", device="cpu", max_num_seqs=4,
                      async_scheduling=async_scheduling)
            eng = llm.llm_engine
            if graphs:
                eng.runner.graphs = EagerGraphs(eng, 1)
                assert set(eng.runner.graphs.greedy_graphs) == set(eng.runner.graphs.graphs)
                real = eng.runner.graphs.greedy
                eng.runner.graphs.greedy = lambda n: used.append(n) or real(n)
            got = []
            for params in ([greedy] * 3, mixed):
                got.append([(o.outputs[0].token_ids, o.outputs[0].cumulative_logprob)
                            for o in llm.generate(prompts, params, use_tqdm=False)])
                if graphs:
                    used.append("|")
            outs.append(got)
        (plain_e, mixed_e), (plain_g, mixed_g) = outs
        assert [t for t, _ in plain_e] == [t for t, _ in plain_g]
        assert [t for t, _ in mixed_e] == [t for t, _ in mixed_g]
        for (_, a), (_, b) in zip(plain_e + mixed_e, plain_g + mixed_g):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
        plain_calls, mixed_calls = "".join(map(str, used)).split("|")[:2]
        assert plain_calls and set(plain_calls) <= {"3", "2", "1"}  # batch 3 (graph 4), ...
        assert mixed_calls == ""  # top logprobs in the batch: the sampler's path
