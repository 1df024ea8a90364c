"""MoE routing from the gate's fp32 logits in one kernel (SPEC.md 7).

`route(z, func, topk, scaling, bias=None, table=None, ids=None)` -> (experts int64 [T, k],
weights fp32 [T, k]):
- scores s = sqrt(softplus(z)) | sigmoid(z) | softmax(z) (`func`);
- experts: hash layers look them up by token id (`table[ids]`), the others take the top-k of
  s + bias (descending, as torch.topk);
- weights: the scores of the chosen experts, normalised to sum 1 unless softmax, times
  `scaling`.

Reference: the torch ops (about eight launches per layer). GPU: one Triton program per token
row (the expert count fits in registers); the top-k is k rounds of max and lowest index;
the scores use the same libdevice functions as torch's CUDA ops.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import HAS_TRITON, use_triton
from .pdl import pdl

FUNCS = {"sqrtsoftplus": 0, "sigmoid": 1, "softmax": 2}
# Scores use CUDA's expf / log1pf and correctly rounded sqrt and division, as torch's CUDA ops
# do: a routing near-tie then resolves as it did with them. Triton's CPU interpreter has no
# libdevice, so it gets portable formulas.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def route_ref(z, func, topk, scaling, bias=None, table=None, ids=None):
    if func == "sqrtsoftplus":
        s = torch.sqrt(F.softplus(z))
    elif func == "sigmoid":
        s = torch.sigmoid(z)
    else:
        s = torch.softmax(z, -1)
    if table is not None:
        idx = table[ids].long()
    else:
        idx = (s + bias).topk(topk, dim=-1).indices
    wgt = s.gather(1, idx)
    if func != "softmax":
        wgt = wgt / wgt.sum(-1, keepdim=True)
    return idx, wgt * scaling


def route(z: torch.Tensor, func: str, topk: int, scaling: float, bias=None, table=None,
          ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    if func not in FUNCS:
        raise ValueError(f"unknown scoring function {func!r}; expected one of {sorted(FUNCS)}")
    if (table is None) == (bias is None):
        raise ValueError("route needs either a hash table (with token ids) or a bias")
    t, e = z.shape
    if use_triton(z) and t and z.dtype == torch.float32 and e <= 1024 and topk <= e:
        return _route_cuda(z.contiguous(), FUNCS[func], topk, float(scaling), bias, table, ids)
    return route_ref(z, func, topk, scaling, bias, table, ids)


def _route_cuda(z, func, topk, scaling, bias, table, ids):
    t, e = z.shape
    idx = torch.empty(t, topk, dtype=torch.int64, device=z.device)
    wgt = torch.empty(t, topk, dtype=torch.float32, device=z.device)
    hashed = table is not None
    _route_kernel[(t,)](z, bias if not hashed else z, table if hashed else idx,
                        ids if hashed else idx, idx, wgt, e, scaling, FUNC=func, K=topk,
                        KP2=triton.next_power_of_2(topk), EP2=triton.next_power_of_2(e),
                        HASH=hashed, PRECISE=not INTERPRET, num_warps=4, **pdl())
    return idx, wgt


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import pdl_start

    if not INTERPRET:
        from triton.language.extra import libdevice

    @triton.jit
    def _exp(x, PRECISE: tl.constexpr):
        if PRECISE:
            return libdevice.exp(x)
        return tl.exp(x)

    @triton.jit
    def _route_kernel(z_ptr, bias_ptr, table_ptr, ids_ptr, idx_ptr, wgt_ptr, E, scaling,
                      FUNC: tl.constexpr, K: tl.constexpr, KP2: tl.constexpr,
                      EP2: tl.constexpr, HASH: tl.constexpr, PRECISE: tl.constexpr,
                      PDL: tl.constexpr = False):
        pdl_start(PDL)
        _route_row(z_ptr, bias_ptr, table_ptr, ids_ptr, idx_ptr, wgt_ptr, E, scaling,
                   tl.program_id(0).to(tl.int64), FUNC, K, KP2, EP2, HASH, PRECISE, False)

    @triton.jit
    def _route_row(z_ptr, bias_ptr, table_ptr, ids_ptr, idx_ptr, wgt_ptr, E, scaling, row,
                   FUNC: tl.constexpr, K: tl.constexpr, KP2: tl.constexpr, EP2: tl.constexpr,
                   HASH: tl.constexpr, PRECISE: tl.constexpr, Z_CG: tl.constexpr):
        """Token row's experts and weights (also the MoE gate's last CTA, `moe_gate.py`, which
        reads z past L1: Z_CG)."""
        e = tl.arange(0, EP2)
        ok = e < E
        if Z_CG:
            z = tl.load(z_ptr + row * E + e, mask=ok, other=0.0, cache_modifier=".cg")
        else:
            z = tl.load(z_ptr + row * E + e, mask=ok, other=0.0)
        if FUNC == 0:  # torch's softplus: x above its threshold 20, else log1p(exp(x))
            if PRECISE:
                sp = libdevice.log1p(libdevice.exp(z))
            else:  # interpreter: max(x, 0) + log1p(exp(-|x|)) with Kahan's log1p
                a = tl.exp(-tl.abs(z))
                u = 1.0 + a
                sp = tl.maximum(z, 0.0) + tl.where(u == 1.0, a, tl.log(u) * (a / (u - 1.0)))
            s = tl.math.sqrt_rn(tl.where(z > 20.0, z, sp))
        elif FUNC == 1:
            s = tl.math.div_rn(1.0, 1.0 + _exp(-z, PRECISE))
        else:
            zm = tl.where(ok, z, float("-inf"))
            p = _exp(zm - tl.max(zm, 0), PRECISE)
            s = tl.math.div_rn(p, tl.sum(p, 0))
        j = tl.arange(0, KP2)
        chosen = tl.zeros((KP2,), dtype=tl.int32)
        w = tl.zeros((KP2,), dtype=tl.float32)
        if HASH:
            tok = tl.load(ids_ptr + row)
            chosen = tl.load(table_ptr + tok * K + j, mask=j < K, other=0).to(tl.int32)
            for r in tl.static_range(K):
                c = tl.sum(tl.where(j == r, chosen, 0), 0)
                w = tl.where(j == r, tl.sum(tl.where(e == c, s, 0.0), 0), w)
        else:
            v = tl.where(ok, s + tl.load(bias_ptr + e, mask=ok, other=0.0), float("-inf"))
            for r in tl.static_range(K):
                top = tl.max(v, 0)
                c = tl.min(tl.where(v == top, e, EP2), 0)
                chosen = tl.where(j == r, c, chosen)
                w = tl.where(j == r, tl.sum(tl.where(e == c, s, 0.0), 0), w)
                v = tl.where(e == c, float("-inf"), v)
        if FUNC != 2:
            w = tl.math.div_rn(w, tl.sum(w, 0))
        tl.store(idx_ptr + row * K + j, chosen.to(tl.int64), mask=j < K)
        tl.store(wgt_ptr + row * K + j, w * scaling, mask=j < K)
