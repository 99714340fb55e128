"""Multi-stage recipes (SPEC §3.4): stages chain through their final weights, the anneal stage
decays to zero and is Polyak-averaged, and a recipe interrupted anywhere finishes to the same
bits."""

from __future__ import annotations

import json
import re
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


# §3.4.2 as the paper extends context: stage 2 raises max_seq_len and RoPE θ over the same weights;
# the anneal stage (another shard set, linear to 0, averaged) says nothing of the model and must keep
# stage 2's model, not fall back to the base's (it trained θ 500000 weights at θ 10000, and the final
# params.json advertised 32 positions).
LONG = RECIPE.replace('vocab_size = 258\n', 'vocab_size = 258\nmax_seq_len = 32\nrope_theta = 10000.0\n').replace(
    'name = "long-context"\ntrain.seq_len = 64\n',
    'name = "long context ü"\nmodel.max_seq_len = 64\nmodel.rope_theta = 500000.0\ntrain.seq_len = 64\n').replace(
    'name = "anneal"\n', 'name = "anneal"\ndata.path = "{shards_b}"\n')


@pytest.fixture(scope="module")
def shards_b(tmp_path_factory):
    """A second, smaller shard set: the anneal stage's own data mix."""
    from herd.data.shards import shards_from_texts

    texts = [f"def f{i}(x):\n    return x * {i}\n" * 20 for i in range(200)]
    return shards_from_texts(texts, tmp_path_factory.mktemp("anneal") / "shards", val_fraction=0.1)


def test_long_context_stage_changes_rope_and_the_anneal_keeps_it(tmp_path, shards, shards_b, capsys):
    from herd.checkpoint.common import TOKENIZER_FILES

    path = tmp_path / "recipe.toml"
    path.write_text(LONG.format(shards=shards, shards_b=shards_b, out=tmp_path / "run"))
    assert herd_main(["pretrain", "--config", str(path), "--no-progress"]) == 0
    root = tmp_path / "run"
    s1, s2, s3 = root / "1-pretrain", root / "2-long context ü", root / "3-anneal"
    assert read_checkpoint(s1 / "ckpt-00000004" / "model").args.rope_theta == 10000.0
    for d in (s2 / "ckpt-00000002" / "model", s3 / "averaged"):
        args = read_checkpoint(d).args
        assert (args.rope_theta, args.max_seq_len) == (500000.0, 64)
    cfg3 = json.loads((s3 / "config.json").read_text())
    assert cfg3["data"]["path"] == str(shards_b) and cfg3["model"]["rope_theta"] == 500000.0
    # the last line names the final model; it is a model directory `herd generate` runs
    final = capsys.readouterr().out.strip().splitlines()[-1].split("final model ", 1)[1]
    assert final == str(s3 / "averaged")
    assert any((s3 / "averaged" / f).exists() for f in TOKENIZER_FILES)
    # the average is the mean of the stage's checkpoints (fp64 here, independently of average.py)
    ckpts = [read_checkpoint(s3 / f"ckpt-0000000{i}" / "model").state_dict for i in (1, 2, 3)]
    for k, v in read_checkpoint(final).state_dict.items():
        want = sum(c[k].double() for c in ckpts) / 3
        torch.testing.assert_close(v.double(), want, rtol=0, atol=1e-7)
    assert herd_main(["generate", "--model", final, "--prompt", "def", "--max-new-tokens", "4"]) == 0


@pytest.mark.parametrize("stage, match", [
    ("model.dim = 128", r"model.dim = 128 would change the weights' shapes \(dim 64 → 128"),
    ("model.n_layers = 3", r"model.n_layers = 3 would change the weights' shapes \(n_layers 2 → 3\)"),
    ("model.vocab_size = 300", r"vocab_size 258 → 300"),
    ("model.tie_embeddings = true", r"tie_embeddings False → True"),  # trained head silently dropped
    ("train.seq_len = 512", r"stage 2 \(b\): train.seq_len=512 exceeds the model's max_seq_len=256"),
    ("train.out_dir = \"elsewhere\"", r"stage 2 \(b\): train.out_dir is set by the recipe"),  # was ignored
])
def test_a_bad_later_stage_is_refused_before_stage_1_runs(tmp_path, shards, capsys, stage, match):
    base = RECIPE.split("[[stages]]")[0]
    path = _write(tmp_path, shards, base + f'[[stages]]\nname = "a"\n[[stages]]\nname = "b"\n{stage}\n')
    assert herd_main(["pretrain", "--config", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_a_shape_changing_init_from_is_one_line(tmp_path, shards):
    """The same check where a single run starts from a checkpoint (train.init_from)."""
    from herd.train.config import load_config
    from herd.train.loop import pretrain

    from .conftest import debug_overrides

    first = pretrain(load_config(overrides=debug_overrides(shards, tmp_path / "a", **{"train.steps": 1})),
                     progress=False, log=lambda m: None)
    ckpt = str(first.run_dir / "ckpt-00000001")
    ok = debug_overrides(shards, tmp_path / "ok", **{"train.steps": 1, "train.init_from": f'"{ckpt}"',
                                                    "model.max_seq_len": 512, "model.rope_theta": 5e5})
    pretrain(load_config(overrides=ok), progress=False, log=lambda m: None)  # no tensor changes
    tied = debug_overrides(shards, tmp_path / "b", **{"train.steps": 1, "train.init_from": f'"{ckpt}"',
                                                     "model.tie_embeddings": "true"})
    with pytest.raises(HerdError, match=r"model shape differs from the config \(tie_embeddings False → True\)"):
        pretrain(load_config(overrides=tied), progress=False, log=lambda m: None)


_KILLER = """
import os, signal, sys
import herd.train.average as A, herd.train.loop as L
what, n = sys.argv[1], int(sys.argv[2])
calls = [0]
def wrap(mod, name):
    orig = getattr(mod, name)
    def f(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(*a, **k)
    setattr(mod, name, f)
wrap(*{"step": (L, "train_step"), "extras": (A, "copy_model_extras")}[what])
from herd.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_sigkill_mid_stage_and_while_averaging_then_resume_gives_the_same_bits(tmp_path, shards):
    """A real SIGKILL: in stage 2's first step, then between the average's weights and its tokenizer
    (that left an averaged/ without tokenizer that --resume took as finished)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from herd.checkpoint.common import TOKENIZER_FILES

    full = tmp_path / "full"
    full.mkdir()
    run_recipe(load_recipe(_write(full, shards)), log=lambda m: None, progress=False)
    part = tmp_path / "part"
    part.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    def killed(*argv):
        r = subprocess.run([sys.executable, "-c", _KILLER, *argv, "--no-progress"], env=env, capture_output=True)
        assert r.returncode == -9, r.stderr.decode()[-2000:]

    killed("step", "5", "pretrain", "--config", str(_write(part, shards)))  # stage 1 has 4 steps
    assert not (part / "run" / "2-long-context" / "ckpt-00000002").exists()
    killed("extras", "1", "pretrain", "--resume", str(part / "run"))
    assert not (part / "run" / "3-anneal" / "averaged").exists()
    assert herd_main(["pretrain", "--resume", str(part / "run"), "--no-progress"]) == 0
    averaged = part / "run" / "3-anneal" / "averaged"
    assert any((averaged / f).exists() for f in TOKENIZER_FILES)
    assert not list(averaged.parent.glob(".averaged.*"))  # the killed attempt's temporary is gone
    a = read_checkpoint(full / "run" / "3-anneal" / "averaged").state_dict
    b = read_checkpoint(averaged).state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
