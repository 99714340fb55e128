"""Byte-level BPE plumbing shared by both tokenizer kinds: the GPT-2 byte↔unicode spelling, merges
recovered from tiktoken ranks, the pre-tokenizers llama.cpp names in `tokenizer.ggml.pre`, building
an HF `tokenizers.Tokenizer`, and writing the HF / GGUF tokenizer files.

Every byte-level BPE format (HF tokenizer.json, GGUF "gpt2") spells a token's bytes as printable
unicode characters, one per byte (GPT-2's `bytes_to_unicode`); tiktoken stores raw bytes. The
functions here convert between the two so a Llama 3 `tokenizer.model` can be exported to HF and GGUF
and read back with identical ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from herd.errors import HerdError


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's table: printable latin-1 bytes stand for themselves, the other 68 bytes are moved to
    # U+0100.. so that no token is spelled with whitespace or control characters.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


BYTE_TO_CHAR: dict[int, str] = _bytes_to_unicode()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_CHAR.items()}
_LATIN1_TO_GPT2 = {b: c for b, c in BYTE_TO_CHAR.items()}  # str.translate table (ord → str)


def bytes_to_token(b: bytes) -> str:
    """Raw token bytes → GPT-2 spelling ("Ġhello" for b" hello"). latin-1 maps byte i to U+00i, so
    one C-level translate does the whole token."""
    return b.decode("latin-1").translate(_LATIN1_TO_GPT2)


def token_to_bytes(token: str) -> bytes:
    """GPT-2 spelling → raw bytes; a character outside the byte alphabet stands for its own UTF-8
    (that is how HF's ByteLevel decoder treats it)."""
    out = bytearray()
    for ch in token:
        b = CHAR_TO_BYTE.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to tiktoken's rank-ordered merging.

    tiktoken repeatedly merges the adjacent pair whose *concatenation* has the lowest rank. A merge
    list reproduces that if it holds every split (left, right) of every token where both halves are
    tokens, ordered by the rank of the token they make (then by the halves' ranks). This is the
    construction of transformers' `TikTokenConverter` and of the Llama 3 tokenizer.json Meta
    published (280,147 merges for 128,000 tokens). Used together with `ignore_merges=True`, which
    mirrors tiktoken's whole-piece lookup. Linear in the total token length: 128k tokens take ~1 s.
    """
    found: list[tuple[int, int, int, bytes, bytes]] = []
    get = ranks.get
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            lr = get(left)
            if lr is None:
                continue
            rr = get(right)
            if rr is not None:
                found.append((rank, lr, rr, left, right))
    found.sort()
    return [(left, right) for _, _, _, left, right in found]


# ---- pre-tokenizers, by llama.cpp's `tokenizer.ggml.pre` name ----------------------------------

# Meta's Llama 3 split pattern (llama_models/llama3/tokenizer.py `pat_str`).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 4 uses OpenAI's o200k pattern (llama_models/llama4/tokenizer.py `O200K_PATTERN`).
LLAMA4_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str) -> Callable[[], Any]:
    return lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])


def _gpt2() -> Any:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _digits_then_gpt2() -> Any:
    # llama.cpp's SMOLLM/STARCODER/... type: regex "\p{N}" (every digit alone), then GPT-2's regex;
    # SmolLM2's own tokenizer.json says the same with Digits(individual_digits) + ByteLevel.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


@dataclass(frozen=True)
class PreTokenizerSpec:
    build: Callable[[], Any]
    ignore_merges: bool  # look a whole pre-token up in the vocabulary before merging (tiktoken's way)


_LLAMA3 = PreTokenizerSpec(_split_then_bytes(LLAMA3_PATTERN), ignore_merges=True)
_LLAMA4 = PreTokenizerSpec(_split_then_bytes(LLAMA4_PATTERN), ignore_merges=True)
_GPT4O = PreTokenizerSpec(_split_then_bytes(LLAMA4_PATTERN), ignore_merges=False)
_QWEN2 = PreTokenizerSpec(_split_then_bytes(QWEN2_PATTERN), ignore_merges=False)
_SMOLLM = PreTokenizerSpec(_digits_then_gpt2, ignore_merges=False)
_GPT2 = PreTokenizerSpec(_gpt2, ignore_merges=False)

# Names as llama.cpp's convert_hf_to_gguf.py writes them, grouped the way llama-vocab.cpp groups
# them into regex sets (its `LLAMA_VOCAB_PRE_TYPE_*` switch).
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"], _LLAMA3),
    "llama4": _LLAMA4,
    "gpt-4o": _GPT4O,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2"], _QWEN2),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"], _SMOLLM),
    **dict.fromkeys(["gpt-2", "gpt2", "default", "mpt", "olmo", "jais"], _GPT2),
}


def pre_tokenizer_spec(pre: str | None) -> PreTokenizerSpec:
    if pre is None:  # llama.cpp falls back to its "default" (GPT-2) regex for files without the key
        return _GPT2
    try:
        return PRE_TOKENIZERS[pre]
    except KeyError:
        raise HerdError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(sorted(PRE_TOKENIZERS))}") from None


def gguf_pre_name(pre_tokenizer_json: dict | None) -> str:
    """The `tokenizer.ggml.pre` name for an HF tokenizer.json pre-tokenizer (for GGUF export)."""
    def split_pattern(p: dict) -> str | None:
        if p.get("type") == "Split":
            return p.get("pattern", {}).get("Regex")
        return None

    if pre_tokenizer_json is not None:
        kind = pre_tokenizer_json.get("type")
        if kind == "ByteLevel" and pre_tokenizer_json.get("use_regex", True):
            return "gpt-2"
        if kind == "Sequence":
            parts = pre_tokenizer_json.get("pretokenizers", [])
            if len(parts) == 2 and parts[1].get("type") == "ByteLevel":
                first = parts[0]
                if first.get("type") == "Digits" and first.get("individual_digits") and parts[1].get("use_regex", True):
                    return "smollm"
                pattern = split_pattern(first)
                if pattern is not None and not parts[1].get("use_regex", True):
                    for name, known in (("llama-bpe", LLAMA3_PATTERN), ("llama4", LLAMA4_PATTERN), ("qwen2", QWEN2_PATTERN)):
                        if pattern == known:
                            return name
    raise HerdError(f"this tokenizer's pre-tokenizer has no llama.cpp name, so it cannot be written to GGUF: "
                    f"{json.dumps(pre_tokenizer_json)[:200]}")


# ---- building and writing --------------------------------------------------------------------

def build_backend(tokens: list[str], merges: Iterable[tuple[str, str]], *, special: Iterable[int] = (),
                  user_defined: Iterable[int] = (), pre: str | None, bos_id: int | None = None) -> Tokenizer:
    """An HF `tokenizers.Tokenizer` for a byte-level BPE vocabulary.

    `tokens[i]` is id i's GPT-2 spelling (special tokens: their literal text); `special` ids become
    special added tokens (matched whole, skipped by skip_special_tokens), `user_defined` ids plain
    added tokens (matched whole, like llama.cpp's USER_DEFINED). With `bos_id`, the post-processor
    prepends BOS, as Meta's HF Llama 3 tokenizer.json does."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise HerdError("tokenizer vocabulary has duplicate tokens")
    spec = pre_tokenizer_spec(pre)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), ignore_merges=spec.ignore_merges,
                                   fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = spec.build()
    backend.decoder = decoders.ByteLevel()
    return add_vocabulary_tokens(backend, tokens, special, user_defined, bos_id)


def add_vocabulary_tokens(backend: Tokenizer, tokens: list[str], special: Iterable[int],
                          user_defined: Iterable[int], bos_id: int | None) -> Tokenizer:
    """A GGUF vocabulary's control tokens as special added tokens, its user-defined ones as plain
    added tokens, and with `bos_id` a post-processor that prepends BOS (as Llama's tokenizer.json)."""
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    user = [AddedToken(tokens[i], special=False, normalized=False) for i in user_defined]
    if user:
        backend.add_tokens(user)
    if bos_id is not None:
        bos = tokens[bos_id]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return backend


def write_hf_files(directory: str | Path, backend: Tokenizer, config: dict[str, Any]) -> Path:
    """tokenizer.json + tokenizer_config.json, the pair `AutoTokenizer.from_pretrained` reads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    full = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30, **{k: v for k, v in config.items() if v is not None}}
    (directory / "tokenizer_config.json").write_text(json.dumps(full, indent=2, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")
    return directory


def write_gguf_tokenizer(writer: Any, *, tokens: list[str], token_types: list[int],
                         merges: Iterable[str] | None, pre: str, bos_id: int | None, eos_id: int,
                         pad_id: int | None = None, unk_id: int | None = None, eot_id: int | None = None,
                         eom_id: int | None = None, add_bos: bool = False,
                         chat_template: str | None = None, scores: list[float] | None = None,
                         add_space_prefix: bool | None = None) -> None:
    """llama.cpp's `tokenizer.*` keys: a byte-level ("gpt2") BPE vocabulary with its merges, or
    with `scores` a SentencePiece ("llama") one, whose merges its scores imply."""
    writer.add_tokenizer_model("gpt2" if scores is None else "llama")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    if merges is not None:
        writer.add_token_merges(list(merges))
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    if bos_id is not None:
        writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(eos_id)
    if pad_id is not None:
        writer.add_pad_token_id(pad_id)
    if unk_id is not None:
        writer.add_unk_token_id(unk_id)
    if eot_id is not None:
        writer.add_eot_token_id(eot_id)
    if eom_id is not None:
        writer.add_eom_token_id(eom_id)
    writer.add_add_bos_token(add_bos)
    if chat_template:
        writer.add_chat_template(chat_template)
