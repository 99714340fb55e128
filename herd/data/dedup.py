"""De-duplication stages of SPEC §3.1.1: URL, document (MinHash LSH) and line level.

* URL: one document per normalized URL; with a `date` field the most recent version wins (the
  paper keeps "the most recent version for pages corresponding to each URL"), else the first.
* Document: MinHash signatures of word n-gram shingles (datasketch's `MinHash`, not hand-rolled)
  are computed per unit in parallel; one pass over all signatures in corpus order with
  datasketch's `MinHashLSH` then keeps the first document of every near-duplicate group (a
  candidate only counts when its estimated Jaccard similarity reaches the threshold).
* Line: ccNet-style — lines are normalized (lower case, digits → 0, punctuation and spaces
  squeezed) and hashed with their *bucket* (documents are spread over buckets of about
  `bucket_documents` by a hash of their id; the paper uses buckets of 30M documents); a line found
  in more than `max_repeats` documents of its bucket is removed everywhere in that bucket (the
  paper's "more than 6 times"; by default a line counts once per document, so a refrain repeated
  inside one work survives while boilerplate shared across documents goes; `per_document = false`
  counts every occurrence).

Document and line de-dup both run within each language when the lang_id stage has labelled the
documents (SPEC §3.1.1: "document-level and line-level de-duplication within data for each
language"): one LSH index per language, and line hashes salted with the language.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)
SCHEME = "affine32"  # datasketch's permutation scheme, named so signatures stay comparable across versions


# ---- URL ------------------------------------------------------------------------------------------
def normalize_url(url: str) -> str:
    """Scheme and host lower-cased, default ports, fragments and trailing slashes dropped, percent-
    encodings in one case and decoded where they spell an unreserved character (RFC 3986 §6.2.2)."""
    url = url.strip()
    if not url:
        return ""
    try:
        s = urlsplit(url)
        port = s.port  # parsed lazily: "host:abc" or "host:99999" raises only here
    except ValueError:
        return url  # not a URL urllib can take apart: only the same string is the same page
    host = (s.hostname or "").lower()
    if port and not ((s.scheme == "http" and port == 80) or (s.scheme == "https" and port == 443)):
        host = f"{host}:{port}"
    scheme = "http" if s.scheme.lower() in ("http", "https") else s.scheme.lower()
    path, query = _PERCENT.sub(_percent, s.path), _PERCENT.sub(_percent, s.query)
    return urlunsplit((scheme, host, path.rstrip("/") or "/", query, ""))


# RFC 3986 §6.2.2.1-2: percent-encodings are case-insensitive ("%7e" is "%7E"), and one of an
# unreserved character is that character ("%7E" is "~"): the same page either way.
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _percent(m: re.Match) -> str:
    c = chr(int(m.group()[1:], 16))
    return c if c in _UNRESERVED else m.group().upper()


def url_duplicates(records: Sequence[tuple[str, str, str]]) -> dict[str, str]:
    """records: (doc id, url, date) in corpus order → {removed id: kept id}. Documents without a
    URL are never URL duplicates. Ties on date keep the earliest document."""
    best: dict[str, tuple[str, int, str]] = {}  # url → (date, order, id)
    for order, (doc_id, url, date) in enumerate(records):
        key = normalize_url(url)
        if not key:
            continue
        cur = best.get(key)
        if cur is None or date > cur[0]:
            best[key] = (date, order, doc_id)
    removed = {}
    for doc_id, url, _ in records:
        key = normalize_url(url)
        if key and best[key][2] != doc_id:
            removed[doc_id] = best[key][2]
    return removed


# ---- document-level MinHash -----------------------------------------------------------------------
def shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams of the lower-cased text, as bytes for hashing. A text without a single word
    character (emoji, math symbols, punctuation) is shingled by its whitespace-separated pieces:
    with no shingle at all its MinHash would be the empty set's, the same for every such document,
    and all of them "near-duplicates" of the first (estimated Jaccard 1.0 for disjoint texts)."""
    low = text.lower()
    words = _WORD.findall(low) or low.split()
    if len(words) < n:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


def _hash32(b: bytes) -> int:
    # datasketch's default is sha1 truncated to 32 bits; blake2b is the same idea, ~2× faster.
    return int.from_bytes(hashlib.blake2b(b, digest_size=4).digest(), "little")


def minhash_signature(text: str, n: int, num_perm: int, seed: int) -> np.ndarray:
    """The datasketch MinHash of the document's word n-grams: (num_perm,) uint64."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=_hash32, scheme=SCHEME)
    sh = shingles(text, n)
    if sh:
        m.update_batch(list(sh))
    return m.hashvalues.astype(np.uint64)


def minhash_duplicates(ids: Sequence[str], signatures: np.ndarray, threshold: float, seed: int,
                       skip: Iterable[str] = (), groups: Sequence[str] | None = None) -> dict[str, str]:
    """Near-duplicates among `ids` (corpus order) given their signatures (N, num_perm): returns
    {removed id: the kept id it duplicates}. A document joins the LSH index only when kept, so
    each group keeps its first document. `skip`: ids already removed by earlier stages.
    `groups`: one label per id (the language, SPEC §3.1.1 de-duplicates per language); documents
    of different groups are never near-duplicates — each group has its own LSH index."""
    from datasketch import LeanMinHash, MinHashLSH

    skip = set(skip)
    num_perm = signatures.shape[1] if len(signatures) else 128
    if groups is None:
        groups = [""] * len(ids)
    elif len(groups) != len(ids):
        raise ValueError(f"{len(groups)} groups for {len(ids)} ids")
    indexes: dict[str, MinHashLSH] = {}
    kept: dict[str, tuple[int, LeanMinHash]] = {}  # id → (corpus position, signature)
    removed: dict[str, str] = {}
    for pos, (doc_id, hv, group) in enumerate(zip(ids, signatures, groups, strict=True)):
        if doc_id in skip:
            continue
        lsh = indexes.get(group)
        if lsh is None:
            lsh = indexes[group] = MinHashLSH(threshold=threshold, num_perm=num_perm)
        m = LeanMinHash(seed=seed, hashvalues=hv, scheme=SCHEME)
        # The LSH bands find candidates; the signature estimate confirms them (false positives of
        # the banding are dropped). The earliest confirmed candidate is the one kept.
        confirmed = [kept[c] + (c,) for c in lsh.query(m) if kept[c][1].jaccard(m) >= threshold]
        if confirmed:
            removed[doc_id] = min(confirmed, key=lambda t: t[0])[2]
        else:
            kept[doc_id] = (pos, m)
            lsh.insert(doc_id, m)
    return removed


# ---- line level ------------------------------------------------------------------------------------
_PUNCT_SPACE = re.compile(r"[\W_]+", re.UNICODE)
_DIGIT = re.compile(r"\d")


def normalize_line(line: str) -> str:
    """ccNet's normalization: lower case, accents stripped, digits → 0, punctuation/space squeezed."""
    line = line.strip().lower()
    if not line.isascii():
        line = unicodedata.normalize("NFD", line)
        line = "".join(c for c in line if unicodedata.category(c) != "Mn")
    return _PUNCT_SPACE.sub(" ", _DIGIT.sub("0", line)).strip()


def bucket_of(doc_id: str, n_buckets: int) -> int:
    return zlib.crc32(doc_id.encode()) % max(1, n_buckets)


def line_hashes(text: str, bucket: int, group: str = "") -> tuple[list[str], np.ndarray]:
    """The document's lines (with their newlines) and one uint64 hash per line, salted with the
    bucket so that one counting pass over all buckets counts each bucket apart — and with `group`
    (the document's language: SPEC §3.1.1 de-duplicates lines within each language), so a line
    counts only against documents of its own language. Lines that normalize to nothing (blank,
    pure punctuation) get hash 0 and are never removed."""
    lines = text.splitlines(keepends=True)
    out = np.zeros(len(lines), dtype=np.uint64)
    g = group.encode()
    if len(g) > 12:  # blake2b takes a 16-byte salt: 4 for the bucket, 12 for the group
        g = hashlib.blake2b(g, digest_size=12).digest()
    salt = bucket.to_bytes(4, "little") + g
    for i, line in enumerate(lines):
        norm = normalize_line(line)
        if norm:
            h = int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8, salt=salt).digest(), "little")
            out[i] = h or 1
    return lines, out


def count_lines(hash_lists: Iterable[np.ndarray], per_document: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """How often each line hash occurs — in how many documents (`per_document`), or in total:
    (sorted unique hashes, counts)."""
    per_doc = [np.unique(h[h != 0]) if per_document else h[h != 0] for h in hash_lists]
    if not per_doc:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    allh = np.concatenate(per_doc)
    u, c = np.unique(allh, return_counts=True)
    return u.astype(np.uint64), c.astype(np.int64)


def merge_counts(parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    parts = list(parts)
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    h = np.concatenate([p[0] for p in parts])
    c = np.concatenate([p[1] for p in parts])
    u, inv = np.unique(h, return_inverse=True)
    return u, np.bincount(inv, weights=c, minlength=len(u)).astype(np.int64)
