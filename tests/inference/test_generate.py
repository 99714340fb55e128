"""Generation on tiny random models: against transformers' greedy `generate`, batched vs alone,
stop tokens, and the sampling rules."""

from __future__ import annotations

import pytest
import torch

from herd.errors import HerdError
from herd.inference.generate import generate_batch
from herd.inference.sampling import SamplingParams, sample
from herd.models.args import PRESETS, ModelArgs
from tests.reference import herd_and_hf

GQA3 = ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300, ffn_hidden_dim=160,
                 rope_theta=10000.0, max_seq_len=128, tie_embeddings=True)


@pytest.fixture(scope="module", params=["debug", "gqa3"])
def pair(request):
    return herd_and_hf(PRESETS["debug"] if request.param == "debug" else GQA3, std=0.5)


def test_greedy_equals_transformers_generate(pair):
    model, ref = pair
    torch.manual_seed(1)
    for length in (1, 7, 30):
        prompt = torch.randint(0, model.args.vocab_size, (1, length))
        ours = generate_batch(model, [prompt[0].tolist()], max_new_tokens=24)[0].ids
        theirs = ref.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                              pad_token_id=0, eos_token_id=None)[0, length:].tolist()
        assert ours == theirs


def test_batched_prompts_of_different_lengths_equal_single_runs(pair):
    model, _ = pair
    torch.manual_seed(2)
    prompts = [torch.randint(0, model.args.vocab_size, (n,)).tolist() for n in (3, 11, 1, 25)]
    together = generate_batch(model, prompts, max_new_tokens=16)
    alone = [generate_batch(model, [p], max_new_tokens=16)[0] for p in prompts]
    assert [c.ids for c in together] == [c.ids for c in alone]


def test_stop_tokens_end_each_row_independently(pair):
    model, _ = pair
    prompts = [[5, 6, 7], [9, 10]]
    free = generate_batch(model, prompts, max_new_tokens=12)
    stop = free[0].ids[4]  # a token row 0 is known to produce at step 4
    out = generate_batch(model, prompts, max_new_tokens=12, stop_ids=[stop])
    assert out[0].finish_reason == "stop" and out[0].stop_token == stop
    assert out[0].ids == free[0].ids[:free[0].ids.index(stop)]
    if stop not in free[1].ids:
        assert out[1].ids == free[1].ids and out[1].finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_seed_dependent(pair):
    model, _ = pair
    run = lambda seed: generate_batch(model, [[1, 2, 3]], max_new_tokens=20,  # noqa: E731
                                      sampling=SamplingParams(temperature=1.5, seed=seed))[0].ids
    assert run(7) == run(7)
    assert run(7) != run(8)
    greedy = generate_batch(model, [[1, 2, 3]], max_new_tokens=20)[0].ids
    topk1 = generate_batch(model, [[1, 2, 3]], max_new_tokens=20,
                           sampling=SamplingParams(temperature=2.0, top_k=1, seed=3))[0].ids
    assert topk1 == greedy


def test_sampling_follows_the_softmax_and_its_cuts():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    n = 40000
    draws = torch.stack([sample(logits.expand(n, -1), SamplingParams(temperature=0.7), g)])
    freq = torch.bincount(draws.flatten(), minlength=5).float() / n
    assert torch.allclose(freq, torch.softmax(logits[0] / 0.7, -1), atol=0.01)
    # top-p 0.8: the smallest set with mass ≥ 0.8 under softmax(logits) is tokens {0, 1, 2}
    probs = torch.softmax(logits[0], -1)
    assert probs[:2].sum() < 0.8 <= probs[:3].sum()
    draws = sample(logits.expand(n, -1), SamplingParams(temperature=1.0, top_p=0.8), g)
    assert set(draws.tolist()) == {0, 1, 2}
    renorm = probs[:3] / probs[:3].sum()
    assert torch.allclose(torch.bincount(draws, minlength=3).float()[:3] / n, renorm, atol=0.01)
    draws = sample(logits.expand(n, -1), SamplingParams(temperature=1.0, top_k=2), g)
    assert set(draws.tolist()) == {0, 1}


def test_context_limits():
    model, _ = herd_and_hf(GQA3)
    with pytest.raises(HerdError, match="does not fit the model's context of 128"):
        generate_batch(model, [[1] * 128], max_new_tokens=1)
    out = generate_batch(model, [[1] * 120], max_new_tokens=50)  # clamped to the context
    assert len(out[0].ids) == 8
    with pytest.raises(HerdError, match="outside the model's vocabulary"):
        generate_batch(model, [[1, 300]], max_new_tokens=1)
    with pytest.raises(HerdError, match="temperature"):
        SamplingParams(temperature=-1)


def test_compiled_decoding_equals_eager():
    # torch.compile with the fixed-shape cache and explicit masks: same tokens, padded batch included.
    model, _ = herd_and_hf(PRESETS["debug"], std=0.5)
    prompts = [[5, 7, 9, 11, 3], [1, 2]]
    eager = generate_batch(model, prompts, max_new_tokens=12)
    compiled = generate_batch(model, prompts, max_new_tokens=12, compile=True)
    assert [c.ids for c in compiled] == [c.ids for c in eager]


def test_compiled_is_keyed_on_the_model_under_an_image_binding(monkeypatch):
    """Every image prompt wraps the model anew (vision.WithImages); the compiled decode step must
    still be compiled once per model. torch.compile is replaced by a counter: no real compile."""
    from herd.inference import generate as gen
    from herd.models.llama4 import LLAMA4_PRESETS, VisionArgs
    from herd.models.vision import Llama4Multimodal, WithImages

    calls = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(m) or ("compiled", m))
    vision = VisionArgs(image_size=28, patch_size=14, dim=16, n_layers=1, n_heads=2, output_dim=16, max_tiles=1)
    model = Llama4Multimodal(LLAMA4_PRESETS["llama4-debug"].replace(vocab_size=64, dim=16, head_dim=4,
                                                                    vision=vision))
    first = gen.compiled(WithImages(model, torch.zeros(1, 3, 28, 28)))
    second = gen.compiled(WithImages(model, torch.ones(1, 3, 28, 28)))
    assert first is second and calls == [model]


def test_seeded_sampling_of_a_row_is_the_same_alone_and_in_any_batch(pair):
    # One generator per row: a seeded prompt samples the same text whatever else shares its batch
    # (before, one generator served the whole batch, so a row's draws depended on its neighbours).
    model, _ = pair
    torch.manual_seed(4)
    prompts = [torch.randint(0, model.args.vocab_size, (n,)).tolist() for n in (5, 13, 2)]
    sp = SamplingParams(temperature=1.3, top_p=0.95, seed=11)
    together = generate_batch(model, prompts, max_new_tokens=12, sampling=sp)
    alone = [generate_batch(model, [p], max_new_tokens=12, sampling=sp)[0] for p in prompts]
    pairs = generate_batch(model, prompts[1:], max_new_tokens=12, sampling=sp)
    assert [c.ids for c in together] == [c.ids for c in alone]
    assert [c.ids for c in pairs] == [c.ids for c in alone[1:]]


def test_a_short_prompt_batched_with_a_long_one_still_runs_to_the_end_of_the_context(pair):
    # Each row's room is the context minus its own length, not the longest prompt's: a 2-token
    # prompt beside one near the end of the context used to be cut to the long one's 2 tokens.
    model, _ = pair
    n = model.args.max_seq_len
    torch.manual_seed(5)
    long, short = torch.randint(0, model.args.vocab_size, (n - 2,)).tolist(), [3, 4]
    together = generate_batch(model, [long, short], max_new_tokens=10)
    alone = [generate_batch(model, [p], max_new_tokens=10)[0] for p in (long, short)]
    assert [len(c.ids) for c in alone] == [2, 10]
    assert [c.ids for c in together] == [c.ids for c in alone]
    assert [c.finish_reason for c in together] == ["length", "length"]


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": "1"}, "temperature must be a finite number >= 0, got '1'"),
    ({"temperature": None}, "temperature must be"),
    ({"top_p": "0.9"}, "top_p must be in"),
    ({"top_k": 2.5}, "top_k must be a whole number >= 0, got 2.5"),
    ({"top_k": True}, "top_k must be a whole number"),
    ({"top_k": None}, "top_k must be a whole number"),
])
def test_sampling_params_of_the_wrong_type_are_one_herd_error(kwargs, match):
    # These reached a comparison or torch.topk and failed there with a bare TypeError.
    with pytest.raises(HerdError, match=match.replace("(", r"\(")):
        SamplingParams(**kwargs)
