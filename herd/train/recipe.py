"""Multi-stage recipes in one TOML (SPEC §3.4): pre-training, then continued stages such as long-
context extension (§3.4.2) and annealing on an upsampled high-quality mix with Polyak averaging of
the annealing checkpoints (§3.4.3).

A recipe is an ordinary run config plus an array of `[[stages]]` tables. Each stage names itself and
overrides any keys of the base config with dotted keys (`train.seq_len = 512`); `average = true`
averages that stage's checkpoints when it finishes. `model.*` keys hold for the later stages too:
a stage continues the previous stage's weights, so the model it hands on (a long-context stage's
max_seq_len and RoPE θ) is the model the next stage trains, unless that stage sets them again. The
other sections are per stage (base ← the stage's own keys). Keys that would change the weights'
shapes (dim, n_layers, vocab_size, ...) are refused before anything runs, and so are two step
counts a stage would inherit from the base without meaning to (each stage counts its steps from 0):
the base's `schedule.decay_steps` in a stage that sets its own `train.steps` (an annealing stage would
not decay to 0), and the base's `train.batch_schedule` in a stage that sets its own `train.seq_len` or
`train.batch_size` (a long-context stage would fall back to the base's shape). Set them in the stage
(`schedule.decay_steps = 0`, `train.batch_schedule = []`). A recipe:

    [model] ... [data] ... [train] out_dir = "runs/tiny-recipe"      # the base config
    [[stages]]
    name = "pretrain"
    [[stages]]
    name = "long-context"
    model.max_seq_len = 2048          # kept by the later stages
    model.rope_theta = 500000.0
    train.seq_len = 2048
    [[stages]]
    name = "anneal"
    train.seq_len = 2048
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
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from herd.errors import HerdError
from herd.train import checkpoint as ckpt
from herd.train.config import RunConfig, load_config, parse_override, read_toml
from herd.train.loop import weight_changes

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


def _merge(base: dict, stage: dict, where: str, model: dict) -> dict:
    """base ← the stage's keys; `model` (the model table the previous stage handed on) replaces
    the base's model table first."""
    out = copy.deepcopy(base)
    out["model"] = copy.deepcopy(model)
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
    model = dict(table.get("model") or {})  # base, then each stage's model.* keys in turn
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
        for section, values in st.items():  # before `train`/`model` are read as tables below
            if section not in _STAGE_KEYS and not isinstance(values, dict):
                raise HerdError(f"{where} ({name}): {section} = {values!r} is not a config section; use "
                                f"section.key = value (or one of {', '.join(_STAGE_KEYS)})")
        if "out_dir" in (st.get("train") or {}):  # silently replaced below otherwise
            raise HerdError(f"{where} ({name}): train.out_dir is set by the recipe (<out>/{k + 1}-{name}); "
                            "set it in the base config or with --out")
        merged = _merge(table, st, f"{where} ({name})", model)
        changed = [f"model.{key} = {v!r}" for key, v in (st.get("model") or {}).items() if model.get(key) != v]
        model = merged["model"]
        try:
            cfg = load_config(data=merged, overrides=overrides)
        except HerdError as e:  # which stage: the base alone was valid
            raise HerdError(f"{where} ({name}): {e}") from None
        cfg.train.out_dir = str(root / f"{k + 1}-{name}")
        _check_inherited_decay(cfg, st, overrides, f"{where} ({name})")
        _check_inherited_batch_schedule(cfg, st, overrides, f"{where} ({name})")
        if out:
            # Checked here, not when the stage starts from the previous one's checkpoint hours later.
            diff = weight_changes(out[-1].cfg.model.args(), cfg.model.args())
            if diff:
                raise HerdError(f"{where} ({name}): {', '.join(changed) or 'the model'} would change the weights' "
                                f"shapes ({', '.join(diff)}), but a stage continues stage {k} ({out[-1].name})'s "
                                "weights; only max_seq_len, rope_theta and norm_eps may change between stages")
            if any(parse_override(o)[:2] == ("train", "init_from") for o in overrides) or \
                    "init_from" in st.get("train", {}):
                raise HerdError(f"{where}: train.init_from is set by the recipe (the previous stage's result)")
            prev = out[-1]
            cfg.train.init_from = str(prev.averaged_dir if prev.average else
                                      Path(prev.cfg.train.out_dir) / ckpt.checkpoint_name(prev.cfg.train.steps))
        out.append(Stage(name, cfg, average))
    check_steps(out)
    return out


def _check_inherited_decay(cfg: RunConfig, stage: dict, overrides: list[str] | tuple[str, ...], where: str) -> None:
    """schedule.decay_steps is a horizon in steps (the base's: 405B sets it to its train.steps).
    Merged like every other key, a stage that sets its own train.steps inherited the base's horizon:
    an annealing stage of 4 steps under a base decay_steps of 6 ended at half the peak LR instead
    of 0, and its checkpoints were averaged as if annealed. Refused (before anything runs) when the
    stage sets train.steps but not decay_steps and the two differ; an override of either on the
    command line holds for every stage and is taken as meant."""
    from herd.train.schedule import lr_at

    s, steps = cfg.schedule, cfg.train.steps
    if ("steps" not in (stage.get("train") or {}) or "decay_steps" in (stage.get("schedule") or {})
            or s.decay_steps in (0, steps) or s.name == "constant"
            or any(parse_override(o)[:2] in (("train", "steps"), ("schedule", "decay_steps")) for o in overrides)):
        return
    if s.decay_steps > steps:
        what = f"end at {lr_at(steps - 1, cfg.optim.lr, s, steps) / cfg.optim.lr:.0%} of optim.lr instead of decaying fully"
    else:
        what = f"finish decaying after {s.decay_steps} of its {steps} steps"
    raise HerdError(f"{where}: schedule.decay_steps = {s.decay_steps} comes from the base config, but the stage "
                    f"runs train.steps = {steps}: its {s.name} schedule would {what}; set schedule.decay_steps "
                    "in the stage (0 = its train.steps)")


def _check_inherited_batch_schedule(cfg: RunConfig, stage: dict, overrides: list[str] | tuple[str, ...],
                                    where: str) -> None:
    """train.batch_schedule counts steps from the start of each stage. A stage that sets its own
    train.seq_len or batch_size (a long-context stage) but not batch_schedule inherited the base's
    entries, and at their step trained at the base's shape again: a 70-token stage went back to 32
    tokens at its step 2, with nothing said. Refused when an inherited entry falls inside the stage."""
    t = cfg.train
    own = stage.get("train") or {}
    if (not t.batch_schedule or "batch_schedule" in own or not ({"seq_len", "batch_size"} & set(own))
            or any(parse_override(o)[:2] == ("train", "batch_schedule") for o in overrides)):
        return
    inside = [e for e in t.batch_schedule if e[0] < t.steps]
    if inside:
        start, batch_size, seq_len = inside[0]
        raise HerdError(f"{where}: train.batch_schedule comes from the base config, but the stage sets its own "
                        f"{' and '.join(f'train.{k}' for k in ('batch_size', 'seq_len') if k in own)}: from its step "
                        f"{start} it would train at {batch_size} × {seq_len} instead of {t.batch_size} × {t.seq_len}; "
                        "set train.batch_schedule in the stage ([] for none)")


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
    from herd.checkpoint.common import atomic_path
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
            # average_checkpoints publishes the weights and params.json, then copies the tokenizer:
            # a kill between the two left an averaged/ without tokenizer that a resume took as done.
            # Built under a temporary name and renamed whole, so averaged/ exists only complete.
            for stale in stage.run_dir.glob(".averaged.*"):
                shutil.rmtree(stale, ignore_errors=True)
            with atomic_path(stage.averaged_dir, directory=True) as tmp:
                average_checkpoints(found, tmp)
            log(f"stage {stage.name}: Polyak average of {len(found)} checkpoints → {stage.averaged_dir}")
    last = stages[-1]
    return last.averaged_dir if last.average else last.run_dir / ckpt.checkpoint_name(last.cfg.train.steps)
