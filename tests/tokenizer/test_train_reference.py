"""A trained tokenizer against its references, on text it never saw in training: the BPE that HF
`tokenizers` itself trained (tiktoken's rank-ordered merging replays the trainer's merge list only
when ranks are in merge order), Meta's llama-models `Tokenizer` / `ChatFormat` reading the same file
(special-token layout, chat format), transformers on the HF export, and herd on the GGUF export.

Held-out texts stay under 25,000 characters per whitespace / non-whitespace run: past that, herd
cuts the run as Meta's reference does (`split_long_runs`, tested against llama-models elsewhere),
which HF's BPE never does, so there the two legitimately differ."""

from __future__ import annotations

import json
import random

import gguf
import pytest
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from herd.cli import main
from herd.data.readers import valid_unicode
from herd.data.shards import python_stdlib_files
from herd.errors import HerdError
from herd.tokenizer import TiktokenTokenizer, load_tokenizer
from herd.tokenizer import train as train_mod
from herd.tokenizer.bytelevel import token_to_bytes
from herd.tokenizer.tiktoken_bpe import split_long_runs
from herd.tokenizer.train import NUM_SPECIAL, ranks_from_hf, train_bpe, train_hf_bpe

from .conftest import DATA, EMOJI, ENGLISH, MULTILINGUAL, SPECIAL_TEXT, WHITESPACE_DIGITS
from .test_chat_meta import to_raw
from .test_unseen_inputs import TEXTS

transformers = pytest.importorskip("transformers")

SHAKESPEARE = [
    "Shall I compare thee to a Summers day?\nThou art more louely and more temperate:",
    "SHALL I COMPARE THEE TO A SUMMER'S DAY? THOU ART MORE LOVELY AND MORE TEMPERATE.",
    "  Ham. To be, or not to be, that is the Question:\r\n  Whether 'tis Nobler in the minde to suffer",
    "Enter Hamlet.\n\n   HAMLET. O, that this too too solid flesh would melt,\n\tThaw, and resolue it selfe into a dew!",
    "What's in a name? That which we call a rose / By any other word would smell as sweet -- ROMEO & IVLIET, II.ii",
    "I'LL, you'VE, they'Re, she'D, 'TIS, o'er, ne'er, 'twas, th'art",
]


def _train_texts() -> list[str]:
    zh = (DATA / "zh_llama_notes.txt").read_text(encoding="utf-8")
    code = [p.read_text(encoding="utf-8", errors="replace") for p in python_stdlib_files()[:12]]
    # NUL bytes, CRLF and a lone surrogate in training data: the trainer sees them as the pipeline does
    edge = ["nul\x00in\x00text\x00\x00 end", "windows\r\nlines\r\n\r\nhere\r\n", "lone \ud800 surrogate \udfff x"]
    return code + [zh[: len(zh) // 2]] + edge


def _unseen_texts() -> list[str]:
    zh = (DATA / "zh_llama_notes.txt").read_text(encoding="utf-8")
    rng = random.Random(7)
    latin1 = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 120))).decode("latin-1") for _ in range(60)]
    alphabet = [" ", "  ", "\n", "\r\n", "\t", "e", "th", "Th", "'s", "'LL", "0", "12", "345", ".", ",", "中文", "😀",
                "\u00a0", "\u3000", "\x00", "\x85", "\u2028", "é", "e\u0301", "ſ", "ﬁ", "<|eot_id|>", "def ", "self."]
    mixed = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 50))) for _ in range(300)]
    code = [p.read_text(encoding="utf-8", errors="replace")[:3000] for p in python_stdlib_files()[200:205]]
    return ([ENGLISH, MULTILINGUAL, EMOJI, WHITESPACE_DIGITS, SPECIAL_TEXT, zh[len(zh) // 2:], " " * 24_999 + "x",
             "9" * 1000, "1,234,567.89 0x1F 1e-10 ١٢٣ 一二三 ⅻ"] + SHAKESPEARE + TEXTS + latin1 + mixed + code)


@pytest.fixture(scope="module")
def unseen() -> list[str]:
    # no run past 25,000 characters (see the module docstring): herd would cut it, as Meta does
    return [t for t in _unseen_texts() if len(list(split_long_runs(t))) == 1]


@pytest.mark.parametrize("vocab_size,min_frequency", [(513, 2), (1001, 0), (1777, 1), (2222, 5)])
def test_trained_ids_equal_the_hf_trainers_bpe(tmp_path, unseen, vocab_size, min_frequency):
    texts = _train_texts()
    tok = TiktokenTokenizer(train_bpe(texts, vocab_size, tmp_path, min_frequency=min_frequency))
    # The trainer is deterministic: the same call again gives the BPE that was written out.
    hf = train_hf_bpe([valid_unicode(t) for t in texts], vocab_size - NUM_SPECIAL, min_frequency=min_frequency)
    assert len(tok.ranks) == hf.get_vocab_size() and tok.vocab_size == hf.get_vocab_size() + NUM_SPECIAL
    to_herd = {i: tok.ranks[token_to_bytes(s)] for s, i in hf.get_vocab().items()}
    for text in unseen:
        ids = tok.encode(text)
        # HF's Python binding refuses surrogates; tiktoken (and so Meta) reads them as `valid_unicode` does
        assert ids == [to_herd[i] for i in hf.encode(valid_unicode(text)).ids], repr(text[:60])
        assert tok.decode(ids) == valid_unicode(text), repr(text[:60])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    train_bpe(_train_texts(), 1234, out)  # not a multiple of anything in particular
    return out


DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Hamlet?\r\n"},
          {"role": "assistant", "content": "Shakespeare, c. 1600."}, {"role": "user", "content": "Und auf 日本語? 🙂"}]


def test_llama_models_reads_the_trained_file_as_herd_does(trained, unseen):
    tok = load_tokenizer(trained)
    meta = MetaTokenizer(trained / "tokenizer.model")
    n_bpe = 1234 - NUM_SPECIAL
    # Llama 3's specials right after the last rank: <|begin_of_text|> = n_bpe, <|eot_id|> = n_bpe + 9, ...
    assert tok.special_tokens == meta.special_tokens and tok.vocab_size == meta.n_words == 1234
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.eom_id, tok.pad_id) == (
        n_bpe, n_bpe + 1, n_bpe + 9, n_bpe + 8, n_bpe + 4) == (meta.bos_id, meta.eos_id, meta.eot_id, meta.eom_id,
                                                                meta.pad_id)
    assert tok.stop_ids == set(meta.stop_tokens)
    for text in unseen:
        assert tok.encode(text, bos=True) == meta.encode(text, bos=True, eos=False), repr(text[:60])
        assert tok.encode(text, allow_special=True) == meta.encode(text, bos=False, eos=False, allowed_special="all")
    ref = ChatFormat(meta)
    assert tok.chat.encode_dialog(DIALOG) == ref.encode_dialog_prompt(to_raw(DIALOG)).tokens


def test_trained_hf_export_in_transformers_and_gguf_round_trip(trained, tmp_path, unseen):
    tok = load_tokenizer(trained)
    hf = transformers.AutoTokenizer.from_pretrained(str(tok.save(tmp_path / "hf", "hf")))
    assert len(hf) == tok.vocab_size and (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
    writer = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    tok.write_gguf(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    back = load_tokenizer(tmp_path / "tok.gguf")
    assert (back.vocab_size, back.bos_id, back.stop_ids) == (tok.vocab_size, tok.bos_id, tok.stop_ids)
    for text in unseen:
        text = valid_unicode(text)
        ids = tok.encode(text, allow_special=True)
        assert hf.encode(text, add_special_tokens=False) == ids, repr(text[:60])
        assert hf.decode(tok.encode(text)) == text
        assert back.encode(text, allow_special=True) == ids and back.encode(text) == tok.encode(text), repr(text[:60])
    out = hf.apply_chat_template(DIALOG, add_generation_prompt=True, tokenize=True)
    assert (out if isinstance(out, list) else out["input_ids"]) == tok.chat.encode_dialog(DIALOG)
    assert back.chat.encode_dialog(DIALOG) == tok.chat.encode_dialog(DIALOG)


def test_cli_keeps_nul_and_crlf_and_equals_the_trainer(tmp_path, capsys):
    docs = ["a\r\nb\r\n\r\n" * 5 + "x\x00y\x00" * 4, "lone \ud800 here \r\n" * 3, "more\r\ntext\r\n" * 4]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")  # "\ud800" escaped
    assert main(["tokenizer", "train", str(path), "--vocab-size", "600", "--out", str(tmp_path / "tk"),
                 "--held-out", "0"]) == 0
    tok = TiktokenTokenizer(tmp_path / "tk" / "tokenizer.model")
    hf = train_hf_bpe([valid_unicode(d) for d in docs], 600 - NUM_SPECIAL)
    assert tok.ranks == ranks_from_hf(hf)
    assert b"\r\n" in tok.ranks and "\ufffd".encode() in tok.ranks  # CRLF kept, the lone surrogate U+FFFD


def test_surrogate_pairs_train_as_encode_reads_them(tmp_path):
    # A str holding "\ud83d\ude00" as two code units encodes as 😀 (tiktoken joins the pair); training
    # used to turn each half into U+FFFD, learning merges for text encode never produces.
    texts = ["\ud83d\ude00 ok \ud83d\ude00\ud83d\ude00 " * 10, "lone \ud800 " * 5]
    tok = TiktokenTokenizer(train_bpe(texts, 600, tmp_path, min_frequency=2))
    assert tok.ranks == ranks_from_hf(train_hf_bpe(["😀 ok 😀😀 " * 10, "lone \ufffd " * 5], 600 - NUM_SPECIAL))
    assert "😀".encode() in tok.ranks and "\ufffd\ufffd".encode() not in tok.ranks
    assert tok.encode(texts[0]) == tok.encode(valid_unicode(texts[0])) and len(tok.encode("\ud83d\ude00")) == 1


def test_running_out_of_pairs_says_so(tmp_path, capsys):
    """Fewer distinct pairs than the vocabulary asks: a smaller tokenizer and a note naming the cause."""
    (tmp_path / "a.txt").write_text("ab ab ab cd\n", encoding="utf-8")
    assert main(["tokenizer", "train", str(tmp_path / "a.txt"), "--vocab-size", "700", "--out", str(tmp_path / "tk")]) == 0
    err = capsys.readouterr().err
    info = json.loads((tmp_path / "tk" / "train_info.json").read_text())
    assert info["requested_vocab_size"] == 700 and info["vocab_size"] == load_tokenizer(tmp_path / "tk").vocab_size < 700
    assert f"vocabulary is {info['vocab_size']}, not the 700 asked" in err and "at least 2 times" in err
    assert "lower --min-frequency" in err


def test_stopping_at_llama4s_rank_count_is_an_error(tmp_path, monkeypatch):
    # 200,000 ranks would load as Llama 4's layout (2,048 specials, another split regex)
    monkeypatch.setattr(train_mod, "ranks_from_hf", lambda hf: {i.to_bytes(3, "big"): i for i in range(200_000)})
    with pytest.raises(HerdError, match="exactly 200,000 BPE tokens"):
        train_bpe(["some text"], 250_000, tmp_path)
    assert not (tmp_path / "tokenizer.model").exists()
