"""What the data pipeline must never do to the user's files, and the inputs it must read right:
an output directory is replaced only when it is new, empty or an earlier output; inputs and
outputs never overlap; a finished run started again ends cleanly; a mistake found before any work
leaves nothing behind; numbers out of range, undated or misdated records and an emptied corpus
are one line naming the cause; HTML comes out as the page's text, not markdown's escapes of it."""

from __future__ import annotations

import json

import pytest

from herd.cli import main
from herd.data.pipeline import load_pipeline_config, run_pipeline
from herd.data.readers import extract_html, normalize_date, plan_units, read_unit
from herd.errors import HerdError

WORDS = ("river stone maple lantern harbor violet copper meadow thunder ember quiet orchard silver "
         "canyon willow falcon garden marble summit hollow").split()


def _docs(n: int, seed: int = 0) -> list[str]:
    """n distinct documents of varied words (long enough to pass the repetition rules)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(120)) for _ in range(n)]


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run(capsys, tmp_path, inp, out, *over) -> tuple[int, str]:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[input]]\npath = "{inp}"\n\n[run]\nout = "{out}"\ntokenizer = "bytes"\nworkers = 1\n'
                   "val_fraction = 0\n")
    code = main(["data", "run", str(cfg), *over])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


# ---- the output directory ------------------------------------------------------------------------
def test_an_output_that_is_not_ours_is_refused_and_kept(tmp_path, capsys):
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": t} for t in _docs(3)])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    code, err = _run(capsys, tmp_path, inp, mine)
    assert code == 2 and "not an output of `herd data run`" in err, err
    assert (mine / "notes.txt").read_text() == "my notes" and not (tmp_path / ".mine.work").exists()

    a_file = tmp_path / "precious.txt"
    a_file.write_text("precious")
    code, err = _run(capsys, tmp_path, inp, a_file)
    assert code == 2 and "is a file" in err and a_file.read_text() == "precious"

    # an empty directory, and an earlier output of the pipeline, are replaced
    (tmp_path / "empty").mkdir()
    assert _run(capsys, tmp_path, inp, tmp_path / "empty")[0] == 0
    first = json.loads((tmp_path / "empty" / "manifest.json").read_text())
    assert first["output"]["documents"] == 3
    inp2 = _jsonl(tmp_path / "in2.jsonl", [{"text": t} for t in _docs(5, seed=1)])
    assert _run(capsys, tmp_path, inp2, tmp_path / "empty")[0] == 0
    assert json.loads((tmp_path / "empty" / "manifest.json").read_text())["output"]["documents"] == 5


@pytest.mark.parametrize("layout", ["out_is_input", "out_inside_input", "input_inside_out"])
def test_overlapping_input_and_output_are_refused(tmp_path, capsys, layout):
    src = tmp_path / "corpus"
    src.mkdir()
    _jsonl(src / "a.jsonl", [{"text": t} for t in _docs(3)])
    inp, out = {"out_is_input": (src, src), "out_inside_input": (src, src / "out"),
                "input_inside_out": (src / "a.jsonl", src)}[layout]
    code, err = _run(capsys, tmp_path, inp, out)
    assert code == 2 and "overlap" in err, err
    assert (src / "a.jsonl").exists() and sorted(p.name for p in src.iterdir()) == ["a.jsonl"]


def test_hidden_folders_of_an_input_directory_are_not_read(tmp_path):
    src = tmp_path / "corpus"
    (src / ".git").mkdir(parents=True)
    (src / "sub").mkdir()
    (src / "sub" / "a.txt").write_text("kept")
    (src / ".git" / "b.txt").write_text("hidden")
    (src / ".c.txt").write_text("hidden")
    assert [d.text for u in plan_units(str(src)) for d in read_unit(u)] == ["kept"]


# ---- starting a finished run again, and mistakes found before any work ------------------------------
def test_a_finished_run_started_again_ends_cleanly(tmp_path, capsys):
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": t} for t in _docs(4)])
    out = tmp_path / "out"
    assert _run(capsys, tmp_path, inp, out, "--run.keep_work=true")[0] == 0
    before = (out / "manifest.json").read_bytes()
    code, err = _run(capsys, tmp_path, inp, out, "--run.keep_work=true")
    assert code == 0 and (out / "manifest.json").read_bytes() == before, err
    # the output changed since: the kept work directory cannot publish it again
    (out / "manifest.json").write_text(before.decode().replace('"documents": 4', '"documents": 5', 1))
    code, err = _run(capsys, tmp_path, inp, out, "--run.keep_work=true")
    assert code == 2 and "already published" in err and "--restart" in err, err
    assert _run(capsys, tmp_path, inp, out, "--restart")[0] == 0
    assert not (tmp_path / ".out.work").exists()


@pytest.mark.parametrize("override, message", [
    ("--run.tokenizer=no-such-tokenizer", "no-such-tokenizer"),
    ("--dirty_words.words_file=/no/such/words.txt", "words_file"),
])
def test_a_mistake_found_first_leaves_no_work_directory(tmp_path, capsys, override, message):
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": t} for t in _docs(3)])
    code, err = _run(capsys, tmp_path, inp, tmp_path / "out", override)
    assert code == 2 and message in err, err
    assert not (tmp_path / ".out.work").exists()
    assert _run(capsys, tmp_path, inp, tmp_path / "out")[0] == 0  # the corrected command just runs


@pytest.mark.parametrize("override, key", [
    ("--repetition.line_ngram=0", "repetition.line_ngram"),
    ("--minhash.num_perm=100000000", "minhash.num_perm"),
    ("--kl_divergence.smoothing=-1", "kl_divergence.smoothing"),
    ("--kl_divergence.smoothing=5", "kl_divergence.smoothing"),
    ("--kl_divergence.max_kl=0", "kl_divergence.max_kl"),
    ("--repetition.top_ngrams=[[-1, 0.1]]", "repetition.top_ngrams"),
    ("--run.workers=-3", "run.workers"),
    ("--dirty_words.max_fraction=2", "dirty_words.max_fraction"),
    ("--mix.weights={web = -1}", "mix.weights"),
])
def test_numbers_out_of_range_are_one_line(tmp_path, capsys, override, key):
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": t} for t in _docs(2)])
    code, err = _run(capsys, tmp_path, inp, tmp_path / "out", override)
    assert code == 2 and err.startswith("herd: error: ") and key in err, err


def test_an_emptied_corpus_says_where_the_documents_went(tmp_path, capsys):
    docs = _docs(3)
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": t} for t in docs + docs[:1]])  # the copy goes at minhash
    code, err = _run(capsys, tmp_path, inp, tmp_path / "out", "--kl_divergence.max_kl=0.0001",
                     "--kl_divergence.min_tokens=1")
    assert code == 2 and "removed all 4 documents" in err and "minhash 1, kl_divergence 3" in err, err
    code, err = _run(capsys, tmp_path, inp, tmp_path / "out", "--run.val_fraction=0.999")
    assert code == 2 and "validation split" in err and "val_fraction" in err, err


# ---- dates and URLs ---------------------------------------------------------------------------------
def test_dates_are_ordered_as_times_not_as_text():
    assert normalize_date(1700000000) > normalize_date(999999999)  # as text "1700000000" < "999999999"
    assert normalize_date("1700000000") == normalize_date(1700000000) == "2023-11-14T22:13:20.000000Z"
    assert normalize_date("2024-12-01") > normalize_date("2024-02-01")
    assert normalize_date("2024-06-01T02:00:00+02:00") == normalize_date("2024-06-01T00:00:00Z")
    assert normalize_date("") == normalize_date(None) == ""
    for bad in ("2024-2-01", "01/02/2024", "yesterday", True, [2024]):
        with pytest.raises(ValueError, match="neither an ISO 8601 date"):
            normalize_date(bad)


def test_url_dedup_keeps_the_newest_by_time(tmp_path, capsys):
    a, b, c = _docs(3)
    inp = _jsonl(tmp_path / "in.jsonl", [
        {"id": "old", "url": "https://x.org/p", "date": 999999999, "text": a},
        {"id": "new", "url": "https://x.org/p", "date": 1700000000, "text": b},
        {"id": "other", "url": "https://x.org/q", "date": "2024-12-01", "text": c}])
    assert _run(capsys, tmp_path, inp, tmp_path / "out")[0] == 0
    kept = [json.loads(x)["name"] for x in (tmp_path / "out" / "documents.jsonl").read_text().splitlines()]
    assert kept == ["new", "other"]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"url": "https://x.org/p", "date": "2024-2-01", "text": a}])
    code, err = _run(capsys, tmp_path, bad, tmp_path / "out2")
    assert code == 2 and "bad.jsonl: byte 0: date '2024-2-01'" in err, err


def test_a_relative_canonical_url_does_not_merge_pages(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    for name, text in zip(("a", "b"), _docs(2), strict=True):
        (site / f"{name}.html").write_text(f'<html><head><link rel="canonical" href="/"></head><body><article>'
                                           f"<p>{text}</p></article></body></html>")
    cfg = load_pipeline_config(data={"input": [{"path": str(site)}],
                                     "run": {"out": str(tmp_path / "out"), "tokenizer": "bytes", "val_fraction": 0}})
    m = run_pipeline(cfg, workers=1)
    assert m["output"]["documents"] == 2
    urls = [json.loads(x)["url"] for x in (tmp_path / "out" / "documents.jsonl").read_text().splitlines()]
    assert all(u.startswith("file://") for u in urls) and len(set(urls)) == 2


# ---- HTML text --------------------------------------------------------------------------------------
PROSE = "Set max_new_tokens so that a < b, 2 * 3 = 6 and [1] stays as written; C:\\ and \\_ too."
BARE_PRE = "x = 1\ny = x < 2\n\n\nz = 3"
FENCED = 'print("```")\n\n```inner```'


def _page(body: str) -> str:
    filler = "<p>" + " ".join(_docs(1)[0].split()[:60]) + "</p>"
    return f"<html><body><nav>Home About</nav><article>{filler}{body}{filler}</article><footer>(c)</footer></body></html>"


def test_html_text_is_the_pages_text_not_markdown_escapes():
    import html

    text = extract_html(_page(f"<p>{html.escape(PROSE)}</p><p>Call <code>a\\_b</code>.</p>"))
    assert PROSE in text, text
    assert "`a\\_b`" in text  # inline code is verbatim


def test_html_pre_blocks_survive_bare_or_holding_fences():
    import html

    text = extract_html(_page(f"<pre>{html.escape(BARE_PRE)}</pre><pre><code>{html.escape(FENCED)}</code></pre>"))
    assert f"```\n{BARE_PRE}\n```" in text, text
    assert f"````\n{FENCED}\n````" in text, text


def test_a_short_page_keeps_its_structure():
    page = ("<html><body><nav>menu a b</nav><article><h2>Install</h2><p>Install it like this.</p>"
            "<noscript>NOSCRIPT_TEXT</noscript><pre><code>$ pip install foo\n\n$ foo --help</code></pre>"
            "<p>Done.</p></article></body></html>")
    text = extract_html(page)
    assert "```\n$ pip install foo\n\n$ foo --help\n```" in text, text
    assert "menu a b" not in text and "NOSCRIPT" not in text


def test_bad_dates_raise_herd_errors_in_the_reader(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"text": "t", "date": "next tuesday"}])
    with pytest.raises(HerdError, match="date 'next tuesday'"):
        [d for u in plan_units(p) for d in read_unit(u)]


def test_unit_shards_reach_the_disk_before_they_are_in_place(tmp_path, monkeypatch):
    """A unit's done-marker follows its shards: after a power cut (not only a kill) the marker must
    not outlive a half-written shard, so each shard file is fsynced under a temporary name and then
    renamed into place, and what lands there reads back as written."""
    import os

    import numpy as np

    from herd.data import shards

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))),
                                                     real_replace(a, b))[1])
    docs = [[1, 2, 3], [4, 5], [6]]
    entry = shards.write_shard_files(tmp_path, "train-u00000", docs)
    for suffix in (".bin", ".idx"):
        final = str(tmp_path / f"train-u00000{suffix}")
        (i, (_, tmp, dest)), = [(i, e) for i, e in enumerate(events) if e[0] == "replace" and e[2] == final]
        assert ("fsync", tmp) in events[:i]  # the temporary file was on disk before the rename
    assert entry == {"name": "train-u00000", "documents": 3, "tokens": 6}
    tokens = np.fromfile(tmp_path / "train-u00000.bin", dtype=shards.TOKEN_DTYPE)
    assert tokens.tolist() == [1, 2, 3, 4, 5, 6]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
