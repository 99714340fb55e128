"""The data a run config names, prepared on first use (issue 3: "when the built-in corpus or the
tokenizer that a config names is missing, `herd pretrain` prepares it first and says so").

`ensure_shards(cfg.data)` returns the shards directory `data.path`. When it is missing it is built
from `data.source`, tokenized with `data.tokenizer`; when that tokenizer is a directory that does
not exist yet and `data.tokenizer_vocab_size` is set, a Llama 3 style BPE (herd/tokenizer/train.py)
is trained there first on the same source. Each step says what it does on the log, and each output
is published atomically, so a run killed mid-preparation simply prepares again.

Sources: "builtin" / "builtin:<domain>" (herd.data.builtin: Shakespeare, Python stdlib), "stdlib",
a `documents.jsonl` (one {"text": ...} object a line, what `herd data prepare` writes), or a text
file / directory of .txt files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from herd.checkpoint.common import TOKENIZER_FILES
from herd.data.shards import (
    BYTE_VOCAB,
    byte_tokenize,
    python_stdlib_files,
    read_meta,
    text_documents,
    write_shards,
)
from herd.errors import HerdError
from herd.train.config import DataConfig

_NAMED_TOKENIZERS = ("bytes", "llama3", "llama4")


def source_texts(source: str) -> list[str]:
    """The documents of a `data.source`, as texts."""
    if source == "builtin" or source.startswith("builtin:"):
        from herd.data.builtin import DOMAINS, builtin_documents

        domains = tuple(source.split(":", 1)[1].split(",")) if ":" in source else DOMAINS
        texts = [d.text for d in builtin_documents(domains)]
    elif source == "stdlib":
        texts = list(text_documents(python_stdlib_files()))
    else:
        p = Path(source)
        if p.suffix == ".jsonl" and p.is_file():
            from herd.data.builtin import read_documents_jsonl

            texts = [d.text for d in read_documents_jsonl(p)]
        else:
            files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
            if not files or not all(f.is_file() for f in files):
                raise HerdError(f"data.source {source}: no such corpus (expected builtin, builtin:<domain>, "
                                f"stdlib, a documents.jsonl, a .txt file or a directory of .txt files)")
            texts = list(text_documents(files))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise HerdError(f"data.source {source}: empty corpus")
    return texts


def tokenizer_files(spec: str) -> list[Path]:
    """The files that make up tokenizer `spec` (to copy next to checkpoints); [] for byte-level ids."""
    if spec == "bytes":
        return []
    if spec in ("llama3", "llama4"):
        from herd.tokenizer.tiktoken_bpe import builtin_model_path

        return [builtin_model_path(spec)]
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        return [p / n for n in TOKENIZER_FILES if (p / n).is_file()]
    return []


def same_tokenizer(a: str, b: str) -> bool | None:
    """Whether tokenizer specs `a` and `b` are the same vocabulary (by the bytes of their model
    file: "llama3" and the path of its tokenizer.model are one tokenizer); None when one of them
    cannot be found to compare."""
    import hashlib

    if a == b:
        return True
    if "bytes" in (a, b):
        return False
    fa, fb = tokenizer_files(a), tokenizer_files(b)
    if not fa or not fb:
        return None

    def digest(files: list[Path]) -> str:  # the vocabulary file; configs beside it may differ harmlessly
        main = next((f for f in files if f.name in ("tokenizer.model", "tokenizer.json")), files[0])
        return hashlib.sha256(main.read_bytes()).hexdigest()

    return digest(fa) == digest(fb)


def ensure_tokenizer(data: DataConfig, log: Callable[[str], None], texts: list[str] | None = None):
    """The tokenizer `data.tokenizer` names, trained first when it is a missing directory and
    `data.tokenizer_vocab_size` is set. Returns (tokenizer or None for bytes, vocab size)."""
    spec = data.tokenizer
    if spec == "bytes":
        return None, BYTE_VOCAB
    from herd.tokenizer import load_tokenizer

    path = Path(spec)
    if spec not in _NAMED_TOKENIZERS and not path.exists():
        if data.tokenizer_vocab_size <= 0:
            raise HerdError(f"data.tokenizer {spec}: no such tokenizer (set data.tokenizer_vocab_size to "
                            f"train one there from data.source)")
        if not data.source:
            raise HerdError(f"data.tokenizer {spec} is missing and data.source is not set to train it on")
        from herd.tokenizer.train import train_bpe

        log(f"training tokenizer {spec} ({data.tokenizer_vocab_size:,} tokens) on {data.source} — first run")
        texts = texts if texts is not None else source_texts(data.source)
        train_bpe(texts, data.tokenizer_vocab_size, path)
    tok = load_tokenizer(spec)
    return tok, tok.vocab_size


def ensure_shards(data: DataConfig, seed: int, log: Callable[[str], None]) -> Path:
    """The config's shards directory; built first from `data.source` when it is missing."""
    path = Path(data.path)
    if (path / "meta.json").exists():
        meta = read_meta(path)
        made_with = meta.get("tokenizer")
        if made_with is not None and made_with != data.tokenizer:
            same = same_tokenizer(made_with, data.tokenizer)
            if same is False or not (data.tokenizer == "bytes" or tokenizer_files(data.tokenizer)):
                # Training would go on, but every checkpoint would carry the config's tokenizer, and
                # `herd generate` would decode the model's ids with it: fluent-looking garbage.
                raise HerdError(f"data.path {path} was tokenized with {made_with!r}, but data.tokenizer names "
                                f"{data.tokenizer!r}" + (", a different tokenizer" if same is False else
                                                         ", which does not exist")
                                + f"; set data.tokenizer = {made_with!r} (or rebuild the shards)")
            if same is None:
                log(f"note: {path} was tokenized with {made_with!r}, which is not found here to compare with "
                    f"data.tokenizer {data.tokenizer!r}")
        return path
    if not data.source:
        raise HerdError(f"data.path {path} has no shards (meta.json) and data.source is not set")
    texts = source_texts(data.source)
    log(f"preparing shards {path} from {data.source} ({len(texts):,} documents, tokenizer {data.tokenizer}) "
        f"— first run")
    tok, vocab = ensure_tokenizer(data, log, texts)
    docs = (byte_tokenize(t) for t in texts) if tok is None else (tok.encode(t, bos=True, eos=True) for t in texts)
    out = write_shards(docs, path, vocab, tokenizer=data.tokenizer, seed=seed, val_split=data.val_split,
                       val_fraction=data.val_fraction)
    meta = read_meta(out)
    log(f"wrote {path}: " + ", ".join(f"{s} {v['documents']:,} documents / {v['tokens']:,} tokens"
                                      for s, v in meta["splits"].items()))
    return out
