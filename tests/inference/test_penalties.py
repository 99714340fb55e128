"""presence_penalty, frequency_penalty, logit_bias and vLLM's repetition_penalty: SamplingParams'
checks, `process_logits` against transformers' RepetitionPenaltyLogitsProcessor and OpenAI's
formula, the engine per sample, and the server's greedy text on the real SmolLM2 GGUF against a
greedy loop over transformers' logits of the same file with the same rules."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from herd.errors import HerdError
from herd.inference.engine import Engine
from herd.inference.sampling import SamplingParams, TokenCounts, process_logits, sample
from herd.inference.server import TokenTexts
from herd.models.args import ModelArgs

from .servers import debug_server, random_model, smollm2_server

GQA3 = ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300, ffn_hidden_dim=160,
                 rope_theta=10000.0, max_seq_len=128, tie_embeddings=True)


def _reference(logits: torch.Tensor, prompt: list[int], out: list[int], *, presence=0.0, frequency=0.0,
               repetition=1.0, bias=None) -> torch.Tensor:
    """(V,) logits → penalised logits, written from the specs: logit_bias added; transformers'
    RepetitionPenaltyLogitsProcessor over prompt + output; OpenAI's
    logit[j] -= count[j] * frequency + (count[j] > 0) * presence over the output only."""
    x = logits.float().clone()
    for t, v in (bias or {}).items():
        x[t] += v
    if repetition != 1.0:
        x = RepetitionPenaltyLogitsProcessor(repetition)(torch.tensor([prompt + out]), x[None])[0]
    for j in set(out):
        x[j] -= out.count(j) * frequency + presence
    return x


# ---- SamplingParams and process_logits ----------------------------------------------------------

@pytest.mark.parametrize("kw, words", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"), (dict(presence_penalty="1"), "presence_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"), (dict(repetition_penalty=True), "repetition_penalty"),
    (dict(logit_bias={5: 101}), "logit_bias"), (dict(logit_bias={-1: 1}), "logit_bias"),
    (dict(logit_bias={"5": 1}), "logit_bias"), (dict(logit_bias={5: "x"}), "logit_bias"),
    (dict(logit_bias={5: float("nan")}), "logit_bias"), (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"), (dict(logprobs=True), "logprobs"),
    (dict(logprobs=2.0), "logprobs"),
])
def test_sampling_params_refuse_bad_values(kw, words):
    with pytest.raises(HerdError, match=words):
        SamplingParams(**kw)


def test_sampling_params_keep_bias_as_sorted_pairs():
    sp = SamplingParams(logit_bias={9: -100, 2: 0.5})
    assert sp.logit_bias == ((2, 0.5), (9, -100.0)) and sp.penalized
    assert hash(sp) == hash(SamplingParams(logit_bias=((9, -100), (2, 0.5))))
    assert not SamplingParams().penalized


@pytest.mark.parametrize("kw", [
    dict(presence=0.7), dict(frequency=-1.2), dict(repetition=1.5), dict(repetition=0.7),
    dict(presence=0.3, frequency=0.9, repetition=1.3, bias={4: 3.0, 17: -100.0}),
])
def test_process_logits_is_the_spec(kw):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, generator=g) * 3
    prompts, outs = [[1, 2, 3, 3], [7]], [[3, 3, 9, 40, 9, 3], []]
    sp = SamplingParams(presence_penalty=kw.get("presence", 0.0), frequency_penalty=kw.get("frequency", 0.0),
                        repetition_penalty=kw.get("repetition", 1.0), logit_bias=kw.get("bias", {}))
    counts = [TokenCounts(p).sync(o, 50, logits.device) for p, o in zip(prompts, outs, strict=True)]
    got = process_logits(logits, sp, counts=counts)
    for r in range(2):
        torch.testing.assert_close(got[r], _reference(logits[r], prompts[r], outs[r], **kw))
    # Greedy sampling takes the processed argmax.
    assert sample(logits, sp, counts=counts).tolist() == got.argmax(-1).tolist()


def test_process_logits_keeps_suppressed_ids_out():
    logits = torch.zeros(1, 10)
    sp = SamplingParams(suppress=(3,), logit_bias={3: 100}, presence_penalty=-2)
    assert process_logits(logits, sp, counts=[TokenCounts([]).sync([3], 10, "cpu")])[0, 3] == float("-inf")


def test_token_counts_read_each_output_token_once_and_equal_the_recount():
    """Penalised decoding recounted every row's whole prompt and output at each step (O(T) per
    token, so a long generation slowed as it grew); TokenCounts reads each new output token once
    and gives process_logits exactly the recount's numbers."""
    class Reads(list):
        n = 0

        def __getitem__(self, i):
            Reads.n += 1
            return super().__getitem__(i)

    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(presence_penalty=0.4, frequency_penalty=-0.7, repetition_penalty=1.6, logit_bias={3: 2.0})
    prompt, out = [1, 2, 3, 3, 49], Reads()
    counts = TokenCounts(prompt)
    for _ in range(40):
        logits = torch.randn(1, 50, generator=g) * 3
        counts.sync(out, 50, logits.device)
        got = process_logits(logits, sp, counts=[counts])
        torch.testing.assert_close(got[0], _reference(logits[0], prompt, list(out), presence=0.4, frequency=-0.7,
                                                      repetition=1.6, bias={3: 2.0}))
        out.append(int(torch.randint(0, 12, (1,), generator=g)))  # repeats, so counts go past 1
    assert Reads.n == len(out) - 1  # the last token was appended after the last sync
    # a token list that is not the one counted (shorter) starts again rather than go wrong
    assert torch.equal(counts.sync([7, 7], 50, "cpu").output, torch.bincount(torch.tensor([7, 7]), minlength=50).float())


# ---- the engine -----------------------------------------------------------------------------------

_model = random_model


@torch.no_grad()
def _greedy_reference(model, prompt, steps, **kw):
    ids = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([ids]))[0, -1]
        ids.append(int(_reference(logits, prompt, ids[len(prompt):], **kw).argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("kw", [
    dict(frequency=1.5), dict(presence=2.0), dict(repetition=1.8), dict(bias={5: 30.0, 6: -100.0}),
    dict(frequency=0.8, presence=0.5, repetition=1.4, bias={5: 5.0}),
])
def test_engine_greedy_penalties_per_sample(kw):
    """Greedy with penalties equals the reference loop; n greedy samples of one request, each
    penalised by its own tokens, all equal it (counts shared across samples would not), through
    chunked prefill and preemption."""
    model = _model(GQA3)
    prompt = [5, 9, 5, 9, 5, 9, 11, 12, 11, 12, 200, 201, 5]
    sp = SamplingParams(presence_penalty=kw.get("presence", 0.0), frequency_penalty=kw.get("frequency", 0.0),
                        repetition_penalty=kw.get("repetition", 1.0), logit_bias=kw.get("bias", {}))
    want = _greedy_reference(model, prompt, 24, **kw)
    assert want != _greedy_reference(model, prompt, 24)  # the penalty changes the text
    engine = Engine(model, num_blocks=27, max_batch=6, max_prefill_tokens=5, block_size=4)
    outs = engine.generate([prompt, list(range(30, 50))], max_tokens=24, n=3, sampling=sp)
    assert engine.stats["preemptions"] > 0
    assert [o.token_ids for o in outs[0]] == [want] * 3


@pytest.mark.parametrize("kw", [dict(frequency=1.5), dict(repetition=1.8),
                                dict(frequency=0.8, presence=0.5, repetition=1.4, bias={5: 5.0})])
def test_generate_ids_penalises_each_row_by_its_own_tokens(kw):
    """herd.generate's path (generate_ids) gives the reference loop's tokens for every row of a
    left-padded batch, greedy and seeded (it used to raise: sample() got no token ids)."""
    from herd.inference.generate import generate_ids

    model = _model(GQA3)
    prompts = [[5, 9, 5, 9, 5, 9, 11, 12, 11, 12, 200, 201, 5], [30, 31, 30, 31, 7]]
    want = [_greedy_reference(model, p, 16, **kw) for p in prompts]
    for seed in (None, 3):
        sp = SamplingParams(presence_penalty=kw.get("presence", 0.0), frequency_penalty=kw.get("frequency", 0.0),
                            repetition_penalty=kw.get("repetition", 1.0), logit_bias=kw.get("bias", {}), seed=seed)
        rows = [[], []]
        for step in generate_ids(model, prompts, max_new_tokens=16, sampling=sp):
            for r, t in zip(rows, step, strict=True):
                if t is not None:
                    r.append(t)
        assert rows == want


def test_engine_refuses_bias_outside_the_vocabulary():
    engine = Engine(_model(GQA3), num_blocks=16)
    with pytest.raises(HerdError, match="logit_bias: token id 300 is outside"):
        engine.submit([1, 2], max_tokens=2, sampling=SamplingParams(logit_bias={300: 1.0}))


# ---- the server on the real SmolLM2 ---------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    with smollm2_server(smollm2_gguf) as (server, model, tok, _engine):
        yield server, tok


class _Bias(LogitsProcessor):
    def __init__(self, bias):
        self.bias = bias

    def __call__(self, input_ids, scores):
        for t, v in self.bias.items():
            scores[:, t] += v
        return scores


class _OpenAIPenalties(LogitsProcessor):
    """OpenAI's formula over the generated tokens only (input_ids after the prompt)."""

    def __init__(self, prompt_len, presence, frequency):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        out = input_ids[0, self.prompt_len:].tolist()
        for j in set(out):
            scores[0, j] -= out.count(j) * self.frequency + self.presence
        return scores


@torch.no_grad()
def _hf_greedy(hf, prompt, steps, stop_ids=None, **kw):
    """transformers' greedy generate on the same GGUF, with the processors in vLLM's order: bias,
    repetition (transformers' own processor, over prompt + output), frequency and presence."""
    procs = LogitsProcessorList()
    if kw.get("bias"):
        procs.append(_Bias(kw["bias"]))
    if kw.get("repetition", 1.0) != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(kw["repetition"]))
    if kw.get("presence") or kw.get("frequency"):
        procs.append(_OpenAIPenalties(len(prompt), kw.get("presence", 0.0), kw.get("frequency", 0.0)))
    x = torch.tensor([prompt])
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps, do_sample=False,
                      logits_processor=procs, eos_token_id=sorted(stop_ids) if stop_ids else None, pad_token_id=0,
                      **({} if stop_ids else {"min_new_tokens": steps}))
    ids = out[0, len(prompt):].tolist()
    if stop_ids:
        ids = ids[:next((j for j, t in enumerate(ids) if t in stop_ids), len(ids))]
    return ids


TEXT = "List the fruits: apple, banana, apple, banana, apple, banana,"
STEPS = 12


@pytest.fixture(scope="module")
def plain(smol, hf_smollm2):
    _, tok = smol
    prompt = tok.encode(TEXT, bos=tok.bos_id is not None and tok.add_bos)
    return prompt, _hf_greedy(hf_smollm2, prompt, STEPS)


@pytest.mark.parametrize("kw", [
    dict(frequency=1.0), dict(presence=2.0), dict(repetition=1.3),
    dict(frequency=0.4, presence=0.4, repetition=1.2, bias="first"),
])
def test_server_greedy_penalties_match_transformers(smol, hf_smollm2, plain, kw):
    server, tok = smol
    prompt, plain = plain
    if kw.get("bias") == "first":  # ban greedy's first token, push a word that was not coming
        kw = {**kw, "bias": {plain[0]: -100.0, tok.encode(" cherry")[0]: 8.0}}
    want = _hf_greedy(hf_smollm2, prompt, STEPS, **kw)
    assert want != plain  # the rule changes the text: the test is not vacuous
    body = {"prompt": TEXT, "max_tokens": STEPS, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    body |= {"frequency_penalty": kw.get("frequency"), "presence_penalty": kw.get("presence"),
             "repetition_penalty": kw.get("repetition"),
             "logit_bias": {str(t): v for t, v in kw["bias"].items()} if "bias" in kw else None}
    r = httpx.post(server.url + "/v1/completions", json={k: v for k, v in body.items() if v is not None}, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    texts = TokenTexts(tok)
    assert choice["logprobs"]["tokens"] == [texts(t, want[:j]) for j, t in enumerate(want)]
    assert choice["text"] == tok.decode(want)


def test_openai_client_sends_penalties_and_bias(smol, hf_smollm2):
    """The official client's own fields (and repetition_penalty through extra_body, as vLLM's docs
    show) reach the sampler: chat greedy text equals the transformers loop."""
    server, tok = smol
    messages = [{"role": "user", "content": "Write the word 'hello' five times."}]
    prompt = tok.chat.encode_dialog(messages)
    kw = dict(frequency=0.6, presence=0.3, repetition=1.15, bias={tok.encode(" hello")[0]: -3.0})
    want = _hf_greedy(hf_smollm2, prompt, 16, tok.stop_ids, **kw)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=16, temperature=0, frequency_penalty=0.6,
        presence_penalty=0.3, logit_bias={str(t): v for t, v in kw["bias"].items()},
        extra_body={"repetition_penalty": 1.15})
    assert reply.choices[0].message.content == tok.decode(want)


# ---- bad values ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def debug():
    with debug_server(max_batch=8, num_blocks=64, max_n=4) as got:
        yield got


@pytest.mark.parametrize("body, param, words", [
    ({"presence_penalty": 2.5}, "presence_penalty", "between -2 and 2"),
    ({"frequency_penalty": -3}, "frequency_penalty", "between -2 and 2"),
    ({"frequency_penalty": "1"}, "frequency_penalty", "between -2 and 2"),
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"repetition_penalty": True}, "repetition_penalty", "greater than 0"),
    ({"logit_bias": [1, 2]}, "logit_bias", "must be an object"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "keys must be token ids"),
    ({"logit_bias": {"-5": 1}}, "logit_bias", "keys must be token ids"),
    ({"logit_bias": {"1.5": 1}}, "logit_bias", "keys must be token ids"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias", "outside the vocabulary"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "between -100 and 100"),
    ({"logit_bias": {"5": "1"}}, "logit_bias", "between -100 and 100"),
    ({"logit_bias": {"5": True}}, "logit_bias", "between -100 and 100"),
    ({"logit_bias": {"5": 1, "05": 2}}, "logit_bias", "twice"),
    # vLLM's extras
    ({"min_p": 1.5}, "min_p", "in [0, 1]"), ({"min_p": -0.1}, "min_p", "in [0, 1]"), ({"min_p": "0.1"}, "min_p", "in [0, 1]"),
    ({"min_tokens": -1}, "min_tokens", "between 0"), ({"min_tokens": 1.5}, "min_tokens", "integer"),
    ({"min_tokens": 3}, "min_tokens", "less than or equal to max_tokens=2, got 3"),
    ({"stop_token_ids": 5}, "stop_token_ids", "list of token ids"),
    ({"stop_token_ids": [1.5]}, "stop_token_ids", "list of token ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "token id -1 is"),
    ({"stop_token_ids": [128256]}, "stop_token_ids", "outside the vocabulary of 128256"),
])
@pytest.mark.parametrize("path", ["chat", "completions"])
def test_bad_sampling_values_are_one_line_400s(debug, path, body, param, words):
    server, *_ = debug
    base = {"messages": [{"role": "user", "content": "hi"}]} if path == "chat" else {"prompt": "hi"}
    r = httpx.post(f"{server.url}/v1/{'chat/' if path == 'chat' else ''}completions", timeout=60,
                   json={**base, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and "\n" not in err["message"], err


@pytest.mark.parametrize("body", [
    {"presence_penalty": 0}, {"frequency_penalty": None}, {"logit_bias": {}}, {"logit_bias": None},
    {"repetition_penalty": 1}, {"presence_penalty": -2, "frequency_penalty": 2, "logit_bias": {"0": -100}},
])
def test_neutral_and_edge_penalties_are_accepted(debug, body):
    server, *_ = debug
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, **body}, timeout=60)
    assert r.status_code == 200, r.text

def test_stop_token_ids_and_min_tokens_reach_the_engine(debug):
    server, model, tok, engine = debug
    prompt = tok.encode("Once upon a time", bos=True)
    free = engine.generate([prompt], max_tokens=10, ignore_eos=True)[0][0].token_ids
    stop = free[3]
    body = {"prompt": prompt, "max_tokens": 10, "ignore_eos": True, "temperature": 0, "stop_token_ids": [stop]}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    # vLLM: finish_reason "stop", the stop id not in the text, but counted in usage
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == tok.decode(free[:free.index(stop)])
    assert r["usage"]["completion_tokens"] == free.index(stop) + 1
    r = httpx.post(server.url + "/v1/completions", json={**body, "min_tokens": 6}, timeout=60).json()
    assert r["usage"]["completion_tokens"] >= 6 and r["choices"][0]["text"].startswith(tok.decode(free[:3]))
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "min_p": 0.5,
                         "temperature": 1, "min_tokens": 3, "stop_token_ids": [1, 2]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
