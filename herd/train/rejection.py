"""Rejection sampling (SPEC §4; paper §4.2.2): K samples per prompt, scored by a reward model or a
programmatic verifier, the best kept — the SFT data of the next round.

The prompt is prefilled once and its keys/values are shared by the K samples (the paper's
PagedAttention prompt sharing doubled throughput): one batch-1 prefill, its cache copied into the
K rows of the decode cache, then K rows decode together.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from herd.errors import HerdError
from herd.inference.generate import Completion, _check_prompts, check_max_new_tokens
from herd.inference.kv_cache import KVCache
from herd.inference.sampling import SamplingParams, sample


@torch.inference_mode()
def sample_k(model, prompt: Sequence[int], k: int, *, max_new_tokens: int, sampling: SamplingParams,
             stop_ids: Sequence[int] = (), generator: torch.Generator | None = None) -> list[Completion]:
    """K completions of one prompt whose prefill runs once (batch 1) and is shared by all K rows."""
    if k <= 0:
        raise HerdError(f"k must be positive (got {k})")
    args = model.args
    _check_prompts([prompt], args.vocab_size, args.max_seq_len)
    device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    L = len(prompt)
    max_new_tokens = min(check_max_new_tokens(max_new_tokens), args.max_seq_len - L)
    out = [Completion() for _ in range(k)]
    if max_new_tokens <= 0:
        return out
    one = KVCache(args, 1, L, dtype=dtype, device=device)
    logits = model(torch.tensor([list(prompt)], device=device), cache=one, last_only=True)[:, -1]  # (1, V)
    cache = KVCache(args, k, L + max_new_tokens, dtype=dtype, device=device)
    cache.k[:, :, :, :L] = one.k  # (layers, 1 → k, K, L, d): the prompt's keys/values, computed once
    cache.v[:, :, :, :L] = one.v
    cache.offset = L
    del one
    logits = logits.expand(k, -1)
    stop_set = set(stop_ids)
    stop = torch.tensor(sorted(stop_set), dtype=torch.long, device=device)
    finished = torch.zeros(k, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt = sample(logits, sampling, generator)
        for c, t, f in zip(out, nxt.tolist(), finished.tolist(), strict=True):
            if f:
                continue
            if t in stop_set:
                c.stop_token, c.finish_reason = t, "stop"
            else:
                c.ids.append(t)
        finished |= torch.isin(nxt, stop)
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]
    return out


Scorer = Callable[[list[dict], dict, list[str]], list[float]]  # (prompt, record, samples) → scores


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_sample_args(*, k: Any = 1, max_new_tokens: Any = 1, temperature: Any = 0.8, top_p: Any = 1.0,
                      missing_eos_penalty: Any = None, min_score: Any = None, pairs_per_prompt: Any = 1) -> None:
    """Refuse (HerdError, one line) settings of `herd sample` that would waste the sampling or give a
    silently wrong file; `herd sample` calls it before loading the model. A negative
    pairs_per_prompt was a list slice (all pairs but the last), 0 wrote nothing; a NaN penalty
    wrote `"score": NaN` (not JSON) and a negative one rewarded cut-off replies; a NaN min_score
    kept every prompt (no comparison with NaN is true)."""
    if not _whole(k) or k < 1:
        raise HerdError(f"k (samples per prompt) must be a whole number >= 1, got {k!r}")
    check_max_new_tokens(max_new_tokens)
    SamplingParams(temperature=temperature, top_p=top_p)  # its own checks: finite temperature >= 0, top_p in (0, 1]
    if not _whole(pairs_per_prompt) or pairs_per_prompt < 1:
        raise HerdError(f"pairs per prompt must be a whole number >= 1, got {pairs_per_prompt!r}")
    if missing_eos_penalty is not None and not (_is_number(missing_eos_penalty) and math.isfinite(missing_eos_penalty)
                                                and missing_eos_penalty >= 0):
        raise HerdError(f"the missing-EOS penalty must be a finite number >= 0 (it is subtracted from the score "
                        f"of a cut-off sample), got {missing_eos_penalty!r}")
    if min_score is not None and not (_is_number(min_score) and math.isfinite(min_score)):
        raise HerdError(f"the minimum score must be a finite number, got {min_score!r}")


def check_verifier_records(name: str, prompts: Sequence[tuple[str, list[dict], dict]]) -> None:
    """Check every prompt line has what verifier `name` reads (`answer`, a valid `match`), naming the
    line, before any sampling (this used to fail at the first such line, after the model load)."""
    from herd.eval.tasks import MATCHES, check_answer_matching, check_generation_answer, check_match_options

    verifier_scorer(name)  # an unknown name fails here
    for where, _msgs, record in prompts:
        if "answer" not in record:
            raise HerdError(f"{where}: the '{name}' verifier needs an 'answer' field in every prompt line")
        check_generation_answer(record["answer"], where)
        match = record.get("match", "auto")
        if match not in MATCHES:
            raise HerdError(f"{where}: unknown 'match' {match!r}; choose {', '.join(MATCHES)}")
        # ignore_case etc. and what they leave of the answer, as a task line's (herd/eval/tasks.py)
        check_answer_matching(record["answer"], match, check_match_options(record, where), where)


def verifier_scorer(name: str) -> Scorer:
    """A programmatic verifier over records with an `answer` and optional `match` (herd/eval/tasks.py's
    answer matching): 1.0 for a correct sample, 0.0 otherwise."""
    from herd.eval.tasks import check_match_options, is_correct

    if name != "answer":
        raise HerdError(f"unknown verifier {name!r} (available: answer — compares with the record's 'answer')")

    def score(prompt, record, samples):
        if "answer" not in record:
            raise HerdError("the 'answer' verifier needs an 'answer' field in every prompt line")
        match = record.get("match", "auto")
        options = check_match_options(record)
        return [1.0 if is_correct(s, record["answer"], match, **options) else 0.0 for s in samples]

    return score


def reward_scorer(rm, tokenizer) -> Scorer:
    from herd.train.posttrain import score_responses

    return lambda prompt, record, samples: score_responses(rm, tokenizer, prompt, samples)


@dataclass
class Sampled:
    prompt: list[dict]
    record: dict
    samples: list[str]
    scores: list[float]
    finished: list[bool] | None = None  # per sample: ended with a stop token (not cut off by the length limit)

    @property
    def best(self) -> int:
        return max(range(len(self.scores)), key=lambda i: self.scores[i])


def rejection_sample(model, tokenizer, prompts: Sequence[tuple[str, list[dict], dict]], k: int, scorer: Scorer, *,
                     max_new_tokens: int = 64, temperature: float = 0.8, top_p: float = 1.0, seed: int = 0,
                     missing_eos_penalty: float | None = None, progress: bool = False) -> list[Sampled]:
    """K samples per prompt (prompt lines from herd.train.posttrain.load_prompts), each scored.

    `missing_eos_penalty` is subtracted from the score of every sample the length limit cut off
    before its end-of-turn token (TRL's `missing_eos_penalty`): a verifier only reads the answer, so
    without it a correct answer followed by a sentence broken off mid-word wins, and SFT on it (or
    DPO with it as the chosen reply) teaches replies that never end."""
    from tqdm import tqdm

    from herd.api import encode_prompt

    check_sample_args(k=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      missing_eos_penalty=missing_eos_penalty)
    params = SamplingParams(temperature=temperature, top_p=top_p)
    gen = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(seed)
    out = []
    for where, msgs, record in tqdm(prompts, disable=not progress, desc="sample"):
        ids = encode_prompt(tokenizer, msgs)
        if len(ids) >= model.args.max_seq_len:
            raise HerdError(f"{where}: prompt of {len(ids)} tokens does not fit the model's context of "
                            f"{model.args.max_seq_len}")
        comps = sample_k(model, ids, k, max_new_tokens=max_new_tokens, sampling=params,
                         stop_ids=sorted(tokenizer.stop_ids), generator=gen)
        texts = [tokenizer.decode(c.ids) for c in comps]
        finished = [c.finish_reason == "stop" for c in comps]
        scores = [float(s) for s in scorer(msgs, record, texts)]
        if not all(math.isfinite(x) for x in scores):
            # The best of scores holding NaN is arbitrary, and NaN is not JSON: refuse, not guess.
            raise HerdError(f"{where}: the scorer gave a non-finite score ({scores}); is the reward model broken?")
        if missing_eos_penalty is not None:
            scores = [s if f else s - missing_eos_penalty for s, f in zip(scores, finished, strict=True)]
        out.append(Sampled(msgs, record, texts, scores, finished))
    return out


def write_best(results: Sequence[Sampled], out: str | os.PathLike, min_score: float | None = None,
               keep_all: bool = False) -> int:
    """JSONL, one line per prompt whose best score reaches `min_score`: `messages` (prompt + best
    reply: chat JSONL for `herd sft`), `score`, and with keep_all every sample and score. Atomic."""
    from herd.checkpoint.common import atomic_path

    check_sample_args(min_score=min_score)
    lines = []
    for r in results:
        if not all(math.isfinite(x) for x in r.scores):
            raise HerdError(f"non-finite score in {r.scores}: the output would not be JSON")
        b = r.best
        if min_score is not None and r.scores[b] < min_score:
            continue
        row: dict[str, Any] = {"messages": r.prompt + [{"role": "assistant", "content": r.samples[b]}],
                               "score": r.scores[b]}
        for key in ("answer", "match"):
            if key in r.record:
                row[key] = r.record[key]
        if keep_all:
            row["samples"], row["scores"] = r.samples, r.scores
            if r.finished is not None:
                row["finished"] = r.finished
        # allow_nan=False: the file must stay strict JSON (a NaN score once wrote a bare `NaN`).
        lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
    with atomic_path(Path(out)) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def preference_pairs(results: Sequence[Sampled], seed: int = 0, per_prompt: int = 1) -> list[dict]:
    """Preference lines from scored samples: up to `per_prompt` distinct (chosen, rejected) pairs
    per prompt, the chosen among the best-scored samples and the rejected strictly lower-scored,
    drawn at random; prompts whose samples all tie give none."""
    if not _whole(per_prompt) or per_prompt < 1:  # it slices a list: -1 meant "all but the last"
        raise HerdError(f"pairs per prompt must be a whole number >= 1, got {per_prompt!r}")
    rng = random.Random(seed)
    rows = []
    for r in results:
        top = max(r.scores)
        best = [i for i, s in enumerate(r.scores) if s == top]
        worse = [i for i, s in enumerate(r.scores) if s < top]
        # never a pair of one text (two samples can be equal; their scores differ only by float noise)
        combos = [(b, w) for b in best for w in worse if r.samples[b] != r.samples[w]]
        rng.shuffle(combos)
        for b, w in combos[:per_prompt]:
            rows.append({"prompt": r.prompt, "chosen": [{"role": "assistant", "content": r.samples[b]}],
                         "rejected": [{"role": "assistant", "content": r.samples[w]}]})
    return rows
