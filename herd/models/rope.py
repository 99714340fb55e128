"""Rotary position embeddings (RoPE) with Llama 3.1's "llama3" frequency scaling, and the "linear"
and "yarn" scalings other Llama-architecture checkpoints carry (computed as transformers does);
"dynamic" NTK is plain RoPE within herd's context (`rope_frequencies`).

Layout: Meta's. Each head's features are rotated in *adjacent pairs* (x[2i], x[2i+1]), as in
`llama3/model.py`'s complex multiplication and in llama.cpp; HF checkpoints rotate the two halves
instead, so their wq/wk rows are permuted at the checkpoint boundary (herd/checkpoint/hf.py), never
here.
"""

from __future__ import annotations

import math

import torch

from herd.models.args import (
    AnyRopeScaling,
    DynamicNtkRopeScaling,
    LinearRopeScaling,
    RopeScaling,
    YarnRopeScaling,
)


def rope_frequencies(head_dim: int, theta: float, scaling: AnyRopeScaling | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies θ^(-2i/d), i < d/2, fp32 — shape (head_dim // 2,)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    freqs = 1.0 / (theta ** exponent)
    if isinstance(scaling, RopeScaling):
        freqs = _llama3_scaling(freqs, scaling)
    elif isinstance(scaling, LinearRopeScaling):
        freqs = freqs / scaling.factor  # θ·(p/factor) = (θ/factor)·p
    elif isinstance(scaling, YarnRopeScaling):
        freqs = _yarn_scaling(theta ** exponent, head_dim, theta, scaling)
    elif isinstance(scaling, DynamicNtkRopeScaling):
        # Plain RoPE, as transformers computes it up to max_position_embeddings: its
        # `_compute_dynamic_ntk_parameters` takes base·(factor·L/max_pos − (factor − 1))^(d/(d−2)) with
        # L = max(seq_len, max_pos), which is base itself at L = max_pos, and `dynamic_frequency_update`
        # recomputes only when a forward's positions reach past max_pos (and resets to these below it).
        # herd's context ends at max_pos (ModelArgs.max_seq_len; longer inputs are refused).
        pass
    elif scaling is not None:
        raise TypeError(f"unknown RoPE scaling {scaling!r}")
    return freqs


def rope_attention_scale(scaling: AnyRopeScaling | None) -> float:
    """The factor cos and sin are multiplied by (YaRN's attention temperature; 1 otherwise). Scaling
    both rotates q and k by the same angle and multiplies every q·k logit by its square. Dynamic
    NTK's is 1 (transformers' `_compute_dynamic_ntk_parameters` returns attention_factor 1.0)."""
    return scaling.attention_scale if isinstance(scaling, YarnRopeScaling) else 1.0


def _yarn_scaling(pos_freqs: torch.Tensor, dim: int, base: float, s: YarnRopeScaling) -> torch.Tensor:
    """transformers' `_compute_yarn_parameters`, operation for operation (so fp32 rounding agrees):
    a ramp over dim indices blends extrapolated (kept) and interpolated (÷ factor) frequencies; the
    ramp runs between the dims that rotate `beta_fast` and `beta_slow` times over the original context."""
    def correction_dim(rotations: float) -> float:
        return (dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp.to(pos_freqs.device)
    return (1.0 / (s.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _llama3_scaling(freqs: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1 (SPEC §1): wavelengths longer than original_context/low_freq_factor are divided
    by `factor`, shorter than original_context/high_freq_factor are kept, and the band between is
    interpolated linearly in 1/wavelength — Meta's `apply_scaling`."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / s.factor, freqs)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, smoothed, scaled)


def rope_rotations(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """cos and sin of position·frequency, fp32, stacked — shape (*positions.shape, head_dim//2, 2);
    times `scale` (`rope_attention_scale`) when that is not 1."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    rotations = torch.stack((angles.cos(), angles.sin()), dim=-1)
    return rotations if scale == 1.0 else rotations * scale


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent feature pairs of x (B, T, H, d) by the angles in `rotations` (B, T, d/2, 2).

    The pair (x0, x1) becomes (x0·cos − x1·sin, x0·sin + x1·cos): Meta's complex multiplication.
    Eager mode multiplies complex numbers (one kernel forward and one backward — ~5× faster than the
    real form on CPU, bench/train_step.py); under torch.compile the same product is written in real
    arithmetic, which Inductor fuses (it does not generate complex code)."""
    if not torch.compiler.is_compiling():
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (B, T, H, d/2)
        rc = torch.view_as_complex(rotations.float().contiguous()).unsqueeze(-2)  # broadcast over heads
        return torch.view_as_real(xc * rc).flatten(-2).type_as(x)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, d/2) each
    cos, sin = rotations.unsqueeze(-3).unbind(-1)  # broadcast over heads
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)
