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
# A generous cap, far above any real vocabulary (Llama 3: 128,256; Llama 4 and Gemma: ~200K-262K) and
# well inside the uint32 token shards: without it a typo such as 1000000000 makes the Rust trainer
# try to allocate for a billion tokens and abort the process, and anything past 64 bits overflows.
MAX_VOCAB = 1 << 20
LLAMA4_BPE_TOKENS = 200_000  # TiktokenTokenizer takes a file with this many ranks for Llama 4's layout
MAX_MIN_FREQUENCY = (1 << 64) - 1  # the trainer counts pairs in 64 bits; a larger value cannot convert


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
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(lines), encoding="ascii")
        os.replace(tmp, path)
    except OSError as e:
        raise HerdError(f"{path}: cannot write ({e.strerror or e})") from None
    return path


def check_train_options(vocab_size: int, out_dir: str | os.PathLike, min_frequency: int = 2) -> None:
    """The settings `train_bpe` takes, checked before any input is read or any training is done."""
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise HerdError(f"vocab size {vocab_size} is too small: it must be at least {MIN_VOCAB} "
                        f"(256 byte tokens + {NUM_SPECIAL} Llama 3 special tokens + 1 merge)")
    if vocab_size > MAX_VOCAB:
        raise HerdError(f"vocab size {vocab_size} is too large: at most {MAX_VOCAB:,} "
                        f"(Llama 3 has 128,256; no real vocabulary comes near)")
    if vocab_size - NUM_SPECIAL == LLAMA4_BPE_TOKENS:  # a 200,000-rank file is read as Llama 4's layout (TiktokenTokenizer)
        raise HerdError("vocab size 200256 is ambiguous with Llama 4's layout; choose another size")
    # HF's BpeTrainer merges a pair only if it occurs at least min_frequency times, so 0 and 1 both
    # mean "any pair that occurs"; it takes the value as an unsigned 64-bit integer.
    if not isinstance(min_frequency, int) or not 0 <= min_frequency <= MAX_MIN_FREQUENCY:
        raise HerdError(f"min frequency {min_frequency} is out of range: it must be a whole number from 0 "
                        f"to 2**64-1 (0 and 1 both let any pair that occurs be merged)")
    if not str(out_dir).strip():  # Path("") is ".": the tokenizer would land in the working directory
        raise HerdError("output directory is empty; give a path")
    out_dir = Path(out_dir)
    for p in (out_dir, *out_dir.parents):
        if p.exists() and not p.is_dir():
            raise HerdError(f"output directory {out_dir}: {'it' if p == out_dir else p} exists and is not a directory")


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, *,
              min_frequency: int = 2) -> Path:
    """Train a BPE on `texts` and write `out_dir/tokenizer.model` (+ `train_info.json`).

    `vocab_size` is the total, as in Llama 3's 128,256: BPE tokens (256 bytes + merges) plus the 256
    special tokens. A small corpus can run out of pairs (occurring at least `min_frequency` times)
    before reaching it; the file then holds fewer tokens (said on stderr and in train_info.json).
    UTF-16 surrogates in a text are read as the tokenizer's encode reads them (`valid_unicode`): lone
    ones become U+FFFD, a high+low pair the character it spells. Returns `out_dir/tokenizer.model`."""
    from herd.data.readers import valid_unicode

    check_train_options(vocab_size, out_dir, min_frequency)
    n_bpe = vocab_size - NUM_SPECIAL
    stats = {"documents": 0, "characters": 0}

    def counted() -> Iterator[str]:
        for t in texts:
            if not isinstance(t, str):
                raise HerdError(f"training texts must be str, got {type(t).__name__}")
            if t:
                if not stats["documents"]:  # said once there is text: an empty corpus is one error line
                    _say(f"training a byte-level BPE (Llama 3 split regex) to {vocab_size:,} tokens "
                         f"({n_bpe:,} BPE + {NUM_SPECIAL} special)")
                stats["documents"] += 1
                stats["characters"] += len(t)
                # the trainer takes only valid Unicode: a lone surrogate (JSON "\ud800") would be
                # a UnicodeEncodeError deep inside it
                yield valid_unicode(t)

    t0 = time.perf_counter()
    hf = train_hf_bpe(counted(), n_bpe, min_frequency=min_frequency)
    if stats["characters"] == 0:
        raise HerdError("empty training corpus: no text to train a tokenizer on")
    ranks = ranks_from_hf(hf)
    if len(ranks) == LLAMA4_BPE_TOKENS:
        # A corpus that runs out of pairs can stop at exactly Llama 4's 200,000 BPE tokens even though
        # the requested size was not: TiktokenTokenizer would then read the file with Llama 4's
        # 2,048 specials and o200k split, not the Llama 3 layout and regex it was trained with.
        raise HerdError(f"training stopped at exactly {LLAMA4_BPE_TOKENS:,} BPE tokens (the corpus ran out of "
                        f"pairs), which reads as Llama 4's layout; use a vocab size below "
                        f"{LLAMA4_BPE_TOKENS + NUM_SPECIAL:,} or a larger corpus")
    seconds = time.perf_counter() - t0
    out_dir = Path(out_dir)
    path = write_tiktoken_model(ranks, out_dir / "tokenizer.model")
    info = {"format": "tiktoken", "special_tokens": "llama3", "pattern": LLAMA3_PATTERN,
            "requested_vocab_size": vocab_size, "bpe_tokens": len(ranks),
            "vocab_size": len(ranks) + NUM_SPECIAL, "min_frequency": min_frequency,
            "train_documents": stats["documents"], "train_characters": stats["characters"],
            "train_seconds": round(seconds, 2)}
    try:
        (out_dir / "train_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise HerdError(f"{out_dir / 'train_info.json'}: cannot write ({e.strerror or e})") from None
    _say(f"trained on {stats['documents']:,} documents / {stats['characters']:,} characters in {seconds:.1f} s: "
         f"{len(ranks):,} BPE tokens + {NUM_SPECIAL} special; wrote {path}")
    if len(ranks) < n_bpe:
        # HF's trainer stops when no pair is left that occurs at least min_frequency times (every pair
        # merged, or the rest too rare): the file holds fewer tokens than asked. Not an error (the
        # tokenizer works; its vocab_size says the real size), but said, with what would change it.
        _say(f"note: vocabulary is {len(ranks) + NUM_SPECIAL:,}, not the {vocab_size:,} asked: no pair of tokens "
             f"is left that occurs at least {max(min_frequency, 1):,} times (--min-frequency); a larger corpus"
             + (" or a lower --min-frequency gives more" if min_frequency > 1 else " gives more"))
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

def _input_suffixes() -> tuple[str, ...]:
    """What a directory contributes, matched case-insensitively: the pipeline's JSONL (gzip and
    .ndjson included) and text suffixes. Only `.jsonl .txt .py .md`, compared case-sensitively, made
    a directory of `*.jsonl.gz` or `*.TXT` an "empty training corpus" though given as a file each
    trains."""
    from herd.data.readers import JSONL_SUFFIXES, TEXT_SUFFIXES

    return JSONL_SUFFIXES + TEXT_SUFFIXES


def _pipeline_documents(d: Path) -> Path | None:
    """`d/documents.jsonl` when `d` is a `herd data run` output directory, else None.

    Such a directory also holds removed.jsonl (what the filters dropped) and token shards; a
    tokenizer trained on it should see only the kept documents, each once (a row's `copies` is the
    mix's upsampling, not more text)."""
    from herd.data.pipeline import is_pipeline_output

    if not is_pipeline_output(d):  # no manifest.json, or someone else's: an ordinary directory
        return None
    docs = d / "documents.jsonl"
    if not docs.is_file():
        raise HerdError(f"{d}: a `herd data run` output without documents.jsonl (run.write_documents = false); "
                        f"rerun the pipeline with write_documents = true, or train on the pipeline's inputs")
    _say(f"{d}: a `herd data run` output; training on its kept documents ({docs}) only")
    return docs


def _input_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    if any(not str(p).strip() for p in paths):  # Path("") is ".": it would train on the working directory
        raise HerdError("an input path is empty; give a path")
    for p in map(Path, paths):
        if p.is_dir():
            found: list[Path] = []
            for root, dirs, names in os.walk(p):
                docs = _pipeline_documents(Path(root))
                if docs is not None:
                    found.append(docs)
                    dirs.clear()  # nothing else under a pipeline output is training text
                    continue
                # Hidden files and folders are skipped, as the pipeline's readers skip them: a
                # pipeline's work folder (.NAME.work) holds per-unit copies of kept and removed documents.
                dirs[:] = [n for n in dirs if not n.startswith(".")]
                found.extend(Path(root, n) for n in names if not n.startswith(".")
                             and n.lower().endswith(_input_suffixes()) and Path(root, n).is_file())
            files.extend(sorted(found, key=str))
        elif p.is_file():
            files.append(p)
        else:
            raise HerdError(f"{p}: no such file or directory")
    return files


def _read_inputs(paths: Sequence[str]) -> list[str]:
    """Texts from files or directories: *.jsonl (one {"text": ...} per line, e.g. what `herd data
    prepare builtin` writes), anything else as one plain-text document per file. A `herd data run`
    output directory contributes only its documents.jsonl.

    Files go through the data pipeline's readers, so training sees text exactly as the pipeline
    does: a non-UTF-8 file or a malformed JSONL line is an error naming it, lone surrogates in JSON
    become U+FFFD."""
    from herd.data.readers import detect_format, plan_units, read_unit

    texts: list[str] = []
    for f in _input_files(paths):
        fmt = "jsonl" if detect_format(str(f)) == "jsonl" else "text"
        for unit in plan_units(str(f), fmt):
            texts.extend(d.text for d in read_unit(unit))
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
    from herd.cli import check_not_empty

    check_not_empty(a.out, "--out", builtin=False)
    for p in a.inputs:
        check_not_empty(p, "an input path", builtin=False)
    check_train_options(a.vocab_size, a.out, a.min_frequency)  # before reading a large corpus
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
    p.add_argument("inputs", nargs="+", help="files or directories (*.jsonl[.gz] with a text field, *.txt, *.py, *.md, *.rst)")
    p.add_argument("--vocab-size", type=int, required=True,
                   help=f"total incl. {NUM_SPECIAL} special tokens ({MIN_VOCAB}..{MAX_VOCAB})")
    p.add_argument("--out", required=True, help="directory for tokenizer.model")
    p.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences of a pair to merge (default: 2)")
    p.add_argument("--held-out", type=float, default=0.05, help="fraction of documents kept out to report compression")
    p.add_argument("--no-reference", action="store_true", help="skip the real Llama 3 tokenizer's figure")
    p.set_defaults(func=cmd_tokenizer_train)
    return p
