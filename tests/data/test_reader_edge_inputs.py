"""Inputs the other data tests never used: byte-order marks, XHTML with an XML declaration, records
whose "text" is null next to an "html", gzip files with corrupt deflate data, URLs with bad ports,
documents without a single word character, and `~` / name-less output paths. Each is checked
against a reference nobody here wrote (Python's codecs, the same page without its declaration,
exact Jaccard similarity) or a property that can fail."""

from __future__ import annotations

import gzip
import json
import random
import re
from html.parser import HTMLParser

import pytest

from herd.cli import main
from herd.data.dedup import minhash_duplicates, minhash_signature, normalize_url, shingles, url_duplicates
from herd.data.readers import extract_html, plan_units, read_unit
from herd.errors import HerdError

WORDS = "river stone maple lantern harbor violet copper meadow thunder ember quiet orchard".split()


def _read(path) -> list[str]:
    return [d.text for u in plan_units(str(path)) for d in read_unit(u)]


def _run(capsys, tmp_path, inp, out, *over) -> tuple[int, list[str]]:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[input]]\npath = "{inp}"\n\n[run]\nout = "{out}"\ntokenizer = "bytes"\nworkers = 1\n'
                   "val_fraction = 0\n\n[repetition]\nenabled = false\n\n[kl_divergence]\nenabled = false\n")
    code = main(["data", "run", str(cfg), *over])
    return code, capsys.readouterr().err.strip().splitlines()


# ---- byte-order marks ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a.txt", "a.md", "a.py"])
def test_a_utf8_bom_is_the_files_signature_not_its_text(tmp_path, name):
    body = "first line\r\nsecond line — é\r\n"
    f = tmp_path / name
    f.write_bytes(b"\xef\xbb\xbf" + body.encode())
    # Python's utf-8-sig codec is the reference: the BOM goes, every other character stays
    assert _read(f) == [f.read_bytes().decode("utf-8-sig")] == [body]


def test_tokenizer_training_reads_bom_files_as_the_pipeline_does(tmp_path):
    from herd.tokenizer.train import _read_inputs

    f = tmp_path / "a.txt"
    f.write_bytes(b"\xef\xbb\xbfhello world")
    assert _read_inputs([str(f)]) == ["hello world"]


# ---- XHTML with an XML declaration -----------------------------------------------------------------
PAGE = ('<html xmlns="http://www.w3.org/1999/xhtml"><head><title>t</title></head><body><article>'
        "<h1>Heading</h1><p>A paragraph long enough to be the main content, &amp; some entities &lt;ok&gt;.</p>"
        "<pre><code>def f():\n\n    return 1 &lt; 2</code></pre></article></body></html>")


@pytest.mark.parametrize("decl", ['<?xml version="1.0" encoding="utf-8"?>\n',
                                  "\ufeff<?xml version='1.0' encoding='UTF-8' standalone='no'?>",
                                  '<?xml version="1.0"?>'])
def test_an_xml_declaration_does_not_empty_the_page(decl):
    plain = extract_html(PAGE)
    assert "A paragraph long enough" in plain and "return 1 < 2" in plain
    assert extract_html(decl + PAGE) == plain


def test_an_xhtml_file_through_the_reader(tmp_path):
    f = tmp_path / "p.xhtml"
    f.write_text('<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE html>\n' + PAGE, encoding="utf-8")
    assert _read(f) == [extract_html(PAGE)]


# ---- JSONL records ---------------------------------------------------------------------------------
def test_null_text_next_to_html_is_extracted(tmp_path):
    html = "<html><body><p>the page's own words</p></body></html>"
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"text": None, "html": html}) + "\n" + json.dumps({"html": html}) + "\n")
    assert _read(f) == [extract_html(html)] * 2


@pytest.mark.parametrize("row", [{"text": None}, {"text": 5, "html": "<p>x</p>"}, {"text": ["a"]},
                                 {"content": "another field name"}, {"text": None, "html": None}])
def test_records_without_a_text_string_are_one_line(tmp_path, row):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(HerdError, match=r"x\.jsonl: byte 17: not a JSON object with a \"text\""):
        _read(f)


def test_corrupt_deflate_data_in_gzip_is_one_line(tmp_path, capsys):
    data = bytearray(gzip.compress("".join(json.dumps({"text": f"doc {i} " + "word " * 40}) + "\n"
                                           for i in range(500)).encode()))
    for i in range(200, 260):  # the header is intact: gzip opens it, zlib fails mid-stream
        data[i] ^= 0x5A
    d = tmp_path / "in"
    d.mkdir()
    (d / "x.jsonl.gz").write_bytes(bytes(data))
    with pytest.raises(HerdError, match="x.jsonl.gz: cannot read"):
        _read(d / "x.jsonl.gz")
    code, err = _run(capsys, tmp_path, d, tmp_path / "out")
    assert code == 2 and err[-1].startswith("herd: error: ") and "x.jsonl.gz: cannot read" in err[-1], err


# ---- URL de-dup ------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://a.example:abc/p", "http://a.example:99999/p", "https://a.example:-1/"])
def test_a_url_with_a_bad_port_is_its_own_key(url):
    assert normalize_url(url) == url  # no exception: the string itself is the key
    other = url.replace("/p", "/q") if "/p" in url else url + "x"
    assert url_duplicates([("a", url, ""), ("b", url, ""), ("c", other, "")]) == {"b": "a"}


def test_a_bad_port_in_a_run_is_no_traceback(tmp_path, capsys):
    rows = [{"text": " ".join(random.Random(i).choices(WORDS, k=60)), "url": u}
            for i, u in enumerate(["http://x.example:abc/", "http://x.example:abc/", "http://y.example/"])]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = _run(capsys, tmp_path, inp, tmp_path / "out", "--minhash.enabled=false")
    assert code == 0, err
    gone = [json.loads(line) for line in (tmp_path / "out" / "removed.jsonl").read_text().splitlines()]
    assert [(g["id"], g["stage"]) for g in gone] == [("00000:0000001", "url_dedup")]


# ---- MinHash on documents without words --------------------------------------------------------------
WORDLESS = ["😀🎉🔥 ✨💯 🙏", "∑∫∂ ≤ ≥ ∞ √ ≠", "→ ← ↑ ↓ ⇒ ⇐", "!!! ??? ... ---", "🙏 ✨ 💯"]


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


@pytest.mark.parametrize("ngram", [1, 3, 5])
def test_documents_without_words_are_near_duplicates_only_when_they_are(ngram):
    texts = WORDLESS + [WORDLESS[0], WORDLESS[1] + " "]  # two exact copies (whitespace aside)
    ids = [f"d{i}" for i in range(len(texts))]
    sigs = [minhash_signature(t, ngram, 128, 1) for t in texts]
    import numpy as np

    removed = minhash_duplicates(ids, np.stack(sigs), 0.8, 1)
    sets = [shingles(t, ngram) for t in texts]
    assert all(sets), "every non-blank text has a shingle"
    # the reference: exact Jaccard similarity of the shingle sets, against the earlier documents
    expected = {}
    for j in range(len(texts)):
        earlier = [i for i in range(j) if ids[i] not in expected and _jaccard(sets[i], sets[j]) >= 0.8]
        if earlier:
            expected[ids[j]] = ids[earlier[0]]
    assert removed == expected == {"d5": "d0", "d6": "d1"}


# ---- output paths ----------------------------------------------------------------------------------
def test_a_tilde_in_run_out_is_the_home_directory(tmp_path, capsys, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"text": " ".join(WORDS * 3)}) + "\n")
    code, err = _run(capsys, tmp_path, inp, "~/corpus")
    assert code == 0, err
    assert (home / "corpus" / "manifest.json").is_file()
    assert list(cwd.iterdir()) == []  # no folder literally named "~"


@pytest.mark.parametrize("out", ["", "/"])
def test_an_output_path_without_a_name_is_one_line(tmp_path, capsys, out):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"text": "words here"}) + "\n")
    code, err = _run(capsys, tmp_path, inp, out)
    assert code == 2 and len(err) == 1 and err[0].startswith("herd: error: run.out"), err


# ---- read.min_chars counts non-space characters ---------------------------------------------------------
def test_min_chars_counts_non_space_characters(tmp_path, capsys):
    texts = ["a      b", "abc", "a b c", "\u3000x\u00a0\u2003y ", "ab\n\n\n\n\n\n", "abcd efgh"]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    code, err = _run(capsys, tmp_path, inp, tmp_path / "out", "--read.min_chars=3", "--minhash.enabled=false",
                     "--line_dedup.enabled=false")
    assert code == 0, err
    kept = [json.loads(x)["text"] for x in (tmp_path / "out" / "documents.jsonl").read_text().splitlines()]
    # the reference: str.isspace, character by character
    assert kept == [t for t in texts if sum(not c.isspace() for c in t) >= 3] == ["abc", "a b c", "abcd efgh"]


def test_a_lone_surrogate_in_an_html_record_loses_nothing_after_it(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"html": "<html><body><p>before \\ud800 after \\ud83d\\ude00 end</p></body></html>"}\n')
    assert _read(f) == [extract_html("<html><body><p>before \ufffd after 😀 end</p></body></html>")]
    assert _read(f)[0].endswith("end")


def test_a_negative_workers_option_is_one_line(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"text": "words here"}) + "\n")
    code, err = _run(capsys, tmp_path, inp, tmp_path / "out", "--workers", "-2")
    assert code == 2 and len(err) == 1 and err[0].startswith("herd: error: --workers"), err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.work").exists()


def test_pre_blocks_differing_only_in_whitespace_keep_their_own_layout():
    blocks = ["if x:\n    y()\n\nz()", "if x:\n  y()\nz()", "if  x:\n\ty()\n\n\nz()"]
    page = ("<html><body><article><p>Three layouts of the same code, each to be kept as written.</p>"
            + "".join(f"<p>Layout {i}:</p><pre><code>{b}</code></pre>" for i, b in enumerate(blocks))
            + "</article></body></html>")
    text = extract_html(page)
    fenced = re.findall(r"^```\n(.*?)\n```$", text, re.S | re.M)
    assert fenced == blocks, text


class _PreText(HTMLParser):
    """The reference for what a browser shows inside each <pre>: Python's html.parser, its
    character references decoded, <br> a line break, every other tag no text of its own."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.depth = 0

    def handle_starttag(self, tag, attrs):
        if tag == "pre":
            self.depth += 1
            self.blocks.append("")
        elif tag == "br" and self.depth:
            self.blocks[-1] += "\n"

    def handle_endtag(self, tag):
        if tag == "pre":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.blocks[-1] += data


@pytest.mark.parametrize("inner", [
    "x = 1<br>y = 2<br/>print(x &lt; y)",
    "<code><span class=k>def</span> f():\n    <b>return</b> 1</code>",
    '<code>see <a href="https://docs.python.org">os.path</a>.join(a,\n    <i>b</i>)</code>',
    "<span>for</span> i <em>in</em> range(3):<br>    <strong>pass</strong>",
])
def test_markup_inside_pre_keeps_the_code_whole(inner):
    page = ("<html><body><article><p>Some code follows here in this article body text.</p>"
            f"<pre>{inner}</pre><p>And the paragraph after the code.</p></article></body></html>")
    ref = _PreText()
    ref.feed(page)
    (want,) = ref.blocks
    text = extract_html(page)
    assert re.findall(r"^```\n(.*?)\n```$", text, re.S | re.M) == [want], text
    assert text.endswith("And the paragraph after the code.")


def test_text_key_reads_another_field_like_datatrove(tmp_path, capsys):
    rows = [{"content": f"document {i}: " + " ".join(random.Random(i).choices(WORDS, k=40)), "id": f"r{i}"}
            for i in range(4)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = _run(capsys, tmp_path, inp, tmp_path / "default")
    assert code == 2 and "in.jsonl: byte 0: not a JSON object with a \"text\"" in err[-1] and "'content'" in err[-1]
    code, err = _run(capsys, tmp_path, inp, tmp_path / "out", "--input.text_key=content", "--minhash.enabled=false")
    assert code == 0, err
    kept = [json.loads(x) for x in (tmp_path / "out" / "documents.jsonl").read_text().splitlines()]
    # the reference: datatrove's JsonlReader with text_key="content" reads the same texts
    from datatrove.pipeline.readers import JsonlReader

    ref = [d.text for d in JsonlReader(str(tmp_path), glob_pattern="in.jsonl", text_key="content").run()]
    assert [k["text"] for k in kept] == ref == [r["content"] for r in rows]
    assert [k["name"] for k in kept] == [r["id"] for r in rows]


def test_null_ids_and_names_name_nothing(tmp_path):
    from herd.data.readers import RawDoc

    rows = [{"text": "a", "id": None, "name": "n1"}, {"text": "b", "id": None}, {"text": "c", "id": 0, "name": "x"},
            {"text": "d", "name": None}]
    f = tmp_path / "x.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = [d for u in plan_units(str(f)) for d in read_unit(u)]
    assert all(isinstance(d, RawDoc) for d in got)
    assert [d.name for d in got] == ["n1", "", "0", ""]


# ---- what a bad JSONL record is called ---------------------------------------------------------------
@pytest.mark.parametrize("raw, col", [(b'{"text": "caf\xe9"}\n', 14), (b'{"text": "\xff"}\n', 11)])
def test_a_non_utf8_record_says_so_not_invalid_json(tmp_path, capsys, raw, col):
    """Latin-1 bytes in a JSONL record were "not valid JSON (a truncated or corrupt file?)"."""
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"text": "fine"}\n' + raw)
    with pytest.raises(UnicodeDecodeError) as ref:  # the reference: Python's own UTF-8 decoder
        raw.decode("utf-8")
    assert ref.value.start + 1 == col
    with pytest.raises(HerdError, match=rf"x\.jsonl: byte 17: not UTF-8 text \(byte 0x{raw[col - 1]:02x} at "
                                        rf"column {col}\)"):
        _read(f)
    code, err = _run(capsys, tmp_path, f, tmp_path / "out")
    assert code == 2 and len(err) == 1 and "not UTF-8 text" in err[0], err


@pytest.mark.parametrize("value, kind", [(5, "int"), (["a"], "list"), ({"a": 1}, "dict"), (True, "bool")])
def test_a_text_field_of_another_type_is_named(tmp_path, value, kind):
    """"(it has 'text'; another field is [[input]] text_key)" for {"text": 5} pointed at the wrong fix."""
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"text": value}) + "\n")
    with pytest.raises(HerdError, match=rf'byte 0: not a JSON object with a "text" .*\(its "text" is {kind}\)$'):
        _read(f)
