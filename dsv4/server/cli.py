"""``dsv4 serve`` (and ``python -m dsv4.server``): build the engine, then serve it over HTTP."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The engine flags of ``dsv4 generate`` plus the server's own."""
    from dsv4.cli import add_engine_args

    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="the model, as `vllm serve MODEL` takes it (same as --model)")
    add_engine_args(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("DSV4_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* "
                        "(default: $DSV4_API_KEY, else no key)")
    g.add_argument("--served-model-name", default=None, nargs="+", metavar="NAME",
                   help="the model name clients send and /v1/models lists (default: --model); "
                        "several are aliases, the first named in responses")
    g.add_argument("--graceful-shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish before aborting them")
    g.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    g.add_argument("--enable-log-requests", action="store_true",
                   help="log each request's prompt token ids and sampling parameters")
    g.add_argument("--max-log-len", type=int, default=None,
                   help="with --enable-log-requests: at most this many prompt token ids")
    g.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="logprobs name tokens as 'token_id:N' (for every request; a request "
                        "can also ask with return_tokens_as_token_ids)")
    g.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this key ...")
    g.add_argument("--ssl-certfile", default=None, help="... and this certificate")
    g.add_argument("--root-path", default=None,
                   help="the path prefix a proxy serves this server under (FastAPI root_path)")
    for name, default in (("origins", '["*"]'), ("methods", '["*"]'), ("headers", '["*"]')):
        g.add_argument(f"--allowed-{name}", type=_json_list, default=json.loads(default),
                       metavar="JSON", help=f"CORS: allowed {name}, a JSON list (default "
                                            f"{default}, as vLLM)")
    g.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    v = parser.add_argument_group(
        "vLLM compatibility", "accepted so that vLLM command lines for DeepSeek-V4 run as they "
        "are: dsv4 implements the model itself and always parses its tool calls (DSML) and "
        "reasoning (<think>), and tool_choice 'auto' needs no switch")
    v.add_argument("--trust-remote-code", action="store_true", help="no effect")
    v.add_argument("--enable-auto-tool-choice", action="store_true", help="no effect")
    v.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="a DeepSeek parser name (deepseek_v4, ...); others are refused")
    v.add_argument("--reasoning-parser", default=None, metavar="NAME",
                   help="a DeepSeek parser name (deepseek_v4, ...); others are refused")
    v.add_argument("--enable-expert-parallel", action="store_true",
                   help="no effect: under --tensor-parallel-size the MoE is split by experts")
    v.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   default=None, help="prefill is always chunked (--max-num-batched-tokens); "
                                      "--no-enable-chunked-prefill is refused")
    v.add_argument("--disable-log-requests", action="store_true",
                   help="no effect: requests are logged only with --enable-log-requests")
    v.add_argument("--disable-custom-all-reduce", action="store_true",
                   help="tensor parallel all-reduces through NCCL only (DSV4_TP_ALLREDUCE=nccl)")
    v.add_argument("--uvicorn-log-level", default=None,
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="the same as --log-level")
    for flag, why in (("--block-size", "the cache's blocks are 128 tokens"),
                      ("--swap-space", "preempted sequences are recomputed, not swapped"),
                      ("--quantization", "the checkpoint's own formats are used"),
                      ("--tokenizer-mode", "the tokenizer is tokenizer.json's")):
        v.add_argument(flag, default=None, metavar="X", help=f"ignored with a warning: {why}")
    v.add_argument("--compilation-config", "-O", default=None, metavar="JSON",
                   help="its max_cudagraph_capture_size (or the largest of "
                        "cudagraph_capture_sizes) sets --max-cudagraph-capture-size; the rest is "
                        "ignored with a warning (CUDA graphs are captured without torch.compile)")
    v.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=None, metavar="N",
                   help="the largest sets --max-cudagraph-capture-size")
    v.add_argument("--max-seq-len-to-capture", type=int, default=None, metavar="N",
                   help="the same as --cuda-graph-max-len")
    v.add_argument("--chat-template", default=None, metavar="X",
                   help="refused: the DeepSeek-V4 chat encoding is built in")
    v.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="1 only: run a dsv4 serve per replica behind a load balancer")


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from e
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"a JSON list of strings, got {text!r}")
    return value


def check_serve_args(args: argparse.Namespace) -> None:
    """The positional MODEL into --model; vLLM's parser names must be DeepSeek's."""
    names = args.served_model_name or []
    if args.model_tag is None and args.model == "tiny" and len(names) > 1:
        from pathlib import Path

        from dsv4.loader.hub import is_repo_id
        if is_repo_id(names[-1]) or Path(names[-1]).exists():  # `--served-model-name a MODEL`
            raise ValueError(f"--served-model-name took {names[-1]!r}, which looks like the "
                             f"model: put MODEL first (dsv4 serve MODEL --served-model-name "
                             f"...) or pass --model")
    if args.model_tag is not None:
        if args.model not in ("tiny", args.model_tag):  # --model given too, and different
            raise ValueError(f"the model is given twice: {args.model_tag!r} and --model "
                             f"{args.model!r}")
        args.model = args.model_tag
    for flag in ("tool_call_parser", "reasoning_parser"):
        name = getattr(args, flag)
        if name is not None and not name.lower().startswith("deepseek"):
            raise ValueError(f"--{flag.replace('_', '-')} {name!r}: dsv4 serves DeepSeek-V4 and "
                             f"parses its own format only (leave the flag out, or name "
                             f"deepseek_v4)")
    _check_vllm_flags(args)


def _compilation_config(args: argparse.Namespace, log) -> None:
    """vLLM's --compilation-config: the largest CUDA-graph capture size is honoured (as
    --max-cudagraph-capture-size, unless that is given), every other key ignored."""
    import json

    from dsv4.config import graph_capture_size

    try:
        cc = json.loads(args.compilation_config)
    except json.JSONDecodeError as e:
        raise ValueError(f"--compilation-config {args.compilation_config!r}: not JSON ({e})")
    if not isinstance(cc, dict):
        raise ValueError(f"--compilation-config {args.compilation_config!r}: must be a JSON "
                         f"object")
    size, ignored = graph_capture_size(cc)
    if size is not None and args.max_cudagraph_capture_size is None:
        args.max_cudagraph_capture_size = size
    if ignored:
        log.warning("--compilation-config keys %s ignored: CUDA graphs are captured without "
                    "torch.compile", ignored)


def _check_vllm_flags(args: argparse.Namespace) -> None:
    """vLLM flags that mean nothing here are ignored with a warning; those that would change
    what is served, and cannot, are refused with the reason."""
    import logging

    log = logging.getLogger("dsv4.server")
    if args.enable_chunked_prefill is False:
        raise ValueError("--no-enable-chunked-prefill: dsv4 always prefills in chunks of "
                         "--max-num-batched-tokens (as vLLM V1); set that to --max-model-len "
                         "to prefill whole prompts in one step")
    if args.chat_template is not None:
        raise ValueError("--chat-template: dsv4 encodes chats with DeepSeek-V4's own format "
                         "(dsv4/chat); a custom template is not supported")
    if args.data_parallel_size != 1:
        raise ValueError(f"--data-parallel-size {args.data_parallel_size}: not supported; run "
                         f"one dsv4 serve per replica (each with its --tensor-parallel-size) "
                         f"behind a load balancer")
    if args.block_size is not None and args.block_size != "128":
        log.warning("--block-size %s ignored: dsv4's cache blocks are 128 tokens (DeepSeek-V4's "
                    "compression ratios 4 and 128)", args.block_size)
    for flag, why in (("swap_space", "preempted sequences are recomputed, not swapped"),
                      ("quantization", "the checkpoint's own formats (config.json) are used"),
                      ("tokenizer_mode", "the tokenizer is the model's tokenizer.json")):
        if getattr(args, flag) is not None:
            log.warning("--%s ignored: %s", flag.replace("_", "-"), why)
    if args.compilation_config is not None:
        _compilation_config(args, log)
    if args.cuda_graph_sizes and args.max_cudagraph_capture_size is None:
        args.max_cudagraph_capture_size = max(args.cuda_graph_sizes)
    if args.max_seq_len_to_capture is not None and args.cuda_graph_max_len is None:
        args.cuda_graph_max_len = args.max_seq_len_to_capture
    if args.disable_custom_all_reduce:
        os.environ["DSV4_TP_ALLREDUCE"] = "nccl"
    if args.uvicorn_log_level is not None:
        args.log_level = "debug" if args.uvicorn_log_level == "trace" else args.uvicorn_log_level


def add_serve_cli(subparsers: Any) -> None:
    """Register ``serve`` on the ``dsv4`` command's subparsers."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_serve_args(p)
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    """Load the model, serve until SIGTERM/SIGINT, shut down gracefully; exit code 0."""
    from dsv4.cli import engine_kwargs
    from dsv4.engine.llm_engine import LLMEngine
    from dsv4.server.api_server import build_app, run_server

    check_serve_args(args)
    # The engine logs its capacity line through the "dsv4" logger (set up by dsv4/__init__).
    engine = LLMEngine.from_args(**engine_kwargs(args))
    cors = {"allow_origins": args.allowed_origins, "allow_methods": args.allowed_methods,
            "allow_headers": args.allowed_headers, "allow_credentials": args.allow_credentials}
    app = build_app(engine, args.served_model_name or args.model, args.api_key, cors,
                    args.enable_log_requests, args.max_log_len, args.return_tokens_as_token_ids)
    extra = {k: v for k, v in (("ssl_keyfile", args.ssl_keyfile),
                               ("ssl_certfile", args.ssl_certfile),
                               ("root_path", args.root_path)) if v is not None}
    run_server(app, args.host, args.port, args.graceful_shutdown_timeout, args.log_level, **extra)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4.server", description=__doc__)
    add_serve_args(parser)
    args = parser.parse_args(argv)
    try:
        return serve(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # ConfigError is a ValueError
        parser.exit(1, f"error: {exc}\n")
