"""Multi-stage recipes in one TOML (SPEC §3.4): pre-training, then continued stages such as long-
context extension (§3.4.2) and annealing on an upsampled high-quality mix with Polyak averaging of
the annealing checkpoints (§3.4.3).

A recipe is an ordinary run config plus an array of `[[stages]]` tables. Each stage names itself and
overrides any keys of the base config with dotted keys (`train.seq_len = 512`); `average = true`
averages that stage's checkpoints when it finishes:

    [model] ... [data] ... [train] out_dir = "runs/tiny-recipe"      # the base config
    [[stages]]
    name = "pretrain"
    [[stages]]
    name = "long-context"
    train.seq_len = 512
    [[stages]]
    name = "anneal"
    schedule.name = "linear"
    average = true

Stage k runs in `<out_dir>/<k>-<name>/` and starts from stage k-1's final checkpoint
(`train.init_from`) with a fresh optimizer and schedule. Running the recipe again (or with
`--resume`) skips finished stages and resumes the one in progress exactly, so a killed recipe
continues where it stopped.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from herd.errors import HerdError
from herd.train import checkpoint as ckpt
from herd.train.config import RunConfig, load_config, parse_override, read_toml

_STAGE_KEYS = ("name", "average")


@dataclass
class Stage:
    name: str
    cfg: RunConfig
    average: bool = False

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)

    def steps_done(self) -> int:
        last = ckpt.latest_checkpoint(self.run_dir)
        return 0 if last is None else int(json.loads((last / "complete.json").read_text())["step"])

    def finished(self) -> bool:
        return self.steps_done() >= self.cfg.train.steps

    @property
    def averaged_dir(self) -> Path:
        return self.run_dir / "averaged"


def is_recipe(path: str | Path | None) -> bool:
    return path is not None and "stages" in read_toml(path)


def _merge(base: dict, stage: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for section, values in stage.items():
        if section in _STAGE_KEYS:
            continue
        if not isinstance(values, dict):
            raise HerdError(f"{where}: {section} = {values!r} is not a config section; use section.key = value "
                            f"(or one of {', '.join(_STAGE_KEYS)})")
        out.setdefault(section, {}).update(values)
    return out


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), out_dir: str | None = None) -> list[Stage]:
    """The stages of recipe `path`, each a validated RunConfig. `overrides` apply to every stage."""
    table = read_toml(path)
    stages = table.pop("stages", None)
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise HerdError(f"{path}: `stages` must be a non-empty array of [[stages]] tables")
    base = load_config(data=table, overrides=overrides)  # the base alone must be valid too
    root = Path(out_dir or base.train.out_dir)
    out: list[Stage] = []
    names: set[str] = set()
    for k, st in enumerate(stages):
        name = st.get("name")
        where = f"{path}: stage {k + 1}"
        if not isinstance(name, str) or not name or "/" in name:
            raise HerdError(f"{where}: needs a name (a string without '/')")
        if name in names:
            raise HerdError(f"{where}: duplicate stage name {name!r}")
        names.add(name)
        average = st.get("average", False)
        if not isinstance(average, bool):
            raise HerdError(f"{where}: average must be true or false")
        merged = _merge(table, st, f"{where} ({name})")
        cfg = load_config(data=merged, overrides=overrides)
        cfg.train.out_dir = str(root / f"{k + 1}-{name}")
        if out:
            if any(parse_override(o)[:2] == ("train", "init_from") for o in overrides) or \
                    "init_from" in st.get("train", {}):
                raise HerdError(f"{where}: train.init_from is set by the recipe (the previous stage's result)")
            prev = out[-1]
            cfg.train.init_from = str(prev.averaged_dir if prev.average else
                                      Path(prev.cfg.train.out_dir) / ckpt.checkpoint_name(prev.cfg.train.steps))
        out.append(Stage(name, cfg, average))
    check_steps(out)
    return out


def check_steps(stages: list[Stage]) -> None:
    """The next stage starts from this one's checkpoint at train.steps; a stage that already ran past
    it (the recipe resumed with fewer steps) has no such checkpoint, and its later stages were built
    on the longer run: refused in one line, before anything is written."""
    for k, stage in enumerate(stages, 1):
        if stage.steps_done() > stage.cfg.train.steps:
            raise HerdError(f"stage {k} {stage.name} already ran {stage.steps_done()} steps, more than its "
                            f"train.steps = {stage.cfg.train.steps} now; resume with the steps it was run "
                            "with, or give the recipe a new --out")


def run_recipe(stages: list[Stage], *, log: Callable[[str], None], progress: bool = True,
               pretrain: Callable | None = None) -> Path:
    """Run the stages in order, skipping finished ones; returns the final model directory."""
    from herd.train.average import average_checkpoints
    from herd.train.loop import pretrain as _pretrain

    pretrain = pretrain or _pretrain
    check_steps(stages)
    for k, stage in enumerate(stages, 1):
        if stage.finished():
            log(f"stage {k}/{len(stages)} {stage.name}: finished earlier ({stage.run_dir})")
        else:
            resume = ckpt.latest_checkpoint(stage.run_dir) is not None
            log(f"stage {k}/{len(stages)} {stage.name}: {'resuming' if resume else 'starting'} in {stage.run_dir}"
                + (f" from {stage.cfg.train.init_from}" if stage.cfg.train.init_from and not resume else ""))
            pretrain(stage.cfg, resume=resume, log=log, progress=progress)
        if stage.average and not (stage.averaged_dir / "params.json").exists():
            found = ckpt.list_checkpoints(stage.run_dir)
            if stage.cfg.checkpoint.keep and len(found) < 2:
                log(f"stage {stage.name}: only {len(found)} checkpoint(s) kept to average (checkpoint.keep)")
            average_checkpoints(found, stage.averaged_dir)
            log(f"stage {stage.name}: Polyak average of {len(found)} checkpoints → {stage.averaged_dir}")
    last = stages[-1]
    return last.averaged_dir if last.average else last.run_dir / ckpt.checkpoint_name(last.cfg.train.steps)
