"""A bad option under torchrun is one error line for the job, not one per rank: every rank parses the
same command line and config, so rank 0 prints the line and the others leave quietly, all with the
CLI's status 2 for bad input (herd/errors.py print_error)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import herd.errors
from herd.errors import print_error

ROOT = Path(__file__).resolve().parents[2]
LINE = "herd: error: unknown config section 'bogus'"


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.parametrize("bad", [["--bogus.key=1"], ["--no-such-option"]])
def test_a_bad_option_under_torchrun_prints_one_line_for_the_job(tmp_path, bad):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "herd",
           "pretrain", "--config", str(ROOT / "configs" / "tiny.toml"), "--no-progress", *bad]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=180)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error: " in line and "herd" in line
             and "elastic" not in line and "ChildFailedError" not in line]
    want = LINE if bad[0].startswith("--bogus") else "herd: error: unrecognized arguments: --no-such-option"
    assert len(lines) == 1, proc.stderr[-3000:]  # was one per rank
    assert lines[0].startswith(want)
    assert "[rank 1]" not in proc.stderr
    assert "exitcode  : 2" in proc.stderr  # torchrun's summary: the failure is the bad input's status 2


def test_another_rank_stopped_by_the_launcher_exits_2_silently():
    """What torchrun does to rank 1 once rank 0 has failed: SIGTERM while it waits. It leaves with
    status 2 (not -15, a kill) and prints nothing."""
    code = "import herd.errors as e; print('ready', flush=True); e.print_error('herd: error: same on every rank')"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2"))
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        assert proc.poll() is None  # still waiting for the launcher
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2
    assert err == ""


def test_an_error_only_another_rank_meets_is_still_printed(monkeypatch, capsys):
    """Rank 0 did not fail (nothing stopped this rank within the grace period): the line is this
    rank's own, so it is printed, marked with the rank."""
    monkeypatch.setattr(herd.errors, "OTHER_RANK_GRACE_S", 0.05)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    print_error("herd: error: cuda:1 is not present")
    assert capsys.readouterr().err == "[rank 1] herd: error: cuda:1 is not present\n"
    monkeypatch.setenv("RANK", "0")
    print_error("herd: error: x")
    assert capsys.readouterr().err == "herd: error: x\n"
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "3")  # a stale RANK outside a job does not silence anything
    print_error("herd: error: y")
    assert capsys.readouterr().err == "herd: error: y\n"


def test_an_error_rank_0_meets_while_the_others_wait_is_one_line(tmp_path):
    """Rank 0 prepares the data while the other ranks wait in a barrier (Parallel.rank0_first). When it
    fails there (no shards and no data.source), the broken barrier used to give every other rank a
    gloo "Connection closed by peer" traceback; now the job prints rank 0's one line and exits 2."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "herd",
           "pretrain", "--model.preset=debug", "--train.steps=1", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=180)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error: " in line and "herd" in line
             and "elastic" not in line and "ChildFailedError" not in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("herd: error: data.path data/shards has no shards"), lines
    assert "[rank1]:" not in proc.stderr, proc.stderr[-3000:]  # no traceback from the waiting rank
    assert "Connection closed by peer" not in proc.stderr, proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr
