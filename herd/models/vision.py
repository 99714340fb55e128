"""The Llama 4 image encoder and the multimodal model (SPEC §1, issue 6): early fusion of image
features into the text model's token stream.

Pipeline (Meta's `llama_models/llama4/vision/{encoder,embedding}.py`, transformers'
`Llama4VisionModel` and `Llama4ForConditionalGeneration`):

1. Each tile (image_size² pixels, preprocessed by herd/models/image_processing.py) is cut into
   patch_size² patches by `nn.Unfold` and linearly projected (the "unfolded convolution"); a class
   embedding is appended *after* the patches and a learned positional embedding added; LayerNorm.
2. ViT layers (pre-LayerNorm, biased projections, GELU MLP) with full attention inside a tile and a
   2-D rotary embedding: the first half of each head's rotated pairs turns with the patch column
   (x + 1), the second half with the row (y + 1); the class token is not rotated.
3. LayerNorm, drop the class token, pixel-shuffle (each 1/ratio × 1/ratio block of patches becomes
   one token with ratio⁻² the channels: 576 patches → 144 tokens), then the adapter MLP (two
   bias-free linears, GELU after each).
4. `vision_projection` maps the result into the text model's width; the features replace the
   embeddings of the `<|patch|>` tokens, in order, and the text model runs on the merged stream.

The text model is Llama 4's as it is: `Llama4Multimodal` subclasses it, adds the vision modules
under Meta's names (`vision_embeddings.*`, `vision_projection.weight`) and merges before `decode`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import HerdError
from herd.models.llama3 import Cache
from herd.models.llama4 import Llama4Args, Transformer, VisionArgs
from herd.models.rope import apply_rope


def vision_rotations(args: VisionArgs) -> torch.Tensor:
    """2-D RoPE angles for the grid² patches and the class token (last), as cos/sin pairs —
    shape (grid² + 1, head_dim // 2, 2), the layout `apply_rope` takes.

    Meta's `VisionEncoder.__init__`: frequencies θ^(-2i/(head_dim/2)) for i < head_dim/4; the first
    head_dim/4 pairs rotate by (x + 1)·f, the next head_dim/4 by (y + 1)·f; the class token by 0."""
    g, hd = args.grid, args.dim // args.n_heads
    quarter = hd // 4
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd // 2, 2)[:quarter].float() / (hd // 2)))
    idx = torch.arange(g * g)
    x, y = (idx % g + 1).float(), (idx // g + 1).float()
    angles = torch.cat([x[:, None] * freqs, y[:, None] * freqs], dim=1)  # (g², hd/2)
    angles = torch.cat([angles, torch.zeros(1, hd // 2)])  # class token: no rotation
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.dim)
        self.wk = nn.Linear(args.dim, args.dim)
        self.wv = nn.Linear(args.dim, args.dim)
        self.wo = nn.Linear(args.dim, args.dim)

    def forward(self, x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        N, T, _ = x.shape  # N tiles, T = grid² + 1 tokens
        q = apply_rope(self.wq(x).view(N, T, self.n_heads, self.head_dim), rotations)
        k = apply_rope(self.wk(x).view(N, T, self.n_heads, self.head_dim), rotations)
        v = self.wv(x).view(N, T, self.n_heads, self.head_dim)
        # Every token of a tile sees every other (no mask, not causal).
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(N, T, -1))


class VisionMLP(nn.Module):
    """c_proj(GELU(c_fc(x))): the ViT's MLP (biased, back to `dim`) or, with `adapter`, Meta's
    SimpleMLP (bias-free, stays at `hidden`, GELU after c_proj too)."""

    def __init__(self, dim: int, hidden: int, adapter: bool = False):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden, bias=not adapter)
        self.c_proj = nn.Linear(hidden, hidden if adapter else dim, bias=not adapter)
        self.gelu_out = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_proj(F.gelu(self.c_fc(x)))
        return F.gelu(h) if self.gelu_out else h


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.attn = VisionAttention(args)
        self.ln_1 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.mlp = VisionMLP(args.dim, args.mlp_dim)
        self.ln_2 = nn.LayerNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rotations)
        return x + self.mlp(self.ln_2(x))


class PatchEmbedding(nn.Module):
    """Meta's `ColumnParallelConv2dPatch` without the parallelism: unfold, then one linear layer
    (a stride = kernel convolution written as a matmul, so tensor parallelism can split its columns)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self._unfold = nn.Unfold(kernel_size=args.patch_size, stride=args.patch_size)
        self._linear = nn.Linear(3 * args.patch_size ** 2, args.dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._linear(self._unfold(pixels).transpose(1, 2))  # (N, grid², dim)


class VisionTransformer(nn.Module):
    """The ViT stack; named `transformer.resblocks.N` as in Meta's checkpoints."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.resblocks = nn.ModuleList(VisionBlock(args) for _ in range(args.n_layers))

    def forward(self, x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, rotations)
        return x


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.conv1 = PatchEmbedding(args)
        self.class_embedding = nn.Parameter(torch.empty(args.dim))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(args.grid ** 2 + 1, args.dim))
        self.ln_pre = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.ln_post = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.transformer = VisionTransformer(args)
        self.register_buffer("rotations", vision_rotations(args), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, image_size, image_size) → patch features (N, grid², dim)."""
        x = self.conv1(pixels)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm.to(x.dtype)  # class token last
        x = self.transformer(self.ln_pre(x), self.rotations[None])
        return self.ln_post(x)[:, :-1]


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """(N, g², C) patch features → (N, (g·ratio)², C/ratio²): each block of 1/ratio × 1/ratio
    neighbouring patches is folded into the channels of one token (Meta's `pixel_shuffle_op`,
    which reshapes through the transposed grid; the same element order here)."""
    N, P, C = x.shape
    g = int(round(P ** 0.5))
    x = x.reshape(N, g, round(g * ratio), round(C / ratio))  # fold the column blocks
    x = x.transpose(1, 2).reshape(N, round(g * ratio), round(g * ratio), round(C / ratio ** 2))  # and the rows
    return x.transpose(1, 2).reshape(N, -1, round(C / ratio ** 2))


class VisionAdapter(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.ratio = args.pixel_shuffle_ratio
        self.mlp = VisionMLP(args.adapter_in, args.output_dim, adapter=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x, self.ratio))


class VisionEmbeddings(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.vision_encoder = VisionEncoder(args)
        self.vision_adapter = VisionAdapter(args)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, S, S) → (N, tokens_per_tile, output_dim)."""
        return self.vision_adapter(self.vision_encoder(pixels))


class Llama4Multimodal(Transformer):
    """Llama 4 text model + image encoder. `forward(tokens, images=...)`: `images` holds the tiles
    of every image in the batch, in the order their `<|patch|>` tokens appear (row by row; per
    image its tiles, then its global thumbnail, as herd/models/image_processing.py emits them)."""

    def __init__(self, args: Llama4Args):
        if args.vision is None:
            raise HerdError("Llama4Multimodal needs a config with vision settings (Llama4Args.vision)")
        super().__init__(args)
        self.vision_embeddings = VisionEmbeddings(args.vision)
        self.vision_projection = nn.Linear(args.vision.output_dim, args.dim, bias=False)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Tiles (N, 3, S, S) → text-width features (N · tokens_per_tile, D)."""
        v = self.args.vision
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, v.image_size, v.image_size):
            raise HerdError(f"image tiles must have shape (tiles, 3, {v.image_size}, {v.image_size}), "
                            f"got {tuple(images.shape)}")
        feats = self.vision_embeddings(images.to(self.vision_embeddings.vision_encoder.class_embedding.dtype))
        return self.vision_projection(feats).flatten(0, 1)

    def merge_images(self, tokens: torch.Tensor, h: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Replace the embeddings at `<|patch|>` positions by the image features, in order."""
        feats = self.image_features(images).to(h.dtype)
        slots = tokens == self.args.vision.image_token_id
        n = int(slots.sum())
        if n != feats.shape[0]:
            raise HerdError(f"the prompt has {n} <|patch|> tokens but the images give {feats.shape[0]} "
                            f"features ({images.shape[0]} tiles × {self.args.vision.tokens_per_tile})")
        return h.masked_scatter(slots[..., None], feats)

    def forward(self, tokens: torch.Tensor, *, images: torch.Tensor | None = None, cache: Cache | None = None,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        if images is not None:
            h = self.merge_images(tokens, h, images)
        return self.decode(h, cache=cache, positions=positions, mask=mask, last_only=last_only)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        super().init_weights(std, generator)  # sets every 1-D parameter to one: right for the norms' scales
        enc = self.vision_embeddings.vision_encoder
        for name, p in self.vision_embeddings.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
        # Meta's init for the class token: N(0, 1/dim)
        nn.init.normal_(enc.class_embedding, std=self.args.vision.dim ** -0.5, generator=generator)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        super().init_buffers(device)
        device = device or self.tok_embeddings.weight.device
        self.vision_embeddings.vision_encoder.rotations = vision_rotations(self.args.vision).to(device)


class WithImages:
    """A multimodal model bound to the images of a prompt (or of a batch of prompts: every row's
    tiles, in row order), for the generation loop: the first call (the batched prefill, which holds
    every `<|patch|>` token) merges the image features row by row, later calls (one new token each)
    are text only. Everything else is the model's."""

    def __init__(self, model: Llama4Multimodal, images: torch.Tensor):
        self.model, self.images = model, images

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        images, self.images = self.images, None
        return self.model(tokens, images=images, **kwargs)
