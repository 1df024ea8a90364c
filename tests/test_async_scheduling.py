"""Async scheduling: decode steps launched before the previous step's tokens reach the host give
exactly the outputs of the synchronous engine (tiny preset, float32, CPU)."""
import pytest

from dsv4.engine.sampler import SamplingParams
from dsv4.engine.sequence import PENDING_TOKEN
from test_engine import CFG, GREEDY, LENGTHS, make_engine, prompts, run, tokens


@pytest.fixture(scope="module")
def sync():
    return make_engine(async_scheduling=False)


@pytest.fixture(scope="module")
def ahead():
    eng = make_engine(async_scheduling=True)
    launches = []
    launch = eng.runner.launch
    eng.runner.launch = lambda chunks, feed=None: launches.append(feed is not None) or launch(
        chunks, feed)
    eng.launches = launches
    return eng


def outputs(outs):
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason)
            for o in outs for c in o.outputs]


def test_staggered_greedy_batch_equals_the_synchronous_engine(sync, ahead):
    reqs = [(p, GREEDY) for p in prompts(LENGTHS)]
    arrive = [0, 1, 1, 3, 4, 7, 9, 15]
    ahead.launches.clear()
    assert tokens(run(ahead, reqs, arrive)) == tokens(run(sync, reqs, arrive))
    assert sum(ahead.launches) > 10, "decode steps were meant to be launched ahead"
    assert ahead.get_stats().num_free_blocks == ahead.num_blocks
    assert ahead.block_manager.num_free_slots == ahead.max_num_seqs


def test_seeded_sampling_and_n_completions_are_unchanged(sync, ahead):
    params = SamplingParams(n=2, temperature=0.8, top_k=20, seed=5, max_tokens=9,
                            ignore_eos=True)
    reqs = [(p, params) for p in prompts([7, 20, 13], seed=3)]
    assert outputs(run(ahead, reqs)) == outputs(run(sync, reqs))


def test_stop_rules_end_the_same_tokens_and_text(sync, ahead):
    p = prompts([12], seed=7)[0]
    ids = tokens(run(sync, [(p, SamplingParams(temperature=0.0, max_tokens=24,
                                               ignore_eos=True))]))[0]
    text = run(sync, [(p, SamplingParams(temperature=0.0, max_tokens=24,
                                         ignore_eos=True))])[0].outputs[0].text
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2) if text[i:i + 2].isprintable())
    reqs = [(p, SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[ids[5]])),
            (p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])),
            (p, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)),
            (prompts([30], seed=8)[0], GREEDY)]
    got, want = outputs(run(ahead, reqs)), outputs(run(sync, reqs))
    assert got == want
    assert all(PENDING_TOKEN not in t for t, *_ in got)


def test_requests_that_need_the_host_history_run_synchronously_beside_others(sync, ahead):
    reqs = [(p, GREEDY) for p in prompts([5, 9])]
    reqs += [(prompts([11])[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                repetition_penalty=1.3)),
             (prompts([6])[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                               min_tokens=5, logprobs=2))]
    got, want = run(ahead, reqs, [0, 0, 2, 6]), run(sync, reqs, [0, 0, 2, 6])
    assert outputs(got) == outputs(want)
    # the same entries; values to fp32 noise (the batches around it differ in shape)
    for g, w in zip(got[3].outputs[0].logprobs, want[3].outputs[0].logprobs):
        assert list(g) == list(w)
        assert all(abs(g[t].logprob - w[t].logprob) < 1e-5 and g[t].rank == w[t].rank for t in g)


def test_abort_while_a_step_runs_ahead(ahead, sync):
    keep = prompts(LENGTHS)[2]
    ahead.add_request("keep", keep, GREEDY)
    ahead.add_request("drop", prompts([40], seed=9)[0], SamplingParams(max_tokens=50,
                                                                       ignore_eos=True))
    for _ in range(4):  # prefill, then decode steps launched ahead
        ahead.step()
    assert ahead._pending is not None
    drop = ahead.requests["drop"].seqs[0]
    ahead.abort_request("drop")
    assert PENDING_TOKEN not in drop.token_ids
    result = None
    while ahead.has_unfinished_requests():
        result = [o for o in ahead.step() if o.finished] or result
    assert [o.request_id for o in result] == ["keep"]
    assert result[0].outputs[0].token_ids == tokens(run(sync, [(keep, GREEDY)]))[0]
    ahead.step()  # the stale launched step is drained
    assert ahead._pending is None
    assert ahead.get_stats().num_free_blocks == ahead.num_blocks


def test_preemption_under_async_scheduling_keeps_every_output():
    from dsv4.cache.kv_cache import block_bytes, slot_bytes
    import torch
    budget = 4 * slot_bytes(CFG, 8, torch.float32) + 3 * block_bytes(CFG, torch.float32, index_fp4=True)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    reqs = [(p, params) for p in prompts([120, 118, 121, 119], seed=1)]
    small = make_engine(max_num_seqs=4, cpu_cache_bytes=budget, async_scheduling=True)
    got = tokens(run(small, reqs))
    big = make_engine(async_scheduling=False)
    assert got == [tokens(run(big, [r]))[0] for r in reqs]
    assert small.get_stats().num_preemptions > 0
    assert small.get_stats().num_free_blocks == small.num_blocks


def test_sequences_crossing_a_block_boundary_together_with_one_block_free():
    """Two sequences reach a new block in the same step ahead while one block is free: each
    alone would fit, both do not. The step ahead is not launched (the blocks they need are
    counted together); the synchronous schedule preempts one; every output is the
    synchronous engine's. (Before, the second allocation raised OutOfBlocks out of `step`.)"""
    from dsv4.cache.kv_cache import block_bytes, slot_bytes
    import torch
    budget = 2 * slot_bytes(CFG, 8, torch.float32) + 3 * block_bytes(CFG, torch.float32, index_fp4=True)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    reqs = [(p, params) for p in prompts([120, 120], seed=2)]
    small = make_engine(max_num_seqs=2, cpu_cache_bytes=budget, async_scheduling=True)
    assert small.num_blocks == 3
    got = tokens(run(small, reqs))
    big = make_engine(async_scheduling=False)
    assert got == [tokens(run(big, [r]))[0] for r in reqs]
    assert small.get_stats().num_preemptions > 0
    assert small.get_stats().num_free_blocks == small.num_blocks


def test_switching_async_scheduling_off_drains_the_step_in_flight(sync):
    eng = make_engine(async_scheduling=True)
    p = prompts([10], seed=4)[0]
    eng.add_request("a", p, GREEDY)
    for _ in range(4):
        eng.step()
    assert eng._pending is not None
    eng.async_scheduling = False
    got = None
    while eng.has_unfinished_requests():
        got = [o for o in eng.step() if o.finished] or got
        assert eng._pending is None
    assert got[0].outputs[0].token_ids == tokens(run(sync, [(p, GREEDY)]))[0]


def test_the_engine_suite_passes_with_async_scheduling_off():
    """Every batching, chunking, preemption, sampling, stop and error test of test_engine.py
    (which runs with the default, async scheduling on) again with synchronous steps."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = dict(os.environ, DSV4_TEST_ASYNC_SCHEDULING="0")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(Path(__file__).with_name("test_engine.py"))],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
