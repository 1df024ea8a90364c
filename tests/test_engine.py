"""The serving engine: continuous batching, chunked prefill, preemption, sampling, errors.

Everything runs the tiny preset in float32 on CPU. Equivalence tests compare token ids exactly:
a request's greedy output must not depend on what else is batched with it, on how its prompt is
chunked, or on whether it was preempted and recomputed.
"""
import dataclasses
import math
import os
import random

import pytest
import torch

from dsv4.cache.kv_cache import BLOCK_TOKENS, ModelCache, block_bytes, slot_bytes
from dsv4.config import ConfigError, ModelConfig
from dsv4.engine.llm_engine import LLMEngine, warm_up_lengths
from dsv4.engine.sampler import SamplingParams
from dsv4.model.batch import ForwardBatch, SeqChunk

CFG = ModelConfig.preset("tiny")
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
LENGTHS = (3, 9, 17, 25, 40, 12, 33, 5)


def make_engine(**kw) -> LLMEngine:
    # async scheduling is the default; test_async_scheduling.py runs this whole file again
    # with it off. Prefix caching (the default) is off here: this suite's accounting (every
    # block and slot free after a run, prefill chunks) is that of full prefills; the prefix
    # cache has its own suite (test_prefix_cache.py)
    args = dict(dtype="float32", device="cpu", max_num_seqs=8, cpu_cache_bytes=16 << 20,
                async_scheduling=os.environ.get("DSV4_TEST_ASYNC_SCHEDULING", "1") == "1",
                enable_prefix_caching=False)
    args.update(kw)
    return LLMEngine.from_args("tiny", **args)


def prompts(lengths, seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, CFG.vocab_size) for _ in range(n)] for n in lengths]


def run(engine: LLMEngine, requests: list, arrive_at: list[int] | None = None) -> list:
    """Submit (prompt, params) pairs, request i before step arrive_at[i]; final outputs in order."""
    arrive_at = arrive_at or [0] * len(requests)
    done, step = {}, 0
    while len(done) < len(requests):
        for i, (prompt, params) in enumerate(requests):
            if arrive_at[i] == step:
                engine.add_request(str(i), prompt, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return [done[str(i)] for i in range(len(requests))]


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return make_engine()


@pytest.fixture(scope="module")
def alone(engine) -> list[list[int]]:
    """Greedy output of each LENGTHS prompt run by itself."""
    return [tokens(run(engine, [(p, GREEDY)]))[0] for p in prompts(LENGTHS)]


# ------------------------------------------------------------------ batching
def test_batch_of_8_submitted_together_equals_each_alone(engine, alone):
    got = tokens(run(engine, [(p, GREEDY) for p in prompts(LENGTHS)]))
    for i, (g, a) in enumerate(zip(got, alone)):
        assert g == a, f"request {i} (prompt {LENGTHS[i]} tokens): batched {g} != alone {a}"


def test_batch_of_8_submitted_at_staggered_times_equals_each_alone(engine, alone):
    got = tokens(run(engine, [(p, GREEDY) for p in prompts(LENGTHS)],
                     arrive_at=[0, 1, 1, 3, 4, 7, 9, 15]))
    for i, (g, a) in enumerate(zip(got, alone)):
        assert g == a, f"request {i} (prompt {LENGTHS[i]} tokens): staggered {g} != alone {a}"


@pytest.mark.parametrize("budget", [3, 7, 16, 50])
def test_chunked_prefill_gives_the_same_outputs_as_no_chunking(alone, budget):
    eng = make_engine(max_num_batched_tokens=budget)
    got = tokens(run(eng, [(p, GREEDY) for p in prompts(LENGTHS)]))
    for i, (g, a) in enumerate(zip(got, alone)):
        assert g == a, f"budget {budget}, request {i}: chunked {g} != unchunked {a}"


def test_priority_policy_admits_by_priority_and_preempts_the_lowest():
    """scheduling_policy="priority" (vLLM's): waiting requests start by priority (lower
    first), then arrival; under memory pressure the lowest-priority running sequence is
    preempted, not the newest; outputs stay those of each request alone."""
    one = make_engine(max_num_seqs=1, scheduling_policy="priority")
    order = []
    for i, rank in enumerate([5, 0, 5, -2]):
        one.add_request(str(i), prompts([6], seed=i)[0], GREEDY, priority=rank)
    while one.has_unfinished_requests():
        order += [o.request_id for o in one.step() if o.finished]
    assert order == ["3", "1", "0", "2"]

    num_blocks, seqs = 3, 4
    budget = seqs * slot_bytes(CFG, 8, torch.float32) + num_blocks * block_bytes(CFG, torch.float32, index_fp4=True)
    reqs = [(p, GREEDY) for p in prompts([120, 118, 121, 119], seed=1)]
    small = make_engine(max_num_seqs=seqs, cpu_cache_bytes=budget, scheduling_policy="priority")
    victims = []
    preempt = small.scheduler._preempt
    small.scheduler._preempt = lambda seq: victims.append(seq.request.request_id) or preempt(seq)
    ranks = [3, 1, 2, 0]  # the last to arrive comes first
    for i, ((prompt, params), rank) in enumerate(zip(reqs, ranks)):
        small.add_request(str(i), prompt, params, priority=rank)
    done = {}
    while small.has_unfinished_requests():
        done.update({o.request_id: o for o in small.step() if o.finished})
    # 3, 1 and 2 start (0, the lowest, waits); the first to lose its blocks is 2, the lowest
    # running, not 3, the newest; 3, the first in priority, never does
    assert victims[0] == "2" and "3" not in victims
    big = make_engine()
    for i, r in enumerate(reqs):
        assert done[str(i)].outputs[0].token_ids == tokens(run(big, [r]))[0]
    assert small.block_manager.num_free_blocks == num_blocks


def test_bad_words_never_end_the_output():
    """vLLM's bad_words on the engine: greedy decoding with a word that the plain output
    contains banned never produces its token sequences, and leaves the tokens before the
    first place the word would have been unchanged."""
    from dsv4.engine.sampler import tokenize_bad_words

    eng = make_engine()
    tok = eng.tokenizer
    prompt = prompts([9], seed=4)[0]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = tokens(run(eng, [(prompt, params)]))[0]
    # a word the plain output says: the text of one of its tokens that has letters
    at, word = next((i, tok.decode([t]).strip()) for i, t in enumerate(plain)
                    if tok.decode([t]).strip().isalpha())
    banned = tokenize_bad_words([word], lambda t: tok.encode(t, add_special_tokens=False))
    got = tokens(run(eng, [(prompt, SamplingParams(temperature=0.0, max_tokens=24,
                                                   ignore_eos=True, bad_words=[word]))]))[0]
    for ids in banned:
        assert not any(got[j:j + len(ids)] == ids for j in range(len(got))), (word, ids, got)
    first = min((j for ids in banned for j in range(len(plain))
                 if plain[j:j + len(ids)] == ids), default=at)
    assert got[:first] == plain[:first] and got != plain
    # with MTP drafts (not drafted for such sequences: their masks follow the output)
    spec = make_engine(speculative_tokens=2)
    assert tokens(run(spec, [(prompt, SamplingParams(temperature=0.0, max_tokens=24,
                                                     ignore_eos=True, bad_words=[word]))]))[0] == got
    with pytest.raises(ValueError, match="bad_words need a tokenizer"):
        make_engine(skip_tokenizer_init=True).add_request(
            "x", [5, 6], SamplingParams(bad_words=["a"]))


def test_priority_needs_the_priority_policy():
    eng = make_engine()
    with pytest.raises(ValueError, match="priority 1 needs the priority scheduling policy"):
        eng.add_request("a", [5, 6], GREEDY, priority=1)
    with pytest.raises(ValueError, match="priority must be an integer"):
        eng.add_request("b", [5, 6], GREEDY, priority=0.5)
    assert not eng.has_unfinished_requests()
    with pytest.raises(ConfigError, match="scheduling_policy 'lifo'"):
        make_engine(scheduling_policy="lifo")


def test_preemption_keeps_every_output_and_frees_every_block():
    # Three blocks for four prompts of 120 tokens: three start, and crossing position 128 each
    # needs a second block, so the newest running sequences are preempted and recomputed.
    num_blocks, seqs = 3, 4
    budget = seqs * slot_bytes(CFG, 8, torch.float32) + num_blocks * block_bytes(CFG, torch.float32, index_fp4=True)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    reqs = [(p, params) for p in prompts([120, 118, 121, 119], seed=1)]
    small = make_engine(max_num_seqs=seqs, cpu_cache_bytes=budget)
    assert small.num_blocks == num_blocks

    got = tokens(run(small, reqs))
    big = make_engine()
    expected = [tokens(run(big, [r]))[0] for r in reqs]

    stats = small.get_stats()
    assert stats.num_preemptions > 0, "the cache was meant to be too small to avoid preemption"
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"request {i}: with preemption {g} != alone {e}"
    assert stats.num_free_blocks == stats.num_blocks == num_blocks
    assert small.block_manager.num_free_slots == seqs and stats.num_running == 0


def test_long_prompt_crossing_a_block_equals_full_prefill_in_chunks():
    p = prompts([200], seed=2)[0]
    whole = tokens(run(make_engine(), [(p, GREEDY)]))[0]
    chunked = tokens(run(make_engine(max_num_batched_tokens=61), [(p, GREEDY)]))[0]
    assert chunked == whole


# ------------------------------------------------------------------ logprobs
def test_prompt_logprobs_equal_log_softmax_of_full_prefill_logits():
    eng = make_engine(max_num_batched_tokens=7)  # chunked, to check positions line up
    prompt = prompts([30], seed=3)[0]
    out = run(eng, [(prompt, SamplingParams(max_tokens=1, prompt_logprobs=3))])[0]

    cache = ModelCache(CFG, num_slots=1, num_blocks=1, dtype=torch.float32)
    batch = ForwardBatch([SeqChunk(prompt, 0, 0, [0])], CFG.sliding_window, cache.window_rows, 1,
                         logits_indices=list(range(len(prompt))))
    with torch.inference_mode():
        ref = torch.log_softmax(eng.model.logits(eng.model(batch, cache)[batch.logits_indices]), -1)

    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    for i in range(1, len(prompt)):
        row, tok = ref[i - 1], prompt[i]
        got = plp[i][tok]
        assert got.logprob == pytest.approx(row[tok].item(), abs=1e-4), f"position {i}"
        assert got.rank == int((row > row[tok]).sum()) + 1, f"position {i}"
        top = row.topk(3)
        for r, (lp, t) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            assert t in plp[i], f"position {i}: top-{r} token {t} missing from {sorted(plp[i])}"
            assert plp[i][t].logprob == pytest.approx(lp, abs=1e-4)


def test_logprobs_report_the_sampled_token_and_the_top_n(engine):
    out = run(engine, [(prompts([10])[0], SamplingParams(temperature=0.0, max_tokens=5,
                                                        logprobs=4))])[0].outputs[0]
    assert len(out.logprobs) == 5
    for tok, pos in zip(out.token_ids, out.logprobs):
        assert pos[tok].rank == 1  # greedy picks the most likely token
        assert len(pos) == 4 and sorted(p.rank for p in pos.values()) == [1, 2, 3, 4]
        assert all(isinstance(p.decoded_token, str) for p in pos.values())
    assert out.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in
                                                       zip(out.token_ids, out.logprobs)))


# ------------------------------------------------------------------ sampling
def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engine):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    p = prompts([14], seed=4)[0]
    first = tokens(run(engine, [(p, seeded)]))[0]
    again = tokens(run(engine, [(p, seeded)]))[0]
    others = [(q, SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True))
              for q in prompts([5, 30, 21], seed=5)]
    batched = tokens(run(engine, others[:2] + [(p, seeded)] + others[2:], [0, 0, 2, 1]))[2]
    assert first == again, "same seed, same prompt, different tokens"
    assert batched == first, "a seeded request's tokens changed with the batch around it"


def test_n_completions_use_distinct_seeds_and_are_reported_in_order(engine):
    out = run(engine, [(prompts([8])[0], SamplingParams(n=3, temperature=1.0, seed=7,
                                                        max_tokens=8, ignore_eos=True))])[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    ids = [tuple(c.token_ids) for c in out.outputs]
    assert len(set(ids)) == 3, f"seeds seed+i should give different samples: {ids}"
    single = run(engine, [(prompts([8])[0], SamplingParams(temperature=1.0, seed=8, max_tokens=8,
                                                           ignore_eos=True))])[0]
    assert list(ids[1]) == single.outputs[0].token_ids, "completion i is seeded with seed + i"


def _sampled_positions(engine, params):
    reqs = [(p, params) for p in prompts([6, 11, 19], seed=6)]
    for out in run(engine, reqs):
        for c in out.outputs:
            yield from zip(c.token_ids, c.logprobs)


def test_top_k_never_emits_a_token_outside_the_top_k(engine):
    params = SamplingParams(n=4, temperature=1.5, top_k=3, seed=0, max_tokens=10, ignore_eos=True,
                            logprobs=3)
    for tok, pos in _sampled_positions(engine, params):
        assert pos[tok].rank <= 3, f"token {tok} of rank {pos[tok].rank} sampled with top_k=3"


def test_top_p_never_emits_a_token_outside_the_nucleus():
    params = SamplingParams(n=4, temperature=1.0, top_p=0.2, seed=0, max_tokens=10,
                            ignore_eos=True, logprobs=CFG.vocab_size)
    for tok, pos in _sampled_positions(make_engine(max_logprobs=-1), params):
        before = sum(math.exp(p.logprob) for p in pos.values() if p.logprob > pos[tok].logprob)
        assert before < 0.2 + 1e-6, f"token {tok} has {before:.4f} of mass before it (top_p=0.2)"


def test_min_p_never_emits_a_token_below_min_p_times_the_top_probability(engine):
    params = SamplingParams(n=4, temperature=1.0, min_p=0.3, seed=0, max_tokens=10,
                            ignore_eos=True, logprobs=1)
    for tok, pos in _sampled_positions(engine, params):
        top = max(p.logprob for p in pos.values())
        assert pos[tok].logprob >= math.log(0.3) + top - 1e-6, f"token {tok} below min_p"


def test_stop_string_ends_generation_with_reason_stop_and_excludes_the_string(engine):
    p = prompts([12], seed=7)[0]
    full = run(engine, [(p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))])[0]
    text, ids = full.outputs[0].text, full.outputs[0].token_ids
    start = next(i for i in range(4, len(text) - 2) if text[i:i + 2].isprintable())
    stop = text[start:start + 2]
    out = run(engine, [(p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                          stop=[stop]))])[0].outputs[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.text == text[:text.find(stop)]
    assert out.token_ids == ids[:len(out.token_ids)] and len(out.token_ids) < len(ids)
    kept = run(engine, [(p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                           stop=[stop], include_stop_str_in_output=True))])[0]
    assert kept.outputs[0].text == text[:text.find(stop) + len(stop)]
    assert kept.outputs[0].token_ids == out.token_ids


def test_stop_token_id_ends_generation_on_that_token(engine):
    p = prompts([12], seed=7)[0]
    ids = tokens(run(engine, [(p, SamplingParams(temperature=0.0, max_tokens=10))]))[0]
    out = run(engine, [(p, SamplingParams(temperature=0.0, max_tokens=10,
                                          stop_token_ids=[ids[3]]))])[0].outputs[0]
    k = ids.index(ids[3])
    assert (out.finish_reason, out.stop_reason) == ("stop", ids[3])
    assert out.token_ids == ids[:k + 1]


def test_logit_bias_forces_and_bans_tokens(engine):
    """+100 on a token makes greedy decoding emit it at every step; -100 on the unbiased
    first token makes greedy pick another one (the request's bias only: a second request in
    the same batch decodes as alone)."""
    p = prompts([10], seed=3)[0]
    plain = tokens(run(engine, [(p, SamplingParams(temperature=0.0, max_tokens=6))]))[0]
    outs = run(engine, [(p, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                           logit_bias={"40": 100})),
                        (p, SamplingParams(temperature=0.0, max_tokens=6,
                                           logit_bias={plain[0]: -100})),
                        (p, SamplingParams(temperature=0.0, max_tokens=6))])
    forced, banned, same = tokens(outs)
    assert forced == [40] * 6 and banned[0] != plain[0] and same == plain
    only = tokens(run(engine, [(p, SamplingParams(max_tokens=8, ignore_eos=True, seed=1,
                                                 allowed_token_ids=[7, 8, 9]))]))[0]
    assert set(only) <= {7, 8, 9}


def test_truncate_prompt_tokens_keeps_the_last_tokens(engine):
    """vLLM's truncate_prompt_tokens: the last k prompt tokens (-1: as many as fit), as if the
    prompt had been those alone."""
    p = prompts([30], seed=5)[0]
    short = tokens(run(engine, [(p[-7:], SamplingParams(temperature=0.0, max_tokens=5))]))[0]
    out = run(engine, [(p, SamplingParams(temperature=0.0, max_tokens=5,
                                          truncate_prompt_tokens=7))])[0]
    assert out.prompt_token_ids == p[-7:] and out.outputs[0].token_ids == short
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)


def test_max_tokens_ends_generation_with_reason_length(engine):
    out = run(engine, [(prompts([9])[0], SamplingParams(max_tokens=5, ignore_eos=True))])[0]
    c = out.outputs[0]
    assert out.finished and (c.finish_reason, c.stop_reason, len(c.token_ids)) == ("length", None, 5)


# ------------------------------------------------------------------ requests and errors
@pytest.mark.parametrize("bad,message", [
    (lambda: ([5] * 4090, SamplingParams(max_tokens=16)), "max_model_len=4096"),
    (lambda: ([5, 6, CFG.vocab_size], GREEDY), "out of the vocabulary"),
    (lambda: ([], GREEDY), "empty"),
    (lambda: ("0", GREEDY), "duplicate request id"),
    (lambda: ([5, 6], SamplingParams(logit_bias={CFG.vocab_size: 1.0})), "logit_bias"),
    (lambda: ([5, 6], SamplingParams(allowed_token_ids=[3, CFG.vocab_size])), "allowed_token_ids"),
])
def test_bad_requests_raise_clear_errors_and_other_requests_keep_running(engine, alone, bad,
                                                                         message):
    engine.add_request("0", prompts(LENGTHS)[4], GREEDY)
    engine.step()
    prompt, params = bad()
    rid = "0" if message.startswith("duplicate") else "bad"
    with pytest.raises(ValueError, match=message):
        engine.add_request(rid, prompt, params)
    result = None
    while engine.has_unfinished_requests():
        result = [o for o in engine.step() if o.finished] or result
    assert result[0].outputs[0].token_ids == alone[4]


def test_prompt_too_long_error_names_prompt_length_max_tokens_and_limit():
    eng = make_engine(max_model_len=64)
    with pytest.raises(ValueError, match=r"60 tokens with max_tokens=10 .*max_model_len=64"):
        eng.add_request("x", list(range(3, 63)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="max_model_len=64"):
        eng.add_request("y", list(range(3, 67)), SamplingParams(max_tokens=None))
    assert not eng.has_unfinished_requests()


@pytest.mark.parametrize("field,value", [("max_tokens", -1), ("top_p", 0.0), ("top_p", 1.5)])
def test_invalid_sampling_params_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_unknown_model_path_raises_file_not_found_naming_it():
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        LLMEngine.from_args("/no/such/model", device="cpu")


def test_text_prompt_without_tokenizer_is_a_clear_error():
    eng = make_engine(skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="no tokenizer"):
        eng.add_request("t", "hello", GREEDY)
    out = run(eng, [({"prompt_token_ids": [5, 6, 7]}, GREEDY)])[0]
    assert len(out.outputs[0].token_ids) == 12 and out.outputs[0].text == ""


def test_cache_never_takes_more_blocks_than_max_num_seqs_sequences_can_use():
    eng = make_engine(max_num_seqs=2, max_model_len=300, cpu_cache_bytes=64 << 20)
    assert eng.num_blocks == 2 * 3 and eng.max_model_len == 300


def test_cache_budget_without_room_for_a_block_refuses_to_start():
    with pytest.raises(ConfigError, match="holds no 128-token block"):
        make_engine(cpu_cache_bytes=1 << 20, max_num_seqs=8)


def test_abort_frees_the_requests_blocks_and_others_continue(engine, alone):
    engine.add_request("keep", prompts(LENGTHS)[2], GREEDY)
    engine.add_request("drop", list(range(3, 3 + 300)), SamplingParams(max_tokens=50))
    engine.step()
    used = engine.num_blocks - engine.get_stats().num_free_blocks
    engine.abort_request("drop")
    engine.abort_request("never-existed")
    assert engine.num_blocks - engine.get_stats().num_free_blocks == used - math.ceil(300 / 128)
    result = None
    while engine.has_unfinished_requests():
        result = [o for o in engine.step() if o.finished] or result
    assert [o.request_id for o in result] == ["keep"]
    assert result[0].outputs[0].token_ids == alone[2]
    assert engine.get_stats().num_free_blocks == engine.num_blocks


def test_capacity_and_stats_describe_the_cache(engine):
    fit = ((16 << 20) - 8 * slot_bytes(CFG, 8, torch.float32)) // block_bytes(CFG, torch.float32, index_fp4=True)
    expected_blocks = min(fit, 8 * CFG.max_position_embeddings // BLOCK_TOKENS)  # 8 = max_num_seqs
    assert engine.num_blocks == expected_blocks
    assert engine.max_model_len == min(CFG.max_position_embeddings, expected_blocks * BLOCK_TOKENS)
    concurrent = min(8, expected_blocks // (engine.max_model_len // BLOCK_TOKENS))
    assert engine.capacity == (f"KV cache: {expected_blocks} blocks, max {engine.max_model_len} "
                               f"tokens per sequence, {concurrent} concurrent sequences at "
                               f"{engine.max_model_len} tokens")
    engine.add_request("s", [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    s = engine.get_stats()
    assert (s.num_running, s.num_waiting, s.num_free_blocks) == (1, 0, s.num_blocks - 1)
    assert s.kv_cache_usage == pytest.approx(1 / s.num_blocks)
    engine.step()
    assert not engine.has_unfinished_requests()


def test_streamed_text_only_grows_even_while_a_stop_string_could_still_match(engine):
    engine.add_request("s", prompts([12], seed=7)[0],
                       SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                      stop=["never printed \u2603"]))
    seen = []
    while engine.has_unfinished_requests():
        seen += [o.outputs[0].text for o in engine.step()]
    for a, b in zip(seen, seen[1:]):
        assert b.startswith(a), f"text went from {a!r} to {b!r}"
    plain = run(engine, [(prompts([12], seed=7)[0], SamplingParams(
        temperature=0.0, max_tokens=24, ignore_eos=True))])[0].outputs[0].text
    assert seen[-1] == plain, "the held-back tail must arrive when the request finishes"


def test_warm_up_leaves_no_trace():
    """`LLMEngine.warm_up` (run at startup on CUDA): two prompts that fill the step budget go
    through, then one prompt at a time of each ladder length, alone and after a full chunk,
    and leave nothing behind: no
    request, every block free, zeroed counters, and the next request's tokens are those of a
    fresh engine."""
    p = prompts([20], seed=5)[0]
    fresh = tokens(run(make_engine(max_num_batched_tokens=16), [(p, GREEDY)]))
    eng = make_engine(max_num_batched_tokens=16)
    free = eng.block_manager.num_free_blocks
    steps, lengths = [], []
    # CUDA graphs (a stand-in here) are set aside: every warm-up step runs eagerly
    graphs = eng.runner.graphs = object()
    eager = []
    real_run = eng.runner.run
    eng.runner.run = lambda chunks: eager.append(eng.runner.graphs is None) or real_run(chunks)
    real_step, real_add = eng.step, eng.add_request
    eng.step = lambda: steps.append(len(eng.requests)) or real_step()
    eng.add_request = lambda rid, ids, params: lengths.append(len(ids)) or real_add(rid, ids,
                                                                                 params)
    eng.warm_up()
    eng.step, eng.add_request, eng.runner.run = real_step, real_add, real_run
    assert eager and all(eager) and eng.runner.graphs is graphs
    eng.runner.graphs = None
    # two full-budget prompts, the ladder, the ladder as second chunks, 5 x the budget
    assert lengths == [13, 16] + warm_up_lengths(16) + [16 + x for x in warm_up_lengths(16)] + [
        81] == [13, 16, 5, 7, 9, 13, 21, 23, 25, 29, 81]
    assert len(steps) >= 3 + 4 + 8 + 6  # a full-budget prefill, the rest beside a decode, ...
    assert steps[-18:] == [1] * 18  # one prompt at a time: 4 of 2 steps, 81 in 6 chunks
    assert not eng.requests and not eng.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == free
    stats = eng.get_stats()
    assert stats.prompt_tokens_total == stats.generation_tokens_total == 0
    assert tokens(run(eng, [(p, GREEDY)])) == fresh


def test_warm_up_ends_with_steps_that_sample_many_rows():
    """Where max_num_seqs allows, the warm-up's last stages serve 12, 16 and 24 prompts at
    once, of 2 and of 6 tokens (steps sampling that many rows, short and long: the head's
    launch shapes with and without PDL), then leave nothing behind."""
    eng = make_engine(max_num_batched_tokens=256, max_num_seqs=24)
    lengths, rows = [], []
    real_add, real_run = eng.add_request, eng.runner.run
    eng.add_request = lambda rid, ids, params: lengths.append(len(ids)) or real_add(rid, ids,
                                                                                 params)
    eng.runner.run = lambda c: rows.append(sum(x.samples for x in c)) or real_run(c)
    eng.warm_up()
    tail = [2] * 12 + [6] * 12 + [2] * 16 + [6] * 16 + [2] * 24 + [6] * 24
    assert lengths[-len(tail):] == tail, lengths
    assert {12, 16, 24} <= set(rows), rows
    assert not eng.requests and eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    # with max_num_seqs 12 only the 12-prompt stages (planned, not served)
    eng = make_engine(max_num_batched_tokens=256, max_num_seqs=12)
    lengths = []
    eng.add_request = lambda rid, ids, params: lengths.append(len(ids))
    eng.warm_up()
    assert lengths[-24:] == [2] * 12 + [6] * 12 and lengths.count(2) == 12, lengths


def test_warm_up_fills_the_step_budget_with_several_prompts_under_a_short_context():
    """With max_model_len under the step budget no one prompt makes a large step: the warm-up
    makes the full-budget step out of several prompts of the longest allowed length and the
    ladder's larger steps out of several prompts, so serving's batched prefills meet
    warmed-up shapes."""
    eng = make_engine(max_num_batched_tokens=16, max_model_len=10)
    chunks, lengths = [], []
    real_run, real_add = eng.runner.run, eng.add_request
    eng.runner.run = lambda c: chunks.append(sum(len(x.tokens) for x in c)) or real_run(c)
    eng.add_request = lambda rid, ids, params: lengths.append(len(ids)) or real_add(rid, ids,
                                                                                 params)
    eng.warm_up()
    eng.runner.run, eng.add_request = real_run, real_add
    # prompts of at most 8 tokens: the budget as 8 + 8, the ladder 5, 7, 9 = 8 + 1,
    # 13 = 8 + 5, then the longest prompt the context allows (9)
    assert lengths == [8, 8, 5, 7, 8, 1, 8, 5, 9], lengths
    for total in (16, 9, 13):
        assert total in chunks, (total, chunks)
    assert not eng.requests and eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    # from 64 tokens on, the ladder's several-prompt steps use prompts of a multiple of 64
    # (benchmarks' lengths; list widths Triton specialises on): stages planned, not served
    eng = make_engine(max_num_batched_tokens=256, max_model_len=100)
    lengths = []
    eng.add_request = lambda rid, ids, params: lengths.append(len(ids))
    eng.warm_up()
    ladder = [x for x in warm_up_lengths(256) if x <= 98]
    assert lengths == [98, 98, 60] + ladder + [64, 64, 1] + [64, 64, 64, 1] + [99], lengths


def test_warm_up_lengths_meet_both_sides_of_every_power_of_two():
    for budget in (16, 100, 2048, 8192):
        ladder = warm_up_lengths(budget)
        assert all(x % 2 and x < budget for x in ladder)
        for k in range(3, budget.bit_length()):
            if 2 ** k < budget - 1:
                assert any(2 ** (k - 1) < x <= 2 ** k for x in ladder), (budget, k)
                assert any(2 ** k < x < 2 ** (k + 1) for x in ladder), (budget, k)


def test_warm_up_out_of_memory_names_the_fix(monkeypatch):
    """A full-budget prefill step that does not fit fails the engine's start with a clear
    error naming the settings to lower, not a CUDA traceback in the first request."""
    eng = make_engine(max_num_batched_tokens=16)

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
    monkeypatch.setattr(eng, "step", oom)
    with pytest.raises(ConfigError, match=r"a prefill step of 16 tokens does not fit .*Tried "
                                          r"to allocate 2.00 GiB\): lower max_num_batched_tokens"):
        eng.warm_up()


# ------------------------------------------------------------------ output kinds

def _all_outputs(engine, prompt, params) -> list:
    engine.add_request("k", prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == "k"]
    return outs


def test_delta_outputs_join_to_the_cumulative_ones_and_final_only_is_one(engine):
    """vLLM's output_kind: DELTA hands out each step's new tokens, text, logprobs and prompt
    logprobs (joined, the CUMULATIVE final output); FINAL_ONLY one output, the final one."""
    from dsv4 import RequestOutputKind
    prompt = prompts([40], seed=11)[0]
    kw = dict(n=2, temperature=0.8, seed=3, max_tokens=20, ignore_eos=True, logprobs=2,
              prompt_logprobs=1, stop=["never printed \u2603"])
    cumulative = _all_outputs(engine, prompt, SamplingParams(**kw))
    assert len(cumulative) > 3
    want = cumulative[-1]
    deltas = _all_outputs(engine, prompt, SamplingParams(**kw, output_kind=RequestOutputKind.DELTA))
    assert len(deltas) == len(cumulative) and deltas[-1].finished
    assert sum((d.prompt_logprobs for d in deltas), []) == want.prompt_logprobs
    for i, w in enumerate(want.outputs):
        parts = [d.outputs[i] for d in deltas]
        assert sum((p.token_ids for p in parts), []) == w.token_ids
        assert "".join(p.text for p in parts) == w.text
        assert sum((p.logprobs for p in parts), []) == w.logprobs
        assert parts[-1].finish_reason == w.finish_reason == "length"
        assert parts[-1].cumulative_logprob == w.cumulative_logprob
    assert all(len(d.outputs[0].token_ids) <= 1 for d in deltas)  # one step's tokens each
    final = _all_outputs(engine, prompt,
                         SamplingParams(**kw, output_kind=RequestOutputKind.FINAL_ONLY))
    assert len(final) == 1 and final[0].finished
    assert final[0].outputs == want.outputs and final[0].prompt_logprobs == want.prompt_logprobs


def test_output_kind_must_be_one_of_vllms():
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind=7)
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="delta")


def test_async_engine_streams_cumulative_outputs_from_engine_deltas(engine):
    """The server's engine thread asks the engine for DELTA outputs and rebuilds the
    cumulative ones a request asked for (`async_engine._Stream`): every yielded output is the
    engine's cumulative output of that step, the last one its final output."""
    import asyncio

    from dsv4.server.async_engine import AsyncLLMEngine
    prompt = prompts([40], seed=12)[0]
    params = SamplingParams(n=2, temperature=0.8, seed=4, max_tokens=12, ignore_eos=True,
                            logprobs=1, prompt_logprobs=1)
    want = _all_outputs(engine, prompt, params)

    async def stream():
        a = AsyncLLMEngine(engine)
        a.start()
        got = []
        async for out in await a.add_request("k", prompt, params):
            seen = len(out.outputs[0].token_ids)
            await asyncio.sleep(0.05)  # the engine steps on meanwhile
            assert len(out.outputs[0].token_ids) == seen  # what was yielded does not change
            got.append((out.finished, [dataclasses.replace(o, token_ids=list(o.token_ids),
                                                           logprobs=list(o.logprobs))
                                       for o in out.outputs], list(out.prompt_logprobs)))
        await a.shutdown()
        return got

    got = asyncio.run(stream())
    assert got[-1][0] and got[-1][1] == want[-1].outputs
    assert got[-1][2] == want[-1].prompt_logprobs
    cumulative = {len(w.outputs[0].token_ids): w.outputs for w in want}
    for finished, outs, _ in got:  # each a cumulative state the engine went through
        assert outs == cumulative[len(outs[0].token_ids)]
    assert params.output_kind == 0  # the caller's params are left alone


def test_max_logprobs_bounds_what_a_request_may_ask_for(engine):
    """vLLM's max_logprobs: 20 by default; -1 allows up to the vocabulary."""
    for field in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match="max_logprobs=20"):
            engine.add_request("x", [5, 6], SamplingParams(max_tokens=2, **{field: 21}))
    assert not engine.has_unfinished_requests()
    wide = make_engine(max_logprobs=-1)
    (out,) = run(wide, [([5, 6, 7], SamplingParams(max_tokens=2, logprobs=50, prompt_logprobs=30))])
    assert len(out.outputs[0].logprobs[0]) >= 50 and len(out.prompt_logprobs[1]) >= 30
    with pytest.raises(ConfigError, match="max_logprobs"):
        make_engine(max_logprobs=-2)
