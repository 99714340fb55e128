"""The dense Llama 3 Transformer (SPEC §1; paper §3.2, Table 3).

Pre-norm decoder: RMSNorm → grouped-query attention with RoPE → residual, RMSNorm → SwiGLU FFN →
residual. Single-device and format-agnostic: parallelism wraps it from outside, checkpoint formats
are mapped at the boundary (herd/checkpoint). Parameter names are Meta's (DESIGN principle 4).

Shape letters: B batch, T new tokens, S attended positions (cache + new), D model dim, H query
heads, K key/value heads, d head dim, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from herd.models import short_attention
from herd.models.args import ModelArgs
from herd.models.rope import apply_rope, rope_attention_scale, rope_frequencies, rope_rotations


class Cache(Protocol):
    """What the model needs of a KV cache (herd/inference/kv_cache.py has the implementation)."""

    offset: int  # positions already stored; new keys/values go at offset .. offset+T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, d) for `layer`; return all keys/values so far (B, K, S, d)."""
        ...

    def advance(self, n: int) -> None: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalize in fp32 even for bf16 activations, then scale in the activation dtype, as Meta's
        # reference and transformers do.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.hd
        bias = args.attention_bias  # transformers' LlamaConfig: all four projections or none
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=bias)

    def forward(self, x: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor | None,
                cache: Cache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 instead of n_heads: tensor parallelism shards the head dimension (DESIGN principle 2).
        q = apply_rope(self.wq(x).view(B, T, -1, self.head_dim), rotations)  # (B, T, H, d)
        k = apply_rope(self.wk(x).view(B, T, -1, self.head_dim), rotations)  # (B, T, K, d)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, d)
        out = attend(q, k, v, mask)  # (B, H, T, d)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention: query head h reads key/value head h // (H/K).

    mask: None for plain causal attention (the T new tokens come after S - T cached ones), else
    boolean (B or 1, 1, T, S), True where a query may attend. Keys and values are never repeated in
    memory (GQA's point: a K-times smaller KV cache to read).
    """
    B, H, T, d = q.shape
    K, S = k.shape[1], k.shape[2]
    group = H // K
    if T == 1:
        # Decoding: fold the group's query heads into the row dimension, one (group, S) product per
        # KV head — the layout that reads the cache once.
        q = q.reshape(B, K, group, d)
        if mask is not None:
            mask = mask.expand(-1, -1, group, -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(B, H, 1, d)
    if T == S and short_attention.applies(q, k):
        return short_attention.causal_attention(q, k, v, mask)
    # Many queries (training, prefill): the fused kernels map query heads to KV heads themselves;
    # plain causal attention over the new tokens alone also skips the masked half.
    if mask is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group > 1)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rotations, mask, cache: Cache | None = None):
        h = x + self.attention(self.attention_norm(x), rotations, mask, cache, self.layer_id)
        return h + self.feed_forward(self.ffn_norm(h))


class DecoderOnly(nn.Module):
    """What every herd decoder shares: token embeddings, a stack of blocks, the final norm and the
    output head (tied or not), the RoPE frequencies, and explicit initialization. Llama 3's
    Transformer (below) and Llama 4's (llama4.py) add their blocks and their forward."""

    # Projections that write into the residual stream, initialized smaller (see init_weights).
    RESIDUAL_PROJECTIONS: tuple[str, ...] = ("wo.weight", "w2.weight")

    def __init__(self, args, blocks):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:  # Llama 3.2 1B/3B share input and output embeddings
            self.output.weight = self.tok_embeddings.weight
        # Non-persistent: derived from args, so never stored in (or expected from) a checkpoint.
        self.register_buffer("inv_freq", rope_frequencies(args.hd, args.rope_theta, args.rope_scaling),
                             persistent=False)
        # YaRN's attention temperature, applied to cos/sin with the rotation (1 for other scalings).
        self.rope_scale = rope_attention_scale(args.rope_scaling)

    def default_positions(self, tokens: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        """Token t sits at position cache.offset + t (0 + t without a cache) — shape (B, T)."""
        B, T = tokens.shape
        start = cache.offset if cache is not None else 0
        return torch.arange(start, start + T, device=tokens.device).expand(B, T)

    def head(self, h: torch.Tensor, cache: Cache | None, last_only: bool) -> torch.Tensor:
        """Final norm and output projection → fp32 logits; moves the cache past the new tokens."""
        if cache is not None:
            cache.advance(h.shape[1])
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    # ---- building without materializing (DESIGN principle 3) ----------------------------------
    def to_empty(self, *, device, recurse: bool = True):
        """nn.Module.to_empty, keeping tied embeddings tied: it gives every module a new Parameter
        of its own, so after building on the meta device the output head and the embedding table
        were two tensors — a tied model trained untied, and its checkpoint (which stores the table
        once) dropped the trained head."""
        super().to_empty(device=device, recurse=recurse)
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        return self

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute derived buffers, e.g. after building on the meta device."""
        device = device or self.tok_embeddings.weight.device
        self.inv_freq = rope_frequencies(self.args.hd, self.args.rope_theta, self.args.rope_scaling,
                                         device=device)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Fresh weights for pre-training: N(0, 0.02) truncated at 3σ; the projections that write
        into the residual stream are scaled by 1/sqrt(2·n_layers) so the residual's variance does
        not grow with depth (GPT-2/torchtitan practice); norms to one, projection biases
        (attention_bias / mlp_bias models) to zero."""
        depth_std = std / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.ndim == 1:
                nn.init.ones_(p)
            else:
                s = depth_std if name.endswith(self.RESIDUAL_PROJECTIONS) else std
                nn.init.trunc_normal_(p, std=s, a=-3 * s, b=3 * s, generator=generator)
        self.init_buffers()


class Transformer(DecoderOnly):
    def __init__(self, args: ModelArgs):
        super().__init__(args, (TransformerBlock(i, args) for i in range(args.n_layers)))

    def forward(self, tokens: torch.Tensor, *, cache: Cache | None = None,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) → logits (B, T, V), fp32; (B, 1, V) for the last position if `last_only`
        (prefill needs no more, and a long prompt's full logits would dwarf the KV cache).

        Without `positions`, token t sits at position cache.offset + t (0 + t without a cache).
        Without `mask`, attention is causal over the cache plus the new tokens; give a boolean
        (B, 1, T, S) mask for padding or packed documents.
        """
        if positions is None:
            positions = self.default_positions(tokens, cache)
        rotations = rope_rotations(self.inv_freq, positions, self.rope_scale)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, rotations, mask, cache)
        return self.head(h, cache, last_only)
