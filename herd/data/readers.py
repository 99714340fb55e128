"""Readers of the data pipeline (SPEC §3.1.1): text, JSONL and HTML inputs → plain documents.

An input is a file, a directory or a glob. It is cut into *units* — the pipeline's unit of
parallel work and of resumption (herd/data/pipeline.py):

* a JSONL file (`.jsonl`, `.jsonl.gz`) one unit per `shard_bytes` byte range; a range owns the
  lines that *start* inside it, so ranges never share or lose a line (the Hadoop/datatrove way of
  splitting line-oriented files);
* text (`.txt`, `.md`, `.py`, ...) and HTML (`.html`, `.htm`) files are one document each, grouped
  into units of about `shard_bytes`. A directory contributes its files with these suffixes (any
  file when the input names its format).

A JSONL record needs `"text"` (another field with the input's `text_key`) or `"html"`, which is
extracted; `"id"`/`"name"`, `"url"`, `"domain"` and `"date"` are kept when present. HTML goes through trafilatura's main-content
extraction (boilerplate such as menus, footers and sidebars is dropped), with two fixes for what
the paper keeps (§3.1.1 "we carefully extract HTML … preserving math and code"): every `<pre>`
block that the extractor kept is restored byte for byte (trafilatura drops its blank lines), and
MathML / math images become their TeX/alt text before extraction.

Undecodable, truncated or malformed input is a `HerdError` naming the file (and line): a corpus
that silently loses documents is worse than one that stops.
"""

from __future__ import annotations

import functools
import glob
import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from herd.errors import HerdError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
# what a directory contributes with format = "auto" (its manifest.json, images, ... are skipped)
KNOWN_SUFFIXES = JSONL_SUFFIXES + HTML_SUFFIXES + TEXT_SUFFIXES
FORMATS = ("auto", "jsonl", "text", "html")


@dataclass
class RawDoc:
    """One document as read, before any filtering. `text` is already extracted for HTML."""

    text: str
    name: str = ""
    url: str = ""
    domain: str = ""
    date: str = ""


@dataclass
class Unit:
    """A slice of the input that one worker reads: files (text/HTML) or one JSONL byte range."""

    format: str  # "jsonl", "text" or "html"
    files: list[str]
    start: int = 0  # JSONL byte range [start, end) of files[0]
    end: int = -1
    domain: str = ""  # default domain tag of its documents
    meta: dict = field(default_factory=dict)


def detect_format(path: str) -> str:
    low = path.lower()
    if low.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if low.endswith(HTML_SUFFIXES):
        return "html"
    return "text"


def expand_input(path: str, fmt: str = "auto") -> list[str]:
    """A file, a directory (its files, sorted; with format "auto" those with a known suffix) or a
    glob → sorted file paths."""
    p = Path(path).expanduser()
    if p.is_dir():
        # Hidden files and everything under hidden folders (a run's .NAME.work, .git) are not input.
        files = sorted(str(f) for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts)
                       and (fmt != "auto" or f.name.lower().endswith(KNOWN_SUFFIXES)))
    elif p.is_file():
        files = [str(p)]
    else:
        files = sorted(f for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))
        if not files:
            raise HerdError(f"input {path}: no such file, directory or matching files")
    return files


def plan_units(path: str, fmt: str = "auto", domain: str = "", shard_bytes: int = 1 << 22,
               text_key: str = "text") -> list[Unit]:
    """The units of one input entry, in a fixed order (the order documents keep in the output).
    `text_key`: the JSONL field holding the text (datatrove's JsonlReader `text_key`)."""
    if fmt not in FORMATS:
        raise HerdError(f"input {path}: format {fmt!r}; choose {', '.join(FORMATS)}")
    if not text_key:
        raise HerdError(f"input {path}: text_key is empty; name the JSONL field that holds the text")
    meta = {} if text_key == "text" else {"text_key": text_key}  # the default leaves plans as they were
    units: list[Unit] = []
    group: list[str] = []
    group_fmt, group_bytes = "", 0
    for f in expand_input(path, fmt):
        kind = detect_format(f) if fmt == "auto" else fmt
        try:
            size = os.path.getsize(f)
        except OSError as e:
            raise HerdError(f"{f}: cannot read ({e.strerror})") from None
        if kind == "jsonl":
            if f.endswith(".gz"):  # gzip streams cannot be split by byte offset
                units.append(Unit("jsonl", [f], 0, -1, domain, dict(meta)))
            else:
                for start in range(0, max(size, 1), shard_bytes):
                    units.append(Unit("jsonl", [f], start, min(start + shard_bytes, size), domain, dict(meta)))
            continue
        if group and (group_fmt != kind or group_bytes + size > shard_bytes):
            units.append(Unit(group_fmt, group, domain=domain))
            group, group_bytes = [], 0
        group.append(f)
        group_fmt = kind
        group_bytes += size
    if group:
        units.append(Unit(group_fmt, group, domain=domain))
    return units


# ---- reading a unit --------------------------------------------------------------------------------
def read_unit(unit: Unit) -> Iterator[RawDoc]:
    if unit.format == "jsonl":
        yield from _read_jsonl(unit.files[0], unit.start, unit.end, unit.domain, unit.meta.get("text_key", "text"))
        return
    for f in unit.files:
        data = _read_bytes(f)
        try:
            # "utf-8-sig": a leading byte-order mark is the file's encoding signature (Notepad writes
            # one), not text; kept, U+FEFF would open the document and be trained on as a token.
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise HerdError(f"{f}: not UTF-8 text (byte {e.start}); convert it or drop it from the inputs") from None
        name = Path(f).stem
        if unit.format == "html":
            url = _canonical_url(text) or Path(f).resolve().as_uri()  # the file: a relative canonical has no base
            yield RawDoc(extract_html(text), name=name, url=url, domain=unit.domain)
        else:
            yield RawDoc(text, name=name, domain=unit.domain)


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise HerdError(f"{path}: cannot read ({e.strerror})") from None


def _jsonl_lines(path: str, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(line number or byte offset, raw line) of the lines starting in [start, end)."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                for i, line in enumerate(fh, 1):
                    yield i, line
            return
        with open(path, "rb") as fh:
            pos = start
            if start > 0:  # a line that started before `start` belongs to the previous range
                fh.seek(start - 1)
                if fh.read(1) != b"\n":
                    pos = start + len(fh.readline())
            fh.seek(pos)
            while pos < end:
                line = fh.readline()
                if not line:
                    break
                yield pos, line
                pos += len(line)
    # zlib.error: a .gz whose deflate data is corrupt (not merely truncated) fails inside zlib
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise HerdError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _read_jsonl(path: str, start: int, end: int, domain: str, text_key: str = "text") -> Iterator[RawDoc]:
    where = "line" if path.endswith(".gz") else "byte"
    for pos, raw in _jsonl_lines(path, start, end):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError as e:  # a ValueError too: it was called "not valid JSON", a truncated file
            raise HerdError(f"{path}: {where} {pos}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                            f"{e.start + 1}); convert the file to UTF-8") from None
        except ValueError:
            raise HerdError(f"{path}: {where} {pos}: not valid JSON (a truncated or corrupt file?)") from None
        # "text" wins; a record whose "text" is absent or null but which has "html" is extracted
        # (exports often carry both keys, one of them null)
        text = obj.get(text_key) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            if text is not None or not isinstance(obj, dict) or not isinstance(obj.get("html"), str):
                fields = ", ".join(map(repr, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
                # "it has 'text'" said nothing of why that field would not do: name its type
                found = (f"its {json.dumps(text_key)} is {type(text).__name__}" if text is not None else
                         f"it has {fields}; another field is [[input]] text_key")
                raise HerdError(f"{path}: {where} {pos}: not a JSON object with a {json.dumps(text_key)} (or \"html\") "
                                f"string ({found})")
            # surrogates fixed before lxml sees them: it stops at a lone one, and the rest of
            # the page was lost without a word
            text = extract_html(valid_unicode(obj["html"]))
        try:
            date = normalize_date(obj.get("date"))
        except ValueError as e:
            raise HerdError(f"{path}: {where} {pos}: {e}") from None
        # a null "id" (or "name") is no name: str(None) named the document "None"
        name = next((v for v in (obj.get("id"), obj.get("name")) if v is not None), "")
        yield RawDoc(text=valid_unicode(text), name=str(name), url=str(obj.get("url", "") or ""),
                     domain=str(obj.get("domain", "") or domain), date=date)


def normalize_date(value) -> str:
    """A record's `date` → UTC ISO 8601 of fixed width ("2024-02-01T00:00:00.000000Z"), so that
    URL de-dup can keep the most recent version by comparing strings; "" when absent. Accepts ISO
    8601 dates and times (a time without a zone is taken as UTC) and Unix timestamps (seconds, as a
    number or a string of digits). Anything else is refused: ordering "2024-2-01" or "01/02/2024"
    as text would keep the wrong copy without a word."""
    import datetime as dt

    if value is None or value == "":
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"date {value!r} is neither an ISO 8601 date nor a Unix timestamp")
    try:
        if isinstance(value, (int, float)) or re.fullmatch(r"\d{9,}(\.\d*)?", value.strip()):
            when = dt.datetime.fromtimestamp(float(value), dt.timezone.utc)
        elif re.fullmatch(r"\d{4}-\d{2}-\d{2}([T ].*)?", value.strip()):
            when = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        else:
            raise ValueError
    except (ValueError, OverflowError, OSError):
        raise ValueError(f"date {value!r} is neither an ISO 8601 date (YYYY-MM-DD[THH:MM:SS[±HH:MM]]) "
                         "nor a Unix timestamp") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")




def valid_unicode(text: str) -> str:
    """`text` as the tokenizers read it: JSON may escape lone UTF-16 surrogates ("\\ud800"), which
    no UTF-8 writer takes; they become U+FFFD, as an undecodable byte would, and a high+low pair
    left as two code units becomes the one character it spells (😀), as tiktoken (and so Meta's
    Llama tokenizers) reads a str through UTF-16 with surrogatepass. Tokenizer training uses it
    too, so it never learns merges for text that encoding never produces."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# ---- HTML main-content extraction ------------------------------------------------------------------
_XML_DECLARATION = re.compile(r"\A\ufeff?\s*<\?xml\b[^>]*\?>")
_CANONICAL = re.compile(r"""<link[^>]+rel=["']?canonical["']?[^>]*>""", re.I)
_HREF = re.compile(r"""href=["']([^"']+)["']""", re.I)
# In trafilatura's markdown, left to right: a fenced block (``` or longer when the code holds ```),
# an inline code span, or a backslash escape of ASCII punctuation (CommonMark's set; trafilatura
# writes `a \< b`, `max\_new\_tokens`, `\[1\]`, a literal backslash before one as `\\`).
_MARKDOWN = re.compile(r"(?P<fence>^(?P<ticks>`{3,})[^\n]*\n(?P<body>.*?)\n?(?P=ticks)$)"
                       r"|(?P<code>(?P<run>`+)(?!`).+?(?<!`)(?P=run)(?!`))"
                       r"|\\(?P<esc>[!-/:-@\[-`{-~])", re.S | re.M)


def _canonical_url(html: str) -> str:
    """The page's absolute canonical URL, or "": a relative one ("/") names no page without the
    page's own URL, and would make every page of a site one URL for de-dup."""
    from urllib.parse import urlsplit

    m = _CANONICAL.search(html)
    h = _HREF.search(m.group(0)) if m else None
    url = h.group(1).strip() if h else ""
    parts = urlsplit(url)
    return url if parts.scheme and parts.netloc else ""


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


def extract_html(html: str) -> str:
    """The main content of an HTML page as text (markdown-ish: headings, lists, fenced code).

    Code blocks survive exactly: trafilatura keeps `<pre>` content as a fenced block but drops its
    blank lines, so each fenced block is swapped back for the original `<pre>` text it came from
    (matched ignoring whitespace)."""
    import lxml.html
    import trafilatura

    if not html.strip():
        return ""
    # lxml refuses a str that starts with an XML declaration naming an encoding (XHTML pages do:
    # `<?xml version="1.0" encoding="utf-8"?>`); the text is already decoded, so the declaration
    # says nothing and is dropped rather than losing the whole page.
    html = _XML_DECLARATION.sub("", html, count=1)
    try:
        tree = lxml.html.document_fromstring(html)
    except Exception:  # lxml raises several types on hopeless markup  # noqa: BLE001
        return ""
    _math_to_text(tree)
    for br in [br for pre in tree.iter("pre") for br in pre.iter("br")]:
        # a browser breaks the line at <br> inside <pre>; text_content() has no text for it, so
        # code written with <br> came out as one line ("x = 1y = 2")
        _replace_with_text(br, "\n")
    pre_elements = list(tree.iter("pre"))
    pres = [p.text_content() for p in pre_elements]
    for pre, code in zip(pre_elements, pres, strict=True):
        _as_plain_code(pre, code)
    pres = [p.strip("\n") for p in pres]
    text = trafilatura.extract(tree, output_format="markdown", include_formatting=True, include_comments=False,
                               include_tables=True, favor_recall=True, deduplicate=False,
                               config=_trafilatura_config()) or ""
    # Blocks that differ only in whitespace (a snippet shown indented, then flattened) share a key;
    # each fenced block takes the first unused original of its key, in page order, where a dict
    # gave every one of them the last block's layout.
    by_key: dict[str, list[str]] = {}
    for p in pres:
        by_key.setdefault(_squash(p), []).append(p)

    def plain(m: re.Match) -> str:
        if m.group("esc") is not None:  # markdown's escape, not the page's text
            return m.group("esc")
        if m.group("fence") is not None:
            candidates = by_key.get(_squash(m.group("body")))
            if candidates:
                original = candidates.pop(0) if len(candidates) > 1 else candidates[0]
                ticks = "`" * max(3, 1 + max((len(r) for r in re.findall("`+", original)), default=0))
                return f"{ticks}\n{original}\n{ticks}"
        return m.group(0)

    return _MARKDOWN.sub(plain, text).strip()


@functools.cache
def _trafilatura_config():
    """trafilatura's settings, but its main extractor's result is kept however short: below
    MIN_EXTRACTED_SIZE (250 characters) it falls back to a baseline that flattens the page into
    lines, menus and <noscript> text included and code blocks joined into one line."""
    from trafilatura.settings import use_config

    config = use_config()
    config.set("DEFAULT", "MIN_EXTRACTED_SIZE", "1")
    return config


def _as_plain_code(pre, text: str) -> None:
    """`<pre>` → `<pre><code>TEXT</code></pre>`, markup inside dropped. trafilatura fences (and so
    keeps) only a `<pre><code>`: a bare `<pre>` came out as prose, blank lines lost and `<` escaped;
    and markup inside the code (`<b>return</b>`, `<a href>` on a name, `<i>`) cut the block in
    two, the rest of the code becoming prose. The text is what `extract_html` restores anyway."""
    import lxml.html

    for child in list(pre):
        pre.remove(child)  # lxml keeps a removed child's tail with it: the text is set below
    code = lxml.html.Element("code")
    code.text, pre.text = text, None
    pre.append(code)


def _math_to_text(tree) -> None:
    """MathML → its TeX annotation or alttext; math images → their alt text (kept as `$…$`)."""
    for m in list(tree.iter("{http://www.w3.org/1998/Math/MathML}math", "math")):
        tex = m.get("alttext") or ""
        for ann in m.iter("annotation"):
            if "tex" in (ann.get("encoding") or "").lower():
                tex = ann.text_content()
        if tex:
            _replace_with_text(m, f"${tex.strip()}$")
    for img in list(tree.iter("img")):
        cls = (img.get("class") or "").lower()
        alt = img.get("alt") or ""
        if alt and ("math" in cls or "tex" in cls or "latex" in cls):
            _replace_with_text(img, f"${alt.strip()}$")


def _replace_with_text(el, text: str) -> None:
    parent = el.getparent()
    if parent is None:
        return
    tail = el.tail or ""
    prev = el.getprevious()
    if prev is not None:
        prev.tail = (prev.tail or "") + text + tail
    else:
        parent.text = (parent.text or "") + text + tail
    parent.remove(el)
