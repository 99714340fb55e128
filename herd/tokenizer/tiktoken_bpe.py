"""Llama 3 and Llama 4 tokenizers: Meta's tiktoken `tokenizer.model` files, encoded with tiktoken.

SPEC §2: tiktoken BPE (Llama 3: 128,000 BPE tokens + 256 special = 128,256; Llama 4: 200,000 + 2,048
= 202,048). The real files ship inside the `llama-models` package; we read them from there, never
download. The special-token names, ids, split pattern and long-input splitting reproduce Meta's
reference `llama_models/llama3/tokenizer.py` and `llama4/tokenizer.py` exactly (tests compare ids).

A `tokenizer.model` is one "base64(token bytes) rank" line per token; the special tokens are not in
it — they follow the last rank, in the flavor's fixed layout. Any such file loads by path (e.g. one
herd trains with Llama 3's special-token layout).
"""

from __future__ import annotations

import base64
import binascii
import importlib.resources
import re
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import tiktoken

from herd.errors import HerdError
from herd.tokenizer.base import ExportLayout, Tokenizer
from herd.tokenizer.bytelevel import (
    LLAMA3_PATTERN,
    LLAMA4_PATTERN,
    build_backend,
    bytes_to_token,
    merges_from_ranks,
    write_gguf_tokenizer,
    write_hf_files,
)

Flavor = Literal["llama3", "llama4"]

# tiktoken panics on pieces over ~400k characters, and is quadratic on very long runs of
# whitespace / non-whitespace (openai/tiktoken#195); Meta cuts input at these sizes before encoding.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


# ---- special-token layouts (names in id order, right after the last BPE rank) ------------------

def _llama3_specials(n: int = 256) -> list[str]:
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(n - len(named))]


def _reserved(name: str, count: int, start: int = 0) -> list[str]:
    return [f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count)]


def _llama4_specials(n: int = 2048) -> list[str]:
    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text_post_train = ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>",
                       *_reserved("text_post_train", 6), "<|python_start|>", "<|python_end|>",
                       "<|finetune_right_pad|>", *_reserved("text_post_train", 61, 8)]
    vision = ["<|image_start|>", "<|image_end|>", *_reserved("vision", 2), "<|tile_x_separator|>",
              "<|tile_y_separator|>", *_reserved("vision", 4, 2), "<|image|>", *_reserved("vision", 1, 6),
              "<|patch|>", *_reserved("vision", 1041, 7)]
    reasoning = [*_reserved("reasoning", 8), "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = basic + text_post_train + vision + reasoning
    return named + [f"<|reserved_special_token_{i}|>" for i in range(n - len(named))]


FLAVORS: dict[str, dict[str, Any]] = {
    "llama3": dict(pattern=LLAMA3_PATTERN, specials=_llama3_specials, num_special=256, gguf_pre="llama-bpe",
                   bos="<|begin_of_text|>", eos="<|end_of_text|>", pad="<|finetune_right_pad_id|>",
                   eot="<|eot_id|>", eom="<|eom_id|>"),
    "llama4": dict(pattern=LLAMA4_PATTERN, specials=_llama4_specials, num_special=2048, gguf_pre="llama4",
                   bos="<|begin_of_text|>", eos="<|end_of_text|>", pad="<|finetune_right_pad|>",
                   eot="<|eot|>", eom="<|eom|>"),
}


def builtin_model_path(flavor: Flavor) -> Path:
    """The `tokenizer.model` that the installed `llama-models` package ships for this flavor."""
    try:
        path = importlib.resources.files("llama_models") / flavor / "tokenizer.model"
    except ModuleNotFoundError:
        raise HerdError("the `llama-models` package is not installed (pip install llama-models); it ships "
                        "the Llama 3/4 tokenizer.model files") from None
    path = Path(str(path))
    if not path.is_file():
        raise HerdError(f"{path}: missing from the installed llama-models package")
    return path


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken `tokenizer.model`; a malformed line is an error, not a skipped token."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HerdError(f"{path}: cannot read tokenizer model ({e})") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            b64, rank = line.split()
            ranks[base64.b64decode(b64, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise HerdError(f"{path}:{lineno}: not a tiktoken 'base64 rank' line: {line[:60]!r}") from None
    if not ranks:
        raise HerdError(f"{path}: empty tokenizer model")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise HerdError(f"{path}: token ranks are not 0..{len(ranks) - 1} without gaps or repeats (truncated?)")
    return ranks


def split_long_runs(s: str, max_run: int = MAX_NO_WHITESPACES_CHARS) -> Iterator[str]:
    """Meta's `_split_whitespaces_or_nonwhitespaces`: cut `s` so that no piece holds more than
    `max_run` consecutive whitespace or non-whitespace characters — a run is cut every `max_run`
    characters from its start. Found with a regex (re's \\s is str.isspace) instead of a Python loop
    per character; the lookbehind makes each long run match once, from its first character."""
    cuts = []
    for m in re.finditer(rf"(?<!\s)\s{{{max_run + 1},}}|(?<!\S)\S{{{max_run + 1},}}", s):
        cuts.extend(range(m.start() + max_run, m.end(), max_run))
    start = 0
    for cut in cuts:
        yield s[start:cut]
        start = cut
    yield s[start:]


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE with Llama 3 or Llama 4 special tokens.

    `TiktokenTokenizer.builtin("llama3")` loads Meta's file from llama-models;
    `TiktokenTokenizer(path)` loads any tiktoken file (flavor guessed from its size: 200,000 ranks
    is Llama 4's layout, anything else Llama 3's)."""

    def __init__(self, model_path: str | Path, flavor: Flavor | None = None):
        self.model_path = Path(model_path)
        self.ranks = load_ranks(self.model_path)
        n_base = len(self.ranks)
        if flavor is None:
            flavor = "llama4" if n_base == 200_000 else "llama3"
        if flavor not in FLAVORS:
            raise HerdError(f"unknown tiktoken flavor {flavor!r}; known: {', '.join(FLAVORS)}")
        self.flavor: Flavor = flavor
        f = FLAVORS[flavor]
        self.pattern: str = f["pattern"]
        self.special_tokens = {name: n_base + i for i, name in enumerate(f["specials"](f["num_special"]))}
        self.model = tiktoken.Encoding(name=self.model_path.name, pat_str=self.pattern,
                                       mergeable_ranks=self.ranks, special_tokens=self.special_tokens)
        self.vocab_size = n_base + len(self.special_tokens)
        self.bos_id = self.special_tokens[f["bos"]]
        self.eos_id = self.special_tokens[f["eos"]]
        self.pad_id = self.special_tokens[f["pad"]]
        self.eot_id = self.special_tokens[f["eot"]]
        self.eom_id = self.special_tokens[f["eom"]]
        self.stop_ids = {self.eos_id, self.eom_id, self.eot_id}  # Meta's `stop_tokens`
        self.add_bos = True
        self.chat = None

    @classmethod
    def builtin(cls, flavor: Flavor) -> TiktokenTokenizer:
        return cls(builtin_model_path(flavor), flavor)

    # ---- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise HerdError(f"encode() takes a str, got {type(text).__name__}")
        ids: list[int] = [self.bos_id] if bos else []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(text[i:i + TIKTOKEN_MAX_ENCODE_CHARS]):
                if allow_special:
                    ids.extend(self.model.encode(piece, allowed_special="all", disallowed_special=()))
                else:
                    # encode_ordinary == Meta's default (allowed_special=set(), disallowed_special=()):
                    # special-token text becomes ordinary tokens.
                    ids.extend(self.model.encode_ordinary(piece))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        try:
            return self.model.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError, ValueError):
            raise self.bad_ids_error(ids) from None

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.ranks.get(token.encode("utf-8"))

    # ---- export --------------------------------------------------------------------------------

    @cached_property
    def _id_to_bytes(self) -> list[bytes]:
        table = [b""] * len(self.ranks)
        for token, rank in self.ranks.items():
            table[rank] = token
        return table

    def _tokens_and_merges(self) -> tuple[list[str], list[tuple[str, str]]]:
        tokens = [bytes_to_token(b) for b in self._id_to_bytes] + list(self.special_tokens)
        merges = [(bytes_to_token(a), bytes_to_token(b)) for a, b in merges_from_ranks(self.ranks)]
        return tokens, merges

    @cached_property
    def hf_backend(self):
        """This tokenizer as an HF `tokenizers.Tokenizer` (what save("hf") writes); gives the same ids."""
        tokens, merges = self._tokens_and_merges()
        return build_backend(tokens, merges, special=list(self.special_tokens.values()),
                             pre=FLAVORS[self.flavor]["gguf_pre"], bos_id=self.bos_id)

    def _chat_template(self) -> str | None:
        from herd.tokenizer.chat import meta_chat_template

        return meta_chat_template(self.flavor)

    def save(self, directory: str | Path, layout: ExportLayout = "hf") -> Path:
        directory = Path(directory)
        if layout == "meta":
            directory.mkdir(parents=True, exist_ok=True)
            lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for rank, tok in enumerate(self._id_to_bytes)]
            (directory / "tokenizer.model").write_text("".join(lines), encoding="ascii")
            return directory
        if layout != "hf":
            raise HerdError(f"unknown tokenizer layout {layout!r}; use 'hf' or 'meta'")
        names = {v: k for k, v in self.special_tokens.items()}
        config = {"bos_token": names[self.bos_id], "eos_token": names[self.eos_id], "pad_token": names[self.pad_id],
                  "add_bos_token": True, "chat_template": self._chat_template()}
        return write_hf_files(directory, self.hf_backend, config)

    def write_gguf(self, writer: Any) -> None:
        tokens, merges = self._tokens_and_merges()
        n_base = len(self.ranks)
        # llama.cpp marks every special token (reserved ones included) CONTROL (3), the rest NORMAL (1).
        types = [1] * n_base + [3] * len(self.special_tokens)
        write_gguf_tokenizer(writer, tokens=tokens, token_types=types, merges=[f"{a} {b}" for a, b in merges],
                             pre=FLAVORS[self.flavor]["gguf_pre"], bos_id=self.bos_id, eos_id=self.eos_id,
                             pad_id=self.pad_id, eot_id=self.eot_id, eom_id=self.eom_id, add_bos=True,
                             chat_template=self._chat_template())
