"""Weight memory layout for fast CPU decoding.

Decoding one token is a chain of matrix-vector products bound by how fast weights stream from
memory. MKL's fp32 GEMV streams a weight stored input-major ((in, out) contiguous) about twice as
fast as the (out, in) rows PyTorch keeps by default (bench/decode.py: 24 vs 11 GB/s for SmolLM2's
49152×576 output matrix on 2 cores). We keep every parameter's shape and name — only the strides
change — so the model code, state dicts and checkpoint writers see nothing different.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def use_input_major_weights(model: nn.Module) -> nn.Module:
    """Re-lay every 2-D Linear/Embedding weight as the transpose of a contiguous (in, out) tensor.
    Tied parameters are the same object and are converted once. Only worth it on CPU."""
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, nn.Linear | nn.Embedding):
            continue
        p = module.weight
        if id(p) in seen or p.device.type != "cpu" or p.ndim != 2 or p.stride(0) == 1:
            continue
        seen.add(id(p))
        p.data = p.data.t().contiguous().t()
    return model
