"""Configs (DESIGN principle 8) and learning-rate schedules (SPEC §3.4)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from herd.errors import HerdError
from herd.train.config import RECIPES, ScheduleConfig, load_config
from herd.train.schedule import lr_at

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_405b_recipe_values():
    optim, sched = RECIPES["llama3-405b"]  # peak 8e-5, 8,000 warm-up steps, cosine to 8e-7 over 1.2M
    peak, total = optim.lr, 1_200_000
    assert lr_at(0, peak, sched, total) == pytest.approx(8e-5 / 8000)
    assert lr_at(3999, peak, sched, total) == pytest.approx(8e-5 / 2)
    assert lr_at(7999, peak, sched, total) == pytest.approx(8e-5)
    assert lr_at(8000, peak, sched, total) == pytest.approx(8e-5)
    mid = 8000 + (1_200_000 - 8000) // 2
    assert lr_at(mid, peak, sched, total) == pytest.approx((8e-5 + 8e-7) / 2)
    assert lr_at(1_200_000, peak, sched, total) == pytest.approx(8e-7)
    assert lr_at(5_000_000, peak, sched, total) == pytest.approx(8e-7)


def test_cosine_quarter_point_and_linear_annealing():
    s = ScheduleConfig("cosine", warmup_steps=10, min_lr=0.1)
    # a quarter of the way through decay: min + (peak-min)·(1+cos(π/4))/2
    assert lr_at(10 + 25, 1.0, s, 110) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    lin = ScheduleConfig("linear", warmup_steps=0)  # §3.4.3: annealing, linearly to 0
    assert lin.name == RECIPES["anneal"][1].name
    assert lr_at(0, 2.0, lin, 100) == pytest.approx(2.0)
    assert lr_at(50, 2.0, lin, 100) == pytest.approx(1.0)
    assert lr_at(100, 2.0, lin, 100) == 0.0
    assert lr_at(5, 2.0, ScheduleConfig("constant", warmup_steps=10), 100) == pytest.approx(1.2)


def test_configs_load_and_overrides_apply():
    for name in ("debug.toml", "tiny.toml", "tiny-anneal.toml"):
        load_config(CONFIGS / name)
    cfg = load_config(CONFIGS / "debug.toml", ["--train.steps=2000", "--model.dim=128", "optim.betas=[0.9, 0.99]",
                                               "schedule.name=linear", "data.path=some/dir"])
    assert cfg.train.steps == 2000 and cfg.model.args().dim == 128
    assert cfg.optim.betas == (0.9, 0.99) and cfg.schedule.name == "linear" and cfg.data.path == "some/dir"
    assert isinstance(load_config(overrides=["optim.lr=1"]).optim.lr, float)


@pytest.mark.parametrize("override, fragment", [
    ("--train.stpes=5", "unknown config key train.stpes; valid keys: train.steps, train.batch_size"),
    ("--trian.steps=5", "unknown config section 'trian'; valid: model, data, optim"),
    ("--model.dimm=5", "model.dim"),
    ("--train.steps=many", "train.steps: expected int"),
    ("--model.preset=gpt9", "unknown model preset 'gpt9'"),
    ("--schedule.name=step", "choose cosine, linear or constant"),
    ("train.steps", "bad override"),
])
def test_bad_overrides_are_one_line_errors(override, fragment):
    with pytest.raises(HerdError) as e:
        load_config(CONFIGS / "debug.toml", [override])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_in_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nsteps = 3\nwarmup = 4\n")
    with pytest.raises(HerdError, match="unknown config key train.warmup; valid keys: .*train.steps"):
        load_config(p)
