"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn): `herd serve`.

Endpoints: GET /health, GET /v1/models (and /v1/models/{id}), POST /tokenize and /detokenize, GET
/tokenizer_info (vLLM's, below), POST /v1/completions and /v1/chat/completions — streamed as
server-sent events or not, `n` samples, `stop`, `max_tokens` (or chat's `max_completion_tokens`),
`temperature`, `top_p`, `top_k`, `seed`, `presence_penalty` and `frequency_penalty` (-2..2,
OpenAI's formula over each sample's generated tokens, as vLLM), `logit_bias` ({"token id":
-100..100}), vLLM's extras `repetition_penalty` (> 0, over prompt and output), `min_p` (0..1,
after temperature, before top-k/top-p), `min_tokens` (no stop token or stop string before that
many tokens), `stop_token_ids` (more ids that end a sample, "stop", not in its text) and
`ignore_eos`, and tool calls returned in OpenAI's `tool_calls` shape, parsed from the model's
output by the chat format (herd/tokenizer/chat.py). Each choice carries vLLM's `stop_reason`: the
`stop` string that ended it (the earliest in its text) or the `stop_token_ids` id, null for EOS,
length and the rest; streamed, null in every chunk but the choice's last (with its finish_reason).
`tools` for a checkpoint whose chat template has none are a 400 under tool_choice "auto"; OpenAI's
"developer" role is the system turn.

Structured outputs, through llguidance (vLLM's "guidance" backend; herd/inference/structured.py):
`response_format` {"type": "json_object"} (any JSON object) or {"type": "json_schema",
"json_schema": {"name", "schema", "strict"?}} on /v1/chat/completions and, as vLLM, on
/v1/completions: each sample's tokens are masked to what the schema allows next, and it stops when
the JSON is complete. tool_choice "required" constrains the reply to a JSON array of {"name",
"parameters"} calls of the tools (vLLM's schema) and a named function {"type": "function",
"function": {"name"}} to that function's parameters; both come back as OpenAI's `tool_calls` (a
named call's JSON is its arguments; "required"'s are the text of each item's "parameters", and it
finishes with "tool_calls"; both stream each call's arguments piece by piece after a first delta
that names the call, as vLLM streams them). A forced call needs no tool-aware template: the
constraint writes it. vLLM's own forms, on both endpoints: `structured_outputs` with exactly one of
"json" (a schema, or a JSON string of one), "regex" (the whole reply matches it), "choice" (a
non-empty list of strings: the reply is exactly one of them, metacharacters and all), "grammar"
(Lark in llguidance's dialect, or GBNF, which llguidance converts, as vLLM's guidance backend reads
it) or "json_object": true (its "disable_any_whitespace" makes JSON compact; "disable_fallback" is
a no-op), and the legacy guided_json / guided_regex / guided_choice / guided_grammar fields, the
same constraints. The reply is plain content and stops when the grammar is complete. One constraint
per reply: two of response_format, structured_outputs, a guided_* field and a forced tool_choice
are a 400 naming the second. A schema, regex or grammar llguidance cannot compile is a one-line 400
naming its field (response_format, structured_outputs, guided_*, tool_choice), as is a tool name
not among `tools`.

Logprobs, in vLLM's shapes: chat `logprobs: true` with `top_logprobs` 0..20 gives each choice (and
each streamed delta) `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`;
completions `logprobs: k` (0..20, vLLM's max_logprobs; OpenAI stops at 5) gives `{"tokens",
"token_logprobs", "top_logprobs", "text_offset"}`. They are the model's raw distribution
(log_softmax before bias, penalties, temperature, top-k/top-p: vLLM V1's "raw_logprobs"); the stop
token that ends a choice has its entry, as in vLLM. Token texts are vLLM's too (`TokenTexts`): a
byte-level piece of a character reads "" until the token that completes it, which carries it all.
Completions' `echo` puts the prompt before the text and, with `logprobs`, the prompt's logprobs
before the completion's (the first token's null; vLLM's prompt_logprobs), also with
`max_tokens: 0` — what lm-eval's local-completions sends for loglikelihoods. Chat's `echo`
(vLLM's: repeat the last message) is refused.

vLLM's tokenizer endpoints, which lm-eval's `tokenizer_backend="remote"` (RemoteTokenizer) reads, so
a client can count and split text with herd's own tokenizer: POST /tokenize takes {"prompt": str,
"add_special_tokens" (default true)} — encoded as /v1/completions encodes a text prompt (special-token
text is the special token; add_special_tokens: the BOS a raw prompt of this model starts with) — or
{"messages", "tools"?, "add_generation_prompt" (default true), "add_special_tokens" (default false:
true adds that BOS unless the dialog starts with it)}, the ids /v1/chat/completions runs for that
dialog; either with "model"? and "return_token_strs"? → {"count", "max_model_len", "tokens",
"token_strs"} (token_strs: each token's own spelling, as
transformers' convert_ids_to_tokens, or null). No context check, as vLLM's. POST /detokenize
{"tokens": [ids]} → {"prompt": text} (special tokens as their names). GET /tokenizer_info (vLLM's
behind --enable-tokenizer-info-endpoint; always on here): "tokenizer_class", "bos_token",
"eos_token", "pad_token", "unk_token" (texts or null), "add_bos_token", "chat_template" (the jinja
template of the model's chat format, or null) and "model_max_length".

Every request is validated before it reaches the engine; a bad one gets a 4xx with OpenAI's error
shape `{"error": {"message", "type", "param", "code"}}`: malformed or non-UTF-8 JSON, a body sent
as another Content-Type than JSON, unknown fields, wrong types, out-of-range values (OpenAI's
ranges: temperature 0..2, 0 < top_p ≤ 1, penalties -2..2; top_k ≥ -1 (0 and -1: off, as vLLM); at
most MAX_STOP stop sequences), token ids outside the vocabulary, prompts that do not fit the
context, bodies over the size limit (413), a full queue (429). OpenAI fields herd does not
implement (suffix, best_of, chat's echo) are refused when set to anything but their neutral value
rather than silently ignored. A client that goes away cancels its request, which frees its KV
blocks at once. On shutdown uvicorn stops accepting, lets in-flight requests finish (up to
`graceful_s` seconds), then the engine cancels whatever is left.

Images (a multimodal Llama 4): chat messages may hold OpenAI's image parts
`{"type": "image_url", "image_url": {"url": ...}}` in user turns, where the picture goes in the
text. The URL is a `data:image/...;base64,...` URL, or — only when the server was started with
`--allowed-local-media DIR` (vLLM's `--allowed-local-media-path`) — a `file://` path inside DIR.
http(s) URLs are refused: the server does not download. The pictures are preprocessed and laid out
in the prompt exactly as `herd.generate` does (herd/models/image_processing.py); the engine runs the
vision encoder once per request and keeps prefix sharing exact across images (engine.py).
Caps: images per request, decoded bytes and pixels per image (`Limits`).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at
# definition time, inside create_app, where fastapi is imported (lazily, so `herd --help` stays fast).
import asyncio
import base64
import binascii
import io
import json
import math
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urlparse

from herd.errors import HerdError
from herd.inference.engine import Engine, EngineBusy, Event, TokenLogprob
from herd.inference.generate import SEED_MAX, SEED_MIN
from herd.inference.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams

MAX_BODY_BYTES = 4 << 20
MAX_STOP = 32  # vLLM sets none; OpenAI's 4 refused lm-eval's humaneval (5 `until` + the EOS text)
MAX_STOP_CHARS = 512
MAX_PROMPTS = 32
MAX_IMAGE_BODY_BYTES = 32 << 20  # the body limit for a multimodal model: base64 photos are large
DISCONNECT_CHECK_S = 0.25  # how often a running request looks whether its client is still there


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind


@dataclass
class Limits:
    max_n: int = 16
    max_body_bytes: int | None = None  # None: MAX_BODY_BYTES, or MAX_IMAGE_BODY_BYTES for a multimodal model
    # Images (multimodal Llama 4 only). Meta's model card reports Llama 4 tested with up to 5 input
    # images; more fit the context but are outside what was evaluated.
    max_images: int = 5
    max_image_bytes: int = 20 << 20  # an image file's own (decoded) size
    max_image_pixels: int = 25_000_000  # width × height, checked before decoding the pixels
    allowed_local_media: str | Path | None = None  # file:// images only from inside this directory


# ---- validation ---------------------------------------------------------------------------------

_NEUTRAL = {  # OpenAI fields accepted only at their no-op value: anything else would be ignored
    "suffix": (None,), "best_of": (None, 1),
}
# Legacy completions take `logprobs: k` only; chat's top_logprobs there is accepted only as a no-op.
_NEUTRAL_COMPLETIONS = {"top_logprobs": (None, 0)}
# vLLM's chat `echo` (repeat the last message) is not implemented; completions' echo is.
_NEUTRAL_CHAT = {"echo": (None, False)}
# No effect on output. safety_identifier and prompt_cache_key are OpenAI's newer per-user ids (a
# cache-affinity hint, where herd's prefix sharing is automatic); the official client sends them
# when its caller sets them.
_IGNORED = ("user", "metadata", "store", "parallel_tool_calls", "service_tier", "safety_identifier",
            "prompt_cache_key")
# Ignored, but still of OpenAI's type (as vLLM's request model checks them): `"user": 5` or
# `"store": "yes"` is a client bug to report, not to swallow.
_IGNORED_TYPES = {"user": (str, "a string"), "metadata": (dict, "an object"), "store": (bool, "a boolean"),
                  "parallel_tool_calls": (bool, "a boolean"), "service_tier": (str, "a string"),
                  "safety_identifier": (str, "a string"), "prompt_cache_key": (str, "a string")}
# vLLM's older structured-output fields (before `structured_outputs`), each one of its constraints.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
           "stream_options", "ignore_eos", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias",
           "repetition_penalty", "response_format", "structured_outputs", "min_p", "min_tokens", "stop_token_ids",
           *_GUIDED, *_NEUTRAL, *_IGNORED}
_FIELDS = {"completions": _COMMON | {"prompt", "echo", *_NEUTRAL_COMPLETIONS},
           "chat": _COMMON | {"messages", "tools", "tool_choice", "max_completion_tokens", "top_logprobs",
                              *_NEUTRAL_CHAT}}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int(body, name, lo, hi, default=None):
    x = body.get(name)
    if x is None:
        return default
    if not _is_int(x):
        raise RequestError(f"{name} must be an integer, got {json.dumps(x)[:40]}", param=name)
    if not lo <= x <= hi:
        raise RequestError(f"{name} must be between {lo} and {hi}, got {x}", param=name)
    return x


def _float(body, name, default, ok, rule):
    x = body.get(name)
    if x is None:
        return default
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or not ok(x):
        raise RequestError(f"{name} must be {rule}, got {json.dumps(x)[:40]}", param=name)
    return float(x)


def _is_neutral(x, neutral: tuple) -> bool:
    # Type-strict: JSON false is not 0 here. Python's `0 == False` let `"logprobs": 0` through on
    # /v1/completions, where it asks for the sampled tokens' logprobs (OpenAI, vLLM) — and got null.
    return any(x == v and isinstance(x, bool) == isinstance(v, bool) for v in neutral)


@dataclass(frozen=True)
class Constraint:
    """One reply's constraint, compiled by llguidance. kind "json": spec a JSON schema; "regex": a
    regex string; "choice": a list of strings; "grammar": Lark or GBNF text. param: the request
    field that set it, which its errors name; where: how they spell the value (e.g.
    structured_outputs.regex). any_whitespace: JSON's whitespace between tokens is free (vLLM's
    default) or compact (its disable_any_whitespace)."""
    kind: str
    spec: object
    param: str
    where: str
    any_whitespace: bool = True


@dataclass
class Params:
    max_tokens: int | None
    sampling: SamplingParams
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    max_tokens_name: str = "max_tokens"  # the field the client sent it as, for error messages
    echo: bool = False  # completions: the prompt before the completion (and its logprobs)
    # What the reply must follow (response_format, structured_outputs or a guided_* field), or
    # None: free text. A forced tool_choice is another constraint, added per request in run().
    constraint: Constraint | None = None
    stop_token_ids: tuple[int, ...] = ()  # vLLM's: more ids that end a sample (Engine.submit)


_JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}  # OpenAI's json_schema object


def _response_format(body: dict) -> dict | None:
    """OpenAI's response_format → the JSON schema the output must follow, or None. {"type": "text"}
    is free text; {"type": "json_object"} any JSON object (vLLM's guidance backend compiles it as
    {"type": "object"}); {"type": "json_schema", "json_schema": {"name", "schema", "description"?,
    "strict"?}} that schema. `strict` is accepted and changes nothing: the output always follows
    the schema (vLLM ignores it too). vLLM's extra "structural_tag" is refused."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise RequestError('response_format must be an object such as {"type": "json_object"}',
                           param="response_format")
    kind = fmt["type"]
    extra = sorted(set(fmt) - {"type", "json_schema"} if kind == "json_schema" else set(fmt) - {"type"})
    if kind not in ("text", "json_object", "json_schema"):
        raise RequestError(f'response_format type must be "text", "json_object" or "json_schema", got '
                           f"{json.dumps(kind)[:40]}", param="response_format")
    if extra:
        raise RequestError(f"response_format: unexpected field(s) {', '.join(extra)} for type {kind}",
                           param="response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        from herd.inference.structured import JSON_OBJECT_SCHEMA

        return JSON_OBJECT_SCHEMA
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise RequestError('response_format type "json_schema" needs json_schema: {"name": ..., "schema": {...}}',
                           param="response_format")
    unknown = sorted(set(spec) - _JSON_SCHEMA_KEYS)
    if unknown:
        raise RequestError(f"response_format.json_schema: unexpected field(s) {', '.join(unknown)}",
                           param="response_format")
    if not isinstance(spec.get("name"), str) or not spec["name"]:  # required by OpenAI and vLLM's model
        raise RequestError("response_format.json_schema.name must be a non-empty string", param="response_format")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise RequestError("response_format.json_schema.strict must be a boolean", param="response_format")
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise RequestError("response_format.json_schema.description must be a string", param="response_format")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise RequestError("response_format.json_schema.schema must be a JSON schema object",
                           param="response_format")
    return schema


def _constraint(kind: str, value, param: str, where: str, any_whitespace: bool = True) -> Constraint:
    """A structured_outputs / guided_* value → its Constraint, types checked as vLLM's request
    model checks them (json: a schema object or a JSON string of one; regex and grammar: strings;
    choice: a non-empty list of strings). What llguidance cannot compile is found later, against
    the tokenizer (compile_constraint)."""
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise RequestError(f"{where} is a string that is not JSON: send a JSON schema (an object, "
                                   "or a JSON string of one)", param=param) from None
        if not isinstance(value, dict):
            raise RequestError(f"{where} must be a JSON schema object (or a JSON string of one), got "
                               f"{json.dumps(value)[:40]}", param=param)
    elif kind in ("regex", "grammar"):
        if not isinstance(value, str):
            raise RequestError(f"{where} must be a string, got {json.dumps(value)[:40]}", param=param)
    elif kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise RequestError(f"{where} must be a non-empty list of strings, got {json.dumps(value)[:60]}",
                               param=param)
    return Constraint(kind, value, param, where, any_whitespace)


# vLLM's StructuredOutputsParams: its constraints (one at most), and its options. Options this
# server cannot honour are accepted only at their no-op value, as the _NEUTRAL fields.
_SO_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_SO_NEUTRAL = {"disable_additional_properties": (None, False), "whitespace_pattern": (None,),
               "structural_tag": (None,)}


def _structured_outputs(body: dict) -> Constraint | None:
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar or json_object
    (true: any JSON object); more than one is refused, as StructuredOutputsParams refuses it. Of its
    options, disable_any_whitespace is honoured (compact JSON) and disable_fallback accepted as a
    no-op (herd has one backend, nothing to fall back to)."""
    so = body.get("structured_outputs")
    if so is None:
        return None
    name = "structured_outputs"
    if not isinstance(so, dict):
        raise RequestError('structured_outputs must be an object such as {"regex": "..."}', param=name)
    unknown = sorted(set(so) - {*_SO_KINDS, *_SO_NEUTRAL, "disable_any_whitespace", "disable_fallback"})
    if unknown:
        raise RequestError(f"structured_outputs: unexpected field(s) {', '.join(unknown)} (it takes one of "
                           f"{', '.join(_SO_KINDS)})", param=name)
    for key in ("disable_any_whitespace", "disable_fallback"):
        if so.get(key) is not None and not isinstance(so[key], bool):
            raise RequestError(f"structured_outputs.{key} must be a boolean", param=name)
    for key, neutral in _SO_NEUTRAL.items():
        if key in so and not _is_neutral(so[key], neutral):
            allowed = " or ".join(json.dumps(v) for v in neutral)
            raise RequestError(f"structured_outputs.{key} is not supported by this server (only {allowed})",
                               param=name)
    kinds = [k for k in _SO_KINDS if so.get(k) is not None]
    if len(kinds) != 1:
        raise RequestError(f"structured_outputs takes exactly one constraint of {', '.join(_SO_KINDS)}; got "
                           f"{', '.join(kinds) or 'none'}", param=name)
    kind = kinds[0]
    ws = not so.get("disable_any_whitespace")
    if kind == "json_object":
        if so[kind] is not True:  # vLLM would constrain on false too: refused rather than guessed
            raise RequestError("structured_outputs.json_object must be true", param=name)
        from herd.inference.structured import JSON_OBJECT_SCHEMA

        return Constraint("json", JSON_OBJECT_SCHEMA, name, "structured_outputs.json_object", ws)
    return _constraint(kind, so[kind], name, f"structured_outputs.{kind}", ws)


def _guided(body: dict) -> Constraint | None:
    """vLLM's legacy guided_json / guided_regex / guided_choice / guided_grammar (what older
    clients send in extra_body): one of them at most, as vLLM's own check."""
    given = [k for k in _GUIDED if body.get(k) is not None]
    if len(given) > 1:
        raise RequestError(f"only one of {', '.join(_GUIDED)} may be set; got {', '.join(given)}", param=given[1])
    return _constraint(_GUIDED[given[0]], body[given[0]], given[0], given[0]) if given else None


def _request_constraint(body: dict) -> Constraint | None:
    """The reply's constraint from response_format, structured_outputs or a guided_* field. Two of
    them would both constrain the one reply: refused (naming the second), not silently merged."""
    schema = _response_format(body)
    found = [c for c in (Constraint("json", schema, "response_format", "response_format") if schema is not None
                         else None, _structured_outputs(body), _guided(body)) if c is not None]
    if len(found) > 1:
        raise RequestError(f"{found[1].param} cannot be combined with {found[0].param}: both constrain the reply "
                           "(send one)", param=found[1].param)
    return found[0] if found else None


def _logprobs(body: dict, kind: str) -> int | None:
    """SamplingParams.logprobs from the request: None, or how many top logprobs per token."""
    x = body.get("logprobs")
    if kind == "completions":
        # Legacy completions: `logprobs: k`, the sampled token's logprob and the k most likely
        # (OpenAI allows 0..5; vLLM up to its max_logprobs, 20 by default — as here). JSON false
        # is "none" (the old neutral value); true is not a number of tokens.
        if x is None or x is False:
            return None
        return _int(body, "logprobs", 0, MAX_LOGPROBS)
    # Chat: `logprobs: true`, `top_logprobs: 0..20` (OpenAI's range and vLLM's default cap).
    if x is not None and not isinstance(x, bool):
        raise RequestError(f"logprobs must be a boolean, got {json.dumps(x)[:40]}", param="logprobs")
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top and not x:
        # OpenAI: "logprobs must be set to true if this parameter is used"; vLLM's request check
        # too (it lets top_logprobs 0 through, as here).
        raise RequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
    return (top or 0) if x else None


def _logit_bias(body: dict, vocab: int | None) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}. vLLM clamps out-of-range values;
    OpenAI refuses them, as here — and a key that is not a token id of this vocabulary."""
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise RequestError('logit_bias must be an object mapping token ids to biases, e.g. {"1234": -100}',
                           param="logit_bias")
    out = {}
    for k, v in bias.items():
        if not (k.isascii() and k.isdigit()) or len(k) > 12:
            raise RequestError(f"logit_bias: keys must be token ids (non-negative integers as strings), got "
                               f"{json.dumps(k)[:40]}", param="logit_bias")
        t = int(k)
        if vocab is not None and t >= vocab:
            raise RequestError(f"logit_bias: token id {t} is outside the vocabulary of {vocab}", param="logit_bias")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
            raise RequestError(f"logit_bias: values must be numbers between -100 and 100, got {json.dumps(v)[:40]} "
                               f"for token {t}", param="logit_bias")
        if t in out:  # "07" and "7"
            raise RequestError(f"logit_bias names token id {t} twice", param="logit_bias")
        out[t] = float(v)
    return out


def _stop_token_ids(body: dict, vocab: int | None) -> tuple[int, ...]:
    """vLLM's stop_token_ids: a list of token ids of this vocabulary (an id no sample can produce
    would silently stop nothing)."""
    ids = body.get("stop_token_ids")
    if ids is None:
        return ()
    if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
        raise RequestError(f"stop_token_ids must be a list of token ids (integers), got {json.dumps(ids)[:40]}",
                           param="stop_token_ids")
    for t in ids:
        if t < 0 or (vocab is not None and t >= vocab):
            where = f"outside the vocabulary of {vocab}" if vocab is not None else "negative"
            raise RequestError(f"stop_token_ids: token id {t} is {where}", param="stop_token_ids")
    return tuple(ids)


def parse_params(body: dict, kind: str, limits: Limits, vocab: int | None = None) -> Params:
    unknown = sorted(set(body) - _FIELDS[kind])
    if unknown:
        raise RequestError(f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0])
    for name, neutral in (_NEUTRAL | (_NEUTRAL_COMPLETIONS if kind == "completions" else _NEUTRAL_CHAT)).items():
        if name in body and not _is_neutral(body[name], neutral):
            allowed = " or ".join(json.dumps(v) for v in neutral)
            raise RequestError(f"{name} is not supported by this server (only {allowed})", param=name)
    for name, (typ, what) in _IGNORED_TYPES.items():
        if body.get(name) is not None and not isinstance(body[name], typ):
            raise RequestError(f"{name} must be {what}, got {json.dumps(body[name])[:40]}", param=name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", param="model")
    temperature = _float(body, "temperature", 1.0, lambda x: 0 <= x <= 2, "between 0 and 2")
    top_p = _float(body, "top_p", 1.0, lambda x: 0 < x <= 1, "in (0, 1]")
    # vLLM's "off" is 0 or -1 (its SamplingParams default for years, which clients still send).
    top_k = max(_int(body, "top_k", -1, 1 << 31, 0), 0)
    seed = _int(body, "seed", SEED_MIN, SEED_MAX)
    n = _int(body, "n", 1, limits.max_n, 1)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise RequestError(f"echo must be a boolean, got {json.dumps(echo)[:40]}", param="echo")
    # With echo, max_tokens 0 asks for the prompt alone (its logprobs: a loglikelihood), as vLLM allows.
    max_tokens = _int(body, name, 0 if echo else 1, 1 << 31, 16 if kind == "completions" else None)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("stop must be a string or a list of strings", param="stop")
    if len(stop) > MAX_STOP:
        raise RequestError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stop)}", param="stop")
    if any(len(s) == 0 or len(s) > MAX_STOP_CHARS for s in stop):
        raise RequestError(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters", param="stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("stream must be a boolean", param="stream")
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or set(opts) - {"include_usage"}
                             or not isinstance(opts.get("include_usage", False), (bool, type(None)))):
        raise RequestError('stream_options must be {"include_usage": bool}', param="stream_options")
    if opts and not stream:
        # As OpenAI and vLLM: usage-chunk options on a non-streamed request are a client mistake
        # (a non-streamed response always carries usage), not something to ignore silently.
        raise RequestError("stream_options is only allowed when stream is true", param="stream_options")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError("ignore_eos must be a boolean", param="ignore_eos")
    logprobs = _logprobs(body, kind)
    # echo with logprobs: the prompt's logprobs too, as vLLM (prompt_logprobs = logprobs).
    prompt_logprobs = logprobs if echo else None
    # OpenAI's ranges (vLLM's too). Penalties count the sample's own generated tokens (see sampling.py).
    presence = _float(body, "presence_penalty", 0.0, lambda x: -2 <= x <= 2, "between -2 and 2")
    frequency = _float(body, "frequency_penalty", 0.0, lambda x: -2 <= x <= 2, "between -2 and 2")
    # vLLM's extra: > 0 ("repetition_penalty must be greater than zero"), 1 = off.
    repetition = _float(body, "repetition_penalty", 1.0, lambda x: x > 0, "a number greater than 0")
    bias = _logit_bias(body, vocab)
    # vLLM's extras: min_p in [0, 1] (0 = off); min_tokens >= 0 and at most max_tokens
    # ("min_tokens must be less than or equal to max_tokens=..."); stop_token_ids.
    min_p = _float(body, "min_p", 0.0, lambda x: 0 <= x <= 1, "in [0, 1]")
    min_tokens = _int(body, "min_tokens", 0, 1 << 31, 0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise RequestError(f"min_tokens must be less than or equal to {name}={max_tokens}, got {min_tokens}",
                           param="min_tokens")
    stop_token_ids = _stop_token_ids(body, vocab)
    constraint = _request_constraint(body)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs,
                              presence_penalty=presence, frequency_penalty=frequency,
                              repetition_penalty=repetition, logit_bias=bias, min_p=min_p, min_tokens=min_tokens)
    return Params(max_tokens, sampling, n, stop, stream, bool(opts and opts.get("include_usage")), ignore_eos, name,
                  bool(echo), constraint, stop_token_ids)


def prompt_texts(body: dict, prompts: list[list[int]], tokenizer=None) -> list[str]:
    """The text `echo` puts before each completion: a prompt given as text is echoed as given,
    one given as token ids as their decoding (as vLLM; "" without a tokenizer)."""
    p = body.get("prompt")
    items = [p] if isinstance(p, str) or (isinstance(p, list) and p and all(_is_int(t) for t in p)) else p
    return [x if isinstance(x, str) else (tokenizer.decode(ids) if tokenizer is not None else "")
            for x, ids in zip(items, prompts, strict=True)]


class TokenTexts:
    """The text vLLM reports for a token in logprobs. Alone, a token decodes by itself (a special
    token to its name). A byte-level token holding part of a UTF-8 character decodes alone to
    U+FFFD; vLLM (LogprobsProcessor._verify_tokens, v1/engine/logprobs.py) then decodes it after
    up to 4 of the sample's preceding tokens: if that completes the character, the token's text is
    what it completes — the whole character when the tokens before it were its other pieces —
    otherwise "" (a piece still waiting for its end). So the tokens' texts join into the output
    text; `bytes` are the UTF-8 of this text, as vLLM gives them. Without a tokenizer: vLLM's
    return_tokens_as_token_ids form, "token_id:N"."""

    MAX_CONTEXT = 4  # vLLM's

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._alone: dict[int, str] = {}
        # generated tokens' text: a SentencePiece piece keeps its leading space (Tokenizer.decode_continuation)
        self._decode = getattr(tokenizer, "decode_continuation", getattr(tokenizer, "decode", None))

    def alone(self, t: int) -> str:
        got = self._alone.get(t)
        if got is None:
            got = f"token_id:{t}" if self.tokenizer is None else self._decode([t])
            if len(self._alone) < 1 << 18:
                self._alone[t] = got
        return got

    def __call__(self, t: int, context: list[int]) -> str:
        """Token t's text after the sample's tokens `context` (oldest first)."""
        text = self.alone(t)
        if self.tokenizer is None or not text.endswith("\ufffd"):
            return text
        for m in range(1, min(len(context), self.MAX_CONTEXT) + 1):
            ctx = context[-m:]
            whole = self._decode(ctx + [t])
            if whole.endswith("\ufffd"):
                continue  # still unfinished: try more context
            # Context tokens that are themselves unfinished pieces (their text was "") belong to
            # this character: only the text before them is taken off.
            clean = m
            while clean > 0 and self.alone(ctx[clean - 1]).endswith("\ufffd"):
                clean -= 1
            prefix = self._decode(ctx[:clean]) if clean else ""
            common = 0
            while common < min(len(prefix), len(whole)) and prefix[common] == whole[common]:
                common += 1
            return whole[common:]
        return ""


def _check_ids(ids: list, vocab: int, param: str = "prompt", *, empty_ok: bool = False) -> list[int]:
    if not ids and not empty_ok:
        raise RequestError(f"{param} is empty", param=param)
    for t in ids:
        if not _is_int(t):
            raise RequestError(f"{param}: token ids must be integers, got {json.dumps(t)[:40]}", param=param)
        if not 0 <= t < vocab:
            raise RequestError(f"token id {json.dumps(t)[:40]} is outside the vocabulary of {vocab}", param=param)
    return ids


def completion_prompts(body: dict, tokenizer, vocab: int) -> list[list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    p = body.get("prompt")
    if isinstance(p, str):
        items = [p]
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        items = p
    elif isinstance(p, list) and not p:
        raise RequestError("prompt is empty", param="prompt")
    else:
        raise RequestError("prompt must be a string, a list of strings, or token ids", param="prompt")
    if len(items) > MAX_PROMPTS:
        raise RequestError(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    out = []
    for x in items:
        if isinstance(x, str):
            if tokenizer is None:
                raise RequestError("this model has no tokenizer: send token ids", param="prompt")
            add_bos = tokenizer.bos_id is not None and getattr(tokenizer, "add_bos", True)
            # Special-token text is the special token, as vLLM's HF tokenizer reads a text prompt
            # (split_special_tokens=False): a chat-templated prompt sent as text, or lm-eval's
            # empty-context request ("<|im_start|>..."), was split into "<", "|", "im", ...
            out.append(_check_ids(tokenizer.encode(x, bos=add_bos, allow_special=True), vocab))
        else:
            out.append(_check_ids(x, vocab))
    return out


def openai_roles(messages):
    """OpenAI's "developer" role as "system". OpenAI made it the name of the instructions turn
    ("with o1 models and newer, developer messages replace the previous system messages"), and
    current clients and agent frameworks send it; herd's chat formats know the system turn it
    means (a checkpoint's template would write the unknown header "developer", which its model
    never saw in training)."""
    if not isinstance(messages, list):
        return messages
    return [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
            for m in messages]


def _check_tools(tools) -> None:
    """OpenAI's function definitions, {"type": "function", "function": {"name", "description",
    "parameters": JSON schema}}: each problem a 400 naming tools[i], as vLLM's request model refuses
    them — not a Python error from deep inside the chat format's rendering, blamed on messages."""
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
            for t in tools):
        raise RequestError('tools must be a list of {"type": "function", "function": {...}}', param="tools")
    for i, t in enumerate(tools):
        fn, where = t["function"], f"tools[{i}].function"
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(f"{where}.name must be a non-empty string", param="tools")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise RequestError(f"{where}.description must be a string", param="tools")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):  # OpenAI's type; a no-op here
            raise RequestError(f"{where}.strict must be a boolean", param="tools")
        schema = fn.get("parameters")
        if schema is None:
            continue
        if not isinstance(schema, dict):
            raise RequestError(f"{where}.parameters must be a JSON schema object", param="tools")
        props = schema.get("properties")
        if props is not None and (not isinstance(props, dict) or not all(isinstance(v, dict) for v in props.values())):
            raise RequestError(f"{where}.parameters.properties must map each parameter name to a JSON schema "
                               "object", param="tools")
        required = schema.get("required")
        if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
            raise RequestError(f"{where}.parameters.required must be a list of parameter names", param="tools")


@dataclass
class ForcedTool:
    """tool_choice "required" (name None) or a named function: the reply is constrained to `schema`
    (vLLM's structured outputs for tool calls) and returned as tool_calls."""
    name: str | None
    schema: dict


def _tool_parameters(fn: dict) -> dict:
    # vLLM: a function without parameters takes an empty object.
    return fn.get("parameters") or {"type": "object", "properties": {}}


def forced_tool(body: dict) -> ForcedTool | None:
    """tool_choice → None ("auto", "none", absent) or the call the reply must be, as vLLM builds
    it (protocol.py `_get_json_schema_from_tool`): a named function's reply is its parameters'
    JSON (the call's arguments); "required" is a non-empty JSON array of {"name": one of the
    tools, "parameters": that tool's parameters} (anyOf over the tools)."""
    choice = body.get("tool_choice")
    if choice in (None, "auto", "none"):
        return None
    tools = body.get("tools")
    if choice == "required":
        if not tools:  # vLLM and OpenAI: "required" with no tools is a client bug
            raise RequestError('tool_choice "required" needs tools: this request has none', param="tool_choice")
        # additionalProperties false, where vLLM leaves it open: keys past name and parameters
        # would be dropped from the calls anyway, and a small model spends its tokens inventing them.
        items = [{"type": "object",
                  "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                 "parameters": _tool_parameters(t["function"])},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
        return ForcedTool(None, {"type": "array", "minItems": 1, "items": {"anyOf": items}})
    if (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
            and isinstance(choice["function"].get("name"), str) and set(choice) == {"type", "function"}):
        name = choice["function"]["name"]
        found = [t["function"] for t in tools or () if t["function"]["name"] == name]
        if not found:  # vLLM's request check refuses it too (and OpenAI's API)
            raise RequestError(f"tool_choice names the function {json.dumps(name)[:80]}, which is not among tools",
                               param="tool_choice")
        return ForcedTool(name, _tool_parameters(found[0]))
    raise RequestError('tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                       f'{{"name": ...}}}}, got {json.dumps(choice)[:80]}', param="tool_choice")


def _json_string(text: str) -> str | None:
    # None for what the grammar would not write: the finished reply then fails json.loads too
    try:
        got = json.loads(text)
    except ValueError:
        return None
    return got if isinstance(got, str) else None


class RequiredCalls:
    """The calls of a tool_choice "required" reply — a JSON array of {"name", "parameters"} objects,
    as its grammar writes it — read as the text arrives, so that each call's arguments can stream
    piece by piece, as vLLM streams them (serving_chat's extract_tool_call_required_streaming).
    A call's arguments are the raw text of its "parameters" value, as a named call's are the
    generated JSON itself: the streamed pieces then add up to exactly the non-streamed arguments,
    whatever whitespace the grammar let the model write. Only the structure is tracked (nesting,
    strings, the item objects' keys); the grammar guarantees the JSON, and json.loads checks the
    finished reply (forced_message)."""

    def __init__(self):
        self.names: list[str | None] = []  # each call's name, once its value is complete
        self._raw: list[str] = []  # each call's "parameters" text so far (whitespace around it included)
        self._name_raw: list[str] = []
        self._depth = 0  # open [ and { outside strings: the array is 1, an item object 2
        self._in_str = self._esc = False
        self._key: str | None = None  # an item's key being read (its JSON text), None between keys
        self._last_key: str | None = None
        self._field: str | None = None  # the item key whose value is being read

    def feed(self, text: str) -> None:
        for ch in text:
            if self._in_str:  # inside a key or a value's string: only its end matters
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
                self._take(ch)
                if not self._in_str and self._key is not None:  # a key's closing quote
                    self._last_key, self._key = _json_string(self._key), None
                continue
            if self._depth == 2 and self._field is None:  # between an item's values: keys, ':', ','
                if ch == '"':
                    self._in_str, self._key = True, '"'
                elif ch == ":":
                    self._field = self._last_key
                elif ch == "}":
                    self._depth = 1
                continue
            if self._depth == 2 and ch in ",}":  # the value ends
                if self._field == "name":
                    self.names[-1] = _json_string(self._name_raw[-1])
                self._field = None
                self._depth -= ch == "}"
                continue
            if ch == '"':
                self._in_str = True
            elif ch in "[{":
                self._depth += 1
                if self._depth == 2:  # an item of the array: a new call
                    self.names.append(None)
                    self._raw.append("")
                    self._name_raw.append("")
                    continue
            elif ch in "]}":
                self._depth -= 1
            self._take(ch)

    def _take(self, ch: str) -> None:
        if self._key is not None:
            self._key += ch
        elif self._depth >= 2 and self._field == "parameters":
            self._raw[-1] += ch
        elif self._depth >= 2 and self._field == "name":
            self._name_raw[-1] += ch

    def arguments(self, k: int) -> str:
        """Call k's arguments so far: its parameters' text, without the whitespace around it (held
        back at the end until the next character says whether it is inside the value)."""
        raw = self._raw[k].lstrip()
        return raw if self._in_str and k == len(self._raw) - 1 and self._field == "parameters" else raw.rstrip()


def chat_prompt(body: dict, tokenizer, add_generation_prompt: bool = True) -> tuple[list[int], bool]:
    """→ (prompt ids, whether tool calls are to be parsed from the reply). A forced tool_choice
    (`forced_tool`) is not parsed: its reply is constrained to the call instead.
    add_generation_prompt False: /tokenize's dialog without the assistant header."""
    if tokenizer is None or tokenizer.chat is None:
        raise RequestError("this model has no chat format; use /v1/completions")
    messages = openai_roles(body.get("messages"))
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    tools = body.get("tools")
    if tools is not None:
        _check_tools(tools)
    choice = body.get("tool_choice")
    forced = forced_tool(body)
    if choice == "auto" and tools is None:
        # vLLM's request check ("When using `tool_choice`, `tools` must be set") and OpenAI's 400:
        # a client that asks for tool calls but sent none has a bug worth hearing about.
        raise RequestError('tool_choice "auto" needs tools: this request has none', param="tool_choice")
    use_tools = bool(tools) and choice != "none"
    source = getattr(tokenizer.chat, "template_source", None)
    if forced is not None and source is not None and "tools" not in source:
        # A forced call needs no template support: the constraint writes the call whatever the
        # model was told (vLLM renders the tools only where the template reads them, too).
        use_tools = False
    elif use_tools and source is not None and "tools" not in source:
        # A checkpoint template that never reads `tools` (SmolLM2's) renders the same prompt with
        # or without them: the model would never see the tools, and the client would wait for
        # calls that cannot come. Refused, as a tool-call turn in such a template is (chat.py).
        raise RequestError("this model's chat template has no tools: the model cannot be told about them "
                           '(send tool_choice "none" to leave them out)', param="tools", code="tools_not_supported")
    try:
        # the tools as the client sent them ({"type": "function", "function": {...}}), as vLLM hands
        # them to the template and transformers' apply_chat_template takes them: a template that
        # writes each tool with `tojson` (HF's Llama 3.1, Qwen) renders the whole object
        ids = tokenizer.chat.encode_dialog(messages, add_generation_prompt=add_generation_prompt,
                                           tools=list(tools) if use_tools else None)
    except HerdError as e:
        raise RequestError(str(e), param="messages") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise RequestError(f"invalid messages or tools: {type(e).__name__}: {e}", param="messages") from None
    return ids, use_tools and forced is None


# ---- tokenizer endpoints ------------------------------------------------------------------------

# vLLM's TokenizeCompletionRequest / TokenizeChatRequest / DetokenizeRequest fields. vLLM's
# continue_final_message is accepted only at its neutral value (herd's chat formats always end the
# dialog where it ends); its chat_template / chat_template_kwargs overrides are unknown fields here.
_TOKENIZE_FIELDS = {"prompt": {"model", "prompt", "add_special_tokens", "return_token_strs"},
                    "chat": {"model", "messages", "add_generation_prompt", "continue_final_message",
                             "add_special_tokens", "return_token_strs", "tools"}}
_DETOKENIZE_FIELDS = {"model", "tokens"}


def _unknown_fields(body: dict, allowed: set) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0])


def _bool(body: dict, name: str, default: bool) -> bool:
    x = body.get(name)
    if x is None:
        return default
    if not isinstance(x, bool):
        raise RequestError(f"{name} must be a boolean, got {json.dumps(x)[:40]}", param=name)
    return x


def _model_field(body: dict) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", param="model")


@dataclass
class TokenizeParams:
    chat: bool  # messages (else prompt)
    add_special_tokens: bool
    add_generation_prompt: bool
    return_token_strs: bool


def parse_tokenize(body: dict) -> TokenizeParams:
    """vLLM's /tokenize body: {"prompt": str, "add_special_tokens" (true)} or {"messages", "tools"?,
    "add_generation_prompt" (true), "add_special_tokens" (false)}, both with "model"? and
    "return_token_strs"?. Exactly one of prompt and messages."""
    if ("prompt" in body) == ("messages" in body):
        raise RequestError("send either prompt (a string) or messages (a chat dialog)",
                           param="messages" if "messages" in body else "prompt")
    chat = "messages" in body
    _unknown_fields(body, _TOKENIZE_FIELDS["chat" if chat else "prompt"])
    _model_field(body)
    if not chat and not isinstance(body["prompt"], str):
        raise RequestError(f"prompt must be a string, got {json.dumps(body['prompt'])[:40]}", param="prompt")
    if chat and body.get("continue_final_message") not in (None, False):
        raise RequestError("continue_final_message is not supported by this server (only false)",
                           param="continue_final_message")
    return TokenizeParams(chat, _bool(body, "add_special_tokens", not chat),
                          _bool(body, "add_generation_prompt", True), _bool(body, "return_token_strs", False))


def parse_detokenize(body: dict, vocab: int) -> list[int]:
    """vLLM's /detokenize body: {"tokens": [ids], "model"?} → the ids."""
    _unknown_fields(body, _DETOKENIZE_FIELDS)
    _model_field(body)
    ids = body.get("tokens")
    if not isinstance(ids, list):
        raise RequestError("tokens must be a list of token ids", param="tokens")
    return _check_ids(ids, vocab, "tokens", empty_ok=True)  # vLLM detokenizes [] to ""


def token_name(tokenizer, i: int | None, names: dict[int, str]) -> str | None:
    """A token's own spelling, as transformers' convert_ids_to_tokens gives it (vLLM's token_strs
    and tokenizer_info): a special token's name (`names`: id → name of the special tokens), a
    byte-level token's GPT-2 spelling ("Ġhello")."""
    if i is None:
        return None
    if i in names:
        return names[i]
    if hasattr(tokenizer, "id_to_name"):
        name = tokenizer.id_to_name(i)
    elif hasattr(tokenizer, "hf_backend"):  # tiktoken: the HF spelling of the same vocabulary
        name = tokenizer.hf_backend.id_to_token(i)
    else:
        name = None
    return tokenizer.decode([i]) if name is None else name


def chat_template_text(tokenizer) -> str | None:
    """The jinja chat template of this tokenizer's chat format: a checkpoint's own (GGUF
    tokenizer.chat_template, HF chat_template), Meta's Llama 3/4 format as the template herd
    exports with it; None without a chat format."""
    if tokenizer is None or tokenizer.chat is None:
        return None
    source = getattr(tokenizer.chat, "template_source", None)
    if source is None and getattr(tokenizer, "flavor", None) is not None:
        from herd.tokenizer.chat import meta_chat_template

        try:
            source = meta_chat_template(tokenizer.flavor)
        except KeyError:
            source = None
    return source


# ---- images -------------------------------------------------------------------------------------

def _image_parts(messages) -> list[dict]:
    """The image parts (OpenAI's image_url, or herd's own "image") of a dialog's messages, in order."""
    from herd.tokenizer.chat import IMAGE_PART_TYPES

    if not isinstance(messages, list):
        return []
    return [p for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES]


def _decode_image(raw: bytes, what: str, limits: Limits):
    """Image file bytes → PIL RGB image; the pixel cap is checked on the header, before decoding."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    from herd.models.image_processing import as_rgb

    # As herd/models/image_processing.py load_image: a truncated file is an error, never half a picture.
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(io.BytesIO(raw)) as img:
            w, h = img.size
            if w * h > limits.max_image_pixels:
                raise RequestError(f"{what}: image of {w}×{h} pixels is over this server's limit of "
                                   f"{limits.max_image_pixels} pixels", param="messages", code="image_too_large")
            img.load()
            return as_rgb(img)
    except UnidentifiedImageError:
        raise RequestError(f"{what}: not an image (PIL reads JPEG, PNG, GIF, BMP, WebP, ...)",
                           param="messages") from None
    except Image.DecompressionBombError as e:
        raise RequestError(f"{what}: refusing to decode: {e}", param="messages", code="image_too_large") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RequestError(f"{what}: unreadable or truncated image ({e})", param="messages") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def _too_large(what: str, size: int, limits: Limits) -> RequestError:
    return RequestError(f"{what}: image of {size} bytes is over this server's limit of {limits.max_image_bytes} "
                        "bytes", param="messages", code="image_too_large")


def read_image_url(url: str, what: str, limits: Limits):
    """An image_url's picture (PIL RGB): a base64 data URL, or a file:// path inside
    `limits.allowed_local_media`. Anything else is a 400 naming the problem."""
    if url[:5].lower() == "data:":
        head, comma, data = url[5:].partition(",")
        media, *params = head.split(";")
        if not comma or not media.lower().startswith("image/"):
            raise RequestError(f"{what}: a data URL must look like data:image/<type>;base64,<data>", param="messages")
        if "base64" not in (x.strip().lower() for x in params):
            raise RequestError(f"{what}: only base64 data URLs are supported (data:{media};base64,...)",
                               param="messages")
        data = "".join(data.split())  # base64 wrapped over lines is still base64
        if len(data) // 4 * 3 > limits.max_image_bytes:
            raise _too_large(what, len(data) // 4 * 3, limits)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(f"{what}: the data URL's base64 cannot be decoded ({e})", param="messages") from None
        return _decode_image(raw, what, limits)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        raise RequestError(f"{what}: http(s) image URLs are not supported: this server does not download "
                           "images; send the picture inline as a data:image/...;base64 URL", param="messages")
    if scheme != "file":
        raise RequestError(f"{what}: unsupported image URL {url[:40]!r}; use a data:image/...;base64 URL",
                           param="messages")
    if limits.allowed_local_media is None:
        raise RequestError(f"{what}: file:// image URLs are refused: the server was not started with "
                           "--allowed-local-media DIR", param="messages")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise RequestError(f"{what}: a file:// URL must name a local path (file:///path), got host "
                           f"{parsed.netloc!r}", param="messages")
    given = unquote(parsed.path)
    root = Path(limits.allowed_local_media).resolve()
    path = Path(given).resolve()  # symlinks and ".." resolved: a link out of the directory is refused too
    if not path.is_relative_to(root):
        raise RequestError(f"{what}: {given} is outside the allowed local media directory", param="messages")
    if not path.is_file():
        raise RequestError(f"{what}: no such file {given}", param="messages")
    size = path.stat().st_size
    if size > limits.max_image_bytes:
        raise _too_large(what, size, limits)
    return _decode_image(path.read_bytes(), what, limits)


def image_chat_prompt(body: dict, engine: Engine, limits: Limits):
    """A chat request with image parts → (prompt ids, each image's tiles), laid out as
    `herd.generate` lays out the same dialog. CPU work (decoding, resizing): run off the event loop."""
    import torch

    from herd.models.image_processing import prepare_images_prompt
    from herd.tokenizer.chat import validate_messages

    tokenizer = engine.tokenizer
    if tokenizer is None or tokenizer.chat is None:
        raise RequestError("this model has no chat format; use /v1/completions")
    messages = openai_roles(body["messages"])
    try:
        validate_messages(messages, images=True)
    except HerdError as e:
        raise RequestError(str(e), param="messages") from None
    if getattr(engine.args, "vision", None) is None or not hasattr(engine.model, "image_features"):
        raise RequestError("this model is text-only (no vision encoder): image input needs a multimodal "
                           "Llama 4 checkpoint", param="messages", code="images_not_supported")
    parts = _image_parts(messages)
    if len(parts) > limits.max_images:
        raise RequestError(f"at most {limits.max_images} images per request, got {len(parts)}", param="messages")
    if body.get("tools") and body.get("tool_choice") != "none":
        raise RequestError("tools together with images are not supported", param="tools")
    converted, k = [], 0
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            converted.append(m)
            continue
        new = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":  # herd's own part would read a server path
                raise RequestError('send images as {"type": "image_url", "image_url": {"url": ...}}',
                                   param="messages")
            if isinstance(part, dict) and part.get("type") == "image_url":
                k += 1
                part = {"type": "image", "image": read_image_url(part["image_url"]["url"], f"image {k}", limits)}
            new.append(part)
        converted.append({**m, "content": new})
    try:
        p = prepare_images_prompt(engine.model, tokenizer, converted)
    except HerdError as e:
        raise RequestError(str(e), param="messages") from None
    counts = [r * c + (r * c > 1) for r, c in p.grids]  # each image's tiles, then its thumbnail if tiled
    return p.ids, list(torch.split(p.tiles, counts))


# ---- the app ------------------------------------------------------------------------------------

def _error(e: RequestError):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}},
                        status_code=e.status)


def _check_content_type(request) -> None:
    """A body sent as another media type is refused, as vLLM's FastAPI request models refuse it
    (they read JSON only under application/json or application/*+json, or with no Content-Type):
    `curl -d` without a JSON header sends application/x-www-form-urlencoded."""
    given = request.headers.get("content-type")
    if given is None:
        return
    media = given.split(";")[0].strip().lower()
    kind, _, sub = media.partition("/")
    if kind != "application" or not (sub == "json" or sub.endswith("+json")):
        raise RequestError(f"the request body must be JSON sent as Content-Type: application/json, got "
                           f"{given[:60]!r}", code="unsupported_media_type")


async def _read_json(request, limits: Limits) -> dict:
    _check_content_type(request)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
        raise RequestError(f"request body over {limits.max_body_bytes} bytes", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise RequestError(f"request body over {limits.max_body_bytes} bytes", status=413)
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        body = json.loads(text)
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # lone surrogates ("\\ud800") fail here
    except json.JSONDecodeError as e:
        raise RequestError(f"request body is not valid JSON: {e}") from None
    except UnicodeEncodeError:
        raise RequestError("request body contains invalid Unicode (a lone surrogate escape)") from None
    except ValueError as e:  # an integer literal over Python's 4300-digit limit: was a 500
        raise RequestError(f"request body has a number that cannot be read ({str(e).split(':')[0]})") from None
    except RecursionError:
        raise RequestError("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    return body


class _Listener:
    """Engine events (from the engine's thread) → an asyncio queue on the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, ev: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def create_app(engine: Engine, model_name: str, limits: Limits | None = None):
    """The FastAPI app serving `engine` under `model_name`. Its lifespan starts and stops the
    engine's thread."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    limits = limits or Limits()
    tokenizer, args = engine.tokenizer, engine.args
    if limits.max_body_bytes is None:
        multimodal = getattr(args, "vision", None) is not None
        limits = replace(limits, max_body_bytes=MAX_IMAGE_BODY_BYTES if multimodal else MAX_BODY_BYTES)
    from herd.api import reserved_ids

    # As herd.generate: never sample a tokenizer's reserved special tokens.
    suppress = reserved_ids(tokenizer) if tokenizer is not None else ()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown(cancel=True)

    app = FastAPI(title="herd", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        return _error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(RequestError(str(e.detail), status=e.status_code, kind=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return _error(RequestError(f"invalid request: {e.errors()[:1]}"))

    def engine_died() -> bool:
        # The engine's thread ended without a shutdown: an exception escaped a step (the traceback
        # is on stderr). Its requests will never finish: answered at once instead of hanging.
        t = engine._thread
        return t is not None and not t.is_alive()

    def check_engine() -> None:
        if engine_died():
            raise RequestError("the inference engine stopped after an internal error (see the server's log); "
                               "restart the server", status=500, kind="internal_error", code="engine_stopped")

    @app.get("/health")
    async def health():
        if engine_died():
            return JSONResponse({"status": "error", "model": model_name, "error": "the inference engine stopped"},
                                status_code=503)
        return {"status": "ok", "model": model_name, "kv_blocks_free": engine.blocks_free,
                "kv_blocks": engine.blocks.num_blocks}

    card = {"id": model_name, "object": "model", "created": created, "owned_by": "herd",
            "max_model_len": args.max_seq_len}

    def not_found(model) -> RequestError:
        return RequestError(f"the model {model!r} does not exist; this server serves {model_name!r}",
                            status=404, param="model", code="model_not_found", kind="not_found_error")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    # The client's models.retrieve(id). `:path`: a served name may hold slashes ("meta-llama/...").
    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise not_found(model_id)
        return card

    def check_model(body):
        # An empty name is the served model, as vLLM's _is_model_supported reads it (clients left
        # unconfigured send "").
        if body.get("model") not in (None, "", model_name):
            raise not_found(body["model"])

    def budget(prompts: list[list[int]], p: Params, kind: str) -> int:
        context = args.max_seq_len
        longest = max(len(x) for x in prompts)
        source = "messages" if kind == "chat" else "prompt"  # the field the prompt came in
        if longest >= context:
            raise RequestError(f"this model's maximum context length is {context} tokens, but the prompt has "
                               f"{longest}", param=source, code="context_length_exceeded")
        if p.max_tokens is None:
            # The rest of the context, as OpenAI does — but no more than the KV cache can hold for
            # this request (Engine.submit reserves ceil(prompt/bs) + n·(ceil(max_tokens/bs) + 1)
            # blocks): with the default cache, a 128K-context model would otherwise answer every
            # chat request without max_tokens with a 400.
            bs, blocks = engine.block_size, engine.blocks.num_blocks
            if p.n > 1 and not engine.prefix_sharing:  # each sample holds its own prompt (Engine.submit)
                fits = bs * (blocks // p.n - -(-longest // bs))
            else:
                fits = bs * ((blocks - -(-longest // bs)) // p.n - 1)
            if fits < 1:
                raise RequestError(f"the prompt of {longest} tokens leaves no room in the server's KV cache "
                                   f"({blocks * bs} positions) for {p.n} completion(s)", param=source,
                                   code="context_length_exceeded")
            return min(context - longest, fits)
        if longest + p.max_tokens > context:
            raise RequestError(f"this model's maximum context length is {context} tokens, but {longest} prompt "
                               f"tokens + {p.max_tokens_name} {p.max_tokens} exceed it", param=p.max_tokens_name,
                               code="context_length_exceeded")
        return p.max_tokens

    def submit_all(prompts, p: Params, max_tokens: int, listener, images=()) -> list[int]:
        check_engine()
        ids: list[int] = []
        try:
            for x in prompts:
                ids.append(engine.submit(x, max_tokens=max_tokens, sampling=p.sampling, n=p.n,
                                         stop_strings=p.stop, ignore_eos=p.ignore_eos, listener=listener,
                                         images=images, stop_token_ids=p.stop_token_ids))
        except EngineBusy as e:
            for rid in ids:
                engine.cancel(rid)
            raise RequestError(str(e), status=429, kind="rate_limit_error") from None
        except HerdError as e:
            for rid in ids:
                engine.cancel(rid)
            raise RequestError(str(e)) from None
        return ids

    async def events(request: Request, listener: _Listener, ids: list[int], total: int,
                     constraint: Constraint | None = None):
        """Yield (choice index, event) until every sample has finished; cancel all if the client
        goes away or the consumer stops early."""
        index = {rid: k for k, rid in enumerate(ids)}
        n = total // len(ids)
        left = total
        checked = time.monotonic()
        try:
            while left:
                try:
                    ev = await asyncio.wait_for(listener.queue.get(), timeout=DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    ev = None
                # Checked while tokens flow too, not only when they stall: a non-streaming response
                # sends nothing until the end, so no failed write would tell us the client left,
                # and its request would decode to max_tokens holding its KV blocks. At most every
                # DISCONNECT_CHECK_S: the check is a (cancelled) ASGI receive, cheap but not free.
                if ev is None or time.monotonic() - checked >= DISCONNECT_CHECK_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                    check_engine()
                if ev is None:
                    continue
                if ev.finish_reason == "error" and ev.error is not None:  # the request's own fault
                    raise RequestError(ev.error, param=constraint.param if constraint else None, code="grammar_error")
                if ev.finish_reason == "error":
                    # A step running this request failed (the engine logged it and goes on): the
                    # answer is lost, and the finally below cancels this call's other prompts.
                    raise RequestError("the inference engine failed while running this request (see the server's "
                                       "log)", status=500, kind="internal_error", code="engine_error")
                if ev.finish_reason is not None:
                    left -= 1
                yield index[ev.request_id] * n + ev.index, ev
        finally:
            for rid in ids:
                engine.cancel(rid)  # a no-op for finished requests

    def usage(prompts, completion_tokens):
        prompt_tokens = sum(len(x) for x in prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def tool_message(ids: list[int], text: str) -> tuple[dict, bool]:
        msg = tokenizer.chat.decode_assistant(ids)
        calls = msg.get("tool_calls")
        if not calls:
            return {"role": "assistant", "content": text}, False
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": c["id"], "type": "function",
             "function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}}
            for c in calls]}, True

    def compile_constraint(c: Constraint) -> str:
        """A constraint → its llguidance grammar, compiled once here against the tokenizer so that
        a schema, regex or grammar llguidance cannot compile is a one-line 400 naming its field, as
        vLLM refuses it, before any engine work. CPU work (the first call builds the token table):
        run off the event loop."""
        from herd.inference import structured

        if tokenizer is None:
            raise RequestError("structured outputs need the model's tokenizer", param=c.param)
        build = {"json": lambda: structured.json_schema_grammar(c.spec, any_whitespace=c.any_whitespace),
                 "regex": lambda: structured.regex_grammar(c.spec),
                 "choice": lambda: structured.choice_grammar(c.spec),
                 "grammar": lambda: structured.lark_grammar(c.spec)}[c.kind]
        try:
            grammar = build()
            structured.check_grammar(grammar, tokenizer, args.vocab_size)
        except HerdError as e:
            what = {"json": "tools' parameters" if c.param == "tool_choice" else "JSON schema",
                    "regex": "regex", "choice": "choice",
                    "grammar": "grammar (Lark, llguidance's dialect, or GBNF)"}[c.kind]
            raise RequestError(f"{c.where}: invalid {what}: {e}"[:500], param=c.param) from None
        return grammar

    def forced_message(forced: ForcedTool, text: str, reason: str) -> tuple[dict, str]:
        """A forced tool_choice's reply as OpenAI's tool_calls, as vLLM returns it: a named
        function's generated JSON is its arguments (finish_reason as generated); "required"'s JSON
        array becomes one call per item (finish_reason "tool_calls" when it stopped normally). A
        reply cut short (max_tokens) that does not parse comes back as content."""
        if forced.name is not None:
            calls = [(forced.name, text)]
        else:
            # Each call's arguments as its streamed deltas add up to (RequiredCalls): the raw text of
            # its parameters, once the whole reply is checked to be the array of calls.
            scan = RequiredCalls()
            scan.feed(text)
            try:
                items = json.loads(text)
            except ValueError:
                items = None
            if not (isinstance(items, list) and items and len(items) == len(scan.names) and all(
                    isinstance(c, dict) and "parameters" in c and isinstance(name, str) and c.get("name") == name
                    for c, name in zip(items, scan.names, strict=False))):
                return {"role": "assistant", "content": text}, reason
            calls = [(name, scan.arguments(k)) for k, name in enumerate(scan.names)]
            reason = "tool_calls" if reason == "stop" else reason
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": n, "arguments": a}}
            for n, a in calls]}, reason

    token_text = TokenTexts(tokenizer)

    def lp(x: float) -> float:
        return max(x, -9999.0)  # as vLLM: -inf is not JSON; OpenAI's floor

    def chat_logprobs(entries, context: list[int]) -> list[dict]:
        """OpenAI's chat logprobs content items; `context`: the choice's tokens before these
        (extended here). `bytes` are the UTF-8 of the token's text, as vLLM gives them.
        top_logprobs are the step's true top-k, most likely first (vLLM lists the sampled token
        first instead; for greedy decoding the two agree)."""
        out = []
        for e in entries:
            text = token_text(e.token_id, context)
            top = []
            for t, v in e.top:
                alt = token_text(t, context)
                top.append({"token": alt, "logprob": lp(v), "bytes": list(alt.encode())})
            out.append({"token": text, "logprob": lp(e.logprob), "bytes": list(text.encode()), "top_logprobs": top})
            context.append(e.token_id)
        return out

    def completion_logprobs(entries, offset: int, context: list[int]) -> tuple[dict, int]:
        """Legacy completions logprobs for entries whose text starts at `offset`, after the
        choice's tokens `context` (extended here) → (logprobs, the offset after them). As vLLM:
        top_logprobs holds the sampled token first, then the k most likely (k+1 entries when the
        sampled one is not among them; OpenAI's "up to logprobs+1"), keyed by token text;
        text_offset advances by each token's text length."""
        tokens, token_lps, tops, offsets = [], [], [], []
        for e in entries:
            text = token_text(e.token_id, context)
            tokens.append(text)
            if e.logprob is None:  # an echoed prompt's first token: nothing before it (vLLM: null)
                token_lps.append(None)
                tops.append(None)
            else:
                by_id = {e.token_id: e.logprob}
                for t, v in e.top:
                    by_id.setdefault(t, v)
                token_lps.append(lp(e.logprob))
                tops.append({token_text(t, context): lp(v) for t, v in by_id.items()})
            offsets.append(offset)
            offset += len(text)
            context.append(e.token_id)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, offset

    def echo_and_completion_logprobs(prompt_entries, entries, offset: int, context: list[int]) -> tuple[dict, int]:
        """An echoed prompt's logprobs (their own context) then the completion's (`context`)."""
        a, offset = completion_logprobs(prompt_entries, offset, [])
        b, offset = completion_logprobs(entries, offset, context)
        return {k: a[k] + b[k] for k in a}, offset

    async def run(request: Request, kind: str):
        body = await _read_json(request, limits)
        p = parse_params(body, kind, limits, args.vocab_size)
        p.sampling = replace(p.sampling, suppress=suppress)
        check_model(body)
        images = []
        if kind == "chat" and _image_parts(body.get("messages")):
            prompt, images = await asyncio.get_running_loop().run_in_executor(
                None, image_chat_prompt, body, engine, limits)
            prompts, use_tools = [prompt], False
        elif kind == "chat":
            prompt, use_tools = chat_prompt(body, tokenizer)
            prompts = [prompt]
        else:
            prompts, use_tools = completion_prompts(body, tokenizer, args.vocab_size), False
        forced = forced_tool(body) if kind == "chat" else None
        constraint = p.constraint
        if forced is not None:
            if constraint is not None:
                # Both would constrain the one reply: refused rather than silently picking one.
                raise RequestError(f"{constraint.param} cannot be combined with a forced tool_choice (the call's "
                                   "arguments already follow the function's parameters schema)",
                                   param=constraint.param)
            constraint = Constraint("json", forced.schema, "tool_choice", "tool_choice")
        if constraint is not None:
            p.sampling = replace(p.sampling, grammar=await asyncio.get_running_loop().run_in_executor(
                None, compile_constraint, constraint))
        max_tokens = budget(prompts, p, kind)
        # echo with max_tokens 0: the engine generates one token (it always samples once), dropped here.
        discard = p.echo and max_tokens == 0
        echo_texts = prompt_texts(body, prompts, tokenizer) if p.echo else None
        listener = _Listener(asyncio.get_running_loop())
        ids = submit_all(prompts, p, max(max_tokens, 1), listener, images)

        def echoed(i: int, ev: Event, first: bool) -> tuple[str, list, list, str | None, int, str | int | None]:
            """Choice i's event as sent: with echo, its first carries the prompt (and the prompt's
            logprobs: the first token's null, then the engine's); with max_tokens 0 the generated
            token is dropped. → (text, prompt logprob entries, logprob entries, finish reason,
            completion tokens, stop reason)."""
            text, entries, prompt_entries = ev.text, ev.logprobs or [], []
            reason, used, stop = ev.finish_reason, ev.completion_tokens, ev.stop_reason
            if discard:
                text, entries, used = "", [], 0
                reason = "length" if reason is not None else None
                stop = None  # whatever ended the dropped token, this reply ended on length
            if p.echo and first:
                prompt = prompts[i // p.n]
                text = echo_texts[i // p.n] + text
                if ev.prompt_logprobs is not None:
                    prompt_entries = [TokenLogprob(prompt[0], None, None), *ev.prompt_logprobs]
            return text, prompt_entries, entries, reason, used, stop
        total = len(prompts) * p.n

        def reply(ids: list[int], text: str, reason: str) -> tuple[dict, str]:
            """A chat choice's message and finish_reason: a forced call, parsed tool calls, or text."""
            if forced is not None:
                return forced_message(forced, text, reason)
            if use_tools:
                msg, called = tool_message(ids, text)
                return msg, "tool_calls" if called else reason
            return {"role": "assistant", "content": text}, reason
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if kind == "chat" else "text_completion"
        now = int(time.time())
        stream = events(request, listener, ids, total, constraint)
        want_logprobs = p.sampling.logprobs is not None
        if not p.stream:
            texts, toks, reasons, completion_tokens = [""] * total, [[] for _ in range(total)], [None] * total, 0
            stop_reasons = [None] * total
            lps, plps, seen = [[] for _ in range(total)], [[] for _ in range(total)], [False] * total
            async for i, ev in stream:
                text, prompt_entries, entries, reason, used, stop = echoed(i, ev, not seen[i])
                seen[i] = True
                texts[i] += text
                toks[i] += ev.token_ids
                plps[i] += prompt_entries
                lps[i] += entries
                if reason is not None:
                    reasons[i], stop_reasons[i] = reason, stop
                    completion_tokens += used
            if any(r is None for r in reasons):  # the client left: nobody to answer
                return JSONResponse({}, status_code=499)
            choices = []
            for i in range(total):
                if kind == "chat":
                    msg, reason = reply(toks[i], texts[i], reasons[i])
                    choices.append({"index": i, "message": msg,
                                    "logprobs": {"content": chat_logprobs(lps[i], [])} if want_logprobs else None,
                                    "finish_reason": reason, "stop_reason": stop_reasons[i]})
                else:
                    choices.append({"index": i, "text": texts[i],
                                    "logprobs": echo_and_completion_logprobs(plps[i], lps[i], 0, [])[0]
                                    if want_logprobs else None,
                                    "finish_reason": reasons[i], "stop_reason": stop_reasons[i]})
            return {"id": rid, "object": obj, "created": now, "model": model_name, "choices": choices,
                    "usage": usage(prompts, completion_tokens)}

        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(choices, **extra):
            return sse({"id": rid, "object": chunk_obj, "created": now, "model": model_name,
                        "choices": choices, **extra})

        async def gen():
            completion_tokens = 0
            held = [("", []) for _ in range(total)]  # with tools, the reply is parsed when complete
            held_lps = [[] for _ in range(total)]
            offsets = [0] * total  # completions: each choice's text_offset so far
            seen = [False] * total
            contexts = [[] for _ in range(total)]  # each choice's tokens so far (TokenTexts)
            named = forced is not None and forced.name is not None
            call_ids = [f"call_{uuid.uuid4().hex[:24]}" for _ in range(total)] if named else []
            required = forced is not None and forced.name is None
            scans = [RequiredCalls() for _ in range(total)] if required else []
            sent = [[] for _ in range(total)]  # "required": each choice's calls so far, the arguments' length sent
            try:
                if kind == "chat":
                    for i in range(total):
                        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None, "stop_reason": None}])
                async for i, ev in stream:
                    first = not seen[i]
                    text, prompt_entries, entries, reason, used, stop = echoed(i, ev, first)
                    seen[i] = True
                    if reason is not None:
                        completion_tokens += used
                    if kind != "chat":
                        if text or reason or entries or prompt_entries:
                            got = None
                            if want_logprobs:
                                got, offsets[i] = echo_and_completion_logprobs(prompt_entries, entries, offsets[i],
                                                                                contexts[i])
                            yield chunk([{"index": i, "text": text, "logprobs": got, "finish_reason": reason,
                                          "stop_reason": stop}])
                        continue
                    if named:
                        # A named call's arguments are the generated JSON itself, streamed as it
                        # comes (vLLM): the first delta names the call, the rest extend its arguments.
                        call = {"index": 0, "function": {"arguments": ev.text}}
                        if first:
                            call = {"index": 0, "id": call_ids[i], "type": "function",
                                    "function": {"name": forced.name, "arguments": ev.text}}
                        if first or ev.text or entries:
                            yield chunk([{"index": i, "delta": {"tool_calls": [call]},
                                          "logprobs": {"content": chat_logprobs(entries, contexts[i])}
                                          if want_logprobs else None, "finish_reason": None, "stop_reason": None}])
                    elif required:
                        # As vLLM streams "required" calls: each as it is written, its first delta
                        # naming it (with its id) once its parameters begin, the rest extending its
                        # arguments; they add up to the non-streamed reply's (RequiredCalls).
                        held[i] = (held[i][0] + ev.text, held[i][1] + ev.token_ids)
                        held_lps[i] += entries  # sent with the next delta
                        scans[i].feed(ev.text)
                        deltas = []
                        for k, name in enumerate(scans[i].names):
                            args = scans[i].arguments(k)
                            if k < len(sent[i]):
                                if len(args) > sent[i][k]:
                                    deltas.append({"index": k, "function": {"arguments": args[sent[i][k]:]}})
                                    sent[i][k] = len(args)
                            elif k == len(sent[i]) and name is not None and args:
                                deltas.append({"index": k, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                               "function": {"name": name, "arguments": args}})
                                sent[i].append(len(args))
                        delta = {"tool_calls": deltas} if deltas else {}
                        if reason is not None:
                            # "tool_calls" when the reply is the finished array, as not streamed;
                            # a reply cut short before any call came out is its text, as there.
                            _, reason = reply(held[i][1], held[i][0], reason)
                            if not sent[i] and held[i][0]:
                                delta = {"content": held[i][0]}
                        if delta or (reason is not None and held_lps[i]):
                            got = {"content": chat_logprobs(held_lps[i], contexts[i])} if want_logprobs else None
                            held_lps[i] = []
                            yield chunk([{"index": i, "delta": delta, "logprobs": got, "finish_reason": None,
                                          "stop_reason": None}])
                    elif use_tools or forced is not None:
                        # Calls are parsed from the whole reply: sent as one delta at its end.
                        held[i] = (held[i][0] + ev.text, held[i][1] + ev.token_ids)
                        held_lps[i] += entries
                        if reason is None:
                            continue
                        msg, reason = reply(held[i][1], held[i][0], reason)
                        got = {"content": chat_logprobs(held_lps[i], contexts[i])} if want_logprobs else None
                        if msg.get("tool_calls"):
                            calls = [dict(c, index=k) for k, c in enumerate(msg["tool_calls"])]
                            yield chunk([{"index": i, "delta": {"tool_calls": calls}, "logprobs": got,
                                          "finish_reason": None, "stop_reason": None}])
                        elif held[i][0] or entries:
                            yield chunk([{"index": i, "delta": {"content": held[i][0]}, "logprobs": got,
                                          "finish_reason": None, "stop_reason": None}])
                    elif ev.text or entries:
                        # A token whose text is held back (part of a character, or maybe a stop
                        # string) or the stop token still brings its logprobs, as vLLM streams them.
                        yield chunk([{"index": i, "delta": {"content": ev.text},
                                      "logprobs": {"content": chat_logprobs(entries, contexts[i])}
                                      if want_logprobs else None,
                                      "finish_reason": None, "stop_reason": None}])
                    if reason is not None:
                        yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason,
                                      "stop_reason": stop}])
                if p.include_usage:
                    yield chunk([], usage=usage(prompts, completion_tokens))
                yield "data: [DONE]\n\n"
            except RequestError as e:  # the engine failed or stopped mid-stream: the status line is long sent
                # As vLLM streams an error: one data event in the error shape, then [DONE].
                yield sse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
                yield "data: [DONE]\n\n"
            finally:
                await stream.aclose()  # cancels the engine requests if we stopped early

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, "chat")

    # ---- vLLM's tokenizer endpoints (lm-eval's tokenizer_backend="remote" reads them) -------------

    special_names = {v: k for k, v in tokenizer.special_tokens.items()} if tokenizer is not None else {}

    def need_tokenizer() -> None:
        if tokenizer is None:
            raise RequestError("this model has no tokenizer", status=404, kind="not_found_error",
                               code="no_tokenizer")

    def tokenize_ids(body: dict, t: TokenizeParams) -> list[int]:
        """The ids /v1/completions makes of a text prompt (special-token text read as the token,
        BOS where the model's raw prompts start with it), or those /v1/chat/completions makes of a
        dialog. add_special_tokens adds that BOS (to a dialog too, unless it starts with it
        already); off, the text alone. CPU work: run off the event loop."""
        if t.chat and _image_parts(body.get("messages")):
            ids = image_chat_prompt(body, engine, limits)[0]
        elif t.chat:
            ids = chat_prompt(body, tokenizer, add_generation_prompt=t.add_generation_prompt)[0]
        else:
            ids = tokenizer.encode(body["prompt"], allow_special=True)
        bos = tokenizer.bos_id
        if t.add_special_tokens and bos is not None and getattr(tokenizer, "add_bos", True) and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _read_json(request, limits)
        t = parse_tokenize(body)
        check_model(body)
        need_tokenizer()
        ids = await asyncio.get_running_loop().run_in_executor(None, tokenize_ids, body, t)
        strs = None
        if t.return_token_strs:  # a tiktoken vocabulary builds its HF spelling the first time: off the loop too
            strs = await asyncio.get_running_loop().run_in_executor(
                None, lambda: [token_name(tokenizer, i, special_names) for i in ids])
        return {"count": len(ids), "max_model_len": args.max_seq_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _read_json(request, limits)
        need_tokenizer()
        ids = parse_detokenize(body, tokenizer.vocab_size)  # the ids it can spell
        check_model(body)
        try:
            return {"prompt": tokenizer.decode(ids)}
        except HerdError as e:
            raise RequestError(str(e), param="tokens") from None

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """What vLLM serves behind --enable-tokenizer-info-endpoint (the tokenizer's config): the
        special tokens' texts, the chat template, the context length."""
        need_tokenizer()
        return {"tokenizer_class": type(tokenizer).__name__,
                "bos_token": token_name(tokenizer, tokenizer.bos_id, special_names),
                "eos_token": token_name(tokenizer, tokenizer.eos_id, special_names),
                "pad_token": token_name(tokenizer, tokenizer.pad_id, special_names),
                "unk_token": token_name(tokenizer, getattr(tokenizer, "unk_id", None), special_names),
                "add_bos_token": bool(tokenizer.bos_id is not None and getattr(tokenizer, "add_bos", True)),
                "chat_template": chat_template_text(tokenizer), "model_max_length": args.max_seq_len}

    return app


# ---- running it ---------------------------------------------------------------------------------

def uvicorn_config(app, host: str, port: int, *, graceful_s: float = 30.0, log_level: str = "warning"):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_s,
                          h11_max_incomplete_event_size=64 * 1024, access_log=False, lifespan="on")


class ServerThread:
    """The server on a background thread (tests, benches, notebooks): `with ServerThread(app) as s:`
    then talk to `s.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn_config(app, host, port, graceful_s=5.0))
        self.thread = threading.Thread(target=self.server.run, name="herd-server", daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise HerdError(f"server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


KV_BLOCK_SIZE = 16  # positions per KV block (the engine's default)


def _kv_dtype(device: str):
    import torch

    return torch.float32 if device == "cpu" else torch.bfloat16  # the weights' dtype, and so the cache's


def kv_cache_blocks(args, kv_cache_bytes: int, max_batch: int, element_size: int, *, given: bool = True) -> int:
    """The KV blocks `herd serve` gives the engine. A cache the user sized (`given`) must hold one
    request using the whole context: Engine.submit reserves ceil(prompt / block) +
    ceil(max_tokens / block) + 1 blocks, at most context / block + 2, and refuses a request that
    needs more — a chat request without max_tokens asks for the rest of the context — so a server
    started with less would answer 400 to ordinary requests. Refused here, naming the minimum.
    The default size is not refused (a 128k-context model would need many GB for it, and short
    requests still work): it gets a note on stderr instead."""
    import sys

    bs = KV_BLOCK_SIZE
    per_block = args.kv_cache_bytes_per_token(element_size) * bs
    full = -(-args.max_seq_len // bs)
    need = full + 2
    if kv_cache_bytes < need * per_block:
        need_mb = -(-need * per_block // (1 << 20))
        have = f"{kv_cache_bytes // per_block * bs} positions"
        if given:
            raise HerdError(f"--kv-cache-mb {kv_cache_bytes >> 20} is too small: it holds {have}, and one "
                            f"request over this model's {args.max_seq_len}-token context needs {need * bs} "
                            f"(--kv-cache-mb {need_mb} at least)")
        print(f"herd serve: note: the default {kv_cache_bytes >> 20} MB KV cache holds {have}, less than one "
              f"request over the model's {args.max_seq_len}-token context; longer requests get a 400 "
              f"(--kv-cache-mb {need_mb} would hold one)", file=sys.stderr)
    # As the engine's own default: no more than the whole batch at full context could use — but
    # never below one full-context request (the engine's cap alone is 2 blocks short at --max-batch 1).
    return max(1, min(kv_cache_bytes // per_block, max(max_batch * full, need)))


def build_engine(model: str, *, quantize: str | None = None, max_batch: int = 32, kv_cache_mb: int | None = None,
                 prefix_sharing: bool = True, device: str = "cpu", min_kv_cache: bool = False) -> Engine:
    """Load a model (built-in name or path), quantize it if asked, and wrap it in an Engine.
    min_kv_cache: size the cache with `kv_cache_blocks` (refusing one too small for a full-context
    request), as `herd serve` does; otherwise the engine sizes it from the bytes alone."""
    import warnings

    from herd.api import load
    from herd.inference.engine import DEFAULT_KV_CACHE_BYTES

    dtype = _kv_dtype(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net, tokenizer = load(model, device=device, dtype=dtype, for_inference=quantize is None)
    if quantize is not None:
        from herd.inference.quantize import quantize as apply

        apply(net, quantize)
    kv_bytes = DEFAULT_KV_CACHE_BYTES if kv_cache_mb is None else kv_cache_mb << 20
    num_blocks = None
    if min_kv_cache:
        num_blocks = kv_cache_blocks(net.args, kv_bytes, max_batch, net.tok_embeddings.weight.element_size(),
                                     given=kv_cache_mb is not None)
    return Engine(net, tokenizer, max_batch=max_batch, kv_cache_bytes=kv_bytes, prefix_sharing=prefix_sharing,
                  num_blocks=num_blocks, block_size=KV_BLOCK_SIZE)


def add_serve_parser(sub) -> None:
    """`herd serve`: registered by herd/cli.py."""
    from herd.hub import BUILTIN_MODELS, DEFAULT_MODEL

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching, paged KV cache)",
                       description="Serve a model over OpenAI's API: /v1/models, /v1/completions, "
                                   "/v1/chat/completions (streaming or not), /health, and vLLM's "
                                   "/tokenize, /detokenize, /tokenizer_info.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in name ({', '.join(BUILTIN_MODELS)}), checkpoint directory or .gguf "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    p.add_argument("--max-batch", type=int, default=32, help="most sequences decoded together (default: 32)")
    p.add_argument("--quantize", choices=["int8", "fp8"], default=None,
                   help="int8: weight-only int8 linears; fp8: §6.2 row-wise FP8 FFNs (emulated on CPU)")
    p.add_argument("--kv-cache-mb", type=int, default=None, help="KV cache memory (default: 1024)")
    p.add_argument("--no-prefix-sharing", action="store_true", help="compute every prompt in full")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: --model)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--allowed-local-media", metavar="DIR", default=None,
                   help="let chat requests name images as file:// paths inside DIR (off by default: "
                        "images come as data:image/...;base64 URLs)")
    p.add_argument("--max-images", type=int, default=Limits.max_images,
                   help=f"most images per request, multimodal Llama 4 only (default: {Limits.max_images})")
    p.set_defaults(func=cmd_serve)


def _listen(host: str, port: int):
    """Bind the server's socket now, before the model loads, and hand it to uvicorn: a port in use
    is one line at once (not uvicorn's log lines and exit 3 after the load), and nothing can take
    the port while the model loads. Set up as uvicorn binds its own (Config.bind_socket)."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise HerdError(f"--port {port}: the port is already in use on {host} (choose another with --port, "
                            "or 0 for any free port)") from None
        if e.errno == errno.EACCES:
            raise HerdError(f"--port {port}: permission denied (ports below 1024 need privileges)") from None
        reason = e.strerror or str(e)
        raise HerdError(f"--host {host}: cannot listen there ({reason})") from None
    sock.set_inheritable(True)
    return sock


def cmd_serve(a) -> None:
    from herd.api import resolve_model_path
    from herd.checkpoint import read_args
    from herd.cli import check_device

    if not 0 <= a.port <= 65535:
        raise HerdError(f"--port must be in 0..65535, got {a.port}")
    if a.max_batch < 1:
        raise HerdError(f"--max-batch must be at least 1, got {a.max_batch}")
    if a.threads is not None:
        if a.threads < 1:
            raise HerdError(f"--threads must be at least 1, got {a.threads}")
        import torch

        torch.set_num_threads(a.threads)
    if a.max_images < 0:
        raise HerdError(f"--max-images must be at least 0, got {a.max_images}")
    if a.kv_cache_mb is not None and a.kv_cache_mb < 1:
        raise HerdError(f"--kv-cache-mb must be at least 1, got {a.kv_cache_mb}")
    media = None
    if a.allowed_local_media is not None:
        media = Path(a.allowed_local_media).expanduser()
        if not media.is_dir():
            raise HerdError(f"--allowed-local-media: {a.allowed_local_media} is not a directory")
    check_device(a.device)
    # The cache size against the model's shape, read from the checkpoint's header before the
    # weights load (the load itself checks it again on the loaded model).
    from herd.inference.engine import DEFAULT_KV_CACHE_BYTES

    kv_bytes = DEFAULT_KV_CACHE_BYTES if a.kv_cache_mb is None else a.kv_cache_mb << 20
    path = resolve_model_path(a.model)
    if a.kv_cache_mb is not None:  # the default's note comes once, from build_engine
        kv_cache_blocks(read_args(path), kv_bytes, a.max_batch, _kv_dtype(a.device).itemsize)
    sock = _listen(a.host, a.port)
    try:
        _serve(a, path, sock, media)
    finally:
        sock.close()


def _serve(a, path: Path, sock, media) -> None:
    import sys

    import uvicorn

    engine = build_engine(str(path), quantize=a.quantize, max_batch=a.max_batch, kv_cache_mb=a.kv_cache_mb,
                          prefix_sharing=not a.no_prefix_sharing, device=a.device, min_kv_cache=True)
    if engine.tokenizer is None:
        raise HerdError(f"{a.model}: no tokenizer found next to the checkpoint; serving text needs one")
    name = a.served_model_name or str(a.model)
    app = create_app(engine, name, Limits(max_images=a.max_images, allowed_local_media=media))
    port = sock.getsockname()[1]  # the one chosen, for --port 0
    print(f"herd serve: {name} on http://{a.host}:{port}/v1 ({engine.blocks.num_blocks} KV blocks of "
          f"{engine.block_size}, batch {engine.max_batch}{', ' + a.quantize if a.quantize else ''}"
          f"{', images' if getattr(engine.args, 'vision', None) is not None else ''})", file=sys.stderr)
    uvicorn.Server(uvicorn_config(app, a.host, port, log_level="info")).run(sockets=[sock])
