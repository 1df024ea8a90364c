"""`write_tiny_checkpoint`: a complete random checkpoint directory in the official layout.

config.json, sharded safetensors with `model.safetensors.index.json`, the tiny tokenizer sized
to the vocabulary, generation_config.json (and hf_quant_config.json for NVFP4), readable by
`load_model` and by Hugging Face transformers. Tensors are generated one at a time and written
shard by shard, so a Flash-shaped model cut to a few layers streams to disk with host memory
near one shard.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..model.model import DeepseekV4Model
from ..quant.scheme import QuantScheme
from ..tokenizer import build_tiny_tokenizer, save_tokenizer_files
from .checkpoint import HF_QUANT_FILE, INDEX_FILE
from .layout import checkpoint_layout
from .random_weights import random_tensors

FORMATS = ("bf16", "fp8", "fp4", "nvfp4")
DEFAULT_SHARD_BYTES = 2 << 30

FP8_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
             "scale_fmt": "ue8m0", "activation_scheme": "dynamic"}
# make-tiny's NVFP4 build quantises the routed and shared experts and keeps attention (and the
# MTP projections) in bf16, as the ModelOpt recipes for DeepSeek do.
NVFP4_EXCLUDE = ["*.attn.*", "*.e_proj", "*.h_proj"]
NVFP4_QUANT = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
               "kv_cache_quant_algo": None, "exclude_modules": NVFP4_EXCLUDE}


def tiny_config(fmt: str = "bf16", preset: str = "tiny", layers: int | None = None,
                experts: int | None = None) -> ModelConfig:
    """The config make-tiny writes: `preset` in storage format `fmt`, optionally cut to
    `layers` main layers (compress_ratios keeps the first `layers` entries and the MTP ones)
    and to `experts` routed experts per layer."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: must be one of {FORMATS}")
    base = ModelConfig.preset(preset)
    changes: dict = {}
    if layers is not None:
        if not 1 <= layers <= base.num_hidden_layers:
            raise ValueError(f"--layers {layers}: must be in 1..{base.num_hidden_layers} for "
                             f"preset {preset!r}")
        mtp = base.compress_ratios[base.num_hidden_layers:]
        changes.update(num_hidden_layers=layers, num_hash_layers=min(base.num_hash_layers, layers),
                       compress_ratios=base.compress_ratios[:layers] + mtp)
    if experts is not None:
        changes["n_routed_experts"] = experts
    changes["quantization_config"] = {"bf16": None, "fp8": dict(FP8_QUANT), "fp4": dict(FP8_QUANT),
                                      "nvfp4": json.loads(json.dumps(NVFP4_QUANT))}[fmt]
    changes["expert_dtype"] = "fp4" if fmt == "fp4" else None
    return base.replace(**changes)


class ShardWriter:
    """Collects tensors and writes a shard whenever `shard_bytes` would be exceeded."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out, self.shard_bytes = out, shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.buffer and self.buffered + n > self.shard_bytes:
            self.flush()
        self.buffer[name] = t.detach().to("cpu").contiguous()
        self.buffered += n
        self.total += n

    def flush(self) -> None:
        if not self.buffer:
            return
        save_file(self.buffer, str(self.out / f".shard-{len(self.shards):05d}.tmp"),
                  metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.buffered = {}, 0

    def finish(self) -> None:
        """Name the shards model-0000i-of-0000N.safetensors and write the index."""
        self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / f".shard-{i:05d}.tmp", self.out / final)
            os.chmod(self.out / final, 0o644)  # safetensors creates its files owner-only
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_tiny_checkpoint(out_dir: str | Path, fmt: str = "bf16", preset: str = "tiny",
                          layers: int | None = None, seed: int = 0,
                          shard_bytes: int = DEFAULT_SHARD_BYTES, device="cpu",
                          experts: int | None = None) -> Path:
    """Write a random checkpoint directory; returns its path. `device` is where tensors are
    generated and quantised (a GPU makes full-width Flash layers much faster)."""
    cfg = tiny_config(fmt, preset, layers, experts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.safetensors")) + list(out.glob(".shard-*.tmp")):
        old.unlink()  # a previous build's shards would be read as part of this one
    scheme = QuantScheme.from_config(cfg)
    with torch.device("meta"):
        model = DeepseekV4Model(cfg, dtype="bfloat16", scheme=scheme)
    layout = checkpoint_layout(model, scheme)
    writer = ShardWriter(out, shard_bytes)
    n_tensors = len(layout.tensors())
    for name, t in tqdm(random_tensors(layout, cfg, seed, device), total=n_tensors, unit="tensor",
                        desc=f"Writing {out.name}", disable=None):
        writer.add(name, t)
    writer.finish()

    config = cfg.to_dict()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if fmt == "nvfp4":
        quant = {k: v for k, v in cfg.quantization_config.items() if k != "quant_method"}
        hf_quant = {"producer": {"name": "modelopt", "version": "dsv4-make-tiny"},
                    "quantization": quant}
        (out / HF_QUANT_FILE).write_text(json.dumps(hf_quant, indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                  "do_sample": True, "temperature": 1.0, "top_p": 1.0}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_tokenizer_files(out, build_tiny_tokenizer(cfg.vocab_size),
                         model_max_length=cfg.max_position_embeddings)
    return out
