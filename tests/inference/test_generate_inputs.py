"""herd.generate / herd.stream on empty and odd prompts: an empty batch is an empty answer (as
vLLM's `LLM.generate([])` gives), and None, numbers, bytes, a bare message dict, an empty dialog or
text that encodes to nothing are one HerdError naming the prompt, never a TypeError from deep inside
or a misleading "empty prompt"."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.errors import HerdError
from herd.inference.generate import generate_batch, generate_ids
from herd.models.args import PRESETS
from herd.models.llama3 import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(PRESETS["debug"])
    m.init_weights(std=0.5)
    return m.eval()


class _Chat:
    def encode_dialog(self, messages, add_generation_prompt=True):
        return [1, *(2 + len(str(m.get("content", ""))) % 50 for m in messages), 3]


class _Tok:
    """Just enough tokenizer for herd.generate / herd.stream: bytes → ids, optionally a BOS."""
    stop_ids = {0}

    def __init__(self, bos: bool = True):
        self.bos_id = 1 if bos else None
        self.chat = _Chat()

    def encode(self, text, bos=True, eos=False, **_):
        return ([1] if bos else []) + [2 + b % 200 for b in text.encode()]

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)


def test_an_empty_batch_is_an_empty_answer(model):
    tok = _Tok()
    assert herd.generate(model, tok, [], max_new_tokens=3) == []
    assert herd.generate(model, tok, (), max_new_tokens=3) == []
    assert generate_batch(model, [], max_new_tokens=3) == []
    assert list(generate_ids(model, [], max_new_tokens=3)) == []
    # the arguments are still checked for an empty batch
    with pytest.raises(HerdError, match="max_new_tokens"):
        herd.generate(model, tok, [], max_new_tokens=0)
    with pytest.raises(HerdError, match="one entry per prompt"):
        herd.generate(model, tok, [], images=["a.png"])


@pytest.mark.parametrize("prompt, message", [
    (None, "^prompt is None; give text"),
    (5, "^prompt is int; give text"),
    (b"hello", "^prompt is bytes; decode it"),
    ({"role": "user", "content": "hi"}, "^prompt is a single message dict; a dialog is a list"),
    ([None], "^prompt 0 is None; give text"),
    (["a", 1], "^prompt 1 is int; give text"),
    (["a", []], "^prompt 1 is an empty dialog; give at least one message"),
    ([[{"role": "user", "content": "x"}, "oops"]], "^prompt 0: message 1 is str; a dialog is a list of message dicts"),
])
def test_odd_prompts_are_one_herd_error_naming_the_prompt(model, prompt, message):
    with pytest.raises(HerdError, match=message) as e:
        herd.generate(model, _Tok(), prompt, max_new_tokens=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("prompt, message", [
    (None, "^prompt is None"), (7, "^prompt is int"), ([], "^prompt is an empty dialog"),
])
def test_stream_names_an_odd_prompt_too(model, prompt, message):
    with pytest.raises(HerdError, match=message):
        list(herd.stream(model, _Tok(), prompt, max_new_tokens=2))


def test_empty_text_is_refused_only_when_it_encodes_to_nothing(model):
    # with a BOS the empty string is an unconditional start, as in transformers and vLLM
    assert isinstance(herd.generate(model, _Tok(bos=True), "", max_new_tokens=2), str)
    assert len(herd.generate(model, _Tok(bos=True), ["a", ""], max_new_tokens=2)) == 2
    no_bos = _Tok(bos=False)
    with pytest.raises(HerdError, match="^prompt is empty: it encodes to no tokens"):
        herd.generate(model, no_bos, "", max_new_tokens=2)
    with pytest.raises(HerdError, match="^prompt 1 is empty: it encodes to no tokens"):
        herd.generate(model, no_bos, ["a", ""], max_new_tokens=2)
    with pytest.raises(HerdError, match="^prompt is empty"):
        list(herd.stream(model, no_bos, "", max_new_tokens=2))


def test_token_id_rows_are_named_too(model):
    with pytest.raises(HerdError, match="^prompt 1 is empty: give at least one token"):
        generate_batch(model, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(HerdError, match="^prompt 0 is int, not a list of token ids"):
        generate_batch(model, [3, [1]], max_new_tokens=2)


def test_ordinary_prompts_still_work(model):
    tok = _Tok()
    one = herd.generate(model, tok, "hi", max_new_tokens=3)
    assert herd.generate(model, tok, ["hi", "there"], max_new_tokens=3)[0] == one
    assert isinstance(herd.generate(model, tok, [{"role": "user", "content": "hi"}], max_new_tokens=2), str)
    assert len(herd.generate(model, tok, ["hi", [{"role": "user", "content": "x"}]], max_new_tokens=2)) == 2
    assert herd.generate(model, tok, (p for p in ["hi", "there"]), max_new_tokens=3)[0] == one  # any iterable


@pytest.mark.parametrize("prompts, bad", [([[1.7, 2]], "1.7"), ([[5], [True, 5]], "True"),
                                          ([torch.tensor([3.6, 4.0])], "3.5999")])
def test_non_integer_token_ids_are_refused_not_truncated(model, prompts, bad):
    """torch.tensor(p, dtype=long) turned 1.7 into token 1 and True into token 1: another prompt,
    answered silently (the serving engine's submit already refused them)."""
    with pytest.raises(HerdError, match=f"token ids must be integers, got {bad}"):
        generate_batch(model, prompts, max_new_tokens=2)


def test_a_tensor_batch_is_its_rows(model):
    """A (B, T) LongTensor batch raised 'Boolean value of Tensor ... is ambiguous'; its rows (and
    NumPy rows) are the same prompts as lists of ints."""
    import numpy as np

    rows = [[3, 4, 5], [7, 8, 9]]
    want = [c.ids for c in generate_batch(model, rows, max_new_tokens=4)]
    assert [c.ids for c in generate_batch(model, torch.tensor(rows), max_new_tokens=4)] == want
    assert [c.ids for c in generate_batch(model, [np.array(r) for r in rows], max_new_tokens=4)] == want


@pytest.mark.parametrize("stop, bad", [(5, "a list of token ids, got 5"), ([1.5], "whole-number token ids, got 1.5"),
                                       ([None], "whole-number token ids, got None")])
def test_odd_stop_ids_are_one_herd_error(model, stop, bad):
    """A bare int raised "'int' object is not iterable"; a float id matched nothing and stopped
    nothing, silently."""
    with pytest.raises(HerdError, match=bad):
        generate_batch(model, [[1, 2]], max_new_tokens=2, stop_ids=stop)
    with pytest.raises(HerdError, match=bad):
        list(generate_ids(model, [[1, 2]], max_new_tokens=2, stop_ids=stop))


def test_stop_ids_of_any_collection_stop(model):
    first = generate_batch(model, [[1, 2]], max_new_tokens=4)[0].ids[0]
    for stop in ([first], (first,), {first}, torch.tensor([first])):
        c = generate_batch(model, [[1, 2]], max_new_tokens=4, stop_ids=stop)[0]
        assert (c.ids, c.stop_token, c.finish_reason) == ([], first, "stop")
