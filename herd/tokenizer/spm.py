"""SentencePiece BPE with byte fallback (Llama 2, TinyLlama, Mistral, CodeLlama, Vicuna) through HF
`tokenizers`: recognising its tokenizer.json, the bytes of its pieces, and rebuilding it from a GGUF
file's "llama" vocabulary.

A piece spells a space as "▁" (U+2581); a byte the vocabulary lacks is one of 256 byte pieces
"<0x00>".."<0xFF>". Encoding prepends "▁" to the text (SentencePiece's `add_dummy_prefix`), so
"Hello" becomes "▁Hello"; decoding drops that one space again at the start of a sequence.

A GGUF stores no merges for this model, only each piece's score and type (1 normal, 2 unknown,
3 control, 4 user defined, 6 byte). SentencePiece's BPE merges the adjacent pair whose union has the
highest score; a merge list ranked by the score of the piece it makes does the same (transformers'
`SpmConverter` / GGUF loader and llama.cpp's `llm_tokenizer_spm`).
"""

from __future__ import annotations

import re
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers

from herd.errors import HerdError
from herd.tokenizer.bytelevel import add_vocabulary_tokens

SPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def byte_piece_value(piece: str) -> int | None:
    """The byte a "<0xNN>" piece stands for (as HF's ByteFallback decoder reads it), else None."""
    m = _BYTE_PIECE.fullmatch(piece)
    return None if m is None else int(m.group(1), 16)


def piece_to_bytes(piece: str) -> bytes:
    """A vocabulary piece's exact bytes: "▁the" → b" the", "<0x0A>" → b"\\n"."""
    b = byte_piece_value(piece)
    if b is not None:
        return bytes([b])
    return piece.replace(SPACE, " ").encode("utf-8")


def text_to_piece(text: str) -> str:
    """The spelling of the normal piece whose text is `text` (" the" → "▁the")."""
    return text.replace(" ", SPACE)


def _is_space_replace(d: dict) -> bool:
    return d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == SPACE and d.get("content") == " "


def _decoders(decoder: dict | None) -> list[dict]:
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [x for d in decoder.get("decoders", []) for x in _decoders(d)]
    return [decoder]


def is_spm_decoder(decoder: dict | None) -> bool:
    """Whether a tokenizer.json decoder is SentencePiece-style: "▁" decodes to a space (Llama 2's
    Replace + ByteFallback + Fuse + Strip, or the older Metaspace decoder)."""
    return any(_is_space_replace(d) or d.get("type") == "Metaspace" for d in _decoders(decoder))


def decoder_strips_dummy_prefix(decoder: dict | None) -> bool:
    """Whether the decoder drops the dummy-prefix space at the start of a sequence."""
    for d in _decoders(decoder):
        if d.get("type") == "Strip" and d.get("content", " ") == " " and int(d.get("start", 0)) >= 1:
            return True
        if d.get("type") == "Metaspace":
            scheme = d.get("prepend_scheme")
            return scheme in ("always", "first") if scheme is not None else bool(d.get("add_prefix_space", True))
    return False


def build_spm_backend(tokens: list[str], scores: list[float], types: list[int], *, unk_id: int | None,
                      add_space_prefix: bool = True, bos_id: int | None = None) -> Tokenizer:
    """An HF `tokenizers.Tokenizer` for a SentencePiece BPE vocabulary (GGUF "llama").

    Built like Meta's own Llama 2 tokenizer.json: BPE with byte fallback, merges ranked by the score
    of the piece they make (only normal pieces merge), normalizer Prepend("▁") + Replace(" ", "▁")
    (SentencePiece and llama.cpp prepend "▁" even to text that starts with one, which the Metaspace
    pre-tokenizer would not), decoder Replace("▁", " "), ByteFallback, Fuse, Strip(left 1). Unknown
    and control pieces become special added tokens, user-defined ones plain added tokens. With
    `bos_id`, a post-processor prepends BOS, as in Llama 2's tokenizer.json."""
    n = len(tokens)
    if len(scores) != n or len(types) != n:
        raise HerdError(f"GGUF tokenizer: {n} tokens but {len(scores)} scores and {len(types)} token types")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != n:
        raise HerdError("tokenizer vocabulary has duplicate tokens")
    normal = {tok: (float(scores[i]), i) for i, tok in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for tok, (score, i) in normal.items():
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    ranked.sort()
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < n else None
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(lt, rt) for _, _, lt, rt in ranked], unk_token=unk,
                                   fuse_unk=True, byte_fallback=True))
    steps: list[Any] = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        backend.normalizer = normalizers.Replace(" ", SPACE)
    backend.decoder = decoders.Sequence(steps)
    return add_vocabulary_tokens(backend, tokens, [i for i in range(n) if types[i] in (UNKNOWN, CONTROL)],
                                 [i for i in range(n) if types[i] == USER_DEFINED], bos_id)


def without_dummy_prefix(spec: dict) -> dict:
    """A tokenizer.json (parsed) that does not prepend "▁": Prepend normalizers dropped, Metaspace
    pre-tokenizers set to prepend_scheme "never". For text that continues earlier text (llguidance's
    forced tokens), whose first word must not gain a space."""
    def fix_norm(n: dict | None) -> dict | None:
        if not n:
            return n
        if n.get("type") == "Prepend" and n.get("prepend") == SPACE:
            return None
        if n.get("type") == "Sequence":
            parts = [m for m in (fix_norm(x) for x in n.get("normalizers", [])) if m is not None]
            return {**n, "normalizers": parts}
        return n

    def fix_pre(p: dict | None) -> dict | None:
        if not p:
            return p
        if p.get("type") == "Metaspace":
            return {**p, "prepend_scheme": "never", **({"add_prefix_space": False} if "add_prefix_space" in p else {})}
        if p.get("type") == "Sequence":
            return {**p, "pretokenizers": [fix_pre(x) for x in p.get("pretokenizers", [])]}
        return p

    return {**spec, "normalizer": fix_norm(spec.get("normalizer")), "pre_tokenizer": fix_pre(spec.get("pre_tokenizer"))}


def gguf_scores_and_types(tokens: list[str], merges: list[str], types: list[int], *,
                          unk_id: int | None) -> tuple[list[float], list[int]]:
    """Scores and llama.cpp types for a SentencePiece BPE vocabulary held as merges (tokenizer.json),
    so that `build_spm_backend` (and llama.cpp's SentencePiece tokenizer, which merges the pair whose
    union scores highest) rebuilds the same merge order: a piece's score is minus the rank of the
    first merge that makes it; pieces no merge makes (characters, bytes) score below all of them.
    Byte pieces "<0xNN>" get type 6, the unknown piece 2; added tokens keep theirs (3 control, 4
    user defined)."""
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        left, _, right = m.partition(" ")
        rank.setdefault(left + right, r)
    floor = len(merges)
    scores, out_types = [], []
    for i, tok in enumerate(tokens):
        scores.append(float(-rank[tok]) if tok in rank else float(-(floor + i)))
        t = types[i]
        if t == NORMAL and byte_piece_value(tok) is not None:
            t = BYTE
        if i == unk_id:
            t = UNKNOWN
        out_types.append(t)
    return scores, out_types
