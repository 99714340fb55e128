"""A pipeline run killed with SIGKILL and started again gives exactly the output of an
uninterrupted run: no document lost, none duplicated (the local form of the executor that the
cluster form shares: per-unit results + completion markers, atomic writes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from herd.data import builtin
from herd.data.pipeline import load_pipeline_config, run_pipeline

WORKS = ["hamlet_gut", "hamlet_gut_f", "macbeth_gut", "macbeth_gut_f", "sonnets_gut", "tempest_gut",
         "tempest_gut_f", "pericles_gut"]


def _toml(inp: Path, out: Path) -> str:
    return f"""
[[input]]
path = "{inp}"

[run]
out = "{out}"
tokenizer = "bytes"
workers = 2
shard_bytes = 150000
val_fraction = 0.1

[minhash]
ngram = 3
threshold = 0.15
domains = ["shakespeare"]

[line_dedup]
domains = ["shakespeare"]

[repetition]
domains = ["shakespeare"]

[dirty_words]
domains = ["shakespeare"]

[mix]
weights = {{ shakespeare = 0.5, code = 0.5 }}
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    rows = [{"name": d.name, "domain": d.domain, "text": d.text}
            for d in builtin.shakespeare_documents() if d.name in WORKS]
    rows += [{"name": d.name, "domain": d.domain, "text": d.text} for d in builtin.code_documents(limit=40)]
    inp = tmp / "documents.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp, inp, len(rows)


@pytest.fixture(scope="module")
def reference(corpus):
    """One uninterrupted run, in this process, on one worker."""
    tmp, inp, _ = corpus
    (tmp / "ref.toml").write_text(_toml(inp, tmp / "ref"))
    manifest = run_pipeline(load_pipeline_config(tmp / "ref.toml"), workers=1)
    return tmp / "ref", manifest


def _files(out: Path) -> dict[str, bytes]:
    got = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.json"}
    got["stages"] = json.dumps(json.loads((out / "manifest.json").read_text())["stages"]).encode()
    return got


def _start(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "herd.cli", "data", "run", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def _kill_when(proc: subprocess.Popen, work: Path, pattern: str, n: int, timeout: float = 120) -> int:
    """SIGKILL the run (and its worker processes) once `n` files match `pattern` under WORK;
    returns how many had appeared."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        done = len(list(work.glob(pattern))) if work.exists() else 0
        if done >= n:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return done
        assert proc.poll() is None, f"the run ended before the kill point: {proc.stderr.read().decode()}"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no {pattern} within {timeout} s")


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_output(corpus, reference):
    tmp, inp, n_rows = corpus
    # the reference ran on one worker; the killed runs use two: the output does not depend on
    # the worker count either
    ref_out, manifest = reference
    n_units = len(list(ref_out.glob("train-u*.bin")))
    assert n_units >= 8, n_units  # enough units that the kills land mid-phase

    out = tmp / "killed"
    cfg = tmp / "killed.toml"
    cfg.write_text(_toml(inp, out))
    work = tmp / ".killed.work"
    # killed twice: during the reading phase, then during the filtering phase
    # (On a quiet machine a phase can finish between two polls; the kill then lands early in the
    # next phase instead — still before the output is published, which is what matters.)
    first = _kill_when(_start(cfg), work, "units/*/read.done", 2)
    assert first <= n_units and not out.exists()
    second = _kill_when(_start(cfg), work, "units/*/filter.done", 2)
    assert second <= n_units and not out.exists()
    assert len(list(work.glob("units/*/read.done"))) == n_units  # the resumed run finished phase 1
    proc = _start(cfg)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert "resuming the unfinished run" in err.decode()

    assert _files(out) == _files(ref_out)
    docs = [json.loads(x) for x in (out / "documents.jsonl").read_text().splitlines()]
    removed = [json.loads(x) for x in (out / "removed.jsonl").read_text().splitlines()]
    ids = [d["id"] for d in docs] + [r["id"] for r in removed]
    assert len(ids) == len(set(ids)) == n_rows == manifest["stages"][0]["documents_in"]
    assert not work.exists()  # cleaned up after publishing


def test_datatrove_executors_give_the_same_output(corpus, reference, tmp_path):
    """The cluster form: every step as a datatrove job (LocalPipelineExecutor here; Slurm is the
    same chain with another executor class), 3 tasks on 2 worker processes."""
    pytest.importorskip("datatrove")
    from herd.data.cluster import datatrove_executors

    _, inp, _ = corpus
    (tmp_path / "dt.toml").write_text(_toml(inp, tmp_path / "dt"))
    cfg = load_pipeline_config(tmp_path / "dt.toml")
    last = datatrove_executors(cfg, tasks=3, workers=2, logging_dir=tmp_path / "logs", start_method="fork")
    last.run()
    assert _files(tmp_path / "dt") == _files(reference[0])
    assert (tmp_path / "logs" / "00-read" / "completions").is_dir()  # datatrove tracked the tasks


def test_changed_config_on_an_unfinished_run_is_refused(tmp_path):
    inp = tmp_path / "small.jsonl"
    inp.write_text("".join(json.dumps({"text": d.text, "domain": d.domain}) + "\n"
                           for d in builtin.code_documents(limit=6)))
    (tmp_path / "a.toml").write_text(_toml(inp, tmp_path / "a"))
    cfg = load_pipeline_config(tmp_path / "a.toml", ["--run.keep_work=true"])
    work = tmp_path / ".a.work"
    work.mkdir()
    from herd.data.pipeline import _plan

    _plan(cfg, work, restart=False)
    from herd.errors import HerdError

    changed = load_pipeline_config(tmp_path / "a.toml", ["--minhash.threshold=0.5"])
    with pytest.raises(HerdError, match=r"different config \(minhash.threshold\)"):
        run_pipeline(changed)
    # --restart discards it; workers may change freely (not part of the output)
    run_pipeline(changed, restart=True, workers=2)
    assert (tmp_path / "a" / "meta.json").exists()
