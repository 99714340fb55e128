"""Multi-stage recipes (SPEC §3.4): stages chain through their final weights, the anneal stage
decays to zero and is Polyak-averaged, and a recipe interrupted anywhere finishes to the same
bits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from herd.checkpoint import read_checkpoint
from herd.cli import main as herd_main
from herd.errors import HerdError
from herd.train.average import average_state_dicts
from herd.train.recipe import load_recipe, run_recipe

RECIPE = """
[model]
preset = "debug"
vocab_size = 258
[data]
path = "{shards}"
val_batches = 1
[optim]
lr = 3e-3
[schedule]
warmup_steps = 1
[train]
steps = 4
batch_size = 2
seq_len = 16
eval_every = 0
threads = 1
out_dir = "{out}"
[checkpoint]
every = 2
keep = 0

[[stages]]
name = "pretrain"

[[stages]]
name = "long-context"
train.seq_len = 64
train.steps = 2

[[stages]]
name = "anneal"
average = true
schedule.name = "linear"
schedule.warmup_steps = 0
train.steps = 3
checkpoint.every = 1
"""


def _write(tmp_path, shards, text=RECIPE):
    path = tmp_path / "recipe.toml"
    path.write_text(text.format(shards=shards, out=tmp_path / "run"))
    return path


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_stages_chain_anneal_and_average(tmp_path, shards, capsys):
    path = _write(tmp_path, shards)
    assert herd_main(["pretrain", "--config", str(path), "--no-progress"]) == 0
    root = tmp_path / "run"
    s1, s2, s3 = root / "1-pretrain", root / "2-long-context", root / "3-anneal"
    # stage 2 trains at its own sequence length, starting from stage 1's final weights
    assert all(r["tokens"] == 2 * 64 * r["step"] for r in _rows(s2))
    cfg2 = json.loads((s2 / "config.json").read_text())
    assert cfg2["train"]["init_from"] == str(s1 / "ckpt-00000004")
    # stage 3: linear decay to zero over its own 3 steps (§3.4.3) from stage 2's weights
    lrs = [r["lr"] for r in _rows(s3)]
    assert lrs == pytest.approx([3e-3, 2e-3, 1e-3])
    # the final model is the uniform average of the anneal checkpoints
    ckpts = [read_checkpoint(s3 / f"ckpt-0000000{i}" / "model").state_dict for i in (1, 2, 3)]
    avg = read_checkpoint(s3 / "averaged").state_dict
    want = average_state_dicts(ckpts)
    for k in want:
        torch.testing.assert_close(avg[k], want[k], rtol=0, atol=0)
    assert f"final model {s3 / 'averaged'}" in capsys.readouterr().out


def test_an_interrupted_recipe_finishes_to_the_same_bits(tmp_path, shards):
    full = tmp_path / "full"
    full.mkdir()
    run_recipe(load_recipe(_write(full, shards)), log=lambda m: None, progress=False)
    part = tmp_path / "part"
    part.mkdir()
    assert herd_main(["pretrain", "--config", str(_write(part, shards)), "--no-progress"]) == 0
    # as if killed during the anneal stage: its last checkpoint and the average never happened
    shutil.rmtree(part / "run" / "3-anneal" / "ckpt-00000003")
    shutil.rmtree(part / "run" / "3-anneal" / "averaged")
    assert herd_main(["pretrain", "--resume", str(part / "run"), "--no-progress"]) == 0  # recipe.toml kept there
    a = read_checkpoint(full / "run" / "3-anneal" / "averaged").state_dict
    b = read_checkpoint(part / "run" / "3-anneal" / "averaged").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage, match", [
    ('[[stages]]\ntrain.steps = 2\n', "needs a name"),
    ('[[stages]]\nname = "a"\n[[stages]]\nname = "a"\n', "duplicate stage name"),
    ('[[stages]]\nname = "a"\ntrain.stepz = 2\n', "unknown config key train.stepz; valid keys: train.steps"),
    ('[[stages]]\nname = "a"\nsteps = 2\n', "not a config section"),
])
def test_bad_recipes_are_one_line(tmp_path, shards, stage, match):
    base = RECIPE.split("[[stages]]")[0]
    with pytest.raises(HerdError, match=match):
        load_recipe(_write(tmp_path, shards, base + stage))


def test_resume_keeps_the_first_runs_options_and_another_recipe_is_refused(tmp_path, shards, capsys):
    path = _write(tmp_path, shards)
    root = tmp_path / "run"
    assert herd_main(["pretrain", "--config", str(path), "--no-progress", "--optim.lr=0.01"]) == 0
    # as if killed in stage 3: --resume alone must continue with lr 0.01, not the TOML's 3e-3
    shutil.rmtree(root / "3-anneal")
    assert herd_main(["pretrain", "--resume", str(root), "--no-progress"]) == 0
    assert json.loads((root / "3-anneal" / "config.json").read_text())["optim"]["lr"] == 0.01
    assert _rows(root / "3-anneal")[0]["lr"] == pytest.approx(0.01)
    # the same directory with other options (or another recipe) and no --resume: refused, record kept
    capsys.readouterr()
    assert herd_main(["pretrain", "--config", str(path), "--no-progress", "--optim.lr=0.02"]) == 2
    assert "holds a run of another recipe or other options" in capsys.readouterr().err
    assert json.loads((root / "recipe.overrides.json").read_text()) == ["optim.lr=0.01"]
    # the same recipe and options again: its finished stages are skipped
    assert herd_main(["pretrain", "--config", str(path), "--no-progress", "--optim.lr=0.01"]) == 0
    # resumed with fewer steps than a stage already ran: named, and the record of the options kept
    capsys.readouterr()
    assert herd_main(["pretrain", "--resume", str(root), "--no-progress", "--train.steps=2"]) == 2
    assert "stage 1 pretrain already ran 4 steps, more than its train.steps = 2" in capsys.readouterr().err
    assert json.loads((root / "recipe.overrides.json").read_text()) == ["optim.lr=0.01"]
