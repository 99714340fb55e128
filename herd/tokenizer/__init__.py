"""Tokenizers and chat formats (SPEC §2).

    from herd.tokenizer import load_tokenizer
    tok = load_tokenizer("llama3")            # or "llama4", a tokenizer.model, a directory, a .gguf
    ids = tok.encode("Hello", bos=True)
    ids = tok.chat.encode_dialog([{"role": "user", "content": "Hi"}])

Every tokenizer has the interface in `base.Tokenizer`; `tok.chat` is its chat format (or None).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from herd.errors import HerdError
from herd.tokenizer.base import ChatFormat, Tokenizer
from herd.tokenizer.chat import Llama3ChatFormat, Llama4ChatFormat, TemplateChatFormat
from herd.tokenizer.hf_bpe import HFTokenizer
from herd.tokenizer.streaming import IncrementalDecoder
from herd.tokenizer.tiktoken_bpe import TiktokenTokenizer

__all__ = ["ChatFormat", "HFTokenizer", "IncrementalDecoder", "Llama3ChatFormat", "Llama4ChatFormat",
           "TemplateChatFormat", "TiktokenTokenizer", "Tokenizer", "load_tokenizer", "tokenizer_from_gguf_metadata"]

ACCEPTED = ('"llama3", "llama4", "bytes" (byte-level ids, herd/tokenizer/byte_ids.py), a tiktoken '
            "tokenizer.model file, a directory holding tokenizer.model, "
            "tokenizer.json or original/tokenizer.model, or a .gguf file")


def _with_tiktoken_chat(tok: TiktokenTokenizer) -> TiktokenTokenizer:
    tok.chat = (Llama4ChatFormat if tok.flavor == "llama4" else Llama3ChatFormat)(tok)
    return tok


def _with_template_chat(tok: HFTokenizer) -> HFTokenizer:
    tok.chat = TemplateChatFormat(tok, tok.chat_template) if tok.chat_template else None
    return tok


def tokenizer_from_gguf_metadata(meta: dict[str, Any]) -> HFTokenizer | None:
    """The tokenizer a GGUF file's metadata describes (chat format from its chat_template), or None
    when the file carries no tokenizer."""
    if "tokenizer.ggml.model" not in meta or "tokenizer.ggml.tokens" not in meta:
        return None
    return _with_template_chat(HFTokenizer.from_gguf_metadata(meta))


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """A tokenizer with its chat format attached, from `spec` (see ACCEPTED). Llama 3/4 tiktoken
    files get `Llama3ChatFormat` / `Llama4ChatFormat`; GGUF and HF tokenizers with a chat template a
    `TemplateChatFormat`."""
    if str(spec) in ("llama3", "llama4"):
        return _with_tiktoken_chat(TiktokenTokenizer.builtin(str(spec)))  # type: ignore[arg-type]
    if str(spec) == "bytes":
        from herd.tokenizer.byte_ids import byte_tokenizer

        return byte_tokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        # Meta's tiktoken file first (its chat format is the tested reference), also where an HF
        # Llama 3 repo keeps it; a tokenizer.model that is not tiktoken (a sentencepiece protobuf)
        # gives way to tokenizer.json.
        has_json = (path / "tokenizer.json").is_file()
        for candidate in (path / "tokenizer.model", path / "original" / "tokenizer.model"):
            if candidate.is_file():
                try:
                    return _with_tiktoken_chat(TiktokenTokenizer(candidate))
                except HerdError:
                    if not has_json:
                        raise
        if has_json:
            return _with_template_chat(HFTokenizer.from_directory(path))
        raise HerdError(f"{path}: no tokenizer.model, tokenizer.json or original/tokenizer.model in this "
                        f"directory; a tokenizer is {ACCEPTED}")
    if path.is_file():
        if path.suffix == ".gguf":
            from herd.checkpoint.gguf import read_gguf_metadata

            tok = tokenizer_from_gguf_metadata(read_gguf_metadata(path))
            if tok is None:
                raise HerdError(f"{path}: this GGUF file has no tokenizer")
            return tok
        if path.name in ("tokenizer.json", "tokenizer_config.json"):  # an HF pair: read the directory
            return _with_template_chat(HFTokenizer.from_directory(path.parent))
        return _with_tiktoken_chat(TiktokenTokenizer(path))
    raise HerdError(f"unknown tokenizer {str(spec)!r}: not a file or directory; a tokenizer is {ACCEPTED}")
