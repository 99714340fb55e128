"""BPE tokenizers through HF `tokenizers`: from a GGUF file's metadata or an HF directory.

A GGUF carries no tokenizer.json; llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`, already
in GPT-2 byte-to-unicode spelling), the merges, a type per token (1 normal, 3 control, 4 user
defined), the special ids and the *name* of the pre-tokenizer (`tokenizer.ggml.pre`). We rebuild the
tokenizer from those, mapping the name to the regex llama.cpp uses (`bytelevel.PRE_TOKENIZERS`;
SmolLM2's "smollm" splits every digit alone, then applies GPT-2's regex). An HF directory is read
as-is from tokenizer.json, with the special tokens and chat template from tokenizer_config.json.

Two kinds are supported, both with ids that map to exact bytes (which streaming decode needs):
byte-level BPE (llama.cpp's "gpt2" model: Llama 3/4, SmolLM2) and SentencePiece BPE with byte fallback
(llama.cpp's "llama" model: Llama 2, TinyLlama, Mistral, CodeLlama; see spm.py). A GGUF "llama"
vocabulary carries scores instead of merges; it is rebuilt as Meta's Llama 2 tokenizer.json is.

SentencePiece's dummy prefix: encoding "Hello" gives "▁Hello", whose bytes are b" Hello".
`decode_bytes` gives every token's exact bytes (b" Hello": what llguidance and streaming need, and
what a continuation of earlier text means); `decode` drops that one space where the sequence starts,
as SentencePiece's own decode does (see `HFTokenizer.decode`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cached_property, partial
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from herd.errors import HerdError
from herd.tokenizer import spm
from herd.tokenizer.base import ExportLayout, Tokenizer
from herd.tokenizer.bytelevel import (
    build_backend,
    bytes_to_token,
    gguf_pre_name,
    token_to_bytes,
    write_gguf_tokenizer,
    write_hf_files,
)

# Token names that end a turn or a text in the common chat formats; any present join `stop_ids`.
END_TOKEN_NAMES = ("<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|eot|>",
                   "<|eom|>", "<end_of_turn>", "<|end|>", "</s>")

_CONTROL, _USER_DEFINED = 3, 4


class HFTokenizer(Tokenizer):
    """Byte-level or SentencePiece (`spm=True`) BPE over an HF `tokenizers.Tokenizer`. Build with
    `from_gguf_metadata` or `from_directory`. `dummy_prefix`: encoding prepends a space (SentencePiece's
    add_dummy_prefix) that `decode` takes off again."""

    def __init__(self, backend: Backend, *, bos_id: int | None, eos_id: int, pad_id: int | None = None,
                 unk_id: int | None = None, extra_stop_ids: Iterable[int] = (), add_bos: bool = False,
                 chat_template: str | None = None, gguf_pre: str | None = None, spm: bool = False,
                 dummy_prefix: bool = False):
        self.backend = backend
        self.spm = spm
        self.dummy_prefix = spm and dummy_prefix
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        for name, i in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id), ("unk", unk_id)):
            if i is not None and not 0 <= i < self.vocab_size:
                raise HerdError(f"tokenizer {name} id {i} is outside the vocabulary (size {self.vocab_size})")
        added = backend.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        self._user_defined = {i for i, t in added.items() if not t.special}
        stops = {eos_id, *extra_stop_ids}
        stops.update(i for name in END_TOKEN_NAMES if (i := self.special_tokens.get(name)) is not None)
        self.stop_ids = stops
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        self._gguf_pre = gguf_pre
        self.chat = None

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], *, pre: str | None = None) -> HFTokenizer:
        """`pre` overrides the file's `tokenizer.ggml.pre`: e.g. "gpt2" reproduces transformers'
        GGUF loader, which ignores the name and always uses GPT-2's regex."""
        model = meta.get("tokenizer.ggml.model")
        if model == "llama":
            return cls._from_gguf_spm(meta)
        if model != "gpt2":
            raise HerdError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2', "
                            "and SentencePiece BPE, 'llama')")
        tokens = [str(t) for t in meta["tokenizer.ggml.tokens"]]
        types = meta.get("tokenizer.ggml.token_type")
        types = [1] * len(tokens) if types is None else [int(t) for t in types]
        if len(types) != len(tokens):
            raise HerdError(f"GGUF tokenizer: {len(tokens)} tokens but {len(types)} token types")
        merges = []
        raw_merges = meta.get("tokenizer.ggml.merges")
        for m in [] if raw_merges is None else raw_merges:
            left, sep, right = str(m).partition(" ")
            if not sep:
                raise HerdError(f"GGUF tokenizer: malformed merge {m!r}")
            merges.append((left, right))
        pre = pre or meta.get("tokenizer.ggml.pre")
        get_id = partial(_gguf_id, meta)
        eos = _gguf_eos(meta)
        bos = get_id("bos_token_id")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        backend = build_backend(tokens, merges,
                                special=[i for i, t in enumerate(types) if t == _CONTROL],
                                user_defined=[i for i, t in enumerate(types) if t == _USER_DEFINED],
                                pre=pre, bos_id=bos if add_bos else None)
        extra = [i for key in ("eot_token_id", "eom_token_id") if (i := get_id(key)) is not None]
        return cls(backend, bos_id=bos, eos_id=eos, pad_id=get_id("padding_token_id"),
                   unk_id=get_id("unknown_token_id"), extra_stop_ids=extra, add_bos=add_bos,
                   chat_template=meta.get("tokenizer.chat_template"), gguf_pre=pre or "default")

    @classmethod
    def _from_gguf_spm(cls, meta: dict[str, Any]) -> HFTokenizer:
        """llama.cpp's "llama" model: SentencePiece pieces, scores and types, no merges."""
        tokens = [str(t) for t in meta["tokenizer.ggml.tokens"]]
        raw_scores = meta.get("tokenizer.ggml.scores")
        if raw_scores is None:  # the merge order comes from the scores: without them there is none
            raise HerdError("GGUF tokenizer model 'llama' without tokenizer.ggml.scores is not supported "
                            "(only byte-level BPE, 'gpt2', and SentencePiece BPE, 'llama', with scores)")
        scores = [float(s) for s in raw_scores]
        raw_types = meta.get("tokenizer.ggml.token_type")
        types = [spm.NORMAL] * len(tokens) if raw_types is None else [int(t) for t in raw_types]
        get_id = partial(_gguf_id, meta)
        eos = _gguf_eos(meta)
        bos, unk = get_id("bos_token_id"), get_id("unknown_token_id")
        if unk is None and types.count(spm.UNKNOWN) == 1:
            unk = types.index(spm.UNKNOWN)
        # llama.cpp (and transformers' GGUF loader) add BOS to a SentencePiece vocabulary that does not say.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True)) and bos is not None
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        for name, i in (("bos", bos), ("eos", eos), ("unk", unk)):
            if i is not None and not 0 <= i < len(tokens):
                raise HerdError(f"tokenizer {name} id {i} is outside the vocabulary (size {len(tokens)})")
        backend = spm.build_spm_backend(tokens, scores, types, unk_id=unk, add_space_prefix=prefix,
                                        bos_id=bos if add_bos else None)
        extra = [i for key in ("eot_token_id", "eom_token_id") if (i := get_id(key)) is not None]
        return cls(backend, bos_id=bos, eos_id=eos, pad_id=get_id("padding_token_id"), unk_id=unk,
                   extra_stop_ids=extra, add_bos=add_bos, chat_template=meta.get("tokenizer.chat_template"),
                   spm=True, dummy_prefix=prefix)

    @classmethod
    def from_directory(cls, directory: str | Path) -> HFTokenizer:
        directory = Path(directory)
        tj = directory / "tokenizer.json"
        try:
            backend = Backend.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise HerdError(f"{tj}: not a readable tokenizer.json ({e})") from None
        spec = json.loads(tj.read_text(encoding="utf-8"))
        model_type = (spec.get("model") or {}).get("type")
        decoder = spec.get("decoder")
        is_spm = model_type == "BPE" and not _is_byte_level(decoder) and spm.is_spm_decoder(decoder)
        if model_type != "BPE" or not (is_spm or _is_byte_level(decoder)):
            raise HerdError(f"{tj}: unsupported tokenizer (model {model_type}, decoder "
                            f"{(decoder or {}).get('type')}); only byte-level BPE and SentencePiece BPE "
                            "(Llama 2 / Mistral style) are supported")
        config = _read_json(directory / "tokenizer_config.json")

        def token_id(key: str) -> int | None:
            tok = config.get(key)
            if isinstance(tok, dict):  # a saved AddedToken: {"content": "<eos>", "special": true, ...}
                tok = tok.get("content")
            if tok is not None and not isinstance(tok, str):
                raise HerdError(f"{directory / 'tokenizer_config.json'}: {key} must be a token string or "
                                f"an AddedToken object with a string content, not {tok!r}")
            return None if tok is None else backend.token_to_id(tok)

        eos = token_id("eos_token")
        extra: list[int] = []
        gen_path = directory / "generation_config.json"
        raw_eos = _read_json(gen_path).get("eos_token_id")
        gen_eos = raw_eos if raw_eos is None or isinstance(raw_eos, list) else [raw_eos]
        if gen_eos is not None:
            # bool is an int to Python but never a token id; "2" or 2.0 would be a silent guess
            if any(isinstance(i, bool) or not isinstance(i, int) for i in gen_eos):
                raise HerdError(f"{gen_path}: eos_token_id must be a token id or a list of token ids, "
                                f"not {raw_eos!r}")
            extra = list(gen_eos)
            if eos is None and extra:
                eos = extra[0]
        if eos is None:
            raise HerdError(f"{directory}: tokenizer_config.json names no eos_token")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja = directory / "chat_template.jinja"  # where transformers >= 4.50 saves it
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        bos = token_id("bos_token")
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # else: does the tokenizer.json post-processor add it?
            add_bos = bos is not None and bos in backend.encode("a").ids[:1]
        return cls(backend, bos_id=bos, eos_id=eos, pad_id=token_id("pad_token"), unk_id=token_id("unk_token"),
                   extra_stop_ids=extra, add_bos=bool(add_bos), chat_template=template, spm=is_spm,
                   dummy_prefix=is_spm and spm.decoder_strips_dummy_prefix(decoder))

    # ---- encode / decode ------------------------------------------------------------------------

    @cached_property
    def _plain(self) -> Backend:
        """A copy that reads special-token text as plain text (tokenizers' `encode_special_tokens`),
        kept apart so encode() never flips state that another thread may be using."""
        plain = Backend.from_str(self.backend.to_str())
        plain.encode_special_tokens = True
        return plain

    @cached_property
    def _plain_no_prefix(self) -> Backend:
        spec = spm.without_dummy_prefix(json.loads(self.backend.to_str()))
        plain = Backend.from_str(json.dumps(spec, ensure_ascii=False))
        plain.encode_special_tokens = True
        return plain

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` as a continuation of earlier text: without SentencePiece's dummy prefix, so
        that decode_bytes(ids) == text.encode() ("hello" → "hello", not "▁hello"; a space stays a
        space). The same as encode() for byte-level BPE. Special-token text is plain text."""
        if not self.dummy_prefix:
            return self.encode(text)
        if not isinstance(text, str):
            raise HerdError(f"encode() takes a str, got {type(text).__name__}")
        try:
            return self._plain_no_prefix.encode(text, add_special_tokens=False).ids
        except TypeError:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self._plain_no_prefix.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise HerdError(f"encode() takes a str, got {type(text).__name__}")
        backend = self.backend if allow_special else self._plain
        try:
            ids = backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            # tokenizers rejects a str holding lone surrogates ("\ud800", as JSON escapes can carry)
            # with a TypeError. Replace them with U+FFFD exactly as tiktoken does (and so Meta's
            # Llama tokenizers and our TiktokenTokenizer), keeping valid surrogate pairs as one char.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            ids = backend.encode(text, add_special_tokens=False).ids
        if bos:
            if self.bos_id is None:
                raise HerdError("this tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    @cached_property
    def _id_to_bytes(self) -> list[bytes]:
        added = self.backend.get_added_tokens_decoder()
        table = []
        for i in range(self.vocab_size):
            if i in added:
                table.append(added[i].content.encode("utf-8"))
            else:
                tok = self.backend.id_to_token(i)
                table.append(b"" if tok is None else (spm.piece_to_bytes if self.spm else token_to_bytes)(tok))
        return table

    @cached_property
    def _dummy_prefixed(self) -> frozenset[int]:
        """Ids whose piece starts with the "▁" that the dummy prefix may have put there (normal
        pieces only: a "<0x20>" byte piece or an added token is never stripped, as in SentencePiece)."""
        added = self.backend.get_added_tokens_decoder()
        return frozenset(i for tok, i in self.backend.get_vocab(with_added_tokens=False).items()
                         if i not in added and tok.startswith(spm.SPACE))

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`. With a dummy prefix (SentencePiece), the first token that is not a
        special token loses the one leading space the encoder added, if its piece starts with "▁":
        SentencePiece's decode (which gives special tokens no text; here they keep their names, as
        everywhere in herd). So decode(encode(text)) == text, while `decode_bytes` (and streaming)
        keep that space: a generated continuation's first token "▁Paris" streams as " Paris"."""
        ids = list(ids)
        data = self.decode_bytes(ids)  # validates the ids
        if self.dummy_prefix:
            special = self._special_ids
            k = next((k for k, i in enumerate(ids) if i not in special), None)
            if k is not None and ids[k] in self._dummy_prefixed:
                table = self._id_to_bytes
                at = sum(len(table[i]) for i in ids[:k])
                data = data[:at] + data[at + 1:]
        return data.decode("utf-8", errors="replace")

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._id_to_bytes
        ids = list(ids)
        try:
            # A negative id would index from the end of the table: a silent wrong answer, not an error.
            if ids and min(ids) < 0:
                raise IndexError
            return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            raise self.bad_ids_error(ids) from None

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        if self.spm:
            return self._spm_token_to_id(token)
        i = self.backend.token_to_id(bytes_to_token(token.encode("utf-8")))
        if i is None:
            i = self.backend.token_to_id(token)  # a user-defined added token, spelled as-is
        return i

    @cached_property
    def _spm_tables(self) -> tuple[dict[str, int], dict[str, int]]:
        """(added token text → id, piece → id), built once: token_to_id runs per chat-template piece."""
        added = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items()}
        return added, self.backend.get_vocab(with_added_tokens=False)

    def _spm_token_to_id(self, token: str) -> int | None:
        added, vocab = self._spm_tables
        if token in added:  # a user-defined added token, spelled as-is
            return added[token]
        i = vocab.get(spm.text_to_piece(token))
        if i is not None and i not in added and spm.byte_piece_value(spm.text_to_piece(token)) is None:
            return i
        raw = token.encode("utf-8")
        if len(raw) == 1:  # a byte the vocabulary has no piece for: its byte-fallback piece
            return vocab.get(f"<0x{raw[0]:02X}>")
        return None

    def id_to_name(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    # ---- export -------------------------------------------------------------------------------

    def save(self, directory: str | Path, layout: ExportLayout = "hf") -> Path:
        if layout not in ("hf", "meta"):
            raise HerdError(f"unknown tokenizer layout {layout!r}; use 'hf' or 'meta'")
        name = self.backend.id_to_token

        def tok(i):
            return None if i is None else name(i)

        # "meta" has no tiktoken file for a BPE with merges of its own: tokenizer.json is the file.
        config = {"bos_token": tok(self.bos_id), "eos_token": tok(self.eos_id), "pad_token": tok(self.pad_id),
                  "unk_token": tok(self.unk_id), "add_bos_token": self.add_bos, "chat_template": self.chat_template}
        return write_hf_files(directory, self.backend, config)

    def write_gguf(self, writer: Any) -> None:
        spec = json.loads(self.backend.to_str())
        vocab: dict[str, int] = spec["model"]["vocab"]
        added = self.backend.get_added_tokens_decoder()
        tokens: list[str | None] = [None] * self.vocab_size
        for tok, i in vocab.items():
            tokens[i] = tok
        for i, t in added.items():
            tokens[i] = t.content
        if any(t is None for t in tokens):
            raise HerdError("tokenizer ids are not contiguous; cannot write a GGUF vocabulary")
        types = [(_CONTROL if added[i].special else _USER_DEFINED) if i in added else 1 for i in range(self.vocab_size)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
        scores = None
        if self.spm:  # llama.cpp's "llama" model: scores and types instead of merges
            scores, types = spm.gguf_scores_and_types(tokens, merges, types, unk_id=self.unk_id)
            merges = None
        # a SentencePiece vocabulary has no pre-tokenizer regex: llama.cpp writes "default" for it
        pre = self._gguf_pre or ("default" if self.spm else gguf_pre_name(spec.get("pre_tokenizer")))
        eot = self.special_tokens.get("<|eot_id|>", self.special_tokens.get("<|eot|>"))
        eom = self.special_tokens.get("<|eom_id|>", self.special_tokens.get("<|eom|>"))
        write_gguf_tokenizer(writer, tokens=tokens, token_types=types, merges=merges, pre=pre,
                             bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id, unk_id=self.unk_id,
                             eot_id=eot, eom_id=eom, add_bos=self.add_bos, chat_template=self.chat_template,
                             scores=scores, add_space_prefix=self.dummy_prefix if self.spm else None)


def _gguf_id(meta: dict[str, Any], key: str) -> int | None:
    v = meta.get(f"tokenizer.ggml.{key}")
    return None if v is None else int(v)


def _gguf_eos(meta: dict[str, Any]) -> int:
    eos = _gguf_id(meta, "eos_token_id")
    if eos is None:
        raise HerdError("GGUF tokenizer has no tokenizer.ggml.eos_token_id")
    return eos


def _is_byte_level(decoder: dict | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return decoder.get("type") == "Sequence" and any(_is_byte_level(d) for d in decoder.get("decoders", []))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HerdError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}
