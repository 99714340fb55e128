"""Tokenizer training (issue 3 part 1, SPEC §2): a Llama 3 style BPE trained with HF `tokenizers`
and written as a tiktoken `tokenizer.model` with Llama 3's special tokens."""

from __future__ import annotations

import base64
import json

import pytest

from herd.data.shards import python_stdlib_files
from herd.errors import HerdError
from herd.tokenizer import Llama3ChatFormat, TiktokenTokenizer, load_tokenizer
from herd.tokenizer.bytelevel import token_to_bytes
from herd.tokenizer.tiktoken_bpe import _llama3_specials
from herd.tokenizer.train import (
    MIN_VOCAB,
    NUM_SPECIAL,
    compression_report,
    format_report,
    ranks_from_hf,
    split_held_out,
    train_bpe,
    train_hf_bpe,
)

VOCAB = 1000 + NUM_SPECIAL


def _texts(lo: int, hi: int) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in python_stdlib_files()[lo:hi]]


@pytest.fixture(scope="module")
def corpus():
    return _texts(0, 40), _texts(150, 175)  # train, held out (different modules)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    path = train_bpe(corpus[0], VOCAB, out)
    return path


def test_file_layout(trained):
    lines = trained.read_text().splitlines()
    assert len(lines) == VOCAB - NUM_SPECIAL
    ranks = [int(line.split()[1]) for line in lines]
    assert ranks == list(range(len(lines)))
    # all 256 bytes are the first ranks, so nothing is ever out of vocabulary
    assert [base64.b64decode(line.split()[0]) for line in lines[:256]] == [bytes([b]) for b in range(256)]
    info = json.loads((trained.parent / "train_info.json").read_text())
    assert info["vocab_size"] == VOCAB and info["special_tokens"] == "llama3"


def test_tiktoken_equals_hf_bpe(corpus, trained):
    """The rank-order conversion is exact: tiktoken on our file gives the trainer's own ids."""
    hf = train_hf_bpe(corpus[0], VOCAB - NUM_SPECIAL)  # deterministic: the same BPE again
    ranks = ranks_from_hf(hf)
    tok = TiktokenTokenizer(trained)
    assert tok.ranks == ranks
    hf_to_rank = {i: ranks[token_to_bytes(s)] for s, i in hf.get_vocab().items()}
    held = corpus[1] + ["Ünïcödé — 日本語のテキスト 🙂 and numbers 1234567 \r\n\t  spaces  "]
    for text in held:
        assert tok.encode(text) == [hf_to_rank[i] for i in hf.encode(text).ids]


def test_roundtrip_and_specials(trained):
    tok = load_tokenizer(trained.parent)
    assert isinstance(tok, TiktokenTokenizer) and tok.flavor == "llama3"
    n_bpe = VOCAB - NUM_SPECIAL
    assert tok.vocab_size == VOCAB
    names = _llama3_specials()
    assert [tok.special_tokens[n] for n in names] == list(range(n_bpe, n_bpe + 256))
    assert tok.bos_id == n_bpe and tok.special_tokens["<|eot_id|>"] == n_bpe + 9
    for s in ["", "def f(x):\n    return x ** 2\n", "Grüße, 世界! 🙂\x00\x7f", "<|begin_of_text|> literal"]:
        ids = tok.encode(s)
        assert all(i < n_bpe for i in ids)
        assert tok.decode(ids) == s
    raw = bytes(range(256)) * 2
    assert tok.decode_bytes([tok.ranks[bytes([b])] for b in raw]) == raw
    assert tok.encode("<|eot_id|>", allow_special=True) == [n_bpe + 9]


def test_chat_format(trained):
    tok = load_tokenizer(trained.parent)
    assert isinstance(tok.chat, Llama3ChatFormat)
    ids = tok.chat.encode_dialog([{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Who wrote Hamlet?"}])
    n_bpe = VOCAB - NUM_SPECIAL
    assert ids[0] == tok.bos_id
    assert ids.count(tok.special_tokens["<|start_header_id|>"]) == 3  # system, user, assistant prompt
    assert tok.eot_id in ids and tok.eot_id == n_bpe + 9
    assert "Who wrote Hamlet?" in tok.decode(ids)


def test_compression_report(corpus, trained):
    report = compression_report(trained.parent, corpus[1])
    assert report["ours"]["chars_per_token"] > 1.0
    assert report["ours"]["vocab_size"] == VOCAB
    assert report["llama3"]["vocab_size"] == 128_256
    # the real 128K tokenizer compresses better than our 1K one (paper §3.1: 3.94 chars/token on its mix)
    assert report["llama3"]["chars_per_token"] > report["ours"]["chars_per_token"]
    assert "chars/token" in format_report(report)


def test_bad_input(tmp_path):
    with pytest.raises(HerdError, match="too small"):
        train_bpe(["some text"], MIN_VOCAB - 1, tmp_path)
    with pytest.raises(HerdError, match="too small"):
        train_bpe(["some text"], 300, tmp_path)
    with pytest.raises(HerdError, match="empty training corpus"):
        train_bpe([], VOCAB, tmp_path)
    with pytest.raises(HerdError, match="empty training corpus"):
        train_bpe(["", ""], VOCAB, tmp_path)
    with pytest.raises(HerdError, match="must be str"):
        train_bpe([b"bytes"], VOCAB, tmp_path)
    with pytest.raises(HerdError, match="no held-out text"):
        compression_report("llama3", [])
    assert not (tmp_path / "tokenizer.model").exists()


def test_small_corpus_stops_early(tmp_path):
    path = train_bpe(["abab abab abab"] * 3, 5000, tmp_path)
    tok = TiktokenTokenizer(path)
    assert 256 < len(tok.ranks) < 5000 - NUM_SPECIAL
    assert tok.decode(tok.encode("abab cd")) == "abab cd"


def test_split_held_out():
    train, held = split_held_out([str(i) for i in range(20)], 0.1)
    assert len(held) == 2 and not set(train) & set(held)
    with pytest.raises(HerdError):
        split_held_out(["a"], 1.5)
