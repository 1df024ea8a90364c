"""`dsv4 bench serve`: an online serving benchmark over HTTP, in the style of `vllm bench serve`.

Sends `--num-prompts` random prompts of `--input-len` token ids to any OpenAI-compatible
`/v1/completions` (dsv4's, vLLM's or SGLang's: same request, so the numbers compare), at
`--request-rate` requests a second (Poisson arrivals; inf: all at once) with at most
`--max-concurrency` in flight, each streaming exactly `--output-len` tokens (`ignore_eos`),
and reports request and token throughput, and mean / median / p99 of the time to first token,
the time per output token (after the first), the inter-token latency (between stream chunks)
and the end-to-end latency. `--random-range-ratio R` draws each request's lengths uniformly
within +-R of them (vLLM's); `--backend openai-chat` sends chat messages of random words to
`/v1/chat/completions` instead (their token count is the server's: `usage.prompt_tokens`).
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm


@dataclass
class RequestResult:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds to the first token
    latency: float = 0.0  # seconds to the last
    itl: list[float] = field(default_factory=list)  # seconds between stream chunks
    error: str = ""


async def _one(client, url: str, body: dict[str, Any], headers: dict[str, str]) -> RequestResult:
    out = RequestResult(prompt_tokens=len(body.get("prompt", ())))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    out.output_tokens = chunk["usage"]["completion_tokens"]
                    out.prompt_tokens = chunk["usage"].get("prompt_tokens", out.prompt_tokens)
                if chunk.get("choices"):  # a step's tokens, whether or not they end text
                    now = time.perf_counter()
                    if out.ttft == 0.0:
                        out.ttft = now - start
                    else:
                        out.itl.append(now - last)
                    last = now
        out.latency = time.perf_counter() - start
        out.ok = out.ttft > 0.0
        if not out.ok:
            out.error = "no token came back"
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        out.error = f"{type(e).__name__}: {e}"
    return out


BACKENDS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}


def request_body(model: str, prompt: list[int] | str, output_len: int, backend: str) -> dict:
    """One streamed greedy request of exactly `output_len` tokens (`ignore_eos`)."""
    body = {"model": model, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if backend == "openai-chat":
        return {**body, "messages": [{"role": "user", "content": prompt}],
                "max_completion_tokens": output_len}
    return {**body, "prompt": prompt, "max_tokens": output_len}


async def run(base_url: str, model: str, prompts: list[list[int]] | list[str],
              output_len: int | list[int], request_rate: float = math.inf,
              max_concurrency: int | None = None, api_key: str | None = None, seed: int = 0,
              backend: str = "openai") -> dict[str, Any]:
    """Send the prompts (token ids for `openai`, text for `openai-chat`), each with its
    output length, and return the summary (`summarize`)."""
    import httpx
    url = base_url.rstrip("/") + BACKENDS[backend]
    lens = [output_len] * len(prompts) if isinstance(output_len, int) else list(output_len)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gaps = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency or len(prompts))

    bar = tqdm(total=len(prompts), desc="requests", unit="req",
               disable=not sys.stderr.isatty())

    async def limited(client, body):
        async with limit:
            result = await _one(client, url, body, headers)
        bar.update()
        return result

    timeout = httpx.Timeout(None, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None)) as c:
        tasks = []
        t0 = time.perf_counter()
        for p, n in zip(prompts, lens):
            tasks.append(asyncio.create_task(limited(c, request_body(model, p, n, backend))))
            if request_rate != math.inf:
                await asyncio.sleep(gaps.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    bar.close()
    return summarize(results, duration)


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    # time per output token after the first, per request (vLLM's TPOT)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]

    def stats(name: str, values: list[float]) -> dict[str, float]:
        v = np.array(values or [math.nan]) * 1e3
        return {f"mean_{name}_ms": float(np.mean(v)), f"median_{name}_ms": float(np.median(v)),
                f"p99_{name}_ms": float(np.percentile(v, 99))}

    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration, "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        **stats("ttft", [r.ttft for r in ok]), **stats("tpot", tpot),
        **stats("itl", [x for r in ok for x in r.itl]), **stats("e2el", [r.latency for r in ok]),
    }


def print_summary(s: dict[str, Any], base_url: str) -> None:
    print(f"== dsv4 bench serve: {base_url}")
    print(f"successful requests     {s['completed']} ({s['failed']} failed)")
    for e in s["errors"]:
        print(f"  error: {e}")
    print(f"benchmark duration      {s['duration_s']:.2f} s")
    print(f"total input tokens      {s['total_input_tokens']}")
    print(f"total generated tokens  {s['total_output_tokens']}")
    print(f"request throughput      {s['request_throughput']:.2f} req/s")
    print(f"output token throughput {s['output_throughput']:.1f} tok/s")
    print(f"total token throughput  {s['total_token_throughput']:.1f} tok/s")
    for name, what in (("ttft", "time to first token"), ("tpot", "time per output token"),
                       ("itl", "inter-token latency"), ("e2el", "end-to-end latency")):
        print(f"{what:24s}mean {s[f'mean_{name}_ms']:.2f} ms, median "
              f"{s[f'median_{name}_ms']:.2f} ms, p99 {s[f'p99_{name}_ms']:.2f} ms")


def random_lengths(n: int, length: int, range_ratio: float, seed: int) -> list[int]:
    """n lengths uniform in [length (1 - r), length (1 + r)] (at least 1), as vLLM's random
    dataset draws them; all `length` for r = 0."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    g = random.Random(seed)
    lo, hi = max(1, math.floor(length * (1 - range_ratio))), math.ceil(length * (1 + range_ratio))
    return [g.randint(lo, hi) for _ in range(n)]


def random_prompts(n: int, length: int | list[int], vocab_size: int,
                   seed: int) -> list[list[int]]:
    """Token-id prompts (of `length` ids, or one length each), ids in [16, vocab_size) (the
    low ids are special tokens)."""
    g = random.Random(seed)
    lens = [length] * n if isinstance(length, int) else length
    return [[g.randrange(16, vocab_size) for _ in range(m)] for m in lens]


_WORDS = ("time person year way day thing man world life hand part child eye woman place work "
          "week case point government company number group problem fact").split()


def random_texts(n: int, length: int | list[int], seed: int) -> list[str]:
    """Chat prompts of `length` random common English words (about a token each)."""
    g = random.Random(seed)
    lens = [length] * n if isinstance(length, int) else length
    return [" ".join(g.choice(_WORDS) for _ in range(m)) for m in lens]
