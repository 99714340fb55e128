"""The serving engine against one-at-a-time generation (herd/inference/generate.py, itself checked
against transformers' `generate`): continuous batching, chunked prefill, preemption, prefix
sharing, n samples, stop strings, cancellation and the block pool's bookkeeping."""

from __future__ import annotations

import dataclasses
import itertools
import time

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


# ---- failures, memory pressure and concurrency ------------------------------------------------------

def _failing_forward(monkeypatch, model, fail_at):
    """Make the model's `fail_at`-th forward call (1-based) raise."""
    calls, forward = [0], model.forward

    def flaky(*a, **kw):
        calls[0] += 1
        if calls[0] == fail_at:
            raise RuntimeError("injected failure")
        return forward(*a, **kw)

    monkeypatch.setattr(model, "forward", flaky)


@pytest.mark.parametrize("fail_at", [1, 2, 5])  # the prompt's prefill, the first decode after the fork, later
def test_a_failing_step_ends_its_requests_and_the_engine_goes_on(monkeypatch, capfd, fail_at):
    """An exception in a step used to kill the engine's thread (every request then hung). Now the
    step's requests end with "error", their blocks go back, the traceback is printed once, and the
    queued and later requests come out as on a fresh engine."""
    model = _model(PRESETS["debug"])
    prompts = _prompts(512, (13, 7), seed=11)
    sampled = dict(max_tokens=10, n=2, sampling=SamplingParams(temperature=1.0, seed=4))
    fresh = Engine(model, block_size=4, max_batch=2)
    want = [fresh.generate([p], **sampled)[0] for p in prompts]
    want = [[(o.token_ids, o.finish_reason) for o in outs] for outs in want]

    engine = Engine(model, block_size=4, max_batch=2)  # the second request waits for the first
    _failing_forward(monkeypatch, model, fail_at)
    got = {}
    done = []

    def listen(ev):
        got.setdefault((ev.request_id, ev.index), [[], None])[0].extend(ev.token_ids)
        if ev.finish_reason is not None:
            got[ev.request_id, ev.index][1] = ev.finish_reason
            done.append(ev)

    first, second = (engine.submit(p, listener=listen, **sampled) for p in prompts)
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while len(done) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [got[first, i][1] for i in range(2)] == ["error", "error"]
        assert [tuple(got[second, i]) for i in range(2)] == want[1]  # queued during the failure: unharmed
        _wait_idle(engine)
        assert engine.blocks_free == engine.blocks.num_blocks
        again = engine.generate(prompts, **sampled)  # the failed request, served normally now
    finally:
        engine.shutdown()
    assert [[(o.token_ids, o.finish_reason) for o in outs] for outs in again] == want
    _pool_is_full(engine)
    err = capfd.readouterr().err
    assert err.count("Traceback") == 1 and err.count("RuntimeError: injected failure") == 1, err


def test_a_failing_step_called_directly_raises_with_the_pool_whole(monkeypatch):
    model = _model(PRESETS["debug"])
    prompt = _prompts(512, (21,), seed=12)[0]
    want = Engine(model, block_size=4).generate([prompt], max_tokens=8, n=3)[0]
    engine = Engine(model, block_size=4)
    _failing_forward(monkeypatch, model, 3)
    events = []
    engine.submit(prompt, max_tokens=8, n=3, listener=events.append)
    with pytest.raises(RuntimeError, match="injected"):
        while engine.step():
            pass
    assert sorted((ev.index, ev.finish_reason) for ev in events if ev.finish_reason) == [
        (0, "error"), (1, "error"), (2, "error")]
    _pool_is_full(engine)
    got = engine.generate([prompt], max_tokens=8, n=3)[0]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    _pool_is_full(engine)


def _wait_idle(engine, timeout=60.0):
    deadline = time.monotonic() + timeout
    while engine.has_work and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.has_work, "the engine never finished its requests"


@pytest.mark.parametrize("sharing", [True, False])
def test_preempted_samples_get_back_their_own_blocks(sharing):
    """Readmitting a preempted n>1 request: each sample finds the freed blocks of its own generated
    tokens. Allocating the first sample's new blocks used to evict the second sample's found ones
    from the free list (then taken as both fresh and computed): wrong tokens after the preemption."""
    model = _model(PRESETS["debug"])
    prompts = _prompts(512, (3, 9, 14, 6, 20, 1), seed=1)
    kw = dict(max_tokens=16, n=2, sampling=SamplingParams(temperature=1.0, seed=5))
    reference = Engine(model, num_blocks=400, block_size=4)
    want = [[o.token_ids for o in reference.generate([p], **kw)[0]] for p in prompts]
    engine = Engine(model, num_blocks=20, block_size=4, max_batch=6, max_prefill_tokens=8, prefix_sharing=sharing)
    got = [[o.token_ids for o in outs] for outs in engine.generate(prompts, **kw)]
    assert engine.stats["preemptions"] > 0
    assert got == want
    _pool_is_full(engine)


def test_unshared_samples_that_can_never_be_admitted_are_refused():
    """Without prefix sharing each of n samples holds its own prompt: a request checked as if they
    shared it was accepted, never admitted, and held the queue forever. Every accepted request
    must finish on an idle engine."""
    model = _model(PRESETS["debug"])
    engine = Engine(model, num_blocks=20, block_size=4, prefix_sharing=False)
    with pytest.raises(HerdError, match="KV cache holds"):
        engine.submit(list(range(1, 41)), max_tokens=4, n=4)
    for length, n, max_tokens in itertools.product((1, 8, 17, 30), (2, 3, 4), (1, 6, 13)):
        try:
            engine.submit(list(range(1, length + 1)), max_tokens=max_tokens, n=n)
        except HerdError:
            continue
        while engine.step():
            pass
        _pool_is_full(engine)  # it ran to the end


def test_cancel_before_the_fork_ends_every_sample():
    """An n>1 request is one sequence until its prompt is computed: cancelling it then used to end
    sample 0 only, and a listener waiting for its n last events waited forever."""
    engine = Engine(_model(PRESETS["debug"]), block_size=4, max_prefill_tokens=4)
    events = []
    rid = engine.submit(list(range(1, 30)), max_tokens=5, n=3, listener=events.append)
    engine.step()  # a first chunk of the prompt: not forked yet
    engine.cancel(rid)
    assert sorted((ev.index, ev.finish_reason) for ev in events if ev.finish_reason) == [
        (0, "cancelled"), (1, "cancelled"), (2, "cancelled")]
    _pool_is_full(engine)


def _mixed_requests(tok, count, seed):
    """Prompts with and without a shared system prompt; n of 1-3, greedy or seeded sampling, stop
    strings, max_tokens up to 48/n; about one in four is cancelled after its k-th event."""
    import random

    rnd = random.Random(seed)
    system = tok.encode("You are a helpful assistant who answers briefly.", bos=True)
    words = ["cat", "dog", "tree", "house", "river", "blue", "run", "sky"]
    reqs = []
    for _ in range(count):
        text = " ".join(rnd.choice(words) for _ in range(rnd.randint(0, 14)))
        prompt = (system if rnd.random() < 0.5 else tok.encode("", bos=True)) + tok.encode(text)
        n = rnd.choice([1, 1, 2, 3])
        kw = dict(max_tokens=rnd.randint(1, 48 // n), n=n, ignore_eos=True)
        if rnd.random() < 0.6:
            kw["sampling"] = SamplingParams(temperature=1.0, seed=rnd.randint(0, 1000))
        if rnd.random() < 0.3:
            kw["stop_strings"] = [rnd.choice(["e", "a", "th", "ing", " t"])]
        reqs.append((prompt, kw, rnd.randint(1, 4) if rnd.random() < 0.25 else None))
    return reqs


def _serve_concurrently(engine, reqs, timeout=60.0):
    """Each request from its own client thread (a small random delay apart), cancelled from yet
    another thread after `cancel_after` events; per request its samples' (ids, text, finish)."""
    import random
    import threading

    results = [None] * len(reqs)

    def client(i):
        prompt, kw, cancel_after = reqs[i]
        outs = [[[], "", None] for _ in range(kw["n"])]
        done, seen, rid = threading.Event(), [0, kw["n"]], []

        def listen(ev):
            out = outs[ev.index]
            out[0] += ev.token_ids
            out[1] += ev.text
            seen[0] += 1
            if ev.finish_reason is not None:
                out[2] = ev.finish_reason
                seen[1] -= 1
                if seen[1] == 0:
                    done.set()
            if seen[0] == cancel_after:  # from another thread, as a client going away would
                threading.Thread(target=engine.cancel, args=(rid[0],)).start()

        time.sleep(random.Random(i).random() * 0.05)
        rid.append(engine.submit(prompt, listener=listen, **kw))
        results[i] = [tuple(o) for o in outs] if done.wait(timeout) else "hung"

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.fixture(scope="module")
def mixed_one_at_a_time(llama3_tokenizer):
    """The model, the mixed requests, and each request's samples run alone on a roomy engine."""
    tok = llama3_tokenizer
    model = _model(PRESETS["debug"].replace(vocab_size=tok.vocab_size, tie_embeddings=True))
    reqs = _mixed_requests(tok, 14, seed=3)
    alone = Engine(model, tok, num_blocks=400, block_size=4)
    want = [[(o.token_ids, o.text, o.finish_reason) for o in alone.generate([p], **kw)[0]] for p, kw, _ in reqs]
    return model, reqs, want


@pytest.mark.parametrize("sharing", [True, False])
def test_concurrent_clients_under_memory_pressure_equal_one_at_a_time(llama3_tokenizer, mixed_one_at_a_time,
                                                                      sharing):
    """Many clients at once on a KV cache far too small for all of them (queueing, chunked prefill,
    preemption): every sample equals the same request run alone on a roomy engine; a cancelled one
    is a prefix of it; nothing hangs; the pool is whole at the end."""
    tok = llama3_tokenizer
    model, reqs, want = mixed_one_at_a_time
    engine = Engine(model, tok, num_blocks=22, block_size=4, max_batch=8, max_prefill_tokens=8,
                    prefix_sharing=sharing).start()
    try:
        got = _serve_concurrently(engine, reqs)
        _wait_idle(engine)
    finally:
        engine.shutdown()
    for (_, kw, cancel_after), g, w in zip(reqs, got, want, strict=True):
        assert g != "hung", kw
        for (ids, text, reason), (ids_w, text_w, reason_w) in zip(g, w, strict=True):
            if reason == "cancelled":
                assert cancel_after is not None and ids == ids_w[:len(ids)] and text_w.startswith(text)
            else:
                assert (ids, text, reason) == (ids_w, text_w, reason_w), kw
    assert engine.stats["preemptions"] > 0
    _pool_is_full(engine)


def test_a_request_that_can_no_longer_fit_ends_instead_of_waiting_forever(capsys):
    """With nothing running nothing will ever free a block: a head-of-queue request that cannot be
    admitted then (a preempted n>1 request whose samples no longer share their prompt's cached
    blocks can need more than the pool) must end with "error" — not wait while step() returns False,
    has_work stays True and every request behind it waits too. Here the pool is shrunk from outside
    after the request was accepted, which puts the engine in that state directly."""
    engine = Engine(_model(PRESETS["debug"]), num_blocks=19, block_size=4)
    ends = {}

    def listener(ev):
        if ev.finish_reason:
            ends[(ev.request_id, ev.index)] = ev.finish_reason

    a = engine.submit(list(range(1, 41)), max_tokens=8, n=3, listener=listener)
    held = [engine.blocks.allocate() for _ in range(10)]
    b = engine.submit(list(range(50, 53)), max_tokens=2, ignore_eos=True, listener=listener)
    for _ in range(100):
        if not engine.step():
            break
    assert not engine.has_work
    assert ends == {(a, 0): "error", (a, 1): "error", (a, 2): "error", (b, 0): "length"}
    assert "cannot fit in the KV cache" in capsys.readouterr().err
    for blk in held:
        engine.blocks.release(blk)
    _pool_is_full(engine)


@pytest.mark.parametrize("seed", [-7, -(1 << 63), 5, (1 << 63) - 1])
def test_seeded_sample_equals_generate_for_any_seed(model, seed):
    """One seeded sample draws what herd.generate draws with the same seed, the ends of the seed
    range included. The engine wrapped seeds mod 2**63 where torch (and generate) wrap mod 2**64:
    the CPU generator seeds from the low 32 bits, where both agree, but CUDA's Philox reads all 64,
    so there a negative seed gave the server and the library different text."""
    sp = SamplingParams(temperature=1.0, seed=seed)
    prompts = _prompts(model.args.vocab_size, (4, 11), seed=6)
    got = [o[0].token_ids for o in Engine(model).generate(prompts, max_tokens=10, sampling=sp)]
    assert got == [generate_batch(model, [p], max_new_tokens=10, sampling=sp)[0].ids for p in prompts]


# ---- vLLM's stop_token_ids and min_tokens ------------------------------------------------------------

def test_stop_token_ids_end_a_sample_like_eos(model):
    prompt = _prompts(model.args.vocab_size, (5,), seed=3)[0]
    free = _alone(model, [prompt], 12)[0]
    stop = free[3]
    engine = Engine(model)  # no tokenizer: no EOS of its own, only the request's ids stop it
    events = []
    engine.submit(prompt, max_tokens=12, stop_token_ids=[stop], listener=events.append)
    while engine.step():
        pass
    ids = [t for ev in events for t in ev.token_ids]
    # vLLM: finish_reason "stop"; the stop id is not in the text (herd keeps it out of token_ids,
    # as for EOS) but was generated, so usage counts it
    assert ids == free[:free.index(stop)] and events[-1].finish_reason == "stop"
    assert events[-1].completion_tokens == len(ids) + 1
    # ignore_eos drops only the tokenizer's EOS, never the request's stop_token_ids (vLLM's check_stop)
    out = engine.generate([prompt], max_tokens=12, stop_token_ids=(stop,), ignore_eos=True)[0][0]
    assert out.token_ids == free[:free.index(stop)] and out.finish_reason == "stop"
    # the tokenizer's stop ids still count beside them
    engine.stop_ids = frozenset({free[1]})
    out = engine.generate([prompt], max_tokens=12, stop_token_ids=[stop])[0][0]
    assert out.token_ids == free[:1] and out.finish_reason == "stop"
    _pool_is_full(engine)


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.0, seed=11),
                                      SamplingParams(repetition_penalty=1.3, min_p=0.1, temperature=0.8, seed=2)])
def test_min_tokens_equals_generate(model, sampling):
    """The engine holds EOS and stop_token_ids off for min_tokens tokens as generate_ids does
    (itself checked against transformers' min_new_tokens), n>1 samples and preemption included."""
    prompts = _prompts(model.args.vocab_size, (4, 9), seed=4)
    free = _alone(model, prompts[:1], 10)[0]
    eos, extra = free[0], free[2]
    for k in (0, 3, 10):
        sp = dataclasses.replace(sampling, min_tokens=k)
        want = [generate_batch(model, [p], max_new_tokens=10, sampling=sp, stop_ids=[eos, extra])[0].ids
                for p in prompts]
        for config in (dict(), dict(num_blocks=8, block_size=4, max_batch=3)):
            engine = Engine(model, **config)
            engine.stop_ids = frozenset({eos})
            got = engine.generate(prompts, max_tokens=10, sampling=sp, stop_token_ids=[extra])
            assert [o[0].token_ids for o in got] == want
            assert all(len(o[0].token_ids) >= k for o in got)
            _pool_is_full(engine)
        if sampling.greedy:
            got = Engine(model).generate(prompts[:1], max_tokens=10, sampling=sp, n=2, stop_token_ids=[eos, extra])
            assert [o.token_ids for o in got[0]] == [want[0], want[0]]
    # with ignore_eos, EOS is an ordinary token: min_tokens masks only the request's stop ids
    engine = Engine(model)
    engine.stop_ids = frozenset({eos})
    sp = SamplingParams(min_tokens=3)
    got = engine.generate(prompts[:1], max_tokens=10, sampling=sp, ignore_eos=True, stop_token_ids=[extra])[0][0]
    want = generate_batch(model, prompts[:1], max_new_tokens=10, sampling=sp, stop_ids=[extra])[0].ids
    assert got.token_ids == want and want[0] == eos


def test_min_tokens_keeps_stop_strings_off_until_then(llama3_tokenizer):
    """vLLM's detokenizer looks for stop strings only once more than min_tokens tokens are out: with
    min_tokens 5 and stop "e", " is Lee, and I'm a student" ends at " is Lee, and I'm a stud"
    (vllm tests/detokenizer/test_min_tokens.py). Here: a one-character stop that occurs in the
    first k tokens' text and again after them."""
    tok = llama3_tokenizer
    model = _model(PRESETS["debug"].replace(vocab_size=tok.vocab_size, tie_embeddings=True))
    engine = Engine(model, tok)
    prompt = tok.encode("Once upon a time", bos=True)
    free = engine.generate([prompt], max_tokens=30, ignore_eos=True)[0][0]
    k = 4
    head = tok.decode(free.token_ids[:k])
    assert free.text.startswith(head)
    stop = next(c for c in head if c.strip() and c in free.text[len(head):])
    out = engine.generate([prompt], max_tokens=30, ignore_eos=True, stop_strings=[stop])[0][0]
    assert out.text == free.text[:free.text.index(stop)] and out.finish_reason == "stop"
    out = engine.generate([prompt], max_tokens=30, ignore_eos=True, stop_strings=[stop],
                          sampling=SamplingParams(min_tokens=k))[0][0]
    assert out.text == free.text[:free.text.index(stop, len(head))] and out.finish_reason == "stop"
    _pool_is_full(engine)


@pytest.mark.parametrize("kw, words", [
    (dict(stop_token_ids=[-1]), "stop_token_ids: token id -1 is outside"),
    (dict(stop_token_ids=[512]), "stop_token_ids: token id 512 is outside the model's vocabulary of 512"),
    (dict(stop_token_ids=[1.5]), "stop_token_ids must be whole-number token ids, got 1.5"),
    (dict(stop_token_ids=[True]), "stop_token_ids must be whole-number token ids"),
    (dict(stop_token_ids=7), "stop_token_ids must be a list of token ids, got 7"),
    (dict(sampling=SamplingParams(min_tokens=5)), "min_tokens must be less than or equal to max_tokens=4, got 5"),
])
def test_bad_stop_token_ids_and_min_tokens_are_refused(kw, words):
    engine = Engine(_model(PRESETS["debug"]), num_blocks=8, block_size=4)
    with pytest.raises(HerdError, match=words):
        engine.submit([1, 2], max_tokens=4, **kw)
    assert not engine.has_work
    _pool_is_full(engine)
