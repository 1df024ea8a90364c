"""Model and engine configuration.

`ModelConfig` reads the Hugging Face `config.json` keys of DeepSeek-V4 (SPEC.md section 1) and
validates them once, with errors that name the key and the bad value.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VALID_RATIOS = (0, 4, 128)
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")


class ConfigError(ValueError):
    """A config.json value is missing or invalid; the message names the key."""


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_hash_layers: int = 3
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_lora_rank: int = 1024
    o_groups: int = 8
    sliding_window: int = 128
    compress_ratios: list[int] = field(default_factory=lambda: [0, 0] + [4, 128] * 20 + [4, 0])
    compress_rope_theta: float = 160000.0
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default_factory=lambda: {
        "type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
        "beta_fast": 32, "beta_slow": 1})
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 0
    eos_token_id: int = 1
    max_position_embeddings: int = 1048576
    expert_dtype: str | None = "fp4"
    quantization_config: dict | None = field(default_factory=lambda: {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
        "scale_fmt": "ue8m0", "activation_scheme": "dynamic"})
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_json(cls, src: str | Path | dict) -> "ModelConfig":
        """Build from a `config.json` path, a model directory, or an already-parsed dict."""
        if isinstance(src, dict):
            data = dict(src)
        else:
            path = Path(src)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path} must hold a JSON object, found {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        cfg = cls(**kwargs, extra=extra)
        cfg.validate()
        return cfg

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """Published `flash` and `pro` sizes, or the CPU-sized `tiny` test model."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        cfg = cls(**PRESETS[name]())
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(d.pop("extra"))
        d["architectures"] = ["DeepseekV4ForCausalLM"]
        d["model_type"] = "deepseek_v4"
        return d

    def replace(self, **changes) -> "ModelConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_layers_total(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def weight_format(self) -> str:
        """Storage format of the checkpoint's linears: bf16, fp8 or nvfp4."""
        q = self.quantization_config or {}
        if str(q.get("quant_algo", "")).upper() == "NVFP4" or \
                str(q.get("quant_method", "")).lower() == "modelopt":
            return "nvfp4"
        if str(q.get("quant_method", "")).lower() == "fp8":
            return "fp8"
        return "bf16"

    def ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(key: str, value: Any, why: str) -> None:
            raise ConfigError(f"config key {key!r} = {value!r}: {why}")

        for key in ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "head_dim", "q_lora_rank", "o_lora_rank", "o_groups",
                    "sliding_window", "index_n_heads", "index_head_dim", "index_topk",
                    "n_routed_experts", "num_experts_per_tok", "hc_mult", "hc_sinkhorn_iters"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(key, v, "must be a positive integer")
        for key in ("num_hash_layers", "num_nextn_predict_layers", "qk_rope_head_dim"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                fail(key, v, "must be a non-negative integer")
        if self.num_key_value_heads != 1:
            fail("num_key_value_heads", self.num_key_value_heads,
                 "DeepSeek-V4 shares one latent key/value head across all heads; must be 1")
        if self.n_shared_experts != 1:
            fail("n_shared_experts", self.n_shared_experts, "must be 1")
        if not isinstance(self.compress_ratios, list):
            fail("compress_ratios", self.compress_ratios, "must be a list of integers")
        if len(self.compress_ratios) != self.num_layers_total:
            fail("compress_ratios", self.compress_ratios,
                 f"has {len(self.compress_ratios)} entries but num_hidden_layers + "
                 f"num_nextn_predict_layers = {self.num_layers_total}")
        for i, m in enumerate(self.compress_ratios):
            if m not in VALID_RATIOS:
                fail(f"compress_ratios[{i}]", m, f"ratio must be one of {VALID_RATIOS}")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim == 0:
            fail("qk_rope_head_dim", self.qk_rope_head_dim, "must be a positive even number")
        if self.head_dim <= self.qk_rope_head_dim:
            fail("head_dim", self.head_dim,
                 f"must be larger than qk_rope_head_dim ({self.qk_rope_head_dim})")
        if self.nope_dim % 64:
            fail("head_dim", self.head_dim,
                 "head_dim - qk_rope_head_dim must be a multiple of 64 (FP8 KV blocks of 64)")
        if self.index_head_dim <= self.qk_rope_head_dim:
            fail("index_head_dim", self.index_head_dim,
                 f"must be larger than qk_rope_head_dim ({self.qk_rope_head_dim})")
        for key in ("head_dim", "index_head_dim"):
            v = getattr(self, key)
            if v & (v - 1):
                fail(key, v, "must be a power of two (Hadamard transform / FP4 blocks of 32)")
        if self.index_head_dim % 32:
            fail("index_head_dim", self.index_head_dim, "must be a multiple of 32")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            fail("o_groups", self.o_groups,
                 f"must divide num_attention_heads * head_dim = "
                 f"{self.num_attention_heads * self.head_dim}")
        if self.num_hash_layers > self.num_hidden_layers:
            fail("num_hash_layers", self.num_hash_layers,
                 f"more hash layers than layers ({self.num_hidden_layers})")
        if self.num_experts_per_tok > self.n_routed_experts:
            fail("num_experts_per_tok", self.num_experts_per_tok,
                 f"top-k larger than n_routed_experts ({self.n_routed_experts})")
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", self.scoring_func, f"must be one of {SCORING_FUNCS}")
        if self.expert_dtype not in (None, "fp4", "fp8", "bf16"):
            fail("expert_dtype", self.expert_dtype, "must be 'fp4' or absent")
        if self.swiglu_limit < 0:
            fail("swiglu_limit", self.swiglu_limit, "must be >= 0 (0 disables the clamp)")
        if not (0 < self.rms_norm_eps < 1):
            fail("rms_norm_eps", self.rms_norm_eps, "must be in (0, 1)")
        if self.routed_scaling_factor <= 0:
            fail("routed_scaling_factor", self.routed_scaling_factor, "must be positive")
        for key in ("rope_theta", "compress_rope_theta"):
            if getattr(self, key) <= 0:
                fail(key, getattr(self, key), "must be positive")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("type", rs.get("rope_type"))
            if kind != "yarn":
                fail("rope_scaling.type", kind, "only 'yarn' is supported")
            for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
                if k not in rs:
                    fail(f"rope_scaling.{k}", None, "missing")
                if not isinstance(rs[k], (int, float)) or rs[k] <= 0:
                    fail(f"rope_scaling.{k}", rs[k], "must be a positive number")
        if any(m == 4 for m in self.compress_ratios) and self.index_n_heads < 1:
            fail("index_n_heads", self.index_n_heads, "CSA layers need indexer heads")
        if self.weight_format in ("fp8", "nvfp4"):
            for key in ("hidden_size", "q_lora_rank", "moe_intermediate_size"):
                if getattr(self, key) % 32:
                    fail(key, getattr(self, key), "quantised checkpoints need multiples of 32")
        if self.bos_token_id >= self.vocab_size or self.eos_token_id >= self.vocab_size:
            fail("eos_token_id", self.eos_token_id, f"must be < vocab_size ({self.vocab_size})")



def _flash() -> dict:
    return {}


def _pro() -> dict:
    return dict(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
                o_groups=16, n_routed_experts=384, moe_intermediate_size=3072, index_topk=1024,
                routed_scaling_factor=2.5,
                compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0])


def _tiny() -> dict:
    # Five layers cover every attention kind: SWA, CSA (m=4), HCA (m=128), hash and dense MoE,
    # and a CSA MTP layer. head_dim 128 keeps the 64-wide FP8 KV blocks and a power-of-two size.
    return dict(vocab_size=512, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
                num_hash_layers=1, num_nextn_predict_layers=1, num_attention_heads=4,
                head_dim=128, qk_rope_head_dim=64, q_lora_rank=32, o_lora_rank=32, o_groups=2,
                sliding_window=8, compress_ratios=[0, 4, 128, 4, 4], index_n_heads=2,
                index_head_dim=128, index_topk=4, n_routed_experts=8, num_experts_per_tok=2,
                routed_scaling_factor=1.5, hc_mult=4, hc_sinkhorn_iters=20,
                rope_scaling={"type": "yarn", "factor": 16,
                              "original_max_position_embeddings": 256,
                              "beta_fast": 32, "beta_slow": 1},
                max_position_embeddings=4096, quantization_config=None, expert_dtype=None)


PRESETS = {"flash": _flash, "pro": _pro, "tiny": _tiny}


@dataclass
class EngineConfig:
    """How the engine runs a model (not what the model is)."""
    dtype: str = "bfloat16"
    device: str | None = None
    max_model_len: int | None = None
    # sequences in one step; None: 256 on a GPU with at least 70 GiB, else 64
    # (`resolved_max_num_seqs`)
    max_num_seqs: int | None = None
    # tokens in one step (the chunked-prefill budget); None: 8192 on a GPU with at least 70 GiB
    # (as vLLM's server on H100 / H200), else 2048 (`resolved_batched_tokens`)
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_cache_bytes: int = 256 << 20
    block_size: int = 128
    speculative_tokens: int = 0
    enforce_eager: bool = False
    kv_cache_dtype: str = "auto"  # fp8 = packed 584-byte rows; auto = fp8 on CUDA where lossless
    # decode steps up to this context replay CUDA graphs (None: max_model_len, so all of them)
    cuda_graph_max_len: int | None = None
    # prefill steps of up to this many tokens replay CUDA graphs (vLLM's compilation config key;
    # None: up to 2048 and max_num_batched_tokens; 0: none, only the decode graphs)
    max_cudagraph_capture_size: int | None = None
    seed: int = 0
    # Launch each decode step before the previous step's tokens reach the host, so that the
    # host's work (outputs, stop checks, scheduling) overlaps the GPU's (llm_engine.py).
    async_scheduling: bool = True
    # Cache each prompt's state at its last 128-token boundary; a later prompt that starts with
    # it resumes there (`cache/prefix_cache.py`). Takes max_num_seqs more slots of memory.
    enable_prefix_caching: bool = True
    # CUDA: run full-budget prefill steps at startup (`LLMEngine.warm_up`), so Triton compiles
    # their kernels before the first request and a step that large is known to fit in memory
    warmup: bool = True
    # "auto": requests that leave temperature, top_p, top_k, min_p, repetition_penalty or
    # max_tokens out take the model's generation_config.json values (vLLM's default);
    # "vllm": the library's own defaults (temperature 1, ...)
    generation_config: str = "auto"
    # "fcfs", or "priority": requests run by their priority (lower first), then arrival, and
    # the lowest-priority running sequence is the one preempted (vLLM's --scheduling-policy)
    scheduling_policy: str = "fcfs"
    # the most logprobs / prompt_logprobs a request may ask for (vLLM's --max-logprobs, same
    # default); -1: the vocabulary
    max_logprobs: int = 20

    def validate(self) -> None:
        if self.dtype not in ("bfloat16", "float32"):
            raise ConfigError(f"dtype {self.dtype!r}: must be 'bfloat16' or 'float32'")
        if self.max_logprobs < -1:
            raise ConfigError(f"max_logprobs {self.max_logprobs}: must be >= 0, or -1 (the "
                              f"vocabulary)")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs {self.max_num_seqs}: must be >= 1")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens {self.max_num_batched_tokens}: must be >= 1")
        if not (0 < self.gpu_memory_utilization <= 1):
            raise ConfigError(
                f"gpu_memory_utilization {self.gpu_memory_utilization}: must be in (0, 1]")
        if not (0 <= self.speculative_tokens <= 8):
            raise ConfigError(f"speculative_tokens {self.speculative_tokens}: must be in 0..8")
        if self.kv_cache_dtype not in ("auto", "bfloat16", "fp8"):
            raise ConfigError(f"kv_cache_dtype {self.kv_cache_dtype!r}: must be auto, bfloat16 or fp8")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ConfigError(f"scheduling_policy {self.scheduling_policy!r}: must be 'fcfs' "
                              "or 'priority'")
        if self.generation_config not in ("auto", "vllm"):
            raise ConfigError(f"generation_config {self.generation_config!r}: must be 'auto' "
                              "(the model's generation_config.json) or 'vllm' (ignore it)")
        if self.max_cudagraph_capture_size is not None and self.max_cudagraph_capture_size < 0:
            raise ConfigError(f"max_cudagraph_capture_size {self.max_cudagraph_capture_size}: "
                              f"must be >= 0 (0: no prefill graphs)")
        if self.cuda_graph_max_len is not None and self.cuda_graph_max_len < 1:
            raise ConfigError(f"cuda_graph_max_len {self.cuda_graph_max_len}: must be >= 1 "
                              "(or None for max_model_len)")


def graph_capture_size(compilation_config: dict) -> tuple[int | None, list[str]]:
    """vLLM's compilation config as dsv4 reads it: (its max_cudagraph_capture_size, or the
    largest of its cudagraph_capture_sizes, or None; the keys that mean nothing here, which
    capture CUDA graphs without torch.compile). Malformed sizes raise ConfigError."""
    if not isinstance(compilation_config, dict):
        raise ConfigError(f"compilation_config {compilation_config!r}: must be a mapping")
    cc = dict(compilation_config)
    size = cc.pop("max_cudagraph_capture_size", None)
    sizes = cc.pop("cudagraph_capture_sizes", None)
    if size is None and sizes:
        if not (isinstance(sizes, list)
                and all(isinstance(s, int) and not isinstance(s, bool) for s in sizes)):
            raise ConfigError(f"compilation_config cudagraph_capture_sizes {sizes!r}: must be "
                              f"a list of integers")
        size = max(sizes)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ConfigError(f"compilation_config max_cudagraph_capture_size {size!r}: must be an "
                          f"integer >= 0")
    return size, sorted(cc)


def _big_gpu(device) -> bool:
    """A CUDA device with at least 70 GiB (H100 / H200 class)."""
    if getattr(device, "type", device) != "cuda":
        return False
    import torch
    return torch.cuda.get_device_properties(device).total_memory >= 70 * 2**30


def resolved_batched_tokens(ec: EngineConfig, device) -> int:
    """EngineConfig.max_num_batched_tokens, or its default for this device: 8192 on a GPU with
    at least 70 GiB, where prefill steps that large run the MoE on grouped GEMMs (from ~6.8K
    tokens for Flash), else 2048."""
    if ec.max_num_batched_tokens is not None:
        return ec.max_num_batched_tokens
    return 8192 if _big_gpu(device) else 2048


def resolved_max_num_seqs(ec: EngineConfig, device) -> int:
    """EngineConfig.max_num_seqs, or its default for this device: 256 on a GPU with at least
    70 GiB (decode throughput grows with the batch: on an H200, Flash-shaped, 11.6K tok/s at
    64 sequences, 28.6K at 256; vLLM's server defaults higher still), else 64."""
    if ec.max_num_seqs is not None:
        return ec.max_num_seqs
    return 256 if _big_gpu(device) else 64
