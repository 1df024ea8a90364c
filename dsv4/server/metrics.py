"""Prometheus metrics of one server, in a registry of its own.

A per-app ``CollectorRegistry`` (not the global one) lets several servers live in one process,
as the tests do. Engine-wide numbers (running/waiting requests, KV-cache usage, token totals)
are read from the engine's latest stats snapshot at scrape time; per-request latencies are
measured by the serving code as outputs reach it. Names follow vLLM's ``vllm:`` metrics with a
``dsv4:`` prefix, and carry its ``model_name`` label (the served name), so existing dashboards
need only the prefix changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                  100000, 200000, 500000, 1000000)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineStatsCollector(Collector):
    """Gauges and counters read from ``stats()`` (the engine's ``get_stats()`` snapshot)."""

    def __init__(self, stats: Callable[[], Any], model_name: str) -> None:
        self._stats, self._model = stats, model_name

    def collect(self) -> Iterator[Any]:
        s = self._stats()
        model = [self._model]
        gauges = [
            ("dsv4:num_requests_running", "Requests in the running batch.", s.num_running),
            ("dsv4:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            ("dsv4:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).",
             s.kv_cache_usage),
            ("dsv4:kv_cache_free_blocks", "KV-cache blocks free.", s.num_free_blocks),
            ("dsv4:kv_cache_blocks", "KV-cache blocks in total.", s.num_blocks),
        ]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(model, float(value))
            yield family
        counters = [
            ("dsv4:prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total),
            ("dsv4:generation_tokens", "Tokens generated.", s.generation_tokens_total),
            ("dsv4:num_preemptions", "Requests preempted for lack of KV-cache blocks.",
             s.num_preemptions),
            ("dsv4:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             s.prefix_cache_queries),
            ("dsv4:prefix_cache_hits", "Prompt tokens resumed from the prefix cache.",
             s.prefix_cache_hits),
            ("dsv4:triton_compiles", "Triton kernel compiles after the warm-up (each one "
             "delays the step that met its shape).", s.triton_compiles),
            ("dsv4:triton_compile_seconds", "Seconds spent in those compiles.",
             s.triton_compile_seconds),
        ]
        if s.spec_proposed:  # speculative decoding
            steps = s.spec_verify_steps
            gauges = [("dsv4:spec_decode_mean_accepted_length",
                       "Tokens emitted per verification step (accepted drafts + 1).",
                       (sum(s.spec_accepted) / steps + 1) if steps else 0.0)]
            counters += [
                ("dsv4:spec_decode_num_drafts", "Draft tokens verified.", sum(s.spec_proposed)),
                ("dsv4:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                 sum(s.spec_accepted))]
            for name, doc, value in gauges:
                family = GaugeMetricFamily(name, doc, labels=["model_name"])
                family.add_metric(model, float(value))
                yield family
            rate = GaugeMetricFamily("dsv4:spec_decode_acceptance_rate",
                                     "Fraction of drafts accepted, per draft position.",
                                     labels=["model_name", "position"])
            for j, (p, a) in enumerate(zip(s.spec_proposed, s.spec_accepted)):
                rate.add_metric(model + [str(j)], a / p if p else 0.0)
            yield rate
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(model, float(value))
            yield family


class ServerMetrics:
    """The metrics of one server; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, stats: Callable[[], Any], model_name: str = "") -> None:
        """`model_name`: the served name, every generation metric's `model_name` label."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "dsv4:http_requests", "HTTP requests by endpoint and status code.",
            ["endpoint", "status"], registry=r)
        self.request_finished = Counter(
            "dsv4:request_success", "Generation requests finished, by finish reason "
            "(abort: the client went away or the server shut down).",
            ["model_name", "finished_reason"], registry=r)
        self.model_name = model_name

        def histogram(name: str, doc: str, buckets: tuple) -> Any:
            return Histogram(f"dsv4:{name}", doc, ["model_name"], buckets=buckets,
                             registry=r).labels(model_name)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Time from arrival to the first generated token.",
            _TTFT_BUCKETS)
        self.time_per_output_token = histogram(
            "time_per_output_token_seconds", "Mean time between generated tokens, per request.",
            _TPOT_BUCKETS)
        self.e2e_latency = histogram(
            "e2e_request_latency_seconds", "Time from arrival to the last token.", _E2E_BUCKETS)
        # the engine's side of a request (vLLM's request_*_time): waiting, prefill, decode
        self.queue_time = histogram(
            "request_queue_time_seconds", "Time from arrival to the first step that scheduled "
            "the request.", _TTFT_BUCKETS)
        self.prefill_time = histogram(
            "request_prefill_time_seconds", "Time from the first step that scheduled the "
            "request to its first token.", _TTFT_BUCKETS)
        self.decode_time = histogram(
            "request_decode_time_seconds", "Time from the first token to the last.", _E2E_BUCKETS)
        self.prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens of finished requests.", _TOKEN_BUCKETS)
        self.generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens of finished requests.", _TOKEN_BUCKETS)
        r.register(_EngineStatsCollector(stats, model_name))

    def observe_request(self, arrival: float, first_token: float | None, finish: float,
                        num_tokens: int, finished_reason: str, prompt_tokens: int = 0,
                        engine_times: Any = None) -> None:
        """Record one finished (or aborted) request; times are ``time.monotonic()`` values;
        `engine_times`: the engine's `RequestMetrics` (wall-clock times of its life)."""
        self.request_finished.labels(self.model_name, finished_reason).inc()
        if finished_reason != "abort":
            self.prompt_tokens.observe(prompt_tokens)
            self.generation_tokens.observe(num_tokens)
        e = engine_times
        if e is not None and e.first_scheduled_time is not None:
            self.queue_time.observe(max(0.0, e.first_scheduled_time - e.arrival_time))
            if e.first_token_time is not None:
                self.prefill_time.observe(max(0.0, e.first_token_time - e.first_scheduled_time))
                if e.last_token_time is not None:
                    self.decode_time.observe(max(0.0, e.last_token_time - e.first_token_time))
        if first_token is None:
            return
        self.time_to_first_token.observe(first_token - arrival)
        self.e2e_latency.observe(finish - arrival)
        if num_tokens > 1:
            self.time_per_output_token.observe((finish - first_token) / (num_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
