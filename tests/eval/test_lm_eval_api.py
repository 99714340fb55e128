"""lm-evaluation-harness's API model (`local-completions`, lm_eval 0.4.x) against `herd serve` on the
real SmolLM2 GGUF, end to end: lm-eval builds the requests (token ids, echo, logprobs 1,
max_tokens 1) and parses herd's answers itself. Its loglikelihoods, is_greedy flags,
loglikelihood_rolling sums and greedy generate_until texts must be those of lm-eval's own HFLM on
transformers' reading of the same file, and a multiple-choice task's acc / acc_norm / acc_bytes
those of `herd eval` on the same items (raw and through the chat template).

The tokenizer lm-eval uses client-side is transformers' GGUF tokenizer with the hub's digit
pre-tokenizer restored (tests/eval/test_lm_eval_parity.py says why), saved to a directory so that
both lm-eval models load it by path, offline."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("lm_eval")
for _module in ("aiohttp", "tenacity", "requests"):  # lm-eval's API models need these (lm-eval[api])
    pytest.importorskip(_module)


from tests.inference.servers import smollm2_server  # noqa: E402

TOL = 1e-3  # the brief's; the runs here agree to a few 1e-5 (fp32 on both sides, other op orders)

# (context, continuation): an empty context (lm-eval's prefix token, <|im_start|> here, before the
# continuation), a context ending in a space (moved to the continuation), digits, non-ASCII, greedy
# and non-greedy continuations, a continuation of several tokens.
PAIRS = [
    ("The capital of France is", " Paris"),
    ("Question: 2+2=?\nAnswer: ", "4"),
    ("Question: 12*3=?\nAnswer:", " 36 apples"),
    ("Un café, s'il vous", " plaît"),
    ("", "Hello world"),
    ("Q: What colour is the sky?\nA:", "  blue"),
    ("The opposite of hot is", " cold"),
    ("Once upon a time 🐉", " there was a dragon 世界"),
]

# Multiple choice, the items of tests/eval/test_lm_eval_parity.py and a few more.
MC = [
    ("The capital of France is", ["Paris", "London", "Rome"], 0),
    ("Question: 2+2=?\nAnswer: ", ["4", "5", "22"], 0),
    ("Q: What colour is the sky?\nA:", [" blue", "green"], 0),
    ("Un café, s'il vous", ["plaît", "plait", "please"], 0),
    ("The opposite of hot is", ["cold", "warm and sunny", "ice"], 0),
    ("Water freezes at", ["0 degrees", "100 degrees"], 0),
    ("The largest planet in the solar system is", ["Jupiter", "Mars", "Earth", "Venus"], 0),
    ("Question: How many legs does a spider have?\nAnswer:", ["8", "6", "10"], 0),
    ("Cats are animals that", ["meow", "bark", "moo"], 0),
    ("The sun rises in the", ["east", "west"], 0),
    ("日本の首都は", ["東京", "大阪"], 0),
    ("2, 4, 6, 8,", ["10", "12", "9"], 0),
]

ROLLING = [
    "The quick brown fox jumps over the lazy dog.",
    # Longer than the windows below: several disjoint windows, each after the previous one's tokens.
    "In 1969, Neil Armstrong and Buzz Aldrin became the first people to walk on the Moon, while "
    "Michael Collins orbited above in the command module. Café, 世界, 🐉 and 12345 too.",
]

GEN = [  # (context, until, max_gen_toks)
    ("Q: What is the capital of France?\nA:", ["\n", "."], 24),
    ("List three colours:\n1.", ["\n\n", "4."], 24),
    ("def add(a, b):\n", ["\ndef"], 12),  # cut by max_gen_toks
]


# ---- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hub_tok(hf_smollm2_hub_tokenizer):
    return hf_smollm2_hub_tokenizer  # the tokenizer lm-eval loads from the hub (tests/conftest.py)


@pytest.fixture(scope="module")
def tok_dir(hub_tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("smollm2_tokenizer")
    hub_tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def served(smollm2_gguf):
    """`herd serve`'s app on the GGUF, loaded as `herd serve` and `herd eval` load it."""
    with smollm2_server(smollm2_gguf) as (server, model, tok, _engine):
        yield server, model, tok


def _api(served, tok_dir, **kw):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    server = served[0]
    return LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="smollm2", tokenizer=tok_dir,
                               tokenizer_backend="huggingface", max_retries=1, timeout=120, **kw)


@pytest.fixture(scope="module")
def api(served, tok_dir):
    """Built as `lm_eval --model local-completions --model_args ...` builds it."""
    from lm_eval.api.registry import get_model

    return get_model("local-completions").create_from_arg_string(
        f"model=smollm2,base_url={served[0].url}/v1/completions,tokenizer={tok_dir},"
        "tokenizer_backend=huggingface,max_retries=1")


@pytest.fixture(scope="module")
def hflm(hf_smollm2, hub_tok):
    from lm_eval.models.huggingface import HFLM

    # Batches of 8 (right-padded, each row's own positions): the same numbers as batch 1 to ~1e-6.
    return HFLM(pretrained=hf_smollm2, tokenizer=hub_tok, batch_size=8)


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, j) for j, a in enumerate(args)]


@pytest.fixture(scope="module")
def hf_pairs(hflm):
    return hflm.loglikelihood(_requests("loglikelihood", PAIRS))


def _same_loglikelihoods(got, want):
    assert len(got) == len(want)
    for (lp, greedy), (lp_hf, greedy_hf) in zip(got, want, strict=True):
        assert abs(lp - lp_hf) < TOL, (got, want)
        assert bool(greedy) == bool(greedy_hf), (got, want)


# ---- loglikelihood --------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    {},                                     # one request per pair, in lm-eval's order
    {"batch_size": 3},                      # several token-id prompts per request
    {"num_concurrent": 2, "batch_size": 2},  # lm-eval's async (aiohttp) path, requests in flight together
], ids=["sequential", "batched", "concurrent"])
def test_loglikelihood_is_hflm_one(served, tok_dir, hf_pairs, kw):
    want = hf_pairs
    assert any(g for _, g in want) and not all(g for _, g in want)  # both flags are exercised
    got = _api(served, tok_dir, **kw).loglikelihood(_requests("loglikelihood", PAIRS))
    _same_loglikelihoods(got, want)


def test_loglikelihood_from_text_prompts(served, tok_dir, hf_pairs):
    """tokenized_requests=False: lm-eval sends the text of context + continuation and counts the
    context's tokens with its own tokenizer; herd tokenizes the text the same way (no BOS)."""
    keep = [j for j, p in enumerate(PAIRS) if p[0]]  # an empty context sends the prefix token's text: below
    pairs, want = [PAIRS[j] for j in keep], [hf_pairs[j] for j in keep]
    got = _api(served, tok_dir, tokenized_requests=False).loglikelihood(_requests("loglikelihood", pairs))
    _same_loglikelihoods(got, want)


def test_text_prompt_with_special_token_text_is_parsed_as_vllm(served, tok_dir, hflm):
    """lm-eval with tokenized_requests=False decodes an empty context's prefix token to its text
    ("<|im_start|>") and sends "<|im_start|>Hello world"; with --apply_chat_template the whole
    template's text. vLLM (and the HF tokenizer lm-eval counted ctxlen with) reads it as one token."""
    pairs = [("", "Hello world")]
    want = hflm.loglikelihood(_requests("loglikelihood", pairs))
    got = _api(served, tok_dir, tokenized_requests=False).loglikelihood(_requests("loglikelihood", pairs))
    _same_loglikelihoods(got, want)


# ---- loglikelihood_rolling ------------------------------------------------------------------------

def test_loglikelihood_rolling_is_hflm_one(served, tok_dir, hf_smollm2, hub_tok):
    """One window (the defaults) and several: the API model's windows are max_length - 2 tokens,
    HFLM's max_length, so 26 and 24 cut the text at the same places."""
    from lm_eval.models.huggingface import HFLM

    n_tokens = len(hub_tok(ROLLING[1]).input_ids)
    assert n_tokens > 2 * 24  # three windows at least
    for api_len, hf_len in [(2048, 2048), (26, 24)]:
        hf = HFLM(pretrained=hf_smollm2, tokenizer=hub_tok, batch_size=1, max_length=hf_len)
        want = hf.loglikelihood_rolling(_requests("loglikelihood_rolling", [(s,) for s in ROLLING]))
        got = _api(served, tok_dir, max_length=api_len).loglikelihood_rolling(
            _requests("loglikelihood_rolling", [(s,) for s in ROLLING]))
        assert got == pytest.approx(want, abs=TOL), (api_len, got, want)
    assert all(math.isfinite(x) and x < 0 for x in got)


# ---- generate_until -------------------------------------------------------------------------------

def _gen_args():
    return [(ctx, {"until": until, "max_gen_toks": n, "do_sample": False}) for ctx, until, n in GEN]


@pytest.fixture(scope="module")
def hf_gen(hflm):
    return hflm.generate_until(_requests("generate_until", _gen_args()))


@pytest.mark.parametrize("tokenized", [True, False], ids=["token_ids", "text"])
def test_generate_until_is_hflm_greedy_text(served, tok_dir, hf_gen, tokenized):
    """Greedy (lm-eval's temperature 0), cut before the first `until` string (and the EOS text lm-eval
    adds to them) or at max_gen_toks, as HFLM cuts its own generation."""
    args, want = _gen_args(), hf_gen
    got = _api(served, tok_dir, tokenized_requests=tokenized).generate_until(_requests("generate_until", args))
    assert got == want
    for text, (_, until, _) in zip(got, GEN, strict=True):
        assert text and not any(u in text for u in until)
    assert got[0].strip() and "Paris" in got[0]


HUMANEVAL_UNTIL = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # lm_eval/tasks/humaneval/humaneval.yaml


def test_generate_until_with_a_code_task_s_stop_strings(served, tok_dir, hflm):
    args = [("def add(a, b):\n", {"until": HUMANEVAL_UNTIL, "max_gen_toks": 24, "do_sample": False})]
    want = hflm.generate_until(_requests("generate_until", args))
    got = _api(served, tok_dir).generate_until(_requests("generate_until", args))
    assert got == want


# ---- a multiple-choice task: lm-eval (API and HF) and herd eval ------------------------------------

def _task(path):
    return {"task": "herd_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "prompt",
            "doc_to_choice": "choices", "doc_to_target": "answer",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm", "acc_bytes")]}


def _lm_eval(lm, task, chat: bool):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_defaults=False),
                                  log_samples=True, bootstrap_iters=1,  # 1: mean_stderr's closed form
                                  apply_chat_template=chat)
    samples = sorted(out["samples"]["herd_mc"], key=lambda s: s["doc_id"])
    return out["results"]["herd_mc"], [[r[0][0] for r in s["resps"]] for s in samples]


@pytest.mark.parametrize("chat", [False, True], ids=["raw", "apply_chat_template"])
def test_multiple_choice_task_agrees_with_hflm_and_herd_eval(served, api, hflm, tmp_path, monkeypatch, chat):
    from herd.cli import main

    items = MC if not chat else MC[:6]  # the template's longer contexts: fewer items, to keep the time down
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "choices": c, "answer": a}) + "\n" for p, c, a in items))
    task = _task(path)
    got, got_lls = _lm_eval(api, task, chat)
    want, want_lls = _lm_eval(hflm, task, chat)
    for a, b in zip(got_lls, want_lls, strict=True):
        assert a == pytest.approx(b, abs=TOL)

    # herd eval on the same file, through its command line (the model `herd serve` holds: the same load).
    _, model, tok = served
    monkeypatch.setattr("herd.train.posttrain_cli._inference_model", lambda spec, chat=True: (model, tok))
    out = tmp_path / "herd_eval.json"
    flag = "--apply-chat-template" if chat else "--no-apply-chat-template"
    assert main(["eval", "--task", str(path), flag, "--out", str(out)]) in (0, None)
    report = json.loads(out.read_text())[str(path)]
    assert report["chat_template"] is chat
    for a, b in zip(report["choice_logprobs"], got_lls, strict=True):
        assert a == pytest.approx(b, abs=TOL)
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert got[f"{metric},none"] == want[f"{metric},none"] == report[metric], metric
        assert report[f"{metric}_stderr"] == pytest.approx(got[f"{metric}_stderr,none"], abs=1e-12), metric
    assert 0 < report["acc"] < 1  # the items tell the scores apart

