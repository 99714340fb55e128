"""Exact resume (DESIGN principle 12): a run killed with SIGKILL and resumed from its newest
checkpoint reproduces the uninterrupted run bit for bit — losses and final weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from herd.train import checkpoint as ckpt

from .conftest import debug_overrides

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40


def _cmd(shards, run, *extra):
    overrides = debug_overrides(shards, run, **{"train.steps": STEPS, "checkpoint.every": 4,
                                                "checkpoint.keep": 0, "train.eval_every": 10,
                                                "model.dim": 128, "train.seq_len": 64, "train.batch_size": 8})
    return [sys.executable, "-m", "herd.train.cli", "pretrain", "--no-progress",
            *[f"--{o}" for o in overrides], *extra]


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("val_loss")) for r in rows]


def _weights(run):
    sd, _ = ckpt.load_train_state(ckpt.latest_checkpoint(run))
    return sd


def test_sigkill_then_resume_is_bitwise_identical(shards, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(shards, full), cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(_cmd(shards, killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    # Kill at an arbitrary point after the first checkpoint (step 4), well before the end.
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 11:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done_before_kill = len(metrics.read_text().splitlines())
    assert done_before_kill < STEPS, "the run finished before it could be killed"
    resumed_from = ckpt.latest_checkpoint(killed)
    assert resumed_from is not None and int(resumed_from.name[5:]) < STEPS

    out = subprocess.run(_cmd(shards, killed, "--resume", str(killed)), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"resumed from {resumed_from}" in out.stderr

    assert _losses(killed) == _losses(full)  # every step's loss and val loss, bit for bit
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, state_a = ckpt.load_train_state(ckpt.latest_checkpoint(full))
    _, state_b = ckpt.load_train_state(ckpt.latest_checkpoint(killed))
    assert state_a["data"] == state_b["data"] and state_a["step"] == state_b["step"] == STEPS


def test_cli_errors_are_one_line_exit_2(shards, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "herd.train.cli", "pretrain", "--config",
                          str(ROOT / "configs/debug.toml"), "--train.stepz=3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown config key train.stepz; valid keys: train.steps" in lines[0]
    out = subprocess.run(_cmd(shards, tmp_path / "r", "--model.vocab_size=300"), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "vocabulary mismatch" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_cli_resume_from_saved_config_and_average(shards, tmp_path):
    """`--resume DIR` alone reuses the run's saved config (overrides still apply, e.g. more steps);
    `average` writes a checkpoint herd.checkpoint reads; `--section.key value` also parses."""
    from herd.checkpoint import read_checkpoint
    from herd.train.cli import main

    run = tmp_path / "run"
    overrides = [f"--{o}" for o in debug_overrides(shards, run, **{"train.steps": 4, "checkpoint.every": 2})]
    assert main(["pretrain", "--no-progress", *overrides[:-1], *overrides[-1].split("=", 1)]) == 0
    assert main(["pretrain", "--no-progress", "--resume", str(run), "--train.steps=6"]) == 0
    assert [r[0] for r in _losses(run)] == [1, 2, 3, 4, 5, 6]
    ckpts = [str(p) for p in ckpt.list_checkpoints(run)]
    assert len(ckpts) == 3
    assert main(["average", *ckpts, "--out", str(tmp_path / "avg")]) == 0
    avg = read_checkpoint(tmp_path / "avg").state_dict
    parts = [ckpt.load_train_state(ckpt.latest_checkpoint(run))[0]]
    assert avg.keys() == parts[0].keys()
    assert main(["average", str(tmp_path / "nope"), "--out", str(tmp_path / "avg2")]) == 2
