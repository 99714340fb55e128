"""Shared helpers for the post-training tests: a tiny random Llama 3 model saved with the real
Llama 3 tokenizer (and so its chat format), and small JSONL files."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny_model(directory: Path, seed: int = 0, vocab_size: int = 128256) -> Path:
    """A `debug`-shaped Transformer narrowed to dim 32 with tied embeddings (as SmolLM2 and Llama 3.2
    have) and the Llama 3 vocabulary, Meta layout + tokenizer.model: the 128K-row embedding is most
    of its weight, so it is kept narrow."""
    from herd.checkpoint import write_checkpoint
    from herd.models.args import get_preset
    from herd.models.llama3 import Transformer
    from herd.tokenizer import load_tokenizer

    args = get_preset("debug").replace(vocab_size=vocab_size, max_seq_len=256, dim=32, n_heads=4,
                                       tie_embeddings=True)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(seed))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        sd.pop("output.weight", None)
    tok = load_tokenizer("llama3") if vocab_size >= 128256 else None
    write_checkpoint(directory, "meta", args, sd, tokenizer=tok)
    return directory


PROMPTS = ["What is 2 + 3?", "Name a colour.", "Say hi.", "What is 4 + 4?", "Count to three.", "Spell cat."]


def preference_rows(n: int = 6, edited: bool = False):
    rows = []
    for i in range(n):
        p = PROMPTS[i % len(PROMPTS)]
        row = {"prompt": [{"role": "user", "content": p}],
               "chosen": [{"role": "assistant", "content": f"good answer {i}"}],
               "rejected": [{"role": "assistant", "content": f"bad bad {i}"}]}
        if edited and i % 2 == 0:
            row["edited"] = f"best answer {i}"
        rows.append(row)
    return rows


def chat_rows(n: int = 6):
    return [{"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]},
                          {"role": "assistant", "content": f"reply number {i}"}]} for i in range(n)]
