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
from herd.inference.sampling import SamplingParams
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


# ---- min_tokens (vLLM's; transformers' min_new_tokens) -------------------------------------------

@pytest.fixture(scope="module")
def pair():
    from tests.reference import herd_and_hf

    return herd_and_hf(PRESETS["debug"], std=0.5)


def test_min_tokens_holds_stop_ids_off_as_transformers_min_new_tokens(pair):
    model, ref = pair
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15]]  # different lengths: left padding in the batch
    free = generate_batch(model, prompts[:1], max_new_tokens=12)[0].ids
    stop = free[1]  # greedy would stop at step 1
    lengths = set()
    for k in (0, 1, 4, 12):
        sp = SamplingParams(min_tokens=k)
        ours = generate_batch(model, prompts, max_new_tokens=12, sampling=sp, stop_ids=[stop, 0])
        assert [c.ids for c in ours] == [generate_batch(model, [p], max_new_tokens=12, sampling=sp,
                                                        stop_ids=[stop, 0])[0].ids for p in prompts]
        for p, c in zip(prompts, ours, strict=True):
            # transformers' MinNewTokensLengthLogitsProcessor masks every eos id for k new tokens
            theirs = ref.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12, min_new_tokens=k,
                                  eos_token_id=[stop, 0], pad_token_id=0)[0, len(p):].tolist()
            end = next((i for i, t in enumerate(theirs) if t in (stop, 0)), len(theirs))
            assert c.ids == theirs[:end] and len(c.ids) >= k
            assert (c.stop_token, c.finish_reason) == ((theirs[end], "stop") if end < len(theirs) else (None, "length"))
        lengths.add(len(ours[0].ids))
    assert len(lengths) > 1  # min_tokens changed where row 0 stops


@pytest.mark.parametrize("k, words", [(-1, "min_tokens must be a whole number >= 0"), (2.0, "min_tokens"),
                                      (True, "min_tokens"), (7, "less than or equal to max_tokens=6, got 7")])
def test_bad_min_tokens_is_one_herd_error(model, k, words):
    with pytest.raises(HerdError, match=words):
        generate_batch(model, [[1, 2]], max_new_tokens=6, sampling=SamplingParams(min_tokens=k))
