"""The offline API: `from dsv4 import LLM, SamplingParams`, vLLM-shaped results."""
import pytest

from dsv4 import LLM, CompletionOutput, RequestOutput, SamplingParams
from dsv4.chat import encode_messages

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny", dtype="float32", device="cpu", cpu_cache_bytes=16 << 20, max_num_seqs=8)


def test_generate_accepts_text_token_ids_and_dict_prompts_and_keeps_input_order(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("Hello there", add_special_tokens=True)
    outs = llm.generate(["Hello there", ids, {"prompt_token_ids": ids}, [7, 8, 9]], GREEDY,
                        use_tqdm=False)
    assert all(isinstance(o, RequestOutput) and o.finished for o in outs)
    assert [o.prompt_token_ids for o in outs] == [ids, ids, ids, [7, 8, 9]]
    assert outs[0].prompt == "Hello there" and outs[1].prompt is None
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids
    c = outs[0].outputs[0]
    assert isinstance(c, CompletionOutput) and len(c.token_ids) == 6 and c.finish_reason == "length"
    assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_a_single_prompt_gives_a_list_of_one_output(llm):
    (one,) = llm.generate([5, 6, 7], GREEDY, use_tqdm=False)
    assert one.prompt_token_ids == [5, 6, 7]


def test_one_sampling_params_per_prompt(llm):
    outs = llm.generate([[5, 6], [7, 8]], [SamplingParams(max_tokens=2, ignore_eos=True),
                                            SamplingParams(max_tokens=4, ignore_eos=True)],
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 4]
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        llm.generate([[5], [6], [7]], [GREEDY, GREEDY], use_tqdm=False)


def test_generate_asks_for_final_outputs_only_and_leaves_the_callers_params(llm):
    """As vLLM's LLM: requests run with output_kind FINAL_ONLY (no per-step copies); the
    results are those of cumulative outputs and the caller's params are not modified."""
    from dsv4 import RequestOutputKind
    engine = llm.llm_engine
    engine.add_request("cumulative", [5, 6, 7], GREEDY)
    steps = []
    while engine.has_unfinished_requests():
        steps.append(engine.step())
    assert sum(len(s) for s in steps) > 1
    want = [o for s in steps for o in s][-1]
    seen = []
    add = engine.add_request
    engine.add_request = lambda rid, p, params, **kw: seen.append(params) or add(rid, p, params, **kw)
    try:
        (got,) = llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    finally:
        del engine.add_request
    assert [p.output_kind for p in seen] == [RequestOutputKind.FINAL_ONLY]
    assert GREEDY.output_kind == RequestOutputKind.CUMULATIVE
    assert got.outputs == want.outputs


def test_a_bad_prompt_rejects_the_batch_and_leaves_the_engine_empty(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[5, 6], []], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.get_stats().num_free_blocks == llm.llm_engine.num_blocks


def test_chat_applies_the_deepseek_v4_chat_encoding(llm):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    (out,) = llm.chat(messages, GREEDY, use_tqdm=False)
    text = encode_messages(messages, "chat")
    assert out.prompt == text
    assert out.prompt_token_ids == llm.get_tokenizer().encode(text)
    assert out.prompt_token_ids[0] == llm.get_tokenizer().bos_token_id  # exactly one BOS
    assert out.prompt_token_ids[1] != out.prompt_token_ids[0]
    two = llm.chat([messages, messages + [{"role": "assistant", "content": "4"},
                                          {"role": "user", "content": "And 3+3?"}]],
                   GREEDY, thinking=True, use_tqdm=False)
    assert len(two) == 2 and two[0].prompt.endswith("<think>")
    # vLLM's spelling of the same switch
    (vllm_style,) = llm.chat(messages, GREEDY, use_tqdm=False,
                             chat_template_kwargs={"enable_thinking": True})
    assert vllm_style.prompt == two[0].prompt


def test_without_tokenizer_token_ids_are_served_and_text_is_refused():
    llm = LLM("tiny", dtype="float32", device="cpu", cpu_cache_bytes=16 << 20, max_num_seqs=4,
              skip_tokenizer_init=True)
    assert llm.get_tokenizer() is None
    (out,) = llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 6
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello", GREEDY, use_tqdm=False)


def test_unknown_model_raises_file_not_found():
    with pytest.raises(FileNotFoundError, match="not-a-model"):
        LLM("./not-a-model", device="cpu")


def test_vllm_constructor_arguments():
    """vLLM's `trust_remote_code` is taken (and changes nothing), and `compilation_config`:
    its largest CUDA-graph capture size bounds the prefill graphs, an optimisation level
    changes nothing; an argument dsv4 does not know is a TypeError naming it, before any
    model is built."""
    LLM("tiny", dtype="float32", device="cpu", max_num_seqs=2, trust_remote_code=True)
    for cc, size in (({"cudagraph_capture_sizes": [1, 2, 640]}, 640), (3, None),
                     ({"max_cudagraph_capture_size": 0, "level": 3}, 0)):
        llm = LLM("tiny", dtype="float32", device="cpu", max_num_seqs=2, compilation_config=cc)
        assert llm.llm_engine.engine_config.max_cudagraph_capture_size == size
    with pytest.raises(TypeError, match="unknown engine arguments \\['swap_space'\\]"):
        LLM("tiny", device="cpu", swap_space=4)


def test_detokenize_false_and_lora_request_as_vllm_takes_them(llm):
    """SamplingParams(detokenize=False): the same tokens, no text, logprobs without decoded
    tokens; stop strings then refused. lora_request=None is accepted, an adapter refused."""
    kw = dict(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=1)
    (plain,) = llm.generate([[5, 6, 7]], SamplingParams(**kw), use_tqdm=False, lora_request=None)
    (raw,) = llm.generate([[5, 6, 7]], SamplingParams(**kw, detokenize=False), use_tqdm=False)
    assert raw.outputs[0].token_ids == plain.outputs[0].token_ids and raw.outputs[0].text == ""
    assert all(lp.decoded_token is None for pos in raw.outputs[0].logprobs for lp in pos.values())
    assert any(lp.decoded_token for pos in plain.outputs[0].logprobs for lp in pos.values())
    with pytest.raises(ValueError, match="detokenize"):
        llm.generate([[5, 6]], SamplingParams(stop=["x"], detokenize=False), use_tqdm=False)
    with pytest.raises(ValueError, match="LoRA"):
        llm.generate([[5, 6]], GREEDY, use_tqdm=False, lora_request=object())
    assert not llm.llm_engine.has_unfinished_requests()
