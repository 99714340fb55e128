"""Export round trips: HF files read back by transformers, GGUF files read back by us, Meta's
tokenizer.model read back by tiktoken — each with identical ids."""

from __future__ import annotations

import json

import gguf
import pytest

from herd.tokenizer import HFTokenizer, TemplateChatFormat, TiktokenTokenizer, load_tokenizer

from .test_chat_meta import DIALOGS

transformers = pytest.importorskip("transformers")

def _template_friendly(dialog):
    """The dialog with string content and dict arguments for builtin tools: what a chat template can
    reproduce exactly (see the note above `_META_TEMPLATE` in herd/tokenizer/chat.py)."""
    out = []
    for m in dialog:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p["text"] for p in m["content"])
        calls = []
        for c in m.get("tool_calls") or []:
            fn = dict(c["function"])
            if fn["name"] in ("brave_search", "wolfram_alpha") and isinstance(fn["arguments"], str):
                fn["arguments"] = json.loads(fn["arguments"])
            calls.append({**c, "function": fn})
        if calls:
            m["tool_calls"] = calls
        out.append(m)
    return out


PLAIN_DIALOGS = {k: _template_friendly(DIALOGS[k]) for k in ("user_only", "system_multi_turn", "builtin_search",
                                                             "code_interpreter", "custom_tool")}


def _template_ids(hf, dialog, add_generation_prompt=True):
    out = hf.apply_chat_template(dialog, add_generation_prompt=add_generation_prompt, tokenize=True)
    return out if isinstance(out, list) else out["input_ids"]


def write_tokenizer_gguf(tok, path):
    """A GGUF holding only the tokenizer fields (and general.architecture)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    tok.write_gguf(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def llama3_hf(llama3, tmp_path_factory):
    directory = llama3.save(tmp_path_factory.mktemp("llama3_hf"), "hf")
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def test_llama3_hf_export_loads_in_transformers(llama3, llama3_hf, corpus):
    assert (llama3_hf.bos_token_id, llama3_hf.eos_token_id, llama3_hf.pad_token_id) == (
        llama3.bos_id, llama3.eos_id, llama3.pad_id)
    assert len(llama3_hf) == llama3.vocab_size
    for name, text in corpus.items():
        # Like Meta's own HF release, the exported tokenizer adds BOS by default.
        assert llama3_hf.encode(text) == llama3.encode(text, bos=True, allow_special=True), name
        assert llama3_hf(text, split_special_tokens=True)["input_ids"] == llama3.encode(text, bos=True), name
        ids = llama3.encode(text)
        assert llama3_hf.decode(ids) == llama3.decode(ids), name


@pytest.mark.parametrize("name", list(PLAIN_DIALOGS))
def test_llama3_exported_chat_template_matches_chat_format(llama3, llama3_hf, name):
    for agp in (True, False):
        assert _template_ids(llama3_hf, PLAIN_DIALOGS[name], agp) == llama3.chat.encode_dialog(
            PLAIN_DIALOGS[name], add_generation_prompt=agp)


def test_llama4_hf_backend_matches_tiktoken(llama4, corpus):
    backend = llama4.hf_backend  # what save("hf") writes for Llama 4 (o200k split, derived merges)
    for name, text in corpus.items():
        assert backend.encode(text, add_special_tokens=False).ids == llama4.encode(text, allow_special=True), name


def test_llama4_chat_template_matches_chat_format(llama4):
    fmt = TemplateChatFormat(llama4, llama4._chat_template())
    for name, dialog in PLAIN_DIALOGS.items():
        assert fmt.encode_dialog(dialog) == llama4.chat.encode_dialog(dialog), name


def test_meta_layout_round_trip(llama3, tmp_path, corpus):
    llama3.save(tmp_path, "meta")
    back = load_tokenizer(tmp_path)
    assert isinstance(back, TiktokenTokenizer) and back.ranks == llama3.ranks
    assert back.special_tokens == llama3.special_tokens
    assert back.encode(corpus["zh"]) == llama3.encode(corpus["zh"])


def test_llama3_gguf_round_trip(llama3, tmp_path, corpus):
    path = write_tokenizer_gguf(llama3, tmp_path / "llama3-tokenizer.gguf")
    back = load_tokenizer(path)
    assert isinstance(back, HFTokenizer) and back.vocab_size == llama3.vocab_size
    assert (back.bos_id, back.eos_id, back.pad_id, back.add_bos) == (llama3.bos_id, llama3.eos_id, llama3.pad_id, True)
    assert back.stop_ids == llama3.stop_ids
    for name, text in corpus.items():
        assert back.encode(text) == llama3.encode(text), name
        assert back.encode(text, allow_special=True) == llama3.encode(text, allow_special=True), name
        assert back.decode(llama3.encode(text)) == text
    for name, dialog in PLAIN_DIALOGS.items():
        assert back.chat.encode_dialog(dialog) == llama3.chat.encode_dialog(dialog), name


def test_smollm2_hf_export_loads_in_transformers(smollm2, tmp_path, corpus):
    smollm2.save(tmp_path, "hf")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id)
    for name, text in corpus.items():
        assert hf.encode(text) == smollm2.encode(text, allow_special=True), name
    for dialog in (PLAIN_DIALOGS["user_only"], PLAIN_DIALOGS["system_multi_turn"]):  # ChatML has no tool calls
        assert _template_ids(hf, dialog) == smollm2.chat.encode_dialog(dialog)
    again = load_tokenizer(tmp_path)
    assert again.encode(corpus["whitespace_digits"]) == smollm2.encode(corpus["whitespace_digits"])


def test_smollm2_gguf_round_trip(smollm2, tmp_path, corpus):
    path = write_tokenizer_gguf(smollm2, tmp_path / "smollm2-tokenizer.gguf")
    back = load_tokenizer(path)
    assert (back.vocab_size, back.bos_id, back.eos_id, back.pad_id, back.add_bos) == (
        smollm2.vocab_size, smollm2.bos_id, smollm2.eos_id, smollm2.pad_id, smollm2.add_bos)
    assert back.stop_ids == smollm2.stop_ids and back.chat_template == smollm2.chat_template
    for name, text in corpus.items():
        assert back.encode(text) == smollm2.encode(text), name
        assert back.encode(text, allow_special=True) == smollm2.encode(text, allow_special=True), name
    dialog = PLAIN_DIALOGS["system_multi_turn"]
    assert back.chat.encode_dialog(dialog) == smollm2.chat.encode_dialog(dialog)
