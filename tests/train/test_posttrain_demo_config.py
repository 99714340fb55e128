"""The post-training demo's config (configs/posttrain-demo.toml) builds a valid run for every stage
and every [[dpo_extra]] variant — a misspelt key there would be refused by herd's config loader —
and each variant's overrides reach the run it describes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import posttrain_demo
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return posttrain_demo


def test_every_stage_and_dpo_variant_builds(demo, tmp_path):
    from herd.train.posttrain_cli import build_config

    cfg = demo.load_config(str(ROOT / "configs" / "posttrain-demo.toml"), [])
    for stage in ("sft", "reward", "dpo"):
        run, own = build_config(None, [], str(tmp_path / stage), demo.stage_tables(cfg, stage))
        assert run.train.seed == cfg["demo"]["seed"] and run.train.steps == cfg[stage]["train"]["steps"]
    paper = build_config(None, [], str(tmp_path / "p"), demo.stage_tables(cfg, "dpo"))[1]["dpo"]
    assert (paper.beta, paper.nll) == (0.1, 0.2)  # §4.1.4's values are the demo's first DPO run
    extras = cfg.get("dpo_extra", [])
    assert extras, "the demo's config lists DPO variants"
    for x in extras:
        run, own = build_config(None, [], str(tmp_path / x["name"]), demo.stage_tables(cfg, "dpo", x["set"]))
        for key, value in x["set"].items():
            sec, field = key.split(".")
            got = getattr(own["dpo"], field) if sec == "dpo" else getattr(getattr(run, sec), field)
            assert got == value, (x["name"], key)


def test_overrides_are_section_dot_key(demo):
    cfg = demo.load_config(str(ROOT / "configs" / "posttrain-demo.toml"), ["dpo.train.steps=3"])
    assert demo.stage_tables(cfg, "dpo")["train"]["steps"] == 3
    with pytest.raises(SystemExit, match="write it as section.key"):
        demo.stage_tables(cfg, "dpo", {"beta": 1.0})
