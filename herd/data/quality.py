"""The model-based quality classifier of SPEC §3.1.1, trainable here.

The paper trains fast classifiers (fastText, RoBERTa-style) on *Llama 2's judgments* of whether a
document meets its quality bar, then scores the whole corpus with them. Same shape here:

1. `herd data label INPUT --out labels.jsonl` — an instruction model (by default the built-in
   SmolLM2-135M-Instruct, `herd.load`) judges sampled documents: the label is
   P("Yes") / (P("Yes") + P("No")) of its next token after a yes/no quality question.
2. `herd data train-quality labels.jsonl --out quality.npz` — scikit-learn logistic regression on
   hashed word uni+bigram features (`HashingVectorizer`: no vocabulary to store, same features in
   every process).
3. The pipeline's `quality` stage scores every document with the saved weights and drops those
   below `quality.min_score`.

The saved model is plain arrays in an `.npz` (weights, bias, feature settings) — no pickle, so a
model file from anywhere is safe to load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from herd.errors import HerdError
from herd.files import atomic_write_text

FORMAT = "herd-quality-v1"
JUDGE_PROMPT = ("Here is a document from a web crawl:\n\n<document>\n{text}\n</document>\n\n"
                "Is this a well-written, coherent, informative text worth learning from (not spam, "
                "boilerplate, gibberish or a list of keywords)? Answer Yes or No.")


@dataclass
class QualityModel:
    coef: np.ndarray  # (n_features,)
    intercept: float
    n_features: int = 1 << 18
    ngram_max: int = 2

    def _vectorizer(self):
        from sklearn.feature_extraction.text import HashingVectorizer

        return HashingVectorizer(n_features=self.n_features, ngram_range=(1, self.ngram_max),
                                 alternate_sign=False, norm="l2", lowercase=True)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """P(high quality) for each text."""
        if not texts:
            return np.zeros(0)
        x = self._vectorizer().transform(list(texts))
        z = x @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
        np.savez(tmp, format=np.array(FORMAT), coef=self.coef.astype(np.float32),
                 intercept=np.array(self.intercept), n_features=np.array(self.n_features),
                 ngram_max=np.array(self.ngram_max))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> QualityModel:
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["format"]) != FORMAT:
                    raise HerdError(f"{path}: not a herd quality model (format {z['format']})")
                m = cls(z["coef"].astype(np.float64), float(z["intercept"]), int(z["n_features"]),
                        int(z["ngram_max"]))
        except (OSError, ValueError, KeyError) as e:
            raise HerdError(f"{path}: cannot read a quality model ({e})") from None
        # The feature settings are stored with the weights and used to score, so a model trained with
        # other settings works as trained; but weights that do not match their own settings (an
        # edited or mixed-up file) would be a matmul traceback, and NaN weights would give NaN scores,
        # which `score < min_score` never removes — every document silently kept.
        if m.coef.ndim != 1 or m.coef.shape[0] != m.n_features or m.ngram_max < 1:
            raise HerdError(f"{path}: inconsistent quality model ({m.coef.shape} weights for "
                            f"n_features={m.n_features}, ngram_max={m.ngram_max})")
        if not (np.all(np.isfinite(m.coef)) and math.isfinite(m.intercept)):
            raise HerdError(f"{path}: quality model has non-finite weights")
        return m


def train_quality(texts: Sequence[str], labels: Sequence[int], *, n_features: int = 1 << 18,
                  ngram_max: int = 2, c: float = 4.0, seed: int = 0) -> QualityModel:
    """Logistic regression on hashed n-gram features (labels: 1 = keep, 0 = drop)."""
    from sklearn.linear_model import LogisticRegression

    if not (math.isfinite(c) and c > 0):  # sklearn's own check is a traceback
        raise HerdError(f"c (inverse regularization strength) must be a positive number, got {c}")
    # Anything else would be truncated (0.9 → 0) or make a multi-class model whose first row is not
    # "keep". (read_labels is stricter about JSON types; here True or 1.0 is still unambiguous.)
    bad = [x for x in labels if x not in (0, 1)]
    if bad:
        raise HerdError(f"quality labels must be 0 or 1, got {bad[0]!r}")
    y = np.asarray(labels, dtype=np.int64)
    if len(texts) != len(y) or len(y) == 0:
        raise HerdError("quality training needs as many labels as texts, and at least one")
    if len(set(y.tolist())) < 2:
        raise HerdError(f"quality training needs both labels; all {len(y)} samples are labelled {y[0]}")
    model = QualityModel(np.zeros(n_features), 0.0, n_features, ngram_max)
    # balanced: with 95% of samples labelled 1 (a strict --threshold) the unweighted fit scores
    # nearly everything above 0.5, so `min_score = 0.5` would keep the very documents labelled 0.
    clf = LogisticRegression(C=c, max_iter=1000, random_state=seed, class_weight="balanced")
    clf.fit(model._vectorizer().transform(list(texts)), y)
    model.coef, model.intercept = clf.coef_[0].astype(np.float64), float(clf.intercept_[0])
    return model


def cross_validate(texts: Sequence[str], labels: Sequence[int], folds: int, *, c: float = 4.0,
                   seed: int = 0) -> float:
    """Held-out balanced accuracy over stratified folds (training accuracy is ~1.0 for any labels:
    2^18 hashed features fit a few hundred samples exactly, so it says nothing)."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(labels, dtype=np.int64)
    fewest = int(min(np.sum(y == 0), np.sum(y == 1)))
    if folds < 2 or fewest < folds:
        raise HerdError(f"--folds {folds} needs at least {folds} samples of each label and at least 2 "
                        f"folds; the labels have {fewest} of the rarer one (pass --folds 0 to skip "
                        "cross-validation)")
    texts = list(texts)
    accs = []
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(texts, y):
        m = train_quality([texts[i] for i in tr], y[tr], c=c, seed=seed)
        pred = m.score([texts[i] for i in te]) >= 0.5
        accs.append((np.mean(pred[y[te] == 1]) + np.mean(~pred[y[te] == 0])) / 2)
    return float(np.mean(accs))


# ---- labels from an instruction model ---------------------------------------------------------------
def judge(texts: Sequence[str], model, tokenizer, *, max_chars: int = 1500) -> list[float]:
    """P(Yes) of `model` asked JUDGE_PROMPT about each text (the paper's "Llama 2 judgments")."""
    import torch

    yes = {tokenizer.encode(w)[0] for w in ("Yes", " Yes")}
    no = {tokenizer.encode(w)[0] for w in ("No", " No")}
    scores = []
    with torch.inference_mode():
        for text in texts:
            msgs = [{"role": "user", "content": JUDGE_PROMPT.format(text=text[:max_chars])}]
            ids = tokenizer.chat.encode_dialog(msgs, add_generation_prompt=True)
            logits = model(torch.tensor([ids]), last_only=True)[0, -1].float()
            probs = torch.softmax(logits, -1)
            p_yes, p_no = float(probs[list(yes)].sum()), float(probs[list(no)].sum())
            scores.append(p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.5)
    return scores


def sample_texts(inputs: Sequence[str], n: int, seed: int, max_chars: int) -> list[str]:
    """`n` documents drawn uniformly (seeded) from the inputs, each cut to a random window of
    `max_chars` so long works give a passage rather than always their opening."""
    from herd.data.readers import plan_units, read_unit

    docs = [d.text for inp in inputs for u in plan_units(inp) for d in read_unit(u) if d.text.strip()]
    if not docs:
        raise HerdError("no documents to label in " + ", ".join(inputs))
    rng = random.Random(seed)
    # Each document once before any twice (independent draws judged the same short document several
    # times, and the copies then weigh as several training samples); more samples than documents
    # take further windows of the long ones, and exact repeats are dropped.
    order: list[int] = []
    while len(order) < n:
        perm = list(range(len(docs)))
        rng.shuffle(perm)
        order += perm
    out, seen = [], set()
    for i in order[:n]:
        t = docs[i]
        start = rng.randrange(max(1, len(t) - max_chars))
        w = t[start:start + max_chars]
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_labels(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HerdError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise HerdError(f"{path}:{i}: not valid JSON; expected {{\"text\": ..., \"label\": 0 or 1}}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise HerdError(f"{path}:{i}: expected {{\"text\": ..., \"label\": 0 or 1}} with a string text")
        if "label" not in obj:
            raise HerdError(f"{path}:{i}: no \"label\" (0 or 1)")
        label = obj["label"]
        # Exactly the JSON integers 0 and 1: true, "1", 0.9 or 2 mean the file is not what we think
        # it is, and int() would quietly make them labels.
        if type(label) is not int or label not in (0, 1):
            raise HerdError(f"{path}:{i}: label must be the integer 0 or 1, got {json.dumps(label)}")
        texts.append(obj["text"])
        labels.append(label)
    return texts, labels


# ---- CLI -------------------------------------------------------------------------------------------
def cmd_label(a: argparse.Namespace) -> None:
    from herd.api import load
    from herd.hub import say

    if a.samples < 2 or a.max_chars < 1:
        raise HerdError(f"--samples must be at least 2 and --max-chars at least 1, got {a.samples} and {a.max_chars}")
    texts = sample_texts(a.inputs, a.samples, a.seed, a.max_chars)
    model, tok = load(a.model)
    if tok is None or tok.chat is None:
        raise HerdError(f"{a.model}: judging needs a model with a tokenizer and chat format")
    scores = judge(texts, model, tok, max_chars=a.max_chars)
    # "median": the judge ranks, the better half is labelled 1 — a small judge's P(Yes) is poorly
    # calibrated (SmolLM2-135M rates most text 0.3-0.6), but its ordering still carries signal.
    cut = float(np.median(scores)) if a.threshold == "median" else float(a.threshold)
    rows = [{"text": t, "score": round(s, 6), "label": int(s > cut if a.threshold == "median" else s >= cut)}
            for t, s in zip(texts, scores, strict=True)]
    _write_jsonl(Path(a.out), rows)
    n1 = sum(r["label"] for r in rows)
    if n1 in (0, len(rows)):  # the judgments are kept (they took time), but training would refuse them
        say(f"warning: all {len(rows)} samples labelled {n1 and 1}; train-quality needs both labels "
            "(another --threshold, or more --samples)")
    say(f"wrote {a.out}: {len(rows)} judged samples, {sum(r['label'] for r in rows)} labelled 1 "
        f"(P(Yes) {'above the median' if a.threshold == 'median' else '>='} {cut:.3f}) by {a.model}")


def cmd_train_quality(a: argparse.Namespace) -> None:
    from herd.hub import say

    texts, labels = read_labels(a.labels)
    model = train_quality(texts, labels, c=a.c)  # first: its errors (one label, bad c) come first
    cv = cross_validate(texts, labels, a.folds, c=a.c) if a.folds else None
    model.save(a.out)
    n1 = sum(labels)
    say(f"wrote {a.out}: logistic regression on {len(texts)} samples ({n1} labelled 1, {len(texts) - n1} "
        f"labelled 0, classes weighted equally)"
        + (f"; {a.folds}-fold held-out balanced accuracy {cv:.3f}" if cv is not None else ""))


def _threshold(text: str) -> str | float:
    if text == "median":
        return text
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not 0 <= x <= 1:  # also NaN, which labels everything 0
        raise argparse.ArgumentTypeError(f"{text!r}: a probability in [0, 1] or 'median'")
    return x


def add_quality_parsers(subparsers) -> None:
    """`herd data label` and `herd data train-quality` on a `herd data` subparsers object."""
    p = subparsers.add_parser("label", help="judge sampled documents with an instruction model (quality labels)")
    p.add_argument("inputs", nargs="+", help="text/JSONL/HTML files or directories to sample from")
    p.add_argument("--out", required=True, help="labels JSONL ({text, score, label})")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the judge (default: smollm2-135m-instruct)")
    p.add_argument("--samples", type=int, default=200, help="documents to judge (default: 200)")
    p.add_argument("--max-chars", type=int, default=1500, help="characters of each sample shown (default: 1500)")
    p.add_argument("--threshold", type=_threshold, default="median",
                   help="label 1 when P(Yes) >= this, or 'median' for the better-judged half (default)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_label)
    p = subparsers.add_parser("train-quality", help="train the quality classifier on labels JSONL")
    p.add_argument("labels", help="JSONL of {text, label} (from `herd data label` or elsewhere)")
    p.add_argument("--out", required=True, help="model file (.npz), for quality.model in a pipeline config")
    p.add_argument("--c", type=float, default=4.0, help="inverse L2 strength (default: 4)")
    p.add_argument("--folds", type=int, default=5,
                   help="report held-out accuracy over this many stratified folds; 0 = skip (default: 5)")
    p.set_defaults(func=cmd_train_quality)
