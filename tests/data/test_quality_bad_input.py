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
