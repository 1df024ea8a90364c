"""`load_model`: a downloaded DeepSeek-V4 directory (or a preset, with dummy weights) -> a ready
model, its config, tokenizer and generation config. No conversion step.

Order of work: read config.json (+ hf_quant_config.json), index the shard headers, build the
model on the target device, compare the checkpoint with the model's layout and report every
problem at once, then stream tensors in file order: each is read lazily from its memory-mapped
shard (`safe_open`, never pickles), converted and copied to the device, so host memory stays
near one tensor. Quantised weights stay quantised; only an `attn.wo_a` that is neither FP8 nor bf16 is
dequantised (SPEC.md 2).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..config import PRESETS, ModelConfig
from ..distributed import SINGLE, ParallelGroup
from ..model.model import DeepseekV4Model
from ..quant.scheme import QuantScheme
from ..tokenizer import Tokenizer
from .checkpoint import CheckpointError, TensorInfo, index_checkpoint, read_config, read_json
from .fill import ParamFiller
from .layout import CheckpointLayout, LoaderScheme, check_tensor, checkpoint_layout
from .random_weights import random_tensors

LOAD_FORMATS = ("auto", "dummy")
# NVIDIA ModelOpt exports may carry FP8 KV-cache scales; dsv4 computes its own (SPEC.md 5.2).
IGNORED_NVFP4 = (".k_scale", ".v_scale")


@dataclass
class LoadedModel:
    """What `load_model` returns: the model (on its device, eval mode) and what came with it."""
    model: DeepseekV4Model
    config: ModelConfig
    tokenizer: Tokenizer | None
    generation_config: dict = field(default_factory=dict)
    path: Path | None = None


def load_model(path: str | Path, dtype: str = "bfloat16", device: str | torch.device = "cpu",
               skip_tokenizer_init: bool = False, qat: bool = True, load_format: str = "auto",
               seed: int = 0, tp: ParallelGroup = SINGLE) -> LoadedModel:
    """Load a DeepSeek-V4 checkpoint directory (official FP8/FP4, NVIDIA NVFP4, or bf16).

    `load_format="dummy"` builds the model from config.json alone (or from a preset name:
    "tiny", "flash", "pro") with seeded random weights in the checkpoint's own formats, made
    directly on `device`. With a tensor-parallel group `tp`, each rank reads only its slices.
    Raises FileNotFoundError for a missing path, ConfigError for a bad
    config, CheckpointError listing every mismatch between the files and the model."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r}: must be one of {LOAD_FORMATS}")
    device = torch.device(device)
    p = Path(path).expanduser()
    if not p.is_dir():
        if load_format == "dummy" and str(path) in PRESETS:
            return _dummy(ModelConfig.preset(str(path)), None, dtype, device, qat, seed,
                          skip_tokenizer_init, tp)
        hint = (f"; with load_format='dummy' a preset name ({', '.join(sorted(PRESETS))}) also "
                f"works" if load_format == "dummy" else "")
        raise FileNotFoundError(f"model path {str(path)!r} is not a directory: point it at a "
                                f"downloaded checkpoint (with config.json){hint}")
    cfg = read_config(p)
    if load_format == "dummy":
        return _dummy(cfg, p, dtype, device, qat, seed, skip_tokenizer_init, tp)

    found, problems, lost = index_checkpoint(p)
    scheme = _scheme(cfg, found)
    # Check against a meta-device model first: a broken checkpoint is reported before a
    # full-size model is allocated on the device.
    with torch.device("meta"):
        layout = checkpoint_layout(DeepseekV4Model(cfg, dtype=dtype, scheme=scheme), scheme)
    problems += _compare(layout, found, lost, cfg)
    if problems:
        raise CheckpointError(p, problems)
    with torch.device(device):
        model = DeepseekV4Model(cfg, dtype=dtype, scheme=scheme, qat=qat, tp=tp)
    _stream_into(ParamFiller(model, layout, tp), found, p.name)
    return LoadedModel(model.eval(), cfg, _tokenizer(p, cfg, skip_tokenizer_init),
                       _generation_config(p), p)


def _scheme(cfg: ModelConfig, found: dict[str, TensorInfo]) -> LoaderScheme:
    """The config's scheme, plus FP8 for excluded modules that the checkpoint stores in FP8."""
    base = QuantScheme.from_config(cfg)
    scheme = LoaderScheme(base)
    if base.exclude or base.quantized is not None:
        for name, info in found.items():
            if name.endswith(".scale") and info.dtype == torch.float8_e8m0fnu:
                prefix = name[: -len(".scale")]
                weight = found.get(prefix + ".weight")
                if weight is not None and weight.dtype == torch.float8_e4m3fn and \
                        scheme.excludes(prefix):
                    scheme.overrides[prefix] = "fp8"
    return scheme


def _compare(layout: CheckpointLayout, found: dict[str, TensorInfo], lost: set[str],
             cfg: ModelConfig) -> list[str]:
    expected = layout.tensors()
    problems = []
    for name, spec in expected.items():
        info = found.get(name)
        if info is None and name not in lost:
            problems.append(f"tensor {name!r}: missing from the checkpoint (expected "
                            f"{str(spec.dtype).removeprefix('torch.')}{list(spec.shape)})")
        elif info is not None:
            problems += check_tensor(spec, info.dtype, info.shape)
    for name, info in found.items():
        if name in expected:
            continue
        if cfg.weight_format == "nvfp4" and name.endswith(IGNORED_NVFP4):
            continue
        problems.append(f"tensor {name!r} in {info.file.name}: not used by the model "
                        f"({str(info.dtype).removeprefix('torch.')}{list(info.shape)}); is "
                        f"config.json for this checkpoint?")
    return problems


@torch.no_grad()
def _stream_into(filler: ParamFiller, found: dict[str, TensorInfo], label: str) -> None:
    by_file: dict[Path, list[TensorInfo]] = defaultdict(list)
    for info in found.values():
        if info.name in filler.params or info.name in filler.pending:
            by_file[info.file].append(info)
    total = sum(i.nbytes for infos in by_file.values() for i in infos)
    count, done = sum(map(len, by_file.values())), 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"Loading {label}",
              disable=None) as bar:
        for file in sorted(by_file):
            with safe_open(file, framework="pt", device="cpu") as f:
                for info in sorted(by_file[file], key=lambda i: i.offset):  # sequential reads
                    idx = filler.index(info.name, info.shape)
                    if idx is not None:  # read only this rank's slice
                        filler.put(info.name, f.get_slice(info.name)[idx] if idx
                                   else f.get_tensor(info.name))
                    bar.update(info.nbytes)
            done += len(by_file[file])
            bar.set_postfix(tensors=f"{done}/{count}", file=file.name)


@torch.no_grad()
def _dummy(cfg: ModelConfig, p: Path | None, dtype: str, device: torch.device, qat: bool,
           seed: int, skip_tokenizer_init: bool, tp: ParallelGroup) -> LoadedModel:
    scheme = LoaderScheme(QuantScheme.from_config(cfg))
    with torch.device("meta"):
        layout = checkpoint_layout(DeepseekV4Model(cfg, dtype=dtype, scheme=scheme), scheme)
    with torch.device(device):
        model = DeepseekV4Model(cfg, dtype=dtype, scheme=scheme, qat=qat, tp=tp)
    filler = ParamFiller(model, layout, tp)
    # Skip generating what this rank does not hold (other ranks' experts).
    mine = CheckpointLayout([e for e in layout.entries
                             if filler.index(e.tensors[0].name, e.tensors[0].shape) is not None])
    for name, t in random_tensors(mine, cfg, seed, device):
        idx = filler.index(name, tuple(t.shape))
        filler.put(name, t[idx] if idx else t)
    if p is not None:
        tok = _tokenizer(p, cfg, skip_tokenizer_init)
        gen = _generation_config(p)
    else:  # a preset has no files: it gets the tiny tokenizer sized to its vocabulary
        tok = None if skip_tokenizer_init else Tokenizer.tiny(cfg.vocab_size)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    return LoadedModel(model.eval(), cfg, tok, gen, p)


def load_tokenizer(path: str | Path, cfg: ModelConfig) -> Tokenizer:
    """The tokenizer files of a directory (a model's, or vLLM's `--tokenizer`), checked
    against the model's vocabulary."""
    p = Path(path)
    tok = Tokenizer.from_dir(p)
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(p, [f"file tokenizer.json: {tok.vocab_size} tokens, more than the "
                                  f"model's vocab_size {cfg.vocab_size}"])
    return tok


def _tokenizer(p: Path, cfg: ModelConfig, skip: bool) -> Tokenizer | None:
    if skip or not (p / "tokenizer.json").is_file():
        return None
    return load_tokenizer(p, cfg)


def _generation_config(p: Path) -> dict:
    file = p / "generation_config.json"
    return read_json(file) if file.is_file() else {}
