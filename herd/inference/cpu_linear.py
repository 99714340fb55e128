"""Pre-packed linear layers for fast fp32 inference on CPU.

Decoding one token is a chain of matrix-vector products bound by how fast weights stream from
memory. With PyTorch's default (out, in) row-major weights, MKL's fp32 GEMV streamed SmolLM2's small
matrices at ~12 GB/s on this project's first 2-core machines; the same weights reordered once into
oneDNN's blocked layout streamed at ~19 GB/s, and its 49152×576 output matrix at ~27 instead of
~11 GB/s (bench/decode.py measures the effect end to end). On another machine the plain GEMV was
the faster one, so `pack_linears` times both per shape at load and packs only where packing wins.
The packing is the one PyTorch's own inductor applies when it freezes a CPU model
(`mkldnn::_reorder_linear_weight`).

Applied from outside, like quantization (DESIGN principle 2): each `nn.Linear` is swapped for a
`PackedLinear` under the same attribute name, so the model code is unchanged. Packed layers have no
backward; a model loaded for training is left as it is.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from herd.errors import HerdError


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """y = x Wᵀ (+ b) with W held in oneDNN's blocked layout (inference only). The bias (the vision
    encoder's linears, attention_bias / mlp_bias Llama models) goes into the same oneDNN call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Tuned for one row (batch_size=1), the decode case; prefill's many rows still gain.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.training:
            raise HerdError("this model was packed for inference (herd.load(..., for_inference=True)); "
                            "load it with for_inference=False to train")
        if torch.compiler.is_compiling():  # inductor lowers this op only for weights it froze itself
            raise HerdError("a model with pre-packed CPU linears cannot be torch.compiled; "
                            "load it with for_inference=False to compile")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, packed=oneDNN"


@torch.no_grad()
def pack_linears(model: nn.Module, *, tune: bool = True) -> nn.Module:
    """Swap fp32 CPU `nn.Linear`s in `model` for PackedLinears, in place; a no-op where oneDNN is
    unavailable or the weights live elsewhere (GPU) or in another dtype.

    Which layout streams faster depends on the machine: the blocked one won by 1.5–2× on the
    project's first machines, while on an AVX-512 Xeon MKL's plain GEMV was 1.1–2.2× faster for every
    SmolLM2 shape but the output head (a tie). So with `tune` each shape of linear is packed only if
    one row (a decoding step) through the packed layers of that shape beats the plain product here by
    5%, timed on the model's own weights at the current thread count; `tune=False` packs them all."""
    if not packing_available():
        return model
    groups: dict[tuple, list[tuple[nn.Module, str, nn.Linear]]] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            w = getattr(child, "weight", None)
            if (type(child) is nn.Linear and w.device.type == "cpu" and w.dtype == torch.float32
                    and (child.bias is None or child.bias.dtype == torch.float32)):
                groups.setdefault((*w.shape, child.bias is not None), []).append((parent, name, child))
    for members in groups.values():
        linears = [child for _, _, child in members]
        if tune and not packed_is_faster(linears):
            continue
        for parent, name, child in members:
            setattr(parent, name, PackedLinear(child))
    return model.eval().requires_grad_(False)


TUNE_BYTES = 64 * 2**20  # weights streamed per timed pass: well past the caches, as in decoding
TUNE_ROUNDS = 7
MARGIN = 0.95


@torch.no_grad()
def packed_is_faster(linears: list[nn.Linear], clock=time.perf_counter) -> bool:
    """Whether one row through these same-shaped linears runs `MARGIN` times faster packed than plain:
    medians of `TUNE_ROUNDS` interleaved passes over as many of them as stream `TUNE_BYTES` (at least
    one)."""
    per = linears[0].weight.numel() * 4
    plain = linears[:max(1, -(-TUNE_BYTES // per))]
    packed = [PackedLinear(lin).eval() for lin in plain]
    x = torch.randn(1, linears[0].in_features)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(TUNE_ROUNDS + 1):  # round 0 warms both up and is not counted
        for is_packed in ((False, True) if r % 2 else (True, False)):
            layers = packed if is_packed else plain
            t = clock()
            for layer in layers:
                layer(x)
            if r:
                times[is_packed].append(clock() - t)
    # a clear win only: a plain nn.Linear can still be compiled or quantized
    return statistics.median(times[True]) < MARGIN * statistics.median(times[False])
