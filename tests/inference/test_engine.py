"""The serving engine against one-at-a-time generation (herd/inference/generate.py, itself checked
against transformers' `generate`): continuous batching, chunked prefill, preemption, prefix
sharing, n samples, stop strings, cancellation and the block pool's bookkeeping."""

from __future__ import annotations

import pytest
import torch

from herd.errors import HerdError
from herd.inference.engine import Engine
from herd.inference.generate import generate_batch
from herd.inference.sampling import SamplingParams
from herd.models.args import PRESETS, ModelArgs
from herd.models.llama3 import Transformer

GQA3 = ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300, ffn_hidden_dim=160,
                 rope_theta=10000.0, max_seq_len=128, tie_embeddings=True)


def _model(args, seed=0):
    torch.manual_seed(seed)
    m = Transformer(args)
    m.init_weights(std=0.5)  # large weights: sharp logits, so greedy ties cannot hide a wrong cache
    return m.eval()


@pytest.fixture(scope="module", params=["debug", "gqa3"])
def model(request):
    return _model(PRESETS["debug"] if request.param == "debug" else GQA3)


def _prompts(vocab, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _alone(model, prompts, max_new):
    return [generate_batch(model, [p], max_new_tokens=max_new)[0].ids for p in prompts]


def _pool_is_full(engine):
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert all(r == 0 for r in engine.blocks.refs)
    assert not engine.has_work


@pytest.mark.parametrize("config", [
    dict(),  # everything fits: one prefill step, then batched decode
    dict(num_blocks=24, max_batch=3, max_prefill_tokens=7, block_size=4),  # queueing, chunks, preemption
    dict(prefix_sharing=False, block_size=5),
])
def test_continuous_batching_equals_one_at_a_time(model, config):
    prompts = _prompts(model.args.vocab_size, (3, 40, 17, 1, 61, 33, 16, 32))
    engine = Engine(model, **config)
    got = [o[0].token_ids for o in engine.generate(prompts, max_tokens=20)]
    assert got == _alone(model, prompts, 20)
    _pool_is_full(engine)
    if "num_blocks" in config:
        assert engine.stats["preemptions"] > 0  # the small pool really forced recomputation


def test_llama4_chunked_attention_equals_one_at_a_time():
    """Llama 4's RoPE layers attend within chunks of 8 positions here: the paged batch must lay each
    row's context out as the model's chunk mask reads it (prompts and decodes cross many chunks)."""
    from herd.models.llama4 import LLAMA4_PRESETS
    from herd.models.llama4 import Transformer as Llama4

    torch.manual_seed(0)
    model = Llama4(LLAMA4_PRESETS["llama4-debug"])
    model.init_weights(std=0.5)
    model.eval()
    prompts = _prompts(model.args.vocab_size, (3, 40, 17, 1, 30), seed=2)
    for config in (dict(), dict(num_blocks=20, max_batch=3, max_prefill_tokens=7, block_size=4)):
        engine = Engine(model, **config)
        got = [o[0].token_ids for o in engine.generate(prompts, max_tokens=12)]
        assert got == _alone(model, prompts, 12)
        _pool_is_full(engine)


def test_greedy_suppressed_ids_as_one_at_a_time(model):
    """Suppressed ids (a tokenizer's reserved tokens, as the server passes them) hold for greedy
    requests too: the engine's batched argmax must not skip them."""
    prompts = _prompts(model.args.vocab_size, (4, 9), seed=4)
    plain = _alone(model, prompts, 6)
    suppress = SamplingParams(suppress=tuple(sorted({t for ids in plain for t in ids[:3]})))
    got = [o[0].token_ids for o in Engine(model).generate(prompts, max_tokens=6, sampling=suppress)]
    want = [generate_batch(model, [p], max_new_tokens=6, sampling=suppress)[0].ids for p in prompts]
    assert got == want and got != plain
    assert not set(suppress.suppress) & {t for ids in got for t in ids}


def test_requests_joining_mid_flight_equal_one_at_a_time(model):
    """Requests arrive while others decode: every step may mix prefill and decode."""
    prompts = _prompts(model.args.vocab_size, (5, 30, 12, 50, 2, 21), seed=3)
    engine = Engine(model, max_batch=4, block_size=8, max_prefill_tokens=16)
    got: dict[int, list[int]] = {}
    ids = []

    def listen(ev):
        got.setdefault(ev.request_id, []).extend(ev.token_ids)

    for p in prompts:
        ids.append(engine.submit(p, max_tokens=15, listener=listen))
        for _ in range(3):
            engine.step()
    while engine.step():
        pass
    assert [got[i] for i in ids] == _alone(model, prompts, 15)
    _pool_is_full(engine)


def test_prefix_sharing_reuses_blocks_and_keeps_outputs():
    model = _model(PRESETS["debug"])
    system = _prompts(512, (48,), seed=4)[0]  # a shared "system prompt" of 3 full blocks
    prompts = [system + tail for tail in _prompts(512, (5, 9, 1, 20), seed=5)]
    engine = Engine(model, block_size=16)
    first = engine.generate(prompts[:1], max_tokens=10)
    rest = engine.generate(prompts[1:], max_tokens=10)  # later requests find the freed, named blocks
    assert [o[0].token_ids for o in first + rest] == _alone(model, prompts, 10)
    assert engine.stats["prefix_hit_tokens"] == 3 * 48
    _pool_is_full(engine)


def test_n_samples_share_the_prompt_blocks():
    model = _model(PRESETS["debug"])
    prompt = _prompts(512, (40,), seed=6)[0]  # 2 full blocks of 16 and a partial one
    used = {}
    for sharing in (True, False):
        engine = Engine(model, block_size=16, prefix_sharing=sharing)
        engine.submit(prompt, max_tokens=4, n=4)
        engine.step()  # the prefill, and the first token of every sample
        used[sharing] = engine.blocks.num_used
        while engine.step():
            pass
        _pool_is_full(engine)
    assert used[True] == 2 + 4  # two shared full blocks, the partial one copied per sample
    assert used[False] == 4 * 3
    # Greedy samples of one prompt are all the single greedy answer; seeded ones the same either way.
    for sharing in (True, False):
        engine = Engine(model, block_size=16, prefix_sharing=sharing)
        outs = engine.generate([prompt], max_tokens=12, n=3)[0]
        assert [o.token_ids for o in outs] == _alone(model, [prompt], 12) * 3
        outs = engine.generate([prompt], max_tokens=12, n=3, sampling=SamplingParams(temperature=1.0, seed=3))[0]
        used[sharing] = [o.token_ids for o in outs]
    assert used[True] == used[False] and len({tuple(x) for x in used[True]}) == 3


def test_seeded_samples_are_reproducible_and_distinct():
    model = _model(PRESETS["debug"])
    engine = Engine(model)
    run = lambda seed: [o.token_ids for o in engine.generate(  # noqa: E731
        [[1, 2, 3]], max_tokens=16, n=3, sampling=SamplingParams(temperature=1.5, seed=seed))[0]]
    a, b = run(7), run(7)
    assert a == b
    assert len({tuple(x) for x in a}) == 3  # each sample has its own random stream
    assert run(8) != a
    # top_k=1 sampling is greedy, per sample
    topk1 = engine.generate([[1, 2, 3]], max_tokens=16, n=2, sampling=SamplingParams(temperature=2.0, top_k=1))[0]
    assert [o.token_ids for o in topk1] == _alone(model, [[1, 2, 3]], 16) * 2


def test_stop_tokens_max_tokens_and_context_limit():
    model = _model(GQA3)
    prompt = [5, 6, 7]
    free = _alone(model, [prompt], 12)[0]
    stop = free[4]
    engine = Engine(model)
    engine.stop_ids = frozenset({stop})
    out = engine.generate([prompt], max_tokens=12)[0][0]
    assert out.token_ids == free[:free.index(stop)] and out.finish_reason == "stop"
    out = engine.generate([prompt], max_tokens=12, ignore_eos=True)[0][0]
    assert out.token_ids == free and out.finish_reason == "length"
    long = _prompts(300, (120,))[0]
    out = engine.generate([long], max_tokens=50, ignore_eos=True)[0][0]
    assert len(out.token_ids) == GQA3.max_seq_len - 120 and out.finish_reason == "length"


@pytest.fixture(scope="module")
def llama3_tokenizer():
    from herd.tokenizer import load_tokenizer

    return load_tokenizer("llama3")


def test_stop_strings_cut_the_text_and_never_stream_it(llama3_tokenizer):
    tok = llama3_tokenizer
    model = _model(PRESETS["debug"].replace(vocab_size=tok.vocab_size, tie_embeddings=True))
    engine = Engine(model, tok)
    prompt = tok.encode("Once upon a time", bos=True)
    free = engine.generate([prompt], max_tokens=24, ignore_eos=True)[0][0]
    assert free.text == tok.decode(free.token_ids)  # streamed pieces add up to the decoded ids
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    pieces = []
    engine.submit(prompt, max_tokens=24, ignore_eos=True, stop_strings=[stop, "\x00never"],
                  listener=lambda ev: pieces.append(ev))
    while engine.step():
        pass
    text = "".join(ev.text for ev in pieces)
    assert text == free.text[:free.text.index(stop)]
    assert pieces[-1].finish_reason == "stop"
    _pool_is_full(engine)


def test_cancel_frees_blocks_at_once():
    model = _model(PRESETS["debug"])
    engine = Engine(model, block_size=4)
    events = []
    rid = engine.submit(list(range(1, 30)), max_tokens=100, n=2, listener=events.append)
    other = engine.submit([3, 4, 5], max_tokens=5)
    for _ in range(4):
        engine.step()
    assert engine.blocks.num_used > 0
    engine.cancel(rid)
    assert {ev.finish_reason for ev in events if ev.finish_reason} == {"cancelled"}
    while engine.step():
        pass
    _pool_is_full(engine)
    engine.cancel(other)  # finished already: nothing happens


def test_background_thread_and_back_pressure():
    """More work than the pool holds at once: requests queue, all finish, the pool is whole."""
    model = _model(PRESETS["debug"])
    prompts = _prompts(512, [20 + 7 * i for i in range(12)], seed=9)
    engine = Engine(model, num_blocks=20, block_size=8, max_batch=8).start()
    try:
        got = engine.generate(prompts, max_tokens=12)
    finally:
        engine.shutdown()
    assert [o[0].token_ids for o in got] == _alone(model, prompts, 12)
    _pool_is_full(engine)


def test_bad_requests_are_refused():
    model = _model(PRESETS["debug"])
    engine = Engine(model, num_blocks=8, block_size=4)
    for prompt, words in (([], "empty"), ([-1], "outside"), ([999999], "outside"),
                          ([1] * 256, "context"), ([1] * 40, "KV cache holds")):
        with pytest.raises(HerdError, match=words):
            engine.submit(prompt, max_tokens=4)
    with pytest.raises(HerdError, match="at least 1"):
        engine.submit([1], max_tokens=0)
    # a float id would have been truncated into another token; a float max_tokens a TypeError
    for prompt, kw, words in (([1, 2.7], {}, "token ids must be integers, got 2.7"), ([True], {}, "integers"),
                              ([1], {"max_tokens": 2.5}, "max_tokens must be an integer"),
                              ([1], {"n": "2"}, "n must be an integer")):
        with pytest.raises(HerdError, match=words):
            engine.submit(prompt, **{"max_tokens": 4, **kw})
    with pytest.raises(HerdError, match="stop strings need a tokenizer"):
        engine.submit([1], max_tokens=3, stop_strings=["x"])
    _pool_is_full(engine)
