"""Sampling arguments a generation cannot honour are one error, never an empty answer: at least one
new token (the CLI's --max-new-tokens and herd.generate/stream/generate_batch alike) and a finite
temperature. The CLI says so before it loads the model."""

from __future__ import annotations

import math

import pytest

import herd
from herd.cli import main
from herd.errors import HerdError
from herd.inference.generate import generate_batch, generate_ids
from herd.inference.sampling import SamplingParams
from herd.models.args import PRESETS
from tests.reference import herd_and_hf


@pytest.fixture(scope="module")
def model():
    return herd_and_hf(PRESETS["debug"], std=0.5)[0]


class _Tok:
    """Just enough tokenizer for herd.generate / herd.stream on raw text."""
    stop_ids = {0}
    chat = None
    bos_id = 1

    def encode(self, text, bos=True, eos=False, **_):
        return [1, *(2 + b % 200 for b in text.encode())]

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)

    def decode_bytes(self, ids):
        return self.decode(ids).encode()


@pytest.mark.parametrize("n", [0, -1, 2.5, "3"])
def test_library_refuses_fewer_than_one_new_token(model, n):
    with pytest.raises(HerdError, match="max_new_tokens must be a whole number >= 1"):
        generate_batch(model, [[1, 2, 3]], max_new_tokens=n)
    with pytest.raises(HerdError, match="max_new_tokens"):
        list(generate_ids(model, [[1, 2, 3]], max_new_tokens=n))


def test_one_new_token_is_the_floor_and_works(model):
    assert len(generate_batch(model, [[1, 2, 3]], max_new_tokens=1)[0].ids) == 1


def test_api_generate_and_stream_share_the_check(model):
    tok = _Tok()
    for n in (0, -5):
        with pytest.raises(HerdError, match="max_new_tokens"):
            herd.generate(model, tok, "hi", max_new_tokens=n)
        with pytest.raises(HerdError, match="max_new_tokens"):
            list(herd.stream(model, tok, "hi", max_new_tokens=n))
    assert isinstance(herd.generate(model, tok, "hi", max_new_tokens=2), str)


@pytest.mark.parametrize("t", [math.nan, math.inf, -0.5])
def test_temperature_must_be_finite_and_not_negative(t):
    with pytest.raises(HerdError, match="temperature must be a finite number >= 0"):
        SamplingParams(temperature=t)


@pytest.mark.parametrize("verb", ["generate", "chat"])
@pytest.mark.parametrize("flag, value, match", [
    ("--max-new-tokens", "-1", "max_new_tokens must be a whole number >= 1, got -1"),
    ("--max-new-tokens", "0", "max_new_tokens must be a whole number >= 1, got 0"),
    ("--temperature", "nan", "temperature must be a finite number >= 0"),
    ("--top-p", "0", "top_p must be in (0, 1]"),
])
def test_cli_refuses_in_one_line_before_loading_the_model(verb, flag, value, match, tmp_path, capsys):
    # The model does not exist: the sampling error must come first, without loading anything.
    argv = [verb, "--model", str(tmp_path / "no-such-model"), f"{flag}={value}"]
    if verb == "generate":
        argv += ["--prompt", "hi"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and match in captured.err, captured.err
