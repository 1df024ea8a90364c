"""Seeded random checkpoint tensors, one layout entry at a time.

Used by `make-tiny` (written to disk shard by shard) and by `load_format="dummy"` (copied
straight into the model on its device), so both give the same weights for the same seed on CPU.
The scales are those of `dsv4/model/init.py`: finite, non-degenerate logits, routing that uses
many experts, mHC mixing near the identity. Each entry draws from its own generator, seeded from
the seed and the tensor name, so any entry can be produced alone, in any order.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch

from ..quant.linear import make_linear
from .layout import CheckpointLayout, LinearSpec, ParamSpec


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    g = torch.Generator(device)
    g.manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63))
    return g


def random_linear(spec: LinearSpec, cfg, seed: int, device) -> dict[str, torch.Tensor]:
    """A random fp32 weight with std in^-0.5, stored in the linear's own format."""
    device = torch.device(device)
    g = _generator(seed, spec.prefix, device)
    w = torch.randn(spec.out_features, spec.in_features, generator=g, device=device)
    w *= spec.in_features ** -0.5
    with torch.device(device):
        lin = make_linear(spec.in_features, spec.out_features, spec.fmt, dtype=torch.bfloat16)
    lin.set_float(w)
    return {f"{spec.prefix}.{n}": p.detach() for n, p in lin.named_parameters()}


def random_param(spec: ParamSpec, cfg, seed: int, device) -> torch.Tensor:
    """One non-linear parameter, initialised by its role (read from its name)."""
    t = spec.tensor
    device = torch.device(device)
    g = _generator(seed, t.name, device)
    leaf = t.name.rsplit(".", 1)[-1]
    n = cfg.hc_mult

    def randn(std: float = 1.0) -> torch.Tensor:
        return torch.randn(t.shape, generator=g, device=device) * std

    if leaf == "tid2eid":  # each token gets top_k distinct experts
        keys = torch.rand(t.shape[0], cfg.n_routed_experts, generator=g, device=device)
        x = keys.argsort(-1)[:, :t.shape[1]]
    elif leaf.endswith("_fn"):
        x = randn(t.shape[1] ** -0.5)
    elif leaf.endswith("_base"):
        x = randn(0.1)
        if t.shape[0] == (2 + n) * n:  # comb logits favour the identity: streams stay distinct
            x[2 * n:] += 2.0 * torch.eye(n, device=device).flatten()
    elif leaf.startswith("hc_") and leaf.endswith("_scale"):
        x = 0.5 + 0.1 * randn().abs()
    elif leaf in ("attn_sink", "ape"):
        x = randn(0.5)
    elif t.name.endswith("gate.weight"):
        x = randn(cfg.hidden_size ** -0.5)
    elif t.name.endswith("gate.bias"):
        x = randn(0.1)
    elif t.name.endswith("norm.weight"):
        x = 1.0 + randn(0.1)
    elif t.name == "embed.weight":
        x = randn()
    else:
        raise ValueError(f"no random initialisation rule for parameter {t.name!r}")
    return x.to(t.dtype)


def random_tensors(layout: CheckpointLayout, cfg, seed: int = 0,
                   device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Every checkpoint tensor of `layout`, in layout order, generated on `device`."""
    for entry in layout.entries:
        if isinstance(entry, LinearSpec):
            yield from random_linear(entry, cfg, seed, device).items()
        else:
            yield entry.tensor.name, random_param(entry, cfg, seed, device)
