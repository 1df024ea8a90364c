"""Linears on quantised weights: per-token FP8 activations times FP8 / MXFP4 / NVFP4 weights.

Reference (SPEC.md 3): quantise x per token in blocks of 128 to e4m3 with power-of-two scales,
multiply by the dequantised weight with fp32 accumulation, return the working dtype.

GPU (Hopper):
- `act_quant_fp8`: the exact activation quantisation as a kernel (e4m3 values + fp32 scales).
- `_qlinear_kernel`: one tile of y^T = W x^T ("swap AB": weight rows fill the 64/128-row side of
  the tensor-core MMA, tokens the narrow side, so a decode step with one token wastes no rows).
  FP8 weights run on FP8 tensor cores, one 128-deep MMA per K-block whose fp32 result is scaled
  by (weight block scale x token scale) and added to an fp32 accumulator. FP4 weights (MXFP4,
  NVFP4) are decoded in the kernel to bf16 with their per-32 / per-16 scales folded in: code x
  scale is exact in bf16, and so is (e4m3 activation x power-of-two scale), so a bf16 MMA with
  fp32 accumulation computes exactly the reference's products; only the summation order differs.
  Packed FP4 stays packed in memory. Small M splits K across CTAs to fill the GPU (and up to 16
  tokens quantises x inside the kernel, saving a launch); large M quantises once and, for FP8,
  uses cuBLAS block-scaled `torch._scaled_mm` (3-4x faster than this kernel at M >= 4096 on
  the H200, see benchmarks/bench_linear_moe.py).
The tile helpers (`_fp8_scales`, `_fp8_act`, `_act_scale`, `_act_chunk`, `_fp4_chunk`,
`_mma_fp8`) are shared with the grouped MoE kernel (moe.py).
"""
from __future__ import annotations

import logging
import os

import torch

from . import HAS_TRITON, num_sms, use_triton
from .pdl import l2_prefetch_depth, pdl
from ..quant.formats import dequant_fp8, dequant_mxfp4, dequant_nvfp4
from ..quant.sim import act_quant, act_quant_sim

_log = logging.getLogger(__name__)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Weight formats as the kernels know them (constexpr W_FMT).
FMT_FP8, FMT_MXFP4, FMT_NVFP4 = 0, 1, 2
FMT_BF16 = 3  # unquantised bf16 weights (bf16 checkpoints' experts, `moe.py`)
# Up to SMALL_M tokens the GEMM is memory-bound: narrow token tiles and split K. Up to
# FUSED_QUANT_MAX_M tokens it also quantises x itself (one launch fewer); by M = 128 the
# redundant per-tile quantisation costs more than the act_quant launch (H200: 15.2 vs 13.3 us,
# 61 vs 35 us; benchmarks/bench_linear_moe.py). From SCALED_MM_MIN_M on, FP8 linears use cuBLAS
# block-scaled _scaled_mm (H200, M = 4096: 60-270 us against this kernel's 129-938 us).
SMALL_M = 128
FUSED_QUANT_MAX_M = 16
SCALED_MM_MIN_M = 256


# ------------------------------------------------------------------------------- references
def linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """SPEC.md 3 with the dequantised weight w [N, K] (fp32)."""
    y = act_quant_sim(x) @ w.t()
    return y.to(x.dtype)


def fp8_linear_ref(x, weight, scale):
    return linear_ref(x, dequant_fp8(weight, scale))


def mxfp4_linear_ref(x, weight, scale):
    return linear_ref(x, dequant_mxfp4(weight, scale))


def nvfp4_linear_ref(x, weight, weight_scale, weight_scale_2):
    return linear_ref(x, dequant_nvfp4(weight, weight_scale, weight_scale_2))


# ------------------------------------------------------------------------------- public ops
def act_quant_fp8(x: torch.Tensor, rows: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, K/128]) exactly as SPEC.md 3; of x[rows]
    when `rows` is given (the gather fused into the pass on the GPU)."""
    if use_triton(x):
        return _act_quant_cuda(x, rows=rows)
    return act_quant(x if rows is None else x[rows])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               parts: bool = False) -> torch.Tensor:
    """x [..., K] (working dtype), weight e4m3 [N, K], scale e8m0 [N/128, K/128] -> [..., N].

    `parts`: the product as split-K partial sums [S, ..., N] instead, fp32 when S > 1 (x's
    dtype when S = 1, which is every path but the small-M kernel's): their fp32 sum rounded
    to x's dtype is the product. A consumer that sums them itself (`rmsnorm_split`, `hc_post`)
    saves the summing launch."""
    if use_triton(x) and _kernel_shape_ok(x, weight.shape[1]):
        return _qlinear_cuda(x, FMT_FP8, weight, scale, None, parts=parts)
    y = fp8_linear_ref(x, weight, scale)
    return y[None] if parts else y


def mxfp4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K], weight packed e2m1 [N, K/2], scale e8m0 [N, K/32] -> [..., N]."""
    if use_triton(x) and _kernel_shape_ok(x, weight.shape[1] * 2):
        return _qlinear_cuda(x, FMT_MXFP4, weight.view(torch.uint8), scale.view(torch.uint8), None)
    return mxfp4_linear_ref(x, weight, scale)


def nvfp4_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 weight_scale_2: torch.Tensor) -> torch.Tensor:
    """x [..., K], weight packed e2m1 [N, K/2], e4m3 scale [N, K/16], fp32 global -> [..., N]."""
    if use_triton(x) and _kernel_shape_ok(x, weight.shape[1] * 2):
        return _qlinear_cuda(x, FMT_NVFP4, weight.view(torch.uint8),
                             weight_scale.view(torch.uint8), weight_scale_2.float().reshape(1))
    return nvfp4_linear_ref(x, weight, weight_scale, weight_scale_2)


def _kernel_shape_ok(x: torch.Tensor, k: int) -> bool:
    return (x.shape[-1] == k and k % 128 == 0
            and x.dtype in (torch.bfloat16, torch.float32, torch.float16))


# ------------------------------------------------------------------------------- launchers
_SCALED_MM_OK: dict = {}


def act_quant_values(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> the exact values e4m3 * scale of its FP8 quantisation (SPEC.md 3), in bf16:
    a power-of-two scale times an e4m3 value is a bf16 value, so the tensor cores can take the
    quantised activations without their scales. `rows` [R] (integer): output row i is x's row
    rows[i] (the gather fused into the pass). CUDA only (the MoE kernels' large batches)."""
    return _act_quant_cuda(x, values=True, rows=rows)[0]


def _act_quant_cuda(x: torch.Tensor, values: bool = False, pad_to: int = 1,
                    rows: torch.Tensor | None = None, scales_t: bool = False):
    """Codes and scales of x [M, K] (or of x[rows]) (or their products, `values`), with the
    rows padded with zeros (code 0, a finite scale) to a multiple of `pad_to`. `scales_t`:
    the scales [M, K/128] column-major (the transpose of a contiguous [K/128, M]), as cuBLAS's
    block-scaled GEMM takes them."""
    x = x.contiguous()
    m, k = x.shape if rows is None else (rows.numel(), x.shape[1])
    if k % 128:
        raise ValueError(f"act_quant needs K % 128 == 0, got {k}")
    mo = -(-m // pad_to) * pad_to
    q = torch.empty(mo, k, dtype=torch.bfloat16 if values else torch.float8_e4m3fn,
                    device=x.device)
    s = torch.empty(mo, 0 if values else k // 128, dtype=torch.float32, device=x.device)
    if scales_t and not values:
        s = torch.empty(k // 128, mo, dtype=torch.float32, device=x.device).t()
    if mo:
        src = rows.contiguous() if rows is not None else x.new_empty(0, dtype=torch.int64)
        _act_quant_kernel[(triton.cdiv(mo, 32), k // 128)](
            x, q, s, src, m, mo, k, BR=32, VALUES=values, GATHER=rows is not None,
            S_T=scales_t, num_warps=4, **pdl())
    return q, s


def _small_m_config(m: int, n: int) -> tuple[int, int, int, int]:
    """(BW, BT, num_warps, num_stages) for the memory-bound regime: wide weight tiles with a
    deeper pipeline for N >= 4096 (3-13% faster on the H200, `bench_linear_moe.py --only
    linear-sweep`)."""
    bt = 16 if m <= 16 else 32 if m <= 32 else 64
    if n >= 4096:
        return 128, bt, 8 if bt == 16 else 4, 4
    return 64, bt, 4, 3


def _qlinear_cuda(x, fmt: int, weight, scale, gscale, path: str = "auto",
                  cfg: dict | None = None, parts: bool = False) -> torch.Tensor:
    """Launcher for every quantised linear. `path` (auto | fused | triton | scaled_mm) and
    `cfg` (launch overrides: bw, bt, warps, split, stages, kc) exist for the tests and
    benchmarks that compare paths and launch shapes; the model always uses the defaults.
    `parts`: the unsummed split-K partials [S, ..., N] (`fp8_linear`)."""
    y = _qlinear_parts(x, fmt, weight, scale, gscale, path, cfg)
    if parts:
        return y
    if y.shape[0] == 1:
        return y[0]
    return sum_splits_(y, torch.empty(y.shape[1:], dtype=x.dtype, device=x.device))


def _qlinear_parts(x, fmt: int, weight, scale, gscale, path: str = "auto",
                   cfg: dict | None = None) -> torch.Tensor:
    """`scale`: the block scales as uint8 bytes, or (FP8) the e8m0 tensor itself, on which
    `_fp32_scales` keeps cuBLAS's fp32 copy."""
    owner = scale
    scale = scale.view(torch.uint8)
    k = x.shape[-1]
    n = weight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(1, *lead, n)
    if path == "auto":
        if m <= FUSED_QUANT_MAX_M:
            path = "fused"
        elif fmt == FMT_FP8 and m >= SCALED_MM_MIN_M and _SCALED_MM_OK.get((x.device, n, k), True):
            path = "scaled_mm"
        else:
            path = "triton"
    if path == "scaled_mm":
        # cuBLAS's block-scaled GEMM needs M % 4 == 0 (CUBLAS_STATUS_NOT_SUPPORTED otherwise,
        # H200, torch 2.11): pad the activation rows, drop the extra outputs
        q, s = _act_quant_cuda(x2, pad_to=4, scales_t=True)
        try:
            y = _scaled_mm_blockwise(q, s, weight, owner, x.dtype)
            return y[:m].reshape(1, *lead, n)
        except torch.cuda.OutOfMemoryError:  # transient: must not switch the path for good
            raise
        except (RuntimeError, NotImplementedError) as exc:  # cuBLAS < 12.9, say
            _SCALED_MM_OK[(x.device, n, k)] = False
            _log.warning("FP8 linear %dx%d: cuBLAS block-scaled _scaled_mm failed (%s); "
                         "using the Triton kernel for it from now on", n, k,
                         str(exc).splitlines()[0][:200])
            path = "triton"
    g = gscale if gscale is not None else x2  # the global scale is read for NVFP4 only
    path, a, sa, c = _launch_shape(x2, fmt, n, k, path, cfg)
    out = torch.empty(c["split"], m, n, dtype=torch.float32 if c["split"] > 1 else x.dtype,
                      device=x.device)
    grid = (triton.cdiv(n, c["bw"]), triton.cdiv(m, c["bt"]), c["split"])
    _qlinear_kernel[grid](a, sa, weight, scale, g, out, m, n, k, c["per"],
                          weight, scale, out, n, grid[0],
                          W_FMT=fmt, QUANT_X=path == "fused", BW=c["bw"], BT=c["bt"], KC=c["kc"],
                          PREFETCH=(bool(c["prefetch"]) and weight.data_ptr() % 16 == 0
                                    and not _INTERPRET),
                          num_warps=c["warps"], num_stages=c["stages"], **pdl())
    return out.view(c["split"], *lead, n)


def _launch_shape(x2, fmt: int, n: int, k: int, path: str, cfg: dict | None):
    """(path, kernel input, its scales, launch parameters) of `_qlinear_kernel` for x2 [M, K]
    (path "fused" or "triton" here; "fused" quantises x in the kernel)."""
    m = x2.shape[0]
    nkb = k // 128
    if path == "fused" and m > SMALL_M:  # fusion is a small-M tool only
        path = "triton"
    if path == "fused":
        a, sa = x2, x2
    else:
        a, sa = _act_quant_cuda(x2)
    if m <= SMALL_M:  # memory-bound: narrow token tiles, split K to fill the GPU
        bw, bt, warps, stages = _small_m_config(m, n)
        split = None
    else:
        bw, bt, warps, split, stages = 128, 128, 8, 1, 3
    c = dict(bw=bw, bt=bt, warps=warps, split=split, stages=stages, kc=32,
             prefetch=m <= SMALL_M and l2_prefetch_depth() > 0)
    c.update(cfg or {})
    split = c["split"]
    if split is None:
        tiles = triton.cdiv(n, c["bw"]) * triton.cdiv(m, c["bt"])
        split = max(1, min(nkb // 2, (2 * num_sms(x2.device)) // tiles))
    c["per"] = triton.cdiv(nkb, split)
    c["split"] = triton.cdiv(nkb, c["per"])
    return path, a, sa, c


def fp8_linear_pair(x: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor, w2: torch.Tensor,
                    s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(fp8_linear(x, w1, s1, parts=True), fp8_linear(x, w2, s2, parts=True)), bit for bit,
    in one launch, for decode-sized x (up to FUSED_QUANT_MAX_M rows) when both products take
    the same launch shape (the attention's wkv and wq_a: one kernel fewer a layer); None when
    they would not (the caller makes two calls)."""
    if not (use_triton(x) and x.dim() == 2 and 0 < x.shape[0] <= FUSED_QUANT_MAX_M
            and w1.shape[1] == w2.shape[1] == x.shape[1] and _kernel_shape_ok(x, x.shape[1])
            and w1.data_ptr() % 16 == 0 and w2.data_ptr() % 16 == 0):
        return None
    x2 = x.contiguous()
    m, k = x2.shape
    (n1, _), (n2, _) = w1.shape, w2.shape
    _, a, sa, c = _launch_shape(x2, FMT_FP8, n1, k, "fused", None)
    if _launch_shape(x2, FMT_FP8, n2, k, "fused", None)[3] != c:
        return None
    s1, s2 = s1.view(torch.uint8), s2.view(torch.uint8)
    dt = torch.float32 if c["split"] > 1 else x.dtype
    out1 = torch.empty(c["split"], m, n1, dtype=dt, device=x.device)
    out2 = torch.empty(c["split"], m, n2, dtype=dt, device=x.device)
    t1 = triton.cdiv(n1, c["bw"])
    grid = (t1 + triton.cdiv(n2, c["bw"]), triton.cdiv(m, c["bt"]), c["split"])
    _qlinear_kernel[grid](a, sa, w1, s1, x2, out1, m, n1, k, c["per"], w2, s2, out2, n2, t1,
                          W_FMT=FMT_FP8, QUANT_X=True, BW=c["bw"], BT=c["bt"], KC=c["kc"],
                          PREFETCH=bool(c["prefetch"]) and not _INTERPRET, PAIR=True,
                          num_warps=c["warps"], num_stages=c["stages"], **pdl())
    return out1, out2


def sum_parts(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The product that split-K partials [S, ...] stand for (`fp8_linear(parts=True)`): their
    fp32 sum rounded once to `dtype` (a tensor without the S dimension passes through). The
    references of the ops that take partials (`rmsnorm_split`, `hc_post`)."""
    return parts[0].to(dtype) if parts.shape[0] == 1 else parts.float().sum(0).to(dtype)


def sum_splits_(part: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y = the fp32 sum of split-K partials part [S, *y.shape] (contiguous), rounded once to
    y's dtype (also the grouped wo_a kernel's, grouped_linear.py). CUDA only."""
    s, n = part.shape[0], y.numel()
    _sum_splits_kernel[(triton.cdiv(n, 1024),)](part, y, n, s, BLOCK=1024,
                                                SP=triton.next_power_of_2(s), num_warps=4, **pdl())
    return y


def _scaled_mm_blockwise(q, s, weight, scale, out_dtype) -> torch.Tensor:
    """cuBLAS block-scaled FP8 GEMM: scales 1x128 (activations, outer-dim-major: no copy when
    `_act_quant_cuda(scales_t=True)` wrote them) x 128x128 (e8m0 or its uint8 bytes, as fp32:
    `_fp32_scales`; or already fp32)."""
    sb = scale if scale.dtype == torch.float32 else _fp32_scales(scale)
    return torch._scaled_mm(q, weight.t(), scale_a=s.t().contiguous().t(), scale_b=sb.t(),
                            out_dtype=out_dtype)


def _fp32_scales(scale: torch.Tensor) -> torch.Tensor:
    """A weight's e8m0 block scales [N/128, K/128] (or their uint8 bytes) as fp32, converted
    once per tensor and version and kept on it (the layer's parameter: gone with it) instead
    of once per call, a small kernel before every GEMM (17 a decode step). Under CUDA graph
    capture a conversion not made before is made in the graph, not kept."""
    key = (scale.data_ptr(), scale._version, tuple(scale.shape), scale.dtype)
    hit = getattr(scale, "_dsv4_fp32_scales", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    sw = scale.view(torch.float8_e8m0fnu).float()
    if hit is not None and (hit[0][0], hit[0][2:]) == (key[0], key[2:]):
        # the weight changed in place: the same buffer again (graphs captured earlier read it)
        hit[1].copy_(sw)
        sw = hit[1]
    if not (sw.is_cuda and torch.cuda.is_current_stream_capturing()):
        scale._dsv4_fp32_scales = (key, sw)
    return sw


# e2m1 -> e4m3 of a 32-bit word's 4 packed bytes: $0 the low nibbles' codes, $1 the high
# nibbles', each byte the code's value times 2^-6 (`_e2m1_e4m3_nibbles`; the Gluon MoE kernel)
E2M1_E4M3_PTX = """{
    .reg .b32 t;
    shl.b32 $0, $2, 2;
    and.b32 $0, $0, 0x1C1C1C1C;
    shl.b32 t, $2, 4;
    and.b32 t, t, 0x80808080;
    or.b32 $0, $0, t;
    shr.b32 $1, $2, 2;
    and.b32 $1, $1, 0x1C1C1C1C;
    and.b32 t, $2, 0x80808080;
    or.b32 $1, $1, t;
    }"""


# ------------------------------------------------------------------------------- kernels
if HAS_TRITON:
    import triton
    import triton.language as tl

    from .pdl import l2_prefetch, pdl_start

    _E2M1_E4M3_PTX = tl.constexpr(E2M1_E4M3_PTX)

    @triton.jit
    def _pow2ceil(v):
        """(2^ceil(log2 v), its reciprocal) for positive normal fp32 v, from the exponent bits."""
        bits = v.to(tl.int32, bitcast=True)
        e = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        return (e << 23).to(tl.float32, bitcast=True), ((254 - e) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _quant_block(x):
        """fp32 [R, 128] -> (e4m3 [R, 128], scale [R]): SPEC.md 3, bit-exact (IEEE divide)."""
        amax = tl.max(tl.abs(x), axis=1)
        s, inv = _pow2ceil(tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0))
        # x * inv == x / s exactly: inv is a power of two.
        q = tl.minimum(tl.maximum(x * inv[:, None], -448.0), 448.0).to(tl.float8e4nv)
        return q, s

    @triton.jit
    def _act_tile(x_ptr, rows, ok, kb, K, live):
        """Activation rows `rows` [R], K-block kb: [R, 128] in x's dtype (zero unless live)."""
        k = kb * 128 + tl.arange(0, 128)
        return tl.load(x_ptr + rows[:, None].to(tl.int64) * K + k[None, :],
                       mask=ok[:, None] & live, other=0.0)

    @triton.jit
    def _fp8_wscale(ws_ptr, rows, row_ok, kb, K, live):
        """The e8m0 scale of weight rows [BW] in K-block kb (128 x 128 blocks) as fp32."""
        sb = tl.load(ws_ptr + (rows // 128) * (K // 128) + kb, mask=row_ok & live, other=0)
        return _e8m0_f32(sb.to(tl.int32))

    @triton.jit
    def _fp8_scales(sx_ptr, ws_ptr, toks, tok_ok, rows, row_ok, kb, K, live,
                    LOAD_S: tl.constexpr):
        """The scales of K-block kb of an FP8 MMA (zero unless live): the tokens' [BT] (when
        LOAD_S, else zeros) and the weight block's [BW]. Triton's pipeliner prefetches only
        loads that feed a dot operand; the loops load these one iteration ahead themselves
        (loaded where they are used, each would stall its iteration for a memory round trip)."""
        s = tl.zeros(toks.shape, dtype=tl.float32)
        if LOAD_S:
            s = tl.load(sx_ptr + toks.to(tl.int64) * (K // 128) + kb, mask=tok_ok & live,
                        other=0.0)
        return s, _fp8_wscale(ws_ptr, rows, row_ok, kb, K, live)

    @triton.jit
    def _fp8_act(s, x_ptr, toks, tok_ok, kb, K, QUANT: tl.constexpr):
        """K-block kb's activations for the MMA: (e4m3 [BT, 128], scale [BT]), quantised here
        from the working dtype when QUANT, else loaded pre-quantised with the prefetched
        scales s."""
        a = _act_tile(x_ptr, toks, tok_ok, kb, K, True)
        if QUANT:
            q, s = _quant_block(a.to(tl.float32))
        else:
            q = a
        return q, s

    @triton.jit
    def _e8m0_f32(b):
        """e8m0 byte (int32 0..254) -> 2^(b-127) as fp32."""
        return tl.where(b == 0, 5.877471754111438e-39, (b << 23).to(tl.float32, bitcast=True))

    @triton.jit
    def _e4m3_f32(b):
        """e4m3 byte (uint8) -> fp32."""
        return b.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)

    @triton.jit
    def _e2m1_f32(p):
        """Packed e2m1 bytes -> the exact fp32 values of (low nibble, high nibble). Each code's
        3 magnitude bits go into an fp32's exponent and mantissa (that float is value * 2^-126
        for every code, the subnormal 0.5 included), the sign into bit 31; then times 2^126."""
        p = p.to(tl.int32)
        lo = (((p & 7) << 22) | ((p & 8) << 28)).to(tl.float32, bitcast=True)
        hi = (((p & 0x70) << 18) | ((p & 0x80) << 24)).to(tl.float32, bitcast=True)
        return lo * 8.507059173023462e37, hi * 8.507059173023462e37

    @triton.jit
    def _e2m1_e4m3_nibbles(p, ASM: tl.constexpr):
        """Packed e2m1 bytes -> e4m3 bytes of (low nibble, high nibble), each the code's value
        times 2^-6: the 3 magnitude bits go straight into e4m3's exponent and mantissa (the
        subnormal 0.5 lands on e4m3's subnormal), the sign into bit 7. ASM (PTX, GPU only)
        decodes 4 bytes per 32-bit instruction."""
        if ASM:
            lo, hi = tl.inline_asm_elementwise(
                asm=_E2M1_E4M3_PTX, constraints="=r,=r,r", args=[p], dtype=(tl.uint8, tl.uint8),
                is_pure=True, pack=4)
        else:
            lo = ((p << 2) & 0x1C) | ((p << 4) & 0x80)
            hi = ((p >> 2) & 0x1C) | (p & 0x80)
        return lo, hi

    @triton.jit
    def _fp4_chunk(w_ptr, s_ptr, rows, row_ok, kb, c, K, NV: tl.constexpr, KC: tl.constexpr,
                   TILED: tl.constexpr = False):
        """Packed e2m1 rows [BW], K-chunk c (KC wide) of K-block kb -> exact bf16 [BW, KC] with
        the block scales folded in (s_ptr: e8m0 [N, K/32] for MXFP4, e4m3 [N, K/16] for NVFP4,
        as bytes). Narrow chunks keep the decode's registers small, wide ones load more bytes
        per instruction. The MoE kernels' layout (`formats.*_to_kernel_layout`): TILED, 64-row
        groups with contiguous K-blocks (the MoE decodes its MXFP4 experts, whose bytes also
        hold codes b and b + 16 of each 32-block, with `moe._mxfp4_bf16`)."""
        G: tl.constexpr = 16 if NV else 32
        SPK: tl.constexpr = 128 // G  # scales per row and K-block
        j = tl.arange(0, KC // 2)
        if TILED:
            grp = (rows // 64).to(tl.int64)
            w_at = grp * (32 * K) + (rows % 64) * 64 + kb * 4096
            s_at = grp * (64 * (K // G)) + (rows % 64) * SPK + kb * (64 * SPK)
        else:
            w_at = rows.to(tl.int64) * (K // 2) + kb * 64
            s_at = rows.to(tl.int64) * (K // G) + kb * SPK
        p = tl.load(w_ptr + w_at[:, None] + c * (KC // 2) + j[None, :], mask=row_ok[:, None],
                    other=0)
        lo, hi = _e2m1_f32(p)
        # one scale per G elements = G/2 bytes: load the chunk's NS scales, widen to the bytes
        NS: tl.constexpr = KC // G
        si = tl.arange(0, NS)
        sb = tl.load(s_ptr + s_at[:, None] + c * NS + si[None, :], mask=row_ok[:, None], other=0)
        if NV:
            f = _e4m3_f32(sb)
        else:
            f = _e8m0_f32(sb.to(tl.int32))
        f = tl.reshape(tl.broadcast_to(f[:, :, None], (f.shape[0], NS, G // 2)),
                       (f.shape[0], KC // 2))
        lo = (lo * f).to(tl.bfloat16)
        hi = (hi * f).to(tl.bfloat16)
        R: tl.constexpr = lo.shape[0]
        # element 2j is the low nibble of byte j
        return tl.reshape(tl.join(lo, hi), (R, KC))

    @triton.jit
    def _act_chunk(x_ptr, rows, ok, kb, c, K, s, inv, QUANT: tl.constexpr, KC: tl.constexpr):
        """Activation rows [R], K-chunk c (KC wide) of K-block kb, as the exact bf16 values
        (e4m3 * s) the reference multiplies; quantised here (scale s, 1/s = inv) when QUANT."""
        k = kb * 128 + c * KC + tl.arange(0, KC)
        v = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + k[None, :], mask=ok[:, None], other=0.0)
        if QUANT:
            v = tl.minimum(tl.maximum(v.to(tl.float32) * inv[:, None], -448.0), 448.0)
            v = v.to(tl.float8e4nv)
        return (v.to(tl.float32) * s[:, None]).to(tl.bfloat16)

    @triton.jit
    def _act_scale(x_ptr, sx_ptr, rows, ok, kb, K, QUANT: tl.constexpr):
        """(scale, 1/scale) [R] of activation rows for K-block kb: computed from the block's
        amax when QUANT, else loaded (the reciprocal is then unused)."""
        if QUANT:
            k = kb * 128 + tl.arange(0, 128)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + k[None, :], mask=ok[:, None],
                        other=0.0).to(tl.float32)
            s, inv = _pow2ceil(tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4), 448.0))
        else:
            s = tl.load(sx_ptr + rows.to(tl.int64) * (K // 128) + kb, mask=ok, other=0.0)
            inv = s
        return s, inv

    @triton.jit
    def _mma_fp8(acc, q, s, w_ptr, ws, rows, row_ok, kb, K):
        """acc [BW, BT] += (W block kb) @ (q * s)^T on FP8 tensor cores, promoted to fp32 per
        128-deep block with the weight block scale ws [BW] (fp32) x token scale s [BT]."""
        k = kb * 128 + tl.arange(0, 128)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + k[None, :], mask=row_ok[:, None],
                    other=0.0)
        return acc + tl.dot(w, tl.trans(q)) * (ws[:, None] * s[None, :])

    @triton.jit(do_not_specialize=["S"])  # numel is the partials' row stride: kept aligned
    def _sum_splits_kernel(part_ptr, y_ptr, numel, S, BLOCK: tl.constexpr, SP: tl.constexpr,
                           PDL: tl.constexpr = False):
        """y = the fp32 sum of the S split-K partials [S, numel], rounded once to y's dtype
        (one launch where torch takes a reduction and a cast)."""
        pdl_start(PDL)
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        sp = tl.arange(0, SP)
        v = tl.load(part_ptr + sp[:, None].to(tl.int64) * numel + i[None, :],
                    mask=(sp < S)[:, None] & (i < numel)[None, :], other=0.0)
        tl.store(y_ptr + i, tl.sum(v, 0).to(y_ptr.dtype.element_ty), mask=i < numel)

    @triton.jit(do_not_specialize=["M", "MO"])
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, src_ptr, M, MO, K, BR: tl.constexpr,
                          VALUES: tl.constexpr = False, GATHER: tl.constexpr = False,
                          S_T: tl.constexpr = False, PDL: tl.constexpr = False):
        """e4m3 codes and scales, or (VALUES) their exact products in bf16, of rows < M (of
        x's rows src[row] with GATHER); rows M .. MO-1 (padding) get the codes of zeros.
        S_T: the scales stored [K/128, MO] (column-major [MO, K/128])."""
        pdl_start(PDL)
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        kb = tl.program_id(1)
        src = rows
        if GATHER:
            src = tl.load(src_ptr + rows, mask=rows < M, other=0)
        q, s = _quant_block(_act_tile(x_ptr, src, rows < M, kb, K, True).to(tl.float32))
        k = kb * 128 + tl.arange(0, 128)
        ok = rows < MO
        if VALUES:
            tl.store(q_ptr + rows[:, None].to(tl.int64) * K + k[None, :],
                     (q.to(tl.float32) * s[:, None]).to(tl.bfloat16), mask=ok[:, None])
        else:
            tl.store(q_ptr + rows[:, None].to(tl.int64) * K + k[None, :], q, mask=ok[:, None])
            if S_T:
                tl.store(s_ptr + kb * MO + rows, s, mask=ok)
            else:
                tl.store(s_ptr + rows.to(tl.int64) * (K // 128) + kb, s, mask=ok)

    @triton.jit(do_not_specialize=["M", "kb_per_split"])
    def _qlinear_kernel(x_ptr, sx_ptr, w_ptr, ws_ptr, g_ptr, y_ptr, M, N, K, kb_per_split,
                        w2_ptr, ws2_ptr, y2_ptr, N2, NT1,
                        W_FMT: tl.constexpr, QUANT_X: tl.constexpr,
                        BW: tl.constexpr, BT: tl.constexpr, KC: tl.constexpr = 32,
                        PREFETCH: tl.constexpr = False, PAIR: tl.constexpr = False,
                        PDL: tl.constexpr = False):
        """y[split, tok, row] = sum over this split's K-blocks; grid (N/BW, M/BT, splits).
        PREFETCH: the CTA's weight bytes are requested into L2 before it waits for the previous
        kernel (`pdl.l2_prefetch`). PAIR (FP8): weight tiles NT1 and up are a second product
        of the same x, w2 [N2, K] (scales ws2) into y2 (`fp8_linear_pair`)."""
        tile = tl.program_id(0)
        if PAIR:
            if tile >= NT1:
                w_ptr, ws_ptr, y_ptr, N, tile = w2_ptr, ws2_ptr, y2_ptr, N2, tile - NT1
        rows = tile * BW + tl.arange(0, BW)
        toks = tl.program_id(1) * BT + tl.arange(0, BT)
        split = tl.program_id(2)
        row_ok = rows < N
        tok_ok = toks < M
        kb0 = split * kb_per_split
        kb1 = tl.minimum(kb0 + kb_per_split, K // 128)
        BPK: tl.constexpr = 128 if W_FMT == 0 else 64  # weight bytes a row and K-block
        w_rows = w_ptr + tl.minimum(rows, N - 1).to(tl.int64) * (K // 128 * BPK)
        l2_prefetch(w_rows + kb0 * BPK, tl.maximum(kb1 - kb0, 1) * BPK, PREFETCH)
        pdl_start(PDL)
        acc = tl.zeros((BW, BT), dtype=tl.float32)
        if W_FMT == 0:  # scales one K-block ahead (`_fp8_scales`)
            sn, wn = _fp8_scales(sx_ptr, ws_ptr, toks, tok_ok, rows, row_ok, kb0, K, kb0 < kb1,
                                 not QUANT_X)
        for kb in range(kb0, kb1):
            if W_FMT == 0:
                sc, wc = sn, wn
                sn, wn = _fp8_scales(sx_ptr, ws_ptr, toks, tok_ok, rows, row_ok, kb + 1, K,
                                     kb + 1 < kb1, not QUANT_X)
                q, s = _fp8_act(sc, x_ptr, toks, tok_ok, kb, K, QUANT_X)
                acc = _mma_fp8(acc, q, s, w_ptr, wc, rows, row_ok, kb, K)
            else:
                s, inv = _act_scale(x_ptr, sx_ptr, toks, tok_ok, kb, K, QUANT_X)
                for c in tl.static_range(128 // KC):
                    a = _act_chunk(x_ptr, toks, tok_ok, kb, c, K, s, inv, QUANT_X, KC)
                    w = _fp4_chunk(w_ptr, ws_ptr, rows, row_ok, kb, c, K, W_FMT == 2, KC)
                    acc = tl.dot(w, tl.trans(a), acc)
        if W_FMT == 2:
            acc = acc * tl.load(g_ptr)
        y = y_ptr + split.to(tl.int64) * M * N + toks[None, :].to(tl.int64) * N + rows[:, None]
        tl.store(y, acc, mask=row_ok[:, None] & tok_ok[None, :])
