"""vLLM's tokenizer endpoints on `herd serve`: POST /tokenize (a text prompt or a chat dialog),
POST /detokenize, GET /tokenizer_info — what lm-eval's `tokenizer_backend="remote"` (RemoteTokenizer,
lm_eval/utils.py) reads. The protocol and bad input on the debug server; on the real SmolLM2 GGUF:
/tokenize's ids are herd's tokenizer's and transformers' on the same file, a dialog's ids are the
chat endpoint's prompt, /detokenize round-trips, and lm-eval's local-completions with the remote
tokenizer gives the loglikelihoods its huggingface-backend path gives."""

from __future__ import annotations

import copy

import httpx
import pytest

from .servers import debug_server, smollm2_server

USER = [{"role": "user", "content": "Name a colour."}]


# ---- protocol and bad input on the debug server (Llama 3 tokenizer) -------------------------------

@pytest.fixture(scope="module")
def debug():
    with debug_server(max_batch=4, num_blocks=32, max_n=2) as (server, _, tok, _engine):
        yield server, tok


def _post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=60)


def test_tokenize_a_prompt_as_completions_reads_it(debug):
    server, tok = debug
    text = "Hello <|eot_id|> world"
    r = _post(server, "/tokenize", {"prompt": text, "return_token_strs": True, "model": "debug"})
    assert r.status_code == 200, r.text
    out = r.json()
    ids = tok.encode(text, bos=True, allow_special=True)  # as /v1/completions: BOS, the special token as itself
    assert out == {"count": len(ids), "max_model_len": 256, "tokens": ids,
                   "token_strs": ["<|begin_of_text|>", "Hello", "Ġ", "<|eot_id|>", "Ġworld"]}
    r = _post(server, "/tokenize", {"prompt": text, "add_special_tokens": False})
    assert r.json()["tokens"] == ids[1:] and r.json()["token_strs"] is None
    assert _post(server, "/tokenize", {"prompt": ""}).json()["tokens"] == [tok.bos_id]


def test_tokenize_a_dialog_as_chat_reads_it(debug):
    server, tok = debug
    with_prompt = tok.chat.encode_dialog(USER, add_generation_prompt=True)
    without = tok.chat.encode_dialog(USER, add_generation_prompt=False)
    assert with_prompt[0] == tok.bos_id and without != with_prompt
    assert _post(server, "/tokenize", {"messages": USER}).json()["tokens"] == with_prompt
    assert _post(server, "/tokenize", {"messages": USER, "add_generation_prompt": False}).json()["tokens"] == without
    # The dialog starts with BOS already: add_special_tokens adds no second one.
    r = _post(server, "/tokenize", {"messages": USER, "add_special_tokens": True, "continue_final_message": False})
    assert r.json()["tokens"] == with_prompt
    # Its count is the prompt the chat endpoint runs.
    r = _post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == len(with_prompt)


def test_detokenize_and_tokenizer_info(debug):
    server, tok = debug
    ids = tok.encode("Hello <|eot_id|> world", bos=True, allow_special=True)
    assert _post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": "<|begin_of_text|>Hello <|eot_id|> world"}
    assert _post(server, "/detokenize", {"tokens": [], "model": "debug"}).json() == {"prompt": ""}
    assert _post(server, "/detokenize", {"tokens": [], "model": ""}).json() == {"prompt": ""}  # vLLM: "" is it
    info = httpx.get(server.url + "/tokenizer_info", timeout=60).json()
    assert info["bos_token"] == "<|begin_of_text|>" and info["eos_token"] == "<|end_of_text|>"
    assert info["pad_token"] == "<|finetune_right_pad_id|>" and info["model_max_length"] == 256
    assert info["tokenizer_class"] == "TiktokenTokenizer" and "messages" in info["chat_template"]


@pytest.mark.parametrize("path, body, param, words", [
    ("/tokenize", {}, "prompt", "either prompt"),
    ("/tokenize", {"prompt": "a", "messages": USER}, "messages", "either prompt"),
    ("/tokenize", {"prompt": 5}, "prompt", "prompt must be a string"),
    ("/tokenize", {"prompt": ["a"]}, "prompt", "prompt must be a string"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens", "must be a boolean"),
    ("/tokenize", {"prompt": "a", "return_token_strs": 1}, "return_token_strs", "must be a boolean"),
    ("/tokenize", {"prompt": "a", "foo": 1}, "foo", "unrecognized request argument"),
    ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, "add_generation_prompt",
     "unrecognized request argument"),
    ("/tokenize", {"prompt": "a", "model": 5}, "model", "model must be a string"),
    ("/tokenize", {"messages": USER, "add_generation_prompt": 1}, "add_generation_prompt", "must be a boolean"),
    ("/tokenize", {"messages": USER, "chat_template": "x"}, "chat_template", "unrecognized request argument"),
    ("/tokenize", {"messages": USER, "continue_final_message": True}, "continue_final_message", "not supported"),
    ("/tokenize", {"messages": []}, "messages", "non-empty list"),
    ("/tokenize", {"messages": "hi"}, "messages", "non-empty list"),
    ("/tokenize", {"messages": [{"role": "user"}]}, "messages", ""),
    ("/tokenize", {"messages": USER, "tools": "x"}, "tools", "tools must be a list"),
    ("/tokenize", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, "messages", "text-only"),
    ("/detokenize", {}, "tokens", "tokens must be a list"),
    ("/detokenize", {"tokens": "1 2"}, "tokens", "tokens must be a list"),
    ("/detokenize", {"tokens": [1, "2"]}, "tokens", "must be integers"),
    ("/detokenize", {"tokens": [1, True]}, "tokens", "must be integers"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens", "outside the vocabulary"),
    ("/detokenize", {"tokens": [128256]}, "tokens", "outside the vocabulary"),
    ("/detokenize", {"tokens": [1], "prompt": "a"}, "prompt", "unrecognized request argument"),
])
def test_bad_input_is_a_one_line_400(debug, path, body, param, words):
    server, _ = debug
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and "\n" not in err["message"], err
    assert err["type"] == "invalid_request_error"


def test_other_bad_requests(debug):
    server, _ = debug
    r = _post(server, "/tokenize", {"prompt": "a", "model": "other"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = _post(server, "/detokenize", {"tokens": [1], "model": "other"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = httpx.post(server.url + "/tokenize", content=b"{not json", timeout=60)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/detokenize", content=b"[1, 2]", timeout=60)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/tokenize", timeout=60).status_code == 405


# ---- the real SmolLM2 GGUF --------------------------------------------------------------------------

# Plain text without digit runs: transformers' GGUF tokenizer splits digits otherwise than the hub's
# (tests/eval/test_lm_eval_api.py); herd's reads them as the hub does.
TEXTS = ["The capital of France is Paris.", "Un café, s'il vous plaît — 世界 🐉", "  two  spaces\n\nand lines\t",
         "<|im_start|>user\nHi<|im_end|>", ""]


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    with smollm2_server(smollm2_gguf) as (server, model, tok, _engine):
        yield server, tok


def test_smollm2_tokenize_is_herd_and_transformers_ids(smol, hf_smollm2_tokenizer):
    server, tok = smol
    hf = hf_smollm2_tokenizer
    for text in TEXTS:
        for special in (True, False):
            r = _post(server, "/tokenize", {"prompt": text, "add_special_tokens": special, "return_token_strs": True})
            assert r.status_code == 200, r.text
            out = r.json()
            # SmolLM2 adds no BOS to raw text: add_special_tokens changes nothing, as in transformers.
            assert out["tokens"] == tok.encode(text, allow_special=True) == hf(text, add_special_tokens=special).input_ids
            assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 8192
            assert out["token_strs"] == hf.convert_ids_to_tokens(out["tokens"])
            r = _post(server, "/detokenize", {"tokens": out["tokens"]})
            assert r.json()["prompt"] == text == hf.decode(out["tokens"])


def test_smollm2_chat_tokenize_is_the_chat_prompt(smol, hf_smollm2_tokenizer):
    server, tok = smol
    dialog = [{"role": "system", "content": "Be brief."}, *USER]
    for gen in (True, False):
        r = _post(server, "/tokenize", {"messages": dialog, "add_generation_prompt": gen})
        assert r.json()["tokens"] == hf_smollm2_tokenizer.apply_chat_template(
            dialog, add_generation_prompt=gen, tokenize=True, return_dict=False)
    out = _post(server, "/tokenize", {"messages": dialog}).json()
    r = _post(server, "/v1/chat/completions", {"messages": dialog, "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == out["count"]
    assert _post(server, "/detokenize", {"tokens": out["tokens"]}).json()["prompt"] == tok.decode(out["tokens"])
    info = httpx.get(server.url + "/tokenizer_info", timeout=60).json()
    hf = hf_smollm2_tokenizer
    assert (info["bos_token"], info["eos_token"]) == (hf.bos_token, hf.eos_token)
    assert info["chat_template"] == hf.chat_template and info["model_max_length"] == 8192


# ---- lm-eval's remote tokenizer -------------------------------------------------------------------

PAIRS = [  # (context, continuation): an empty context (the prefix token), digits, non-ASCII
    ("The capital of France is", " Paris"),
    ("Question: 12*3=?\nAnswer:", " 36 apples"),
    ("", "Hello world"),
    ("Once upon a time 🐉", " there was a dragon 世界"),
]


def test_lm_eval_remote_tokenizer_gives_the_huggingface_backend_numbers(smol, hf_smollm2_tokenizer, tmp_path):
    """lm-eval's local-completions with tokenizer_backend=remote (herd's /tokenize, /detokenize,
    /tokenizer_info) against the huggingface backend on the hub tokenizer, as
    tests/eval/test_lm_eval_api.py runs it: the same token ids go out, the same loglikelihoods
    come back."""
    pytest.importorskip("lm_eval")
    for module in ("aiohttp", "tenacity", "requests"):
        pytest.importorskip(module)
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from tokenizers import pre_tokenizers

    hub = copy.deepcopy(hf_smollm2_tokenizer)  # the hub's digit pre-tokenizer, as test_lm_eval_api.py
    hub.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hub.save_pretrained(tmp_path)
    server = smol[0]
    url = server.url + "/v1/completions"
    remote = LocalCompletionsAPI(base_url=url, model="smollm2", tokenizer_backend="remote", max_retries=1,
                                 timeout=120)
    local = LocalCompletionsAPI(base_url=url, model="smollm2", tokenizer=str(tmp_path),
                                tokenizer_backend="huggingface", max_retries=1, timeout=120)
    assert type(remote.tokenizer).__name__ == "RemoteTokenizer"
    assert remote.prefix_token_id == local.prefix_token_id and remote.eot_token_id == local.eot_token_id
    assert remote.eos_string == local.eos_string
    for ctx, cont in PAIRS:
        assert remote.tok_encode(ctx + cont) == local.tok_encode(ctx + cont)
    requests = [Instance("loglikelihood", {}, pair, j) for j, pair in enumerate(PAIRS)]
    got = remote.loglikelihood(requests)
    want = local.loglikelihood(copy.deepcopy(requests))
    assert len(got) == len(want) == len(PAIRS) and all(lp < 0 for lp, _ in got)
    for (lp, greedy), (lp_hf, greedy_hf) in zip(got, want, strict=True):
        assert lp == pytest.approx(lp_hf, abs=1e-4) and bool(greedy) == bool(greedy_hf), (got, want)


# A tools-aware template that writes each tool whole with `tojson`, as HF's Llama 3.1 and Qwen
# templates do: the prompt shows whether the server hands the template the tool objects the client
# sent ({"type": "function", "function": {...}}, as vLLM and apply_chat_template take them) or
# something else.
TOOLS_TEMPLATE = ("{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
                  "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_tools_reach_the_template_as_sent(smol, hf_smollm2_tokenizer):
    from herd.tokenizer.chat import TemplateChatFormat

    server, tok = smol
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    saved = tok.chat
    tok.chat = TemplateChatFormat(tok, TOOLS_TEMPLATE)
    try:
        r = _post(server, "/tokenize", {"messages": USER, "tools": tools})
    finally:
        tok.chat = saved
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == hf_smollm2_tokenizer.apply_chat_template(
        USER, tools=tools, chat_template=TOOLS_TEMPLATE, add_generation_prompt=True, tokenize=True, return_dict=False)
