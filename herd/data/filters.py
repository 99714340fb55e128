"""Heuristic filters of SPEC §3.1.1: duplicated n-gram coverage, dirty words, token-distribution KL.

* Duplicated n-gram coverage (Rae et al. 2021, Gopher table A1): the fraction of a text's
  characters that sit in n-grams seen earlier in the same text. The paper uses it "to remove lines
  that consist of repeated content such as logging or error messages" — long unique lines that
  line de-dup cannot catch — so it runs on long lines, and on whole documents with Gopher's
  thresholds (5-grams 0.15 … 10-grams 0.10). The counting is datatrove's `find_all_duplicate`
  (FineWeb's implementation; the tests check it against it), except that n-grams compare as word
  sequences — datatrove joins the words without a separator, so "ab c" and "a bc" collide there.
* Dirty words (Raffel et al. 2020, C4): documents whose count or share of blocklisted words
  exceeds a limit are dropped ("adult websites not covered by domain block lists").
* Token-distribution KL divergence: KL(p_doc ‖ p_corpus) of a document's unigram token
  distribution against its domain's corpus distribution (smoothed); documents with many
  outlier tokens (binary blobs, tables of numbers, foreign scripts) score high and are dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from herd.errors import HerdError


# ---- duplicated n-gram coverage ---------------------------------------------------------------------
class _Words:
    """A word list as integer ids and character lengths, computed once per text."""

    def __init__(self, words: list[str]):
        ids: dict[str, int] = {}
        self.words = words
        self.ids = np.fromiter((ids.setdefault(x, len(ids)) for x in words), dtype=np.uint64, count=len(words))
        self.lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.total = int(self.lens.sum())

    def keys(self, n: int) -> np.ndarray:
        """One integer per n-gram position, equal exactly when the n-grams' words are (word ids
        mixed by a 64-bit polynomial; a collision needs ~2^32 distinct n-grams)."""
        m = len(self.ids) - n + 1
        key = np.zeros(max(m, 0), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n if m > 0 else 0):
                key = key * np.uint64(0x9E3779B97F4A7C15) + self.ids[j:j + m] + np.uint64(1)
        return key

    def dup_chars(self, n: int) -> int:
        """Characters in duplicated n-grams, counted as datatrove/Gopher do: scan left to right; an
        n-gram seen before adds its characters and jumps past itself, so overlaps count once."""
        keys = self.keys(n).tolist()
        if not keys:
            return 0
        gram_chars = np.convolve(self.lens, np.ones(n, dtype=np.int64), mode="valid").tolist()
        unique: set[int] = set()
        repeated, idx, last = 0, 0, len(keys)
        while idx < last:
            k = keys[idx]
            if k in unique:
                repeated += gram_chars[idx]
                idx += n
            else:
                unique.add(k)
                idx += 1
        return repeated

    def repeat_cover_chars(self, n: int) -> int:
        """An upper bound of `dup_chars`, vectorized: characters of the words covered by any
        n-gram that occurred earlier. (Every window the greedy scan counts is such an n-gram, and
        the windows it counts do not overlap.) Clean text is far below the limits, so this settles
        most documents without the scan."""
        keys = self.keys(n)
        if keys.size == 0:
            return 0
        _, first = np.unique(keys, return_index=True)
        repeat = np.ones(keys.size, dtype=bool)
        repeat[first] = False
        starts = np.flatnonzero(repeat)
        cover = np.zeros(len(self.ids) + 1, dtype=np.int64)
        np.add.at(cover, starts, 1)
        np.add.at(cover, starts + n, -1)
        return int(self.lens[np.cumsum(cover[:-1]) > 0].sum())

    def top_fraction(self, n: int) -> float:
        """Share of characters in the most frequent n-gram (Gopher's top 2/3/4-gram rule)."""
        keys = self.keys(n)
        if keys.size == 0 or not self.total:
            return 0.0
        _, first, c = np.unique(keys, return_index=True, return_counts=True)
        i = int(first[c == c.max()].min())  # ties: the n-gram seen first (as Counter.most_common)
        return len(" ".join(self.words[i:i + n])) * int(c.max()) / self.total


def dup_ngram_chars(words: list[str], n: int) -> int:
    return _Words(words).dup_chars(n)


def dup_ngram_fraction(words: list[str], n: int) -> float:
    w = _Words(words)
    return w.dup_chars(n) / w.total if w.total else 0.0


def top_ngram_fraction(words: list[str], n: int) -> float:
    return _Words(words).top_fraction(n)


def repetition_reason(words: list[str], dup_ngrams: list[tuple[int, float]],
                      top_ngrams: list[tuple[int, float]]) -> str:
    """Why a document fails Gopher's repetition rules ("" when it passes)."""
    w = _Words(words)
    if not w.total:
        return ""
    for n, limit in top_ngrams:
        if (f := w.top_fraction(n)) > limit:
            return f"top_{n}gram={f:.3f}"
    for n, limit in dup_ngrams:
        if w.repeat_cover_chars(n) / w.total <= limit:
            continue  # even the upper bound passes
        if (f := w.dup_chars(n) / w.total) > limit:
            return f"dup_{n}gram={f:.3f}"
    return ""


def drop_repetitive_lines(text: str, min_words: int, n: int, max_fraction: float) -> tuple[str, int]:
    """Remove lines of at least `min_words` words whose duplicated n-gram coverage exceeds
    `max_fraction` (logging, error dumps). Returns (text, lines removed)."""
    out, removed = [], 0
    for line in text.splitlines(keepends=True):
        words = line.split()
        if len(words) >= min_words and dup_ngram_fraction(words, n) > max_fraction:
            removed += 1
            continue
        out.append(line)
    return "".join(out), removed


# ---- dirty words -----------------------------------------------------------------------------------
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*", re.UNICODE)


def load_word_list(path: str) -> frozenset[str]:
    """One word or phrase a line (the LDNOOBW format C4 used). "" = the list shipped with the
    `better-profanity` package."""
    if not path:
        try:
            import better_profanity
        except ImportError:
            raise HerdError("dirty_words.words_file is empty and better-profanity is not installed; "
                            "give a word list (one word a line)") from None
        path = str(Path(better_profanity.__file__).parent / "profanity_wordlist.txt")
    try:
        words = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HerdError(f"dirty_words.words_file {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    return frozenset(w.strip().lower() for w in words if w.strip() and not w.startswith("#"))


def dirty_word_count(text: str, words: frozenset[str]) -> tuple[int, int]:
    """(blocklisted words and two-word phrases found, total words)."""
    toks = [w.lower() for w in _WORD.findall(text)]
    hits = sum(t in words for t in toks)
    hits += sum(f"{a} {b}" in words for a, b in zip(toks, toks[1:], strict=False))
    return hits, len(toks)


# ---- token-distribution KL divergence ---------------------------------------------------------------
def unigram_counts(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, c = np.unique(ids, return_counts=True)
    return u.astype(np.int64), c.astype(np.int64)


def kl_divergence(doc_ids: np.ndarray, corpus_ids: np.ndarray, corpus_counts: np.ndarray, vocab_size: int,
                  smoothing: float = 1e-3) -> float:
    """KL(p_doc ‖ q) in nats. q is the corpus unigram distribution given by the sorted
    (corpus_ids, corpus_counts), mixed with a uniform share `smoothing` so that no token has
    probability 0 (a Jelinek-Mercer mix rather than add-one: with a 128K vocabulary, add-one would
    swamp a small corpus). p_doc is the document's empirical distribution."""
    if doc_ids.size == 0:
        return 0.0
    u, c = np.unique(doc_ids, return_counts=True)
    p = c / c.sum()
    cnt = np.zeros(len(u))
    if len(corpus_ids):
        pos = np.minimum(np.searchsorted(corpus_ids, u), len(corpus_ids) - 1)
        cnt = np.where(corpus_ids[pos] == u, corpus_counts[pos], 0)
    total = corpus_counts.sum()
    q = (1 - smoothing) * (cnt / total if total else 0) + smoothing / vocab_size
    return float(np.sum(p * np.log(p / q)))
