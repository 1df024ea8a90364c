"""The OpenAI-compatible HTTP server: FastAPI app, API key, error shape, metrics, shutdown.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (JSON or SSE with ``stream: true``), ``GET /health`` and
``GET /metrics`` (Prometheus). Only ``/v1/*`` needs the API key, as in vLLM, so that probes
and scrapers need no secret. Every error, including FastAPI's own validation errors (which it
would send as 422) and unknown routes, is returned in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import secrets
import signal
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsv4.server.async_engine import AsyncLLMEngine
from dsv4.server.metrics import CONTENT_TYPE, ServerMetrics
from dsv4.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIError,
    TokenizeRequest,
    now,
)
from dsv4.server.serving_chat import OpenAIServingChat
from dsv4.server.serving_completion import OpenAIServingCompletion
from dsv4.server.serving_responses import OpenAIServingResponses, ResponsesRequest
from dsv4.server.serving_tokens import OpenAIServingTokens

logger = logging.getLogger(__name__)

_ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/responses",
              "/health", "/metrics")


def _error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class _ApiKeyMiddleware:
    """Rejects ``/v1/*`` requests without ``Authorization: Bearer <key>`` (401).

    A pure ASGI middleware rather than a route dependency: it must answer before the body is
    parsed, so that a malformed body without a key is a 401, not a 400.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self._expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self._expected):
                error = OpenAIError(401, "Incorrect or missing API key: send "
                                    "'Authorization: Bearer <key>'.", "invalid_request_error",
                                    None, "invalid_api_key")
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _RequestCounterMiddleware:
    """Counts HTTP requests by endpoint and status code (401s from the key check included)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self._metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = next((e for e in _ENDPOINTS if path.startswith(e)), "other")
        status = 500  # what the client sees if the app fails before starting a response

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self._metrics.http_requests.labels(endpoint, str(status)).inc()


CORS_DEFAULTS = {"allow_origins": ["*"], "allow_methods": ["*"], "allow_headers": ["*"],
                 "allow_credentials": False}


def build_app(engine: Any, served_model_name: str | list[str], api_key: str | None = None,
              cors: dict[str, Any] | None = None, log_requests: bool = False,
              max_log_len: int | None = None, tokens_as_ids: bool = False) -> FastAPI:
    """The FastAPI app serving ``engine`` (an ``LLMEngine``) as ``served_model_name`` (or as
    each of several names, the first in responses).

    The engine thread starts with the app's lifespan and stops (aborting what is left) when
    the server shuts down. ``cors``: Starlette ``CORSMiddleware`` arguments (default, as
    vLLM's: every origin, method and header, no credentials). ``log_requests``: log each
    request's prompt (its first ``max_log_len`` token ids) and sampling parameters;
    ``tokens_as_ids``: logprobs name tokens as ``token_id:N`` for every request.
    """
    async_engine = AsyncLLMEngine(engine)
    names = [served_model_name] if isinstance(served_model_name, str) else served_model_name
    metrics = ServerMetrics(lambda: async_engine.stats, names[0])
    chat = OpenAIServingChat(async_engine, served_model_name, metrics)
    completion = OpenAIServingCompletion(async_engine, served_model_name, metrics)
    responses = OpenAIServingResponses(async_engine, served_model_name, metrics)
    tokens = OpenAIServingTokens(chat)
    for handler in (chat, completion, responses):
        handler.log_requests, handler.max_log_len = log_requests, max_log_len
        handler.tokens_as_ids = tokens_as_ids

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            await async_engine.shutdown()

    app = FastAPI(title="dsv4 OpenAI-compatible server", lifespan=lifespan)
    app.state.engine = async_engine
    app.state.metrics = metrics

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI says 422; OpenAI says 400 for both bad JSON and a bad schema.
        errors = exc.errors()
        parts, param = [], None
        for e in errors:
            if e.get("type") == "json_invalid":
                detail = (e.get("ctx") or {}).get("error", e.get("msg"))
                return _error_response(OpenAIError(
                    400, f"malformed JSON in the request body: {detail} "
                    f"(at character {e['loc'][-1]})"))
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            param = param or (".".join(loc) or None)
            parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
        return _error_response(OpenAIError(400, "; ".join(parts) or "invalid request", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(OpenAIError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return _error_response(OpenAIError(500, f"internal error: {exc!r}", "InternalServerError"))

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": now(), "owned_by": "dsv4",
                "root": names[0], "max_model_len": async_engine.max_model_len}

    @app.get("/health")
    async def health() -> Response:
        if async_engine.dead is not None:
            return _error_response(OpenAIError(503, str(async_engine.dead), "ServiceUnavailableError"))
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": _version()})

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:  # SageMaker's health route, as vLLM serves it
        return await health()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card(n) for n in names]})

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> JSONResponse:
        chat.check_model(model)
        return JSONResponse(model_card(model))

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw_request: Request) -> Response:
        result = await completion.create(request, raw_request)
        return result if isinstance(result, Response) else JSONResponse(result)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Response:
        result = await chat.create(request, raw_request)
        return result if isinstance(result, Response) else JSONResponse(result)

    @app.post("/v1/responses")
    async def create_response(request: ResponsesRequest, raw_request: Request) -> Response:
        result = await responses.create_response(request, raw_request)
        return result if isinstance(result, Response) else JSONResponse(result)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> JSONResponse:
        return JSONResponse(responses.stored(response_id))

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> JSONResponse:
        return JSONResponse(responses.delete(response_id))

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> JSONResponse:
        return JSONResponse(await tokens.create_tokenize(request))

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> JSONResponse:
        return JSONResponse(await tokens.create_detokenize(request))

    if api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key)
    # outside the key check: browsers send their CORS preflights without the key
    app.add_middleware(CORSMiddleware, **{**CORS_DEFAULTS, **(cors or {})})
    # Added last, so outermost: it also counts the key check's 401s.
    app.add_middleware(_RequestCounterMiddleware, metrics=metrics)
    return app


def _version() -> str:
    try:
        return importlib.metadata.version("dsv4")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
               graceful_shutdown_timeout: float = 30.0, log_level: str = "info",
               **uvicorn_kw: Any) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then shut down gracefully and return.
    ``uvicorn_kw``: more ``uvicorn.Config`` arguments (``ssl_keyfile``, ``root_path``, ...).

    On the signal uvicorn stops accepting connections, lets in-flight requests finish for up
    to ``graceful_shutdown_timeout`` seconds (then cancels them, which aborts their engine
    requests), and runs the lifespan shutdown, which stops the engine.
    """
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=graceful_shutdown_timeout, **uvicorn_kw)
    server = uvicorn.Server(config)
    # uvicorn re-raises the captured signal after its shutdown, with the handler it found at
    # start; with the default handler that would kill the process with -SIGTERM instead of a
    # clean exit 0 after the graceful shutdown has already completed.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
