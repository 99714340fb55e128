"""`herd average` never replaces what it reads or what the user made, and takes only weights that
make an average: --out may not be, hold or lie inside an input checkpoint; every weight is a
finite number > 0. Refusals are one line and exit status 2, before any checkpoint is read."""

from __future__ import annotations

import math

import pytest
import torch

from herd.checkpoint import read_checkpoint
from herd.cli import main
from herd.errors import HerdError
from herd.models.args import ModelArgs
from herd.train.average import average_checkpoints, average_state_dicts
from herd.train.checkpoint import save_checkpoint
from tests.reference import random_state_dict

TINY = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16, max_seq_len=32)


@pytest.fixture
def run(tmp_path):
    """A training run directory as `herd pretrain` leaves it: two checkpoints, metrics, config."""
    run = tmp_path / "run"
    for step, seed in ((4, 0), (6, 1)):
        save_checkpoint(run, step, TINY, random_state_dict(TINY, seed=seed), {"step": step})
    (run / "metrics.jsonl").write_text('{"step": 6, "loss": 3.0}\n')
    (run / "config.json").write_text('{"train": {}}')
    return run


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _ckpts(run):
    return [str(run / "ckpt-00000004"), str(run / "ckpt-00000006")]


def _refused(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err


@pytest.mark.parametrize("out, how", [
    ("", "contains"),  # the slip `--out runs/c` for `--out runs/c/averaged`
    ("ckpt-00000006", "is"),
    ("ckpt-00000006/model", "lies inside"),
    ("ckpt-00000004/averaged", "lies inside"),
])
def test_out_overlapping_an_input_is_refused_and_nothing_changes(run, capsys, out, how):
    before = _snapshot(run)
    _refused(capsys, ["average", *_ckpts(run), "--out", str(run / out)], f" {how} the checkpoint")
    assert _snapshot(run) == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]  # no temporary folder either


def test_a_run_directory_input_stands_for_its_newest_checkpoint(run, capsys):
    _refused(capsys, ["average", str(run), "--out", str(run)], " is the checkpoint")
    # a new directory beside the checkpoints is no overlap
    assert main(["average", str(run), "--out", str(run / "averaged")]) == 0
    got = read_checkpoint(run / "averaged").state_dict
    want = read_checkpoint(run / "ckpt-00000006" / "model").state_dict
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_out_that_is_a_file_or_holds_other_files_is_refused(run, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    _refused(capsys, ["average", *_ckpts(run), "--out", str(afile)], "afile is a file")
    assert afile.read_text() == "mine"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    _refused(capsys, ["average", *_ckpts(run), "--out", str(mine)], "'notes.txt'")
    assert (mine / "notes.txt").read_text() == "mine"


def test_averaging_again_into_its_own_output_works(run, tmp_path, capsys):
    out = tmp_path / "avg"
    assert main(["average", *_ckpts(run), "--out", str(out)]) == 0
    assert main(["average", *_ckpts(run), "--out", str(out), "--weights", "1,3"]) == 0
    a, b = (read_checkpoint(run / f"ckpt-0000000{i}" / "model").state_dict for i in (4, 6))
    got = read_checkpoint(out).state_dict
    for k, v in got.items():
        torch.testing.assert_close(v, (a[k] + 3 * b[k]) / 4, rtol=0, atol=1e-6)


@pytest.mark.parametrize("weights", ["2,-1", "1,-1", "1,0", "0,0", "nan,1", "1,inf", "-inf,1", "1", "1,1,1"])
def test_weights_must_be_one_finite_positive_number_per_checkpoint(run, tmp_path, capsys, weights):
    _refused(capsys, ["average", *_ckpts(run), "--out", str(tmp_path / "avg"), f"--weights={weights}"],
             "weight")
    assert not (tmp_path / "avg").exists()


@pytest.mark.parametrize("weights", [[2.0, -1.0], [1.0, 0.0], [math.nan, 1.0], [1.0, math.inf], [1.0]])
def test_library_calls_check_the_weights_too(weights):
    sds = [random_state_dict(TINY, seed=s) for s in (0, 1)]
    with pytest.raises(HerdError, match="weight"):
        average_state_dicts(sds, weights)


def test_library_call_refuses_before_reading(run, tmp_path):
    # The inputs are unreadable: a refusal must come from --out, before they are opened.
    bad = [tmp_path / "missing-a", tmp_path / "missing-b"]
    with pytest.raises(HerdError, match="contains the checkpoint"):
        average_checkpoints(bad, tmp_path)
    with pytest.raises(HerdError, match="weight 2 is -1"):
        average_checkpoints(bad, tmp_path / "avg", [1, -1])
