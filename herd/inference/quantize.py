"""Quantized linear layers for serving, swapped in from outside like the packed CPU linears
(DESIGN principle 2: the model code does not change).

- FP8 (SPEC §5, paper §6.2): the FFN matmuls (w1, w2, w3) of every layer except the first and the
  last run in FP8 e4m3 with row-wise dynamic scales — one scale per output row of the weight, and
  one per token row of the activation, computed on the fly — while attention stays in the model's
  dtype. The activation's row maximum is bounded by 1200 before the scale is taken (the paper's
  "upper bound the dynamic scaling factors to 1200"; fbgemm's `quantize_fp8_row(scale_ub=1200)`),
  so a few huge activations cannot crush the resolution of everything else in their row. On CPU
  the FP8 matmul is emulated exactly: operands are rounded to `torch.float8_e4m3fn` and back, then
  multiplied in fp32 — what an FP8 tensor core computes, up to the order of the fp32 sums. On a
  CUDA GPU with FP8 support the same numbers go through `torch._scaled_mm`.
- int8 weight-only (CPU decoding is bound by streaming the weights from memory): every linear
  layer holds int8 weights with one symmetric scale per output channel — a quarter of the fp32
  bytes. Decode-sized inputs (≤ 8 rows) go through PyTorch's weight-only int8 kernel
  (`_weight_int8pack_mm`, with activations rounded to bf16, the dtype its vectorized CPU path
  takes); larger ones dequantize the weight once per call and stay fp32. Rounding
  activations too (fbgemm's dynamic int8 `quantized::linear_dynamic`, one scale per tensor) was
  measured and rejected: SmolLM2's massive activations (row maxima up to ~2800 against typical
  values near 1) wreck a shared 8-bit activation scale (mean next-token KL 1.1 vs 0.003).

- Llama 4 MoE layers: the routed experts are stacked (E, in, out) parameters, not linears, so they
  get their own modules with one scale per expert and output channel — `FP8Experts` (e4m3, as
  Meta's llama-models quantizes Llama 4's routed experts: `quantize_fp8_per_row` on each expert's
  (out, in) matrix, activations row-wise with the same bound) and `Int8Experts`. The shared
  expert is an FFN like any other (FP8Linear / Int8Linear); the router stays in the model's dtype
  (a few thousand weights that decide which expert runs).

`quantize(model, "fp8" | "int8")` applies a mode in place; `fp8_naive` is the baseline the FP8
test compares against (one scale per tensor, no bound, every layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import HerdError
from herd.inference.cpu_linear import pack_linears

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
ACT_SCALE_UB = 1200.0  # §6.2
MODES = ("int8", "fp8")


def _bias(linear: nn.Module) -> torch.Tensor | None:
    """The linear's bias, kept in high precision (the vision encoder's linears have one; dropping it
    silently changed a multimodal model's image features)."""
    b = getattr(linear, "bias", None)
    return None if b is None else b.detach().float().clone()


# ---- FP8 ----------------------------------------------------------------------------------------

def fp8_quantize(x: torch.Tensor, *, rowwise: bool, amax_ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) → (x in e4m3 (M, K), fp32 scale (M, 1) row-wise or (1, 1)) with x ≈ q · scale.
    amax_ub bounds the maximum the scale is taken from; values beyond it saturate at ±448·scale."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if rowwise else xf.abs().amax().reshape(1, 1)
    if amax_ub is not None:
        amax = amax.clamp(max=amax_ub)
    scale = amax.clamp(min=1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _scaled_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Real FP8 GEMMs need an FP8 GPU (compute capability 8.9+) and dimensions that are multiples
    of 16."""
    return (x.is_cuda and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(x.device) >= (8, 9)
            and x.shape[-1] % 16 == 0 and w.shape[0] % 16 == 0)


class FP8Linear(nn.Module):
    """y = x Wᵀ with W and x in FP8 e4m3, dynamically scaled (row-wise, or per tensor)."""

    def __init__(self, linear: nn.Module, *, rowwise: bool = True, act_scale_ub: float | None = ACT_SCALE_UB):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.rowwise, self.act_scale_ub = rowwise, act_scale_ub
        q, scale = fp8_quantize(w, rowwise=rowwise)  # weights are static: no bound needed
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale)  # (N, 1) or (1, 1)
        # CPU emulation multiplies the e4m3 values in fp32; they are exact in fp32, so keep that
        # copy rather than converting on every call.
        self.register_buffer("_weight_values", None if w.is_cuda else q.float(), persistent=False)
        self.register_buffer("bias", _bias(linear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        xq, xs = fp8_quantize(x2, rowwise=self.rowwise, amax_ub=self.act_scale_ub)
        if _scaled_mm_ok(x2, self.weight_fp8):
            out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale.t()
                                 if self.rowwise else self.weight_scale.reshape(()), out_dtype=out_dtype)
        else:
            w = self._weight_values if self._weight_values is not None else self.weight_fp8.float()
            y = (xq.float() @ w.t()) * xs * self.weight_scale.t()
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        scales = "row-wise" if self.rowwise else "per-tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 {scales}, " \
               f"activation amax bound={self.act_scale_ub}"


# ---- int8 ----------------------------------------------------------------------------------------

_INT8PACK_MAX_ROWS = 8  # beyond this many rows the kernel falls behind dequantize-then-matmul


class Int8Linear(nn.Module):
    """y = x Wᵀ with W in int8, one symmetric scale per output channel (weight-only: activations are
    not quantized; the decode kernel takes them in bf16)."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (N,)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", _bias(linear))
        self._scale_bf16 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type == "cpu" and x2.shape[0] <= _INT8PACK_MAX_ROWS and _HAS_INT8PACK:
            # Decoding: PyTorch's weight-only int8 kernel streams a quarter of the fp32 bytes. Its
            # vectorized CPU path takes bf16 activations (with fp32 ones it measured ~10x slower
            # than packed fp32), so they are rounded to bf16 for the call.
            if self._scale_bf16 is None:
                self._scale_bf16 = self.weight_scale.bfloat16()
            y = torch.ops.aten._weight_int8pack_mm(x2.bfloat16(), self.weight_int8, self._scale_bf16).to(x.dtype)
        else:  # many rows (prefill, big batches): dequantize once per call, then one matmul
            y = F.linear(x2, self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only per-channel"


_HAS_INT8PACK = hasattr(torch.ops.aten, "_weight_int8pack_mm")


# ---- Llama 4 routed experts ----------------------------------------------------------------------
# `Experts` holds w1, w3 (E, D, F) and w2 (E, F, D) and is called as experts(x, counts) with x's rows
# sorted by expert (herd/models/llama4.py). These replace it with the same call signature.

def _per_expert_rows(w: torch.Tensor) -> torch.Tensor:
    """(E, in, out) → (E·out, in): one row per expert and output channel, the layout row-wise scales
    are taken over (Meta quantizes `param.transpose(1, 2)`, each expert's (out, in) matrix)."""
    return w.detach().float().transpose(1, 2).reshape(-1, w.shape[1])


class FP8Experts(nn.Module):
    """Routed experts in FP8 e4m3: one weight scale per expert and output channel, activations
    quantized per token row (bounded by act_scale_ub) — FP8Linear's recipe, expert by expert."""

    def __init__(self, experts: nn.Module, *, rowwise: bool = True, act_scale_ub: float | None = ACT_SCALE_UB):
        super().__init__()
        self.rowwise, self.act_scale_ub = rowwise, act_scale_ub
        for name in ("w1", "w2", "w3"):
            w = getattr(experts, name)
            E, n_in, n_out = w.shape
            q, scale = fp8_quantize(_per_expert_rows(w), rowwise=rowwise)
            q = q.reshape(E, n_out, n_in).transpose(1, 2).contiguous()  # back to (E, in, out)
            self.register_buffer(f"{name}_fp8", q)
            self.register_buffer(f"{name}_scale", scale.expand(E * n_out, 1).reshape(E, n_out).contiguous())
            # As FP8Linear: the CPU emulation multiplies e4m3 values (exact in fp32) in fp32.
            self.register_buffer(f"_{name}_values", q.float(), persistent=False)

    def _mm(self, x: torch.Tensor, name: str, counts: torch.Tensor) -> torch.Tensor:
        from herd.models.llama4 import grouped_mm

        xq, xs = fp8_quantize(x, rowwise=self.rowwise, amax_ub=self.act_scale_ub)
        w = getattr(self, f"_{name}_values")
        ws = getattr(self, f"{name}_scale").repeat_interleave(counts, dim=0)  # each row its expert's scales
        return ((grouped_mm(xq.float(), w.to(x.device), counts) * xs) * ws).to(x.dtype)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        h = F.silu(self._mm(x, "w1", counts)) * self._mm(x, "w3", counts)
        return self._mm(h, "w2", counts)

    def extra_repr(self) -> str:
        E, D, Fh = self.w1_fp8.shape
        return f"experts={E}, dim={D}, hidden={Fh}, fp8 e4m3 {'row-wise' if self.rowwise else 'per-tensor'}, " \
               f"activation amax bound={self.act_scale_ub}"


class Int8Experts(nn.Module):
    """Routed experts in int8, weight-only: one symmetric scale per expert and output channel, as
    Int8Linear. Each expert that gets tokens is dequantized for the call (only those)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        for name in ("w1", "w2", "w3"):
            w = getattr(experts, name)
            E, n_in, n_out = w.shape
            rows = _per_expert_rows(w)
            scale = (rows.abs().amax(dim=1) / 127).clamp(min=1e-12)
            q = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self.register_buffer(f"{name}_int8", q.reshape(E, n_out, n_in).transpose(1, 2).contiguous())
            self.register_buffer(f"{name}_scale", scale.reshape(E, n_out))

    def _mm(self, x: torch.Tensor, name: str, counts: torch.Tensor) -> torch.Tensor:
        q, s = getattr(self, f"{name}_int8"), getattr(self, f"{name}_scale")
        out = [xe @ (q[e].to(x.dtype) * s[e].to(x.dtype)) for e, xe in enumerate(x.split(counts.tolist()))
               if xe.shape[0]]
        return torch.cat(out) if out else x.new_zeros(0, q.shape[-1])

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        h = F.silu(self._mm(x, "w1", counts)) * self._mm(x, "w3", counts)
        return self._mm(h, "w2", counts)

    def extra_repr(self) -> str:
        E, D, Fh = self.w1_int8.shape
        return f"experts={E}, dim={D}, hidden={Fh}, int8 weight-only per expert and channel"


# ---- applying a mode ----------------------------------------------------------------------------

def _is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear


def _is_experts(m: nn.Module | None) -> bool:
    from herd.models.llama4 import Experts

    return type(m) is Experts


@torch.no_grad()
def quantize(model: nn.Module, mode: str, *, rowwise: bool = True, act_scale_ub: float | None = ACT_SCALE_UB,
             skip_first_last: bool = True, pack_rest: bool = True) -> nn.Module:
    """Swap linear layers for quantized ones in place and return the model (eval, no grad).

    "fp8": the FFN linears of each layer (but the first and last, with `skip_first_last`) become
    FP8Linear(rowwise, act_scale_ub); in a Llama 4 MoE layer the routed experts become FP8Experts and
    the shared expert's linears FP8Linear. "int8": every linear, the output head included, becomes
    Int8Linear, and routed experts Int8Experts. The model must hold plain nn.Linear layers (herd.load(..., for_inference=False));
    with `pack_rest`, linears left in fp32 are then pre-packed for CPU (herd/inference/cpu_linear.py).
    """
    if mode not in MODES:
        raise HerdError(f"unknown quantization {mode!r}; expected one of {', '.join(MODES)}")
    if not any(_is_linear(m) for m in model.modules()):
        raise HerdError("nothing to quantize: load the model with for_inference=False (its linears are "
                        "pre-packed or already quantized)")
    if mode == "fp8":
        layers = list(model.layers)
        chosen = layers[1:-1] if skip_first_last else layers
        for layer in chosen:
            ffn = layer.feed_forward
            if _is_experts(getattr(ffn, "experts", None)):
                # A Llama 4 MoE layer has no w1/w2/w3 of its own (this raised AttributeError): its
                # FFN matmuls are the routed experts and the shared expert.
                ffn.experts = FP8Experts(ffn.experts, rowwise=rowwise, act_scale_ub=act_scale_ub)
                ffn = ffn.shared_expert
            for name in ("w1", "w2", "w3"):
                setattr(ffn, name, FP8Linear(getattr(ffn, name), rowwise=rowwise, act_scale_ub=act_scale_ub))
    else:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if _is_linear(child):
                    setattr(parent, name, Int8Linear(child))
                elif _is_experts(child):  # most of a MoE model's weights: left in fp32 before
                    setattr(parent, name, Int8Experts(child))
    if pack_rest:
        pack_linears(model)
    return model.eval().requires_grad_(False)


def fp8_naive(model: nn.Module) -> nn.Module:
    """The baseline §6.2's choices are measured against: one FP8 scale per tensor, no bound on the
    activation scale, every layer's FFN quantized."""
    return quantize(model, "fp8", rowwise=False, act_scale_ub=None, skip_first_last=False, pack_rest=False)
