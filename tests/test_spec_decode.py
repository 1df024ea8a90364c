"""MTP speculative decoding is exact: greedy output equals non-speculative greedy output, and
sampled output follows the same distribution (SPEC.md 8; rollback design in kv_cache.py)."""
import random

import pytest
from scipy.stats import chi2_contingency

from dsv4 import LLM, SamplingParams

PROMPT_LENGTHS = [3, 4, 5, 7, 8, 9, 17, 127, 128, 129]  # m-1, m, m+1 for m=4 and 128; w=8


def _llm(k, **kw):
    kw.setdefault("max_num_seqs", 16)
    return LLM(model="tiny", dtype="float32", device="cpu", speculative_tokens=k, **kw)


def _prompts(lengths, seed=0):
    g = random.Random(seed)
    return [[g.randrange(16, 512) for _ in range(n)] for n in lengths]


def _greedy(llm, prompts, max_tokens=14):
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens),
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference():
    prompts = _prompts(PROMPT_LENGTHS)
    return prompts, _greedy(_llm(0), prompts)


def _oracle(reference, error_rate, seed=0):
    """Drafts that follow the reference continuation, with some tokens wrong: long acceptances
    and rejections at every offset (the random MTP layer alone is almost never right)."""
    prompts, outs = reference
    by_prompt = {tuple(p): o for p, o in zip(prompts, outs)}
    rng = random.Random(seed)

    def override(seq, post):
        ref = by_prompt[tuple(seq.request.prompt_token_ids)]
        done = len(post) - seq.num_prompt_tokens
        rate = error_rate(seq) if callable(error_rate) else error_rate
        return [t if rng.random() >= rate else (t + 1) % 512 for t in ref[done:done + 8]] or [0]
    return override


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_with_real_mtp_drafts_equals_no_speculation(reference, k):
    prompts, ref = reference
    llm = _llm(k)
    assert _greedy(llm, prompts) == ref


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_with_mostly_accepted_drafts_equals_no_speculation(reference, k):
    """Rollback lands on and around every compression boundary and across the window."""
    prompts, ref = reference
    llm = _llm(k)
    llm.llm_engine.runner.proposer.override = _oracle(reference, 0.25, seed=k)
    assert _greedy(llm, prompts) == ref
    stats = llm.llm_engine.spec_stats()
    assert stats["mean_accepted_length"] > 1.5, stats


def test_batch_mixing_acceptance_lengths_equals_each_alone(reference):
    prompts, ref = reference
    llm = _llm(2)
    rates = {tuple(p): r for p, r in zip(prompts, [0.0, 1.0, 0.5, 0.1, 0.9] * 2)}
    llm.llm_engine.runner.proposer.override = _oracle(
        reference, lambda seq: rates[tuple(seq.request.prompt_token_ids)])
    assert _greedy(llm, prompts) == ref


def test_chunked_prefill_and_preemption_with_speculation():
    """Prompts just under a block boundary: decoding crosses it, the 3-block cache runs out, and
    the newest sequences are preempted and recomputed, drafts and all."""
    prompts = _prompts([120, 121, 122, 123], seed=3)
    import torch
    from dsv4.cache.kv_cache import block_bytes, slot_bytes
    from dsv4.config import ModelConfig
    ref = _greedy(_llm(0), prompts)
    cfg = ModelConfig.preset("tiny")  # 4 slots and 3 blocks of the float32 tiny model
    budget = (4 * slot_bytes(cfg, 8, torch.float32)
              + 3 * block_bytes(cfg, torch.float32, index_fp4=True))
    llm = _llm(2, max_num_batched_tokens=48, max_num_seqs=4, cpu_cache_bytes=budget)
    llm.llm_engine.runner.proposer.override = _oracle((prompts, ref), 0.3)
    assert _greedy(llm, prompts) == ref
    assert llm.llm_engine.get_stats().num_preemptions > 0
    assert llm.llm_engine.block_manager.num_free_blocks == llm.llm_engine.num_blocks


def test_sampled_tokens_follow_the_same_distribution_at_1e3_significance():
    """(first, second) generated tokens over 1500 seeded samples with and without speculation:
    a chi-square test of homogeneity must not reject at significance 0.001. The second token is
    the first one that went through draft acceptance."""
    params = SamplingParams(n=1500, temperature=1.0, top_k=4, max_tokens=2, seed=7)
    prompt = [[40, 41, 42, 43, 44]]
    pairs = []
    for k in (0, 2):
        llm = _llm(k, max_num_seqs=1500, max_num_batched_tokens=8192, cpu_cache_bytes=600 << 20)
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        pairs.append([tuple(c.token_ids) for c in out.outputs])
    keys = sorted(set(pairs[0]) | set(pairs[1]))
    table = [[p.count(key) + 0.5 for key in keys] for p in pairs]
    _, pval, _, _ = chi2_contingency(table)
    assert pval > 1e-3, f"speculative sampling changed the distribution: p = {pval:.2g}"


def test_greedy_fast_paths_match_the_sampler_paths(reference):
    """Greedy plain requests draft and verify by argmax on the device (`_draft_greedy`,
    `_verify_greedy`); a batch mixing them with a seeded sampled request takes the general
    paths for drafting. Both give the non-speculative tokens and cumulative logprobs."""
    prompts, ref = reference

    def run(llm, mixed):
        greedy = SamplingParams(temperature=0, max_tokens=14)
        params = [greedy] * len(prompts)
        if mixed:
            params = params + [SamplingParams(temperature=0.8, seed=3, max_tokens=14)]
        outs = llm.generate(prompts + ([prompts[0]] if mixed else []), params, use_tqdm=False)
        return [(o.outputs[0].token_ids, o.outputs[0].cumulative_logprob) for o in outs]

    plain = run(_llm(0), False)
    for mixed in (False, True):
        llm = _llm(2)
        llm.llm_engine.runner.proposer.override = _oracle(reference, 0.3, seed=1)
        got = run(llm, mixed)[:len(prompts)]
        assert [t for t, _ in got] == ref == [t for t, _ in plain]
        for (_, lp), (_, want) in zip(got, plain):
            assert lp == pytest.approx(want, abs=1e-4)


def test_forced_acceptance_emits_every_draft_with_its_own_logprob():
    """Benchmarks' force_accept (every draft accepted, right or wrong): the output is the forced
    drafts plus bonus tokens, and its cumulative logprob is what the model gives those tokens
    when the whole sequence is scored as a prompt."""
    prompt = _prompts([12], seed=4)[0]
    llm = _llm(2)
    proposer = llm.llm_engine.runner.proposer
    proposer.force_accept = True
    proposed = []

    def override(seq, post):  # tokens the model would not pick
        proposed.append((len(post) - len(prompt), [(len(post) * 7) % 500 + 3] * 2))
        return proposed[-1][1]
    proposer.override = override
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=9),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 9 and len(proposed) >= 2
    for at, drafts in proposed[:-1]:  # each step emitted its drafts, then a bonus token
        assert out.token_ids[at:at + 2] == drafts
    scored = _llm(0).generate([prompt + out.token_ids],
                              SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                              use_tqdm=False)[0].prompt_logprobs
    want = sum(scored[len(prompt) + i][t].logprob for i, t in enumerate(out.token_ids))
    assert out.cumulative_logprob == pytest.approx(want, abs=1e-3)


def test_verified_tokens_report_the_same_logprobs_as_plain_decoding(reference):
    """Greedy requests that ask for logprobs take the general verification (batched over the
    step's sequences, each with its own top-n): same tokens, logprobs, ranks and top lists as
    without speculation, next to a request asking for a different top-n."""
    prompts, ref = reference
    asks = [SamplingParams(temperature=0, max_tokens=10, logprobs=n) for n in (3, 0, 5)]

    def run(llm):
        outs = llm.generate(prompts[:3], asks, use_tqdm=False)
        return [o.outputs[0] for o in outs]

    plain = run(_llm(0))
    llm = _llm(2)
    llm.llm_engine.runner.proposer.override = _oracle(reference, 0.3, seed=2)
    for got, want, ask in zip(run(llm), plain, asks):
        assert got.token_ids == want.token_ids
        for g, w in zip(got.logprobs, want.logprobs):
            assert list(g) == list(w)  # the sampled token, then the top-n in order
            assert len(g) >= ask.logprobs
            for t in w:
                assert g[t].logprob == pytest.approx(w[t].logprob, abs=1e-4)
                assert g[t].rank == w[t].rank
    assert llm.llm_engine.spec_stats()["verify_steps"] > 0
