"""A small random multimodal Llama 4 with the real Llama 4 tokenizer (so real <|patch|> ids), shared by
the image tests."""

from __future__ import annotations

from pathlib import Path

import torch

from herd.checkpoint import write_checkpoint
from herd.models.llama4 import LLAMA4_PRESETS, Transformer, VisionArgs
from herd.models.vision import Llama4Multimodal
from herd.tokenizer import load_tokenizer


def tiny_multimodal(root: Path, std: float):
    """(root, model, tokenizer): the model in memory (eval mode) and written under root/"mm" as an HF
    checkpoint, beside a text-only Llama 4 in Meta's layout under root/"text"."""
    tokenizer = load_tokenizer("llama4")
    vision = VisionArgs(image_size=56, patch_size=14, dim=32, n_layers=1, n_heads=2, output_dim=32, max_tiles=4)
    args = LLAMA4_PRESETS["llama4-debug"].replace(vocab_size=tokenizer.vocab_size, dim=32, head_dim=8,
                                                  vision=vision)
    torch.manual_seed(0)
    model = Llama4Multimodal(args)
    model.init_weights(std=std)
    write_checkpoint(root / "mm", "hf", args, model.state_dict(), tokenizer=tokenizer)
    text = Transformer(args.replace(vision=None))
    text.init_weights()
    write_checkpoint(root / "text", "meta", text.args, text.state_dict(), tokenizer=tokenizer)
    return root, model.eval(), tokenizer
