"""Choosing the next token from logits: logit bias, repetition / frequency / presence penalties,
then greedy, temperature, min-p, top-k and top-p (nucleus); and the raw logprobs a caller may ask for."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from herd.errors import HerdError


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


GREEDY_BELOW = 1e-5  # a temperature under this is greedy decoding (vLLM's _SAMPLING_EPS)
MAX_LOGPROBS = 20  # most top logprobs per token: vLLM's default max_logprobs (OpenAI's chat allows 20 too)
MAX_PENALTY = 2.0  # presence / frequency penalties lie in [-2, 2] (OpenAI, vLLM)
MAX_LOGIT_BIAS = 100.0  # a logit_bias value lies in [-100, 100] (OpenAI)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 → greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0  # 0 → no top-k cut
    seed: int | None = None
    # Ids never to produce: the tokenizer's reserved special tokens. A model never trained on them
    # (every herd pre-training run) leaves their logits near zero, which can beat real tokens'.
    suppress: tuple[int, ...] = ()
    # None: no logprobs. k >= 0: each sampled token's logprob and the k most likely tokens' (vLLM's
    # SamplingParams.logprobs), taken from the model's raw distribution: log_softmax of the logits
    # before bias, penalties, temperature and the top-k/top-p cut (vLLM V1's default
    # logprobs_mode "raw_logprobs").
    logprobs: int | None = None
    # None, or k >= 0: each prompt token's logprob (after the tokens before it; the first has
    # none) and the k most likely tokens at its position — vLLM's prompt_logprobs, what the OpenAI
    # server's `echo` with `logprobs` returns (lm-eval's loglikelihood requests).
    prompt_logprobs: int | None = None
    # OpenAI's penalties, over the tokens this sample generated (not the prompt), as vLLM applies
    # them: logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's extra (from CTRL, transformers' RepetitionPenaltyLogitsProcessor): every token seen in
    # the prompt or the output has its logit divided by it if positive, multiplied if not. 1 = off.
    repetition_penalty: float = 1.0
    # OpenAI's logit_bias: (token id, value in [-100, 100]) pairs added to the logits. A mapping
    # is accepted and kept as sorted pairs (the dataclass is frozen and hashable).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Structured outputs (OpenAI's response_format, vLLM's structured outputs): an llguidance
    # grammar (herd/inference/structured.py) every sample's tokens must follow. The engine keeps a
    # matcher per sample and passes its mask of allowed tokens to `sample` / `process_logits`.
    grammar: str | None = None
    # vLLM's min_p (transformers' MinPLogitsWarper): after temperature, tokens whose probability is
    # below min_p × the most likely token's are dropped, before top-k/top-p (vLLM V1's order). 0 = off.
    min_p: float = 0.0
    # vLLM's min_tokens: stop tokens (EOS and the request's stop ids) cannot be sampled, and stop
    # strings do not end the output, until this many tokens are generated. Applied by the callers
    # that know the stop ids and the output length (the engine, generate_ids), not by `sample`.
    min_tokens: int = 0

    def __post_init__(self):
        # Types first: a string or None from a config or a JSON body otherwise failed deep inside
        # a comparison or torch.topk with a bare TypeError; a float top_k (2.5) has no meaning.
        if not _is_real(self.temperature) or not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise HerdError(f"temperature must be a finite number >= 0, got {self.temperature!r}")  # NaN fails both
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise HerdError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise HerdError(f"top_k must be a whole number >= 0, got {self.top_k!r}")
        for name in ("logprobs", "prompt_logprobs"):
            x = getattr(self, name)
            if x is not None and (isinstance(x, bool) or not isinstance(x, numbers.Integral)
                                  or not 0 <= x <= MAX_LOGPROBS):
                raise HerdError(f"{name} must be a whole number in 0..{MAX_LOGPROBS} (or None), got {x!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            x = getattr(self, name)
            if not _is_real(x) or not -MAX_PENALTY <= x <= MAX_PENALTY:  # NaN fails too
                raise HerdError(f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {x!r}")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:  # vLLM: "min_p must be in [0, 1]"
            raise HerdError(f"min_p must be a number in [0, 1], got {self.min_p!r}")
        x = self.min_tokens
        if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0:
            raise HerdError(f"min_tokens must be a whole number >= 0, got {x!r}")
        x = self.repetition_penalty
        if not _is_real(x) or not (x > 0 and math.isfinite(x)):  # vLLM: "must be greater than zero"
            raise HerdError(f"repetition_penalty must be a finite number > 0, got {x!r}")
        bias = self.logit_bias
        if isinstance(bias, Mapping):
            bias = tuple(bias.items())
        try:
            pairs = tuple(sorted((t, v) for t, v in bias))
        except (TypeError, ValueError):
            raise HerdError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}") from None
        for t, v in pairs:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
                raise HerdError(f"logit_bias: token ids must be whole numbers >= 0, got {t!r}")
            if not _is_real(v) or not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
                raise HerdError(f"logit_bias: values must be numbers in [-100, 100], got {v!r} for token {t}")
        if len({t for t, _ in pairs}) != len(pairs):
            raise HerdError("logit_bias names a token id twice")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(v)) for t, v in pairs))
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise HerdError(f"grammar must be a string (an llguidance grammar), got {type(self.grammar).__name__}")

    @property
    def greedy(self) -> bool:
        # Below vLLM's _SAMPLING_EPS (1e-5) sampling is greedy, as there: logits / t for a tiny t
        # (1e-300 from a JSON body or --temperature; 0 once it is float32) overflow or turn NaN.
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """Whether the logits depend on the sample's own tokens or a bias (see `process_logits`)."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)


def is_token_id(x) -> bool:
    """A whole number (numpy's too), not a bool: torch.tensor(dtype=long) would read 1.7 and True
    as token 1, another token, without a word."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_stop_ids(stop_ids, name: str = "stop_ids") -> list[int]:
    """A collection of whole-number token ids (a list, tuple, set or tensor) → a list: a bare int
    raised "'int' object is not iterable", a float id (1.5) never matched any token and silently
    stopped nothing. `name`: the argument, as the error line names it."""
    if isinstance(stop_ids, (str, bytes, numbers.Number)) or not hasattr(stop_ids, "__iter__"):
        raise HerdError(f"{name} must be a list of token ids, got {stop_ids!r}")
    ids = list(stop_ids.tolist() if hasattr(stop_ids, "tolist") else stop_ids)
    odd = [t for t in ids if not is_token_id(t)]
    if odd:
        raise HerdError(f"{name} must be whole-number token ids, got {odd[0]!r}")
    return [int(t) for t in ids]


class TokenCounts:
    """One sample's penalty bookkeeping, kept up to date a token at a time: how often each id occurs
    in its output and which ids its prompt holds. Recounting the whole prompt and output at every
    step cost O(prompt + output) per token, so a long penalised generation slowed as it grew; `sync`
    adds only the tokens appended since its last call (float32 holds the counts exactly)."""

    def __init__(self, prompt_ids: Sequence[int]):
        self.prompt_ids = prompt_ids
        self.output: torch.Tensor | None = None  # (V,) float32 counts of the output ids
        self._seen: torch.Tensor | None = None  # (V,) bool, prompt or output ids; built on first use
        self._n = 0  # output tokens counted

    def sync(self, tokens: Sequence[int], vocab_size: int, device, start: int = 0) -> TokenCounts:
        """Count tokens[start:] (the output; it only grows) into `output`; → self."""
        n = len(tokens) - start
        if self.output is None or self.output.shape[0] != vocab_size or self.output.device != torch.device(device) \
                or n < self._n:  # first use, or not the list it counted (start again from zero)
            self.output = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            self._seen, self._n = None, 0
        if n > self._n:
            new = torch.tensor([tokens[i] for i in range(start + self._n, start + n)], dtype=torch.long, device=device)
            self.output.index_put_((new,), torch.ones(len(new), device=device), accumulate=True)
            if self._seen is not None:
                self._seen[new] = True
            self._n = n
        return self

    def seen(self) -> torch.Tensor:
        """(V,) bool: ids in the prompt or the output (the repetition penalty's set)."""
        if self._seen is None:
            self._seen = self.output > 0
            if len(self.prompt_ids):
                self._seen[torch.tensor(list(self.prompt_ids), dtype=torch.long, device=self.output.device)] = True
        return self._seen


def process_logits(logits: torch.Tensor, params: SamplingParams, allowed: torch.Tensor | None = None,
                   counts: Sequence[TokenCounts] | None = None) -> torch.Tensor:
    """logits (B, V) → the logits the sampler draws from, before temperature: reserved ids at -inf,
    logit_bias added, then the repetition penalty (over each row's prompt and output tokens) and
    the frequency and presence penalties (over its output tokens only). vLLM V1's order: its
    logit-bias processor runs before `apply_penalties`, which applies repetition, then frequency,
    then presence. allowed: (B, V) or (V,) bool, the tokens a structured-output grammar lets each row take next;
    the others go to -inf first, as vLLM applies its grammar bitmask before every other logits
    processor (so no bias or penalty can bring a forbidden token back). counts: one `TokenCounts`
    per row, synced with its output (needed only for the penalties)."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    if params.suppress:
        logits = logits.index_fill(-1, torch.tensor(params.suppress, device=logits.device), float("-inf"))
    if not params.penalized:
        return logits
    logits = logits.float().clone()
    B, V = logits.shape
    dev = logits.device
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], device=dev)
        if int(ids.max()) >= V:
            raise HerdError(f"logit_bias: token id {int(ids.max())} is outside the vocabulary of {V}")
        logits[:, ids] += torch.tensor([v for _, v in params.logit_bias], device=dev)
    needs_counts = params.repetition_penalty != 1 or params.presence_penalty or params.frequency_penalty
    if not needs_counts:
        return logits
    if counts is None or len(counts) != B:
        raise HerdError("penalties need each row's token counts (sampling.TokenCounts)")
    for r, c in enumerate(counts):
        row_counts, seen = c.output.to(logits.dtype), c.seen
        if params.repetition_penalty != 1:
            row = logits[r]
            # transformers' RepetitionPenaltyLogitsProcessor: score < 0 → score * p, else score / p
            # (vLLM: logits > 0 divided, logits <= 0 multiplied — the same numbers, 0 stays 0).
            pen = torch.where(row > 0, row / params.repetition_penalty, row * params.repetition_penalty)
            logits[r] = torch.where(seen(), pen, row)
        if params.frequency_penalty:
            logits[r] -= params.frequency_penalty * row_counts
        if params.presence_penalty:
            logits[r] -= params.presence_penalty * (row_counts > 0).to(logits.dtype)
    return logits


def raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax of the model's logits in float32: the distribution logprobs are reported from
    (vLLM V1's raw_logprobs), whatever sampling then does to the logits."""
    return torch.log_softmax(logits.float(), dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None, *,
           allowed: torch.Tensor | None = None, counts: Sequence[TokenCounts] | None = None) -> torch.Tensor:
    """logits (B, V) → token ids (B,). counts (one synced TokenCounts per row) are needed only when
    params has a repetition, frequency or presence penalty; allowed: a structured-output grammar's
    mask (see `process_logits`)."""
    logits = process_logits(logits, params, allowed, counts)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.min_p > 0:
        # vLLM's MinPLogitsProcessor: keep p >= min_p · p_max (the most likely token always stays)
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it
        # is still below top_p (so the most likely token always stays).
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        # The rounding of cumsum - p can leave the top token's "mass before it" a hair above 0:
        # with a top_p under that (1e-10) every token was dropped and torch.multinomial raised.
        drop[..., 0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
