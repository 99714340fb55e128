"""`herd pretrain` on mistakes a user makes: a value out of its range, a wrong tokenizer for the
shards, a corrupt shard or training state, a resume that cannot mean what it says — each is one
line and exit status 2, before anything is trained or overwritten."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from herd.train import checkpoint as ckpt
from herd.train.cli import main

from .conftest import debug_overrides


def _run(capsys, *args) -> tuple[int, list[str]]:
    code = main(["pretrain", "--no-progress", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def _args(shards, run, **extra) -> list[str]:
    return [f"--{o}" for o in debug_overrides(shards, run, **{"train.steps": 4, "checkpoint.every": 2, **extra})]


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr"), ("optim.eps=-1", "optim.eps"), ("optim.betas=[0.9, 1.5]", "optim.betas"),
    ("optim.weight_decay=-1", "optim.weight_decay"), ("train.threads=-1", "train.threads"),
    ("train.seed=-1", "train.seed"), ("train.device=\"gpu\"", "train.device"),
    ("checkpoint.every=-3", "checkpoint.every"), ("checkpoint.keep=-1", "checkpoint.keep"),
    ("train.eval_every=-1", "train.eval_every"), ("schedule.warmup_steps=-5", "schedule.warmup_steps"),
    ("schedule.decay_steps=-5", "schedule.decay_steps"), ("schedule.min_lr=-1", "schedule.min_lr"),
    ("model.norm_eps=-1", "model.norm_eps"), ("model.ffn_hidden_dim=0", "model.ffn_hidden_dim"),
    ("data.val_batches=0", "data.val_batches"),
])
def test_values_out_of_range_are_one_line(shards, tmp_path, capsys, override, key):
    code, err = _run(capsys, *_args(shards, tmp_path / "r"), f"--{override}")
    assert code == 2 and len(err) == 1 and key.split(".")[-1] in err[0], err  # model.* fields: "invalid model config"
    assert not (tmp_path / "r").exists()


def test_an_unavailable_device_and_a_file_as_run_directory(shards, tmp_path, capsys):
    import torch

    if not torch.cuda.is_available():
        code, err = _run(capsys, *_args(shards, tmp_path / "r"), "--train.device=cuda")
        assert code == 2 and "sees no CUDA GPU" in err[-1], err
    (tmp_path / "afile").write_text("mine")
    code, err = _run(capsys, *_args(shards, tmp_path / "afile"))
    assert code == 2 and "is a file" in err[-1] and (tmp_path / "afile").read_text() == "mine"


def test_a_tokenizer_other_than_the_shards_is_refused(tmp_path, capsys):
    from herd.data.shards import write_shards
    from herd.tokenizer.train import train_bpe

    texts = [f"line {i} of some text about the sea and the sky and the land" for i in range(300)]
    tok_a = train_bpe(texts, 600, tmp_path / "tok_a").parent
    tok_b = train_bpe(texts[:150] + ["other words entirely, quite unlike"] * 50, 600, tmp_path / "tok_b").parent
    from herd.tokenizer import load_tokenizer

    ids = [load_tokenizer(str(tok_a)).encode(t, bos=True, eos=True) for t in texts]
    shards = write_shards(ids, tmp_path / "shards", 600, tokenizer=str(tok_a), val_fraction=0.1)
    base = _args(shards, tmp_path / "r", **{"model.vocab_size": 600, "train.steps": 1})
    code, err = _run(capsys, *base, f"--data.tokenizer={json.dumps(str(tok_b))}")
    assert code == 2 and "a different tokenizer" in err[-1] and "tok_a" in err[-1], err
    code, err = _run(capsys, *base, f"--data.tokenizer={json.dumps(str(tmp_path / 'nowhere'))}")
    assert code == 2 and "does not exist" in err[-1], err
    # the same tokenizer under another name (a copy of its directory) is the same tokenizer
    shutil.copytree(tok_a, tmp_path / "tok_a_copy")
    code, err = _run(capsys, *base, f"--data.tokenizer={json.dumps(str(tmp_path / 'tok_a_copy'))}")
    assert code == 0, err


def test_a_corrupt_shard_is_named_not_an_index_error(shards, tmp_path, capsys):
    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    meta = json.loads((bad / "meta.json").read_text())
    first = bad / f"{meta['splits']['train']['shards'][0]['name']}.bin"
    data = np.fromfile(first, dtype=np.uint32)
    np.random.default_rng(0).integers(0, 2**31, size=data.size, dtype=np.uint32).tofile(first)  # same size
    code, err = _run(capsys, *_args(bad, tmp_path / "r"))
    assert code == 2 and "corrupt shard" in err[-1], err


def test_resume_mistakes(shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(capsys, *_args(shards, run))[0] == 0
    # fewer steps than the checkpoint has: refused, and the run's config is left as it was
    before = (run / "config.json").read_text()
    code, err = _run(capsys, "--resume", str(run), "--train.steps=2")
    assert code == 2 and "past train.steps" in err[-1] and (run / "config.json").read_text() == before, err
    # --out elsewhere would be ignored: refused
    code, err = _run(capsys, "--resume", str(run), "--out", str(tmp_path / "elsewhere"), "--train.steps=6")
    assert code == 2 and "drop --out" in err[-1], err
    # a model setting changed: the field is named
    code, err = _run(capsys, "--resume", str(run), "--train.steps=6", "--model.dim=96")
    assert code == 2 and "dim 64 → 96" in err[-1], err
    # a corrupt saved config or training state: one line
    latest = ckpt.latest_checkpoint(run)
    (latest / "train_state.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    code, err = _run(capsys, "--resume", str(run), "--train.steps=6")
    assert code == 2 and "train_state.pt: corrupt" in err[-1], err
    (run / "config.json").write_text("{")
    code, err = _run(capsys, "--resume", str(run), "--train.steps=6")
    assert code == 2 and "cannot read the run's config" in err[-1], err


def test_resume_of_a_new_directory_says_it_starts_fresh(shards, tmp_path, capsys):
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "configs" / "debug.toml"
    code, err = _run(capsys, "--config", str(config), *_args(shards, tmp_path / "typo"), "--resume",
                     str(tmp_path / "typo"))
    assert code == 0 and any("starting a fresh run" in line for line in err), err


def test_init_from_a_run_directory_takes_its_newest_checkpoint(shards, tmp_path, capsys):
    src = tmp_path / "src"
    assert _run(capsys, *_args(shards, src))[0] == 0
    code, err = _run(capsys, *_args(shards, tmp_path / "next", **{"train.init_from": f'"{src}"', "train.steps": 1}))
    assert code == 0 and any(f"initialized weights from {src}/ckpt-00000004/model" in line for line in err), err


def test_a_run_directory_holding_other_files_is_refused_before_training(shards, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, err = _run(capsys, *_args(shards, mine))
    assert code == 2 and "'notes.txt', which a herd run does not write" in err[-1], err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # a model checkpoint's config.json would be overwritten by the run's
    model = tmp_path / "model_dir"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    code, err = _run(capsys, *_args(shards, model))
    assert code == 2 and "not a herd run's config" in err[-1], err
    assert json.loads((model / "config.json").read_text()) == {"architectures": ["LlamaForCausalLM"]}
    # an export folder holding a user's file
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "x.txt").write_text("x")
    code, err = _run(capsys, *_args(shards, run))
    assert code == 2 and "x.txt" in err[-1] and not (run / "metrics.jsonl").exists(), err


@pytest.mark.parametrize("extra, fragment", [
    # Meta's sizing rule rounds a tiny multiplier down to a 0-wide FFN: it trained attention alone
    ({"model.ffn_dim_multiplier": 0.001}, "ffn_dim_multiplier 0.001 gives an FFN hidden width of 0"),
    # past n_layers no layer is MoE: a Llama 4 preset trained as a dense model
    ({"model.preset": '"llama4-debug"', "model.moe_every": 8}, "model.moe_every=8 exceeds model.n_layers=4"),
    ({"model.preset": '"llama4-debug"', "model.top_k": 5}, "top_k (5) exceeds n_experts (4)"),
])
def test_model_shapes_that_build_nothing_are_refused(shards, tmp_path, capsys, extra, fragment):
    code, err = _run(capsys, *_args(shards, tmp_path / "r", **extra))
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "r").exists()


# ---- empty paths, a wrong --resume target, a missing init_from (found by CLI fuzzing) -------------
@pytest.mark.parametrize("args, message", [
    (["--out", ""], "--out is empty"),  # was ignored: the run went to the config's train.out_dir
    (["--train.out_dir="], "train.out_dir is empty"),  # Path("") is ".": checkpoints in the working directory
    (["--data.path="], "data.path is empty"),  # a ValueError traceback once shards were built at "."
    (["--resume", ""], "--resume is empty"),
])
def test_empty_paths_are_refused(shards, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    base = [a for a in _args(shards, tmp_path / "run") if not a.startswith(("--train.out_dir", "--data.path"))]
    base += [f"--data.path={shards}"] if "--data.path=" not in args else []
    base += [f"--train.out_dir={tmp_path / 'run'}"] if args[0] != "--train.out_dir=" else []
    code, err = _run(capsys, *base, *args)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())  # nothing written anywhere


def test_resume_of_something_that_is_not_a_run(shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(capsys, *_args(shards, run))[0] == 0
    # a checkpoint inside the run: the run directory is named
    code, err = _run(capsys, "--resume", str(ckpt.latest_checkpoint(run)))
    assert code == 2 and len(err) == 1 and f"give the run directory (--resume {run})" in err[0], err
    # a model checkpoint (HF config.json): "'architectures' must be a table" said nothing useful
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    code, err = _run(capsys, "--resume", str(model))
    assert code == 2 and len(err) == 1 and "config.json is not a herd run's config" in err[0], err
    # a run whose config.json became a JSON list: was a TypeError traceback
    (run / "config.json").write_text("[1, 2]")
    code, err = _run(capsys, "--resume", str(run))
    assert code == 2 and len(err) == 1 and "not a herd run's config" in err[0], err


def test_a_missing_init_from_is_refused_before_the_shards_are_built(tmp_path, capsys):
    """The shards of data.source were built first (minutes for a real corpus) and only then was
    init_from found missing."""
    shards = tmp_path / "new-shards"
    code, err = _run(capsys, *[f"--{o}" for o in debug_overrides(shards, tmp_path / "run")],
                     '--data.source="stdlib"', f"--train.init_from={tmp_path / 'nope'}")
    assert code == 2 and err == [f"herd: error: train.init_from {tmp_path / 'nope'}: no such checkpoint or run "
                                 "directory"], err
    assert not shards.exists() and not (tmp_path / "run").exists()
