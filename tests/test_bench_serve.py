"""`dsv4 bench serve` against the OpenAI server on the tiny model: every request streams its
tokens, the summary counts them, and a bad key shows up as failed requests."""
from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from collections.abc import Iterator

import pytest

from dsv4.bench_serve import random_prompts, run
from dsv4.engine.llm_engine import LLMEngine
from test_server import API_KEY, ENGINE_ARGS, MODEL, Server, serve


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serve(LLMEngine.from_args(MODEL, **ENGINE_ARGS)) as s:
        yield s


@pytest.mark.parametrize("rate, concurrency", [(math.inf, None), (50.0, 2)])
def test_every_request_streams_its_tokens_and_is_counted(server: Server, rate,
                                                         concurrency) -> None:
    prompts = random_prompts(6, 12, 500, seed=1)
    s = asyncio.run(run(server.base_url, MODEL, prompts, 8, rate, concurrency, API_KEY))
    assert s["completed"] == 6 and s["failed"] == 0, s["errors"]
    assert s["total_input_tokens"] == 6 * 12 and s["total_output_tokens"] == 6 * 8
    assert s["median_ttft_ms"] > 0 and s["median_tpot_ms"] > 0 and s["median_itl_ms"] > 0
    assert s["mean_e2el_ms"] >= s["mean_ttft_ms"]
    assert math.isclose(s["output_throughput"], 48 / s["duration_s"])


def test_the_cli_prints_and_writes_the_summary_and_fails_on_a_bad_key(server: Server,
                                                                       tmp_path) -> None:
    out = tmp_path / "r.json"
    base = [sys.executable, "-m", "dsv4.cli", "bench", "serve", "--base-url", server.base_url,
            "--model", MODEL, "--num-prompts", "4", "--input-len", "10", "--output-len", "5",
            "--vocab-size", "500"]
    proc = subprocess.run(base + ["--api-key", API_KEY, "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "successful requests     4 (0 failed)" in proc.stdout
    assert "time per output token" in proc.stdout
    assert json.loads(out.read_text())["total_output_tokens"] == 20
    bad = subprocess.run(base + ["--api-key", "wrong"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and "0 (4 failed)" in bad.stdout and "HTTP 401" in bad.stdout


def test_chunks_without_text_count_as_token_arrivals() -> None:
    """A step's tokens can end inside a character (or be placeholders that print nothing):
    their chunk has an empty text but still times the tokens' arrival, as in vLLM's client."""
    import httpx

    from dsv4.bench_serve import _one

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    body = "".join([sse({"choices": [{"index": 0, "text": t}]}) for t in ("", "", "a")]
                   + [sse({"choices": [], "usage": {"completion_tokens": 3}}), "data: [DONE]\n\n"])

    async def main():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body))
        async with httpx.AsyncClient(transport=transport) as client:
            return await _one(client, "http://test/v1/completions",
                              {"prompt": [1, 2, 3], "max_tokens": 3}, {})

    r = asyncio.run(main())
    assert r.ok and r.error == "" and r.ttft > 0
    assert r.output_tokens == 3 and r.prompt_tokens == 3
    assert len(r.itl) == 2  # three chunks: the first token, then two gaps


def test_chat_backend_and_ranged_lengths(server: Server) -> None:
    """`--backend openai-chat`: messages of random words to /v1/chat/completions, prompt
    tokens as the server counts them; `--random-range-ratio`: per-request lengths."""
    from dsv4.bench_serve import random_lengths, random_texts

    outs = random_lengths(5, 8, 0.5, seed=2)
    assert all(4 <= n <= 12 for n in outs) and len(set(outs)) > 1
    assert random_lengths(3, 8, 0.0, seed=2) == [8, 8, 8]
    with pytest.raises(ValueError, match="range-ratio"):
        random_lengths(3, 8, 1.0, seed=2)
    texts = random_texts(5, random_lengths(5, 10, 0.5, seed=3), seed=4)
    s = asyncio.run(run(server.base_url, MODEL, texts, outs, math.inf, None, API_KEY,
                        backend="openai-chat"))
    assert s["completed"] == 5 and s["failed"] == 0, s["errors"]
    assert s["total_output_tokens"] == sum(outs)
    assert s["total_input_tokens"] > sum(len(t.split()) for t in texts)  # + the chat template
