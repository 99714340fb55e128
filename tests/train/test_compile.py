"""`train.compile`: the forward pass and the loss as one torch.compile graph trains the same model as
eager (to float rounding), compiles once (not once per step), and still resumes bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.utils import counters

from herd.errors import HerdError
from herd.train import checkpoint as ckpt
from herd.train.config import load_config
from herd.train.loop import Trainer, pretrain

from .conftest import debug_overrides

SETTINGS = {"train.steps": 6, "checkpoint.every": 3, "schedule.decay_steps": 6, "model.dim": 64,
            "train.batch_size": 2, "train.seq_len": 32}


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cfg(shards, run, **extra):
    return load_config(overrides=debug_overrides(shards, run, **{**SETTINGS, **extra}))


def test_compiled_training_equals_eager_and_resumes_exactly(shards, tmp_path):
    torch._dynamo.reset()
    pretrain(_cfg(shards, tmp_path / "eager"), progress=False, log=lambda m: None)
    counters.clear()
    pretrain(_cfg(shards, tmp_path / "compiled", **{"train.compile": "true"}), progress=False, log=lambda m: None)
    # one graph, compiled once, for all six steps (same shapes; no graph breaks): a recompilation per
    # step would cost seconds each
    assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["ok"] == 1, dict(counters["frames"])
    eager, compiled = _rows(tmp_path / "eager"), _rows(tmp_path / "compiled")
    for a, b in zip(eager, compiled, strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    sd_e, _ = ckpt.load_train_state(ckpt.latest_checkpoint(tmp_path / "eager"))
    sd_c, _ = ckpt.load_train_state(ckpt.latest_checkpoint(tmp_path / "compiled"))
    for k in sd_e:
        torch.testing.assert_close(sd_c[k], sd_e[k], rtol=1e-3, atol=1e-5)

    # stop at step 3, resume to 6 (a new process would compile again; so does a new Trainer here)
    part = _cfg(shards, tmp_path / "part", **{"train.compile": "true", "train.steps": 3})
    pretrain(part, progress=False, log=lambda m: None)
    part.train.steps = 6
    pretrain(part, resume=True, progress=False, log=lambda m: None)
    assert [(r["step"], r["loss"]) for r in _rows(tmp_path / "part")] == [(r["step"], r["loss"]) for r in compiled]
    sd_p, _ = ckpt.load_train_state(ckpt.latest_checkpoint(tmp_path / "part"))
    assert all(torch.equal(sd_p[k], sd_c[k]) for k in sd_c)


def test_compile_with_parallel_wrapping_is_refused(shards, tmp_path):
    cfg = _cfg(shards, tmp_path / "run", **{"train.compile": "true", "parallel.activation_checkpoint": '"full"'})
    with pytest.raises(HerdError, match="parallel.compile"):
        Trainer(cfg, progress=False, log=lambda m: None)
