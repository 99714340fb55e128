"""Model hyper-parameters and the named presets.

Presets are data (DESIGN principle 8): a name maps to a `ModelArgs`. The FFN width follows Meta's
reference rule (`multiple_of`, `ffn_dim_multiplier`) so that the paper's shapes (SPEC §1) come out
of the same numbers Meta's `params.json` files carry; foreign checkpoints that state the width
directly set `ffn_hidden_dim`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

from herd.errors import HerdError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 "llama3" RoPE frequency scaling (SPEC §1): long wavelengths are stretched by
    `factor`, short ones kept, with a smooth ramp between `low_freq_factor` and `high_freq_factor`."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    kind: ClassVar[str] = "llama3"  # the tag HF configs and GGUF files name the scheme by


@dataclass(frozen=True)
class LinearRopeScaling:
    """"linear" position interpolation (LongChat, Llama 2 long-context fine-tunes): every frequency
    divided by `factor`, i.e. positions divided by it."""

    factor: float
    kind: ClassVar[str] = "linear"


@dataclass(frozen=True)
class YarnRopeScaling:
    """YaRN (arXiv 2309.00071) as transformers' `_compute_yarn_parameters` computes it: dims that
    rotate fewer than `beta_slow` times over the original context are interpolated (÷ factor), those
    rotating more than `beta_fast` times are kept, a linear ramp between; cos and sin are multiplied
    by `attention_scale`. The optional fields are kept as the config gave them (None = absent) so a
    checkpoint written back says what it said."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True  # floor/ceil the ramp's bounds to whole dims (transformers' default)
    kind: ClassVar[str] = "yarn"

    @property
    def attention_scale(self) -> float:
        """What transformers multiplies cos and sin by: `attention_factor` if given, else YaRN's
        0.1·ln(factor)+1 (as the ratio for `mscale` over `mscale_all_dim` when both are set and nonzero)."""
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return float(yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim))
        return yarn_mscale(self.factor)


@dataclass(frozen=True)
class DynamicNtkRopeScaling:
    """Dynamic NTK (transformers' rope_type "dynamic"): once a forward reaches past
    max_position_embeddings, transformers raises the RoPE base with the sequence length
    (`_compute_dynamic_ntk_parameters`, `dynamic_frequency_update`); up to it the frequencies are
    plain RoPE's. herd's context ends at max_position_embeddings, so herd computes plain RoPE
    (herd/models/rope.py); the factor is kept so a checkpoint written back still runs as the
    original does past that point in transformers."""

    factor: float
    kind: ClassVar[str] = "dynamic"


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, Eq. 21 (transformers' `yarn_get_mscale`)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# The RoPE scalings herd reads and writes, told apart by class (`.kind` names them). Dynamic NTK
# changes the frequencies only past max_position_embeddings, where herd's context ends, so herd
# computes it as plain RoPE; it is carried all the same so that writing the model back (HF, herd's
# params.json) keeps what transformers computes past that point.
AnyRopeScaling = RopeScaling | LinearRopeScaling | YarnRopeScaling | DynamicNtkRopeScaling


def rope_scaling_problems(s: AnyRopeScaling) -> list[str]:
    """What is wrong with a scaling's factor: 0 divides by zero and a negative one flips the sign
    (linear, llama3, yarn); inf zeroes the scaled frequencies, and a dynamic NTK factor of inf or NaN
    written back gives transformers an infinite or NaN RoPE base past the context."""
    f = s.factor
    if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 < f < math.inf:
        return [f"rope_scaling factor must be positive and finite (got {f!r})"]
    return []


class HeadShapes:
    """What every model's args derive the same way: KV heads, head dim, checked `replace`."""

    n_heads: int
    n_kv_heads: int | None
    head_dim: int | None
    dim: int

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    def shape_problems(self, *positive: str) -> list[str]:
        """What is wrong with the attention shapes (and with the fields named in `positive`, which
        must be > 0 like dim, n_layers, n_heads and vocab_size): at most one problem, the first;
        then what is wrong with norm_eps and rope_theta, which every model has."""
        problems = self._shape_problems(*positive)
        for name in ("norm_eps", "rope_theta"):
            # A library caller's float("inf") or float("nan") (or a config.json's Infinity, which
            # Python's json reads) computes without an error: inf eps zeroes every activation, inf
            # theta freezes all but the first rotary pair, NaN poisons every logit. A negative
            # value computes too and answers nothing sensible.
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                problems.append(f"{name} must be positive and finite (got {value!r})")
        return problems

    def _shape_problems(self, *positive: str) -> list[str]:
        kv = self.kv_heads
        names = ("dim", "n_layers", "n_heads", "vocab_size", *positive)
        if min(kv, *(getattr(self, n) for n in names)) <= 0:
            return [f"{', '.join(names)} and n_kv_heads must be positive"]
        if self.head_dim is not None and not self.head_dim > 0:
            # `hd` reads head_dim 0 as "not given" (dim // n_heads): a config's head_dim 0 (or -64)
            # was silently replaced instead of refused
            return [f"head_dim must be positive (got {self.head_dim})"]
        if self.n_heads % kv:
            return [f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({kv})"]
        if self.head_dim is None and self.dim % self.n_heads:
            return [f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})"]
        if self.hd % 2:
            return [f"head_dim ({self.hd}) must be even for RoPE"]
        return []

    def replace(self, **changes):
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise HerdError(f"unknown model option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return dataclasses.replace(self, **changes)

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token: 2 per parameter touched forward (embedding lookup is free) plus
        attention scores and values over an average causal context of seq_len/2; ×3 for training
        (forward + backward), as in the paper's 6ND compute estimates (§3.2.1). `flop_params` is
        every parameter for a dense model, the active ones for a mixture of experts."""
        seq_len = seq_len or self.max_seq_len
        # Every weight is a matmul operand except the input embedding table (a lookup); a tied
        # table is counted once, as the output projection.
        matmul_params = self.flop_params() - (0 if self.tie_embeddings else self.vocab_size * self.dim)
        attention = 2 * 2 * self.n_layers * self.n_heads * self.hd * (seq_len / 2)
        forward = 2 * matmul_params + attention
        return 3 * forward if training else forward


@dataclass(frozen=True)
class ModelArgs(HeadShapes):
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads == n_heads)
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None  # explicit FFN width; overrides the sizing rule
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: AnyRopeScaling | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    # Biases on the projections, as transformers' LlamaConfig `attention_bias` (wq, wk, wv, wo) and
    # `mlp_bias` (w1, w2, w3) ask for; Meta's Llama 3 has none.
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        problems = self.shape_problems()
        for name in ("attention_bias", "mlp_bias"):
            # "false" from a config file is truthy: it would build the biased model
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false (got {getattr(self, name)!r})")
        for name in ("max_seq_len", "multiple_of"):  # norm_eps and rope_theta: shape_problems
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive (got {getattr(self, name)})")
        if self.ffn_hidden_dim is not None and self.ffn_hidden_dim <= 0:
            problems.append(f"ffn_hidden_dim must be positive (got {self.ffn_hidden_dim})")
        if self.rope_scaling is not None:
            problems += rope_scaling_problems(self.rope_scaling)
        if not problems and self.ffn_dim <= 0:
            # a small ffn_dim_multiplier rounds Meta's sizing rule down to 0: the model then built
            # zero-width feed-forward layers and trained attention alone without a word
            problems.append(f"ffn_dim_multiplier {self.ffn_dim_multiplier} gives an FFN hidden width of "
                            f"{self.ffn_dim} at dim {self.dim}; it must be at least 1")
        if problems:
            raise HerdError("invalid model config: " + "; ".join(problems))

    @property
    def ffn_dim(self) -> int:
        """Meta's rule: 2/3 of 4·dim (SwiGLU keeps the parameter count of a 4·dim MLP), scaled by
        `ffn_dim_multiplier`, rounded up to `multiple_of`."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    # ---- sizes (herd info) -------------------------------------------------------------------
    def num_params(self, include_embeddings: bool = True) -> int:
        d, hd, L = self.dim, self.hd, self.n_layers
        attn = d * hd * (self.n_heads + 2 * self.kv_heads) + self.n_heads * hd * d
        if self.attention_bias:
            attn += hd * (self.n_heads + 2 * self.kv_heads) + d
        ffn = 3 * d * self.ffn_dim
        if self.mlp_bias:
            ffn += 2 * self.ffn_dim + d
        per_layer = attn + ffn + 2 * d  # two RMSNorm weights
        body = L * per_layer + d  # final norm
        emb = self.vocab_size * d
        out = 0 if self.tie_embeddings else self.vocab_size * d
        return body + (emb + out if include_embeddings else out)

    def flop_params(self) -> int:
        """The parameters one token's forward touches (all of them in a dense model)."""
        return self.num_params()

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return 2 * self.n_layers * self.kv_heads * self.hd * bytes_per_value


# ---- presets ------------------------------------------------------------------------------------
_LLAMA31_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192)
_LLAMA32_SCALING = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192)

# The shapes are Meta's params.json values (SPEC §1, paper Table 3).
_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3)
_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3)
_405B = dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.2)

PRESETS: dict[str, ModelArgs] = {
    "llama3-8b": ModelArgs(**_8B),
    "llama3-70b": ModelArgs(**_70B),
    "llama3-405b": ModelArgs(**_405B),
    "llama3.1-8b": ModelArgs(**_8B, rope_scaling=_LLAMA31_SCALING, max_seq_len=131072),
    "llama3.1-70b": ModelArgs(**_70B, rope_scaling=_LLAMA31_SCALING, max_seq_len=131072),
    "llama3.1-405b": ModelArgs(**_405B, rope_scaling=_LLAMA31_SCALING, max_seq_len=131072),
    "llama3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256,
                             ffn_dim_multiplier=1.5, rope_scaling=_LLAMA32_SCALING,
                             max_seq_len=131072, tie_embeddings=True),
    "llama3.2-3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256,
                             ffn_dim_multiplier=1.0, rope_scaling=_LLAMA32_SCALING,
                             max_seq_len=131072, tie_embeddings=True),
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                              ffn_hidden_dim=1536, rope_theta=100000.0, max_seq_len=8192,
                              tie_embeddings=True),
    # Tiny shapes for tests and laptops (torchtitan's `debugmodel`): GQA ratio 4, RoPE scaling.
    "debug": ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=32,
                       rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=32),
                       max_seq_len=256),
    "tiny": ModelArgs(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=64,
                      max_seq_len=512),
}


def get_preset(name: str) -> ModelArgs:
    try:
        return PRESETS[name]
    except KeyError:
        raise HerdError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}") from None
