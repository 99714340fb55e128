"""Structured outputs: decoding constrained to a JSON schema (OpenAI's `response_format`, vLLM's
structured outputs), a regex, a choice of exact strings, or a Lark / GBNF grammar, through
llguidance, the library behind vLLM's "guidance" backend.

A request's constraint is an llguidance grammar (a string, kept in `SamplingParams.grammar`). Each
sample gets its own `Matcher` over it; before a sample's token is drawn the matcher's mask sets
every token the grammar does not allow next to -inf (sampling.process_logits), and the drawn token
advances it. The engine advances a matcher only where it appends a sampled token — as it records
logprobs — so the recompute after a preemption, which samples nothing, never advances it twice.
"""

from __future__ import annotations

import json
import threading
import weakref

import torch

from herd.errors import HerdError

# vLLM's guidance backend compiles OpenAI's {"type": "json_object"} as this schema: any JSON object.
JSON_OBJECT_SCHEMA = {"type": "object"}

_lock = threading.Lock()
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
    except ImportError:  # a dependency of herd (pyproject); missing only in a partial install
        raise HerdError("structured outputs need the llguidance package (pip install llguidance)") from None
    return llguidance


class _Wrapper:
    """What llguidance's TokenizerWrapper reads from a tokenizer: each id's raw bytes, the special
    ids, EOS, and an encoder (used to tokenize forced text)."""

    def __init__(self, tokenizer, vocab_size: int):
        specials = set(getattr(tokenizer, "special_tokens", {}).values())
        n = tokenizer.vocab_size
        self.tokens = []
        for i in range(vocab_size):
            # Model rows past the tokenizer's ids (padding) are empty; a special token is read by its
            # name, and listed in special_token_ids so that llguidance never takes it for that text.
            self.tokens.append(tokenizer.decode_bytes([i]) if i < n else b"")
        self.special_token_ids = sorted(t for t in specials if t < vocab_size) + list(range(n, vocab_size))
        stops = sorted(tokenizer.stop_ids) or [tokenizer.eos_id]
        self.eos_token_id = stops[0]
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = tokenizer

    def __call__(self, s: str) -> list[int]:
        # forced text continues the output: no SentencePiece dummy-prefix space before it
        encode = getattr(self._tokenizer, "encode_continuation", self._tokenizer.encode)
        return encode(s)


def ll_tokenizer(tokenizer, vocab_size: int | None = None):
    """llguidance's LLTokenizer for a herd tokenizer (built once per tokenizer: ~1 s for a 128K
    vocabulary). vocab_size: the model's logit rows, when more than the tokenizer's ids. Every
    stop id (end of text, end of turn) counts as EOS: the grammar's end allows any of them."""
    llg = _llguidance()
    vocab_size = max(vocab_size or 0, tokenizer.vocab_size)
    with _lock:
        got = _cache.get(tokenizer)
        if got is not None and got[0] == vocab_size:
            return got[1]
        wrapper = _Wrapper(tokenizer, vocab_size)
        tok = llg.LLTokenizer(llg.TokenizerWrapper(wrapper), n_vocab=vocab_size,
                              eos_token=sorted(tokenizer.stop_ids) or [tokenizer.eos_id])
        _cache[tokenizer] = (vocab_size, tok)
        return tok


def json_schema_grammar(schema, *, any_whitespace: bool = True) -> str:
    """An llguidance grammar for a JSON schema (a dict, or True for anything). As vLLM's guidance
    backend (serialize_guidance_grammar): whitespace between tokens is the model's choice
    ("whitespace_flexible", vLLM's default; any_whitespace=False is its --disable-any-whitespace,
    compact JSON). Raises HerdError for what llguidance cannot read."""
    llg = _llguidance()
    try:
        return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                      defaults={"whitespace_flexible": any_whitespace})
    except (ValueError, TypeError) as e:
        raise HerdError(str(e).strip().splitlines()[0] if str(e).strip() else "invalid JSON schema") from None


def regex_grammar(regex: str) -> str:
    """An llguidance grammar for a regex (Rust regex syntax, as vLLM's guidance backend): the whole
    output must match it. Not checked here: check_grammar reports a bad regex."""
    return _llguidance().LLMatcher.grammar_from_regex(regex)


def choice_grammar(choices: list[str]) -> str:
    """Exactly one of `choices`, as vLLM's guidance backend (llguidance's grammar_from("choice")):
    a Lark alternation of string literals. json.dumps quotes each one, so that "a+b" or "(x)" is
    that text, never a pattern."""
    return _llguidance().LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def lark_grammar(text: str) -> str:
    """An llguidance grammar for a Lark grammar (llguidance's dialect) or a GBNF one, which
    llguidance converts to Lark — vLLM's guidance backend reads a `grammar` the same way
    (grammar_from("grammar")). Raises HerdError for GBNF that cannot be converted."""
    llg = _llguidance()
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        lark = any_to_lark(text)
    except Exception as e:  # the converter raises its own error types, and plain ones on odd input
        raise HerdError(f"cannot read it as Lark or GBNF: {_reason(str(e)) or type(e).__name__}") from None
    return llg.LLMatcher.grammar_from_lark(lark)


def _reason(err: str) -> str:
    """llguidance's error message on one line: its first line, plus the "error: ..." line a regex
    error carries below its source excerpt (the excerpt itself is left out)."""
    lines = [x.strip() for x in err.strip().splitlines() if x.strip()]
    if not lines:
        return ""
    detail = next((x.removeprefix("error:").strip() for x in lines[1:] if x.startswith("error:")), None)
    return f"{lines[0]} {detail}" if detail else lines[0]


def check_grammar(grammar: str, tokenizer, vocab_size: int | None = None) -> None:
    """Compile `grammar` against the tokenizer: a grammar llguidance cannot compile (a schema's
    unknown $ref, a bad regex, contradictory bounds, a Lark syntax error) raises HerdError with its
    one-line reason, before the request reaches the engine."""
    llg = _llguidance()
    err = llg.LLMatcher.validate_grammar(grammar, ll_tokenizer(tokenizer, vocab_size))
    if err:
        raise HerdError(_reason(err) or "invalid grammar")


class Matcher:
    """One sample's place in the grammar: the mask of tokens allowed next, advanced by each token
    the sample appends."""

    def __init__(self, grammar: str, tokenizer, vocab_size: int, *, _matcher=None):
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        if _matcher is None:
            llg = _llguidance()
            _matcher = llg.LLMatcher(ll_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
            if _matcher.is_error():
                raise HerdError(f"grammar: {_matcher.get_error()}")
        self._m = _matcher
        self.grammar = grammar

    def fork(self) -> Matcher:
        """An independent copy at the same place (an n>1 request's samples branch off together)."""
        return Matcher(self.grammar, self.tokenizer, self.vocab_size, _matcher=self._m.deep_copy())

    def allowed(self, vocab: int) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar allows next. Ids past llguidance's vocabulary
        (none, unless the logits have more rows than it was built for) are not allowed."""
        bias = self._m.compute_logit_bias()  # one byte per token: 200 allowed, 0 not
        mask = torch.frombuffer(bytearray(bias), dtype=torch.uint8) > 0
        if mask.numel() >= vocab:
            return mask[:vocab]
        return torch.cat([mask, torch.zeros(vocab - mask.numel(), dtype=torch.bool)])

    def advance(self, token: int) -> bool:
        """Consume a sampled token; False if the grammar did not allow it (the matcher is then in
        its error state)."""
        return self._m.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar has ended: nothing more may follow (vLLM stops a request here)."""
        return self._m.is_stopped()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None
