"""atomic_path never replaces what the user made: a directory output replaces only a missing, empty
or earlier model output directory; a file never stands where a directory goes, nor the reverse;
a refused output costs no work and leaves everything as it was."""

from __future__ import annotations

import pytest
import torch

from herd.checkpoint import read_checkpoint, write_checkpoint
from herd.checkpoint.common import atomic_path
from herd.cli import main
from herd.errors import HerdError
from herd.models.args import ModelArgs
from tests.reference import random_state_dict

TINY = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16, max_seq_len=32)


def _snapshot(root):
    """Every file under `root` with its bytes, to show that nothing was touched."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_dir(dest, files):
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        for name, text in files.items():
            (tmp / name).write_text(text)


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_writing_again_into_an_earlier_output_replaces_it_whole(fmt, tmp_path):
    out = tmp_path / "out"
    write_checkpoint(out, fmt, TINY, random_state_dict(TINY, seed=0))
    stale = "model-00002-of-00002.safetensors" if fmt == "hf" else "consolidated.01.pth"
    (out / stale).write_bytes(b"stale shard of an earlier, larger output")
    (out / "tokenizer.json").write_text("{}")  # an earlier output's tokenizer
    new = random_state_dict(TINY, seed=1)
    write_checkpoint(out, fmt, TINY, new)
    assert not (out / stale).exists() and not (out / "tokenizer.json").exists()
    got = read_checkpoint(out).state_dict
    assert all(torch.equal(got[k], v) for k, v in new.items() if k in got)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_an_empty_directory_is_filled(tmp_path):
    (tmp_path / "out").mkdir()
    _write_dir(tmp_path / "out", {"config.json": "{}"})
    assert (tmp_path / "out" / "config.json").read_text() == "{}"


@pytest.mark.parametrize("foreign", ["notes.txt", "metrics.jsonl", "README.md", ".gitignore", "sub/"])
def test_a_directory_holding_other_files_is_refused_before_any_work(foreign, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # model files beside it do not make it an output
    if foreign.endswith("/"):
        (out / foreign).mkdir()
        (out / foreign / "data.bin").write_bytes(b"x")
    else:
        (out / foreign).write_text("mine")
    before = _snapshot(tmp_path)
    ran = []
    with pytest.raises(HerdError, match=rf"holds '{foreign.rstrip('/')}'.*would be lost") as e:
        with atomic_path(out) as tmp:
            ran.append(tmp)
    assert "\n" not in str(e.value) and not ran
    assert _snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_training_run_directory_survives(tmp_path):
    from herd.train.checkpoint import save_checkpoint

    run = tmp_path / "run"
    save_checkpoint(run, 4, TINY, random_state_dict(TINY), {"step": 4})
    (run / "metrics.jsonl").write_text('{"step": 4}\n')
    (run / "config.json").write_text("{}")
    before = _snapshot(run)
    for dest in (run, run / "ckpt-00000004"):
        with pytest.raises(HerdError, match="would be lost"):
            write_checkpoint(dest, "meta", TINY, random_state_dict(TINY, seed=1))
    # The checkpoint's model/ holds only model files, but it is part of the checkpoint.
    with pytest.raises(HerdError, match="part of the training checkpoint"):
        write_checkpoint(run / "ckpt-00000004" / "model", "hf", TINY, random_state_dict(TINY, seed=1))
    assert _snapshot(run) == before


def test_a_file_where_a_directory_goes_is_refused(tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine")
    with pytest.raises(HerdError, match="afile is a file; this output is a directory"):
        write_checkpoint(f, "meta", TINY, random_state_dict(TINY))
    with pytest.raises(HerdError, match="afile is a file, not a folder"):
        write_checkpoint(f / "model", "meta", TINY, random_state_dict(TINY))
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_file_output_replaces_a_file_but_never_a_directory(tmp_path):
    f = tmp_path / "out.jsonl"
    f.write_text("old\n")
    with atomic_path(f) as tmp:
        tmp.write_text("new\n")
    assert f.read_text() == "new\n"

    d = tmp_path / "model.gguf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(HerdError, match="model.gguf is a directory; this output is a file"):
        with atomic_path(d) as tmp:
            tmp.write_bytes(b"GGUF")
    assert (d / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "out.jsonl"]


def test_a_link_where_a_directory_goes_is_refused(tmp_path):
    target = tmp_path / "target"
    _write_dir(target, {"config.json": "mine"})
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(HerdError, match="symbolic link"):
        write_checkpoint(tmp_path / "link", "hf", TINY, random_state_dict(TINY))
    assert (tmp_path / "link").is_symlink() and (target / "config.json").read_text() == "mine"


def test_a_failing_block_leaves_the_earlier_output(tmp_path):
    out = tmp_path / "out"
    _write_dir(out, {"config.json": "first"})
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text("second")
            raise RuntimeError("crash mid-write")
    assert (out / "config.json").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.filterwarnings("ignore:no tokenizer carried over")
def test_convert_cli_refuses_a_run_directory_in_one_line(tmp_path, capsys):
    src = tmp_path / "src"
    write_checkpoint(src, "meta", TINY, random_state_dict(TINY))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["convert", str(src), str(run), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl" in err and "Traceback" not in err
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    # ... and converting into its own earlier output again works
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    got, want = read_checkpoint(tmp_path / "hf").state_dict, read_checkpoint(src).state_dict
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("fmt, other", [("hf", "meta"), ("meta", "hf")])
def test_a_checkpoint_of_the_other_layout_is_not_replaced(fmt, other, tmp_path):
    """`herd convert x x --to meta` on an HF directory would delete its own input."""
    out = tmp_path / "ckpt"
    write_checkpoint(out, other, TINY, random_state_dict(TINY, seed=0))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(HerdError, match="holds a checkpoint in another layout"):
        write_checkpoint(out, fmt, TINY, random_state_dict(TINY, seed=1))
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_gguf_output_replaces_only_a_gguf(tmp_path):
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    with pytest.raises(HerdError, match="not a GGUF file"):
        write_checkpoint(notes, "gguf", TINY, random_state_dict(TINY, seed=0))
    assert notes.read_text() == "my notes"
    out = tmp_path / "m.gguf"
    write_checkpoint(out, "gguf", TINY, random_state_dict(TINY, seed=0))
    write_checkpoint(out, "gguf", TINY, random_state_dict(TINY, seed=1))  # an earlier GGUF: replaced
    assert torch.equal(read_checkpoint(out).state_dict["norm.weight"], random_state_dict(TINY, seed=1)["norm.weight"])
