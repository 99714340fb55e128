"""SentencePiece BPE with byte fallback (Llama 2 / Mistral style), from an HF directory and a GGUF
"llama" vocabulary, against the real `sentencepiece` library and transformers.

The reference model is trained here with Llama 2's trainer settings (BPE, byte fallback, identity
normalization, no whitespace collapsing, split digits) on Python stdlib source and the Chinese notes.
Three forms of it are loaded with herd:
- "meta": a tokenizer.json as Meta publishes Llama 2's (normalizer Prepend("▁") + Replace(" ", "▁")),
  made from transformers' conversion of the model (its vocab and merges);
- "transformers": transformers' own conversion as saved (Metaspace pre-tokenizer, which differs from
  SentencePiece on text that starts with a space; herd reads it as-is and so matches transformers);
- "gguf": tokens, scores and types written as llama.cpp's convert_hf_to_gguf.py writes them.

The dummy prefix: SentencePiece encodes "Hello" as "▁Hello" and its decode drops that space again.
herd's `decode` does the same; `decode_bytes` (and so streaming) keeps every token's exact bytes, so
b"".join(decode_bytes([i]) for i in encode(text)) == (" " + text).encode() for non-empty text.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest

from herd.errors import HerdError
from herd.tokenizer import HFTokenizer, IncrementalDecoder, load_tokenizer

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

DATA = Path(__file__).parent / "data"

TEXTS = [
    "Hello world",
    "",
    " ",
    "  ",
    " leading space",
    "trailing space ",
    "  two leading, three inner   and trailing  ",
    "\n",
    "line one\nline two\n\n\nline five\r\n",
    "\ttab\t\tinside\t",
    "digits 1234567890 3.14159 1,000,000 007",
    "def f(x):\n    return x ** 2  # comment\n",
    "Привет, мир! Ça va très bien, señor Müller?",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "emoji 😀👨‍👩‍👧‍👦 🇯🇵 ✈︎ and 🤦🏼‍♂️",
    "rare chars: ☃ ∮ ⅋ ᚠ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u0007 \u00a0 \u3000",
    "<s>looks like a control token</s>",
    "▁already ▁spelled",
    "x" * 300,
    " " * 40 + "y",
]


def _corpus() -> str:
    import argparse
    import collections
    import email.message
    import json as json_mod
    import textwrap

    text = "".join(inspect.getsource(m) for m in (argparse, collections, email.message, json_mod, textwrap))
    return text + (DATA / "zh_llama_notes.txt").read_text(encoding="utf-8") * 3


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text(_corpus(), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "m"), model_type="bpe", vocab_size=2000,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        add_dummy_prefix=True, max_sentence_length=100_000, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, num_threads=2)
    return d / "m.model"


@pytest.fixture(scope="session")
def sp(sp_model):
    return spm.SentencePieceProcessor(model_file=str(sp_model))


@pytest.fixture(scope="session")
def hf_dirs(sp_model, tmp_path_factory) -> dict[str, Path]:
    src = tmp_path_factory.mktemp("spm_src")
    shutil.copy(sp_model, src / "tokenizer.model")
    converted = transformers.LlamaTokenizer.from_pretrained(str(src), from_slow=True)
    tdir = tmp_path_factory.mktemp("spm_transformers")
    converted.save_pretrained(str(tdir))
    # Meta's Llama 2 tokenizer.json shape, with the same vocabulary and merges.
    mdir = tmp_path_factory.mktemp("spm_meta")
    spec = json.loads((tdir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    spec["pre_tokenizer"] = None
    spec["model"]["unk_token"] = "<unk>"
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    (mdir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (mdir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "add_eos_token": False, "tokenizer_class": "LlamaTokenizer", "legacy": True}), encoding="utf-8")
    return {"transformers": tdir, "meta": mdir}


@pytest.fixture(scope="session")
def gguf_path(sp, tmp_path_factory) -> Path:
    """As llama.cpp's convert_hf_to_gguf.py `_create_vocab_sentencepiece` + SpecialVocab write it."""
    path = tmp_path_factory.mktemp("spm_gguf") / "tok.gguf"
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 1)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def toks(hf_dirs, gguf_path) -> dict[str, HFTokenizer]:
    out = {name: load_tokenizer(d) for name, d in hf_dirs.items()}
    out["gguf"] = load_tokenizer(gguf_path)
    for t in out.values():
        assert isinstance(t, HFTokenizer) and t.spm and t.dummy_prefix
    return out


def _norm(text: str) -> str:
    """What SentencePiece's decode gives back: a literal "▁" in the text was read as a space."""
    return text.replace("▁", " ")


def _texts_all(corpus) -> list[str]:
    return TEXTS + list(corpus.values()) + [_corpus()[:20_000]]


@pytest.mark.parametrize("form", ["meta", "gguf"])
def test_encode_matches_sentencepiece(toks, sp, corpus, form):
    tok = toks[form]
    for text in _texts_all(corpus):
        assert tok.encode(text) == sp.encode(text), (form, text[:60])


def test_transformers_form_matches_transformers(toks, hf_dirs, sp, corpus):
    tok = toks["transformers"]
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_dirs["transformers"]))
    for text in _texts_all(corpus):
        # transformers matches special-token text as control tokens: herd's allow_special
        assert tok.encode(text, allow_special=True) == ref.encode(text, add_special_tokens=False), text[:60]
        ids = tok.encode(text)
        if not text.startswith((" ", "▁")):  # Metaspace "first" keeps SentencePiece's ids elsewhere
            assert ids == sp.encode(text), text[:60]


def test_gguf_matches_transformers_gguf_loader(toks, gguf_path, corpus):
    ref = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok = toks["gguf"]
    for text in _texts_all(corpus):
        if text.startswith((" ", "▁")) or "<s>" in text:
            continue  # transformers' Metaspace pre-tokenizer / special-token parsing differ there
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text[:60]
    assert tok.encode("Hello", bos=True) == ref.encode("Hello")  # both add BOS


@pytest.mark.parametrize("form", ["meta", "transformers", "gguf"])
def test_decode_matches_sentencepiece(toks, sp, corpus, form):
    tok = toks[form]
    for text in _texts_all(corpus):
        ids = sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids) == _norm(text), (form, text[:60])
        # control tokens take no text in SentencePiece; herd writes their names, and strips after them
        assert tok.decode([1, *ids, 2]) == "<s>" + sp.decode([1, *ids, 2]) + "</s>"
    # a byte piece for a space is not the dummy prefix: SentencePiece keeps it
    b = sp.piece_to_id("<0x20>")
    assert tok.decode([b, *sp.encode("x")]) == sp.decode([b, *sp.encode("x")]) == "  x"


@pytest.mark.parametrize("form", ["meta", "transformers", "gguf"])
def test_bytes_and_streaming(toks, sp, corpus, form):
    tok = toks[form]
    for text in _texts_all(corpus):
        ids = sp.encode(text)
        per_token = b"".join(tok.decode_bytes([i]) for i in ids)
        expect = ((" " + _norm(text)) if text else "").encode("utf-8")  # the dummy prefix kept
        assert per_token == tok.decode_bytes(ids) == expect, text[:60]
        dec = IncrementalDecoder(tok)
        streamed = "".join(dec.push(i) for i in ids) + dec.flush()
        assert streamed == per_token.decode("utf-8")
        # the full decode is the stream without the dummy-prefix space
        assert (" " + tok.decode(ids) if text else "") == streamed


def test_pieces_bytes_and_token_to_id(toks, sp):
    tok = toks["meta"]
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        got = tok.decode_bytes([i])
        if sp.is_byte(i):
            assert got == bytes([int(piece[3:5], 16)])
        elif sp.is_control(i) or sp.is_unknown(i):
            assert got == piece.encode()
        else:
            assert got == piece.replace("▁", " ").encode()
            assert tok.token_to_id(piece.replace("▁", " ")) == i
    assert tok.token_to_id("\n") == sp.piece_to_id("<0x0A>")
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2
    assert tok.token_to_id("no such piece at all") is None


@pytest.mark.parametrize("form", ["meta", "gguf"])
def test_special_tokens_and_bos(toks, sp, form):
    tok = toks[form]
    assert tok.add_bos and tok.bos_id == 1 and tok.eos_id == 2 and 2 in tok.stop_ids
    assert {"<s>": 1, "</s>": 2}.items() <= tok.special_tokens.items()
    assert tok.encode("Hi there", bos=True, eos=True) == [1, *sp.encode("Hi there"), 2]
    text = "<s>hi</s>"
    assert tok.encode(text) == sp.encode(text)  # special text is plain text by default
    assert tok.encode(text, allow_special=True)[0] == 1 and tok.encode(text, allow_special=True)[-1] == 2


def test_save_round_trip(toks, tmp_path, corpus):
    for name, tok in toks.items():
        out = tok.save(tmp_path / name)
        back = load_tokenizer(out)
        ref = transformers.AutoTokenizer.from_pretrained(str(out))
        assert back.spm and back.dummy_prefix and back.add_bos == tok.add_bos
        for text in _texts_all(corpus):
            ids = tok.encode(text)
            assert back.encode(text) == ids
            assert ref.encode(text, add_special_tokens=False) == tok.encode(text, allow_special=True)
            assert back.decode(ids) == tok.decode(ids)
            if name != "transformers" or not text.startswith((" ", "▁")):  # Metaspace: no dummy prefix there
                assert tok.decode(ids) == _norm(text)


def test_unsupported_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models

    for name, model in (("wordpiece", models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")),
                        ("unigram", models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0))):
        d = tmp_path / name
        d.mkdir()
        Tokenizer(model).save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text('{"eos_token": "a"}')
        with pytest.raises(HerdError) as e:
            load_tokenizer(d)
        assert "unsupported tokenizer" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("form", ["meta", "transformers", "gguf"])
def test_encode_continuation_has_no_dummy_prefix(toks, sp_model, corpus, form):
    """For llguidance's forced text: ids whose bytes are exactly the text, as SentencePiece's own
    encode gives them with add_dummy_prefix off."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_model.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    ref = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    tok = toks[form]
    for text in _texts_all(corpus):
        ids = tok.encode_continuation(text)
        assert tok.decode_bytes(ids) == _norm(text).encode("utf-8"), text[:60]
        assert ids == ref.encode(text), text[:60]


def test_gguf_llama_without_scores_or_unknown_model(gguf_path):
    from herd.checkpoint.gguf import read_gguf_metadata

    meta = dict(read_gguf_metadata(gguf_path))
    with pytest.raises(HerdError, match="without tokenizer.ggml.scores"):
        HFTokenizer.from_gguf_metadata({k: v for k, v in meta.items() if k != "tokenizer.ggml.scores"})
    with pytest.raises(HerdError, match="'bert' is not supported"):
        HFTokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "bert"})


# ---- a Llama 2 style checkpoint end to end: herd.load, generate / stream, structured outputs --------

LLAMA2_CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + "
               "' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="session")
def llama2_dir(hf_dirs, sp, tmp_path_factory) -> Path:
    """A random Llama 2 shaped transformers checkpoint with the SentencePiece tokenizer beside it."""
    import torch

    d = tmp_path_factory.mktemp("llama2")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=64, intermediate_size=160,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(d))
    for f in hf_dirs["meta"].iterdir():
        shutil.copy(f, d / f.name)
    config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLAMA2_CHAT}), encoding="utf-8")
    return d


def test_llama2_checkpoint_generates_as_transformers(llama2_dir, sp):
    import torch

    import herd

    model, tok = herd.load(llama2_dir)
    assert tok.spm and tok.add_bos
    ref = transformers.LlamaForCausalLM.from_pretrained(str(llama2_dir)).eval()
    for prompt in ("def main():", "  two leading spaces", "中文 and ünïcödé"):
        ids = tok.encode(prompt, bos=True)
        assert ids == [sp.bos_id(), *sp.encode(prompt)]  # (transformers 5 differs before leading spaces)
        with torch.no_grad():
            want = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(ids):].tolist()
        text = herd.generate(model, tok, prompt, max_new_tokens=12)
        # the completion's text is its tokens' exact bytes, streamed or not (a first "▁x" piece keeps
        # its space, as vLLM returns a completion)
        assert text == tok.decode_continuation(want) == "".join(herd.stream(model, tok, prompt, max_new_tokens=12))
    # the chat template renders and the reply comes back as a message
    reply = herd.generate(model, tok, [{"role": "user", "content": "hi"}], max_new_tokens=4)
    assert isinstance(reply, str)


def test_structured_outputs_on_a_sentencepiece_vocabulary(toks):
    from herd.inference.structured import Matcher, ll_tokenizer, regex_grammar

    tok = toks["meta"]
    lt = ll_tokenizer(tok)
    for text in ("hello world", " x", "def f(a, b):\n    return a"):
        # forced text continues the output: no dummy-prefix space before it
        assert tok.decode_bytes(lt.tokenize_str(text)) == text.encode()
    # a regex-constrained greedy walk over a uniform distribution ends in a full match
    import re

    import torch

    m = Matcher(regex_grammar(r"[a-z]{3} [0-9]{2}"), tok, tok.vocab_size)
    out: list[int] = []
    while not m.done:
        allowed = m.allowed(tok.vocab_size)
        t = int(torch.nonzero(allowed)[0]) if len(out) % 2 else int(torch.nonzero(allowed)[-1])
        assert m.advance(t)
        out.append(t)
    text = tok.decode_bytes([t for t in out if t not in tok.stop_ids]).decode()
    assert re.fullmatch(r"[a-z]{3} [0-9]{2}", text), text


# Meta's Llama 2 chat template as its tokenizer_config.json ships it (meta-llama/Llama-2-7b-chat-hf)
# and Mistral's v0.1 one: herd's dialog ids must be transformers' apply_chat_template ids.
LLAMA2_OFFICIAL = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

DIALOGS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief.\nVery brief."}, {"role": "user", "content": "  Hi there  "},
     {"role": "assistant", "content": "Hello! 中文 🙂"}, {"role": "user", "content": "And\tnow?"}],
]


@pytest.mark.parametrize("template", [LLAMA2_OFFICIAL, MISTRAL_V01], ids=["llama2", "mistral"])
def test_llama2_and_mistral_chat_templates_are_transformers(llama2_dir, template, tmp_path):
    from herd.errors import HerdError as Err

    d = tmp_path / "chat"
    shutil.copytree(llama2_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}), encoding="utf-8")
    tok = load_tokenizer(d)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    for dialog in DIALOGS:
        if template == MISTRAL_V01 and dialog[0]["role"] == "system":
            with pytest.raises(Err, match="^chat template cannot render this dialog: .*roles must alternate"):
                tok.chat.encode_dialog(dialog)
            continue
        text = hf.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True)
        ids = tok.chat.encode_dialog(dialog, add_generation_prompt=True)
        # the template's text, encoded as transformers encodes a chat text (no second BOS)
        assert ids == hf(text, add_special_tokens=False).input_ids, dialog
    with pytest.raises(Err, match="Conversation roles must alternate"):
        tok.chat.encode_dialog([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("form", ["meta", "transformers", "gguf"])
def test_gguf_export_round_trip(toks, sp, corpus, tmp_path, form):
    """herd's GGUF export of a SentencePiece vocabulary (scores that imply its merge order, byte and
    unknown types, add_space_prefix) reads back to sentencepiece's ids, in herd and in transformers'
    GGUF loader (which builds its own tokenizer from the scores)."""
    from tests.tokenizer.test_export import write_tokenizer_gguf

    tok = toks[form]
    back = load_tokenizer(write_tokenizer_gguf(tok, tmp_path / "tok.gguf"))
    assert back.spm and back.dummy_prefix and back.add_bos == tok.add_bos
    assert (back.bos_id, back.eos_id, back.unk_id) == (1, 2, 0)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    for text in _texts_all(corpus):
        if form == "transformers" and text.startswith((" ", "▁")):
            continue  # that form has no dummy prefix there (see test_encode_matches_sentencepiece)
        assert back.encode(text) == sp.encode(text), text[:60]
        if not text.startswith((" ", "▁")) and "<s>" not in text:  # where transformers' GGUF loader agrees
            assert ref.encode(text, add_special_tokens=False) == sp.encode(text), text[:60]


def test_llama2_checkpoint_converts_to_gguf_and_back(llama2_dir, sp, tmp_path):
    """`herd convert --to gguf` of a Llama 2 shaped checkpoint: model and SentencePiece vocabulary in
    one file, which herd loads to the same greedy ids and transformers' GGUF loader to the same ids."""
    import torch

    import herd
    from herd.cli import main

    assert main(["convert", str(llama2_dir), str(tmp_path / "m.gguf"), "--to", "gguf"]) in (0, None)
    (m0, t0), (m1, t1) = herd.load(llama2_dir), herd.load(tmp_path / "m.gguf")
    prompt = "def f(x):\n    return"
    assert t1.encode(prompt, bos=True) == t0.encode(prompt, bos=True) == [sp.bos_id(), *sp.encode(prompt)]
    assert herd.generate(m1, t1, prompt, max_new_tokens=10) == herd.generate(m0, t0, prompt, max_new_tokens=10)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
    x = torch.tensor([t1.encode(prompt, bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(m1(x), ref(x).logits, rtol=1e-4, atol=1e-4)
