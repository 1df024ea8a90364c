"""Checkpoints (SPEC.md section 2): make-tiny writes the official layout in every format, the
loader reads it back compactly and exactly, and every kind of broken checkpoint is reported
with the tensor or file it concerns.

The reference for "loaded exactly" is written here from SPEC.md alone: each checkpoint tensor is
dequantised with the formulas of section 2 into a plain fp32 model, and the linears that were
stored quantised get the FP8 activation rounding of section 3. Loaded and reference models then
do the same arithmetic, so their logits must match to fp32 noise at every position."""
import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv4.config import ConfigError
from dsv4.distributed import ParallelGroup
from dsv4.loader import (CheckpointError, add_make_tiny_cli, load_model, tiny_config,
                         write_tiny_checkpoint)
from dsv4.loader.cli import main as make_tiny_main
from dsv4.model.model import DeepseekV4Model
from dsv4.model.parallel import shard_state_dict
from dsv4.quant.formats import (dequant_mxfp4, dequant_nvfp4, mxfp4_to_fp8, quantize_fp8,
                                 quantize_nvfp4)
from dsv4.quant.linear import FP4Linear, Linear
from dsv4.quant.scheme import QuantScheme
from model_helpers import prefill_logits  # noqa: E402

FORMATS = ("bf16", "fp8", "fp4", "nvfp4")
PROMPT = torch.randint(3, 512, (48,), generator=torch.Generator().manual_seed(7)).tolist()


# ------------------------------------------------------------------ SPEC.md section 2 and 3
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def spec_e8m0(s: torch.Tensor) -> torch.Tensor:
    return 2.0 ** (s.view(torch.uint8).float() - 127)  # byte b means 2^(b-127)


def spec_e2m1(packed: torch.Tensor) -> torch.Tensor:
    b = packed.view(torch.uint8).long()
    codes = torch.stack([b & 15, b >> 4], -1).flatten(-2)  # element 2j in the low nibble
    mag = E2M1[codes & 7]
    return torch.where(codes & 8 > 0, -mag, mag)


def spec_dequantize(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(fp32 weight, stored quantised?) from one linear's checkpoint tensors."""
    w = parts["weight"]
    if "weight_scale" in parts:  # NVFP4
        s = parts["weight_scale"].float().repeat_interleave(16, 1)
        return spec_e2m1(w) * s * parts["weight_scale_2"].float(), True
    if "scale" not in parts:
        return w.float(), False
    if w.dtype == torch.float8_e4m3fn:  # FP8, 128x128 blocks
        n, k = w.shape
        s = spec_e8m0(parts["scale"]).repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        return w.float() * s, True
    return spec_e2m1(w) * spec_e8m0(parts["scale"]).repeat_interleave(32, 1), True  # MXFP4


def spec_act_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-token FP8 e4m3 rounding in blocks of 128 with power-of-two scales (SPEC.md 3)."""
    k = x.shape[-1]
    xb = torch.nn.functional.pad(x.float(), (0, -k % 128)).unflatten(-1, (-1, 128))
    mant, exp = torch.frexp(xb.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448)
    s = torch.ldexp(torch.ones_like(mant), torch.where(mant == 0.5, exp - 1, exp))
    q = (xb / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    return q.flatten(-2)[..., :k]


def spec_reference(path: Path, cfg) -> DeepseekV4Model:
    """An fp32 model holding the checkpoint's dequantised weights, built without the loader."""
    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(f))
    model = DeepseekV4Model(cfg, dtype="float32", scheme=QuantScheme()).eval()
    linears = {p: m for p, m in model.named_modules() if isinstance(m, Linear)}
    with torch.no_grad():
        for prefix, lin in linears.items():
            parts = {k[len(prefix) + 1:]: v for k, v in sd.items()
                     if k.startswith(prefix + ".") and "." not in k[len(prefix) + 1:]}
            w, quantised = spec_dequantize(parts)
            lin.weight.copy_(w)
            if quantised and not prefix.endswith("wo_a"):  # wo_a is applied as a plain weight
                lin.forward = lambda x, w=lin.weight: (spec_act_quant(x) @ w.t()).to(x.dtype)
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[0] not in linears:
                p.copy_(sd[name].to(p.dtype))
    return model


def logits(model, ids=PROMPT):
    return prefill_logits(model, ids)


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    # small shards, so that the sharded layout (several files + index) is what gets tested
    return {fmt: write_tiny_checkpoint(root / fmt, fmt=fmt, shard_bytes=256 << 10)
            for fmt in FORMATS}


@pytest.fixture
def broken(checkpoints, tmp_path):
    """A fresh copy of the fp8 checkpoint to damage."""
    return Path(shutil.copytree(checkpoints["fp8"], tmp_path / "broken"))


def edit_tensors(path: Path, edit) -> None:
    """Apply `edit(dict)` to the tensors of every shard and rewrite the shards and the index."""
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    for shard in sorted(path.glob("*.safetensors")):
        tensors = load_file(shard)
        edit(tensors)
        save_file(tensors, shard)
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
        index["weight_map"].update({k: shard.name for k in tensors})
    index_file.write_text(json.dumps(index))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8),
                                              b.reshape(-1).view(torch.uint8))


def shard(path: Path, i: int) -> Path:
    return sorted(path.glob("model-*-of-*.safetensors"))[i]


def problems_of(path: Path) -> list[str]:
    with pytest.raises(CheckpointError) as e:
        load_model(path, dtype="float32")
    return e.value.problems


# ------------------------------------------------------------------ round trips per format
@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_loads_with_the_logits_of_its_dequantised_weights(checkpoints, fmt):
    loaded = load_model(checkpoints[fmt], dtype="float32")
    got = logits(loaded.model)
    want = logits(spec_reference(checkpoints[fmt], loaded.config))
    diff = (got - want).abs().amax(-1)
    assert diff.max() < 1e-4, f"{fmt}: max |dlogit| {diff.max():.3g} at position {diff.argmax()}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_bfloat16_load_holds_the_float32_weights_rounded_to_bfloat16(checkpoints, fmt):
    # Whole-model bf16 vs fp32 logits are chaotic (SPEC.md 10); the weights are not.
    f32 = load_model(checkpoints[fmt], dtype="float32").model
    b16 = load_model(checkpoints[fmt], dtype="bfloat16").model
    for (name, a), (_, b) in zip(f32.named_parameters(), b16.named_parameters()):
        if a.dtype == torch.float32 and b.dtype == torch.bfloat16:
            a = a.to(torch.bfloat16)
        assert a.dtype == b.dtype and same_bits(a, b), name
    assert torch.isfinite(logits(b16)).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantised_weights_stay_compact_in_memory(checkpoints, dtype):
    fp4 = dict(load_model(checkpoints["fp4"], dtype=dtype).model.named_parameters())
    work = torch.float32 if dtype == "float32" else torch.bfloat16
    assert fp4["layers.1.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert fp4["layers.1.attn.wq_a.scale"].dtype == torch.float8_e8m0fnu
    assert fp4["layers.1.ffn.experts.3.w1.weight"].dtype == torch.int8  # packed e2m1
    assert fp4["layers.1.ffn.experts.3.w1.scale"].dtype == torch.float8_e8m0fnu
    assert fp4["layers.1.ffn.shared_experts.w2.weight"].dtype == torch.float8_e4m3fn
    assert fp4["layers.1.attn.wo_a.weight"].dtype == torch.float8_e4m3fn  # exact as bf16
    assert fp4["layers.1.attn.wo_a.scale"].dtype == torch.float8_e8m0fnu
    assert fp4["embed.weight"].dtype == work and fp4["head.weight"].dtype == work
    assert fp4["layers.1.attn_norm.weight"].dtype == torch.float32
    assert fp4["layers.1.hc_attn_fn"].dtype == torch.float32
    assert fp4["layers.1.attn.compressor.wkv.weight"].dtype == work  # applied in fp32

    nv = dict(load_model(checkpoints["nvfp4"], dtype=dtype).model.named_parameters())
    assert nv["layers.2.ffn.experts.0.w3.weight"].dtype == torch.uint8
    assert nv["layers.2.ffn.experts.0.w3.weight_scale"].dtype == torch.float8_e4m3fn
    assert nv["layers.2.ffn.experts.0.w3.weight_scale_2"].shape == ()
    assert nv["layers.2.ffn.shared_experts.w1.input_scale"].dtype == torch.float32
    assert nv["layers.2.attn.wq_b.weight"].dtype == work, "excluded: attention stays bf16"


def test_fp4_round_trip_is_exact_for_representable_values():
    codes = torch.randint(0, 16, (64, 128), generator=torch.Generator().manual_seed(0))
    scales = 2.0 ** torch.randint(-12, 4, (64, 4), generator=torch.Generator().manual_seed(1))
    w = torch.where(codes & 8 > 0, -1.0, 1.0) * E2M1[codes & 7] * scales.repeat_interleave(32, 1)
    lin = FP4Linear(128, 64)
    lin.set_float(w)
    assert torch.equal(lin.dequantize(), w)
    assert torch.equal(spec_e2m1(lin.weight) * spec_e8m0(lin.scale).repeat_interleave(32, 1), w)


def test_fp4_packing_puts_element_2j_in_the_low_nibble(tmp_path):
    lin = FP4Linear(64, 1)
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1] = 0.5, -6.0  # codes 1 and 15 -> byte 0xF1
    lin.set_float(w)
    save_file({"w": lin.weight.data}, tmp_path / "x.safetensors")
    assert load_file(tmp_path / "x.safetensors")["w"].view(torch.uint8)[0, 0] == 0xF1


def _random_mxfp4(lowest_exponent: int):
    g = torch.Generator().manual_seed(3)
    packed = torch.randint(-128, 128, (256, 128), generator=g, dtype=torch.int8)  # [256, 256]
    exps = torch.randint(lowest_exponent, 1, (256, 8), generator=g)
    exps[::32, ::4] = 0  # every 128x128 block holds its maximum scale, 2^0
    return packed, (2.0 ** exps).to(torch.float8_e8m0fnu)


def test_mxfp4_to_fp8_is_exact_when_scales_are_within_2_to_14_of_the_block_maximum():
    packed, scale = _random_mxfp4(lowest_exponent=-14)
    q, s, lossy = mxfp4_to_fp8(packed, scale)
    assert lossy == []
    n, k = q.shape
    block = spec_e8m0(s).repeat_interleave(128, 0).repeat_interleave(128, 1)
    assert torch.equal(q.float() * block, dequant_mxfp4(packed, scale))


def test_mxfp4_to_fp8_reports_the_blocks_that_lose_bits():
    packed, scale = _random_mxfp4(lowest_exponent=-14)
    scale[130, 5] = torch.tensor(2.0 ** -20).to(torch.float8_e8m0fnu)  # block (1, 1)
    _, _, lossy = mxfp4_to_fp8(packed, scale)
    assert lossy == [(1, 1)]


# ------------------------------------------------------------------ layout details
def test_checkpoint_is_sharded_with_an_index_and_official_names(checkpoints):
    path = checkpoints["fp4"]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    names = set(index["weight_map"])
    assert {"embed.weight", "head.weight", "norm.weight", "hc_head_fn", "layers.0.ffn.gate.tid2eid",
            "layers.1.ffn.gate.bias", "layers.1.attn.wo_a.weight", "layers.1.attn.wo_a.scale",
            "layers.1.attn.indexer.compressor.ape", "mtp.0.e_proj.scale", "mtp.0.hnorm.weight",
            "mtp.0.hc_head_base"} <= names
    assert not any(n.startswith("model.") for n in names)
    for s in shards:
        assert s.stat().st_size < (256 << 10) + 4096 or len(load_file(s)) == 1


def test_make_tiny_ships_the_tiny_tokenizer_and_a_generation_config(checkpoints):
    loaded = load_model(checkpoints["bf16"])
    assert loaded.tokenizer.vocab_size == loaded.config.vocab_size
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("Hello, 世界")) == "Hello, 世界"
    assert loaded.generation_config["eos_token_id"] == loaded.config.eos_token_id
    assert load_model(checkpoints["bf16"], skip_tokenizer_init=True).tokenizer is None


def test_nvfp4_exclude_list_is_also_read_from_hf_quant_config(checkpoints, tmp_path):
    path = Path(shutil.copytree(checkpoints["nvfp4"], tmp_path / "nv"))
    cfg = json.loads((path / "config.json").read_text())
    hf_quant = json.loads((path / "hf_quant_config.json").read_text())
    assert hf_quant["quantization"]["exclude_modules"] == cfg["quantization_config"]["exclude_modules"]
    del cfg["quantization_config"]  # older ModelOpt exports keep it in hf_quant_config.json only
    (path / "config.json").write_text(json.dumps(cfg))
    model = load_model(path, dtype="float32").model
    assert model.get_submodule("layers.1.attn.wq_a").fmt == "bf16"
    assert model.get_submodule("layers.1.ffn.experts.0.w1").fmt == "nvfp4"


def test_nvfp4_excluded_modules_may_keep_the_official_fp8(checkpoints, tmp_path):
    # Builds made from the official release leave excluded attention linears in FP8.
    path = Path(shutil.copytree(checkpoints["nvfp4"], tmp_path / "nv"))
    fp8 = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a", "attn.wo_b", "indexer.wq_b")

    def to_fp8(tensors):
        for name in [n for n in tensors if n.endswith(tuple(f"{m}.weight" for m in fp8))]:
            q, s = quantize_fp8(tensors[name].float())
            tensors[name], tensors[name[:-len("weight")] + "scale"] = q, s
    edit_tensors(path, to_fp8)
    loaded = load_model(path, dtype="float32")
    assert loaded.model.get_submodule("layers.1.attn.wq_b").fmt == "fp8"
    assert loaded.model.get_submodule("layers.1.attn.indexer.wq_b").fmt == "fp8"
    want = logits(spec_reference(path, loaded.config))
    assert (logits(loaded.model) - want).abs().max() < 1e-4


@pytest.mark.parametrize("pattern", ["*.ffn.shared_experts.*", "*.shared_experts"])
def test_nvfp4_shared_experts_on_the_exclude_list_load_in_bf16(checkpoints, tmp_path, pattern):
    # ModelOpt's NVFP4 exports of DeepSeek-V4 leave the shared experts unquantised, with
    # patterns that name their linears ("*.ffn.shared_experts.*") or the module
    path = Path(shutil.copytree(checkpoints["nvfp4"], tmp_path / "nv"))
    edit_tensors(path, _shared_experts_to_bf16)
    for file, key in (("config.json", "quantization_config"),
                      ("hf_quant_config.json", "quantization")):
        if (path / file).exists():
            cfg = json.loads((path / file).read_text())
            cfg[key]["exclude_modules"] = cfg[key]["exclude_modules"] + [pattern]
            (path / file).write_text(json.dumps(cfg))
    loaded = load_model(path, dtype="float32")
    shared = loaded.model.get_submodule("layers.1.ffn.shared_experts")
    assert {lin.fmt for lin in (shared.w1, shared.w2, shared.w3)} == {"bf16"}
    assert loaded.model.get_submodule("layers.1.ffn.experts.0.w1").fmt == "nvfp4"
    want = logits(spec_reference(path, loaded.config))
    assert (logits(loaded.model) - want).abs().max() < 1e-4


def _shared_experts_to_bf16(tensors):
    for name in [n for n in tensors if ".shared_experts." in n and n.endswith(".weight")]:
        stem = name[:-len("weight")]
        w = dequant_nvfp4(tensors[name], tensors.pop(stem + "weight_scale"),
                          tensors.pop(stem + "weight_scale_2"))
        tensors.pop(stem + "input_scale", None)
        tensors[name] = w.bfloat16()


@pytest.mark.parametrize("shared_bf16", [False, True], ids=["as-written", "shared-bf16"])
def test_modelopt_mixed_precision_lists_the_nvfp4_layers(checkpoints, tmp_path, shared_bf16):
    # ModelOpt's MIXED_PRECISION exports name each NVFP4 linear in `quantized_layers` (with or
    # without a "model." prefix); every other linear keeps its original format
    path = Path(shutil.copytree(checkpoints["nvfp4"], tmp_path / "nv"))
    plain = load_model(path, dtype="float32").model
    listed = sorted(n for n, m in plain.named_modules()
                    if isinstance(m, Linear) and m.fmt == "nvfp4")
    if shared_bf16:
        edit_tensors(path, _shared_experts_to_bf16)
        listed = [n for n in listed if ".shared_experts." not in n]
    mixed = {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION", "quantized_layers": {
        ("model." if i % 2 else "") + n: {"quant_algo": "NVFP4", "group_size": 16}
        for i, n in enumerate(listed)}}
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = mixed
    (path / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(path, dtype="float32")
    fmts = {n: m.fmt for n, m in loaded.model.named_modules() if isinstance(m, Linear)}
    assert {n for n, f in fmts.items() if f == "nvfp4"} == set(listed)
    assert fmts["layers.1.attn.wq_a"] == "bf16"
    want = logits(spec_reference(path, loaded.config))
    assert (logits(loaded.model) - want).abs().max() < 1e-4
    # a layer in a format dsv4 does not read is named at load
    mixed["quantized_layers"]["layers.1.attn.wq_a"] = {"quant_algo": "FP8"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"quantized_layers\['layers.1.attn.wq_a'\].*NVFP4"):
        load_model(path, dtype="float32")


def test_an_nvfp4_wo_a_is_held_dequantised_and_an_fp8_one_stays_fp8(checkpoints, tmp_path):
    # wo_a is applied as a working-dtype weight (SPEC.md 2): FP8 bytes times a power of two are
    # exactly bf16, so FP8 stays FP8 in memory; an NVFP4 wo_a is dequantised once at load.
    path = Path(shutil.copytree(checkpoints["nvfp4"], tmp_path / "nv"))

    def wo_a_to_nvfp4(tensors):
        for name in [n for n in tensors if n.endswith("attn.wo_a.weight")]:
            q, s, g = quantize_nvfp4(tensors[name].float())
            stem = name[:-len("weight")]
            tensors[name], tensors[stem + "weight_scale"], tensors[stem + "weight_scale_2"] = q, s, g
            tensors[stem + "input_scale"] = torch.ones(())
    edit_tensors(path, wo_a_to_nvfp4)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["exclude_modules"] = [
        "*.attn.wq_a", "*.attn.wq_b", "*.attn.wkv", "*.attn.wo_b", "*.attn.compressor.*",
        "*.attn.indexer.*", "*.e_proj", "*.h_proj"]  # everything but wo_a, as before
    (path / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(path, dtype="float32")
    wo_a = loaded.model.get_submodule("layers.1.attn.wo_a")
    assert wo_a.fmt == "bf16" and wo_a.weight.dtype == torch.float32
    want = logits(spec_reference(path, loaded.config))
    assert (logits(loaded.model) - want).abs().max() < 1e-4
    fp8 = load_model(checkpoints["fp4"], dtype="bfloat16").model.get_submodule("layers.1.attn.wo_a")
    assert fp8.fmt == "fp8" and fp8.weight.dtype == torch.float8_e4m3fn


def test_dummy_weights_equal_make_tiny_weights_for_the_same_seed(checkpoints):
    from_disk = load_model(checkpoints["fp4"], dtype="float32").model.state_dict()
    dummy = load_model(checkpoints["fp4"], dtype="float32", load_format="dummy").model.state_dict()
    assert from_disk.keys() == dummy.keys()
    for name, t in from_disk.items():
        assert same_bits(t, dummy[name]), name


def test_dummy_accepts_a_preset_name_and_needs_no_files():
    loaded = load_model("tiny", dtype="float32", load_format="dummy", seed=5)
    assert loaded.config.num_hidden_layers == 4 and loaded.path is None
    assert loaded.tokenizer.vocab_size == loaded.config.vocab_size
    out = logits(loaded.model)
    assert torch.isfinite(out).all() and out.std() > 0.1


def test_unknown_model_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="preset"):
        load_model("flashy", load_format="dummy")


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("load_format", ["auto", "dummy"])
def test_tensor_parallel_ranks_load_their_slices_of_the_checkpoint(checkpoints, fmt, load_format):
    full = load_model(checkpoints[fmt], dtype="float32", load_format=load_format)
    for rank in (0, 1):
        tp = ParallelGroup(rank, 2)
        part = load_model(checkpoints[fmt], dtype="float32", load_format=load_format, tp=tp)
        want = shard_state_dict(full.model.state_dict(), full.config, tp)
        got = part.model.state_dict()
        assert got.keys() == want.keys()
        for name, t in want.items():
            assert same_bits(got[name], t), f"rank {rank}: {name}"


# ------------------------------------------------------------------ broken checkpoints
def test_missing_tensor_is_named(broken):
    edit_tensors(broken, lambda t: t.pop("layers.2.attn.wkv.scale", None))
    assert problems_of(broken) == [
        "tensor 'layers.2.attn.wkv.scale': missing from the checkpoint (expected "
        "float8_e8m0fnu[1, 1])"]


def test_extra_tensor_is_named(broken):
    edit_tensors(broken, lambda t: t.update({"layers.0.attn.bias": torch.zeros(3)})
                 if "embed.weight" in t else None)
    (p,) = problems_of(broken)
    assert "'layers.0.attn.bias'" in p and "not used by the model" in p


def test_wrong_shape_is_named(broken):
    def edit(t):
        if "layers.1.attn_norm.weight" in t:
            t["layers.1.attn_norm.weight"] = torch.ones(63, dtype=torch.bfloat16)
    edit_tensors(broken, edit)
    assert problems_of(broken) == ["tensor 'layers.1.attn_norm.weight': wrong shape: "
                                   "expected [64], found [63]"]


def test_wrong_dtype_is_named(broken):
    # A dequantised weight under a config that still says FP8.
    def edit(t):
        if "layers.3.attn.wq_a.weight" in t:
            t["layers.3.attn.wq_a.weight"] = t["layers.3.attn.wq_a.weight"].to(torch.bfloat16)
    edit_tensors(broken, edit)
    assert problems_of(broken) == ["tensor 'layers.3.attn.wq_a.weight': wrong dtype: expected "
                                   "float8_e4m3fn, found bfloat16"]


def test_missing_shard_is_named(broken):
    gone = shard(broken, 1)
    gone.unlink()
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    count = sum(1 for f in index["weight_map"].values() if f == gone.name)
    assert problems_of(broken) == [f"file {gone.name}: missing shard (the index maps {count} "
                                   f"tensor(s) to it)"]


def test_truncated_file_is_named(broken):
    cut = shard(broken, 2)
    data = cut.read_bytes()
    cut.write_bytes(data[:-1000])
    (p,) = problems_of(broken)
    assert p.startswith(f"file {cut.name}: truncated")
    cut.write_bytes(data[:5])
    assert problems_of(broken)[0].startswith(f"file {cut.name}: truncated")


def test_corrupt_header_is_named(broken):
    bad = shard(broken, 0)
    data = bytearray(bad.read_bytes())
    data[8:12] = b"\xff\xfe{["  # the JSON header no longer parses
    bad.write_bytes(bytes(data))
    (p,) = problems_of(broken)  # its tensors are not listed again one by one
    assert p.startswith(f"file {bad.name}: corrupt safetensors header")


def test_every_problem_is_reported_at_once(broken):
    def edit(t):
        t.pop("norm.weight", None)
        if "embed.weight" in t:
            t["embed.weight"] = t["embed.weight"][:, :32].contiguous()
            t["mtp.0.bogus"] = torch.zeros(1)
    edit_tensors(broken, edit)
    problems = problems_of(broken)
    assert len(problems) == 3, problems
    with pytest.raises(CheckpointError, match="3 problem"):
        load_model(broken)


def test_unknown_compress_ratio_in_config_is_named(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["compress_ratios"][2] = 64
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"compress_ratios\[2\]' = 64"):
        load_model(broken)


# ------------------------------------------------------------------ make-tiny
def test_make_tiny_command_writes_a_loadable_checkpoint(tmp_path):
    assert make_tiny_main([str(tmp_path / "m"), "--format", "nvfp4", "--layers", "2",
                           "--seed", "4"]) == 0
    loaded = load_model(tmp_path / "m", dtype="float32")
    assert loaded.config.num_hidden_layers == 2
    assert loaded.config.compress_ratios == [0, 4, 4]  # first 2 of the schedule + the MTP entry
    assert torch.isfinite(logits(loaded.model)).all()


def test_make_tiny_registers_on_the_dsv4_cli():
    parser = argparse.ArgumentParser(prog="dsv4")
    add_make_tiny_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["make-tiny", "out", "--format", "fp4", "--preset", "flash",
                              "--layers", "4", "--shard-size", "1GB"])
    assert (args.format, args.preset, args.layers, args.shard_size) == ("fp4", "flash", 4, 1 << 30)
    assert callable(args.func)


@pytest.mark.parametrize("preset,schedule", [("flash", [0, 0, 4, 128, 0]),
                                             ("pro", [128, 128, 4, 128, 0])])
def test_layers_cut_keeps_the_schedule_head_and_the_mtp_ratio(preset, schedule):
    cfg = tiny_config("fp4", preset, layers=4)
    assert cfg.num_hidden_layers == 4 and cfg.compress_ratios == schedule
    assert cfg.num_hash_layers == 3 and cfg.expert_dtype == "fp4"
    assert cfg.weight_format == "fp8" and cfg.hidden_size in (4096, 7168)


def test_tokenizer_from_another_directory(tmp_path):
    """vLLM's --tokenizer: weights without tokenizer files take them from another directory
    (or Hub repository); a tokenizer larger than the model's vocabulary is refused."""

    from dsv4 import LLM, SamplingParams
    from dsv4.tokenizer import build_tiny_tokenizer, save_tokenizer_files
    model = write_tiny_checkpoint(tmp_path / "weights")
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.move(model / f, tok_dir / f)
    kw = dict(dtype="float32", device="cpu", cpu_cache_bytes=16 << 20, max_num_seqs=2)
    assert LLM(str(model), **kw).get_tokenizer() is None
    llm = LLM(str(model), tokenizer=str(tok_dir), **kw)
    out = llm.generate("Hello", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert out[0].prompt_token_ids == llm.get_tokenizer().encode("Hello", add_special_tokens=True)
    big = tmp_path / "big"
    save_tokenizer_files(big, build_tiny_tokenizer(100_000), model_max_length=4096)
    with pytest.raises(CheckpointError, match="more than the model's vocab_size"):
        LLM(str(model), tokenizer=str(big), **kw)
