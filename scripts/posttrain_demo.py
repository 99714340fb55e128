"""One round of Llama 3 post-training (SPEC §4) on the real SmolLM2-135M-Instruct, offline, on CPU.

Builds verifiable tasks by code (arithmetic word problems with exact answers; a word to write in
capital letters only), splits them into training and held-out prompts, and runs:
  0. the base model on the held-out prompts (greedy)                       → accuracy
  1. rejection sampling: K samples per prompt (prompt KV cache shared), scored by the verifier;
     the best correct sample per training prompt is SFT data, (correct, wrong) sample pairs are
     preference data (training pairs from training prompts, held-out pairs from held-out prompts)
  2. SFT on the rejection-sampled data                                      → held-out accuracy
  3. a reward model on the training pairs             → held-out pairwise accuracy; best-of-K by
     the reward model against a random sample (the mean verifier score of the K samples)
  4. DPO from the SFT model (reference = the SFT model) on the SFT model's own samples, scored by
     the verifier (§4.1: preference data from the latest model; demo.dpo_pairs = "base" reuses the
     base model's pairs), with the paper's β = 0.1 and NLL term 0.2, the same run without it
     (--dpo.nll=0), and the config's [[dpo_extra]] variants of that run
                 → chosen-minus-rejected margin and chosen log-prob, held-out and training pairs
and prints the table. Every stage is the library's (herd.train.posttrain, herd.train.rejection,
herd.eval.tasks); each training stage is the one training loop with its objective.

    python scripts/posttrain_demo.py [--config configs/posttrain-demo.toml] [--set demo.k=8 ...]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from herd.train.config import tomllib  # noqa: E402

NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eva", "Ben", "Lily", "Noah", "Ella", "Jack"]
THINGS = ["apples", "pens", "books", "coins", "stickers", "marbles", "cards", "shells", "pencils", "cookies"]
WORDS = ["garden", "river", "apple", "silver", "window", "rocket", "orange", "planet", "forest", "yellow",
         "castle", "dragon", "pillow", "summer", "winter", "bridge", "candle", "mirror", "basket", "island",
         "jacket", "violin", "tomato", "rabbit", "pepper", "button", "carpet", "turtle", "ladder", "pocket",
         "rubber", "saddle", "tunnel", "wallet", "zipper", "copper", "kitten", "lemon", "monkey", "napkin"]


def arithmetic_item(rng: random.Random) -> dict:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return {"prompt": f"{name} has {a} {thing}. {name} gets {b} more {thing}. How many {thing} does {name} have now?",
            "answer": a + b, "family": "arithmetic"}


def format_item(word: str) -> dict:
    # The required format: the word in capital letters (the verifier looks for it in the reply).
    return {"prompt": f"Rewrite '{word}' in all caps. For example, 'cat' becomes 'CAT'. Answer with only the word.",
            "answer": word.upper(), "match": "contains", "family": "format"}


def make_tasks(d: dict) -> tuple[list[dict], list[dict]]:
    """Training and held-out prompts, disjoint (no prompt text in both; format words disjoint)."""
    rng = random.Random(d["seed"])
    seen: set[str] = set()

    def arith(n):
        out = []
        while len(out) < n:
            it = arithmetic_item(rng)
            if it["prompt"] not in seen:
                seen.add(it["prompt"])
                out.append(it)
        return out

    words = WORDS[:]
    rng.shuffle(words)
    nf_train, nf_held = d["train_format"], d["heldout_format"]
    if nf_train + nf_held > len(words):
        raise SystemExit(f"at most {len(words)} format prompts")
    train = arith(d["train_arith"]) + [format_item(w) for w in words[:nf_train]]
    held = arith(d["heldout_arith"]) + [format_item(w) for w in words[nf_train:nf_train + nf_held]]
    return train, held


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def load_config(path: str, sets: list[str]) -> dict:
    cfg = tomllib.loads(Path(path).read_text())
    for item in sets:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        try:
            node[leaf] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            node[leaf] = value
    return cfg


def stage_tables(cfg: dict, stage: str, overrides: dict | None = None) -> dict:
    """The [train]/[optim]/[lora]/[dpo] tables of one stage's run: the config's `[stage.*]` sections,
    the demo's seed and threads, then `overrides` ("section.key" → value, a [[dpo_extra]] `set`)."""
    d = cfg["demo"]
    tables = {k: dict(v) for k, v in cfg.get(stage, {}).items()}
    tables.setdefault("train", {}).update({"seed": d["seed"], "threads": d["threads"]})
    for k, v in (overrides or {}).items():
        sec, _, key = k.partition(".")
        if not key:
            raise SystemExit(f"{stage} override {k!r}: write it as section.key, e.g. dpo.beta")
        tables.setdefault(sec, {})[key] = v
    return tables


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "posttrain-demo.toml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. demo.k=8 or sft.train.steps=40")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.set)
    d = cfg["demo"]
    if d.setdefault("dpo_pairs", "sft") not in ("sft", "base"):
        raise SystemExit(f"demo.dpo_pairs must be \"sft\" or \"base\" (got {d['dpo_pairs']!r})")
    torch.set_num_threads(int(d["threads"]))
    torch.manual_seed(d["seed"])

    import herd
    from herd.eval.tasks import evaluate_items, load_task
    from herd.train.posttrain import (
        DPO,
        finetune,
        load_preferences,
        load_prompts,
        load_reward_model,
        pairwise_accuracy,
        preference_stats,
        ranked_loader,
        score_responses,
    )
    from herd.train.posttrain_cli import build_config
    from herd.train.rejection import preference_pairs, rejection_sample, verifier_scorer, write_best

    out = Path(d["out"])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stamps: dict[str, float] = {}

    def log(msg):
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    def stage_config(stage: str, run: str, **extra):
        shutil.rmtree(out / run, ignore_errors=True)  # a rerun of the demo starts its stages afresh
        return build_config(None, [], str(out / run), stage_tables(cfg, stage, extra))

    train_items, held_items = make_tasks(d)
    train_path = write_jsonl(out / "train_prompts.jsonl", train_items)
    held_path = write_jsonl(out / "heldout.jsonl", held_items)  # also a task file for `herd eval`
    held_task = load_task(held_path)
    gen = dict(max_new_tokens=d["max_new_tokens"])
    log(f"{len(train_items)} training prompts, {len(held_items)} held-out prompts")

    def by_family(result):
        fam = {}
        for item, ok in zip(held_items, result.correct_items, strict=True):
            fam.setdefault(item["family"], []).append(ok)
        return {f: sum(v) / len(v) for f, v in fam.items()}

    # 0. the base model, converted once from its GGUF file to an fp32 checkpoint that loads fast
    base_dir = out / "base"
    if not (base_dir / "params.json").exists():
        from herd.train.posttrain import export_model, load_trainable

        export_model(*load_trainable(d["model"]), base_dir)
    base, tok = herd.load(base_dir)
    base_eval = evaluate_items(base, tok, held_task, **gen)
    log(f"base model, held-out: {base_eval.line()}")
    stamps["base eval"] = time.time() - t0

    # 1. rejection sampling with the verifier
    verifier = verifier_scorer("answer")
    samp = dict(max_new_tokens=d["max_new_tokens"], temperature=d["temperature"], seed=d["seed"])
    def sample_prompts(model, seed: int):
        """K verifier-scored samples per training prompt and per held-out prompt (seeds seed, seed + 1)."""
        return tuple(rejection_sample(model, tok, load_prompts(path), d["k"], verifier, **{**samp, "seed": seed + i})
                     for i, path in enumerate((train_path, held_path)))

    train_samples, held_samples = sample_prompts(base, d["seed"])
    n_sft = write_best(train_samples, out / "sft.jsonl", min_score=1.0, keep_all=False)
    per = d.get("pairs_per_prompt", 1)
    train_rows = preference_pairs(train_samples, d["seed"], per)
    held_rows = preference_pairs(held_samples, d["seed"], per)
    n_train_pairs, n_held_pairs = len(train_rows), len(held_rows)
    if not (n_sft and n_train_pairs and n_held_pairs):
        raise SystemExit("too few correct samples to go on: raise demo.k, demo.max_new_tokens or the prompt counts")
    train_pairs = write_jsonl(out / "pairs_train.jsonl", train_rows)
    held_pairs = write_jsonl(out / "pairs_heldout.jsonl", held_rows)
    pass_at_k = sum(max(s.scores) for s in train_samples) / len(train_samples)
    log(f"rejection sampling: {d['k']} samples/prompt; {n_sft}/{len(train_samples)} training prompts have a correct "
        f"sample (pass@{d['k']} {pass_at_k:.2f}); {n_train_pairs} training pairs, {n_held_pairs} held-out pairs")
    stamps["sampling"] = time.time() - t0
    del base

    # 2. SFT on the rejection-sampled data
    sft_cfg, own = stage_config("sft", "sft")
    _, sft_dir = finetune("sft", sft_cfg, str(base_dir), str(out / "sft.jsonl"), lora=own["lora"], log=log, progress=False)
    sft_model, _ = herd.load(sft_dir)
    sft_eval = evaluate_items(sft_model, tok, held_task, **gen)
    log(f"after rejection-sampled SFT, held-out: {sft_eval.line()}")
    stamps["sft"] = time.time() - t0

    # 3. reward model on the training pairs (from the base model)
    rm_cfg, own = stage_config("reward", "reward")
    _, rm_dir = finetune("reward", rm_cfg, str(base_dir), str(train_pairs), lora=own["lora"], log=log, progress=False)
    rm, _ = load_reward_model(rm_dir)
    held_loader = ranked_loader(tok, load_preferences(held_pairs), batch_size=4, seq_len=512, shuffle=False)
    rm_acc = pairwise_accuracy(rm, held_loader)
    best_of_k, random_pick = [], []
    for s in held_samples:
        r = score_responses(rm, tok, s.prompt, s.samples)
        best_of_k.append(s.scores[max(range(len(r)), key=lambda i: r[i])])
        random_pick.append(sum(s.scores) / len(s.scores))  # the expected score of one random sample
    bok, rnd = sum(best_of_k) / len(best_of_k), sum(random_pick) / len(random_pick)
    log(f"reward model: held-out pairwise accuracy {rm_acc:.3f} on {n_held_pairs} pairs; best-of-{d['k']} "
        f"accuracy {bok:.3f} vs a random sample {rnd:.3f}")
    stamps["reward"] = time.time() - t0
    del rm

    # 4. DPO from the SFT model, with and without the NLL term: the paper's β and NLL coefficient
    # (configs' [dpo.dpo]), the same run with --dpo.nll=0 (same data, order, steps, seed and LoRA
    # init), then any [[dpo_extra]] variants (overrides of the same run, e.g. the NLL normalization).
    # §4.1: each round's preference data is sampled from the latest model, so with dpo_pairs = "sft"
    # the DPO pairs (training and held-out) are the SFT model's own samples, scored by the verifier;
    # "base" reuses the base model's pairs the reward model was trained on.
    if d["dpo_pairs"] == "sft":
        dtrain, dheld = sample_prompts(sft_model, d["seed"] + 2)
        dpo_train_rows, dpo_held_rows = preference_pairs(dtrain, d["seed"], per), preference_pairs(dheld, d["seed"], per)
        if not (dpo_train_rows and dpo_held_rows):
            raise SystemExit("the SFT model's samples give no preference pairs: raise demo.k or the prompt counts")
        dpo_train = write_jsonl(out / "pairs_dpo_train.jsonl", dpo_train_rows)
        dpo_held = write_jsonl(out / "pairs_dpo_heldout.jsonl", dpo_held_rows)
        log(f"DPO pairs sampled from the SFT model: {len(dpo_train_rows)} training, {len(dpo_held_rows)} held-out")
        stamps["dpo sampling"] = time.time() - t0
    else:
        dpo_train, dpo_held = train_pairs, held_pairs
    n_dpo_train, n_dpo_held = (len(p.read_text().splitlines()) for p in (dpo_train, dpo_held))
    # Measured on the held-out pairs and on the training pairs: the chosen log-prob's fall that the
    # NLL term is there to stop (Pang et al. 2024, Pal et al. 2024) is first a training-set effect.
    loaders, refs, before = {}, {}, {}
    for split, path in (("held-out", dpo_held), ("training", dpo_train)):
        loaders[split] = ranked_loader(tok, load_preferences(path), batch_size=4, seq_len=512, shuffle=False)
        refs[split] = DPO()
        refs[split].cache_reference(sft_model, loaders[split])
        before[split] = preference_stats(sft_model, loaders[split], refs[split])
    variants = [("paper", {}), ("nll0", {"dpo.nll": 0.0})]
    variants += [(x["name"], dict(x["set"])) for x in cfg.get("dpo_extra", [])]
    dpo_rows = []
    for name, overrides in variants:
        dcfg, own = stage_config("dpo", f"dpo-{name}", **overrides)
        _, dpo_dir = finetune("dpo", dcfg, str(sft_dir), str(dpo_train), lora=own["lora"], dpo=own["dpo"],
                              log=log, progress=False)
        pol, _ = herd.load(dpo_dir)
        st = {split: preference_stats(pol, loaders[split], refs[split]) for split in loaders}
        o = own["dpo"]
        label = f"DPO β={o.beta:g}, nll={o.nll:g}" + (f" ({o.nll_norm})" if o.nll else "")
        label += "".join(f", {k.split('.')[-1]}={v}" for k, v in overrides.items() if not k.startswith("dpo."))
        dpo_rows.append((label, st))
        log(f"{label}: held-out {st['held-out']}; training pairs {st['training']}")
        del pol
    stamps["dpo"] = time.time() - t0

    # the table
    fam_base, fam_sft = by_family(base_eval), by_family(sft_eval)
    lines = [
        "| stage | held-out measure | value |",
        "|---|---|---|",
        f"| base SmolLM2-135M-Instruct | accuracy, greedy ({base_eval.n} prompts) | {base_eval.accuracy:.3f} "
        f"[{base_eval.ci_low:.3f}, {base_eval.ci_high:.3f}] (arith {fam_base.get('arithmetic', 0):.2f}, "
        f"format {fam_base.get('format', 0):.2f}) |",
        f"| rejection-sampled SFT ({n_sft} samples, K={d['k']}) | accuracy, greedy | {sft_eval.accuracy:.3f} "
        f"[{sft_eval.ci_low:.3f}, {sft_eval.ci_high:.3f}] (arith {fam_sft.get('arithmetic', 0):.2f}, "
        f"format {fam_sft.get('format', 0):.2f}) |",
        f"| reward model ({n_train_pairs} training pairs) | pairwise accuracy ({n_held_pairs} held-out pairs; chance 0.5) "
        f"| {rm_acc:.3f} |",
        f"| best-of-{d['k']} by reward model | verifier accuracy | {bok:.3f} |",
        f"| one random sample of the {d['k']} | verifier accuracy (expected) | {rnd:.3f} |",
    ]
    n_steps = cfg.get("dpo", {}).get("train", {}).get("steps")
    dpo_lines = [
        f"| DPO ({n_steps} steps; reference = the SFT model; {n_dpo_train} training / {n_dpo_held} held-out pairs "
        f"from {d['dpo_pairs']} samples) | held-out margin | held-out chosen log-prob (Δ) | implicit-reward "
        "accuracy (held-out) | training margin | training chosen log-prob (Δ) |",
        "|---|---|---|---|---|---|",
        f"| SFT model (the reference) | {before['held-out']['margin']:.2f} | {before['held-out']['chosen_logp']:.2f} | "
        f"– | {before['training']['margin']:.2f} | {before['training']['chosen_logp']:.2f} |",
    ]
    for label, st in dpo_rows:
        h, t = st["held-out"], st["training"]
        dpo_lines.append(
            f"| {label} | {h['margin']:.2f} | {h['chosen_logp']:.2f} ({h['chosen_logp'] - before['held-out']['chosen_logp']:+.2f}) "
            f"| {h['reward_accuracy']:.3f} | {t['margin']:.2f} | {t['chosen_logp']:.2f} "
            f"({t['chosen_logp'] - before['training']['chosen_logp']:+.2f}) |")
    lines += [""] + dpo_lines
    table = "\n".join(lines)
    print("\n" + table + "\n")
    print(f"total {time.time() - t0:.0f} s; stages ended at " + ", ".join(f"{k} {v:.0f}s" for k, v in stamps.items()))
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({
        "base": base_eval.accuracy, "sft": sft_eval.accuracy, "reward_pairwise_accuracy": rm_acc,
        "best_of_k": bok, "random_sample": rnd, "dpo_reference": before,
        "dpo": dict(dpo_rows), "seconds": time.time() - t0}, indent=1))


if __name__ == "__main__":
    main()
