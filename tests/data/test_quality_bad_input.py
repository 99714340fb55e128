"""`herd data train-quality` on bad input: one `herd: error:` line naming the problem, exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from herd.cli import main
from herd.data.quality import read_labels, train_quality
from herd.errors import HerdError

GOOD = [{"text": f"a clear sentence number {i} about rivers and science", "label": 1} for i in range(5)]
BAD = [{"text": f"buy cheap spam now {i} spam", "label": 0} for i in range(5)]


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _cli(capsys, *argv):
    code = main(["data", "train-quality", *argv])
    return code, capsys.readouterr().err


def _one_line_error(code, err) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("herd: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("label, shown", [(2, "2"), ("1", '"1"'), (True, "true"), (False, "false"),
                                          (0.9, "0.9"), (1.0, "1.0"), (None, "null"), (-1, "-1")])
def test_label_must_be_the_integer_0_or_1(tmp_path, capsys, label, shown):
    labels = _write(tmp_path / "labels.jsonl", GOOD + BAD + [{"text": "x", "label": label}])
    line = _one_line_error(*_cli(capsys, labels, "--out", str(tmp_path / "m.npz")))
    assert f"{labels}:11:" in line and "0 or 1" in line and line.endswith(f"got {shown}")
    assert not (tmp_path / "m.npz").exists()


@pytest.mark.parametrize("row, message", [
    ({"text": "x"}, 'no "label"'),
    ({"text": None, "label": 1}, "string text"),
    ({"label": 1}, "string text"),
    ("[1, 2]", "string text"),
    ('{"text": "trunc', "not valid JSON"),
])
def test_malformed_rows_name_file_and_line(tmp_path, capsys, row, message):
    labels = _write(tmp_path / "labels.jsonl", GOOD + [row] + BAD)
    line = _one_line_error(*_cli(capsys, labels, "--out", str(tmp_path / "m.npz")))
    assert f"{labels}:6:" in line and message in line


def test_read_labels_keeps_exact_values(tmp_path):
    texts, labels = read_labels(_write(tmp_path / "l.jsonl", GOOD + BAD))
    assert labels == [1] * 5 + [0] * 5 and all(type(x) is int for x in labels)
    assert texts[0] == GOOD[0]["text"]


@pytest.mark.parametrize("c", ["0", "-1", "nan", "inf"])
def test_c_must_be_positive(tmp_path, capsys, c):
    labels = _write(tmp_path / "labels.jsonl", GOOD + BAD)
    line = _one_line_error(*_cli(capsys, labels, "--out", str(tmp_path / "m.npz"), "--c", c))
    assert "c (inverse regularization strength) must be a positive number" in line
    assert not (tmp_path / "m.npz").exists()


def test_small_positive_c_trains(tmp_path, capsys):
    labels = _write(tmp_path / "labels.jsonl", GOOD + BAD)
    code, err = _cli(capsys, labels, "--out", str(tmp_path / "m.npz"), "--c", "0.5")
    assert code == 0, err
    assert (tmp_path / "m.npz").exists()


def test_library_rejects_labels_other_than_0_and_1():
    texts = [r["text"] for r in GOOD + BAD]
    for labels in ([1] * 5 + [0] * 4 + [2], [1] * 5 + [0] * 4 + [0.9], [1] * 5 + [0] * 4 + ["1"]):
        with pytest.raises(HerdError, match="must be 0 or 1"):
            train_quality(texts, labels)
    with pytest.raises(HerdError, match="positive"):
        train_quality(texts, [1] * 5 + [0] * 5, c=0)
    # numpy integers and bools are unambiguous 0/1
    model = train_quality(texts, np.array([True] * 5 + [False] * 5))
    assert np.all(model.score(texts[:5]) > model.score(texts[5:]).max())


# ---- end-to-end use on inputs the other tests never used -------------------------------------------
RIVERS = [f"The {a} river flows through the {b} valley, where farmers grow {c} in the rich soil left by its floods."
          for a in ["long", "wide", "slow", "old", "cold", "deep", "broad", "calm"] for b in ["green", "quiet", "northern"]
          for c in ["wheat", "rice"]]
SPAM = ["buy cheap shoes now click here", "free pills best price click", "cheap watches sale now buy"]


def test_imbalanced_labels_still_drop_the_rare_class():
    # 48 vs 3: without class weighting the fit scored the spam itself ~0.6, above min_score 0.5
    model = train_quality(RIVERS + SPAM, [1] * len(RIVERS) + [0] * len(SPAM))
    assert np.all(model.score(SPAM) < 0.5), model.score(SPAM)
    assert np.all(model.score(RIVERS) >= 0.5)


def test_fewer_samples_than_folds_is_one_line(tmp_path, capsys):
    labels = _write(tmp_path / "l.jsonl", GOOD[:3] + BAD[:2])
    line = _one_line_error(*_cli(capsys, labels, "--out", str(tmp_path / "m.npz")))
    assert "--folds 5 needs at least 5 samples of each label" in line and "have 2" in line
    assert not (tmp_path / "m.npz").exists()
    code, err = _cli(capsys, labels, "--out", str(tmp_path / "m.npz"), "--folds", "0")
    assert code == 0 and "held-out" not in err, err


def test_train_reports_held_out_accuracy_and_class_counts(tmp_path, capsys):
    labels = _write(tmp_path / "l.jsonl", GOOD + BAD)
    code, err = _cli(capsys, labels, "--out", str(tmp_path / "m.npz"))
    assert code == 0 and "5 labelled 1, 5 labelled 0" in err and "5-fold held-out balanced accuracy" in err, err


def test_inconsistent_or_nan_model_refused(tmp_path):
    from herd.data.quality import QualityModel

    m = train_quality([r["text"] for r in GOOD + BAD], [1] * 5 + [0] * 5, n_features=64)
    QualityModel(m.coef[:32], m.intercept, 64, 2).save(tmp_path / "short.npz")
    with pytest.raises(HerdError, match="inconsistent quality model"):
        QualityModel.load(tmp_path / "short.npz")
    QualityModel(m.coef * np.nan, m.intercept, 64, 2).save(tmp_path / "nan.npz")
    with pytest.raises(HerdError, match="non-finite"):
        QualityModel.load(tmp_path / "nan.npz")
    # other feature settings than the defaults are honoured: they are stored with the weights
    m.save(tmp_path / "m64.npz")
    again = QualityModel.load(tmp_path / "m64.npz")
    assert again.n_features == 64 and np.allclose(again.score(["buy cheap spam now 1 spam"]),
                                                  m.score(["buy cheap spam now 1 spam"]))


def test_sampling_judges_each_document_once(tmp_path):
    from herd.data.quality import sample_texts

    src = _write(tmp_path / "d.jsonl", [{"text": f"short document {i}"} for i in range(6)])
    # independent draws gave the same short document two or three times in 6 samples
    out = sample_texts([src], 6, seed=1, max_chars=1500)
    assert sorted(out) == sorted(f"short document {i}" for i in range(6))
    assert len(sample_texts([src], 20, seed=1, max_chars=1500)) == 6  # exact repeats dropped


@pytest.mark.parametrize("t", ["1.5", "-0.1", "nan"])
def test_label_threshold_must_be_a_probability(tmp_path, capsys, t):
    src = _write(tmp_path / "d.jsonl", [{"text": "a document"}])
    with pytest.raises(SystemExit) as e:
        main(["data", "label", src, "--out", str(tmp_path / "l.jsonl"), "--threshold", t])
    assert e.value.code == 2 and "a probability in [0, 1]" in capsys.readouterr().err


def test_pipeline_writes_scores_and_refuses_bad_model_up_front(tmp_path, capsys):
    from herd.data.pipeline import load_pipeline_config, run_pipeline
    from herd.data.quality import QualityModel

    model = train_quality(RIVERS + SPAM, [1] * len(RIVERS) + [0] * len(SPAM))
    path = model.save(tmp_path / "q.npz")
    rows = [{"text": t, "name": f"good{i}"} for i, t in enumerate(RIVERS[:4])] + [
        {"text": t, "name": f"spam{i}"} for i, t in enumerate(SPAM)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"input": [{"path": str(tmp_path / "in.jsonl")}],
            "run": {"out": str(tmp_path / "out"), "tokenizer": "bytes", "val_fraction": 0},
            "minhash": {"enabled": False}, "line_dedup": {"enabled": False},
            "kl_divergence": {"enabled": False}, "repetition": {"enabled": False},
            "quality": {"enabled": True, "model": str(path), "min_score": 0.5}}
    run_pipeline(load_pipeline_config(data=data), workers=1)
    out = tmp_path / "out"
    docs = [json.loads(x) for x in (out / "documents.jsonl").read_text().splitlines()]
    assert {d["name"] for d in docs} == {f"good{i}" for i in range(4)}
    want = dict(zip([r["name"] for r in rows], model.score([r["text"] for r in rows]), strict=True))
    assert all(abs(d["quality"] - want[d["name"]]) < 1e-5 for d in docs), docs  # README: the score is there
    removed = [json.loads(x) for x in (out / "removed.jsonl").read_text().splitlines()]
    assert len(removed) == 3 and all("< min_score 0.5" in r["detail"] for r in removed), removed
    q = json.loads((out / "manifest.json").read_text())
    assert '"quality"' in json.dumps(q) and json.dumps(q).count("documents_removed") > 0

    QualityModel(model.coef[:10], 0.0, model.n_features, 2).save(tmp_path / "bad.npz")
    data["quality"]["model"] = str(tmp_path / "bad.npz")
    with pytest.raises(HerdError, match="inconsistent quality model"):
        load_pipeline_config(data=data)
