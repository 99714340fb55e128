"""The Llama 4 text model (SPEC §1, issue 6): mixture-of-experts FFN and iRoPE attention.

What differs from the dense Llama 3 block (herd/models/llama3.py, whose RMSNorm, SwiGLU
FeedForward, `attend` and KV-cache protocol are reused as they are):

- MoE feed-forward: one shared expert on every token plus `top_k` (1) routed experts chosen by a
  sigmoid router; the routed expert's *input* is scaled by its score (Meta's `moe.py`,
  transformers' `Llama4TextMoe`). Scout has MoE in every layer, Maverick in every 2nd
  (`moe_every`), the others are dense SwiGLU layers.
- iRoPE (SPEC §1 and its "Corrections to the seeds"): every `nope_every`-th layer has no
  positional encoding (NoPE) and attends to the full causal context; the other layers use RoPE
  with chunked local attention (a token sees only its own chunk of `attention_chunk_size`) and a
  weightless L2 (RMS) norm on queries and keys after RoPE.
- Inference-time attention temperature tuning on NoPE layers (arXiv 2501.19399 as used by Meta):
  q ·= log(floor((pos + 1) / floor_scale) + 1) · attn_scale + 1, which leaves short contexts
  untouched.

Parameter names are Meta's llama4 reference names (`llama_models/llama4/model.py`, `moe.py`):
`attention.wq…wo`, `feed_forward.w1/w2/w3` (dense layers), `feed_forward.router_DE` (D, E),
`feed_forward.experts.w1/w3` (E, D, F), `feed_forward.experts.w2` (E, F, D),
`feed_forward.shared_expert.w1/w2/w3`. RoPE uses Meta's adjacent-pair layout, as HF's Llama 4 does
too (complex `apply_rotary_emb`), so no q/k permutation is needed for either format.

Shape letters as in llama3.py, plus E experts, F expert hidden dim, A = B·T tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import HerdError
from herd.models.args import DynamicNtkRopeScaling, HeadShapes, RopeScaling
from herd.models.llama3 import Cache, DecoderOnly, FeedForward, RMSNorm, attend
from herd.models.rope import apply_rope, rope_rotations


@dataclass(frozen=True)
class VisionArgs:
    """The Llama 4 image encoder (Meta's `VisionArgs`, HF's `Llama4VisionConfig`): a ViT over square
    tiles of `image_size` pixels cut in `patch_size` patches, whose output is pixel-shuffled (each
    2x2 patch block becomes one token at ratio 0.5), passed through the adapter MLP to `output_dim`
    and projected into the text model. Released values (Scout and Maverick): these defaults."""

    image_size: int = 336
    patch_size: int = 14
    dim: int = 1408
    n_layers: int = 34
    n_heads: int = 16
    mlp_ratio: float = 4.0
    output_dim: int = 4096
    pixel_shuffle_ratio: float = 0.5
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    image_token_id: int = 200092  # <|patch|>: the positions image features replace
    max_tiles: int = 16  # most tiles one image is cut into (plus the global thumbnail)

    def __post_init__(self) -> None:
        problems = []
        if min(self.image_size, self.patch_size, self.dim, self.n_layers, self.n_heads, self.output_dim,
               self.max_tiles) <= 0:
            problems.append("sizes must be positive")
        elif self.image_size % self.patch_size:
            problems.append(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        elif self.dim % self.n_heads or (self.dim // self.n_heads) % 4:
            problems.append(f"dim/n_heads ({self.dim}/{self.n_heads}) must be a multiple of 4 (2-D RoPE)")
        else:
            shuffled = self.grid * self.pixel_shuffle_ratio
            if not 0 < self.pixel_shuffle_ratio <= 1 or shuffled != int(shuffled) or (
                    self.dim / self.pixel_shuffle_ratio ** 2) % 1:
                problems.append(f"pixel_shuffle_ratio {self.pixel_shuffle_ratio} does not divide the "
                                f"{self.grid}x{self.grid} patch grid and dim {self.dim}")
        if problems:
            raise HerdError("invalid Llama 4 vision config: " + "; ".join(problems))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """<|patch|> tokens per tile after pixel shuffle (144 for 336-pixel tiles of 14)."""
        return round(self.grid * self.pixel_shuffle_ratio) ** 2

    @property
    def mlp_dim(self) -> int:
        return int(self.mlp_ratio * self.dim)

    @property
    def adapter_in(self) -> int:
        return round(self.dim / self.pixel_shuffle_ratio ** 2)

    def num_params(self, text_dim: int) -> int:
        d, f = self.dim, self.mlp_dim
        layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
        embed = 3 * self.patch_size ** 2 * d + d + (self.grid ** 2 + 1) * d + 4 * d  # + ln_pre/post
        adapter = self.adapter_in * self.output_dim + self.output_dim ** 2
        return embed + self.n_layers * layer + adapter + self.output_dim * text_dim


@dataclass(frozen=True)
class Llama4Args(HeadShapes):
    dim: int = 5120
    n_layers: int = 48
    n_heads: int = 40
    n_kv_heads: int | None = 8
    head_dim: int | None = 128
    vocab_size: int = 202048
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | DynamicNtkRopeScaling | None = None  # Llama 4's HF mapping reads these two
    max_seq_len: int = 131072
    tie_embeddings: bool = False
    # ---- mixture of experts
    n_experts: int = 16
    top_k: int = 1
    moe_every: int = 1  # interleave step: layer i is MoE iff (i + 1) % moe_every == 0
    moe_ffn_dim: int = 8192  # hidden dim of each routed expert and of the shared expert
    ffn_hidden_dim: int = 16384  # hidden dim of the dense (non-MoE) layers
    # ---- iRoPE attention
    nope_every: int | None = 4  # layer i is NoPE iff (i + 1) % nope_every == 0; None: all RoPE
    attention_chunk_size: int | None = 8192  # RoPE layers' local attention chunk; None: full causal
    qk_norm: bool = True  # weightless L2 norm of q and k on RoPE layers
    attn_temperature_tuning: bool = True  # on NoPE layers
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    # Parameters of the vision encoder + projector of the released checkpoints, counted in the
    # published totals (Scout "109B"); a text-only model (vision None) does not build them.
    vision_params: int = 0
    # The image encoder (herd/models/vision.py); None: a text-only model.
    vision: VisionArgs | None = None

    def __post_init__(self) -> None:
        problems = self.shape_problems("n_experts", "top_k", "moe_every", "moe_ffn_dim", "ffn_hidden_dim")
        if not problems and self.top_k > self.n_experts:
            problems.append(f"top_k ({self.top_k}) exceeds n_experts ({self.n_experts})")
        if self.attention_chunk_size is not None and self.attention_chunk_size <= 0:
            problems.append("attention_chunk_size must be positive or None")
        # Meta's and transformers' models take `(i + 1) % interval`: 0 divides by zero there, and a
        # negative interval would silently mean its absolute value here.
        if self.nope_every is not None and self.nope_every <= 0:
            problems.append(f"nope_every (no_rope_layer_interval) must be positive or None, got {self.nope_every}")
        # Temperature tuning divides positions by floor_scale: 0 gives an infinite query scale and a
        # negative one log1p of less than -1, i.e. NaN logits from the first NoPE layer on.
        if self.attn_temperature_tuning and not (0 < self.floor_scale < math.inf and math.isfinite(self.attn_scale)):
            problems.append(f"attention temperature tuning needs a positive floor_scale and a finite attn_scale, "
                            f"got {self.floor_scale} and {self.attn_scale}")
        if problems:
            raise HerdError("invalid Llama 4 config: " + "; ".join(problems))

    @property
    def ffn_dim(self) -> int:
        return self.ffn_hidden_dim

    def is_moe_layer(self, i: int) -> bool:
        return (i + 1) % self.moe_every == 0

    def is_nope_layer(self, i: int) -> bool:
        return bool(self.nope_every) and (i + 1) % self.nope_every == 0

    @property
    def n_moe_layers(self) -> int:
        # Layers 1..n_layers (1-based) that moe_every divides: counted, not looped over, so that
        # `herd info` on a config with a huge n_layers answers at once.
        return self.n_layers // self.moe_every

    # ---- sizes (herd info) -------------------------------------------------------------------
    def _layer_params(self, experts_counted: int) -> tuple[int, int]:
        """(parameters of one MoE layer with `experts_counted` routed experts, of one dense layer)."""
        d, hd = self.dim, self.hd
        attn = d * hd * (self.n_heads + 2 * self.kv_heads) + self.n_heads * hd * d + 2 * d  # + 2 norms
        moe = attn + d * self.n_experts + 3 * d * self.moe_ffn_dim * (1 + experts_counted)  # router, shared
        dense = attn + 3 * d * self.ffn_hidden_dim
        return moe, dense

    def _count(self, experts_counted: int, include_embeddings: bool) -> int:
        moe, dense = self._layer_params(experts_counted)
        n_moe = self.n_moe_layers
        body = n_moe * moe + (self.n_layers - n_moe) * dense + self.dim  # final norm
        emb = self.vocab_size * self.dim
        out = 0 if self.tie_embeddings else emb
        return body + (emb + out if include_embeddings else out)

    def num_params(self, include_embeddings: bool = True, include_vision: bool = False) -> int:
        """All text-model parameters (what this module builds); `include_vision` adds the released
        vision encoder's, as the published totals do (Scout 109B, Maverick 400B)."""
        vision = self.vision.num_params(self.dim) if self.vision is not None else self.vision_params
        return self._count(self.n_experts, include_embeddings) + (vision if include_vision else 0)

    def active_params(self, include_embeddings: bool = True) -> int:
        """Parameters one text token touches: attention, shared expert, `top_k` routed experts
        (and the whole router), dense layers, embeddings — the published "17B active"."""
        return self._count(self.top_k, include_embeddings)

    def flop_params(self) -> int:
        """FLOPs count the *active* parameters. The attention term ignores chunking (an upper bound
        for RoPE layers beyond one chunk)."""
        return self.active_params()

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """KV bytes per position if every layer kept every position (KVCache). Generation uses
        ChunkedKVCache, whose chunked RoPE layers hold at most attention_chunk_size - 1 positions in
        all, so past a chunk only the NoPE layers' share grows."""
        return 2 * self.n_layers * self.kv_heads * self.hd * bytes_per_value


# ---- presets ------------------------------------------------------------------------------------
# Shapes of the released checkpoints' config.json (transformers' Llama4TextConfig defaults are
# Scout's). Meta's params.json derives the same widths: ffn_exp 4, ffn_dim_multiplier 1.2,
# multiple_of 2048, expert width halved by auto_scale_F (capacity_factor 1) → 8192, dense 16384.
# The released vision tower (ViT 1408 wide, 34 layers, 336-pixel tiles; adapter and projector to 5120).
_SCOUT_VISION = VisionArgs().num_params(text_dim=5120)
_BASE = dict(dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, head_dim=128, vocab_size=202048,
             moe_ffn_dim=8192, ffn_hidden_dim=16384, vision_params=_SCOUT_VISION)

LLAMA4_PRESETS: dict[str, Llama4Args] = {
    # 16 experts in every layer, llama3-style RoPE scaling factor 16 (high_freq_factor 1), 10M context.
    "llama4-scout-17b-16e": Llama4Args(
        **_BASE, n_experts=16, moe_every=1, qk_norm=True, max_seq_len=10485760,
        rope_scaling=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                 original_max_position_embeddings=8192)),
    # 128 experts in every 2nd layer (dense in between), no QK-norm, no RoPE scaling, 1M context.
    "llama4-maverick-17b-128e": Llama4Args(**_BASE, n_experts=128, moe_every=2, qk_norm=False,
                                           max_seq_len=1048576),
    # Behemoth is unreleased (288B active, ~2T total, 16 experts per the release notes): a shape of
    # that size class, not Meta's actual config.
    "llama4-behemoth-shaped": Llama4Args(dim=16384, n_layers=96, n_heads=128, n_kv_heads=8, head_dim=128,
                                         vocab_size=202048, n_experts=16, moe_every=1, moe_ffn_dim=24576,
                                         ffn_hidden_dim=49152, max_seq_len=1048576),
    # Tiny shapes for tests: NoPE at layer 3, chunk 8, temperature tuning from position 3.
    "llama4-debug": Llama4Args(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=512,
                               n_experts=4, moe_ffn_dim=32, ffn_hidden_dim=96, moe_every=2,
                               attention_chunk_size=8, floor_scale=4.0, max_seq_len=256),
}


def get_llama4_preset(name: str) -> Llama4Args:
    try:
        return LLAMA4_PRESETS[name]
    except KeyError:
        raise HerdError(f"unknown Llama 4 preset {name!r}; known: {', '.join(LLAMA4_PRESETS)}") from None


# ---- modules ------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, args: Llama4Args, use_rope: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.hd
        self.use_rope = use_rope
        self.use_qk_norm = args.qk_norm and use_rope  # Meta: `use_qk_norm and not is_nope_layer`
        self.temperature_tuning = args.attn_temperature_tuning and not use_rope
        self.norm_eps, self.floor_scale, self.attn_scale = args.norm_eps, args.floor_scale, args.attn_scale
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, rotations: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None, cache: Cache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, H, d)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, K, d)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, rotations), apply_rope(k, rotations)
        if self.use_qk_norm:
            # After RoPE, no weight, eps = norm_eps (Meta's `rmsnorm(xq, norm_eps)`, HF's L2Norm).
            q = F.rms_norm(q.float(), (self.head_dim,), eps=self.norm_eps).type_as(q)
            k = F.rms_norm(k.float(), (self.head_dim,), eps=self.norm_eps).type_as(k)
        if self.temperature_tuning:
            # HF: log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1, per query position.
            scale = torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * scale[:, :, None, None]).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, d)
        out = attend(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked matrices (Meta's layout): w1, w3 (E, D, F); w2 (E, F, D)."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, D): tokens sorted by expert, `counts[e]` of them for expert e → (N, D)."""
        h = F.silu(grouped_mm(x, self.w1, counts)) * grouped_mm(x, self.w3, counts)
        return grouped_mm(h, self.w2, counts)


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    # torch._grouped_mm (PyTorch ≥ 2.8) runs on CPU too but wants 16-byte aligned row strides, and
    # takes fp32/bf16/fp16 only: a float64 model ("Expected mat_a to be Float32, BFloat16 or Float16")
    # used to crash in its first MoE layer instead of taking the per-expert loop.
    # Under torch.compile its fake-tensor (meta) kernel accepts bf16 only ("Expected inputs of BF16
    # type"), so a compiled fp32 model takes the loop.
    align = 16 // x.element_size()
    return (hasattr(torch, "_grouped_mm") and x.dtype == w.dtype and x.dtype in _GROUPED_MM_DTYPES
            and x.shape[-1] % align == 0
            and w.shape[-1] % align == 0 and not torch.is_grad_enabled()
            and (x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()))


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert (counts[e] consecutive rows for expert e) times w[e] (E, I, O):
    one grouped matmul where PyTorch has it, else one matmul per expert — never per token."""
    if _grouped_mm_usable(x, w):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x.contiguous(), w, offs=offs)
    # One split, one unbind, one cat: their backwards are one op each. (Indexing w[e] and writing
    # into slices of an output would make autograd materialize a full-size zero gradient of w per
    # expert — O(E²) memory traffic that dominated the backward.)
    groups = x.split(counts.tolist())
    return torch.cat([xe @ we for xe, we in zip(groups, w.unbind(0), strict=True)])


class MoE(nn.Module):
    """Shared expert on every token + `top_k` routed experts per token.

    The routed part is route → sort by expert → `self.experts(rows, counts)` → scatter-add back.
    `self.experts` is the expert-parallel hook point: anything with Experts' call signature
    (rows sorted by expert, `counts[e]` rows for expert e → one output row per input row) can
    replace it — an expert-parallel layer sends each expert's rows to the rank holding it
    (all-to-all), runs `shard_experts(...)`'s local slice there, and sends the rows back.

    Router statistics: in training mode, `tokens_per_expert` (E,) counts the (token, expert)
    assignments since the last `router_stats(model)` call, for load-balance logging.
    """

    def __init__(self, args: Llama4Args):
        super().__init__()
        self.n_experts, self.top_k = args.n_experts, args.top_k
        self.experts = Experts(args.n_experts, args.dim, args.moe_ffn_dim)
        self.router_DE = nn.Parameter(torch.empty(args.dim, args.n_experts))
        self.shared_expert = FeedForward(args.dim, args.moe_ffn_dim)
        self.tokens_per_expert: torch.Tensor | None = None  # a plain attribute: never in a checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (A, D)
        # Router (Meta moe.py / HF Llama4Router): top-k of the raw logits, then sigmoid of the
        # chosen ones (not a softmax); the others get sigmoid(-inf) = 0 and contribute nothing.
        logits = x @ self.router_DE  # (A, E)
        top_logits, top_experts = torch.topk(logits, self.top_k, dim=1)  # (A, k)
        scores = torch.sigmoid(top_logits.float()).to(x.dtype)
        # Sort the (token, expert) pairs by expert so each expert's tokens are contiguous.
        flat_experts = top_experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)[order]
        counts = torch.bincount(flat_experts, minlength=self.n_experts)
        if self.training:  # training tokens only: evaluation and generation do not skew the log
            seen = counts.detach()
            self.tokens_per_expert = seen if self.tokens_per_expert is None else self.tokens_per_expert + seen
        # The score scales the expert's *input* (HF and Meta both do), not its output.
        routed_in = x[token_of] * scores.reshape(-1, 1)[order]
        routed_out = self.experts(routed_in, counts)
        out = self.shared_expert(x)
        out.index_add_(0, token_of, routed_out)
        return out.view(shape)


# ---- expert parallelism and router statistics (hooks for herd/train) ------------------------------
def local_experts(n_experts: int, ep_rank: int, ep_size: int) -> range:
    """The experts rank `ep_rank` of an expert-parallel group of `ep_size` holds: a contiguous
    block, so the rows `MoE` sorted by expert go to ranks in order (all-to-all split sizes are
    sums of `counts` over each block)."""
    if ep_size <= 0 or n_experts % ep_size or not 0 <= ep_rank < ep_size:
        raise HerdError(f"cannot shard {n_experts} experts over an expert-parallel group of {ep_size} "
                        f"(rank {ep_rank}): the expert count must be a multiple of the group size")
    per = n_experts // ep_size
    return range(ep_rank * per, (ep_rank + 1) * per)


def shard_experts(experts: Experts, ep_rank: int, ep_size: int) -> Experts:
    """The Experts module of one expert-parallel rank: the same layout, E/ep_size experts, sharing
    storage with `experts` (slices of dim 0 of w1, w2, w3). A distributed layer (herd/train)
    calls this per MoE layer for the ranks of a mesh dim and wraps the result with the token
    all-to-all; called with the counts of its block, it computes exactly those rows."""
    block = local_experts(experts.w1.shape[0], ep_rank, ep_size)
    local = Experts.__new__(Experts)
    nn.Module.__init__(local)
    for name in ("w1", "w2", "w3"):
        setattr(local, name, nn.Parameter(getattr(experts, name)[block.start:block.stop],
                                          requires_grad=getattr(experts, name).requires_grad))
    return local


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def router_stats(model: nn.Module, reset: bool = True) -> dict[str, float | list[int]]:
    """Tokens routed to each expert since the last call, per MoE layer, for the training log:
    `moe.<layer>.tokens_per_expert` lists and `moe_max_load`, the busiest expert's share over the
    mean share, worst layer (1.0 is perfect balance; E means one expert took everything)."""
    out: dict[str, float | list[int]] = {}
    worst = 0.0
    for name, moe in moe_layers(model).items():
        counts = moe.tokens_per_expert
        if counts is None:
            continue
        c = counts.tolist()
        out[f"moe.{name}.tokens_per_expert"] = c
        total = sum(c)
        if total:
            worst = max(worst, max(c) * len(c) / total)
        if reset:
            moe.tokens_per_expert = None
    if out:
        out["moe_max_load"] = worst
    return out


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: Llama4Args):
        super().__init__()
        self.layer_id = layer_id
        self.is_nope = args.is_nope_layer(layer_id)
        self.attention = Attention(args, use_rope=not self.is_nope)
        self.feed_forward = MoE(args) if args.is_moe_layer(layer_id) else FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rotations, positions, global_mask, local_mask, cache: Cache | None = None):
        # iRoPE: NoPE layers see the whole causal context, RoPE layers only their chunk.
        mask = global_mask if self.is_nope else local_mask
        h = x + self.attention(self.attention_norm(x), rotations, positions, mask, cache, self.layer_id)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(DecoderOnly):
    RESIDUAL_PROJECTIONS = ("wo.weight", "w2.weight", "experts.w2")

    def __init__(self, args: Llama4Args):
        super().__init__(args, (TransformerBlock(i, args) for i in range(args.n_layers)))

    def _chunk_mask(self, positions: torch.Tensor, mask: torch.Tensor | None, cache: Cache | None,
                    T: int) -> torch.Tensor | None:
        """The RoPE layers' mask: `mask` (or causal) restricted to keys in the query's chunk of
        attention_chunk_size positions. Chunks count from each row's own position 0, so a
        left-padded row is chunked as if it ran alone (as transformers does with left padding)."""
        C = self.args.attention_chunk_size
        if C is None:
            return mask
        device = positions.device
        if cache is None:
            q_idx = torch.arange(T, device=device)
        elif hasattr(cache, "input_pos"):  # fixed-shape cache: writes at input_pos, returns all slots
            q_idx = cache.input_pos
        else:
            q_idx = torch.arange(cache.offset, cache.offset + T, device=device)
        if mask is not None:
            S = mask.shape[-1]
        elif cache is not None and hasattr(cache, "input_pos"):
            S = cache.max_len
        else:
            S = T if cache is None else cache.offset + T
        # A cache that keeps only the current chunk for these layers (ChunkedKVCache) returns the keys
        # of cache positions local_start .. S; the mask covers exactly those.
        start = getattr(cache, "local_start", 0)
        k_idx = torch.arange(start, S, device=device)
        if mask is None:
            mask = (k_idx[None, :] <= q_idx[:, None])[None, None]  # (1, 1, T, S - start) causal
        else:
            mask = mask[..., start:]
        # A row's cache index minus its position is constant (its left padding), read off the last
        # query, whose token is always real.
        shift = q_idx[-1] - positions[:, -1]  # (B,)
        k_pos = k_idx[None, :] - shift[:, None]  # (B, S)
        same_chunk = torch.div(k_pos, C, rounding_mode="floor")[:, None, :] == torch.div(
            positions, C, rounding_mode="floor")[:, :, None]  # (B, T, S)
        # Every query keeps its own key: a padding query with no visible key would give NaNs.
        self_key = k_idx[None, :] == q_idx[:, None]  # (T, S)
        return (mask & same_chunk[:, None]) | self_key[None, None]

    def forward(self, tokens: torch.Tensor, *, cache: Cache | None = None,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) → logits (B, T, V) fp32, as llama3.Transformer.forward (same cache, positions
        and mask contract); the chunked-attention mask of the RoPE layers is derived here."""
        return self.decode(self.tok_embeddings(tokens), cache=cache, positions=positions, mask=mask,
                           last_only=last_only)

    def decode(self, h: torch.Tensor, *, cache: Cache | None = None, positions: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """The decoder over input embeddings h (B, T, D): what `forward` runs after the token lookup,
        and what the multimodal model (vision.py) runs after merging image features into h."""
        T = h.shape[1]
        if positions is None:
            positions = self.default_positions(h[..., 0], cache)
        rotations = rope_rotations(self.inv_freq, positions, self.rope_scale)
        local_mask = self._chunk_mask(positions, mask, cache, T)
        for layer in self.layers:
            h = layer(h, rotations, positions, mask, local_mask, cache)
        return self.head(h, cache, last_only)
