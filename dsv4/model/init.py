"""Seeded random weights with scales that keep tiny (and full-size dummy) models well-behaved:
finite, non-degenerate logits, routing that uses many experts, mHC mixing near identity."""
from __future__ import annotations

import torch
from torch import nn

from ..quant.linear import Linear
from .moe import Gate


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter of a DeepseekV4Model in place, deterministically from `seed`.

    Quantised linears receive a random fp32 weight quantised into their own storage format."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dev)

    n = cfg.hc_mult
    for name, mod in model.named_modules():
        if isinstance(mod, Linear):
            w = randn(mod.out_features, mod.in_features, std=mod.in_features ** -0.5)
            mod.set_float(w.to(mod.weight.dtype).float() if mod.fmt == "bf16" else w)
        elif isinstance(mod, Gate):
            mod.weight.copy_(randn(*mod.weight.shape, std=cfg.hidden_size ** -0.5))
            if mod.hash:
                perm = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:mod.topk]
                                    for _ in range(cfg.vocab_size)])
                mod.tid2eid.copy_(perm.to(torch.int32))
            else:
                mod.bias.copy_(randn(cfg.n_routed_experts, std=0.1))
        elif isinstance(mod, nn.Embedding):
            mod.weight.copy_(randn(*mod.weight.shape))
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.endswith("_fn"):
            p.copy_(randn(*p.shape, std=(p.shape[1]) ** -0.5))
        elif leaf.endswith("_base"):
            base = randn(*p.shape, std=0.1)
            if p.shape[0] == (2 + n) * n:  # comb logits favour the identity: streams stay distinct
                base[2 * n:] += 2.0 * torch.eye(n, device=dev).flatten()
            p.copy_(base)
        elif leaf.endswith("_scale") and p.dtype == torch.float32 and "hc_" in leaf:
            p.copy_(0.5 + 0.1 * randn(*p.shape).abs())
        elif leaf == "attn_sink":
            p.copy_(randn(*p.shape, std=0.5))
        elif leaf == "ape":
            p.copy_(randn(*p.shape, std=0.5))
        elif name.endswith("norm.weight"):
            p.copy_(1.0 + randn(*p.shape, std=0.1))
    return model
