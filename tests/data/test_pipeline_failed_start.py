"""A `herd data run` that fails before finishing any unit of work (a JSONL field under another name
than [[input]] text_key, a corrupt record in the first unit) leaves no plan behind, so the corrected
command just runs; it used to leave WORK/plan.json, and the fix was then refused as "a different
config" (or "input files have changed") of an unfinished run until --restart. Once a unit is done
the work is kept for a resume, and a changed config over it is still refused."""

from __future__ import annotations

import json
import random

from herd.cli import main
from herd.data.pipeline import _plan, load_pipeline_config

WORDS = ("river stone maple lantern harbor violet copper meadow thunder ember quiet orchard silver "
         "canyon willow falcon garden marble summit hollow").split()


def _docs(n: int, seed: int = 0) -> list[str]:
    """n distinct documents of varied words (long enough to pass the repetition rules)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(120)) for _ in range(n)]


def _jsonl(path, rows, tail: str = ""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def _config(tmp_path, inp, *, text_key: str = "text", extra: str = ""):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[input]]\npath = "{inp}"\ntext_key = "{text_key}"\n\n[run]\nout = "{tmp_path / "out"}"\n'
                   f'tokenizer = "bytes"\nworkers = 1\nval_fraction = 0\n{extra}')
    return cfg


def _run(capsys, cfg, *args) -> tuple[int, list[str]]:
    code = main(["data", "run", str(cfg), *args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_wrong_text_key_then_the_corrected_config_runs_without_restart(tmp_path, capsys):
    inp = _jsonl(tmp_path / "in.jsonl", [{"body": t} for t in _docs(4)])
    cfg = _config(tmp_path, inp)  # the field is "body", text_key says "text"
    code, err = _run(capsys, cfg)
    assert code == 2 and "text_key" in err[-1], err
    assert not (tmp_path / ".out.work").exists()  # nothing to resume: nothing left behind
    cfg = _config(tmp_path, inp, text_key="body")
    code, err = _run(capsys, cfg)
    assert code == 0, err  # was: "holds an unfinished run with a different config (input); ... --restart"
    assert not any("resuming" in line for line in err), err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["output"]["documents"] == 4
    assert not (tmp_path / ".out.work").exists()


def test_a_corrupt_first_unit_repaired_runs_without_restart(tmp_path, capsys):
    rows = [{"text": t} for t in _docs(3)]
    inp = _jsonl(tmp_path / "in.jsonl", rows, tail='{"text": "trunc')
    code, err = _run(capsys, _config(tmp_path, inp))
    assert code == 2 and "not valid JSON" in err[-1], err
    assert not (tmp_path / ".out.work").exists()
    _jsonl(inp, rows)  # repaired: the input's size and time change
    code, err = _run(capsys, _config(tmp_path, inp))
    assert code == 0, err  # was: "... whose input files have changed since; run with --restart"
    assert inp.exists() and json.loads((tmp_path / "out" / "manifest.json").read_text())["output"]["documents"] == 3


def test_finished_units_are_kept_and_a_changed_config_over_them_is_refused(tmp_path, capsys):
    """Unit 0 (a.jsonl) is read, unit 1 (b.jsonl) fails: unit 0's work stays for a resume, and a
    changed config over it still needs --restart, which the message says costs one unit."""
    src = tmp_path / "in"
    src.mkdir()
    _jsonl(src / "a.jsonl", [{"text": t} for t in _docs(3)])
    _jsonl(src / "b.jsonl", [{"text": t} for t in _docs(3, seed=1)], tail='{"text": "trunc')
    cfg = _config(tmp_path, src)
    code, err = _run(capsys, cfg)
    assert code == 2 and "b.jsonl" in err[-1] and "not valid JSON" in err[-1], err
    work = tmp_path / ".out.work"
    assert (work / "plan.json").exists() and (work / "units" / "00000" / "read.done").exists()
    code, err = _run(capsys, cfg, "--minhash.threshold=0.5")
    assert code == 2 and "different config (minhash.threshold)" in err[-1], err
    assert "--restart" in err[-1] and "1 finished unit result(s)" in err[-1], err
    assert (work / "units" / "00000" / "read.done").exists()  # still there
    _jsonl(src / "b.jsonl", [{"text": t} for t in _docs(3, seed=1)])  # repaired
    code, err = _run(capsys, cfg)
    assert code == 2 and "input files have changed" in err[-1], err
    code, err = _run(capsys, cfg, "--restart")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["output"]["documents"] == 6
    assert sorted(p.name for p in src.iterdir()) == ["a.jsonl", "b.jsonl"]  # inputs untouched


def test_a_plan_without_finished_units_says_restart_loses_nothing(tmp_path, capsys):
    """A run killed before its first unit finished (no chance to clean up) keeps its plan: the same
    config resumes it, another is refused, and the message says --restart throws nothing away."""
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": t} for t in _docs(3)])
    cfg = _config(tmp_path, inp)
    work = tmp_path / ".out.work"
    _plan(load_pipeline_config(cfg), work, restart=False)
    code, err = _run(capsys, cfg, "--minhash.threshold=0.5")
    assert code == 2 and "different config (minhash.threshold)" in err[-1] and "nothing is lost" in err[-1], err
    code, err = _run(capsys, cfg)
    assert code == 0 and any("resuming the unfinished run" in line for line in err), err


def test_a_failed_start_leaves_the_users_files_in_a_named_work_dir(tmp_path, capsys):
    """run.work_dir may name a directory of the user's: only the pipeline's own files go."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "units").mkdir()
    (mine / "units" / "keep.txt").write_text("mine too")
    inp = _jsonl(tmp_path / "in.jsonl", [{"body": t} for t in _docs(2)])
    code, err = _run(capsys, _config(tmp_path, inp, extra=f'work_dir = "{mine}"\n'))
    assert code == 2 and "text_key" in err[-1], err
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == ["notes.txt", "units",
                                                                             "units/keep.txt"]


def test_number_like_overrides_of_text_fields_are_text(tmp_path):
    """`--run.out=2024` was read as TOML, an int, and refused by the str field ("expected str");
    the training config's overrides had the same bug (tests/train/test_loop_invariants.py)."""
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "a b c"}\n')
    cfg = load_pipeline_config(data={"input": [{"path": str(src)}]},
                               overrides=["--run.out=2024", "--input.domain=1e3", "--run.seed=7"])
    assert (cfg.run.out, cfg.input[0].domain, cfg.run.seed) == ("2024", "1e3", 7)
