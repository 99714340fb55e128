"""`herd pretrain` and `herd average`: thin command-line doors over herd.train.

herd/cli.py wires these in with `add_pretrain_parser(subparsers)` and `add_average_parser(subparsers)`.
Dotted config overrides (`--train.steps=2000 --model.dim=256`) are not argparse options: the
pretrain sub-parser collects them before argparse sees the rest, and herd.train.config checks them
(an unknown key is one line listing the valid ones). `python -m herd.train.cli pretrain ...` runs the
same commands without the top-level CLI.
"""

from __future__ import annotations

import argparse
import re
import sys

from herd.errors import ArgumentParser, HerdError, print_error

_DOTTED = re.compile(r"^--?([A-Za-z_]\w*)\.([A-Za-z_][\w-]*)(=.*)?$")

PRETRAIN_EXAMPLES = """\
examples:
  herd pretrain --config configs/debug.toml --out runs/debug
  herd pretrain --config configs/tiny.toml --train.steps=2000 --model.dim=256
  herd pretrain --resume runs/tiny                  # continue exactly from the newest checkpoint
  herd average runs/tiny/ckpt-* --out runs/tiny/averaged
  torchrun --nproc_per_node 4 -m herd pretrain --config configs/tiny.toml --parallel.dp_shard=2 --parallel.tp=2
"""


def _split_dotted(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--section.key=value` / `--section.key value` items from ordinary arguments."""
    rest, dotted = [], []
    i = 0
    while i < len(argv):
        m = _DOTTED.match(argv[i])
        if m:
            if m.group(3) is not None:
                dotted.append(f"{m.group(1)}.{m.group(2)}{m.group(3)}")
            else:
                if i + 1 >= len(argv):
                    raise HerdError(f"{argv[i]} needs a value (--{m.group(1)}.{m.group(2)}=VALUE)")
                dotted.append(f"{m.group(1)}.{m.group(2)}={argv[i + 1]}")
                i += 1
        else:
            rest.append(argv[i])
        i += 1
    return rest, dotted


class _PretrainParser(ArgumentParser):
    """Collects dotted overrides into `namespace.overrides` instead of rejecting them."""

    def parse_known_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rest, dotted = _split_dotted(argv)
        except HerdError as e:
            self.error(str(e))
        ns, extras = super().parse_known_args(rest, namespace)
        ns.overrides = list(getattr(ns, "overrides", None) or []) + dotted
        return ns, extras


def add_pretrain_parser(subparsers) -> argparse.ArgumentParser:
    # The parser class is swapped for one that understands dotted overrides; add_parser has no
    # parser_class argument, so construct through it and then change the class (same attributes).
    p = subparsers.add_parser(
        "pretrain", help="pre-train a Llama 3 model from a TOML config (resumable)",
        description="Pre-train from a TOML config. Any config value can be overridden as "
                    "--section.key=value (sections: model, data, optim, schedule, train, checkpoint, parallel).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PRETRAIN_EXAMPLES)
    p.__class__ = _PretrainParser
    p.add_argument("--config", default=None, help="TOML config (default: built-in defaults; with --resume: the run's saved config)")
    p.add_argument("--out", default=None, help="run directory (overrides train.out_dir)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its newest complete checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain, overrides=[])
    return p


def add_average_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("average", help="average checkpoints' weights (Polyak averaging, SPEC §3.4.3)")
    p.add_argument("checkpoints", nargs="+", help="training checkpoints (ckpt-N) or model checkpoint dirs")
    p.add_argument("--out", required=True, help="output directory (Meta layout)")
    p.add_argument("--weights", default=None, help="comma-separated weights (default: uniform)")
    p.set_defaults(func=cmd_average)
    return p


def cmd_pretrain(a) -> None:
    import json
    from pathlib import Path

    from herd.train.config import load_config
    from herd.train.loop import pretrain

    overrides = list(a.overrides)
    for option, value in (("--out", a.out), ("--resume", a.resume), ("--config", a.config)):
        if value is not None and not value.strip():  # "" was taken as "not given" (--out) or as "."
            raise HerdError(f"{option} is empty; give a path")
    config = a.config
    if config is None and a.resume and (Path(a.resume) / RECIPE_COPY).exists():
        config = str(Path(a.resume) / RECIPE_COPY)
    from herd.train.recipe import is_recipe

    if is_recipe(config):  # [[stages]]: herd/train/recipe.py
        _run_recipe(a, config, overrides)
        return
    if a.resume:
        if a.out and Path(a.out).resolve() != Path(a.resume).resolve():
            raise HerdError(f"--resume {a.resume} continues in that directory; drop --out {a.out} (or copy the "
                            "run there first)")
        saved = Path(a.resume) / "config.json"
        if config is None:
            if not Path(a.resume).is_dir():
                raise HerdError(f"--resume {a.resume}: no such run directory")
            if (Path(a.resume) / "complete.json").exists() or (Path(a.resume) / "train_state.pt").exists():
                # a checkpoint of a run rather than the run: the run resumes from its newest checkpoint
                raise HerdError(f"--resume {a.resume} is a checkpoint inside a run; give the run directory "
                                f"(--resume {Path(a.resume).parent})")
            if not saved.exists():
                raise HerdError(f"{a.resume}: no saved config.json; give --config")
            try:
                data = json.loads(saved.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise HerdError(f"{saved}: cannot read the run's config ({e}); give --config") from None
            if not isinstance(data, dict) or not {"model", "train"} <= data.keys():
                # a model checkpoint's config.json (HF layout), or a list: a TypeError traceback or
                # "'architectures' must be a table"
                raise HerdError(f"--resume {a.resume}: {saved.name} is not a herd run's config (a model "
                                "checkpoint?); give a run directory written by herd pretrain")
            cfg = load_config(data=data, overrides=overrides)
        else:
            cfg = load_config(config, overrides)
        cfg.train.out_dir = a.resume
    else:
        cfg = load_config(config, overrides)  # no --config: the library defaults plus overrides
        if a.out:
            cfg.train.out_dir = a.out
    trainer = pretrain(cfg, resume=bool(a.resume), progress=not a.no_progress,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    if trainer.parallel.is_main:  # under torchrun, one line for the job
        print(f"done: step {trainer.step}, run directory {trainer.run_dir}")
    trainer.parallel.shutdown()


RECIPE_COPY = "recipe.toml"  # a staged run keeps its recipe, so `--resume DIR` needs nothing else
RECIPE_OVERRIDES = "recipe.overrides.json"  # ... and the command line's overrides of it


def _run_recipe(a, config: str, overrides: list[str]) -> None:
    import json
    import shutil
    from pathlib import Path

    from herd.train.recipe import load_recipe, run_recipe

    if a.resume:
        if a.out and Path(a.out).resolve() != Path(a.resume).resolve():
            raise HerdError(f"--resume {a.resume} continues in that directory; drop --out {a.out}")
        saved = Path(a.resume) / RECIPE_OVERRIDES
        if saved.exists():  # the first run's --section.key=value options; the ones given now win
            overrides = _saved_overrides(saved) + overrides
    stages = load_recipe(config, overrides, out_dir=a.resume or a.out)
    root = Path(stages[0].cfg.train.out_dir).parent
    copy, saved = root / RECIPE_COPY, root / RECIPE_OVERRIDES
    if not a.resume and copy.exists():
        before = _saved_overrides(saved) if saved.exists() else []
        if copy.read_bytes() != Path(config).read_bytes() or before != overrides:
            # its stages would count as "finished earlier" and the record of what made them be replaced
            raise HerdError(f"{root} holds a run of another recipe or other options; pass --resume {root} to "
                            "continue it, or choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    if Path(config).resolve() != copy.resolve():
        shutil.copyfile(config, copy)
    saved.write_text(json.dumps(overrides) + "\n")
    final = run_recipe(stages, log=lambda m: print(m, file=sys.stderr, flush=True), progress=not a.no_progress)
    print(f"done: {len(stages)} stage{'s' if len(stages) > 1 else ''}, final model {final}")


def _saved_overrides(path) -> list[str]:
    """A staged run's recorded command-line overrides (a JSON list of strings)."""
    import json

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HerdError(f"{path}: cannot read the run's saved overrides ({e})") from None
    if not isinstance(saved, list) or not all(isinstance(x, str) for x in saved):
        raise HerdError(f"{path}: expected a JSON list of --section.key=value strings")
    return saved


def cmd_average(a) -> None:
    from herd.train.average import average_checkpoints

    weights = None
    if a.weights:
        try:
            weights = [float(w) for w in a.weights.split(",")]
        except ValueError:
            raise HerdError(f"--weights {a.weights!r}: expected comma-separated numbers") from None
    out = average_checkpoints(a.checkpoints, a.out, weights)
    print(f"averaged {len(a.checkpoints)} checkpoint(s) into {out}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="herd")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    add_pretrain_parser(sub)
    add_average_parser(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except HerdError as e:
        print_error(f"herd: error: {e}")  # under torchrun: rank 0's line only (herd/errors.py)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
