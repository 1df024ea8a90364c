"""Structured outputs on the tiny model (CPU): whatever the random weights prefer, the text
fits the JSON schema, regex, choice or grammar asked for; bad specs fail at submission with
a clear error and leave the engine serving."""
import json
import re

import pytest
import torch

from dsv4 import LLM, SamplingParams, StructuredOutputs
from dsv4.engine.structured import GrammarState, mask_logits

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm():
    return LLM(model="tiny", dtype="float32", device="cpu", max_num_seqs=8)


def _texts(llm, prompts, params):
    return [o.outputs[i].text for o in llm.generate(prompts, params, use_tqdm=False)
            for i in range(len(o.outputs))]


def test_json_schema_outputs_parse_and_fit(llm):
    params = [SamplingParams(temperature=t, seed=s, max_tokens=160,
                             structured_outputs={"json": PERSON})
              for t, s in ((0.0, None), (1.0, 1), (1.0, 2), (0.7, 3))]
    outs = llm.generate(["A person:"] * 4, params, use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c  # the grammar completed and EOS followed
        v = json.loads(c.text)
        assert set(v) <= {"name", "age", "tags"} and {"name", "age"} <= set(v)
        assert isinstance(v["name"], str) and len(v["name"]) <= 10
        assert isinstance(v["age"], int) and 0 <= v["age"] <= 150
        assert all(t in ("a", "b") for t in v.get("tags", []))


def test_regex_choice_grammar_and_json_object(llm):
    texts = _texts(llm, ["x"] * 3, [SamplingParams(temperature=1.0, seed=s, max_tokens=30,
                                                   structured_outputs={"regex": r"[a-c]{2,4}-[0-9]+"})
                                    for s in range(3)])
    assert all(re.fullmatch(r"[a-c]{2,4}-[0-9]+", t) for t in texts), texts
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=10,
                            structured_outputs=StructuredOutputs(choice=["yes", "no", "maybe"]))
    assert set(_texts(llm, ["Well?"], params)) <= {"yes", "no", "maybe"}
    grammar = 'start: "(" num ("," num)* ")"\nnum: /[0-9]{1,3}/'
    text, = _texts(llm, ["Tuple:"], SamplingParams(temperature=1.0, seed=8, max_tokens=40,
                                                   structured_outputs={"grammar": grammar}))
    assert re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", text), text
    text, = _texts(llm, ["Obj:"], SamplingParams(temperature=1.0, seed=9, max_tokens=120,
                                                 structured_outputs={"json_object": True}))
    assert isinstance(json.loads(text), dict)


def test_constrained_and_free_requests_share_a_batch(llm):
    """Unconstrained requests beside constrained ones are the same as alone (greedy; the
    batch runs synchronous steps while a grammar is in it)."""
    free = SamplingParams(temperature=0.0, max_tokens=12)
    alone = _texts(llm, ["The weather", "Hello there"], free)
    mixed = llm.generate(["The weather", "A person:", "Hello there"],
                         [free, SamplingParams(temperature=0.0, max_tokens=100,
                                               structured_outputs={"json": PERSON}), free],
                         use_tqdm=False)
    assert [mixed[0].outputs[0].text, mixed[2].outputs[0].text] == alone
    json.loads(mixed[1].outputs[0].text)


def test_bad_specs_fail_at_submission_and_the_engine_goes_on(llm):
    with pytest.raises(ValueError, match="exactly one of json, json_object, regex, choice"):
        SamplingParams(structured_outputs={"regex": "a", "choice": ["a"]})
    with pytest.raises(ValueError, match="the JSON schema is not JSON"):
        SamplingParams(structured_outputs={"json": "{not json"})
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        SamplingParams(structured_outputs={"choice": []})
    with pytest.raises(ValueError, match="structured_outputs: .*unexpected keyword"):
        SamplingParams(structured_outputs={"xml": "<a/>"})
    engine = llm.llm_engine
    with pytest.raises(ValueError, match="unclosed group"):
        engine.add_request("bad", [5, 6, 7], SamplingParams(structured_outputs={"regex": "a(b"}))
    with pytest.raises(ValueError, match="structured outputs"):
        engine.add_request("bad2", [5, 6, 7], SamplingParams(
            structured_outputs={"grammar": "start: undefined_rule"}))
    assert not engine.has_unfinished_requests()
    assert _texts(llm, ["x"], SamplingParams(max_tokens=5, structured_outputs={
        "choice": ["ok"]})) == ["ok"]


def test_an_engine_without_a_tokenizer_says_why():
    no_tok = LLM(model="tiny", dtype="float32", device="cpu", skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="need a tokenizer"):
        no_tok.llm_engine.add_request("r", [5, 6], SamplingParams(
            structured_outputs={"choice": ["a"]}))


def test_with_speculative_decoding_constrained_sequences_decode_without_drafts(llm):
    """MTP drafts for the others; the constrained ones fit their schema, and the free ones
    keep the tokens of plain greedy decoding."""
    spec = LLM(model="tiny", dtype="float32", device="cpu", speculative_tokens=2)
    free = SamplingParams(temperature=0.0, max_tokens=16)
    want = _texts(llm, ["The weather", "Hello there"], free)
    outs = spec.generate(["The weather", "A person:", "Hello there", "Another:"],
                         [free, SamplingParams(temperature=0.0, max_tokens=100,
                                               structured_outputs={"json": PERSON}),
                          free, SamplingParams(temperature=1.0, seed=4, max_tokens=100,
                                               structured_outputs={"json": PERSON})],
                         use_tqdm=False)
    assert [outs[0].outputs[0].text, outs[2].outputs[0].text] == want
    for o in (outs[1], outs[3]):
        assert {"name", "age"} <= set(json.loads(o.outputs[0].text))
    assert spec.llm_engine.runner.proposer.verify_steps > 0  # the free ones drafted


class _Matcher:
    """A stand-in matcher: allows `allowed`, records what it consumes."""

    def __init__(self, allowed, V):
        self.allowed, self.V, self.consumed = set(allowed), V, []

    def compute_bitmask(self):
        words = [0] * ((self.V + 31) // 32)
        for t in self.allowed:
            words[t // 32] |= 1 << (t % 32)
        return torch.tensor(words, dtype=torch.int64).to(torch.int32).numpy().tobytes()

    def consume_token(self, t):
        self.consumed.append(t)
        return t in self.allowed


def test_masks_start_after_the_token_and_never_leave_a_row_empty():
    V = 40
    logits = torch.zeros(3, V)
    waiting = GrammarState(_Matcher([3], V), start_after=33)
    done = GrammarState(_Matcher([], V))  # complete, EOS held back by min_tokens
    out = mask_logits(logits, [None, waiting, done], fallback_ids=[1])
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()  # not started yet
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [1]  # EOS kept open
    waiting.advance(7)
    assert not waiting.active and waiting.matcher.consumed == []
    waiting.advance(33)  # </think>: the constraint starts with the next token
    assert waiting.active
    out = mask_logits(torch.zeros(3, V), [None, waiting, None], fallback_ids=[1])
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [3]
    waiting.advance(3)
    assert waiting.matcher.consumed == [3]


def test_a_grammar_compiled_ahead_is_taken_once(llm):
    """The server compiles off the engine's thread (`compile_structured`) and hands the
    matcher over in the spec; the engine takes it instead of compiling again."""
    engine = llm.llm_engine
    spec = StructuredOutputs(choice=["left", "right"])
    state = engine.compile_structured(spec)
    spec.compiled = state
    engine.add_request("ahead", [5, 6, 7], SamplingParams(max_tokens=12, structured_outputs=spec))
    seq = engine.requests["ahead"].seqs[0]
    assert seq.grammar is state and spec.compiled is None
    while engine.has_unfinished_requests():
        engine.step()
    assert seq.text in ("left", "right")


def test_a_failing_mask_lifts_that_constraint_only():
    class Broken(_Matcher):
        def compute_bitmask(self):
            raise RuntimeError("internal")
    V = 40
    broken, fine = GrammarState(Broken([], V)), GrammarState(_Matcher([5], V))
    out = mask_logits(torch.zeros(2, V), [broken, fine], fallback_ids=[1])
    assert torch.isfinite(out[0]).all() and not broken.active
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [5]


def test_the_dummy_presets_placeholder_vocabulary_builds_fast_and_is_never_allowed():
    """The tiny tokenizer padded to DeepSeek-V4's 129280 ids with placeholders: llguidance's
    tokenizer leaves them out (a minute to build with them), so no mask allows one."""
    import time
    from dsv4.engine.structured import GrammarCompiler
    from dsv4.tokenizer import Tokenizer
    tok = Tokenizer.tiny(129280)
    compiler = GrammarCompiler(tok.backend.to_str(), 129280, [tok.eos_token_id])
    t0 = time.perf_counter()
    state = GrammarState(compiler.matcher(StructuredOutputs(json_object=True)))
    assert time.perf_counter() - t0 < 10
    out = mask_logits(torch.zeros(1, 129280), [state], fallback_ids=[1])
    allowed = torch.isfinite(out[0]).nonzero().flatten()
    assert 0 < len(allowed) and int(allowed.max()) < 1001  # ids past 1000 are placeholders


def test_offline_chat_in_thinking_mode_constrains_the_answer_only(llm):
    """LLM.chat(thinking=True): the constraint starts after </think> (a logit bias makes it the
    first token here), on a copy of the caller's params."""
    end = llm.get_tokenizer().token_to_id("</think>")
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=120, logit_bias={end: 100},
                            structured_outputs={"json": PERSON})
    out = llm.chat([{"role": "user", "content": "A person"}], params, thinking=True,
                   use_tqdm=False)[0].outputs[0]
    assert out.token_ids[0] == end
    assert {"name", "age"} <= set(json.loads(out.text))
    assert params.structured_outputs.start_after is None  # the caller's object is untouched
