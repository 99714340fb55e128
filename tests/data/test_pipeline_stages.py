"""The data pipeline's pieces (SPEC §3.1.1): HTML extraction keeps code, JSONL splitting loses no
line, repetition counts equal datatrove's (FineWeb's Gopher implementation), the quality
classifier trains and filters, mixing weights, and bad input → one line, exit status 2."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest

from herd.cli import main
from herd.data import builtin
from herd.data.dedup import normalize_url, url_duplicates
from herd.data.filters import dup_ngram_chars, top_ngram_fraction
from herd.data.mix import copies, mixing_factors
from herd.data.pipeline import load_pipeline_config, run_pipeline
from herd.data.readers import Unit, extract_html, plan_units, read_unit
from herd.errors import HerdError

CODE = '''def by_length(words):
    """Shortest first."""
    return sorted(words, key=len)


if __name__ == "__main__":
    print(by_length(["pear", "fig", "banana"]))  # <fig> & friends'''

PAGE = f"""<!doctype html><html><head><title>Sorting in Python</title>
<link rel="canonical" href="https://example.org/sorting"></head><body>
<nav><a href="/">Home</a> | <a href="/blog">Blog</a> | <a href="/about">About us</a></nav>
<div class="sidebar"><ul><li>Trending: ten cat pictures</li><li>Subscribe to our newsletter</li></ul></div>
<article><h1>Sorting a list by length</h1>
<p>Python lists sort in place with a stable algorithm, so equal elements keep their order. The key
function below is called once per element, and the sorted builtin returns a new list.</p>
<pre><code>{CODE.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}</code></pre>
<p>The cost is <math alttext="O(n \\log n)"><mi>O</mi></math> comparisons, which matters for long
lists; for short ones any method is fast enough, and readability should decide.</p>
</article>
<footer>Copyright 2024 Example Corp. All rights reserved. Privacy policy. Terms of use.</footer>
</body></html>"""


# ---- readers --------------------------------------------------------------------------------------
def test_html_extraction_keeps_code_blocks_exactly_and_drops_boilerplate():
    text = extract_html(PAGE)
    assert CODE in text  # byte for byte: indentation, the blank lines, unescaped entities
    assert "Python lists sort in place" in text and "O(n \\log n)" in text
    for junk in ("Trending", "newsletter", "All rights reserved", "About us"):
        assert junk not in text


def test_html_through_the_pipeline(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sorting.html").write_text(PAGE)
    (tmp_path / "site" / "copy.html").write_text(PAGE.replace("Sorting a list", "Sorting lists"))
    cfg = load_pipeline_config(data={"input": [{"path": str(tmp_path / "site"), "domain": "web"}],
                                     "run": {"out": str(tmp_path / "out"), "tokenizer": "bytes", "val_fraction": 0}})
    m = run_pipeline(cfg, workers=1)
    docs = [json.loads(x) for x in (tmp_path / "out" / "documents.jsonl").read_text().splitlines()]
    # both pages name the same canonical URL: URL de-dup keeps one
    assert [s["documents_removed"] for s in m["stages"] if s["stage"] == "url_dedup"] == [1]
    assert len(docs) == 1 and CODE in docs[0]["text"] and docs[0]["url"] == "https://example.org/sorting"


def test_jsonl_byte_ranges_lose_and_repeat_no_line(tmp_path):
    rng = random.Random(0)
    lines = [json.dumps({"text": "x" * rng.randrange(1, 300), "id": i}) for i in range(400)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for shard_bytes in (1, 97, 1000, 4096, 10**6):
        ids = [int(d.name) for u in plan_units(str(path), shard_bytes=shard_bytes) for d in read_unit(u)]
        assert ids == list(range(400)), shard_bytes
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert [int(d.name) for u in plan_units(str(gz)) for d in read_unit(u)] == list(range(400))
    # a lone surrogate escaped in JSON becomes U+FFFD instead of breaking UTF-8 writers later
    bad = tmp_path / "s.jsonl"
    bad.write_text('{"text": "ok \\ud800 ok"}\n')
    assert [d.text for u in plan_units(str(bad)) for d in read_unit(u)] == ["ok \ufffd ok"]


def test_url_dedup_keeps_the_most_recent_version():
    assert normalize_url("HTTPS://Example.org:443/a/?q=1#frag") == normalize_url("http://example.org/a?q=1")
    recs = [("a", "http://x.org/p", "2020"), ("b", "http://x.org/p/", "2023"), ("c", "http://x.org/q", ""),
            ("d", "", ""), ("e", "", "")]
    assert url_duplicates(recs) == {"a": "b"}


# ---- filters against datatrove ----------------------------------------------------------------------
def test_repetition_counts_equal_datatrove_on_real_text():
    gopher = pytest.importorskip("datatrove.pipeline.filters.gopher_repetition_filter")
    docs = [d for d in builtin.builtin_documents(code_limit=40)][::4]
    checked = 0
    for d in docs:
        words = d.text[:60_000].split()
        # datatrove compares n-grams as their words joined without a separator ("ab c" == "a bc");
        # ours compares word sequences. With a separator on every word the two definitions agree.
        sep = [w + "\x1f" for w in words]
        for n in (5, 6, 8, 10):
            assert dup_ngram_chars(sep, n) == gopher.find_all_duplicate(sep, n), (d.name, n)
        total = len("".join(words))
        for n in (2, 3, 4):
            ref = gopher.find_top_duplicate(gopher.get_n_grams(words, n)) / total
            assert top_ngram_fraction(words, n) == pytest.approx(ref, rel=1e-12), (d.name, n)
        checked += 1
    assert checked >= 25


def test_repetition_shortcut_never_changes_a_decision():
    """repetition_reason skips the exact scan when a vectorized upper bound already passes; its
    decisions must equal the exact rule's (checked on real text and on planted repetition)."""
    from herd.data.filters import dup_ngram_fraction, repetition_reason

    top = [(2, 0.20), (3, 0.18), (4, 0.16)]
    dup = [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]
    rng = random.Random(0)
    texts = [d.text[:30_000] for d in builtin.builtin_documents(code_limit=30)][::3]
    for t in list(texts[:8]):  # planted: a passage repeated with growing share
        words = t.split()
        for k in (2, 4, 8):
            chunk = words[:60]
            texts.append(" ".join(words[:400] + chunk * k + [str(rng.random()) for _ in range(50)]))
    failing = 0
    for t in texts:
        words = t.split()
        exact = any(top_ngram_fraction(words, n) > lim for n, lim in top) or any(
            dup_ngram_fraction(words, n) > lim for n, lim in dup)
        assert bool(repetition_reason(words, dup, top)) == exact
        failing += exact
    assert 5 <= failing < len(texts)  # both outcomes exercised


# ---- quality classifier -------------------------------------------------------------------------------
def _passages(names, rng, n_per, size=600):
    docs = {d.name: d.text for d in builtin.shakespeare_documents() if d.name in names}
    good, bad = [], []
    for t in docs.values():
        for _ in range(n_per):
            s = rng.randrange(len(t) - size)
            p = " ".join(t[s:s + size].split())
            w = p.split()
            rng.shuffle(w)
            good.append(p)
            bad.append(" ".join(w))  # word salad: the classic spam that unigram filters miss
    return good, bad


def test_quality_classifier_trains_and_filters_in_the_pipeline(tmp_path):
    from herd.data.quality import QualityModel, train_quality

    rng = random.Random(0)
    good, bad = _passages({"hamlet_gut", "othello_gut", "lear_gut", "tempest_gut"}, rng, 40)
    model = train_quality(good + bad, [1] * len(good) + [0] * len(bad))
    path = model.save(tmp_path / "quality.npz")
    again = QualityModel.load(path)
    # held-out plays, never seen in training
    tg, tb = _passages({"macbeth_gut", "twelfth_night_gut"}, random.Random(1), 20)
    acc = (np.mean(again.score(tg) >= 0.5) + np.mean(again.score(tb) < 0.5)) / 2
    assert acc >= 0.9, acc

    rows = [{"text": t, "name": f"good{i}"} for i, t in enumerate(tg)] + [
        {"text": t, "name": f"bad{i}"} for i, t in enumerate(tb)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_pipeline_config(data={
        "input": [{"path": str(tmp_path / "in.jsonl")}],
        "run": {"out": str(tmp_path / "out"), "tokenizer": "bytes", "val_fraction": 0},
        # random windows of one play may overlap: only the quality stage is under test here
        "minhash": {"enabled": False}, "line_dedup": {"enabled": False}, "kl_divergence": {"enabled": False},
        "quality": {"enabled": True, "model": str(path), "min_score": 0.5}})
    run_pipeline(cfg, workers=1)
    kept = {json.loads(x)["name"] for x in (tmp_path / "out" / "documents.jsonl").read_text().splitlines()}
    removed = [json.loads(x) for x in (tmp_path / "out" / "removed.jsonl").read_text().splitlines()]
    assert all(r["stage"] == "quality" for r in removed), removed
    assert sum(k.startswith("good") for k in kept) >= 0.9 * len(tg)
    assert sum(k.startswith("bad") for k in kept) <= 0.1 * len(tb)


def test_quality_model_file_errors(tmp_path):
    from herd.data.quality import QualityModel, train_quality

    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(HerdError, match="cannot read a quality model"):
        QualityModel.load(tmp_path / "x.npz")
    with pytest.raises(HerdError, match="needs both labels"):
        train_quality(["a b", "c d"], [1, 1])


@pytest.mark.slow
def test_label_with_smollm2_then_train(tmp_path, smollm2_gguf, capsys):
    """`herd data label` with the real SmolLM2 judge, then `herd data train-quality` (slow: the
    model judges each sample on CPU)."""
    src = tmp_path / "docs.jsonl"
    rows = [{"text": d.text[:3000]} for d in builtin.code_documents(limit=3)]
    rows += [{"text": next(d.text for d in builtin.shakespeare_documents() if d.name == "sonnets_gut")[:3000]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "label", str(src), "--out", str(tmp_path / "labels.jsonl"), "--samples", "2",
                 "--max-chars", "300"]) == 0
    labels = [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 2 and all(0 <= r["score"] <= 1 for r in labels)
    assert {r["label"] for r in labels} == {0, 1}  # the median split gives both classes
    assert main(["data", "train-quality", str(tmp_path / "labels.jsonl"), "--out", str(tmp_path / "q.npz"),
                 "--folds", "0"]) == 0  # 2 samples: too few to cross-validate
    assert (tmp_path / "q.npz").exists()


# ---- mixing ----------------------------------------------------------------------------------------
def test_mixing_factors_hit_the_target_shares():
    tokens = {"general": 700_000, "code": 100_000, "math": 200_000}
    w = {"general": 0.5, "code": 0.17, "math": 0.25 + 0.08}
    f = mixing_factors(tokens, w)
    out = {d: f[d] * tokens[d] for d in tokens}
    assert sum(out.values()) == pytest.approx(sum(tokens.values()))
    for d in tokens:
        assert out[d] / sum(out.values()) == pytest.approx(w[d] / sum(w.values()))
    g = mixing_factors(tokens, w, upsample=False)
    assert max(g.values()) == pytest.approx(1.0)
    # copies: expectation = factor, deterministic by id
    n = [copies(f"doc{i}", 1.37) for i in range(20_000)]
    assert set(n) == {1, 2} and np.mean(n) == pytest.approx(1.37, abs=0.02)
    assert n == [copies(f"doc{i}", 1.37) for i in range(20_000)]
    with pytest.raises(HerdError, match="no weight for domain"):
        mixing_factors(tokens, {"general": 1.0})


# ---- bad input: one line, exit status 2 ---------------------------------------------------------------
def _run_cli(capsys, args):
    code = main(["data", "run", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _toml(tmp_path, inp, extra="") -> str:
    p = tmp_path / "c.toml"
    p.write_text(f'[[input]]\npath = "{inp}"\n\n[run]\nout = "{tmp_path / "out"}"\ntokenizer = "bytes"\n{extra}')
    return str(p)


@pytest.mark.parametrize("case, message", [
    ("empty_dir", "empty corpus"),
    ("blank_jsonl", "empty corpus"),
    ("everything_filtered", "empty corpus"),
    ("unknown_key", "unknown config key minhash.treshold; valid keys: minhash.enabled, minhash.ngram"),
    ("unknown_section", "unknown config section 'dedup'; valid sections: input, run"),
    ("corrupt_jsonl", "not valid JSON (a truncated or corrupt file?)"),
    ("not_utf8", "not UTF-8 text"),
    ("missing_input", "no such file"),
    ("bad_type", "minhash.threshold: expected float"),
    ("gzip_corrupt", "cannot read"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, message):
    d = tmp_path / "in"
    d.mkdir()
    extra = ""
    inp = d
    if case == "blank_jsonl":
        inp = d / "x.jsonl"
        inp.write_text("\n\n")
    elif case == "everything_filtered":
        inp = d / "x.jsonl"
        inp.write_text(json.dumps({"text": "   \n "}) + "\n")
    elif case == "unknown_key":
        extra = "\n[minhash]\ntreshold = 0.5\n"
    elif case == "unknown_section":
        extra = "\n[dedup]\nx = 1\n"
    elif case == "corrupt_jsonl":
        inp = d / "x.jsonl"
        inp.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "trunc')
    elif case == "not_utf8":
        (d / "a.txt").write_bytes(b"caf\xe9 au lait\n")
    elif case == "missing_input":
        inp = d / "nope.jsonl"
    elif case == "bad_type":
        extra = '\n[minhash]\nthreshold = "high"\n'
    elif case == "gzip_corrupt":
        inp = d / "x.jsonl.gz"
        inp.write_bytes(b"\x1f\x8b\x08\x00garbage")
    code, err = _run_cli(capsys, [_toml(tmp_path, inp, extra)])
    assert code == 2
    errors = [line for line in err if line.startswith("herd: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err  # progress lines may precede it
    assert message in errors[0], errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content", [
    ("empty.txt", ""), ("blank.jsonl", "\n\n"), ("page.html", "<html><head><title>t</title></head></html>"),
    (None, None),
])
def test_an_empty_corpus_is_the_only_line_on_stderr(tmp_path, capsys, name, content):
    """An empty input file printed "herd: read: 1 units done" before the empty-corpus error: two lines."""
    d = tmp_path / "in"
    d.mkdir()
    if name:
        (d / name).write_text(content)
    code, err = _run_cli(capsys, [_toml(tmp_path, d / name if name else d)])
    assert code == 2 and len(err) == 1 and err[0].startswith("herd: error: empty corpus: "), err


def test_progress_lines_follow_each_phase(tmp_path, capsys):
    inp = tmp_path / "x.jsonl"
    inp.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in builtin.code_documents(limit=4)))
    code, err = _run_cli(capsys, [_toml(tmp_path, inp)])
    assert code == 0, err
    from herd.data.pipeline import load_pipeline_config, steps_for

    phases = [n for kind, n, _, _ in steps_for(load_pipeline_config(str(tmp_path / "c.toml"), [])) if kind == "phase"]
    assert [line.split(":")[1].strip() for line in err if " units done " in line] == phases


def test_cli_run_with_overrides_writes_shards(tmp_path, capsys):
    inp = tmp_path / "x.jsonl"
    inp.write_text("".join(json.dumps({"text": d.text, "domain": d.domain}) + "\n"
                           for d in builtin.code_documents(limit=8)))
    code, err = _run_cli(capsys, [_toml(tmp_path, inp), "--workers", "2", "--minhash.threshold=0.9",
                                  "--run.val_fraction=0.25"])
    assert code == 0, err
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["config"]["minhash"]["threshold"] == 0.9 and m["config"]["run"]["val_fraction"] == 0.25
    assert m["stages"][0]["documents_in"] == 8 and m["output"]["documents"] == m["stages"][-1]["documents_out"] > 0
    assert "wrote" in err[-1]


def test_unit_reader_rejects_a_non_object_record(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("[1, 2]\n")
    with pytest.raises(HerdError, match=r"not a JSON object with a \"text\""):
        list(read_unit(Unit("jsonl", [str(p)], 0, p.stat().st_size)))


def test_missing_builtin_input_is_prepared_first(tmp_path, capsys):
    from herd.data.pipeline import prepare_inputs
    from herd.hub import say

    target = tmp_path / "builtin" / "documents.jsonl"
    cfg = load_pipeline_config(data={"input": [{"path": str(target), "prepare": "builtin"}]})
    prepare_inputs(cfg, say)
    assert "preparing the built-in corpus first" in capsys.readouterr().err
    names = [json.loads(x)["name"] for x in target.read_text().splitlines()]
    assert "hamlet_gut" in names and "hamlet_gut_f" in names and len(names) > 200
    bad = load_pipeline_config(data={"input": [{"path": str(tmp_path / "x.jsonl"), "prepare": "wikipedia"}]})
    with pytest.raises(HerdError, match="needs prepare = \"builtin\""):
        prepare_inputs(bad, say)


def test_line_dedup_counts_documents_or_occurrences(tmp_path):
    """A refrain repeated 8 times inside one document survives counting per document and goes when
    every occurrence counts; a line shared by 7 documents goes either way."""
    rng = random.Random(0)
    docs = []
    for i in range(7):
        # (ccNet's normalization maps digits to 0: unique lines need unique letters)
        body = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(40)) for _ in range(20)]
        docs.append("\n".join(["Shared header seen in seven documents"] + body + (["Sing hey nonny"] * 8 if i == 0 else [])))
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    kept = {}
    for per_doc in (True, False):
        out = tmp_path / f"out{per_doc}"
        cfg = load_pipeline_config(data={
            "input": [{"path": str(inp)}], "run": {"out": str(out), "tokenizer": "bytes", "val_fraction": 0},
            "line_dedup": {"per_document": per_doc}, "kl_divergence": {"enabled": False},
            "minhash": {"enabled": False}, "repetition": {"enabled": False}})  # templated text: line stage only
        run_pipeline(cfg, workers=1)
        kept[per_doc] = [json.loads(x)["text"] for x in (out / "documents.jsonl").read_text().splitlines()]
    assert all("Shared header" not in t for t in kept[True] + kept[False])
    assert kept[True][0].count("Sing hey nonny") == 8 and "Sing hey nonny" not in kept[False][0]
    for t, original in zip(kept[True], docs, strict=True):
        assert t.splitlines()[:20] == original.splitlines()[1:21]  # the unique lines all stay


def test_url_percent_encodings_normalize_as_rfc_3986():
    # §6.2.2.1: hex digits of a percent-encoding are case-insensitive; §6.2.2.2: an encoded
    # unreserved character is the character. A reserved one stays encoded ("%2F" is not "/").
    from urllib.parse import quote, unquote

    assert normalize_url("http://a.org/%7euser/x%2fy?q=%c3%a9") == normalize_url("http://a.org/~user/x%2Fy?q=%C3%A9")
    assert normalize_url("http://a.org/a%2Fb") != normalize_url("http://a.org/a/b")
    for text in ("~tilde-._", "caf\u00e9 & co/x?y", "100%"):
        encoded = quote(text, safe="")
        both = {normalize_url(f"http://a.org/{encoded}"), normalize_url(f"http://a.org/{encoded.lower()}")}
        assert len(both) == 1 and unquote(both.pop().split("/", 3)[3]) == text
