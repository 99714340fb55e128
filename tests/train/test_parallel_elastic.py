"""Elastic restart (SPEC §3: 466 interruptions in 54 days): under `torchrun --max-restarts=1`, a
rank killed mid-run brings the job back from its last distributed checkpoint, and it finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import debug_overrides

STEPS = 60


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(d.name))
    return out


def _worker_of_rank(agent: int, rank: int) -> int | None:
    for pid in _children(agent):
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def test_killed_rank_resumes_from_last_checkpoint(shards, tmp_path):
    run = tmp_path / "run"
    overrides = debug_overrides(shards, run, **{"train.steps": STEPS, "checkpoint.every": 10,
                                                "checkpoint.keep": 2, "parallel.dp_shard": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.2", "-m", "herd", "pretrain", "--no-progress",
           *[f"--{o}" for o in overrides]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        deadline = time.time() + 120
        while not (run / "ckpt-00000010").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        victim = _worker_of_rank(proc.pid, rank=1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in err and "ckpt-000000" in err, err[-3000:]
    assert f"done: step {STEPS}" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # steps after the checkpoint redone once
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-00000050", "ckpt-00000060"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
