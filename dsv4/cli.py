"""The `dsv4` command: `generate` here; `make-tiny`, `serve` and `bench` from their modules.

Engine options shared by every subcommand that builds an engine live in `add_engine_args` and
`engine_kwargs`, so `dsv4 serve` and `dsv4 bench` take exactly the flags `dsv4 generate` takes.
A subcommand module registers itself with `add_<name>_cli(subparsers)`, which adds a parser and
sets `func` (called with the parsed args; returns an exit code or None).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, TextIO


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default="tiny",
                   help="model directory, Hugging Face Hub repository (owner/name, downloaded "
                        "into its cache on first use), or a preset with random weights: tiny, "
                        "flash, pro")
    g.add_argument("--generation-config", default="auto", choices=["auto", "vllm"],
                   help="auto: requests without temperature, top_p, top_k, min_p, "
                        "repetition_penalty or max_tokens take the model's "
                        "generation_config.json values (as vLLM); vllm: ignore that file")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="priority: requests run by their `priority` (lower first), then "
                        "arrival; preemption takes the lowest priority first")
    g.add_argument("--max-logprobs", type=int, default=20,
                   help="the most logprobs / prompt_logprobs a request may ask for (vLLM's "
                        "default 20; -1: the vocabulary)")
    g.add_argument("--tokenizer", default=None,
                   help="directory or Hub repository to take the tokenizer files from "
                        "(default: the model's)")
    g.add_argument("--revision", default=None,
                   help="branch, tag or commit of a Hub repository (default: main)")
    g.add_argument("--download-dir", default=None,
                   help="where Hub repositories are downloaded (default: the Hub's cache, "
                        "$HF_HOME/hub)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="working dtype (auto = bfloat16)")
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    g.add_argument("--max-model-len", type=_token_count, default=None,
                   help="context limit, e.g. 65536, 64k or 1m (default: what the config and "
                        "the KV cache allow)")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences in one step (default: 256 on a GPU of 70 GiB or more, "
                        "else 64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens in one step (default: 8192 on a GPU of 70 GiB or more, else 2048)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory the engine may use (model + KV cache)")
    g.add_argument("--cpu-cache-bytes", type=int, default=256 << 20,
                   help="KV cache budget in bytes when running on CPU")
    g.add_argument("--seed", type=int, default=0, help="seed of presets' weights and of sampling")
    g.add_argument("--speculative-tokens", type=int, default=0, help="MTP draft tokens per step")
    g.add_argument("--speculative-config", type=_speculative_config, default=None,
                   metavar="JSON", help="vLLM-style, e.g. '{\"method\": \"mtp\", "
                   "\"num_speculative_tokens\": 2}' (the same as --speculative-tokens 2)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks for tensor-parallel attention and expert-parallel MoE "
                        "(started by this command; under torchrun, the launcher's world size)")
    g.add_argument("--enforce-eager", action="store_true", help="do not capture CUDA graphs")
    g.add_argument("--kv-cache-dtype", default="auto", type=_kv_cache_dtype,
                   choices=["auto", "bfloat16", "fp8"],
                   help="attention cache rows: packed FP8 (584 bytes a row instead of 1024, "
                        "lossless given the model's QAT), or the working dtype (bfloat16); "
                        "auto = fp8 on CUDA with bf16 weights and QAT, the working dtype otherwise")
    g.add_argument("--cuda-graph-max-len", type=int, default=None,
                   help="decode steps up to this context length replay CUDA graphs (default: "
                        "max_model_len; longer contexts decode eagerly)")
    g.add_argument("--max-cudagraph-capture-size", type=int, default=None, metavar="N",
                   help="prefill steps of up to N tokens replay CUDA graphs (default 2048, or "
                        "--max-num-batched-tokens if smaller; 0: only decode steps; vLLM's "
                        "compilation-config key)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="launch each decode step before the previous step's tokens reach the "
                        "host, overlapping host work with the GPU (on by default)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="cache each prompt's state at its last 128-token boundary and resume "
                        "later prompts that start with it there (repeated prompts, the next "
                        "turn of a conversation)")
    g.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU, run two full-budget prefill steps at start-up so their "
                        "kernels compile before the first request (on by default)")
    g.add_argument("--load-format", default="auto", help="checkpoint loading format")
    g.add_argument("--skip-tokenizer-init", action="store_true",
                   help="do not load a tokenizer (token-id prompts only)")


SPECULATIVE_METHODS = ("mtp", "deepseek_mtp")  # the model's own MTP layer, as vLLM names it


def _speculative_config(text: str) -> int:
    """--speculative-config JSON -> draft tokens per step, or an argparse error naming the
    problem."""
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    unknown = sorted(set(cfg) - {"method", "num_speculative_tokens"})
    if unknown:
        raise argparse.ArgumentTypeError(f"unsupported keys {unknown}: dsv4 drafts with the "
                                         f"model's MTP layer (method and num_speculative_tokens)")
    method = cfg.get("method", "mtp")
    if method not in SPECULATIVE_METHODS:
        raise argparse.ArgumentTypeError(f"method {method!r}: only {list(SPECULATIVE_METHODS)}")
    k = cfg.get("num_speculative_tokens")
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise argparse.ArgumentTypeError(f"num_speculative_tokens must be an integer >= 0, "
                                         f"got {k!r}")
    return k


def _speculative_tokens(args: argparse.Namespace) -> int:
    k, cfg = args.speculative_tokens, getattr(args, "speculative_config", None)
    if cfg is None:
        return k
    if k and k != cfg:
        raise ValueError(f"--speculative-tokens {k} and --speculative-config "
                         f"num_speculative_tokens {cfg} disagree")
    return cfg


def _token_count(text: str) -> int:
    """A token count as vLLM takes one: 65536, 64k or 64K (x1024), 1m or 1M (x1024^2)."""
    t = text.strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20}.get(t[-1:], 1)
    try:
        n = int(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"a token count such as 65536, 64k or 1m, got {text!r}"
                                         ) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return n


def _kv_cache_dtype(text: str) -> str:
    """vLLM's names too: fp8_e4m3 is dsv4's fp8 rows; e5m2 rows would not hold the model's
    values exactly, so they are not offered."""
    if text == "fp8_e4m3":
        return "fp8"
    if text == "fp8_e5m2":
        raise argparse.ArgumentTypeError("fp8_e5m2 rows would round the model's e4m3 values; "
                                         "use fp8 (e4m3, lossless here) or bfloat16")
    return text


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`LLMEngine.from_args(**engine_kwargs(args))` for args parsed with `add_engine_args`."""
    return dict(model=args.model, dtype="bfloat16" if args.dtype == "auto" else args.dtype,
                device=args.device, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                gpu_memory_utilization=args.gpu_memory_utilization,
                cpu_cache_bytes=args.cpu_cache_bytes, skip_tokenizer_init=args.skip_tokenizer_init,
                seed=args.seed, speculative_tokens=_speculative_tokens(args),
                enforce_eager=args.enforce_eager, load_format=args.load_format,
                kv_cache_dtype=args.kv_cache_dtype, cuda_graph_max_len=args.cuda_graph_max_len,
                max_cudagraph_capture_size=args.max_cudagraph_capture_size,
                tensor_parallel_size=args.tensor_parallel_size,
                async_scheduling=args.async_scheduling, warmup=args.warmup,
                enable_prefix_caching=args.enable_prefix_caching, revision=args.revision,
                download_dir=args.download_dir, generation_config=args.generation_config,
                scheduling_policy=args.scheduling_policy, max_logprobs=args.max_logprobs,
                tokenizer=args.tokenizer)


# ---------------------------------------------------------------------------- generate
def _add_generate_cli(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text and stream it to stdout")
    add_engine_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--input-file", type=Path, help="one prompt per line ('-' for stdin)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")
    p.add_argument("--thinking", action="store_true", help="chat in thinking mode")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.set_defaults(func=run_generate)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    text = sys.stdin.read() if str(args.input_file) == "-" else args.input_file.read_text()
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{args.input_file}: no prompts (one per line)")
    return prompts


def run_generate(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Generate for `dsv4 generate` args, streaming completions to `out` (stdout)."""
    from .engine.llm_engine import LLMEngine
    from .engine.sampler import SamplingParams

    out = out or sys.stdout
    prompts = _read_prompts(args)
    engine = LLMEngine.from_args(**engine_kwargs(args))
    if args.chat:
        from .chat import encode_messages

        if engine.tokenizer is None:
            raise ValueError("--chat needs a tokenizer")
        mode = "thinking" if args.thinking else "chat"
        prompts = [{"prompt": p, "prompt_token_ids": engine.tokenizer.encode(
            encode_messages([{"role": "user", "content": p}], mode))} for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)

    # Completions are printed in input order, each streamed as soon as the ones before it are
    # done; later ones keep generating (batched) meanwhile.
    texts, done, shown, current = [""] * len(prompts), [False] * len(prompts), 0, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            i = int(o.request_id)
            texts[i], done[i] = o.outputs[0].text, o.finished
        while current < len(prompts):
            out.write(texts[current][shown:])
            shown = len(texts[current])
            if not done[current]:
                break
            out.write("\n")
            current, shown = current + 1, 0
        out.flush()
    return 0


# ---------------------------------------------------------------------------- main
def _add_optional_cli(subparsers, name: str, module: str, help: str) -> None:
    """Register `name` from `module.add_<name>_cli`; while the module is missing (or cannot be
    imported), the subcommand exists and says why it is unavailable."""
    func_name = f"add_{name.replace('-', '_')}_cli"
    try:
        add = getattr(importlib.import_module(module), func_name)
    except (ImportError, AttributeError) as e:
        # No option prefix: whatever flags follow are swallowed, so the message below is shown.
        p = subparsers.add_parser(name, help=f"{help} (unavailable)", add_help=False,
                                  prefix_chars="\0")
        p.add_argument("rest", nargs="*")
        reason = f"{type(e).__name__}: {e}"
        p.set_defaults(func=lambda args: _unavailable(name, module, reason))
        return
    add(subparsers)


def _unavailable(name: str, module: str, reason: str) -> int:
    print(f"dsv4 {name} is unavailable: {module}.add_{name.replace('-', '_')}_cli could not be "
          f"imported ({reason})", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 inference engine")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate_cli(sub)
    _add_optional_cli(sub, "make-tiny", "dsv4.loader", "write a tiny model directory")
    _add_optional_cli(sub, "serve", "dsv4.server", "OpenAI-compatible HTTP server")
    _add_optional_cli(sub, "bench", "dsv4.bench", "throughput and latency benchmarks")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
