"""Train a Llama 3 style BPE tokenizer and write it as a tiktoken `tokenizer.model` (issue 3, part 1).

SPEC §2 / paper §3.1: Llama 3's tokenizer is a 128K-token tiktoken BPE (100K tokens from tiktoken plus
28K extra for non-English), which improved compression from 3.17 to 3.94 characters/token over
Llama 2's. We train the same kind of tokenizer on our own corpus:

* pre-tokenization with Llama 3's split regex (`LLAMA3_PATTERN`, Meta's `pat_str`), then byte-level
  BPE trained by HF `tokenizers`, with all 256 bytes in the base vocabulary (nothing is ever unknown);
* written as tiktoken's format — one "base64(token bytes) rank" line per token — with the 256 bytes
  at ranks 0..255 and every learned token at 256 + its merge index. tiktoken merges the adjacent pair
  whose concatenation has the lowest rank, so with ranks in merge order it replays the trainer's
  merges (tests compare ids with HF's own encoding on held-out text);
* Llama 3's 256 special tokens (`<|begin_of_text|>`, ..., reserved ones) follow the last rank, as in
  Meta's file, so `TiktokenTokenizer(out/"tokenizer.model")` and `load_tokenizer(out)` load it with
  the Llama 3 chat format.

`compression_report` measures characters/token on held-out text for ours and the real Llama 3
tokenizer, the paper's compression metric.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from herd.errors import HerdError
from herd.tokenizer.bytelevel import LLAMA3_PATTERN, token_to_bytes
from herd.tokenizer.tiktoken_bpe import FLAVORS

NUM_SPECIAL = FLAVORS["llama3"]["num_special"]  # 256, Llama 3's layout
MIN_VOCAB = 256 + NUM_SPECIAL + 1  # the byte alphabet, the specials, and at least one merge


def _say(msg: str) -> None:
    print(f"herd: {msg}", file=sys.stderr, flush=True)


def _hf_trainer_tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    # Same split as Meta's tiktoken pat_str, then bytes → GPT-2 characters (no second regex).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    return tok


def train_hf_bpe(texts: Iterable[str], n_bpe: int, *, min_frequency: int = 2) -> Any:
    """The HF `tokenizers.Tokenizer` (byte-level BPE, Llama 3 split) trained to `n_bpe` tokens
    including the 256 bytes. Exposed so tests can compare it with the tiktoken file."""
    from tokenizers import pre_tokenizers, trainers

    tok = _hf_trainer_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    return tok


def ranks_from_hf(tok: Any) -> dict[bytes, int]:
    """tiktoken ranks from a trained HF BPE: bytes 0..255 at ranks 0..255, then each merge's result
    at 256 + merge index (rank order = merge order)."""
    model = json.loads(tok.to_str())["model"]
    ranks = {bytes([b]): b for b in range(256)}
    for merge in model["merges"]:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        token = token_to_bytes(a) + token_to_bytes(b)
        if token in ranks:  # a trainer learns each token once; anything else would break rank order
            raise HerdError(f"BPE training produced the token {token!r} twice; cannot write tiktoken ranks")
        ranks[token] = len(ranks)
    missing = [s for s in model["vocab"] if token_to_bytes(s) not in ranks]
    if missing:
        raise HerdError(f"trained vocabulary has tokens no merge produces: {missing[:5]}")
    return ranks


def write_tiktoken_model(ranks: dict[bytes, int], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines), encoding="ascii")
    os.replace(tmp, path)
    return path


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, *,
              min_frequency: int = 2) -> Path:
    """Train a BPE on `texts` and write `out_dir/tokenizer.model` (+ `train_info.json`).

    `vocab_size` is the total, as in Llama 3's 128,256: BPE tokens (256 bytes + merges) plus the 256
    special tokens. A small corpus can run out of pairs before reaching it; the file then holds fewer
    tokens (said on stderr). Returns `out_dir/tokenizer.model`."""
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise HerdError(f"vocab size {vocab_size} is too small: it must be at least {MIN_VOCAB} "
                        f"(256 byte tokens + {NUM_SPECIAL} Llama 3 special tokens + 1 merge)")
    n_bpe = vocab_size - NUM_SPECIAL
    if n_bpe == 200_000:  # a 200,000-rank file is read as Llama 4's layout (tiktoken_bpe.TiktokenTokenizer)
        raise HerdError("vocab size 200256 is ambiguous with Llama 4's layout; choose another size")
    stats = {"documents": 0, "characters": 0}

    def counted() -> Iterator[str]:
        for t in texts:
            if not isinstance(t, str):
                raise HerdError(f"training texts must be str, got {type(t).__name__}")
            if t:
                stats["documents"] += 1
                stats["characters"] += len(t)
                yield t

    _say(f"training a byte-level BPE (Llama 3 split regex) to {vocab_size:,} tokens "
         f"({n_bpe:,} BPE + {NUM_SPECIAL} special)")
    t0 = time.perf_counter()
    hf = train_hf_bpe(counted(), n_bpe, min_frequency=min_frequency)
    if stats["characters"] == 0:
        raise HerdError("empty training corpus: no text to train a tokenizer on")
    ranks = ranks_from_hf(hf)
    seconds = time.perf_counter() - t0
    out_dir = Path(out_dir)
    path = write_tiktoken_model(ranks, out_dir / "tokenizer.model")
    info = {"format": "tiktoken", "special_tokens": "llama3", "pattern": LLAMA3_PATTERN,
            "requested_vocab_size": vocab_size, "bpe_tokens": len(ranks),
            "vocab_size": len(ranks) + NUM_SPECIAL, "min_frequency": min_frequency,
            "train_documents": stats["documents"], "train_characters": stats["characters"],
            "train_seconds": round(seconds, 2)}
    (out_dir / "train_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    short = f" (the corpus ran out of pairs before {n_bpe:,})" if len(ranks) < n_bpe else ""
    _say(f"trained on {stats['documents']:,} documents / {stats['characters']:,} characters in {seconds:.1f} s: "
         f"{len(ranks):,} BPE tokens{short} + {NUM_SPECIAL} special; wrote {path}")
    return path


# ---- compression (paper §3.1: 3.17 → 3.94 characters/token from Llama 2 to Llama 3) ---------------

def chars_per_token(tokenizer: Any, texts: Sequence[str]) -> dict[str, float | int]:
    chars = sum(len(t) for t in texts)
    tokens = sum(len(tokenizer.encode(t)) for t in texts)
    return {"characters": chars, "tokens": tokens, "chars_per_token": chars / tokens if tokens else 0.0}


def compression_report(tokenizer: Any, held_out_texts: Iterable[str], *, reference: str | None = "llama3") -> dict:
    """Characters/token of `tokenizer` (a herd Tokenizer or a path/name `load_tokenizer` accepts)
    on held-out text, next to the real Llama 3 tokenizer's (`reference`; None skips it)."""
    from herd.tokenizer import load_tokenizer

    texts = [t for t in held_out_texts if t]
    if not texts:
        raise HerdError("no held-out text to measure compression on")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    report: dict[str, Any] = {"ours": {"vocab_size": tokenizer.vocab_size, **chars_per_token(tokenizer, texts)}}
    if reference:
        ref = load_tokenizer(reference)
        report[reference] = {"vocab_size": ref.vocab_size, **chars_per_token(ref, texts)}
    return report


def format_report(report: dict) -> str:
    return "\n".join(f"{name:>8}: vocab {r['vocab_size']:>7,}  {r['chars_per_token']:.2f} chars/token "
                     f"({r['characters']:,} chars → {r['tokens']:,} tokens)" for name, r in report.items())


# ---- CLI (wired into herd/cli.py as `herd tokenizer train`) -----------------------------------------

def _read_inputs(paths: Sequence[str]) -> list[str]:
    """Texts from files or directories: *.jsonl (one {"text": ...} per line, e.g. what `herd data
    prepare builtin` writes), anything else as one plain-text document per file."""
    from herd.data.builtin import read_documents_jsonl

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (".jsonl", ".txt", ".py", ".md")))
        elif p.is_file():
            files.append(p)
        else:
            raise HerdError(f"{p}: no such file or directory")
    texts: list[str] = []
    for f in files:
        if f.suffix == ".jsonl":
            texts.extend(d.text for d in read_documents_jsonl(f))
        else:
            try:
                texts.append(f.read_text(encoding="utf-8", errors="replace"))
            except OSError as e:
                raise HerdError(f"{f}: cannot read ({e.strerror})") from None
    return texts


def split_held_out(texts: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """Every k-th document held out (deterministic), k = round(1/fraction); at least one kept for training."""
    if not 0 <= fraction < 1:
        raise HerdError(f"held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0 or len(texts) < 2:
        return list(texts), []
    k = max(2, round(1 / fraction))
    return ([t for i, t in enumerate(texts) if i % k != k - 1], [t for i, t in enumerate(texts) if i % k == k - 1])


def cmd_tokenizer_train(a: argparse.Namespace) -> None:
    texts = _read_inputs(a.inputs)
    train, held = split_held_out(texts, a.held_out)
    path = train_bpe(train, a.vocab_size, a.out, min_frequency=a.min_frequency)
    if held:
        report = compression_report(path.parent, held, reference=None if a.no_reference else "llama3")
        (path.parent / "compression.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"compression on {len(held)} held-out documents:\n{format_report(report)}")


def add_tokenizer_parser(subparsers) -> argparse.ArgumentParser:
    """Add `train` to a `herd tokenizer` subparsers object."""
    p = subparsers.add_parser("train", help="train a Llama 3 style BPE and write a tiktoken tokenizer.model")
    p.add_argument("inputs", nargs="+", help="files or directories (*.jsonl with a text field, *.txt, *.py, *.md)")
    p.add_argument("--vocab-size", type=int, required=True, help=f"total incl. {NUM_SPECIAL} special tokens")
    p.add_argument("--out", required=True, help="directory for tokenizer.model")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--held-out", type=float, default=0.05, help="fraction of documents kept out to report compression")
    p.add_argument("--no-reference", action="store_true", help="skip the real Llama 3 tokenizer's figure")
    p.set_defaults(func=cmd_tokenizer_train)
    return p
