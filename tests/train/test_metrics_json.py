"""metrics.jsonl is strict JSON even when a step's loss or grad norm is NaN or infinite (written as
null), finite numbers round-trip exactly (an exact resume compares them), and every reader of the
file (read_metrics, the loss plot, TensorBoard) takes the nulls."""

from __future__ import annotations

import json
import math

import pytest

from herd.train.metrics import MetricSinks, metrics_line, read_metrics


def _strict(line: str):
    """json.loads that refuses NaN/Infinity, as jq and JavaScript's JSON.parse do."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null():
    row = {"step": 3, "tokens": 384, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3,
           "val_loss": -math.inf, "skipped": True, "experts": [1.5, math.nan], "more": {"x": math.inf}}
    line = metrics_line(row)
    assert line.endswith("\n") and line.count("\n") == 1
    got = _strict(line)
    assert got == {"step": 3, "tokens": 384, "loss": None, "grad_norm": None, "lr": 1e-3, "val_loss": None,
                   "skipped": True, "experts": [1.5, None], "more": {"x": None}}
    assert row["loss"] != row["loss"]  # the caller's row is left as it was (NaN)


def test_finite_numbers_round_trip_exactly():
    row = {"step": 1, "loss": 5.551012992858887, "lr": 3.0000000000000004e-05, "mfu": 1e-300, "tokens": 2**40}
    assert _strict(metrics_line(row)) == row
    assert metrics_line(row) == json.dumps(row) + "\n"  # the same bytes as before for finite rows


def test_read_metrics_takes_null_and_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 4.0}, {"step": 2, "loss": math.nan, "skipped": True}, {"step": 3, "loss": 3.5}]
    path.write_text("".join(metrics_line(r) for r in rows) + '{"step": 4, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 4.0}, {"step": 2, "loss": None, "skipped": True},
                                  {"step": 3, "loss": 3.5}]
    assert [r["step"] for r in read_metrics(path, 2)] == [1, 2]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_plot_and_tensorboard_skip_null_and_nan(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": 1, "tokens": 8, "loss": 4.0, "grad_norm": 1.0},
            {"step": 2, "tokens": 16, "loss": None, "grad_norm": None, "skipped": True},
            {"step": 3, "tokens": 24, "loss": math.nan, "grad_norm": math.inf, "val_loss": None},
            {"step": 4, "tokens": 32, "loss": 3.0, "val_loss": 3.2}]
    with MetricSinks(tmp_path, log=lambda m: None, tensorboard=True, png=True) as sinks:
        for r in rows:
            sinks.add(r)
        assert sinks.plot(rows) == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_a_skipped_nan_step_leaves_strict_json(shards, tmp_path):
    from herd.train.config import load_config
    from herd.train.loop import Trainer

    from .conftest import debug_overrides
    from .test_loop import _NaNOnCall

    run = tmp_path / "run"
    cfg = load_config(overrides=debug_overrides(shards, run, **{"train.steps": 3}))
    Trainer(cfg, objective=_NaNOnCall(bad_call=2), log=lambda m: None, progress=False).run()
    rows = [_strict(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["skipped"] and rows[1]["loss"] is None and math.isfinite(rows[2]["loss"])
