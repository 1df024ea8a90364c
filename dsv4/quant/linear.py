"""Linear layers, one class per checkpoint storage format, behind one interface.

Every class has `in_features`, `out_features`, `forward(x)`, `split_k(x)` (the product as
partial sums for a consumer that adds them itself) and `dequantize()` (fp32 [N, K]),
and parameter names equal to the checkpoint's tensor names, so loading is a lookup. The format
decides the arithmetic (SPEC.md 3): quantised weights get per-token FP8 activations, bf16 weights
a plain matmul in the working dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import f32_linear, quant_linear
from .formats import (FP8_BLOCK, MXFP4_BLOCK, NVFP4_BLOCK, dequant_fp8, dequant_mxfp4,
                      dequant_nvfp4, mxfp4_to_kernel_layout, nvfp4_to_kernel_layout,
                      quantize_fp8, quantize_mxfp4, quantize_nvfp4)

FORMATS = ("bf16", "fp8", "fp4", "nvfp4")


def _empty(shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """Base: y = x W^T for W [out_features, in_features]."""
    fmt = "?"

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def split_k(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T as partial sums [S, ..., N] whose fp32 sum, rounded to x's dtype, is
        `forward(x)` (`kernels.quant_linear.fp8_linear(parts=True)`); here S = 1."""
        return self(x)[None]

    @torch.no_grad()
    def set_float(self, w: torch.Tensor) -> None:
        """Store the fp32 weight w [out, in] in this layer's format (random init, dummy load)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt}"


class BF16Linear(Linear):
    """Unquantised weight in the working dtype (bf16, or fp32 in float32 mode)."""
    fmt = "bf16"

    def __init__(self, in_features: int, out_features: int, dtype=torch.bfloat16):
        super().__init__(in_features, out_features)
        self.weight = _empty((out_features, in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 2 and x.dtype == self.weight.dtype == torch.bfloat16
                and f32_linear.gemv_applies(x, self.weight)):
            # decode rows: one GEMV launch (fp32 sums rounded once, as the GEMM's) instead of
            # cuBLAS's split-K GEMM and its reduction (the indexer's weights_proj at batch 1,
            # H200: 4.2 + 1.6 us)
            return f32_linear.gemv_rounded(x, self.weight)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype))

    def scaled(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """`self(x) * scale` (each rounded to x's dtype); decode rows in one GEMV launch."""
        if (x.dim() == 2 and x.dtype == self.weight.dtype == torch.bfloat16
                and f32_linear.gemv_applies(x, self.weight)):
            return f32_linear.gemv_rounded(x, self.weight, scale)
        return self(x) * scale

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()

    @torch.no_grad()
    def set_float(self, w: torch.Tensor) -> None:
        self.weight.copy_(w)


class FP8Linear(Linear):
    """e4m3 weight with e8m0 128x128 block scales."""
    fmt = "fp8"

    def __init__(self, in_features: int, out_features: int, dtype=None):
        super().__init__(in_features, out_features)
        self.weight = _empty((out_features, in_features), torch.float8_e4m3fn)
        self.scale = _empty((-(-out_features // FP8_BLOCK), -(-in_features // FP8_BLOCK)),
                            torch.float8_e8m0fnu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear.fp8_linear(x, self.weight, self.scale)

    def split_k(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear.fp8_linear(x, self.weight, self.scale, parts=True)

    def dequantize(self) -> torch.Tensor:
        return dequant_fp8(self.weight, self.scale)

    @torch.no_grad()
    def set_float(self, w: torch.Tensor) -> None:
        q, s = quantize_fp8(w.float())
        self.weight.copy_(q), self.scale.copy_(s)


class _KernelLayout(Linear):
    """FP4 experts whose weight and block scales the CUDA MoE re-lays out in place on first
    use (`to_kernel_layout`, flag `kernel_layout`; `formats.*_to_kernel_layout`: each 64-row
    group's 128-deep K-blocks contiguous). The torch paths follow the flag, and state dicts keep
    the checkpoint's layout both ways. Subclasses name their block-scale parameter (`_scale`)
    and give `_layout(weight, scale, inverse)`, `_linear(x)` and `_dequant(weight, scale)`."""
    kernel_layout = False
    _scale = "scale"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_layout:  # only the torch reference of a CUDA MoE gets here
            return quant_linear.linear_ref(x, self.dequantize())
        return self._linear(x)

    def _checkpoint_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        w, s = self.weight, getattr(self, self._scale)
        return self._layout(w, s, True) if self.kernel_layout else (w, s)

    def dequantize(self) -> torch.Tensor:
        return self._dequant(*self._checkpoint_layout())

    @torch.no_grad()
    def _store(self, w: torch.Tensor, s: torch.Tensor) -> None:
        """Write checkpoint-layout (w, s) into the parameters, in their current layout."""
        if self.kernel_layout:
            w, s = self._layout(w, s, False)
        self.weight.copy_(w), getattr(self, self._scale).copy_(s)

    @torch.no_grad()
    def to_kernel_layout(self) -> None:
        """In place (the parameters keep their storage); idempotent."""
        if not self.kernel_layout:
            self.kernel_layout = True
            self._store(self.weight.clone(), getattr(self, self._scale).clone())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if self.kernel_layout:  # state dicts hold the checkpoint layout
            self._store(self.weight.clone(), getattr(self, self._scale).clone())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel_layout:
            w, s = self._checkpoint_layout()
            destination[prefix + "weight"], destination[prefix + self._scale] = w, s


class FP4Linear(_KernelLayout):
    """Official MXFP4 experts: packed e2m1 (two codes a byte) with e8m0 scales per 32."""
    fmt = "fp4"

    def __init__(self, in_features: int, out_features: int, dtype=None):
        super().__init__(in_features, out_features)
        self.weight = _empty((out_features, in_features // 2), torch.int8)
        self.scale = _empty((out_features, in_features // MXFP4_BLOCK), torch.float8_e8m0fnu)

    _layout = staticmethod(mxfp4_to_kernel_layout)
    _dequant = staticmethod(dequant_mxfp4)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear.mxfp4_linear(x, self.weight, self.scale)

    @torch.no_grad()
    def set_float(self, w: torch.Tensor) -> None:
        self._store(*quantize_mxfp4(w.float()))


class NVFP4Linear(_KernelLayout):
    """NVIDIA ModelOpt NVFP4: packed e2m1, e4m3 scales per 16, an fp32 global scale.

    Hopper has no FP4 tensor cores, and the model was trained with FP8 activations (SPEC.md 3),
    so activations take the same per-token FP8 path as the official formats; `input_scale`
    (the checkpoint's per-tensor activation scale for FP4 activations) is loaded but unused.
    """
    fmt = "nvfp4"
    _scale = "weight_scale"

    def __init__(self, in_features: int, out_features: int, dtype=None):
        super().__init__(in_features, out_features)
        self.weight = _empty((out_features, in_features // 2), torch.uint8)
        self.weight_scale = _empty((out_features, in_features // NVFP4_BLOCK), torch.float8_e4m3fn)
        self.weight_scale_2 = _empty((), torch.float32)
        self.input_scale = _empty((), torch.float32)

    _layout = staticmethod(nvfp4_to_kernel_layout)

    def _dequant(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return dequant_nvfp4(w, s, self.weight_scale_2)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear.nvfp4_linear(x, self.weight, self.weight_scale, self.weight_scale_2)

    @torch.no_grad()
    def set_float(self, w: torch.Tensor) -> None:
        q, s, g = quantize_nvfp4(w.float())
        self._store(q, s)
        self.weight_scale_2.copy_(g)
        self.input_scale.fill_(1.0)


_CLASSES = {"bf16": BF16Linear, "fp8": FP8Linear, "fp4": FP4Linear, "nvfp4": NVFP4Linear}


def split_k_pair(a: Linear, b: Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a.split_k(x), b.split_k(x)): two FP8 linears of the same decode-sized x in one kernel
    launch where they take the same launch shape (`quant_linear.fp8_linear_pair`)."""
    if isinstance(a, FP8Linear) and isinstance(b, FP8Linear):
        got = quant_linear.fp8_linear_pair(x, a.weight, a.scale, b.weight, b.scale)
        if got is not None:
            return got
    return a.split_k(x), b.split_k(x)


def make_linear(in_features: int, out_features: int, fmt: str, dtype=torch.bfloat16) -> Linear:
    """A linear layer in storage format `fmt` (bf16 | fp8 | fp4 | nvfp4)."""
    if fmt not in _CLASSES:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")
    return _CLASSES[fmt](in_features, out_features, dtype=dtype)
