"""`herd tokenizer train` on bad or surprising input: one `herd: error:` line and exit status 2, or
the documented handling (lone surrogates → U+FFFD, a pipeline output → its kept documents only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from herd.cli import main
from herd.data import builtin
from herd.errors import HerdError
from herd.tokenizer import TiktokenTokenizer
from herd.tokenizer.train import MAX_VOCAB, MIN_VOCAB, check_train_options, train_bpe

VOCAB = 1000


def _cli(capsys, *argv):
    code = main(["tokenizer", "train", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("herd: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def corpus(tmp_path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20, encoding="utf-8")
    return d


def _train_info(out: Path) -> dict:
    return json.loads((out / "train_info.json").read_text())


def test_lone_surrogate_in_jsonl_becomes_replacement_character(tmp_path, capsys):
    d = tmp_path / "s"
    d.mkdir()
    # JSON may escape a lone UTF-16 surrogate; repeated so the trainer merges its U+FFFD bytes
    (d / "a.jsonl").write_text('{"text":"lone ' + "\\ud800" * 30 + ' surrogate text here"}\n'
                               '{"text":"another document"}\n', encoding="ascii")
    code, _, err = _cli(capsys, str(d), "--vocab-size", str(VOCAB), "--out", str(tmp_path / "tk"),
                        "--held-out", "0", "--min-frequency", "1")
    assert code == 0, err
    assert _train_info(tmp_path / "tk")["train_documents"] == 2
    # the surrogates were trained on as U+FFFD (EF BF BD), not dropped
    assert "\ufffd".encode() in TiktokenTokenizer(tmp_path / "tk" / "tokenizer.model").ranks


def test_library_replaces_lone_surrogates_too(tmp_path):
    path = train_bpe(["\ud800" * 30 + " text", "more text"], VOCAB, tmp_path, min_frequency=1)
    assert "\ufffd".encode() in TiktokenTokenizer(path).ranks


@pytest.mark.parametrize("size", ["1000000000", "99999999999999999999999", str(MAX_VOCAB + 1)])
def test_vocab_size_too_large(tmp_path, capsys, corpus, size):
    line = _one_line_error(*_cli(capsys, str(corpus), "--vocab-size", size, "--out", str(tmp_path / "tk"))[::2])
    assert "too large" in line and f"{MAX_VOCAB:,}" in line
    assert not (tmp_path / "tk").exists()


def test_vocab_size_bounds_are_inclusive(tmp_path):
    check_train_options(MIN_VOCAB, tmp_path)
    check_train_options(MAX_VOCAB, tmp_path)
    with pytest.raises(HerdError, match="too large"):
        check_train_options(MAX_VOCAB + 1, tmp_path)
    with pytest.raises(HerdError, match="too large"):
        train_bpe(["some text"], MAX_VOCAB + 1, tmp_path)


@pytest.mark.parametrize("freq", ["-1", str(2**64), "99999999999999999999999"])
def test_min_frequency_out_of_range(tmp_path, capsys, corpus, freq):
    line = _one_line_error(*_cli(capsys, str(corpus), "--vocab-size", str(VOCAB), "--min-frequency", freq,
                                 "--out", str(tmp_path / "tk"))[::2])
    assert "min frequency" in line and freq in line
    assert not (tmp_path / "tk").exists()


def test_min_frequency_zero_is_accepted_and_means_one(tmp_path):
    # HF's BpeTrainer merges pairs seen at least min_frequency times: 0 and 1 both take every pair
    texts = ["abab cdcd abab xyz", "hello world hello"]
    r0 = TiktokenTokenizer(train_bpe(texts, VOCAB, tmp_path / "f0", min_frequency=0)).ranks
    r1 = TiktokenTokenizer(train_bpe(texts, VOCAB, tmp_path / "f1", min_frequency=1)).ranks
    r2 = TiktokenTokenizer(train_bpe(texts, VOCAB, tmp_path / "f2", min_frequency=2)).ranks
    assert r0 == r1 and len(r1) > len(r2)


def test_out_is_an_existing_file(tmp_path, capsys, corpus):
    out = tmp_path / "precious.txt"
    out.write_text("keep me")
    line = _one_line_error(*_cli(capsys, str(corpus), "--vocab-size", str(VOCAB), "--out", str(out))[::2])
    assert "not a directory" in line and str(out) in line
    line = _one_line_error(*_cli(capsys, str(corpus), "--vocab-size", str(VOCAB), "--out", str(out / "sub"))[::2])
    assert "not a directory" in line
    assert out.read_text() == "keep me"


def test_binary_txt_is_refused(tmp_path, capsys):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "x.txt").write_bytes(bytes(range(256)) * 8)  # 0x80.. is not valid UTF-8
    line = _one_line_error(*_cli(capsys, str(d), "--vocab-size", str(VOCAB), "--out", str(tmp_path / "tk"))[::2])
    assert "not UTF-8 text" in line and str(d / "x.txt") in line
    assert not (tmp_path / "tk").exists()


def test_invalid_utf8_in_jsonl_is_refused(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    line = _one_line_error(*_cli(capsys, str(tmp_path / "a.jsonl"), "--vocab-size", str(VOCAB),
                                 "--out", str(tmp_path / "tk"))[::2])
    assert str(tmp_path / "a.jsonl") in line


def _pipeline_output(tmp_path: Path, out: Path, write_documents: bool = True) -> dict:
    """A real `herd data run` output: 8 code documents plus one the repetition filter removes."""
    docs = [d.text for d in builtin.code_documents(limit=8)] + ["spam spam spam " * 200]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (tmp_path / "c.toml").write_text(
        f'[[input]]\npath = "{tmp_path / "in.jsonl"}"\n\n[run]\nout = "{out}"\ntokenizer = "bytes"\n'
        f"write_documents = {'true' if write_documents else 'false'}\n")
    assert main(["data", "run", str(tmp_path / "c.toml")]) == 0
    return json.loads((out / "manifest.json").read_text())


def test_pipeline_output_dir_trains_on_kept_documents_only(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    manifest = _pipeline_output(tmp_path, corpus / "out")
    kept = manifest["output"]["documents"]
    assert (corpus / "out" / "removed.jsonl").read_text().strip()  # something was removed
    assert kept < 9
    capsys.readouterr()

    code, _, err = _cli(capsys, str(corpus / "out"), "--vocab-size", str(VOCAB), "--out", str(tmp_path / "tk"),
                        "--held-out", "0")
    assert code == 0, err
    assert "kept documents" in err and "documents.jsonl" in err
    assert _train_info(tmp_path / "tk")["train_documents"] == kept

    # found inside a larger directory too; the hidden folder (a pipeline's .NAME.work, say) is skipped
    (corpus / "notes.txt").write_text("a plain note\n")
    (corpus / ".hidden").mkdir()
    (corpus / ".hidden" / "junk.txt").write_text("not input\n")
    code, _, err = _cli(capsys, str(corpus), "--vocab-size", str(VOCAB), "--out", str(tmp_path / "tk2"),
                        "--held-out", "0")
    assert code == 0, err
    assert _train_info(tmp_path / "tk2")["train_documents"] == kept + 1


def test_pipeline_output_without_documents_is_an_error(tmp_path, capsys):
    _pipeline_output(tmp_path, tmp_path / "out", write_documents=False)
    assert not (tmp_path / "out" / "documents.jsonl").exists()
    capsys.readouterr()
    line = _one_line_error(*_cli(capsys, str(tmp_path / "out"), "--vocab-size", str(VOCAB),
                                 "--out", str(tmp_path / "tk"))[::2])
    assert "documents.jsonl" in line and "write_documents" in line
    assert not (tmp_path / "tk").exists()


def test_a_foreign_manifest_json_is_an_ordinary_directory(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text('{"source": "someone else"}')
    (tmp_path / "a.txt").write_text("plain text " * 20)
    code, _, err = _cli(capsys, str(tmp_path), "--vocab-size", str(VOCAB), "--out", str(tmp_path / "tk"),
                        "--held-out", "0")
    assert code == 0, err
    assert _train_info(tmp_path / "tk")["train_documents"] == 1


def test_an_empty_corpus_is_one_line(tmp_path, capsys):
    # no "training a byte-level BPE ..." line first: nothing was trained
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.jsonl").write_text('{"text": ""}\n')
    code, _, err = _cli(capsys, str(tmp_path / "empty"), "--vocab-size", str(VOCAB), "--out", str(tmp_path / "t"))
    assert "empty training corpus" in _one_line_error(code, err)


@pytest.mark.parametrize("which", ["input", "out", "blank out"])
def test_an_empty_path_is_not_the_working_directory(tmp_path, capsys, corpus, monkeypatch, which):
    """`herd tokenizer train "" --out tok` trained on the working directory, and `--out ""` wrote
    tokenizer.model into it: Path("") is "."."""
    monkeypatch.chdir(corpus)  # a directory with text in it, so reading "." would succeed
    inputs = "" if which == "input" else str(corpus)
    out = {"input": str(tmp_path / "tok"), "out": "", "blank out": "  "}[which]
    line = _one_line_error(*_cli(capsys, inputs, "--vocab-size", str(VOCAB), "--out", out)[::2])
    assert "is empty; give a path" in line and ("--out" in line) == (which != "input")
    assert sorted(p.name for p in corpus.iterdir()) == ["a.txt"] and not (tmp_path / "tok").exists()
    with pytest.raises(HerdError, match="is empty"):  # the library refuses too
        if which == "input":
            from herd.tokenizer.train import _read_inputs
            _read_inputs([""])
        else:
            check_train_options(VOCAB, out)
