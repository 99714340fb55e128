"""The Llama 3 pre-training data pipeline (SPEC §3.1), from raw text/JSONL/HTML to token shards.

    herd data run configs/data/builtin.toml [--minhash.threshold=0.3 ...] [--workers N]

Stages, in the paper's order, each writing how many documents and tokens it removed into
`OUT/manifest.json`:

    read          text / JSONL / HTML (main-content extraction that keeps code)   readers.py
    url_dedup     one document per URL (the most recent by `date`)                  dedup.py
    lang_id       fastText lid.176 language and score; other languages dropped      langid.py
    minhash       document near-duplicates: MinHash LSH (datasketch), per language  dedup.py
    line_dedup    lines in more than N documents of a bucket (ccNet), per language  dedup.py
    repetition    duplicated n-gram coverage: repetitive lines and documents        filters.py
    dirty_words   blocklisted-word counts                                           filters.py
    kl_divergence token-distribution KL against the domain's corpus                 filters.py
    quality       a trained classifier's score (herd data label / train-quality)    quality.py
    mix           domain mixing weights (up/down-sampling by token share)           mix.py
    → OUT/        token shards (herd.data.shards format, PackedLoader reads them), manifest.json,
                  documents.jsonl (kept text, with copies and split), removed.jsonl (what, where, why)

Tokens are counted with the run's tokenizer, each document with its BOS and EOS, so the counts
chain exactly: every stage's documents_out/tokens_out is the next stage's *_in, and the last
stage's equals the shards' totals.

How it runs (map-reduce, the shape datatrove's MinHash pipeline has too). The input is cut into
units (readers.py). Five parallel phases run over the units — read (+ tokenize, language ID, signatures),
line counts, filters (+ tokenize, unigram counts), KL/quality, shards — separated by four small
global steps in the main process: URL + MinHash decisions, line-count merge, corpus unigram
merge, mixing factors. Every unit result is written to `WORK/units/NNNNN/` atomically (temp file,
fsync, rename) and then a completion marker `PHASE.done`; global results likewise. A run that is
killed (even SIGKILL) and started again with the same config skips every marked unit and global
step and redoes the rest; since each result is a pure function of its inputs, the output is
exactly that of an uninterrupted run — no document lost or duplicated. The finished shards
directory is published with one rename.

On a cluster. The steps are data (`STEPS`): a phase runs once per unit, a global step once.
`run_units(ctx, phase, rank, world_size)` is one task of a phase (units rank, rank + world_size,
...), `run_global(ctx, name)` a one-task job; both touch only files, so any executor that runs
"task i of N" on a shared filesystem runs them unchanged:

* datatrove: `herd.data.cluster.datatrove_executors(cfg, tasks=N, executor=SlurmPipelineExecutor,
  ...)` chains one job per step with `depends=` (datatrove's own MinHash dedup is chained the
  same way: signatures → buckets → clusters → filter). Its completion tracking skips finished
  ranks; herd's markers skip finished units inside a rank. Tested with `LocalPipelineExecutor`:
  the output equals the single-machine run's.
* Ray: `ray.remote(run_units).remote(ctx, phase, r, N)` for r < N, `ray.get` as the barrier, then
  `run_global` on the driver; a retried task rewrites the same files.

The local executor below is the same thing on one machine with a process pool (`run.workers`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
import typing
import zlib
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from herd.errors import HerdError
from herd.files import atomic_write

STAGES = ("read", "url_dedup", "lang_id", "minhash", "line_dedup", "repetition", "dirty_words", "kl_divergence",
          "quality", "mix")
PHASES = ("read", "lines", "filter", "score", "write")


# ---- config ----------------------------------------------------------------------------------------
@dataclass
class InputConfig:
    """One `[[input]]` table: a file, directory or glob of text / JSONL / HTML."""

    path: str = ""
    format: str = "auto"  # auto (by extension) | jsonl | text | html
    domain: str = ""  # domain tag of documents that carry none ("" → "general")
    text_key: str = "text"  # the JSONL field holding the text (datatrove's `text_key`)
    # "builtin": when `path` (DIR/documents.jsonl) is missing, write the built-in corpus there
    # first (`herd data prepare builtin --out DIR`), and say so
    prepare: str = ""


@dataclass
class RunSection:
    out: str = "data/pipeline"  # the shards directory written (atomically) at the end
    work_dir: str = ""  # unit results and markers; "" → a hidden sibling of `out`
    workers: int = 0  # processes; 0 = all cores
    shard_bytes: int = 1 << 21  # input bytes per unit (the unit of parallelism and of resumption)
    tokenizer: str = "llama3"  # "llama3", "llama4", a tokenizer file/directory, or "bytes"
    val_fraction: float = 0.01  # documents held out (by a hash of their id) as the val split
    seed: int = 0
    write_documents: bool = True  # also OUT/documents.jsonl: the kept documents with their copies
    keep_work: bool = False  # keep WORK after success (for inspection)


@dataclass
class ReadConfig:
    min_chars: int = 1  # documents with fewer non-space characters after extraction are dropped


@dataclass
class UrlDedupConfig:
    enabled: bool = True


@dataclass
class LangIdConfig:
    """SPEC §3.1.1: fastText language ID (lid.176, 176 languages) puts each document in a language;
    MinHash and line de-dup then run within each language. Judged in the read phase."""

    enabled: bool = False
    keep: list[str] = field(default_factory=lambda: ["en"])  # lid.176 codes kept; [] = every language
    # the top language's score below this → removed (datatrove's LanguageFilter, FineWeb: 0.65)
    min_score: float = 0.65
    domains: list[str] = field(default_factory=list)


@dataclass
class MinHashConfig:
    enabled: bool = True
    ngram: int = 5  # word n-gram shingles
    num_perm: int = 128
    threshold: float = 0.8  # estimated Jaccard similarity that makes a near-duplicate
    seed: int = 1
    domains: list[str] = field(default_factory=list)  # apply to these domains only; [] = all


@dataclass
class LineDedupConfig:
    enabled: bool = True
    max_repeats: int = 6  # §3.1.1: lines seen more than 6 times …
    bucket_documents: int = 30_000_000  # … in each bucket of 30M documents
    per_document: bool = True  # count a line once per document (false: every occurrence)
    domains: list[str] = field(default_factory=list)


@dataclass
class RepetitionConfig:
    enabled: bool = True
    line_min_words: int = 20  # lines this long are checked for duplicated n-gram coverage
    line_ngram: int = 3
    line_max_fraction: float = 0.5
    # Gopher table A1 (document rules): [n, max character fraction]
    top_ngrams: list[tuple[int, float]] = field(default_factory=lambda: [(2, 0.20), (3, 0.18), (4, 0.16)])
    dup_ngrams: list[tuple[int, float]] = field(default_factory=lambda: [
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)])
    domains: list[str] = field(default_factory=list)


@dataclass
class DirtyWordsConfig:
    enabled: bool = True
    words_file: str = ""  # one word a line; "" = better-profanity's list
    min_count: int = 3  # drop when at least this many blocklisted words …
    max_fraction: float = 0.01  # … make more than this share of all words
    domains: list[str] = field(default_factory=list)


@dataclass
class KLConfig:
    enabled: bool = True
    max_kl: float = 3.0  # nats; KL(document unigrams ‖ its domain's corpus unigrams)
    smoothing: float = 1e-3  # uniform share mixed into the corpus distribution
    min_tokens: int = 200  # shorter documents are not judged: their unigram estimate is too noisy
    domains: list[str] = field(default_factory=list)


@dataclass
class QualityConfig:
    enabled: bool = False
    model: str = ""  # a .npz from `herd data train-quality`
    min_score: float = 0.5
    domains: list[str] = field(default_factory=list)


@dataclass
class MixConfig:
    weights: dict[str, float] = field(default_factory=dict)  # domain → share of output tokens; {} = as is
    upsample: bool = True  # allow repeating documents; false = only thin the larger domains


@dataclass
class PipelineConfig:
    input: list[InputConfig] = field(default_factory=list)
    run: RunSection = field(default_factory=RunSection)
    read: ReadConfig = field(default_factory=ReadConfig)
    url_dedup: UrlDedupConfig = field(default_factory=UrlDedupConfig)
    lang_id: LangIdConfig = field(default_factory=LangIdConfig)
    minhash: MinHashConfig = field(default_factory=MinHashConfig)
    line_dedup: LineDedupConfig = field(default_factory=LineDedupConfig)
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)
    dirty_words: DirtyWordsConfig = field(default_factory=DirtyWordsConfig)
    kl_divergence: KLConfig = field(default_factory=KLConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    mix: MixConfig = field(default_factory=MixConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = [f.name for f in dataclasses.fields(PipelineConfig)]


def _set(obj: Any, section: str, key: str, value: Any) -> None:
    from herd.train.config import set_field

    set_field(obj, section, key, value)


def load_pipeline_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                         data: dict | None = None) -> PipelineConfig:
    """Defaults ← TOML (or `data`) ← `section.key=value` overrides; unknown keys are errors."""
    from herd.train.config import override_value, parse_override, read_toml

    table: dict = dict(data or {})
    if path is not None:
        table = read_toml(path)
    cfg = PipelineConfig()
    for section, values in table.items():
        if section not in SECTIONS:
            raise HerdError(f"unknown config section {section!r}; valid sections: {', '.join(SECTIONS)}")
        if section == "input":
            entries = values if isinstance(values, list) else [values]
            for entry in entries:
                if not isinstance(entry, dict):
                    raise HerdError("input: each [[input]] must be a table with a path")
                inp = InputConfig()
                for k, v in entry.items():
                    _set(inp, "input", k, v)
                cfg.input.append(inp)
            continue
        if not isinstance(values, dict):
            raise HerdError(f"config: {section!r} must be a table; valid sections: {', '.join(SECTIONS)}")
        for k, v in values.items():
            _set(getattr(cfg, section), section, k, v)
    for item in overrides:
        section, key, value = parse_override(item)
        if section not in SECTIONS:
            raise HerdError(f"bad override {item!r}: valid sections: {', '.join(SECTIONS)}")
        if section == "input":  # --input.path=... changes the config's one input
            if len(cfg.input) > 1:
                raise HerdError(f"bad override {item!r}: the config has {len(cfg.input)} inputs; edit the file")
            cfg.input = cfg.input or [InputConfig()]
            _set(cfg.input[0], "input", key, override_value(InputConfig, key, value, item))
            continue
        obj = getattr(cfg, section)
        _set(obj, section, key, override_value(type(obj), key, value, item))
    _expand_paths(cfg)
    validate(cfg)
    return cfg


def _expand_paths(cfg: PipelineConfig) -> None:
    """`~` in a path means the home directory everywhere: left as is, `run.out = "~/corpus"` was
    written to a folder literally named `~` in the current directory (while the output check looked
    at the real home), and a `prepare`d input landed there too."""
    for inp in cfg.input:
        inp.path = os.path.expanduser(inp.path)
    for sec, key in (("run", "out"), ("run", "work_dir"), ("dirty_words", "words_file"), ("quality", "model")):
        obj = getattr(cfg, sec)
        setattr(obj, key, os.path.expanduser(getattr(obj, key)))


def validate(cfg: PipelineConfig) -> None:
    if not cfg.input or any(not i.path for i in cfg.input):
        raise HerdError("config: at least one [[input]] with a path is needed")
    if not 0 < cfg.minhash.threshold <= 1 or cfg.minhash.ngram < 1 or cfg.minhash.num_perm < 2:
        raise HerdError("minhash: threshold in (0, 1], ngram >= 1 and num_perm >= 2 are needed")
    if cfg.line_dedup.max_repeats < 1 or cfg.line_dedup.bucket_documents < 1:
        raise HerdError("line_dedup: max_repeats and bucket_documents must be positive")
    if not 0 <= cfg.run.val_fraction < 1:
        raise HerdError(f"run.val_fraction must be in [0, 1) (got {cfg.run.val_fraction})")
    # The work directory is a sibling named after run.out, and publishing replaces run.out as a
    # whole: "" or "/" names no such directory (and crashed deriving the sibling's name).
    if not cfg.run.out.strip() or not Path(cfg.run.out).resolve().name:
        raise HerdError(f"run.out {cfg.run.out!r} must name a directory for the shards (not empty, not /)")
    if cfg.run.shard_bytes < 1:
        raise HerdError("run.shard_bytes must be positive")
    if not 0 <= cfg.lang_id.min_score <= 1:
        raise HerdError(f"lang_id.min_score must be in [0, 1] (got {cfg.lang_id.min_score})")
    if cfg.lang_id.enabled:
        from herd.data.langid import languages

        bad = [c for c in cfg.lang_id.keep if c not in languages()]
        if bad:
            raise HerdError(f"lang_id.keep: unknown language code(s) {', '.join(map(repr, bad))}; fastText lid.176 "
                            f"knows {len(languages())}: {', '.join(sorted(languages()))}")
    _validate_ranges(cfg)
    if cfg.quality.enabled and not cfg.quality.model:
        raise HerdError("quality.enabled needs quality.model (train one with `herd data train-quality`)")
    if cfg.quality.enabled and not Path(cfg.quality.model).is_file():
        raise HerdError(f"quality.model {cfg.quality.model}: no such file (train one with `herd data train-quality`)")
    if cfg.quality.enabled:  # a bad model file is one line now, not a worker's failure after hours
        from herd.data.quality import QualityModel

        QualityModel.load(cfg.quality.model)


def _validate_ranges(cfg: PipelineConfig) -> None:
    """Numbers outside their meaningful range fail here, in one line, rather than as a NumPy error
    deep in a worker or, worse, as a filter that silently keeps or drops everything (a KL smoothing
    outside [0, 1] makes every divergence NaN, and NaN > max_kl is false)."""
    checks = [
        ("run.workers", cfg.run.workers, cfg.run.workers >= 0, ">= 0 (0 = all cores)"),
        ("read.min_chars", cfg.read.min_chars, cfg.read.min_chars >= 0, ">= 0"),
        # datasketch keeps num_perm 64-bit hash values per document in memory
        ("minhash.num_perm", cfg.minhash.num_perm, cfg.minhash.num_perm <= 4096, "in [2, 4096]"),
        ("repetition.line_min_words", cfg.repetition.line_min_words, cfg.repetition.line_min_words >= 1, ">= 1"),
        ("repetition.line_ngram", cfg.repetition.line_ngram, cfg.repetition.line_ngram >= 1, ">= 1"),
        ("repetition.line_max_fraction", cfg.repetition.line_max_fraction,
         0 <= cfg.repetition.line_max_fraction <= 1, "in [0, 1]"),
        ("dirty_words.min_count", cfg.dirty_words.min_count, cfg.dirty_words.min_count >= 1, ">= 1"),
        ("dirty_words.max_fraction", cfg.dirty_words.max_fraction, 0 <= cfg.dirty_words.max_fraction <= 1,
         "in [0, 1]"),
        ("kl_divergence.max_kl", cfg.kl_divergence.max_kl, cfg.kl_divergence.max_kl > 0, "> 0 (nats)"),
        ("kl_divergence.smoothing", cfg.kl_divergence.smoothing, 0 < cfg.kl_divergence.smoothing <= 1,
         "in (0, 1] (the uniform share mixed into the corpus distribution; 0 makes unseen tokens infinitely "
         "surprising)"),
        ("kl_divergence.min_tokens", cfg.kl_divergence.min_tokens, cfg.kl_divergence.min_tokens >= 1, ">= 1"),
        ("quality.min_score", cfg.quality.min_score, 0 <= cfg.quality.min_score <= 1, "in [0, 1]"),
    ]
    for key, value, ok, want in checks:
        if not ok:
            raise HerdError(f"{key} must be {want} (got {value})")
    for key, rules in (("repetition.top_ngrams", cfg.repetition.top_ngrams),
                       ("repetition.dup_ngrams", cfg.repetition.dup_ngrams)):
        bad = [list(r) for r in rules if r[0] < 1 or not 0 < r[1] <= 1]
        if bad:
            raise HerdError(f"{key}: each rule is [n >= 1, max fraction in (0, 1]]; got {bad[0]}")
    bad = {d: w for d, w in cfg.mix.weights.items() if not w >= 0 or math.isinf(w)}
    if bad:
        raise HerdError(f"mix.weights must be finite and non-negative (got {bad})")


def _output_config(cfg: PipelineConfig) -> dict:
    """The config fields that decide the output (a resumed run must match them)."""
    d = cfg.to_dict()
    for k in ("workers", "keep_work", "work_dir"):
        d["run"].pop(k)
    return d


# ---- small file helpers ----------------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, ensure_ascii=False).encode()))


def _write_jsonl(path: Path, rows: typing.Iterable[dict]) -> None:
    def w(f):
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")
    atomic_write(path, w)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _write_npz(path: Path, **arrays) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


# ---- tokenizers (one per process) ------------------------------------------------------------------
class _ByteTokenizer:
    def __init__(self):
        from herd.data.shards import BYTE_VOCAB, byte_tokenize

        self.vocab_size, self._enc = BYTE_VOCAB, byte_tokenize

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self._enc(text)


_TOKENIZERS: dict[str, Any] = {}


def get_tokenizer(spec: str):
    if spec not in _TOKENIZERS:
        if spec == "bytes":
            _TOKENIZERS[spec] = _ByteTokenizer()
        else:
            from herd.tokenizer import load_tokenizer

            _TOKENIZERS[spec] = load_tokenizer(spec)
    return _TOKENIZERS[spec]


# ---- counts ----------------------------------------------------------------------------------------
class Tally:
    """counts[stage][domain][field]; fields: documents_in/_removed/_added, tokens_in/_removed/_added,
    lines_removed."""

    def __init__(self, counts: dict | None = None):
        self.counts: dict[str, dict[str, dict[str, int]]] = counts or {}

    def add(self, stage: str, domain: str, **kw: int) -> None:
        d = self.counts.setdefault(stage, {}).setdefault(domain, {})
        for k, v in kw.items():
            d[k] = d.get(k, 0) + int(v)

    def merge(self, other: dict) -> None:
        for stage, doms in other.items():
            for dom, kv in doms.items():
                self.add(stage, dom, **kv)


# ---- the run's context (what every unit task needs; picklable) -------------------------------------
@dataclass
class Context:
    cfg: PipelineConfig
    work: Path
    units: list  # readers.Unit

    def unit_dir(self, u: int) -> Path:
        return self.work / "units" / f"{u:05d}"

    def marker(self, u: int, phase: str) -> Path:
        return self.unit_dir(u) / f"{phase}.done"

    def published(self) -> bool:
        """Whether this run's output was already renamed into place (see step_publish)."""
        return (self.work / "published.json").exists() and not (self.work / "out").exists()

    def in_scope(self, stage_cfg, domain: str) -> bool:
        return getattr(stage_cfg, "enabled", True) and (not stage_cfg.domains or domain in stage_cfg.domains)


def _gone(doc_id: str, name: str, domain: str, stage: str, detail: str) -> dict:
    """A line of OUT/removed.jsonl: which document a stage removed, and why."""
    return {"id": doc_id, "name": name, "domain": domain, "stage": stage, "detail": detail}


def _doc_id(u: int, k: int) -> str:
    return f"{u:05d}:{k:07d}"


def _is_val(doc_id: str, fraction: float, seed: int) -> bool:
    return fraction > 0 and zlib.crc32(f"val:{seed}:{doc_id}".encode()) / 2**32 < fraction


def _lang_reason(cfg: PipelineConfig, row: dict) -> str:
    """Why lang_id removes a read row ("" when it stays). Rows out of its scope have lang "";
    the decision is made from what the read phase recorded, so every phase agrees on it."""
    lang, score = row.get("lang", ""), row.get("lang_score", 0.0)
    if not row.get("lang_judged"):
        return ""
    c = cfg.lang_id
    why = ("not in lang_id.keep" if c.keep and lang not in c.keep
           else f"below min_score {c.min_score:g}" if score < c.min_score else "")
    return f"lang={lang or 'none'} score={score:.2f} ({why})" if why else ""


# ---- phase 1: read, extract, tokenize, MinHash signatures ------------------------------------------
def phase_read(ctx: Context, u: int) -> dict:
    from herd.data.dedup import minhash_signature
    from herd.data.readers import read_unit

    cfg = ctx.cfg
    tok = get_tokenizer(cfg.run.tokenizer)
    tally = Tally()
    rows, sig_ids, sig_langs, sigs, urls, gone = [], [], [], [], [], []
    for k, raw in enumerate(read_unit(ctx.units[u])):
        domain = raw.domain or "general"
        doc_id = _doc_id(u, k)
        n_tok = len(tok.encode(raw.text, bos=True, eos=True))
        tally.add("read", domain, documents_in=1, tokens_in=n_tok)
        # non-space characters, as read.min_chars says: "a   b" is 2, not the 5 of its strip()
        chars = sum(map(len, raw.text.split()))
        if chars < cfg.read.min_chars:
            tally.add("read", domain, documents_removed=1, tokens_removed=n_tok)
            gone.append(_gone(doc_id, raw.name, domain, "read", f"{chars} non-space characters"))
            continue
        row = {"id": doc_id, "name": raw.name, "url": raw.url, "date": raw.date, "domain": domain,
               "tokens": n_tok, "text": raw.text, "lang": "", "lang_score": 0.0, "lang_judged": False}
        if ctx.in_scope(cfg.lang_id, domain):
            from herd.data.langid import identify

            lang, score = identify(raw.text)
            row |= {"lang": lang, "lang_score": round(score, 4), "lang_judged": True}
        rows.append(row)
        urls.append([doc_id, raw.url, raw.date, raw.name])
        # a document lang_id removes needs no signature; the rest are bucketed by language
        if ctx.in_scope(cfg.minhash, domain) and not _lang_reason(cfg, row):
            sig_ids.append(doc_id)
            sig_langs.append(row["lang"])
            sigs.append(minhash_signature(raw.text, cfg.minhash.ngram, cfg.minhash.num_perm, cfg.minhash.seed))
    d = ctx.unit_dir(u)
    d.mkdir(parents=True, exist_ok=True)
    _write_jsonl(d / "read.jsonl", rows)
    _write_json(d / "urls.json", urls)
    _write_jsonl(d / "read.removed.jsonl", gone)
    _write_npz(d / "sig.npz", ids=np.array(sig_ids, dtype=str), langs=np.array(sig_langs, dtype=str),
               sig=np.stack(sigs) if sigs else np.zeros((0, cfg.minhash.num_perm), np.uint64))
    return {"tally": tally.counts, "documents": len(rows)}


# ---- global 1: URL and MinHash decisions -----------------------------------------------------------
def global_dedup(ctx: Context) -> dict:
    from herd.data.dedup import minhash_duplicates, url_duplicates

    cfg = ctx.cfg
    url_removed: dict[str, str] = {}
    records = [r for u in range(len(ctx.units)) for r in json.loads((ctx.unit_dir(u) / "urls.json").read_text())]
    if cfg.url_dedup.enabled:
        url_removed = url_duplicates([tuple(r[:3]) for r in records])
    near: dict[str, str] = {}
    if cfg.minhash.enabled:
        ids, langs, sigs = [], [], []
        for u in range(len(ctx.units)):
            with np.load(ctx.unit_dir(u) / "sig.npz") as z:
                ids.extend(z["ids"].tolist())
                langs.extend(z["langs"].tolist())
                sigs.append(z["sig"])
        sig = np.concatenate(sigs) if sigs else np.zeros((0, cfg.minhash.num_perm), np.uint64)
        # SPEC §3.1.1 de-duplicates within each language: documents of different languages are
        # never near-duplicates (one LSH index per language; "" = not judged by lang_id)
        near = minhash_duplicates(ids, sig, cfg.minhash.threshold, cfg.minhash.seed, skip=url_removed,
                                  groups=langs)
    # removed id → "kept id (kept name)", for OUT/removed.jsonl
    names = {r[0]: r[3] for r in records}
    return {k: {rm: f"{kept} ({names[kept]})" for rm, kept in d.items()}
            for k, d in (("url", url_removed), ("minhash", near))}


# ---- phase 2: line counts per bucket ---------------------------------------------------------------
def _n_buckets(ctx: Context) -> int:
    total = json.loads((ctx.work / "read.summary.json").read_text())["documents"]
    return max(1, math.ceil(total / ctx.cfg.line_dedup.bucket_documents))


def _dedup_removed(ctx: Context) -> tuple[dict, dict]:
    d = json.loads((ctx.work / "dedup.json").read_text())
    return d["url"], d["minhash"]


def phase_line_counts(ctx: Context, u: int) -> dict:
    from herd.data.dedup import bucket_of, count_lines, line_hashes

    url_rm, near_rm = _dedup_removed(ctx)
    nb = _n_buckets(ctx)
    hashes = []
    for row in _read_jsonl(ctx.unit_dir(u) / "read.jsonl"):
        if (row["id"] in url_rm or row["id"] in near_rm or _lang_reason(ctx.cfg, row)
                or not ctx.in_scope(ctx.cfg.line_dedup, row["domain"])):
            continue
        hashes.append(line_hashes(row["text"], bucket_of(row["id"], nb), row.get("lang", ""))[1])
    h, c = count_lines(hashes, ctx.cfg.line_dedup.per_document)
    _write_npz(ctx.unit_dir(u) / "lines.npz", hashes=h, counts=c)
    return {}


def global_lines(ctx: Context) -> np.ndarray:
    from herd.data.dedup import merge_counts

    parts = []
    for u in range(len(ctx.units)):
        with np.load(ctx.unit_dir(u) / "lines.npz") as z:
            parts.append((z["hashes"], z["counts"]))
    h, c = merge_counts(parts)
    return np.sort(h[c > ctx.cfg.line_dedup.max_repeats]).astype(np.uint64)


# ---- phase 3: line de-dup, heuristic filters, final tokenization -----------------------------------
class _Doc:
    """One document going through phase 3's stages, accounting each in the tally."""

    def __init__(self, row: dict, tally: Tally, tok, gone: list[dict]):
        self.id, self.name, self.domain = row["id"], row["name"], row["domain"]
        self.text, self.n, self.tally, self.tok, self.gone = row["text"], row["tokens"], tally, tok, gone
        self.ids: list[int] | None = None  # token ids of the current text, once computed

    def stage(self, name: str, removed: bool, new_text: str | None = None, lines: int = 0,
              detail: str = "") -> bool:
        """Account stage `name`: the document is removed, or its text becomes `new_text` (lines
        dropped; re-tokenized so the token counts stay exact). Returns whether it survives."""
        self.tally.add(name, self.domain, documents_in=1, tokens_in=self.n)
        if not removed and new_text is not None and new_text != self.text:
            if not new_text.strip():
                removed, detail = True, f"all {lines} non-blank lines removed"
            else:
                self.ids = self.tok.encode(new_text, bos=True, eos=True)
                self.tally.add(name, self.domain, tokens_removed=self.n - len(self.ids), lines_removed=lines)
                self.text, self.n = new_text, len(self.ids)
        if removed:
            self.tally.add(name, self.domain, documents_removed=1, tokens_removed=self.n, lines_removed=lines)
            self.gone.append(_gone(self.id, self.name, self.domain, name, detail))
        return not removed

    def token_ids(self) -> list[int]:
        if self.ids is None:
            self.ids = self.tok.encode(self.text, bos=True, eos=True)
        if len(self.ids) != self.n:
            raise RuntimeError(f"token count changed between stages ({self.n} → {len(self.ids)})")
        return self.ids


def phase_filter(ctx: Context, u: int) -> dict:
    from herd.data.dedup import bucket_of, line_hashes
    from herd.data.filters import dirty_word_count, drop_repetitive_lines, load_word_list, repetition_reason

    cfg = ctx.cfg
    tok = get_tokenizer(cfg.run.tokenizer)
    url_rm, near_rm = _dedup_removed(ctx)
    bad = np.load(ctx.work / "bad_lines.npy") if cfg.line_dedup.enabled else np.zeros(0, np.uint64)
    nb = _n_buckets(ctx) if cfg.line_dedup.enabled else 1
    words = load_word_list(cfg.dirty_words.words_file) if cfg.dirty_words.enabled else frozenset()
    tally = Tally()
    rows, ids_list, unigrams, gone = [], [], {}, []
    for row in _read_jsonl(ctx.unit_dir(u) / "read.jsonl"):
        dom = row["domain"]
        doc = _Doc(row, tally, tok, gone)
        if not doc.stage("url_dedup", row["id"] in url_rm, detail=f"duplicate of {url_rm.get(row['id'])}"):
            continue
        lang_why = _lang_reason(cfg, row)
        if not doc.stage("lang_id", bool(lang_why), detail=lang_why):
            continue
        if not doc.stage("minhash", row["id"] in near_rm, detail=f"near-duplicate of {near_rm.get(row['id'])}"):
            continue
        new, dropped = None, 0
        if ctx.in_scope(cfg.line_dedup, dom) and len(bad):
            lines, h = line_hashes(doc.text, bucket_of(row["id"], nb), row.get("lang", ""))
            drop = np.isin(h, bad)
            dropped = int(drop.sum())
            new = "".join(line for line, x in zip(lines, drop, strict=True) if not x)
        if not doc.stage("line_dedup", False, new, dropped):
            continue
        new, dropped, reason = None, 0, ""
        if ctx.in_scope(cfg.repetition, dom):
            r = cfg.repetition
            new, dropped = drop_repetitive_lines(doc.text, r.line_min_words, r.line_ngram, r.line_max_fraction)
            reason = repetition_reason(new.split(), r.dup_ngrams, r.top_ngrams)
        if not doc.stage("repetition", bool(reason), new, dropped, detail=reason):
            continue
        dirty, hits, total = False, 0, 0
        if ctx.in_scope(cfg.dirty_words, dom):
            hits, total = dirty_word_count(doc.text, words)
            dirty = hits >= cfg.dirty_words.min_count and hits / total > cfg.dirty_words.max_fraction
        if not doc.stage("dirty_words", dirty, detail=f"{hits} of {total} words"):
            continue
        arr = np.asarray(doc.token_ids(), dtype=np.uint32)
        ids_list.append(arr)
        unigrams.setdefault(dom, []).append(arr[1:-1])  # without BOS/EOS
        rows.append({k: row[k] for k in ("id", "name", "url", "domain", "lang", "lang_score")}
                    | {"tokens": doc.n, "text": doc.text})
    d = ctx.unit_dir(u)
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in ids_list], dtype=np.int64)]).astype(np.int64)
    _write_npz(d / "filtered.npz", tokens=np.concatenate(ids_list) if ids_list else np.zeros(0, np.uint32),
               offsets=offsets)
    uni = {}
    for dom, arrs in unigrams.items():
        uu, cc = np.unique(np.concatenate(arrs), return_counts=True)
        uni[f"ids/{dom}"], uni[f"counts/{dom}"] = uu.astype(np.int64), cc.astype(np.int64)
    _write_npz(d / "unigram.npz", **uni)
    _write_jsonl(d / "filtered.jsonl", rows)
    _write_jsonl(d / "filter.removed.jsonl", gone)
    return {"tally": tally.counts}


def global_unigrams(ctx: Context) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from herd.data.dedup import merge_counts

    parts: dict[str, list] = {}
    for u in range(len(ctx.units)):
        with np.load(ctx.unit_dir(u) / "unigram.npz") as z:
            for key in z.files:
                if key.startswith("ids/"):
                    dom = key[4:]
                    parts.setdefault(dom, []).append((z[key], z[f"counts/{dom}"]))
    return {dom: merge_counts(p) for dom, p in parts.items()}


# ---- phase 4: KL divergence and quality score ------------------------------------------------------
def _load_filtered(ctx: Context, u: int) -> tuple[list[dict], np.ndarray, np.ndarray]:
    d = ctx.unit_dir(u)
    with np.load(d / "filtered.npz") as z:
        tokens, offsets = z["tokens"], z["offsets"]
    return _read_jsonl(d / "filtered.jsonl"), tokens, offsets


def phase_score(ctx: Context, u: int) -> dict:
    from herd.data.filters import kl_divergence

    cfg = ctx.cfg
    rows, tokens, offsets = _load_filtered(ctx, u)
    tally = Tally()
    keep, gone = [], []
    kl_scores = [0.0] * len(rows)
    if cfg.kl_divergence.enabled:
        with np.load(ctx.work / "unigram.npz") as z:
            corpus = {k[4:]: (z[k], z[f"counts/{k[4:]}"]) for k in z.files if k.startswith("ids/")}
        vocab = get_tokenizer(cfg.run.tokenizer).vocab_size
        for i, row in enumerate(rows):
            if ctx.in_scope(cfg.kl_divergence, row["domain"]) and row["tokens"] >= cfg.kl_divergence.min_tokens:
                ids_, counts = corpus[row["domain"]]
                doc = tokens[offsets[i] + 1: offsets[i + 1] - 1].astype(np.int64)
                kl_scores[i] = kl_divergence(doc, ids_, counts, vocab, cfg.kl_divergence.smoothing)
    q_scores = [1.0] * len(rows)
    scope = [i for i, r in enumerate(rows) if cfg.quality.enabled and ctx.in_scope(cfg.quality, r["domain"])]
    in_scope = set(scope)
    if scope:
        from herd.data.quality import QualityModel

        qm = QualityModel.load(cfg.quality.model)
        for i, s in zip(scope, qm.score([rows[i]["text"] for i in scope]), strict=True):
            q_scores[i] = float(s)
    for i, row in enumerate(rows):
        dom, n = row["domain"], row["tokens"]
        tally.add("kl_divergence", dom, documents_in=1, tokens_in=n)
        if kl_scores[i] > cfg.kl_divergence.max_kl:
            tally.add("kl_divergence", dom, documents_removed=1, tokens_removed=n)
            gone.append(_gone(row["id"], row["name"], dom, "kl_divergence", f"KL {kl_scores[i]:.3f} nats"))
            continue
        tally.add("quality", dom, documents_in=1, tokens_in=n)
        if q_scores[i] < cfg.quality.min_score and i in in_scope:
            tally.add("quality", dom, documents_removed=1, tokens_removed=n)
            # the bar in the reason: "score 0.500" (rounded) alone reads like a kept document
            gone.append(_gone(row["id"], row["name"], dom, "quality",
                              f"score {q_scores[i]:.4f} < min_score {cfg.quality.min_score}"))
            continue
        keep.append(i)
    by_domain: dict[str, int] = {}
    for i in keep:
        by_domain[rows[i]["domain"]] = by_domain.get(rows[i]["domain"], 0) + rows[i]["tokens"]
    _write_json(ctx.unit_dir(u) / "scores.json", {"keep": keep, "kl": [round(x, 6) for x in kl_scores],
                                                  "quality": [round(x, 6) for x in q_scores],
                                                  "quality_scored": scope})
    _write_jsonl(ctx.unit_dir(u) / "score.removed.jsonl", gone)
    return {"tally": tally.counts, "tokens_by_domain": by_domain}


# ---- phase 5: mixing and token shards --------------------------------------------------------------
def phase_write(ctx: Context, u: int) -> dict:
    from herd.data.mix import copies
    from herd.data.shards import write_shard_files

    cfg = ctx.cfg
    factors = json.loads((ctx.work / "mix.json").read_text())["factors"]
    rows, tokens, offsets = _load_filtered(ctx, u)
    scores = json.loads((ctx.unit_dir(u) / "scores.json").read_text())
    keep = scores["keep"]
    # each kept document's classifier score goes to OUT/documents.jsonl (README), only where the
    # quality stage scored it: the placeholder 1.0 of an out-of-scope document is no score
    q_of = {i: scores["quality"][i] for i in scores.get("quality_scored", [])}
    tally = Tally()
    split_docs: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    out_rows, gone = [], []
    for i in keep:
        row = rows[i]
        dom, n = row["domain"], row["tokens"]
        c = copies(row["id"], factors[dom], cfg.run.seed)
        tally.add("mix", dom, documents_in=1, tokens_in=n)
        if c == 0:
            tally.add("mix", dom, documents_removed=1, tokens_removed=n)
            gone.append(_gone(row["id"], row["name"], dom, "mix", f"factor {factors[dom]:.4f}"))
            continue
        tally.add("mix", dom, documents_added=c - 1, tokens_added=(c - 1) * n)
        # Every copy of a document lands in the same split: upsampling never leaks into val.
        split = "val" if _is_val(row["id"], cfg.run.val_fraction, cfg.run.seed) else "train"
        split_docs[split].extend([tokens[offsets[i]:offsets[i + 1]]] * c)
        out_rows.append(row | {"copies": c, "split": split} | ({"quality": q_of[i]} if i in q_of else {}))
    out = ctx.work / "out"
    entries = {s: write_shard_files(out, f"{s}-u{u:05d}", docs) for s, docs in split_docs.items()}
    max_id = max((int(a.max()) for docs in split_docs.values() for a in docs), default=-1)
    _write_jsonl(ctx.unit_dir(u) / "documents.jsonl", out_rows)
    _write_jsonl(ctx.unit_dir(u) / "write.removed.jsonl", gone)
    return {"tally": tally.counts, "shards": entries, "max_token_id": max_id}


# ---- the local executor ----------------------------------------------------------------------------
def _run_phase(ctx: Context, phase: str, fn, workers: int) -> list[dict]:
    n = len(ctx.units)
    results: dict[int, dict] = {}
    todo = []
    for u in range(n):
        m = ctx.marker(u, phase)
        if m.exists():
            results[u] = json.loads(m.read_text())
        else:
            todo.append(u)

    def done(u: int, res: dict) -> None:
        _write_json(ctx.marker(u, phase), res)  # after the unit's files: the unit is complete
        results[u] = res

    if workers <= 1 or len(todo) <= 1:
        for u in todo:
            done(u, fn(ctx, u))
    elif todo:
        methods = multiprocessing.get_all_start_methods()
        mp = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        try:
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp) as ex:
                futures = {ex.submit(fn, ctx, u): u for u in todo}
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for f in finished:
                        if f.exception() is not None:
                            for p in pending:
                                p.cancel()
                            raise f.exception()
                        done(futures[f], f.result())
        except BrokenProcessPool:
            raise HerdError(f"a worker process of phase {phase!r} died (out of memory? killed?); run the "
                            "same command again to resume from the finished units") from None
    return [results[u] for u in range(n)]


def prepare_inputs(cfg: PipelineConfig, say) -> None:
    """Write the inputs that a config says how to make and that are missing."""
    for inp in cfg.input:
        if not inp.prepare or Path(inp.path).exists():
            continue
        if inp.prepare != "builtin" or Path(inp.path).name != "documents.jsonl":
            raise HerdError(f"input {inp.path}: prepare = {inp.prepare!r} needs prepare = \"builtin\" and a "
                            "path ending in documents.jsonl")
        from herd.data.builtin import prepare_builtin

        say(f"{inp.path} is missing: preparing the built-in corpus first")
        prepare_builtin(Path(inp.path).parent)


def finished_units(work: Path) -> int:
    """How many unit results a work directory holds (completion markers, of any phase)."""
    return sum(1 for _ in (work / "units").glob("*/*.done"))


def discard_unstarted(work: Path) -> None:
    """Remove what a run that finished no unit of work left behind: its plan and the partial files
    of the units it had begun (nothing there can be resumed), so that a corrected config is not
    refused as "a different config" of an unfinished run. Only the names the pipeline writes
    are touched, and the directory itself only goes when that leaves it empty: `run.work_dir` may
    name a directory the user keeps other things in."""
    for unit in (work / "units").glob("[0-9]" * 5):  # Context.unit_dir's names
        shutil.rmtree(unit, ignore_errors=True)
    (work / "plan.json").unlink(missing_ok=True)
    for d in (work / "units", work):
        try:
            d.rmdir()
        except OSError:  # not empty (or already gone): leave it
            pass


def _plan(cfg: PipelineConfig, work: Path, restart: bool, *, say=None) -> list:
    """The units of this run: the plan of an unfinished run in `work` when its config and input
    files are this run's (a resume), else a new plan written there. An unfinished run with another
    config or changed inputs is refused: its finished units would be mixed into this run's output.
    (A run that fails before finishing any unit removes its plan itself, see run_pipeline, so the
    corrected command is not refused.)"""
    from herd.data.readers import Unit, plan_units

    units = [u for inp in cfg.input for u in plan_units(inp.path, inp.format, inp.domain, cfg.run.shard_bytes,
                                                                inp.text_key)]
    files = sorted({f for u in units for f in u.files})
    stats = {}
    for f in files:
        st = os.stat(f)
        stats[f] = [st.st_size, st.st_mtime_ns]
    plan = {"config": json.loads(json.dumps(_output_config(cfg))), "inputs": stats, "units": [dataclasses.asdict(u) for u in units]}
    path = work / "plan.json"
    if restart and work.exists():
        shutil.rmtree(work)
    if path.exists():
        old = json.loads(path.read_text())
        if old["config"] == plan["config"] and old["inputs"] == plan["inputs"]:
            if say and not ((work / "published.json").exists() and not (work / "out").exists()):
                say(f"resuming the unfinished run in {work}")  # (a published one: cmd_run says so)
            return [Unit(**u) for u in old["units"]]
        done = finished_units(work)
        # how much --restart throws away: a run killed before its first unit finished loses nothing
        lose = f"{done} finished unit result(s)" if done else "no finished unit, nothing is lost"
        if old["config"] != plan["config"]:
            changed = _diff(old["config"], plan["config"])
            raise HerdError(f"{work} holds an unfinished run with a different config ({', '.join(changed)}); "
                            f"run with --restart to start over ({lose})")
        raise HerdError(f"{work} holds an unfinished run whose input files have changed since; "
                        f"run with --restart to start over ({lose})")
    if not units:
        raise HerdError("empty corpus: the inputs hold no files")
    work.mkdir(parents=True, exist_ok=True)
    _write_json(path, plan)
    return units


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [x for k in sorted(set(a) | set(b)) for x in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def work_dir_for(cfg: PipelineConfig) -> Path:
    out = Path(cfg.run.out)
    if out.name in ("", ".", ".."):  # "." or "..": the sibling of the directory it names
        out = out.resolve()
    return Path(cfg.run.work_dir) if cfg.run.work_dir else out.with_name(f".{out.name}.work")


# ---- the steps: parallel phases over units, global steps between them ------------------------------
def _markers(ctx: Context, phase: str) -> list[dict]:
    return [json.loads(ctx.marker(u, phase).read_text()) for u in range(len(ctx.units))]


def step_summary(ctx: Context) -> None:
    n_docs = sum(r["documents"] for r in _markers(ctx, "read"))
    if n_docs == 0:
        shutil.rmtree(ctx.work, ignore_errors=True)  # nothing worth resuming
        raise HerdError("empty corpus: no documents in the inputs ("
                        + ", ".join(i.path for i in ctx.cfg.input) + ")")
    _write_json(ctx.work / "read.summary.json", {"documents": n_docs})


def step_dedup(ctx: Context) -> None:
    _write_json(ctx.work / "dedup.json", global_dedup(ctx))


def step_bad_lines(ctx: Context) -> None:
    bad = global_lines(ctx)
    atomic_write(ctx.work / "bad_lines.npy", lambda f: np.save(f, bad))


def step_unigrams(ctx: Context) -> None:
    d = global_unigrams(ctx)
    _write_npz(ctx.work / "unigram.npz", **{f"{k}/{dom}": v for dom, a in d.items()
                                            for k, v in zip(("ids", "counts"), a, strict=True)})


def step_mix(ctx: Context) -> None:
    from herd.data.mix import mixing_factors

    tokens_by_domain: dict[str, int] = {}
    for r in _markers(ctx, "score"):
        for dom, t in r["tokens_by_domain"].items():
            tokens_by_domain[dom] = tokens_by_domain.get(dom, 0) + t
    factors = mixing_factors(tokens_by_domain, ctx.cfg.mix.weights, ctx.cfg.mix.upsample)
    _write_json(ctx.work / "mix.json", {"factors": factors, "tokens_by_domain": tokens_by_domain})
    (ctx.work / "out").mkdir(exist_ok=True)


def step_publish(ctx: Context, timing: dict | None = None) -> dict:
    """meta.json, documents.jsonl, removed.jsonl, manifest.json into WORK/out, then one rename."""
    from herd.data.shards import publish_dir, write_meta

    cfg, work, n = ctx.cfg, ctx.work, len(ctx.units)
    if ctx.published():
        return _already_published(ctx)
    written = _markers(ctx, "write")
    tally = Tally()
    for phase in ("read", "filter", "score"):
        for r in _markers(ctx, phase):
            tally.merge(r.get("tally", {}))
    for r in written:
        tally.merge(r["tally"])
    shards = {s: [r["shards"][s] for r in written] for s in ("train", "val")}
    if not any(e["tokens"] for e in shards["train"]):
        if not cfg.run.keep_work:  # the same config ends here again; another needs a fresh run anyway
            shutil.rmtree(work, ignore_errors=True)
        raise HerdError(_why_empty(cfg, tally, sum(e["documents"] for e in shards["val"])))
    meta = write_meta(work / "out", get_tokenizer(cfg.run.tokenizer).vocab_size, shards,
                      max_token_id=max(r["max_token_id"] for r in written), tokenizer=cfg.run.tokenizer)
    if cfg.run.write_documents:
        _concat(work / "out" / "documents.jsonl", [ctx.unit_dir(u) / "documents.jsonl" for u in range(n)])
    _concat(work / "out" / "removed.jsonl", [ctx.unit_dir(u) / f"{p}.removed.jsonl" for u in range(n)
                                              for p in ("read", "filter", "score", "write")])
    manifest = build_manifest(cfg, tally, meta, json.loads((work / "mix.json").read_text())["factors"])
    if timing:
        manifest["timing_s"] = timing
    text = json.dumps(manifest, indent=1) + "\n"
    (work / "out" / "manifest.json").write_text(text)
    # Once WORK/out is renamed away this copy says the run was published (a kill before the work
    # directory is removed, or keep_work, leaves every step marked done and nothing to publish).
    atomic_write(work / "published.json", lambda f: f.write(text.encode()))
    publish_dir(work / "out", Path(cfg.run.out))
    if not cfg.run.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _why_empty(cfg: PipelineConfig, tally: Tally, val_documents: int) -> str:
    """Where the documents went when no training token is left: which stages removed them, or the
    validation split took them all."""
    read = sum(d.get("documents_in", 0) for d in tally.counts.get("read", {}).values())
    removed = [(stage, n) for stage in STAGES
               if (n := sum(d.get("documents_removed", 0) for d in tally.counts.get(stage, {}).values()))]
    where = ", ".join(f"{stage} {n}" for stage, n in removed) or "none"
    if val_documents:
        return (f"empty corpus: all {val_documents} documents left after filtering went to the validation split "
                f"(run.val_fraction = {cfg.run.val_fraction}); {read} read, removed by stage: {where}")
    return f"empty corpus: the stages removed all {read} documents read (by stage: {where})"


def _already_published(ctx: Context) -> dict:
    out = Path(ctx.cfg.run.out)
    try:
        same = (out / "manifest.json").read_bytes() == (ctx.work / "published.json").read_bytes()
    except OSError:
        same = False
    if not same:
        raise HerdError(f"{ctx.work} holds a run already published to {out}, which has changed since; "
                        "run with --restart to run it again")
    if not ctx.cfg.run.keep_work:
        shutil.rmtree(ctx.work, ignore_errors=True)
    return json.loads((out / "manifest.json").read_text())


# (kind, name, function, result file of a global step). A phase runs its function once per unit;
# a global step once, and is done when its result file exists.
STEPS = [
    ("phase", "read", phase_read, ""),
    ("global", "summary", step_summary, "read.summary.json"),
    ("global", "dedup", step_dedup, "dedup.json"),
    ("phase", "lines", phase_line_counts, ""),
    ("global", "bad_lines", step_bad_lines, "bad_lines.npy"),
    ("phase", "filter", phase_filter, ""),
    ("global", "unigrams", step_unigrams, "unigram.npz"),
    ("phase", "score", phase_score, ""),
    ("global", "mix", step_mix, "mix.json"),
    ("phase", "write", phase_write, ""),
]


def steps_for(cfg: PipelineConfig) -> list[tuple[str, str, Any, str]]:
    """The steps this config runs (line counting and the unigram merge only when their stage is on);
    the publish step follows the last."""
    skip = set()
    if not cfg.line_dedup.enabled:
        skip |= {"lines", "bad_lines"}
    if not cfg.kl_divergence.enabled:
        skip.add("unigrams")
    return [s for s in STEPS if s[1] not in skip]


def run_units(ctx: Context, phase: str, rank: int = 0, world_size: int = 1) -> None:
    """Run phase `phase` on units rank, rank + world_size, ... that are not marked done — the body
    of one task of a cluster job (any executor that runs "task i of N" on a shared filesystem)."""
    fn = {name: f for kind, name, f, _ in STEPS if kind == "phase"}[phase]
    for u in range(rank, len(ctx.units), world_size):
        if not ctx.marker(u, phase).exists():
            _write_json(ctx.marker(u, phase), fn(ctx, u))


def run_global(ctx: Context, name: str) -> None:
    """Run global step `name` unless its result exists (one task of its own job on a cluster)."""
    if name == "publish":
        step_publish(ctx)
        return
    _, _, fn, result = next(s for s in STEPS if s[1] == name)
    if not (ctx.work / result).exists():
        fn(ctx)


MANIFEST_FORMAT = "herd-data-manifest-v1"


def is_pipeline_output(path: Path) -> bool:
    """Whether `path` is a directory this pipeline wrote (its manifest.json says so)."""
    try:
        return json.loads((path / "manifest.json").read_text()).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _glob_root(path: str) -> Path:
    """The directory part of an input path before any glob character."""
    parts = Path(path).expanduser().parts
    cut = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    return Path(*parts[:cut]) if cut else Path(".")


def check_output(cfg: PipelineConfig) -> None:
    """Refuse an output that would destroy what the user made: publishing replaces `run.out` as a
    whole, so it must be new, empty or an earlier output of this pipeline; and neither it nor the
    work directory may overlap an input (the output would be read back as input, or the input
    replaced by shards)."""
    out = Path(cfg.run.out).expanduser()
    if out.exists() and not out.is_dir():
        raise HerdError(f"run.out {out} is a file; give a directory (the shards and manifest go there)")
    if out.is_dir() and any(out.iterdir()) and not is_pipeline_output(out):
        raise HerdError(f"run.out {out} holds files that are not an output of `herd data run` (no manifest.json "
                        "of this pipeline); it would be replaced as a whole: choose a new or empty directory")
    for inp in cfg.input:
        src = _glob_root(inp.path).resolve()
        for kind, d in (("run.out", out.resolve()), ("the work directory", work_dir_for(cfg).resolve())):
            if d == src or src in d.parents or d in src.parents:
                raise HerdError(f"input {inp.path} and {kind} {d} overlap: the output would be read as input or "
                                "replace it; keep them apart")


def preflight(cfg: PipelineConfig) -> None:
    """Everything that can be checked before any work, so that a mistake leaves no work directory
    behind to trip the corrected command (an unknown tokenizer, a missing word list, a bad output)."""
    from herd.data.filters import load_word_list

    check_output(cfg)
    if cfg.run.tokenizer != "bytes":
        get_tokenizer(cfg.run.tokenizer)
    if cfg.dirty_words.enabled:
        load_word_list(cfg.dirty_words.words_file)


def open_run(cfg: PipelineConfig, *, restart: bool = False, log=None) -> Context:
    """Prepare missing inputs and plan the units (or reload the plan of an unfinished run)."""
    preflight(cfg)
    prepare_inputs(cfg, log or (lambda msg: None))
    work = work_dir_for(cfg)
    return Context(cfg, work, _plan(cfg, work, restart, say=log))


def run_pipeline(cfg: PipelineConfig, *, workers: int | None = None, restart: bool = False,
                 log=None) -> dict:
    """Run (or resume) the pipeline on this machine with a process pool; returns the manifest."""
    say = log or (lambda msg: None)
    if workers is not None and workers < 0:  # as run.workers: a negative count is a typo, not "one"
        raise HerdError(f"--workers must be >= 0 (0 = all cores) (got {workers})")
    workers = workers or cfg.run.workers or os.cpu_count() or 1  # 0 / None: the config's, then all cores
    ctx = open_run(cfg, restart=restart, log=say)
    if workers > 1 and cfg.run.tokenizer != "bytes":
        get_tokenizer(cfg.run.tokenizer)  # loaded once here; forked workers inherit it
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    # A phase's progress line waits until the global steps after it have checked its results: an
    # empty corpus (found by the summary after `read`) is then the one line on stderr, not a
    # "read: 1 units done" followed by the error. On a real run the line comes as soon as those
    # quick checks pass, before the next (long) phase starts.
    pending: str | None = None
    for kind, name, fn, _ in steps_for(cfg):
        if kind == "global":
            run_global(ctx, name)
            continue
        if pending:
            say(pending)
            pending = None
        t = time.perf_counter()
        try:
            _run_phase(ctx, name, fn, workers)
        except BaseException:
            # A failure before any unit finished (the first unit's records do not fit the reader
            # settings, say) leaves nothing to resume: the work directory goes, as it does for a
            # mistake preflight finds, and the corrected command starts clean. Once a unit is
            # done, everything stays for a resume.
            if finished_units(ctx.work) == 0:
                discard_unstarted(ctx.work)
            raise
        timing[name] = round(time.perf_counter() - t, 3)
        pending = f"{name}: {len(ctx.units)} units done ({timing[name]:.1f} s)"
    if pending:
        say(pending)
    timing["total"] = round(time.perf_counter() - t0, 3)
    return step_publish(ctx, timing)


def _concat(dest: Path, parts: list[Path]) -> None:
    with open(dest, "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f)


def build_manifest(cfg: PipelineConfig, tally: Tally, meta: dict, factors: dict[str, float]) -> dict:
    keys = ("documents_in", "documents_removed", "documents_added", "tokens_in", "tokens_removed",
            "tokens_added", "lines_removed")
    stages = []
    for name in STAGES:
        by_dom = tally.counts.get(name, {})
        tot = {k: sum(d.get(k, 0) for d in by_dom.values()) for k in keys}
        entry: dict[str, Any] = {"stage": name, "enabled": _enabled(cfg, name)}
        entry |= {k: v for k, v in tot.items() if v or not k.endswith("added")}
        entry["documents_out"] = tot["documents_in"] - tot["documents_removed"] + tot["documents_added"]
        entry["tokens_out"] = tot["tokens_in"] - tot["tokens_removed"] + tot["tokens_added"]
        entry["by_domain"] = {dom: {k: v for k, v in d.items() if v} for dom, d in sorted(by_dom.items())}
        stages.append(entry)
    out_tokens = {s: meta["splits"][s]["tokens"] for s in ("train", "val")}
    domains: dict[str, dict] = {}
    mix = tally.counts.get("mix", {})
    total = sum(d.get("tokens_in", 0) - d.get("tokens_removed", 0) + d.get("tokens_added", 0) for d in mix.values())
    for dom, d in sorted(mix.items()):
        t = d.get("tokens_in", 0) - d.get("tokens_removed", 0) + d.get("tokens_added", 0)
        domains[dom] = {"tokens": t, "share": round(t / total, 6) if total else 0.0,
                        "weight": cfg.mix.weights.get(dom), "factor": round(factors.get(dom, 1.0), 6)}
    return {"format": "herd-data-manifest-v1", "tokenizer": cfg.run.tokenizer, "vocab_size": meta["vocab_size"],
            "stages": stages, "domains": domains,
            "output": {"documents": meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"],
                       "tokens": sum(out_tokens.values()), "splits": out_tokens},
            "config": cfg.to_dict()}


def _enabled(cfg: PipelineConfig, stage: str) -> bool:
    if stage in ("read", "mix"):
        return True
    return bool(getattr(cfg, stage).enabled)


# ---- CLI -------------------------------------------------------------------------------------------
def cmd_run(a: argparse.Namespace) -> None:
    from herd.hub import say

    cfg = load_pipeline_config(a.config, a.overrides)
    work = work_dir_for(cfg)
    if (work / "published.json").exists() and not (work / "out").exists() and not a.restart:
        say(f"{work} holds a finished run: checking that {cfg.run.out} is its output")
    # (a resume says so when the plan is reloaded: only then is it one, see _plan)
    m = run_pipeline(cfg, workers=a.workers, restart=a.restart, log=say)
    print(f"{'stage':<14}{'documents in':>13}{'removed':>9}{'added':>7}{'tokens in':>13}{'removed':>11}"
          f"{'lines removed':>15}", file=sys.stderr)
    for s in m["stages"]:
        print(f"{s['stage']:<14}{s['documents_in']:>13,}{s['documents_removed']:>9,}{s.get('documents_added', 0):>7,}"
              f"{s['tokens_in']:>13,}{s['tokens_removed']:>11,}{s['lines_removed']:>15,}"
              + ("" if s["enabled"] else "  (off)"), file=sys.stderr)
    removed = ", ".join(f"{s['stage']} -{s['documents_removed']}" for s in m["stages"] if s.get("documents_removed"))
    say(f"wrote {cfg.run.out}: {m['output']['documents']} documents, {m['output']['tokens']:,} tokens "
        f"(removed: {removed or 'none'}); counts in {Path(cfg.run.out) / 'manifest.json'}")


def add_run_parser(subparsers) -> argparse.ArgumentParser:
    """Add `run` (and the quality-classifier steps) to a `herd data` subparsers object."""
    from herd.data.quality import add_quality_parsers
    from herd.train.cli import _PretrainParser

    p = subparsers.add_parser("run", help="run the data pipeline of a TOML config (resumes an unfinished run)",
                              description="Run the SPEC §3.1 data pipeline: read → URL de-dup → language ID → "
                                          "MinHash/line de-dup (per language) → "
                                          "heuristic filters → quality → mix → token shards. Any config key "
                                          "can be overridden as --section.key=value.")
    p.__class__ = _PretrainParser  # collects --section.key=value into `overrides`
    p.add_argument("config", help="pipeline TOML (e.g. configs/data/builtin.toml)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: run.workers, 0 = all cores)")
    p.add_argument("--restart", action="store_true", help="discard an unfinished run's work directory")
    p.set_defaults(func=cmd_run, overrides=[])
    add_quality_parsers(subparsers)
    return p
