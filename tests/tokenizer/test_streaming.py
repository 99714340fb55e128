"""IncrementalDecoder: streamed pieces join to exactly `decode(all_ids)` and never show a half
character."""

from __future__ import annotations

import random

import pytest

from herd.tokenizer import IncrementalDecoder

STREAMS = [
    "👨‍👩‍👧‍👦🏳️‍🌈🇯🇵 🤦🏼‍♂️❤️‍🔥 " * 8,
    "中文字符测试：ＬＬａＭＡ４发布了三个模型，都基于ＭｏＥ架构。𠀋𡈽𤭢 " * 6,
    "mixed: ü é ñ ß — “quotes” ⟨math⟩ ∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ",
]


def _stream(tok, ids):
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


@pytest.mark.parametrize("name", ["llama3", "llama4", "smollm2"])
def test_stream_equals_decode(request, name, corpus):
    tok = request.getfixturevalue(name)
    for text in [*STREAMS, corpus["zh"], corpus["emoji"], corpus["multilingual"]]:
        ids = tok.encode(text)
        pieces, tail = _stream(tok, ids)
        assert "".join(pieces) + tail == tok.decode(ids) == text
        assert tail == ""
        assert not any("\ufffd" in p for p in pieces)  # full decode has none, so no piece may either
    # Multi-byte characters really are split across tokens in these streams (else nothing is tested).
    assert any(p == "" for p in _stream(tok, tok.encode(STREAMS[0]))[0])


@pytest.mark.parametrize("name", ["llama3", "smollm2"])
def test_invalid_bytes_match_decode(request, name):
    # Random ids make invalid UTF-8; the replacement characters must match a one-shot decode.
    tok = request.getfixturevalue(name)
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(12)]
        pieces, tail = _stream(tok, ids)
        assert "".join(pieces) + tail == tok.decode(ids)


def test_truncated_character_is_flushed(llama3):
    ids = llama3.encode("😀")
    assert len(ids) > 1  # one emoji, several byte tokens
    dec = IncrementalDecoder(llama3)
    assert dec.push(ids[0]) == ""
    assert dec.flush() == "\ufffd" == llama3.decode(ids[:1])
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "😀"  # reusable after flush
