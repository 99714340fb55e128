"""vLLM's min_p: its checks, the cut against transformers' MinPLogitsWarper (the same draws from the
same seed, and transformers' `generate(min_p=...)` on a tiny random model), the order vLLM V1
applies it in (after temperature, before top-k/top-p), and herd.generate / herd.stream taking it
with the penalties, min_tokens and stop_token_ids."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import MinPLogitsWarper, TemperatureLogitsWarper

import herd
from herd.errors import HerdError
from herd.inference.generate import Completion, generate_batch
from herd.inference.sampling import SamplingParams, sample
from herd.models.args import PRESETS
from tests.reference import herd_and_hf

from .test_sampling_args import _Tok


@pytest.fixture(scope="module")
def pair():
    return herd_and_hf(PRESETS["debug"], std=0.5)


@pytest.mark.parametrize("value", [-0.01, 1.01, math.nan, math.inf, "0.1", None, True])
def test_min_p_out_of_range_is_one_herd_error(value):
    with pytest.raises(HerdError, match=r"min_p must be a number in \[0, 1\]"):
        SamplingParams(min_p=value)


@pytest.mark.parametrize("temperature, min_p", [(1.0, 0.05), (0.7, 0.2), (1.6, 0.5), (1.0, 1.0)])
def test_sample_draws_what_transformers_min_p_warper_leaves(temperature, min_p):
    # The same uniform draws over the same filtered distribution pick the same tokens: herd's cut
    # equals transformers' TemperatureLogitsWarper then MinPLogitsWarper (no top-k/top-p here, so
    # the two libraries' orders agree).
    logits = torch.randn(256, 40, generator=torch.Generator().manual_seed(0)) * 3
    got = sample(logits, SamplingParams(temperature=temperature, min_p=min_p), torch.Generator().manual_seed(5))
    scores = MinPLogitsWarper(min_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    want = torch.multinomial(torch.softmax(scores, -1), 1, generator=torch.Generator().manual_seed(5))[:, 0]
    assert got.tolist() == want.tolist()
    # and min_p > 0 changes draws (a test that passes without the cut proves nothing)
    if min_p >= 0.2:
        free = sample(logits, SamplingParams(temperature=temperature), torch.Generator().manual_seed(5))
        assert free.tolist() != got.tolist()


def test_allowed_set_is_p_at_least_min_p_times_p_max():
    probs = torch.tensor([0.30, 0.25, 0.2, 0.1, 0.059, 0.05, 0.041])
    logits = probs.log().expand(30000, -1)
    draws = sample(logits, SamplingParams(temperature=1.0, min_p=0.2), torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {i for i, p in enumerate(probs.tolist()) if p >= 0.2 * 0.30}  # 0.06: {0..3}
    # Temperature comes first: at 0.5 the probabilities are p² renormalised, so the cut is p² ≥ 0.2·p_max².
    draws = sample(logits, SamplingParams(temperature=0.5, min_p=0.2), torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {i for i, p in enumerate(probs.tolist()) if p * p >= 0.2 * 0.30 ** 2}
    # min_p = 1 leaves the most likely token alone: greedy
    assert set(sample(logits[:200], SamplingParams(temperature=2.0, min_p=1.0)).tolist()) == {0}


def test_min_p_comes_before_top_p_as_in_vllm():
    # vLLM V1 applies min_p (an argmax-invariant logits processor) after temperature and before its
    # top-k/top-p sampler; transformers runs top_p first. Here they differ: top_p 0.75 over the full
    # distribution keeps {0, 1, 2} (mass before token 2 is 0.7), over what min_p 0.2 leaves
    # ({0, 1, 2}, renormalised to 4/9, 3/9, 2/9) it keeps {0, 1} (mass before token 2 is 7/9).
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    logits = probs.log().expand(20000, -1)
    draws = sample(logits, SamplingParams(temperature=1.0, min_p=0.2, top_p=0.75), torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    draws = sample(logits, SamplingParams(temperature=1.0, top_p=0.75), torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1, 2}


def test_seeded_generation_equals_transformers_generate_with_min_p(pair):
    model, ref = pair
    prompt = [3, 17, 99, 250, 7]
    for seed, temperature, min_p in ((0, 1.0, 0.1), (1, 1.5, 0.05)):
        ours = generate_batch(model, [prompt], max_new_tokens=16,
                              sampling=SamplingParams(temperature=temperature, min_p=min_p, seed=seed))[0].ids
        torch.manual_seed(seed)  # transformers draws from the global generator
        theirs = ref.generate(torch.tensor([prompt]), do_sample=True, temperature=temperature, min_p=min_p, top_k=0,
                              top_p=1.0, max_new_tokens=16, min_new_tokens=16, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == theirs


@pytest.mark.parametrize("kw, words", [
    (dict(min_p=1.5), "min_p"), (dict(min_p=-0.1), "min_p"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=1.5), "min_tokens"),
    (dict(min_tokens=9, max_new_tokens=8), "min_tokens must be less than or equal to max_tokens=8"),
    (dict(stop_token_ids=5), "stop_token_ids must be a list"), (dict(stop_token_ids=[1.5]), "whole-number"),
])
def test_api_refuses_bad_sampling_values_in_one_line(pair, kw, words):
    model, tok = pair[0], _Tok()
    for call in (lambda: herd.generate(model, tok, "hi", **kw), lambda: list(herd.stream(model, tok, "hi", **kw)),
                 lambda: herd.generate(model, tok, [], **kw)):
        with pytest.raises(HerdError, match=words) as e:
            call()
        assert "\n" not in str(e.value)


def test_api_passes_min_p_penalties_min_tokens_and_stop_ids_through(pair):
    model, tok = pair[0], _Tok()
    ids = tok.encode("hello")
    # each keyword reaches the sampler: the same text as generate_batch with those SamplingParams,
    # and not the text without it (so a keyword dropped on the way fails here)
    base = dict(temperature=1.0, seed=3)  # this sample repeats token 470 at step 22: the penalties bite
    for kw in (dict(min_p=0.3), dict(repetition_penalty=1.8), dict(presence_penalty=2.0, frequency_penalty=2.0)):
        want = generate_batch(model, [ids], max_new_tokens=24, sampling=SamplingParams(**base, **kw),
                              stop_ids=[0])[0].ids
        without = generate_batch(model, [ids], max_new_tokens=24, sampling=SamplingParams(**base), stop_ids=[0])[0].ids
        assert want != without
        assert herd.generate(model, tok, "hello", max_new_tokens=24, **base, **kw) == tok.decode(want)
        assert "".join(herd.stream(model, tok, "hello", max_new_tokens=24, **base, **kw)) == tok.decode(want)
    # stop_token_ids end the text at that id (not in the text); min_tokens holds it off
    free = generate_batch(model, [ids], max_new_tokens=12, stop_ids=[0])[0].ids
    stop = free[2]
    cut = free[:free.index(stop)]
    assert herd.generate(model, tok, "hello", max_new_tokens=12, stop_token_ids=[stop]) == tok.decode(cut)
    done = Completion()
    assert "".join(herd.stream(model, tok, "hello", max_new_tokens=12, stop_token_ids=[stop],
                               completion=done)) == tok.decode(cut)
    assert done.finish_reason == "stop" and done.stop_token == stop
    late = herd.generate(model, tok, "hello", max_new_tokens=12, stop_token_ids=[stop], min_tokens=len(cut) + 1)
    assert len(late) >= len(cut) + 1 and late.startswith(tok.decode(cut))
