"""`herd tokenizer train` on inputs the other tests never used: a directory of gzip JSONL, .ndjson
and upper-case suffixes (read as each file alone is), and corpora of non-Latin scripts, emoji and a
single repeated character, whose trained file must load in tiktoken, round-trip exactly and encode
as HF's trainer does."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import random

import pytest

from herd.cli import main
from herd.tokenizer import load_tokenizer
from herd.tokenizer.bytelevel import LLAMA3_PATTERN, token_to_bytes
from herd.tokenizer.train import NUM_SPECIAL, _read_inputs, train_bpe, train_hf_bpe


def test_a_directory_contributes_what_its_files_give_alone(tmp_path, capsys):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    with gzip.open(d / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": f"gzip document {i} über"}) + "\n" for i in range(3)))
    (d / "B.TXT").write_text("upper-case suffix text\n", encoding="utf-8")
    (d / "c.ndjson").write_text(json.dumps({"text": "ndjson document"}) + "\n", encoding="utf-8")
    (d / "sub" / "d.rst").write_text("Title\n=====\n", encoding="utf-8")
    (d / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # not text: skipped, not an error
    files = ["B.TXT", "a.jsonl.gz", "c.ndjson", "sub/d.rst"]
    alone = [t for name in files for t in _read_inputs([str(d / name)])]
    assert len(alone) == 6
    assert _read_inputs([str(d)]) == alone
    code = main(["tokenizer", "train", str(d), "--vocab-size", "600", "--out", str(tmp_path / "tok"),
                 "--held-out", "0"])
    assert code == 0, capsys.readouterr().err
    info = json.loads((tmp_path / "tok" / "train_info.json").read_text())
    assert info["train_documents"] == 6 and info["train_characters"] == sum(map(len, alone))


SCRIPTS = ["日本語のテキストと中文文本", "हिन्दी पाठ में मात्राएँ", "نص عربي مع تشكيل", "ภาษาไทยไม่มีช่องว่าง",
           "👨‍👩‍👧 family 🏳️‍🌈 flag 1️⃣ keycap", "Ünïcödé\r\nCRLF\r\n\ttabs  and   spaces", "12345678 3.14159"]


@pytest.mark.parametrize("corpus, vocab, min_freq", [
    (SCRIPTS, 700, 1),
    (SCRIPTS * 3, 900, 2),
    (["a" * 300], 530, 2),  # one repeated character: merges of a-runs only
    (["😀" * 50 + " " + "é" * 50], 540, 1),
])
def test_trained_file_round_trips_and_encodes_as_hf(tmp_path, corpus, vocab, min_freq):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    with contextlib.redirect_stderr(io.StringIO()):
        path = train_bpe(corpus, vocab, tmp_path, min_frequency=min_freq)
    hf = train_hf_bpe(corpus, vocab - NUM_SPECIAL, min_frequency=min_freq)
    ranks = load_tiktoken_bpe(str(path))
    enc = tiktoken.Encoding("trained", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    ours = load_tokenizer(tmp_path)
    rng = random.Random(0)
    alphabet = "".join(corpus)
    probes = list(corpus) + ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60))) for _ in range(100)]
    probes += ["a" * 1000, "日本 हिन्दी 😀 ", "\r\n\r\n  \n", ""]
    for text in probes:
        ids = enc.encode(text)
        assert [ranks[token_to_bytes(t)] for t in hf.encode(text).tokens] == ids, text
        assert list(ours.encode(text)) == ids
        assert ours.decode(ids) == enc.decode(ids) == text
