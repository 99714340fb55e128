"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from herd.errors import HerdError


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


GREEDY_BELOW = 1e-5  # a temperature under this is greedy decoding (vLLM's _SAMPLING_EPS)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 → greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0  # 0 → no top-k cut
    seed: int | None = None
    # Ids never to produce: the tokenizer's reserved special tokens. A model never trained on them
    # (every herd pre-training run) leaves their logits near zero, which can beat real tokens'.
    suppress: tuple[int, ...] = ()

    def __post_init__(self):
        # Types first: a string or None from a config or a JSON body otherwise failed deep inside
        # a comparison or torch.topk with a bare TypeError; a float top_k (2.5) has no meaning.
        if not _is_real(self.temperature) or not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise HerdError(f"temperature must be a finite number >= 0, got {self.temperature!r}")  # NaN fails both
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise HerdError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise HerdError(f"top_k must be a whole number >= 0, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        # Below vLLM's _SAMPLING_EPS (1e-5) sampling is greedy, as there: logits / t for a tiny t
        # (1e-300 from a JSON body or --temperature; 0 once it is float32) overflow or turn NaN.
        return self.temperature < GREEDY_BELOW


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) → token ids (B,)."""
    if params.suppress:
        logits = logits.index_fill(-1, torch.tensor(params.suppress, device=logits.device), float("-inf"))
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it
        # is still below top_p (so the most likely token always stays).
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        # The rounding of cumsum - p can leave the top token's "mass before it" a hair above 0:
        # with a top_p under that (1e-10) every token was dropped and torch.multinomial raised.
        drop[..., 0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
