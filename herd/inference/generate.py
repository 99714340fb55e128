"""Autoregressive generation: prefill the prompt into a KV cache, then decode one token at a time
(gpt-fast's split; DESIGN principle 6).

Prompts of different lengths share a batch by left-padding: each row gets its own RoPE positions
(counting from its first real token) and a mask that hides its padding, so a row's tokens are the
same as if it ran alone.
"""

from __future__ import annotations

import numbers
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from herd.errors import HerdError, HerdWarning
from herd.inference.cpu_linear import PackedLinear
from herd.inference.kv_cache import StaticKVCache, new_cache
from herd.inference.sampling import SamplingParams, TokenCounts, check_stop_ids, is_token_id, sample


@dataclass
class Completion:
    ids: list[int] = field(default_factory=list)  # generated tokens, without the stop token
    stop_token: int | None = None  # the eot/eom/eos that ended it, if one did
    finish_reason: str = "length"  # "stop" or "length"


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_seq_len: int) -> list[list[int]]:
    """Every row a non-empty run of in-vocabulary ids that leaves room for a new token → the rows
    as lists of ints. No rows at all is not an error (generate_ids yields nothing for it): it used
    to be reported as "empty prompt", which sent a caller with an empty batch looking for an empty
    string. A (B, T) tensor or array, or rows of them, are taken as their ids."""
    if hasattr(prompts, "tolist") and not isinstance(prompts, (list, tuple)):
        # a 2-D tensor batch: `not prompts` on it raised "Boolean value of Tensor ... is ambiguous"
        prompts = prompts.tolist()
    rows = []
    for i, p in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt {i}"
        if hasattr(p, "tolist") and not isinstance(p, (list, tuple)):  # a tensor or NumPy row
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not hasattr(p, "__len__"):
            raise HerdError(f"{where} is {type(p).__name__}, not a list of token ids")
        if len(p) == 0:
            raise HerdError(f"{where} is empty: give at least one token")
        # torch.tensor(p, dtype=long) truncates 1.7 to token 1 and reads True as token 1: a
        # different prompt, answered without a word (the serving engine refuses them too)
        odd = [t for t in p if not is_token_id(t)]
        if odd:
            raise HerdError(f"{where}: token ids must be integers, got {odd[0]!r}")
        rows.append([int(t) for t in p])
    for p in rows:
        if len(p) >= max_seq_len:
            raise HerdError(f"prompt of {len(p)} tokens does not fit the model's context of {max_seq_len} "
                            "(at least one position is needed to generate)")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise HerdError(f"token id {bad[0]} is outside the model's vocabulary of {vocab_size}")
    return rows


def check_max_new_tokens(n) -> int:
    """At least one new token: a prompt always leaves room for one (_check_prompts), so asking for
    none (or fewer) would only produce an empty answer that looks like a silent failure. The
    OpenAI-style server holds `max_tokens` to the same floor."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise HerdError(f"max_new_tokens must be a whole number >= 1, got {n!r}")
    return int(n)


def check_min_tokens(min_tokens: int, max_tokens: int) -> None:
    """vLLM's rule: min_tokens may not exceed max_tokens (it could never be met); its type and
    sign are SamplingParams' checks."""
    if min_tokens > max_tokens:
        raise HerdError(f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}")


# A seed is a signed 64-bit integer, as OpenAI's `seed` and the server (herd/inference/server.py)
# take it: torch.Generator.manual_seed overflows past 2**64 with a bare ValueError, and the same
# bound everywhere means a seed that works on the command line also works over HTTP.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1


def check_seed(seed) -> int | None:
    """None (unseeded) or an integer within [SEED_MIN, SEED_MAX]; anything else is a HerdError."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not SEED_MIN <= seed <= SEED_MAX:
        raise HerdError(f"seed must be a whole number from {SEED_MIN} to {SEED_MAX}, got {seed!r}")
    return int(seed)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(model):
    """The model under torch.compile, compiled once per model and reused by later calls. A model
    with pre-packed CPU linears is returned as is: those are already the fast path on CPU, and
    inductor cannot fuse across them. A model bound to a prompt's images (vision.WithImages, a new
    wrapper per request) is keyed by the model it wraps: the compiled decode steps are text only,
    and a per-wrapper key would compile again for every image prompt."""
    from herd.models.vision import WithImages

    if isinstance(model, WithImages):
        model = model.model
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        warnings.warn("compile skipped: this model's linears are pre-packed for CPU inference", HerdWarning, stacklevel=3)
        return model
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=False)
    return _COMPILED[model]


@torch.inference_mode()
def generate_ids(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (),
                 compile: bool = False) -> Iterator[list[int | None]]:
    """Yield, per decoding step, the new token of every row (None once a row has stopped).

    A row stops at any id in `stop_ids` (that token is yielded, then None) or after
    `max_new_tokens`; each row is clamped so it never runs past the model's context. With
    `sampling.min_tokens` (vLLM's), no id of `stop_ids` is sampled before that many new tokens.
    compile: run the decode steps through torch.compile, with a fixed-shape cache and masks so one
    compiled graph serves every step (prefill stays eager: its length varies).
    """
    args = model.args
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    check_seed(sampling.seed)
    stop_ids = check_stop_ids(stop_ids)
    check_min_tokens(sampling.min_tokens, max_new_tokens)
    prompts = _check_prompts(prompts, args.vocab_size, args.max_seq_len)
    if not prompts:  # an empty batch: nothing to generate (vLLM's LLM.generate([]) gives [] too)
        return
    device = model.tok_embeddings.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    # Each row may run to the end of the context counted from its own first token, as it would
    # alone: clamping every row to the longest prompt's room cut a short prompt batched with a
    # long one. The cache then holds up to L - min(len) slots of left padding beyond the context.
    row_limit = [min(max_new_tokens, args.max_seq_len - len(p)) for p in prompts]
    max_new_tokens = max(row_limit)
    total = L + max_new_tokens
    cache = (StaticKVCache if compile else new_cache)(args, B, total, dtype=model.tok_embeddings.weight.dtype,
                                                    device=device, padding=L - min(len(p) for p in prompts))
    # One generator per row, each seeded with the seed: a row's draws depend only on its own
    # logits, so a seeded prompt samples the same text alone or in a batch of any size (as the
    # serving engine's per-sequence generators and vLLM's per-request seeds do).
    generators = None
    if sampling.seed is not None:
        generators = [torch.Generator(device=device).manual_seed(sampling.seed) for _ in prompts]
    row_done = torch.tensor(row_limit, device=device)  # steps after which a row is out of context

    pad = torch.tensor([L - len(p) for p in prompts], device=device)
    tokens = torch.zeros(B, L, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
    # Masks are needed when rows are left-padded, or always with the fixed-shape cache (whose
    # unwritten tail must be hidden). Otherwise the model's own causal default is exact and fastest.
    explicit = compile or bool(pad.any())
    positions = mask = None
    key_pos = torch.arange(total, device=device)
    key_valid = key_pos[None, :] >= pad[:, None]  # (B, S_max): False on a row's left padding
    if explicit:
        q_pos = torch.arange(L, device=device)
        positions = (q_pos - pad[:, None]).clamp(min=0)  # (B, L): each row counts from its first token
        width = total if compile else L
        causal = key_pos[None, :width] <= q_pos[:, None]  # (L, width)
        # A padding row may see itself: a query row with no visible key would give NaNs.
        mask = ((causal & key_valid[:, None, :width]) | (key_pos[None, :width] == q_pos[:, None]))[:, None]
    if compile:
        cache.input_pos = torch.arange(L, device=device)
    logits = model(tokens, cache=cache, positions=positions, mask=mask, last_only=True)[:, -1]
    step_model = compiled(model) if compile else model

    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    # Each row's own generated tokens, for the repetition/frequency/presence penalties (they count
    # a row's prompt and output, as the serving engine's per-sample penalties and vLLM's do).
    # Counted incrementally (TokenCounts): a recount of every row's prompt and output per step
    # made a long penalised generation slower with every token.
    outputs: list[list[int]] = [[] for _ in prompts]
    counts = [TokenCounts(p) for p in prompts] if sampling.penalized else None
    V = logits.shape[-1]
    # min_tokens: the stop ids are masked (as vLLM's MinTokensLogitsProcessor) while fewer than
    # min_tokens tokens are out; every row has generated `step` tokens at step `step`. An id
    # outside the vocabulary can never be sampled anyway.
    banned = stop[stop < V]
    for step in range(max_new_tokens):
        if step < sampling.min_tokens and len(banned):
            logits = logits.index_fill(-1, banned, float("-inf"))
        if counts is not None:
            for c, row in zip(counts, outputs, strict=True):
                c.sync(row, V, logits.device)
        if generators is None or sampling.greedy:
            nxt = sample(logits, sampling, counts=counts)
        else:
            nxt = torch.cat([sample(logits[i:i + 1], sampling, g, counts=counts and counts[i:i + 1])
                             for i, g in enumerate(generators)])
        if counts is not None:
            for row, t in zip(outputs, nxt.tolist(), strict=True):
                row.append(t)
        yield [None if f else int(t) for t, f in zip(nxt.tolist(), finished.tolist(), strict=True)]
        finished |= torch.isin(nxt, stop) | (row_done <= step + 1)
        if step + 1 == max_new_tokens or bool(finished.all()):
            return
        offset = L + step  # where the token just sampled goes
        if explicit:
            positions = (offset - pad)[:, None]
            mask = (key_valid & (key_pos <= offset))[:, None, None, :total if compile else offset + 1]
        if compile:
            cache.input_pos = torch.tensor([offset], device=device)
        logits = step_model(nxt[:, None], cache=cache, positions=positions, mask=mask)[:, -1]


def generate_batch(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (),
                   compile: bool = False) -> list[Completion]:
    """Run `generate_ids` to the end and collect one Completion per prompt."""
    out = [Completion() for _ in prompts]
    stop = set(check_stop_ids(stop_ids))
    for step in generate_ids(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                             stop_ids=stop_ids, compile=compile):
        for c, t in zip(out, step, strict=True):
            if t is None:
                continue
            if t in stop:
                c.stop_token, c.finish_reason = t, "stop"
            else:
                c.ids.append(t)
    return out
