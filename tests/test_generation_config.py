"""`generation_config="auto"` (the default, as vLLM's `--generation-config auto`): requests that
leave sampling fields out take the model's generation_config.json values; explicit fields win;
"vllm" ignores the file."""
from __future__ import annotations

import json

import httpx
import pytest

from dsv4 import LLM, SamplingParams
from dsv4.config import ConfigError
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.sampler import generation_defaults
from dsv4.loader import write_tiny_checkpoint
from test_server import serve

KW = dict(dtype="float32", device="cpu", max_num_seqs=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny checkpoint whose generation config asks for greedy decoding of 5 tokens."""
    out = write_tiny_checkpoint(tmp_path_factory.mktemp("gen") / "tiny", fmt="bf16", seed=4)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.0,
         "top_k": 7, "max_new_tokens": 5}))
    return str(out)


def test_the_files_sampling_keys_become_defaults():
    assert generation_defaults({"temperature": 0.6, "top_p": 0.95, "do_sample": True,
                                "max_new_tokens": 64, "eos_token_id": 1}) == \
        {"temperature": 0.6, "top_p": 0.95, "max_tokens": 64}
    assert generation_defaults(None) == {}
    with pytest.raises(ValueError, match="generation_config.json: .*top_p"):
        generation_defaults({"top_p": 1.5})
    with pytest.raises(ConfigError, match="generation_config 'hf'"):
        LLMEngine.from_args("tiny", generation_config="hf", **KW)


def test_offline_calls_without_params_use_the_models_defaults(model_dir):
    llm = LLM(model_dir, **KW)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, top_k=7,
                                                               max_tokens=5)
    out = llm.generate([[5, 6, 7]], use_tqdm=False)[0].outputs[0].token_ids
    assert out == llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5),
                               use_tqdm=False)[0].outputs[0].token_ids
    plain = LLM(model_dir, generation_config="vllm", **KW)
    assert plain.get_default_sampling_params() == SamplingParams()


def test_server_requests_fill_what_they_leave_out(model_dir):
    greedy = LLM(model_dir, **KW).generate([[5, 6, 7]], SamplingParams(temperature=0,
                                                                       max_tokens=5),
                                           use_tqdm=False)[0].outputs[0].text
    with serve(LLMEngine.from_args(model_dir, **KW), api_key=None) as s:
        def complete(**body):
            r = httpx.post(s.base_url + "/v1/completions", timeout=60,
                           json={"prompt": [5, 6, 7], "max_tokens": 5, **body})
            assert r.status_code == 200, r.text
            return r.json()
        # no temperature: the file's greedy decoding, whatever the seed
        assert {complete(seed=s_)["choices"][0]["text"] for s_ in (1, 2, 3)} == {greedy}
        # an explicit temperature wins: seeded samples differ from one another
        assert len({complete(temperature=1.0, seed=s_)["choices"][0]["text"]
                    for s_ in (1, 2, 3, 4)}) > 1
        chat = httpx.post(s.base_url + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "Hi"}]}).json()
        assert chat["usage"]["completion_tokens"] <= 5  # max_new_tokens without max_tokens
