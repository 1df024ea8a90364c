import math

import pytest
import torch
from scipy import stats

from dsv4.engine.sampler import (
    Sampler,
    SamplingParams,
    apply_penalties,
    compute_logprobs_topn,
    make_generator,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def run(sampler, logits, params, outputs=None, prompts=None, gens=None):
    B = logits.shape[0]
    return sampler(
        logits,
        params,
        outputs if outputs is not None else [[] for _ in range(B)],
        prompts if prompts is not None else [[] for _ in range(B)],
        gens if gens is not None else [None] * B,
    )


# ------------------------------------------------------------------ SamplingParams
@pytest.mark.parametrize(
    "field,value",
    [
        ("n", 0),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.1),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("seed", 1.5),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("prompt_logprobs", -3),
        ("stop", [""]),
    ],
)
def test_validation_errors(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be .*got {value!r}".replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("bias", [{5: 101.0}, {5: -100.5}, {-1: 1.0}, {"x": 1.0}, {5: "high"}])
def test_logit_bias_validation(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)


@pytest.mark.parametrize("allowed", [[], [-1, 3], ["a"]])
def test_allowed_token_ids_validation(allowed):
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=allowed)


def test_allowed_token_ids_restrict_sampling(device):
    """Greedy takes the best allowed token; sampled rows never leave the allowed set; rows
    without the setting are untouched."""
    torch.manual_seed(2)
    logits = torch.randn(3, 300, device=device)
    allowed = [5, 77, 120]
    params = [SamplingParams(temperature=0.0, allowed_token_ids=allowed),
              SamplingParams(temperature=1.0, allowed_token_ids=allowed, seed=4),
              SamplingParams(temperature=0.0)]
    for _ in range(5):
        out = run(Sampler(), logits, params, gens=[None, make_generator(4, device), None])
        assert int(out.token_ids[0]) == allowed[int(logits[0, allowed].argmax())]
        assert int(out.token_ids[1]) in allowed
        assert int(out.token_ids[2]) == int(logits[2].argmax())


def test_logit_bias_normalised_from_openai_json():
    assert SamplingParams(logit_bias={"50": -100, "7": 2.5}).logit_bias == {50: -100.0, 7: 2.5}
    assert SamplingParams(logit_bias={}).logit_bias is None


def test_logit_bias_moves_greedy_and_sampled_tokens(device):
    """+100 forces a token whatever the sampling, -100 bans the argmax; added after the
    penalties; the raw logprobs stay those of the unbiased logits (as vLLM reports them)."""
    torch.manual_seed(1)
    logits = torch.randn(4, 500, device=device)
    top = logits.argmax(-1)
    params = [SamplingParams(temperature=0.0, logit_bias={17: 100.0}),
              SamplingParams(temperature=0.0, logit_bias={int(top[1]): -100.0}),
              SamplingParams(temperature=1.0, logit_bias={33: 100.0}, seed=3),
              SamplingParams(temperature=0.0, presence_penalty=2.0, logit_bias={9: 1.0})]
    outputs = [[], [], [], [9]]
    out = run(Sampler(), logits, params, outputs=outputs, gens=[None, None,
                                                                 make_generator(3, device), None])
    x = logits[3].clone()
    x[9] += -2.0 + 1.0
    assert out.token_ids.tolist()[:3] == [17, int(logits[1].topk(2).indices[1]), 33]
    assert int(out.token_ids[3]) == int(x.argmax())
    raw = torch.log_softmax(logits.float(), -1)
    assert torch.allclose(out.logprobs[0], raw[0, 17])


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    SamplingParams(max_tokens=None, min_tokens=5)


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs, p.seed) == (16, 0, None, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.skip_special_tokens and not p.ignore_eos
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams(top_k=-1).top_k_active is False
    assert SamplingParams(temperature=0.0).is_greedy and not SamplingParams(temperature=0.5).is_greedy
    SamplingParams(max_tokens=None, logprobs=0, prompt_logprobs=0, top_p=1.0, min_p=1.0)


# ------------------------------------------------------------------ greedy
def test_greedy_is_argmax(device):
    torch.manual_seed(0)
    logits = torch.randn(8, 1000, device=device)
    logits[3] = 0.0
    logits[3, 7] = logits[3, 11] = 5.0  # tie -> lowest id
    params = [SamplingParams(temperature=0.0) for _ in range(8)]
    out = run(Sampler(), logits, params)
    expect = logits.argmax(-1)
    expect[3] = 7
    assert out.token_ids.dtype == torch.int64 and out.token_ids.shape == (8,)
    assert torch.equal(out.token_ids, expect)
    # greedy ignores top-k/top-p/min-p and generators
    params = [SamplingParams(temperature=0.0, top_k=2, top_p=0.1, min_p=0.9, seed=1) for _ in range(8)]
    out2 = run(Sampler(), logits, params, gens=[make_generator(1, device) for _ in range(8)])
    assert torch.equal(out2.token_ids, expect)


# ------------------------------------------------------------------ filtering
LOGITS10 = [0.3, 2.0, -1.0, 1.4, 0.9, -0.2, 1.7, 0.0, -2.0, 1.1]


def _allowed(top_k=0, top_p=1.0, min_p=0.0, temperature=1.0):
    x = torch.tensor(LOGITS10, dtype=torch.float64) / temperature
    order = x.argsort(descending=True).tolist()
    keep = order[:top_k] if top_k > 0 else order
    p = torch.softmax(x[keep], 0).tolist()
    cum, kept = 0.0, []
    for t, pt in zip(keep, p):
        kept.append(t)
        cum += pt
        if cum >= top_p:
            break
    p = torch.softmax(x[kept], 0)
    return {t for t, pt in zip(kept, p.tolist()) if pt >= min_p * p.max().item()}


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_k=3),
        dict(top_p=0.6),
        dict(top_p=0.9, temperature=0.7),
        dict(min_p=0.3),
        dict(min_p=0.1, temperature=1.5),
        dict(top_k=6, top_p=0.8, min_p=0.15),
        dict(top_k=1, temperature=2.0),
        dict(top_p=1e-6),
    ],
)
def test_filters_never_emit_excluded_tokens(device, kw):
    allowed = _allowed(**kw)
    assert 1 <= len(allowed) < 10
    B = 3000
    logits = torch.tensor(LOGITS10, device=device).repeat(B, 1)
    params = [SamplingParams(**kw) for _ in range(B)]
    gens = [make_generator(i, device) if i % 2 else None for i in range(B)]  # seeded and shared rows
    sampler = Sampler(generator=make_generator(123, device))
    seen = set(run(sampler, logits, params, gens=gens).token_ids.tolist())
    assert seen <= allowed
    assert seen == allowed  # every allowed token does get sampled


def test_top_k_larger_than_vocab_is_noop(device):
    logits = torch.tensor(LOGITS10, device=device).repeat(2000, 1)
    params = [SamplingParams(top_k=50) for _ in range(2000)]
    seen = set(run(Sampler(generator=make_generator(0, device)), logits, params).token_ids.tolist())
    assert seen == set(range(10))


# ------------------------------------------------------------------ reproducibility
def test_seeded_row_independent_of_batch(device):
    torch.manual_seed(1)
    V, steps = 500, 6
    target = torch.randn(steps, V, device=device)
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)

    def tokens(batch: int, pos: int, other_seeded: bool) -> list[int]:
        torch.manual_seed(99 + batch)  # unrelated global RNG state
        gens = [make_generator(1000 + j, device) if other_seeded else None for j in range(batch)]
        gens[pos] = make_generator(p.seed, device)
        params = [SamplingParams(temperature=1.3, top_k=50) for _ in range(batch)]
        params[pos] = p
        sampler, res = Sampler(), []
        for s in range(steps):
            logits = torch.randn(batch, V, device=device)
            logits[pos] = target[s]
            res.append(run(sampler, logits, params, gens=gens).token_ids[pos].item())
        return res

    ref = tokens(1, 0, False)
    assert tokens(4, 2, True) == ref
    assert tokens(7, 5, False) == ref
    assert tokens(3, 0, True) == ref


# ------------------------------------------------------------------ penalties
def test_penalties_hand_computed(device):
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5], [2.0, -1.0, 0.5, 3.0, -0.5]], device=device)
    prompts = [[0, 1], [0, 1]]
    outputs = [[2, 2, 3], [2, 2, 3]]
    pen = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    plain = SamplingParams(temperature=0.0)
    got = apply_penalties(logits, [pen, plain], outputs, prompts)
    # rep: 0: 2/2, 1: -1*2, 2: .5/2, 3: 3/2, 4 untouched; freq/pres on output tokens 2 (x2) and 3 (x1)
    expect = torch.tensor([[1.0, -2.0, 0.25 - 1.0 - 0.25, 1.5 - 0.5 - 0.25, -0.5], [2.0, -1.0, 0.5, 3.0, -0.5]])
    torch.testing.assert_close(got.cpu(), expect)
    out = run(Sampler(), logits, [pen, plain], outputs, prompts)
    assert out.token_ids.tolist() == [0, 3]
    # logprobs stay those of the raw logits
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1)[[0, 1], [0, 3]])


def test_repetition_penalty_uses_prompt_only_tokens(device):
    logits = torch.tensor([[1.0, 0.9, 0.0]], device=device)
    p = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    assert run(Sampler(), logits, [p], [[]], [[0]]).token_ids.item() == 1
    q = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.5)
    assert run(Sampler(), logits, [q], [[]], [[0]]).token_ids.item() == 0  # prompt not counted


def test_min_tokens_masks_eos_and_stop_ids(device):
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0, 3.0]], device=device)
    s = Sampler(eos_token_ids=2)
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3])
    assert run(s, logits, [p], [[1]]).token_ids.item() == 4
    assert run(s, logits, [p], [[1, 1]]).token_ids.item() == 2
    p_ign = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3], ignore_eos=True)
    assert run(s, logits, [p_ign], [[1]]).token_ids.item() == 2


# ------------------------------------------------------------------ logprobs
def test_logprobs_and_rank_match_log_softmax(device):
    torch.manual_seed(2)
    B, V = 6, 300
    logits = torch.randn(B, V, device=device) * 3
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=1.0, logprobs=0),
        SamplingParams(temperature=2.0, top_k=40),
        SamplingParams(temperature=0.5, top_p=0.9, logprobs=3, repetition_penalty=1.3),
        SamplingParams(temperature=1.5, min_p=0.05, frequency_penalty=1.0, logprobs=20),
        SamplingParams(temperature=3.0, seed=5),
    ]
    outs = [[1, 2, 3]] * B
    gens = [None] * 5 + [make_generator(5, device)]
    out = run(Sampler(), logits, params, outs, [[4, 5]] * B, gens)
    lp = torch.log_softmax(logits.double(), -1)
    for i, p in enumerate(params):
        t = out.token_ids[i].item()
        assert out.logprobs[i].item() == pytest.approx(lp[i, t].item(), abs=1e-5)
        assert out.ranks[i].item() == 1 + (lp[i] > lp[i, t]).sum().item()
        if p.logprobs is None:
            assert out.top_logprobs[i] is None
        else:
            top = out.top_logprobs[i]
            vals, ids = lp[i].topk(p.logprobs) if p.logprobs else (lp[i][:0], lp[i][:0].long())
            assert [tid for tid, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(vals.tolist(), abs=1e-5)
    assert out.ranks[0].item() == 1


def test_compute_logprobs_topn(device):
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]], device=device)
    res = compute_logprobs_topn(logits, torch.tensor([2, 0]), 2)
    lp = torch.log_softmax(logits.double().cpu(), -1)
    assert [r.token_id for r in res] == [2, 0]
    assert [r.rank for r in res] == [1, 2]  # ties do not count as strictly higher
    assert res[0].logprob == pytest.approx(lp[0, 2].item(), abs=1e-6)
    assert {t for t, _ in res[0].top} == {1, 2}  # tie order within top-N is unspecified (CUDA topk)
    assert [v for _, v in res[0].top] == pytest.approx([lp[0, 1].item()] * 2, abs=1e-6)
    assert [t for t, _ in res[1].top][0] == 3
    assert compute_logprobs_topn(logits, torch.tensor([3, 3]), 0)[1].top == []
    # chunking gives the same answer
    big = torch.randn(50, 30, device=device)
    ids = torch.randint(0, 30, (50,))
    assert compute_logprobs_topn(big, ids, 3, chunk=7) == compute_logprobs_topn(big, ids, 3)
    assert Sampler.compute_logprobs_topn is compute_logprobs_topn


# ------------------------------------------------------------------ distribution
@pytest.mark.parametrize(
    "kw", [dict(temperature=0.7), dict(temperature=1.0), dict(temperature=1.3, top_k=4, top_p=0.85)]
)
def test_sampling_frequencies_match_softmax(device, kw):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0])
    x = logits.double() / kw["temperature"]
    if "top_k" in kw:  # hand-applied: top-4 = {4, 0, 1, 2}; top-p 0.85 over those
        p4 = torch.softmax(x[[4, 0, 1, 2]], 0)
        assert p4[:2].sum() < 0.85 <= p4[:3].sum()  # keeps {4, 0, 1}
        x = torch.where(torch.tensor([1, 1, 0, 0, 1, 0]).bool(), x, torch.tensor(-math.inf, dtype=x.dtype))
    probs = torch.softmax(x, 0)
    N = 20000
    params = [SamplingParams(**kw) for _ in range(N)]
    out = run(Sampler(generator=make_generator(0, device)), logits.to(device).repeat(N, 1), params)
    counts = torch.bincount(out.token_ids.cpu(), minlength=6).double()
    support = probs > 0
    assert counts[~support].sum() == 0
    res = stats.chisquare(counts[support].numpy(), (probs[support] * N).numpy())
    assert res.pvalue > 1e-3, (counts, probs * N)


def test_seeded_rows_follow_softmax(device):
    # one draw per row from its own generator: rows with distinct seeds are i.i.d. samples
    logits = torch.tensor([0.2, -0.3, 1.1, 0.0])
    probs = torch.softmax(logits.double(), 0)
    N = 4000
    gens = [make_generator(10_000 + i, device) for i in range(N)]
    out = run(Sampler(), logits.to(device).repeat(N, 1), [SamplingParams(seed=1) for _ in range(N)], gens=gens)
    counts = torch.bincount(out.token_ids.cpu(), minlength=4).double()
    assert stats.chisquare(counts.numpy(), (probs * N).numpy()).pvalue > 1e-3


def test_batch_size_mismatch():
    with pytest.raises(ValueError, match="batch size"):
        Sampler()(torch.zeros(2, 4), [SamplingParams()], [[]], [[]], [None])


def test_bad_words_ban_the_last_token_after_the_rest():
    """vLLM's bad_words: a one-token word is never sampled; a longer one's last token is
    excluded only where the output ends with its other tokens."""
    from dsv4.engine.sampler import apply_bad_words, tokenize_bad_words

    vocab = {"cat": [7], " cat": [8], "hot dog": [3, 4], " hot dog": [5, 4], "x": [9],
             " x": [9]}
    ids = tokenize_bad_words(["cat", "  hot dog", "x"], lambda t: vocab[t])
    assert ids == [[7], [8], [3, 4], [5, 4], [9]]
    p = SamplingParams(bad_words=["cat"])
    p.bad_words_token_ids = ids
    logits = torch.zeros(3, 10)
    out = apply_bad_words(logits, [p, p, SamplingParams()], [[1, 3], [2], [3]])
    banned = [set(torch.nonzero(torch.isinf(row)).flatten().tolist()) for row in out]
    assert banned == [{7, 8, 9, 4}, {7, 8, 9}, set()]
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words="cat")
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=["ok", " "])


def test_output_ids_view_reads_like_the_list_it_views():
    """`Sequence.output_ids_view` (what the sampler reads every step, without a copy)."""
    from dsv4.engine.sequence import OutputIds
    ids = list(range(100, 130))
    for start in (0, 5, 30):
        view, want = OutputIds(ids, start), ids[start:]
        assert len(view) == len(want) and list(view) == want
        for sl in (slice(None), slice(-3, None), slice(-100, None), slice(2, 7), slice(7, 2),
                   slice(None, -1), slice(None, None, 2), slice(None, None, -1)):
            assert view[sl] == want[sl], sl
        for i in range(-len(want), len(want)):
            assert view[i] == want[i]
        with pytest.raises(IndexError):
            view[len(want)]
    ids.append(7)  # a view follows its list
    assert OutputIds(ids, 28)[-1] == 7 and len(OutputIds(ids, 28)) == 3
