"""What a checkpoint directory holds, read without loading any tensor data.

A DeepSeek-V4 download (SPEC.md section 2) is `config.json`, optionally `hf_quant_config.json`
(NVIDIA ModelOpt builds), `generation_config.json`, tokenizer files, and safetensors shards listed
by `model.safetensors.index.json` (or a single `model.safetensors`, or shards with no index).
Only the JSON header of each shard is parsed here: it gives every tensor's dtype, shape and byte
range, so missing shards and truncated or corrupt files are found before the first byte of
weights is read, and all of them are reported together.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig

INDEX_FILE = "model.safetensors.index.json"
HF_QUANT_FILE = "hf_quant_config.json"
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header

# safetensors dtype names. F4 is float4_e2m1fn_x2: the header counts e2m1 elements, torch packs
# two in each element, so the last dimension halves.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
    "U64": torch.uint64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu, "F4": torch.float4_e2m1fn_x2,
}


class CheckpointError(ValueError):
    """A checkpoint does not match the model its config describes.

    `problems` lists every mismatch found (each naming the tensor or file, what was expected and
    what was found); the message shows them all."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.path, self.problems = str(path), list(problems)
        shown = "\n  - ".join(self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"checkpoint {self.path} has {len(self.problems)} problem(s):\n"
                         f"  - {shown}{more}")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its shard header describes it (shape and dtype as torch will load it)."""
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its data within the file's data section
    nbytes: int


def read_header(file: Path) -> tuple[dict[str, TensorInfo], list[str]]:
    """Parse one safetensors header; returns its tensors and the problems of the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return {}, [f"file {file.name}: truncated or empty ({size} bytes, no safetensors header)"]
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            return {}, [f"file {file.name}: truncated or corrupt: header claims {n} bytes, "
                        f"file has {size} bytes"]
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return {}, [f"file {file.name}: corrupt safetensors header ({e})"]
    if not isinstance(header, dict):
        return {}, [f"file {file.name}: corrupt safetensors header (not a JSON object)"]
    header.pop("__metadata__", None)
    tensors: dict[str, TensorInfo] = {}
    problems: list[str] = []
    data_end = 0
    for name, entry in header.items():
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"file {file.name}: corrupt header entry for tensor {name!r}")
            continue
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            problems.append(f"tensor {name!r} in {file.name}: unsupported dtype {dtype_name}")
            continue
        numel = 1
        for s in shape:
            numel *= s
        expected = numel // 2 if dtype_name == "F4" else numel * dtype.itemsize
        if dtype_name == "F4":
            shape[-1] //= 2
        if end - begin != expected:
            problems.append(f"tensor {name!r} in {file.name}: corrupt header: {end - begin} bytes "
                            f"for {dtype_name}{list(entry['shape'])}, expected {expected}")
        data_end = max(data_end, end)
        tensors[name] = TensorInfo(name, file, dtype, tuple(shape), begin, end - begin)
    if 8 + n + data_end > size:
        problems.append(f"file {file.name}: truncated: its header needs {8 + n + data_end} bytes, "
                        f"the file has {size}")
    return tensors, problems


def shard_files(path: Path) -> tuple[list[Path], dict[str, str] | None, list[str]]:
    """The shards to read: those named by the index (with its weight map), else every
    `*.safetensors` file of the directory. Missing shards are problems, not exceptions."""
    index_path = path / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            return [], None, [f"file {INDEX_FILE}: corrupt index ({e!r})"]
        names = sorted(set(weight_map.values()))
        problems = []
        for name in names:
            if not (path / name).is_file():
                count = sum(1 for v in weight_map.values() if v == name)
                problems.append(f"file {name}: missing shard (the index maps {count} tensor(s) "
                                f"to it)")
        return [path / n for n in names if (path / n).is_file()], weight_map, problems
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return [], None, [f"no *.safetensors files and no {INDEX_FILE} in {path}"]
    return files, None, []


def index_checkpoint(path: Path) -> tuple[dict[str, TensorInfo], list[str], set[str]]:
    """Every readable tensor of the checkpoint by name, all file-level problems, and the names
    the index places in missing or unreadable files (already covered by those files' problems)."""
    files, weight_map, problems = shard_files(path)
    tensors: dict[str, TensorInfo] = {}
    bad_files = {n for n in (weight_map or {}).values() if not (path / n).is_file()}
    for file in files:
        found, file_problems = read_header(file)
        problems += file_problems
        if file_problems and not found:
            bad_files.add(file.name)
        for name, info in found.items():
            if name in tensors:
                problems.append(f"tensor {name!r}: stored twice ({tensors[name].file.name} and "
                                f"{file.name})")
            tensors[name] = info
    lost = set()
    for name, shard in (weight_map or {}).items():
        info = tensors.get(name)
        if shard in bad_files:
            lost.add(name)
        elif info is None or info.file.name != shard:
            where = f"found in {info.file.name}" if info else "not found in it"
            problems.append(f"tensor {name!r}: the index places it in {shard}, {where}")
    return tensors, problems, lost


def read_json(file: Path) -> dict:
    """A JSON object file, or ConfigError naming the file."""
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must hold a JSON object, found {type(data).__name__}")
    return data


def read_config(path: Path) -> ModelConfig:
    """`config.json`, with an NVIDIA ModelOpt `hf_quant_config.json` folded into
    `quantization_config` when config.json itself has none (older ModelOpt exports)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: is it a model directory?")
    data = read_json(config_file)
    quant_file = path / HF_QUANT_FILE
    if quant_file.is_file() and not data.get("quantization_config"):
        q = read_json(quant_file).get("quantization", {})
        data["quantization_config"] = {"quant_method": "modelopt", **q}
    return ModelConfig.from_json(data)
