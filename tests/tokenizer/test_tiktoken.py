"""Llama 3 / Llama 4 tiktoken tokenizers against Meta's reference `llama_models` Tokenizer."""

from __future__ import annotations

import pytest

from herd.errors import HerdError
from herd.tokenizer import TiktokenTokenizer, load_tokenizer
from herd.tokenizer.tiktoken_bpe import split_long_runs

FLAVORS = ["llama3", "llama4"]


@pytest.fixture(scope="module")
def pairs(llama3, llama4, ref_llama3, ref_llama4):
    return {"llama3": (llama3, ref_llama3), "llama4": (llama4, ref_llama4)}


@pytest.mark.parametrize("flavor", FLAVORS)
def test_special_tokens_and_ids_match_reference(pairs, flavor):
    ours, ref = pairs[flavor]
    assert ours.special_tokens == ref.special_tokens
    assert ours.vocab_size == ref.n_words == {"llama3": 128_256, "llama4": 202_048}[flavor]
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_id, ref.eos_id, ref.pad_id)
    assert ours.stop_ids == set(ref.stop_tokens)
    assert ours.pattern == (ref.pat_str if flavor == "llama3" else ref.O200K_PATTERN)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_encode_matches_reference_on_corpus(pairs, corpus, flavor):
    ours, ref = pairs[flavor]
    for name, text in corpus.items():
        for bos, eos in ((False, False), (True, True)):
            assert ours.encode(text, bos=bos, eos=eos) == ref.encode(text, bos=bos, eos=eos), name
        got = ours.encode(text)
        assert ours.decode(got) == ref.decode(got) == text, name
        assert ours.decode_bytes(got) == text.encode("utf-8")


@pytest.mark.parametrize("flavor", FLAVORS)
def test_special_text_is_plain_unless_allowed(pairs, corpus, flavor):
    ours, ref = pairs[flavor]
    text = corpus["special_text"]
    plain = ours.encode(text)
    assert plain == ref.encode(text, bos=False, eos=False)
    assert not set(plain) & set(ours.special_tokens.values())
    special = ours.encode(text, allow_special=True)
    assert special == ref.encode(text, bos=False, eos=False, allowed_special="all")
    assert ours.bos_id in special
    assert ours.decode(special) == text


@pytest.mark.parametrize("flavor", FLAVORS)
def test_very_long_input_matches_reference(pairs, long_text, flavor):
    # Exercises Meta's 400k-character chunks and its cuts of >25k whitespace / non-whitespace runs.
    ours, ref = pairs[flavor]
    ids = ours.encode(long_text)
    assert ids == ref.encode(long_text, bos=False, eos=False)
    assert ours.decode(ids) == long_text


def test_split_long_runs_matches_meta():
    from llama_models.llama3.tokenizer import Tokenizer

    for s in ["", "a", " " * 10, "ab  cd" * 3, "x" * 23 + " " * 11 + "y" * 7 + "\n" * 30, "\u3000" * 9 + "z" * 9]:
        assert list(split_long_runs(s, 5)) == list(Tokenizer._split_whitespaces_or_nonwhitespaces(s, 5)), s


def test_token_to_id(llama3, llama4):
    assert llama3.token_to_id("<|eot_id|>") == 128009
    assert llama4.token_to_id("<|eot|>") == 200008
    hello = llama3.encode(" hello")
    assert len(hello) == 1 and llama3.token_to_id(" hello") == hello[0]
    assert llama3.token_to_id("not a single token at all") is None


def test_load_by_path_and_directory(tmp_path, llama3, corpus):
    from herd.tokenizer.tiktoken_bpe import builtin_model_path

    path = builtin_model_path("llama3")
    by_path = load_tokenizer(str(path))
    assert isinstance(by_path, TiktokenTokenizer) and by_path.flavor == "llama3"
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").symlink_to(path)
    by_dir = load_tokenizer(tmp_path)
    assert by_dir.encode(corpus["en"]) == llama3.encode(corpus["en"])
    assert by_dir.chat is not None


def test_small_trained_model_gets_llama3_layout(tmp_path):
    # A tiktoken file of any size loads with Llama 3's special tokens after its last rank.
    import base64

    ranks = [bytes([b]) for b in range(256)] + [b"ab", b"abc", b" the"]
    lines = "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks))
    (tmp_path / "tokenizer.model").write_text(lines)
    tok = TiktokenTokenizer(tmp_path / "tokenizer.model")
    assert tok.flavor == "llama3" and tok.vocab_size == len(ranks) + 256
    assert tok.bos_id == len(ranks) and tok.token_to_id("<|eot_id|>") == len(ranks) + 9
    assert tok.encode("abc the", bos=True) == [tok.bos_id, 257, 258]


def test_malformed_model_file_is_herd_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(HerdError, match="tokenizer.model:2"):
        TiktokenTokenizer(bad)
    bad.write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(HerdError, match="ranks"):
        TiktokenTokenizer(bad)
