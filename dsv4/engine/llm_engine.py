"""The serving engine: requests in, `RequestOutput`s out, one scheduler step at a time.

Data flows one way: `add_request` -> `Request`/`Sequence` -> `Scheduler` (which tokens run, which
blocks they use) -> `ModelRunner` (model + sampler) -> back here, where tokens are appended,
text is detokenised, stop rules are applied and finished sequences free their cache. The offline
`LLM`, the CLI and the OpenAI server all drive this class.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..cache.block_manager import BlockManager
from ..cache.prefix_cache import PrefixCache, prefix_hashes
from ..cache.kv_cache import BLOCK_TOKENS, ModelCache, block_bytes, slot_bytes
from ..config import (ConfigError, EngineConfig, ModelConfig, PRESETS, resolved_batched_tokens,
                      resolved_max_num_seqs)
from ..distributed import SINGLE, ParallelGroup, check_parallel_config
from ..kernels.compile_watch import CompileWatch
from ..model.init import init_random_
from ..model.parallel import shard_state_dict
from ..model.model import DeepseekV4Model
from ..tokenizer import Tokenizer
from .outputs import EngineStats, Logprob, PositionLogprobs, RequestOutput, RequestOutputKind
from .runner import ModelRunner
from .sampler import (Sampler, SamplingParams, generation_defaults, make_generator,
                      tokenize_bad_words, truncate_prompt)
from .scheduler import Scheduler
from .sequence import PENDING_TOKEN, Request
from .structured import GrammarCompiler, GrammarState, StructuredOutputs

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model: str, dtype: str, device: torch.device, seed: int, skip_tokenizer_init: bool,
               load_format: str, tp: ParallelGroup = SINGLE
               ) -> tuple[DeepseekV4Model, ModelConfig, Tokenizer | None, Any]:
    """A preset name builds a seeded random model in memory (no files, no network); anything
    else must be a model directory, read by `dsv4.loader.load_model`. With tensor parallelism
    each rank gets its slice (`model/parallel.py`)."""
    if model in PRESETS and load_format != "dummy":
        cfg = ModelConfig.preset(model)
        if tp.size == 1:
            with torch.device(device):
                net = DeepseekV4Model(cfg, dtype)
            init_random_(net, seed)
        else:  # the same weights as one process, sliced
            full = init_random_(DeepseekV4Model(cfg, dtype), seed).state_dict()
            with torch.device(device):
                net = DeepseekV4Model(cfg, dtype, tp=tp)
            net.load_state_dict(shard_state_dict(full, cfg, tp))
        tokenizer = None if skip_tokenizer_init else Tokenizer.tiny(cfg.vocab_size)
        return net.eval(), cfg, tokenizer, None
    if model not in PRESETS and not Path(model).exists():
        raise FileNotFoundError(
            f"model {model!r}: no such file or directory, not a preset ({', '.join(PRESETS)}) "
            f"and not a Hugging Face Hub repository (owner/name)")
    try:
        from ..loader import load_model as load_checkpoint
    except ImportError as e:
        raise RuntimeError(f"cannot load {model!r}: the checkpoint loader (dsv4.loader) is not "
                           f"available ({e}); use a preset such as 'tiny'") from e
    loaded = load_checkpoint(model, dtype=dtype, device=device, seed=seed,
                             skip_tokenizer_init=skip_tokenizer_init, load_format=load_format,
                             tp=tp)
    return loaded.model.eval(), loaded.config, loaded.tokenizer, loaded.generation_config


def _cache_salt(prompt: PromptType) -> bytes:
    """A dict prompt's `cache_salt` (vLLM's): prompts resume only from prefixes cached under
    the same salt (tenants that must not learn what others sent, by timing)."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is None:
        return b""
    if not isinstance(salt, str) or not salt:
        raise ValueError(f"cache_salt must be a non-empty string, got {salt!r}")
    return b"salt:" + salt.encode()


def _eos_token_ids(cfg: ModelConfig, generation_config: Any) -> frozenset[int]:
    ids = {cfg.eos_token_id}
    gen = generation_config or {}
    eos = gen.get("eos_token_id") if isinstance(gen, dict) else getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(t) for t in eos)
    return frozenset(ids)


def watch_compiles(engine: "LLMEngine") -> CompileWatch | None:
    """After the warm-up, every Triton compile is a step shape it did not meet, paid inside
    a request: count it (`dsv4:triton_compiles` in /metrics) and log what made it new. The
    engine starts the watch before it captures its graphs and warms up (`_warming` set):
    those compiles are only recorded, so a later one names the argument that differs from
    the nearest variant they made. The watch holds the engine weakly (engines that are
    dropped unclosed stay collectable)."""
    ref = weakref.ref(engine)

    def seen(c) -> None:
        eng = ref()
        if eng is None or eng._warming:
            return
        eng.triton_compiles += 1
        eng.triton_compile_seconds += c.seconds
        logger.warning("Triton compiled %s in %.2f s inside a step (%s): a shape the warm-up "
                       "did not meet", c.kernel, c.seconds,
                       c.new or f"its first variant: {c.constants()}")

    watch = CompileWatch(seen)
    return watch if watch.active else None


def warm_up_lengths(budget: int) -> list[int]:
    """Prompt lengths the warm-up serves one at a time: 2^k + 1 and 3 * 2^(k-1) + 1 below the
    step budget (two per octave, so a launch parameter that changes at a power of two, or
    half-way between two, meets a step on each side of its edge; odd, as most prompts are)."""
    out = set()
    k = 2
    while 2 ** k + 1 < budget:
        out.update(x for x in (2 ** k + 1, 3 * 2 ** (k - 1) + 1) if x < budget)
        k += 1
    return sorted(out)


class LLMEngine:
    """Continuous-batching engine over a paged KV cache sized once, at start-up."""

    def __init__(self, model: DeepseekV4Model, model_config: ModelConfig, tokenizer: Tokenizer | None,
                 engine_config: EngineConfig, generation_config: Any = None):
        engine_config.validate()
        self.model, self.model_config, self.tokenizer = model, model_config, tokenizer
        # the detokenizer's set of special ids: built now, not inside the first request (0.17 s
        # for a tokenizer of 128K added tokens)
        getattr(tokenizer, "special_ids", None)
        self.engine_config = ec = engine_config
        self.device = next(model.parameters()).device
        ec.max_num_seqs = self.max_num_seqs = resolved_max_num_seqs(ec, self.device)
        cfg = model_config

        # Memory: every running sequence holds one slot (window ring + compressor state); the
        # rest of the budget is carved into 128-token blocks of compressed rows.
        margin = max(8, ec.speculative_tokens + 1)
        kv_fp8 = ec.kv_cache_dtype == "fp8" or (ec.kv_cache_dtype == "auto"
                                                 and self._fp8_rows_by_default(model, cfg))
        self.kv_cache_dtype = "fp8" if kv_fp8 else str(model.dtype).removeprefix("torch.")
        per_slot = slot_bytes(cfg, margin, model.dtype, kv_fp8)
        # indexer keys packed as FP4 where the model's QAT makes that lossless
        index_fp4 = model.qat
        per_block = block_bytes(cfg, model.dtype, kv_fp8, index_fp4)
        budget = self._cache_budget()
        # running sequences, then the prefix cache's snapshots: up to max_num_seqs of them, in
        # at most half of what the running sequences' slots leave, so that prefix caching (on
        # by default) never takes most of the blocks that sequences need to run
        snapshots = 0
        if ec.enable_prefix_caching:
            spare = max(0, budget - ec.max_num_seqs * per_slot)
            snapshots = min(ec.max_num_seqs, spare // 2 // max(per_slot, 1))
            if not snapshots:
                logger.info("prefix caching off: a snapshot slot (%.1f MiB) does not fit in "
                            "half of the %.1f MiB the running sequences' slots leave of the "
                            "KV cache budget", per_slot / 2**20, spare / 2**20)
        num_slots = ec.max_num_seqs + snapshots
        fit = (budget - num_slots * per_slot) // max(per_block, 1)
        # More blocks than max_num_seqs sequences of the longest length can never be in use at
        # once: do not take that memory (a tiny model on a big GPU would take it all).
        longest = min(ec.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.num_blocks = min(fit, num_slots * math.ceil(longest / BLOCK_TOKENS))
        if self.num_blocks < 1:
            raise ConfigError(
                f"the KV cache budget of {budget / 2**20:.1f} MiB holds no 128-token block "
                f"({per_block} bytes) after {num_slots} sequence slots of {per_slot} bytes: raise "
                f"{'gpu_memory_utilization' if self.device.type == 'cuda' else 'cpu_cache_bytes'}"
                f" or lower max_num_seqs")
        limit = min(cfg.max_position_embeddings, self.num_blocks * BLOCK_TOKENS)
        if ec.max_model_len is not None and ec.max_model_len > limit:
            raise ConfigError(
                f"max_model_len {ec.max_model_len} exceeds what fits: max_position_embeddings "
                f"{cfg.max_position_embeddings}, KV cache {self.num_blocks * BLOCK_TOKENS} tokens")
        self.max_model_len = ec.max_model_len or limit

        # One slot and one block beyond what the block manager hands out: CUDA-graph padding rows
        # write there and nothing reads them.
        if kv_fp8 and model.dtype != torch.bfloat16:
            raise ConfigError("kv_cache_dtype fp8 needs dtype bfloat16 (its rope dims are bf16)")
        self.cache = ModelCache(cfg, num_slots + 1, self.num_blocks + 1, margin, model.dtype,
                                self.device, kv_fp8=kv_fp8, index_fp4=index_fp4)
        if hasattr(model, "stop"):  # tensor parallel: the workers allocate the same cache
            from ..distributed import enable_one_shot_all_reduce
            from .parallel_workers import share_cache_geometry
            share_cache_geometry(num_slots + 1, self.num_blocks + 1, margin, kv_fp8)
            if enable_one_shot_all_reduce(model.dtype, self.device):
                logger.info("tensor parallel: all-reduces up to 1 MiB through the symmetric-"
                            "memory one-shot kernel (DSV4_TP_ALLREDUCE=nccl: NCCL's ring)")
        self.block_manager = BlockManager(self.num_blocks, num_slots, BLOCK_TOKENS)
        self.prefix_cache = PrefixCache(self.block_manager, snapshots) if snapshots else None
        self.scheduler = Scheduler(self.block_manager, ec.max_num_seqs,
                                   resolved_batched_tokens(ec, self.device),
                                   lookahead=ec.speculative_tokens, prefix_cache=self.prefix_cache,
                                   policy=ec.scheduling_policy)
        self.eos_token_ids = _eos_token_ids(cfg, generation_config)
        # what requests that leave sampling fields out get (vLLM's --generation-config auto)
        self.default_sampling: dict[str, Any] = (
            generation_defaults(generation_config) if ec.generation_config == "auto" else {})
        if self.default_sampling:
            logger.info("default sampling parameters from the model's generation_config.json: "
                        "%s (--generation-config vllm ignores them)", self.default_sampling)
        sampler = Sampler(sorted(self.eos_token_ids), make_generator(ec.seed, self.device))
        if ec.speculative_tokens and not model.mtp:
            raise ConfigError("speculative_tokens needs the model's MTP layer "
                              "(num_nextn_predict_layers = 0 in this config)")
        graphs = None
        # Triton compiles from here on: recorded while `_warming` (graph capture, warm-up),
        # counted and logged after (`watch_compiles`)
        self._warming = self.device.type == "cuda" and ec.warmup
        self._compile_watch = watch_compiles(self) if self._warming else None
        if self.device.type == "cuda" and not ec.enforce_eager:
            from . import cuda_graph
            from .cuda_graph import PREFILL_TOKENS, CUDAGraphRunner
            graph_len = self._graph_len(cfg, ec)
            # the context bands are rank 0's: tensor-parallel workers capture the same ones
            args = dict(max_num_seqs=ec.max_num_seqs, tokens_per_seq=1 + ec.speculative_tokens,
                        max_model_len=graph_len, short_len=cuda_graph.SHORT_LEN,
                        pad_slot=num_slots, pad_block=self.num_blocks,
                        max_prefill_tokens=min(
                            self.scheduler.max_num_batched_tokens,
                            PREFILL_TOKENS[-1] if ec.max_cudagraph_capture_size is None
                            else ec.max_cudagraph_capture_size))
            try:  # tensor parallel: every rank captures its own (`LockstepModel`)
                graphs = (model.capture_graphs(self.cache, **args) if hasattr(model, "stop")
                          else CUDAGraphRunner(model, self.cache, **args))
            except Exception as e:
                # A failed capture leaves the CUDA generator unusable, so no silent fallback.
                raise RuntimeError(
                    f"CUDA graph capture failed ({e}); run with --enforce-eager (enforce_eager="
                    f"True) to serve without graphs, or lower --cuda-graph-max-len (now "
                    f"{graph_len}), max_num_seqs or gpu_memory_utilization") from e
        self.runner = ModelRunner(model, self.cache, sampler, self.device,
                                  ec.speculative_tokens, self.max_model_len, graphs)
        if graphs is not None and ec.speculative_tokens and not hasattr(model, "stop"):
            from .draft_graph import DraftGraphs
            try:  # greedy MTP drafting after a graph step: one more replay
                self.runner.draft_graphs = DraftGraphs(graphs, ec.speculative_tokens)
            except Exception as e:  # noqa: BLE001 - drafts only set the speed, never the output
                logger.warning("CUDA graph capture of the MTP drafting failed (%s): drafting "
                               "runs eagerly", e)

        self.requests: dict[str, Request] = {}
        # Async scheduling; under tensor parallelism only with CUDA graphs (`overlappable`: the
        # workers replay with rank 0's device-sampled ids). May be switched between steps
        # (benchmarks compare both on one engine).
        self.async_scheduling = ec.async_scheduling and (not self.runner.lockstep
                                                         or graphs is not None)
        self._pending = None  # the decode step launched ahead of the host (StepHandle)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.triton_compiles, self.triton_compile_seconds = 0, 0.0
        self._grammars: GrammarCompiler | None = None  # structured outputs, on first use
        self._token_text: dict[int, str] = {}

        concurrent = min(ec.max_num_seqs, self.num_blocks // math.ceil(self.max_model_len / BLOCK_TOKENS))
        self.capacity = (f"KV cache: {self.num_blocks} blocks, max {self.max_model_len} tokens per "
                         f"sequence, {concurrent} concurrent sequences at {self.max_model_len} tokens")
        used = num_slots * per_slot + self.num_blocks * per_block
        logger.info("%s (%s attention rows; %.1f MiB of a %.1f MiB budget on %s)", self.capacity,
                    self.kv_cache_dtype, used / 2**20, budget / 2**20, self.device)
        if snapshots:
            logger.info("prefix caching: up to %d cached prompt prefixes (snapshots of %.1f MiB "
                        "each, %.1f MiB in all)", snapshots, per_slot / 2**20,
                        snapshots * per_slot / 2**20)
        if self.device.type == "cuda":
            from ..kernels.moe_grouped_mm import policy
            from ..kernels.pdl import launch_policy
            from ..kernels.side_stream import side_stream_policy
            moe = policy(cfg.n_routed_experts, cfg.num_experts_per_tok)
            side = side_stream_policy()
            logger.info("GPU kernels: %s%s%s", launch_policy(), f"; {side}" if side else "",
                        f"; {moe}" if moe else "")
            if ec.warmup:
                self.warm_up()
                self._warming = False

    def warm_up(self) -> None:
        """Compile the Triton kernels of the step shapes serving will meet, before the first
        request rather than inside it (each new shape costs a compile of 0.2-3 s a kernel on a
        cold cache; a first request could wait 10 s). Serves and forgets: two prompts that fill
        the step budget (one of budget - 3 tokens and one of budget, 2 tokens each: a full
        prefill step, then the rest of the second prompt beside the first one's decode, then
        decodes; a step of `max_num_batched_tokens` is thus known to fit beside the KV cache),
        then one prompt at a time of each length on `warm_up_lengths`: the kernels' launch
        parameters follow the tokens of a step in power-of-two bands (where `max_model_len`
        is shorter than the step budget, those steps are made of several prompts, as serving
        will make them: the full-budget step too); then each of those
        lengths again as the second chunk of a prompt (budget + length tokens): the same bands
        of tokens at a context of a full chunk (top-k over more candidates than it keeps,
        the few-token steps of a conversation's next turn); then one long prompt
        (5 x the budget where the context and the blocks allow: 40961 tokens at a budget of
        8192), whose later chunks meet the widths of long contexts (top-k over more than 8192
        candidates); last, 12, 16 and 24 short prompts at once (steps that sample that many
        rows, as ragged steps beside decodes do). Every stage runs eagerly, CUDA graphs set
        aside: the graphs compiled their kernels when they were captured, and the eager
        kernels of the same token bands serve the steps that do not replay a graph (prompt
        log-probs, a short turn past the prefill graphs' context, contexts past the decode
        graphs')."""
        budget = self.scheduler.max_num_batched_tokens
        n = min(budget, self.max_model_len - 2)
        if n < 8 or self.requests:
            return
        logger.info("warming up: prefill steps of up to %d tokens (Triton compiles their kernels "
                    "on first use: minutes on a machine that never has, seconds after)", budget)
        t0 = time.perf_counter()
        vocab = self.model_config.vocab_size

        def serve(prompts, max_tokens):
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            for i, length in enumerate(prompts):
                self.add_request(f"__warmup-{length}-{i}", [(7 * j + i + length) % (vocab - 3) + 3
                                                            for j in range(length)], params)
            while self.has_unfinished_requests():
                self.step()

        cap = min(self.max_model_len - 1,  # in half the free blocks
                  self.block_manager.num_free_blocks // 2 * BLOCK_TOKENS - 1)
        longest = min(5 * n + 1, cap)
        seqs = self.scheduler.max_num_seqs

        def prompts_of(total: int, most: int) -> tuple[int, ...]:
            # a step of `total` tokens: one prompt, or, past `most` tokens, as many prompts of
            # `most` as it takes (and max_num_seqs allows) in one step
            if total <= n:
                return (total,)
            return tuple(([most] * (total // most) + ([total % most] if total % most else []))
                         [:seqs])

        # several prompts a step: the full one of the longest prompts, the ladder's of prompts
        # of a multiple of 64 tokens (as benchmarks send: their lists' widths, a multiple of
        # 16, are launch arguments Triton compiles variants for)
        filler = n - n % 64 if n >= 64 else n
        full = ((n - 3, n) if n == budget else prompts_of(budget, n), 2)
        stages = ([full] + [(prompts_of(length, filler), 1) for length in warm_up_lengths(budget)]
                  + [((n + length,), 1) for length in warm_up_lengths(n) if n + length <= cap]
                  + ([((longest,), 1)] if longest > n else [])
                  # steps that sample several rows: the head's mix (`hc_head`) launches one
                  # program shape up to 8 rows, another for 9-15, and one with the final norm
                  # fused from 16 (Triton specialising multiples of 16), each with and without
                  # PDL (steps of up to 64 tokens): 12, 16 and 24 prompts of 2 tokens and of 6
                  + [((k,) * r, 2) for r in (12, 16, 24) if r <= seqs for k in (2, 6)])
        runner = self.runner
        graphs, drafts = runner.graphs, runner.draft_graphs
        runner.graphs = runner.draft_graphs = None
        try:
            # minutes on a cold Triton cache: a progress bar where stderr is a terminal
            for prompts, max_tokens in tqdm(stages, desc="warm-up", unit="shape",
                                            disable=not sys.stderr.isatty(), leave=False):
                serve(prompts, max_tokens)
        except torch.OutOfMemoryError as e:
            raise ConfigError(
                f"a prefill step of {budget} tokens does not fit in the GPU memory left beside "
                f"the model and the KV cache ({str(e).splitlines()[0]}): lower "
                f"max_num_batched_tokens or gpu_memory_utilization") from e
        finally:
            runner.graphs, runner.draft_graphs = graphs, drafts
        self.prompt_tokens_total = self.generation_tokens_total = 0
        self.scheduler.num_preemptions = 0
        if self.prefix_cache is not None:  # the warm-up prompts are nobody's prefixes
            self.prefix_cache.clear()
            self.prefix_cache.queries = self.prefix_cache.hits = 0
        if self.runner.proposer is not None:
            self.runner.proposer.reset_stats()
        logger.info("warmed up prefill steps of up to %d tokens in %.1f s", budget,
                    time.perf_counter() - t0)

    @classmethod
    def from_args(cls, model: str, *, dtype: str = "bfloat16", device: str | None = None,
                  max_model_len: int | None = None, max_num_seqs: int | None = None,
                  max_num_batched_tokens: int | None = None,
                  gpu_memory_utilization: float = 0.9,
                  cpu_cache_bytes: int = 256 << 20, skip_tokenizer_init: bool = False, seed: int = 0,
                  speculative_tokens: int = 0, enforce_eager: bool = False,
                  load_format: str = "auto", kv_cache_dtype: str = "auto",
                  cuda_graph_max_len: int | None = None,
                  max_cudagraph_capture_size: int | None = None, tensor_parallel_size: int = 1,
                  async_scheduling: bool = True, warmup: bool = True,
                  enable_prefix_caching: bool = True, revision: str | None = None,
                  download_dir: str | None = None, generation_config: str = "auto",
                  scheduling_policy: str = "fcfs", max_logprobs: int = 20,
                  tokenizer: str | None = None) -> "LLMEngine":
        """`model`: a preset (random weights), a checkpoint directory, or a Hugging Face Hub
        repository `owner/name` (at `revision`, cached in `download_dir`: `loader/hub.py`).
        `tokenizer`: a directory or Hub repository to take the tokenizer files from instead
        of the model's (vLLM's `--tokenizer`)."""
        ec = EngineConfig(dtype=dtype, device=device, max_model_len=max_model_len,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          gpu_memory_utilization=gpu_memory_utilization,
                          cpu_cache_bytes=cpu_cache_bytes, speculative_tokens=speculative_tokens,
                          enforce_eager=enforce_eager, seed=seed, kv_cache_dtype=kv_cache_dtype,
                          cuda_graph_max_len=cuda_graph_max_len,
                          max_cudagraph_capture_size=max_cudagraph_capture_size,
                          async_scheduling=async_scheduling, warmup=warmup,
                          enable_prefix_caching=enable_prefix_caching,
                          generation_config=generation_config,
                          scheduling_policy=scheduling_policy, max_logprobs=max_logprobs)
        ec.validate()  # before the (possibly long) model load
        from ..loader.hub import resolve_model
        # a Hub name -> its directory (for dummy weights without the weight files)
        model = resolve_model(model, revision, download_dir, weights=load_format != "dummy")
        dev = torch.device(device) if device else default_device()
        tok_dir = None
        if tokenizer is not None and not skip_tokenizer_init:
            tok_dir = resolve_model(tokenizer, None, download_dir, weights=False)
        if tensor_parallel_size > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return cls._from_args_parallel(model, ec, dev, skip_tokenizer_init, load_format,
                                           tensor_parallel_size, tok_dir)
        net, cfg, tok, gen = load_model(model, dtype, dev, seed, skip_tokenizer_init, load_format)
        if tok_dir:
            from ..loader import load_tokenizer
            tok = load_tokenizer(tok_dir, cfg)
        return cls(net, cfg, tok, ec, gen)

    @classmethod
    def _from_args_parallel(cls, model: str, ec: EngineConfig, dev: torch.device,
                            skip_tokenizer_init: bool, load_format: str, size: int,
                            tok_dir: str | None = None) -> "LLMEngine":
        """Tensor-parallel attention + expert-parallel MoE over `size` ranks; this process is
        rank 0 (parallel_workers.py). Under torchrun, ranks > 0 serve as workers and never
        return."""
        from . import parallel_workers as pw
        cfg = ModelConfig.preset(model) if model in PRESETS else ModelConfig.from_json(model)
        kwargs = dict(dtype=ec.dtype, seed=ec.seed, load_format=load_format, device=dev.type)
        if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:  # torchrun
            from ..distributed import init_from_env
            tp = init_from_env()
            check_parallel_config(cfg, tp.size)
            if dev.type == "cuda":
                dev = torch.device("cuda", torch.cuda.current_device())
            if tp.rank != 0:
                pw.run_worker(model, kwargs, dev, tp, load_model)
                raise SystemExit(0)
            procs = []
        else:
            check_parallel_config(cfg, size)
            procs, port = pw.spawn_workers(size, model, kwargs)
            if dev.type == "cuda":
                dev = torch.device("cuda", 0)
            tp = pw.init_group(0, size, port, dev.type)
        net, cfg, tokenizer, gen = load_model(model, ec.dtype, dev, ec.seed, skip_tokenizer_init,
                                              load_format, tp)
        if tok_dir:
            from ..loader import load_tokenizer
            tokenizer = load_tokenizer(tok_dir, cfg)
        engine = cls(pw.LockstepModel(net.eval()), cfg, tokenizer, ec, gen)
        engine._workers = procs
        return engine

    def close(self) -> None:
        """Stop the worker ranks of a tensor-parallel engine, and the compile watch."""
        if getattr(self, "_compile_watch", None) is not None:
            self._compile_watch.close()
        stop = getattr(self.model, "stop", None)
        if stop is not None and not getattr(self, "_closed", False):
            self._closed = True
            stop()
            self.runner.graphs = self.runner.draft_graphs = None
            from .parallel_workers import leave_group
            leave_group()
            for p in getattr(self, "_workers", []):
                p.join(timeout=30)

    def _fp8_rows_by_default(self, model, cfg) -> bool:
        """kv_cache_dtype auto: packed FP8 attention rows on CUDA wherever they are lossless
        (bf16 with the model's QAT, which rounds those dims to e4m3 with power-of-two scales)
        and the row layout fits (`kv_fp8.py`); the working dtype otherwise."""
        D, r = cfg.head_dim, cfg.qk_rope_head_dim
        return (self.device.type == "cuda" and model.dtype == torch.bfloat16 and model.qat
                and (D - r) % 64 == 0 and (D - r) % r == 0)

    def _graph_len(self, cfg, ec) -> int:
        """The context length the decode graphs serve: cuda_graph_max_len if set, else all of
        max_model_len as long as the graphs' context-wide lists take at most half the memory
        left after the cache (halving it until they do; longer contexts then decode eagerly)."""
        from .cuda_graph import fit_graph_len, graph_list_bytes, graph_tokens
        if ec.cuda_graph_max_len is not None:
            return min(self.max_model_len, ec.cuda_graph_max_len)
        tokens = graph_tokens(ec.max_num_seqs, ec.speculative_tokens)
        free = torch.cuda.mem_get_info(self.device)[0]
        n = fit_graph_len(cfg.compress_ratios, tokens, self.max_model_len, free // 2)
        if n < self.max_model_len:
            logger.warning(
                "CUDA graphs serve contexts up to %d of max_model_len %d tokens: lists for all "
                "of it would take %.1f GiB of the %.1f GiB left after the KV cache; longer "
                "contexts decode eagerly (set cuda_graph_max_len, or lower "
                "gpu_memory_utilization or max_num_seqs)", n, self.max_model_len,
                graph_list_bytes(cfg.compress_ratios, tokens, self.max_model_len) / 2**30,
                free / 2**30)
        return n

    def _cache_budget(self) -> int:
        if self.device.type == "cuda":
            # blocks this process's allocator caches but no tensor holds (an earlier engine's,
            # say) are free memory for this budget, as in vLLM
            gc.collect()
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            return int(self.engine_config.gpu_memory_utilization * total) - (total - free)
        return self.engine_config.cpu_cache_bytes

    # ------------------------------------------------------------------ requests
    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._prompt_ids(list(prompt["prompt_token_ids"]))[1]
            if "prompt" in prompt:
                return self._prompt_ids(prompt["prompt"])
            raise ValueError("a dict prompt needs 'prompt_token_ids' or 'prompt'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompt given but the engine has no tokenizer "
                                 "(skip_tokenizer_init, or no tokenizer files in the model "
                                 "directory): pass token ids instead")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, "
                         f"got {type(prompt).__name__}")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: float | None = None, priority: int = 0) -> None:
        """Queue a request. Everything is validated here, before the engine's state is touched:
        a bad request raises ValueError and leaves the other requests running. `priority`
        (scheduling_policy "priority" only): lower runs first."""
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if priority and self.engine_config.scheduling_policy != "priority":
            raise ValueError(f"priority {priority} needs the priority scheduling policy "
                             f"(--scheduling-policy priority); this engine serves first come "
                             f"first served")
        text, ids = self._prompt_ids(prompt)
        salt = _cache_salt(prompt)
        if params.truncate_prompt_tokens is not None:
            kept = truncate_prompt(ids, params.truncate_prompt_tokens, self.max_model_len)
            text, ids = (text if len(kept) == len(ids) else None), kept
        if not ids:
            raise ValueError("prompt is empty: at least one token is needed")
        V = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids out of the vocabulary [0, {V}): {bad[:8]}")
        P, L = len(ids), self.max_model_len
        if P >= L or (params.max_tokens is not None and P + params.max_tokens > L):
            raise ValueError(f"prompt of {P} tokens with max_tokens={params.max_tokens} does not fit "
                             f"max_model_len={L}: prompt + max_tokens must be at most {L} "
                             f"(and the prompt shorter than {L})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids instead")
        if params.stop and not params.detokenize:
            raise ValueError("stop strings need detokenize=True (they match the text); use "
                             "stop_token_ids instead")
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError("bad_words need a tokenizer; use logit_bias instead")
            params.bad_words_token_ids = tokenize_bad_words(
                params.bad_words, lambda t: self.tokenizer.encode(t, add_special_tokens=False))
        most = self.engine_config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(params, name)
            if n is not None and n > V:
                raise ValueError(f"{name}={n} exceeds the vocabulary size {V}")
            if n is not None and most >= 0 and n > most:
                raise ValueError(f"{name}={n} exceeds max_logprobs={most} (the engine's "
                                 f"--max-logprobs; -1 allows up to the vocabulary)")
        for name in ("logit_bias", "allowed_token_ids"):
            bad = [t for t in getattr(params, name) or () if t >= V]
            if bad:
                raise ValueError(f"{name} token ids out of the vocabulary [0, {V}): {bad[:8]}")
        grammar = None
        if params.structured_outputs is not None:
            so = params.structured_outputs
            grammar, so.compiled = so.compiled or self.compile_structured(so), None
        req = Request(request_id, text, ids, params, arrival_time, self.tokenizer, self.device)
        req.cache_salt, req.priority = salt, priority
        if grammar is not None:
            for i, seq in enumerate(req.seqs):
                seq.grammar = grammar if i == 0 else grammar.copy()
        self.requests[request_id] = req
        for seq in req.seqs:
            self.scheduler.add(seq)

    def compile_structured(self, spec: StructuredOutputs) -> GrammarState:
        """A structured-output request's matcher (ValueError naming the problem: no tokenizer,
        a grammar that does not compile). Safe to call from another thread (llguidance
        compiles without the GIL): the server compiles there and hands the result over in
        `spec.compiled`, so a large schema does not stall the engine's steps. With speculative
        decoding the constrained sequences decode without drafts (`ModelRunner.run`)."""
        if self.tokenizer is None:
            raise ValueError("structured outputs need a tokenizer (the engine was started "
                             "with skip_tokenizer_init)")
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer.backend.to_str(),
                                             self.model_config.vocab_size,
                                             sorted(self.eos_token_ids))
        return GrammarState(self._grammars.matcher(spec), spec.start_after)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its cache; an unknown or finished id is ignored."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish("abort")
                self.scheduler.finish(seq)
        req.metrics.finished_time = time.time()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns the outputs of requests that got a token or finished.
        With async scheduling a decode step is launched before the previous one's tokens are
        read, and a call returns the previous step's outputs (the first call of a run of decode
        steps returns none)."""
        if self.async_scheduling or self._pending is not None:
            return self._step_async()
        sched = self._schedule()
        if not sched.chunks:
            return []
        start = time.time()
        return self._process(sched.chunks, self._run(sched.chunks), start)

    def _schedule(self):
        sched = self.scheduler.schedule()
        if not sched.chunks and self.scheduler.has_unfinished():
            # cannot happen: an empty cache fits any request
            raise RuntimeError("the scheduler could not schedule any of the queued requests")
        if sched.copies:  # resumed prefixes: their snapshots into the sequences' slots
            self._copy_slots(sched.copies)
        if self.prefix_cache is not None:
            self._take_snapshots(sched.chunks)
        return sched

    def _run(self, chunks):
        """Run a step on the host's tokens."""
        return self.runner.run(chunks)

    def _take_snapshots(self, chunks) -> None:
        """Prefix caching: a chunk that crosses cache points of its sequence caches the prefix
        at each, P: the entry's snapshot slot takes a copy of the sequence's slot now, before
        the step, and the step's ring writes add the chunk's rows up to P (`SeqChunk.snapshots`),
        so the slot holds the state at P without the chunk having to end there."""
        copies = []
        for c in chunks:
            seq, end = c.seq, c.start + c.num_tokens - c.num_drafts
            while seq.cache_points and seq.cache_points[0][0] <= end:
                point, name = seq.cache_points.pop(0)
                to = self.prefix_cache.insert(name, c.block_table[:point // BLOCK_TOKENS], c.slot)
                if to is not None:
                    copies.append((c.slot, to))
                    c.snapshots.append((point, to))
        if copies:
            self._copy_slots(copies)

    def _cache_tail(self, seq, copies: list[tuple[int, int]]) -> None:
        """Prefix caching of generated text: once a sequence's computed tokens cross a block
        boundary P beyond its prompt's, it keeps an entry at P (replacing its previous one).
        Taken now, with the tokens on the host, while the slot still holds P's state (within
        the rings' margin; `prefix_cache.py`): appends the copy into the entry's slot, which
        the caller runs before any slot changes hands."""
        if seq.chain is None or seq.cache_points:
            return
        done, name = seq.chain
        j = seq.num_computed // BLOCK_TOKENS
        if j <= done or PENDING_TOKEN in seq.token_ids[done * BLOCK_TOKENS:j * BLOCK_TOKENS]:
            return
        seq.chain = (j, prefix_hashes(seq.token_ids, BLOCK_TOKENS, j, done, name)[-1])
        if seq.num_computed - j * BLOCK_TOKENS >= self.cache.margin:
            return  # moved on too far (cannot happen one or two steps after the crossing)
        to = self.prefix_cache.insert(seq.chain[1],
                                      self.block_manager.block_table(seq.seq_id)[:j],
                                      self.block_manager.slot(seq.seq_id))
        if to is None:
            return
        copies.append((self.block_manager.slot(seq.seq_id), to))
        if seq.tail_name is not None:
            self.prefix_cache.remove(seq.tail_name)
        seq.tail_name = seq.chain[1]

    def _copy_slots(self, pairs: list[tuple[int, int]]) -> None:
        if self.runner.lockstep:
            self.model.copy_slots(self.cache, pairs)
        else:
            self.cache.copy_slots(pairs)

    def _step_async(self) -> list[RequestOutput]:
        """Async scheduling. While a launched decode step runs, the next one is scheduled and
        launched (its input tokens come from the running step's sampled ids, on the device),
        and only then are the running step's tokens read and processed. A sequence that
        finishes on a token it was already scheduled past wastes that one step's row. Steps
        that need the host's view of the tokens (prefill, penalties, logprobs, min_tokens,
        MTP) and new requests wait for the tokens and run synchronously."""
        pending, self._pending = self._pending, None
        if pending is None:
            sched = self._schedule()
            if not sched.chunks:
                return []
            start = time.time()
            if (self.scheduler.waiting or not self.runner.overlappable(sched.chunks)
                    or all(self._ends_by_length(c.seq) for c in sched.chunks)):
                return self._process(sched.chunks, self._run(sched.chunks), start)
            self._launch(sched.chunks, None, start)
            return []
        nxt = self._schedule_ahead(pending)
        if nxt is not None:
            self._launch(nxt, pending, time.time())
        return self._process(pending.chunks, pending.result(), pending.start, accounted=True)

    def _launch(self, chunks, feed, start: float) -> None:
        handle = self.runner.launch(chunks, feed)
        for c in chunks:  # counted now: the next step is scheduled before these are read
            c.seq.num_computed += c.num_tokens
        handle.start = start
        self._pending = handle

    def _schedule_ahead(self, pending):
        """Decode chunks for the running sequences, each one token past `pending`'s, or None
        when the step must wait for `pending`'s tokens."""
        live = [c.seq for c in pending.chunks if not c.seq.is_finished]
        running = self.scheduler.running
        if (not self.async_scheduling or self.scheduler.waiting or len(live) != len(running)
                or set(map(id, live)) != set(map(id, running))):
            return None
        ahead = [s for s in live if not self._ends_by_length(s)]
        if not ahead:
            return None
        for s in ahead:
            s.token_ids.append(PENDING_TOKEN)
        chunks = self.scheduler.schedule_decode(ahead)
        if chunks is None or not self.runner.overlappable(chunks):
            for s in ahead:
                s.token_ids.pop()
            return None
        return chunks

    def _ends_by_length(self, seq) -> bool:
        """Whether the token being sampled for `seq` ends it by max_tokens or the context
        limit (nothing to schedule past it)."""
        p = seq.params
        return ((p.max_tokens is not None and seq.num_output_tokens + 1 >= p.max_tokens)
                or len(seq.token_ids) + 1 >= self.max_model_len)

    def _process(self, chunks, result, start: float, accounted: bool = False
                 ) -> list[RequestOutput]:
        """Apply a step's sampled tokens; `accounted`: the chunks' positions were counted as
        computed when the step was launched."""
        now = time.time()
        touched: dict[str, Request] = {}
        tails: list[tuple[int, int]] = []  # snapshot copies of generated prefixes
        for chunk, toks, plp in zip(chunks, result.sampled, result.prompt_logprobs):
            seq, req = chunk.seq, chunk.seq.request
            if seq.is_finished:  # finished or aborted while this step ran ahead
                continue
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = start
                self.prompt_tokens_total += len(req.prompt_token_ids)
            # A verified chunk keeps the positions of its accepted drafts; the rest of its cache
            # rows are rolled back by not counting them (kv_cache.py).
            if not accounted:
                seq.num_computed += chunk.num_tokens - chunk.num_drafts + (
                    len(toks) - 1 if chunk.num_drafts else 0)
            text = req.params.detokenize
            if plp:
                req.prompt_logprobs.extend(
                    self._position_logprobs(t.token_id, t.logprob, t.rank, t.top, text)
                    for t in plp)
            if not toks:
                continue
            for tok in toks:
                top = (self._position_logprobs(tok.token_id, tok.logprob, tok.rank, tok.top, text)
                       if seq.logprobs is not None else None)
                seq.append_token(tok.token_id, tok.logprob, top, self.eos_token_ids,
                                 self.max_model_len)
                self.generation_tokens_total += 1
                if seq.is_finished:
                    break
            req.metrics.first_token_time = req.metrics.first_token_time or now
            req.metrics.last_token_time = now
            touched[req.request_id] = req
            if self.prefix_cache is not None:
                self._cache_tail(seq, tails)
            if seq.is_finished:
                self.scheduler.finish(seq)
        if tails:
            self._copy_slots(tails)
        outputs = []
        for req in touched.values():
            if req.finished:
                req.metrics.finished_time = now
                del self.requests[req.request_id]
            elif req.params.output_kind == RequestOutputKind.FINAL_ONLY:
                continue  # no per-step copy of what it has so far
            outputs.append(req.output())
        return outputs

    def _decode_token(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        if token_id not in self._token_text:
            self._token_text[token_id] = self.tokenizer.decode([token_id])
        return self._token_text[token_id]

    def _position_logprobs(self, token_id: int, logprob: float, rank: int,
                           top: list[tuple[int, float]] | None,
                           text: bool = True) -> PositionLogprobs:
        """vLLM's per-position dict: the chosen token first, then the top-N by rank (their
        `decoded_token` None without `text`: detokenize=False)."""
        name = self._decode_token if text else (lambda t: None)
        d = {token_id: Logprob(logprob, rank, name(token_id))}
        for r, (t, lp) in enumerate(top or [], 1):
            if t not in d:
                d[t] = Logprob(lp, r, name(t))
        return d

    def spec_stats(self) -> dict | None:
        """Speculative decoding: acceptance rate per draft position and mean accepted length
        (tokens emitted per verification, bonus included); None when disabled."""
        p = self.runner.proposer
        return p.stats() if p is not None else None

    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage, num_free_blocks=bm.num_free_blocks, num_blocks=bm.num_blocks,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.prefix_cache.queries if self.prefix_cache else 0,
            prefix_cache_hits=self.prefix_cache.hits if self.prefix_cache else 0,
            triton_compiles=self.triton_compiles,
            triton_compile_seconds=self.triton_compile_seconds,
            **self._spec_counts())

    def _spec_counts(self) -> dict:
        p = self.runner.proposer
        if p is None:
            return {}
        return dict(spec_proposed=tuple(p.proposed), spec_accepted=tuple(p.accepted),
                    spec_verify_steps=p.verify_steps)
