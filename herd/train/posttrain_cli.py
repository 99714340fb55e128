"""`herd sft | reward | dpo | sample | eval`: thin command-line doors over post-training (SPEC §4)
and evaluation, sharing `herd pretrain`'s contract: `--out DIR`, any config value overridable as
`--section.key=value` (sections train, optim, schedule, checkpoint, plus lora and dpo here), and
`metrics.jsonl` with `step` and `loss` per step. herd/cli.py registers them with
`add_posttrain_parsers(subparsers)`.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from herd.errors import HerdError

EXAMPLES = """\
examples:
  herd sft    --model smollm2-135m-instruct --data sft.jsonl --out runs/sft [--lora.rank=16]
  herd reward --model runs/sft --data prefs.jsonl --out runs/rm
  herd sample --model runs/sft --reward runs/rm --prompts prompts.jsonl -k 8 --out best.jsonl
  herd dpo    --model runs/sft --ref runs/sft --data prefs.jsonl --out runs/dpo --dpo.beta=0.1 --dpo.nll=0.2
  herd eval   --model runs/dpo --task tasks/arith.jsonl
"""

# SPEC §4: SFT and DPO at LR 1e-5. A constant schedule: post-training runs are short.
DEFAULTS = {"optim": {"lr": 1e-5, "weight_decay": 0.0}, "schedule": {"name": "constant"},
            "train": {"steps": 100, "batch_size": 4, "seq_len": 1024, "eval_every": 0},
            "checkpoint": {"every": 0, "keep": 1},
            # the model comes from --model; this only lifts the config check of seq_len against a preset
            "model": {"max_seq_len": 1 << 20}}
OWN_SECTIONS = ("lora", "dpo")
# pretrain's sections that post-training does not read: the model comes from --model, the data from
# --data, and a post-training run is one process. `--model.dim=32` or a [data] table was taken and
# silently ignored.
NOT_HERE = {"model": "--model", "data": "--data", "parallel": None}
SECTIONS_HERE = "train, optim, schedule, checkpoint, lora, dpo"


def _refuse_foreign_section(section: str) -> None:
    if section not in SECTIONS_HERE.split(", ") and section not in NOT_HERE:  # pretrain's list was shown
        raise HerdError(f"unknown config section {section!r}; valid: {SECTIONS_HERE}")
    if section in NOT_HERE:
        source = NOT_HERE[section]
        raise HerdError(f"post-training has no {section}.* settings" +
                        (f" (it takes the {section} from {source})" if source else " (it runs in one process)") +
                        f"; sections: {SECTIONS_HERE}")


def _sections():
    from herd.train.lora import LoRAConfig
    from herd.train.posttrain import DPOConfig

    return {"lora": LoRAConfig(), "dpo": DPOConfig()}


def _apply_own(objs: dict, section: str, key: str, value) -> None:
    from herd.train.config import _coerce
    from herd.train.lora import targets_from

    obj = objs[section]
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        raise HerdError(f"unknown config key {section}.{key}; valid keys: "
                        f"{', '.join(f'{section}.{k}' for k in hints)}")
    value = targets_from(value) if key == "targets" else _coerce(value, hints[key], f"{section}.{key}")
    setattr(obj, key, value)


def build_config(config: str | None, overrides: list[str], out: str | None, tables: dict | None = None):
    """(RunConfig, {"lora": LoRAConfig, "dpo": DPOConfig}) from the defaults above ← TOML file (or
    `tables`, a dict of the same shape) ← overrides."""
    from herd.train.config import load_config, override_value, parse_override, read_toml

    table = {k: dict(v) for k, v in DEFAULTS.items()}
    for section, values in (tables or {}).items():
        _refuse_foreign_section(section)
        table.setdefault(section, {}).update(values)
    if config:
        for section, values in read_toml(config).items():
            if not isinstance(values, dict):
                raise HerdError(f"config: {section!r} must be a table; sections: {SECTIONS_HERE}")
            _refuse_foreign_section(section)
            table.setdefault(section, {}).update(values)
    own = _sections()
    for section in OWN_SECTIONS:
        for key, value in table.pop(section, {}).items():
            _apply_own(own, section, key, value)
    rest = []
    for item in overrides:
        section, key, value = parse_override(item)
        _refuse_foreign_section(section)
        if section in OWN_SECTIONS:
            _apply_own(own, section, key, override_value(type(own[section]), key, value, item))
        else:
            rest.append(item)
    # Checked here, before any model loads or data is read: a bad value fails in a second, not
    # after minutes of loading (and a negative rank no longer falls through to full fine-tuning).
    own["lora"].validate()
    own["dpo"].validate()
    cfg = load_config(data=table, overrides=rest)
    if out is not None:  # `--out ""` was taken as not given: the run went to runs/run
        cfg.train.out_dir = out
    return cfg, own


def _add_training_parser(sub, verb: str, help_: str, data_help: str):
    from herd.train.cli import _PretrainParser

    p = sub.add_parser(verb, help=help_, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                       description=f"{help_}. Config values: --section.key=value (sections train, optim, "
                                   "schedule, checkpoint, lora, dpo), or a TOML --config.")
    p.__class__ = _PretrainParser  # collects the dotted overrides (herd/train/cli.py)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="model to start from: a built-in name, checkpoint directory, .gguf, or a herd run directory")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--val", default=None, help="held-out data in the same format (validation loss)")
    p.add_argument("--config", default=None, help="TOML with [train] [optim] [schedule] [checkpoint] [lora] [dpo]")
    p.add_argument("--out", default=None, help="run directory (overrides train.out_dir); the model lands in OUT/model")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train, stage=verb, overrides=[])
    return p


def add_posttrain_parsers(sub) -> None:
    _add_training_parser(sub, "sft", "supervised fine-tuning on assistant turns (SPEC §4)",
                         'chat JSONL: {"messages": [...]} per line')
    _add_training_parser(sub, "reward", "train a reward model: pairwise ranking loss (SPEC §4)",
                         'preference JSONL: {"prompt", "chosen", "rejected", optional "edited"} per line')
    p = _add_training_parser(sub, "dpo", "direct preference optimization with an NLL term (SPEC §4)",
                             'preference JSONL: {"prompt", "chosen", "rejected"} per line')
    p.add_argument("--ref", default=None, help="reference model (default: --model)")

    p = sub.add_parser("sample", help="rejection sampling: K samples per prompt, keep the best (SPEC §4)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("--model", default="smollm2-135m-instruct", help="the policy to sample from")
    p.add_argument("--prompts", required=True, help='prompt JSONL: {"prompt": str | messages, "answer"?} per line')
    p.add_argument("--reward", default=None, help="score samples with this reward model (from `herd reward`)")
    p.add_argument("--verifier", default=None, choices=["answer"],
                   help="score samples programmatically: 'answer' checks the line's answer")
    p.add_argument("-k", type=int, default=8, help="samples per prompt (default: 8)")
    p.add_argument("--out", required=True, help="JSONL of prompt + best reply as chat lines (input of herd sft)")
    p.add_argument("--pairs", default=None, help="also write preference JSONL (best vs a worse sample)")
    p.add_argument("--pairs-per-prompt", type=int, default=1, help="preference pairs per prompt for --pairs")
    p.add_argument("--min-score", type=float, default=None, help="drop prompts whose best score is lower")
    p.add_argument("--keep-all", action="store_true", help="keep every sample and score in --out")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--missing-eos-penalty", type=float, default=None,
                   help="subtract this from the score of a sample cut off by --max-new-tokens before its "
                        "end-of-turn (TRL's missing_eos_penalty; e.g. 1 with --verifier)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="accuracy on local JSONL tasks with a 95%% confidence interval",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--task", required=True, action="append",
                   help="task JSONL (multiple choice: prompt, choices, answer; generation: prompt, answer); repeatable")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="write results (and every reply) as JSON here")
    p.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the model's chat template (lm-eval's --apply_chat_template); "
                        "--no-apply-chat-template scores the raw text as lm-eval does by default. "
                        "Default: the chat template when the model has one")
    p.set_defaults(func=cmd_eval)


def cmd_train(a) -> None:
    from herd.train.posttrain import finetune

    cfg, own = build_config(a.config, list(a.overrides), a.out)
    data = a.data
    trainer, out = finetune(a.stage, cfg, a.model, data, val_path=a.val, lora=own["lora"], dpo=own["dpo"],
                            ref_spec=getattr(a, "ref", None), resume=a.resume, progress=not a.no_progress,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"done: step {trainer.step}, run directory {trainer.run_dir}, model {out}")


def _inference_model(spec: str, chat: bool = True):
    """The model and tokenizer of `spec`; chat=False accepts a tokenizer without a chat format (a base
    model, evaluated on raw prompts)."""
    import warnings

    from herd.api import load
    from herd.train.posttrain import resolve_model_spec

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, tok = load(resolve_model_spec(spec))
    if tok is None:
        raise HerdError(f"{spec}: no tokenizer found next to the checkpoint")
    if chat and tok.chat is None:
        raise HerdError(f"{spec}: needs a tokenizer with a chat format")
    return model, tok


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (through links, `./`, `..`), existing or not."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return pa.samefile(pb)
    except OSError:
        pass
    return pa.resolve() == pb.resolve()


def check_outputs(outputs: dict[str, str | None], inputs: dict[str, str]) -> None:
    """Refuse (one line) outputs that would destroy something — an input (writing the results over
    the prompts or task file the user made), another output of the same run, or what
    check_output_path refuses (a directory, a checkpoint's model/) — before any slow work: these
    used to fail (or clobber) only after all the sampling."""
    from herd.checkpoint.common import check_output_path

    given = [(flag, path) for flag, path in outputs.items() if path]
    for i, (flag, path) in enumerate(given):
        for in_flag, in_path in inputs.items():
            if _same_file(path, in_path):
                raise HerdError(f"{flag} {path} is the {in_flag} input file; writing it would replace that "
                                "input: give a new output path")
        for other_flag, other in given[:i]:
            if _same_file(path, other):
                raise HerdError(f"{flag} and {other_flag} are the same file ({path}); give each its own path")
        check_output_path(path, directory=False)


def cmd_sample(a) -> None:
    from herd.train.posttrain import load_prompts, load_reward_model
    from herd.train.rejection import (
        check_sample_args,
        check_verifier_records,
        preference_pairs,
        rejection_sample,
        reward_scorer,
        verifier_scorer,
        write_best,
    )

    if (a.reward is None) == (a.verifier is None):
        raise HerdError("give exactly one of --reward MODEL or --verifier answer to score the samples")
    # Everything the user typed is checked before the model loads and the sampling starts.
    check_sample_args(k=a.k, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                      missing_eos_penalty=a.missing_eos_penalty, min_score=a.min_score,
                      pairs_per_prompt=a.pairs_per_prompt)
    check_outputs({"--out": a.out, "--pairs": a.pairs}, {"--prompts": a.prompts})
    prompts = load_prompts(a.prompts)
    if a.verifier:
        scorer = verifier_scorer(a.verifier)
        check_verifier_records(a.verifier, prompts)
    model, tok = _inference_model(a.model)
    if a.reward:
        rm, rm_tok = load_reward_model(a.reward)
        if rm.args.vocab_size != model.args.vocab_size:
            raise HerdError(f"reward model vocabulary ({rm.args.vocab_size}) differs from the policy's "
                            f"({model.args.vocab_size})")
        scorer = reward_scorer(rm, rm_tok)
    results = rejection_sample(model, tok, prompts, a.k, scorer, max_new_tokens=a.max_new_tokens,
                               temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                               missing_eos_penalty=a.missing_eos_penalty, progress=True)
    n = write_best(results, a.out, a.min_score, a.keep_all)
    if a.pairs:
        from herd.checkpoint.common import atomic_path

        rows = preference_pairs(results, a.seed, a.pairs_per_prompt)
        with atomic_path(Path(a.pairs)) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} preference pairs to {a.pairs}")
    print(f"kept {n} of {len(results)} prompts ({a.k} samples each) in {a.out}")


def cmd_eval(a) -> None:
    from herd.eval.tasks import check_eval_args, evaluate_items, load_task

    check_eval_args(max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    check_outputs({"--out": a.out}, {f"--task {t}": t for t in a.task})
    # Every task file is read and checked before the model loads: a bad line fails in a second.
    tasks = [(task, load_task(task, chat_template=a.apply_chat_template)) for task in a.task]
    # A base model (no chat format) is scored on the raw prompts unless --apply-chat-template asks for
    # the template: `--no-apply-chat-template` is lm-eval's default, and it was refused for such models.
    model, tok = _inference_model(a.model, chat=bool(a.apply_chat_template))
    report = {}
    for task, items in tasks:
        r = evaluate_items(model, tok, items, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                           chat_template=a.apply_chat_template)
        print(r.line(task))
        report[task] = {"n": r.n, "correct": r.correct, "accuracy": r.accuracy, "ci95": [r.ci_low, r.ci_high],
                        **r.metrics(), "chat_template": r.chat_template,
                        "replies": r.replies, "correct_items": r.correct_items,
                        **({"choice_logprobs": r.scores} if r.scores else {})}
    if a.out:
        from herd.checkpoint.common import atomic_path

        with atomic_path(Path(a.out)) as tmp:
            tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False))
