"""Invariants of the pre-training loop on settings the other tests leave out, each against a
reference herd did not write: a plain-torch training loop (one forward over all rows of a step, mean
cross-entropy, torch.nn.utils.clip_grad_norm_, torch.optim.AdamW), transformers' LR schedulers, and
an fp64 mean of checkpoints for Polyak averaging. Also exact resume around a batch-size/sequence-length
change (in-process at every step around it, and after a real SIGKILL), document masking at sequence
lengths that are no multiple of 64 with documents split across rows, and the CLI's overrides."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from herd.checkpoint import read_checkpoint
from herd.data.shards import PackedLoader
from herd.errors import HerdError
from herd.models.args import get_preset
from herd.models.llama3 import Transformer
from herd.train import checkpoint as ckpt
from herd.train.cli import main
from herd.train.config import ScheduleConfig, load_config
from herd.train.loop import Trainer
from herd.train.objectives import NextTokenLM, document_mask, document_positions
from herd.train.recipe import load_recipe, run_recipe
from herd.train.schedule import lr_at

from .conftest import debug_overrides
from .test_recipe import _KILLER
from .test_resume import _losses, _weights

ROOT = Path(__file__).resolve().parents[2]
TINY = {"model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "data.val_batches": 1,
        "optim.implementation": '"for-loop"'}


def _cfg(shards, out, **kw):
    return load_config(overrides=debug_overrides(shards, out, **{**TINY, **kw}))


def _quiet(cfg, **kw):
    return Trainer(cfg, progress=False, log=lambda m: None, **kw)


# ---- accumulation, clipping, the logged norm: against a loop in plain torch --------------------------
def _plain_torch_run(cfg, shards, init, steps):
    """The same run written directly in torch: per step ONE forward over all grad_accum·B rows, the
    mean cross-entropy over every non-ignored target of the step (transformers' num_items_in_batch
    normalization), clip_grad_norm_, AdamW with decay on matrices only. LR: linear warm-up
    (peak·(s+1)/W, torch's LinearLR(start_factor=1/W)) then cosine over the remaining steps."""
    model = Transformer(cfg.model.args())
    model.load_state_dict(init)
    o = cfg.optim
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=False)
    t, W = cfg.train, cfg.schedule.warmup_steps
    loader = PackedLoader(shards, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed, vocab_size=258)
    out, terms = [], []
    for s in range(steps):
        factor = (s + 1) / W if s < W else 0.5 * (1 + math.cos(math.pi * (s - W) / (steps - W)))
        for g in opt.param_groups:
            g["lr"] = o.lr * factor
        micro = [next(loader) for _ in range(t.grad_accum)]
        terms.append([int((b.doc_ids[:, 1:] == b.doc_ids[:, :-1]).sum()) for b in micro])
        tokens, ids = torch.cat([b.tokens for b in micro]), torch.cat([b.doc_ids for b in micro])
        targets = tokens[:, 1:].clone()
        targets[ids[:, 1:] != ids[:, :-1]] = -100
        logits = model(tokens[:, :-1], positions=document_positions(ids[:, :-1]), mask=document_mask(ids[:, :-1]))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        out.append((loss.item(), norm.item()))
    return model, out, terms


@pytest.mark.parametrize("batch, accum, seq_len, clip", [(2, 3, 50, 0.05), (1, 4, 37, 1e9)])
def test_the_loop_is_a_plain_torch_loop(shards, tmp_path, batch, accum, seq_len, clip):
    """grad_accum micro-batches of B rows = one batch of grad_accum·B rows, also when the micro-batches
    hold different numbers of targets (loss per token of the whole step); the clip is clip_grad_norm_'s
    and the logged grad_norm is the norm before clipping."""
    steps = 4
    cfg = _cfg(shards, tmp_path / "run", **{"train.batch_size": batch, "train.grad_accum": accum,
                                            "train.seq_len": seq_len, "train.steps": steps, "optim.grad_clip": clip})
    trainer = _quiet(cfg)
    init = copy.deepcopy(trainer.model.state_dict())
    rows = trainer.run()
    model, ref, terms = _plain_torch_run(cfg, shards, init, steps)
    assert any(len(set(t)) > 1 for t in terms), "micro-batches should differ in their numbers of targets"
    if clip < 1:
        assert all(n > clip for _, n in ref), "the clip should act on every step"
    for row, (loss, norm) in zip(rows, ref, strict=True):
        assert row["loss"] == pytest.approx(loss, rel=0, abs=2e-6)
        assert row["grad_norm"] == pytest.approx(norm, rel=1e-6)
    for (name, p), q in zip(trainer.model.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)


# ---- LR schedules: against transformers ---------------------------------------------------------------
def _hf_lrs(make, total, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = make(opt, **kw)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("total", [1, 2, 3, 7])
@pytest.mark.parametrize("warmup", [0, 1, 2, "total-1", "total"])
@pytest.mark.parametrize("name, min_lr", [("cosine", 0.0), ("cosine", 0.5), ("linear", 0.0)])
def test_schedules_match_transformers(total, warmup, name, min_lr):
    """After the warm-up, herd's step s is transformers' step s (cosine to min_lr, linear to 0 at step
    `total`, one past the last step, as get_linear_schedule_with_warmup). During the warm-up herd is one
    step ahead (peak·(s+1)/W, never a step at LR 0; torch's LinearLR(start_factor=1/W))."""
    transformers = pytest.importorskip("transformers")
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    W = {"total-1": total - 1, "total": total}.get(warmup, warmup)
    if W < 0 or W > total:
        pytest.skip("not a distinct case")
    kw = {"num_warmup_steps": W, "num_training_steps": total}
    if name == "linear":
        ref = _hf_lrs(transformers.get_linear_schedule_with_warmup, total, **kw)
    elif min_lr:
        ref = _hf_lrs(get_cosine_with_min_lr_schedule_with_warmup, total, min_lr=min_lr, **kw)
    else:
        ref = _hf_lrs(transformers.get_cosine_schedule_with_warmup, total, **kw)
    sched = ScheduleConfig(name, warmup_steps=W, min_lr=min_lr)
    for s in range(total):
        want = 2.0 * (s + 1) / W if s < W else ref[s]
        if s + 1 < W:  # the warm-up: transformers' next step
            assert ref[s + 1] == pytest.approx(want, rel=1e-12)
        assert lr_at(s, 2.0, sched, total) == pytest.approx(want, rel=1e-12, abs=1e-15), s


@pytest.mark.parametrize("warmup, stable, decay", [(2, 3, 4), (0, 1, 1), (1, 0, 3), (3, 5, 7)])
def test_a_constant_stage_then_a_linear_anneal_stage_is_transformers_wsd(warmup, stable, decay):
    """Warm-up-stable-decay as two recipe stages (constant, then linear from a fresh step 0):
    transformers' get_wsd_schedule(decay_type="linear") step for step, but for the warm-up, which
    is herd's one step ahead (so the stable phase holds the peak one step longer)."""
    transformers = pytest.importorskip("transformers")
    ref = _hf_lrs(transformers.get_wsd_schedule, warmup + stable + decay, num_warmup_steps=warmup,
                  num_stable_steps=stable, num_decay_steps=decay, decay_type="linear")
    first = [lr_at(s, 2.0, ScheduleConfig("constant", warmup_steps=warmup), warmup + stable)
             for s in range(warmup + stable)]
    anneal = [lr_at(s, 2.0, ScheduleConfig("linear"), decay) for s in range(decay)]
    want = [2.0 * (s + 1) / warmup for s in range(warmup)] + ref[warmup:]
    assert first + anneal == pytest.approx(want, rel=1e-12)


# ---- batch-size / sequence-length schedule: resume at and around each change -------------------------
SHAPES = {"train.batch_size": 2, "train.grad_accum": 2, "train.seq_len": 40, "train.steps": 8,
          "train.batch_schedule": "[[3, 3, 48], [5, 1, 24]]", "checkpoint.every": 1, "train.eval_every": 3}


def _rows(run):
    skip = ("tokens_per_s", "mfu")
    return [{k: v for k, v in json.loads(line).items() if k not in skip}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_around_batch_schedule_changes_is_bitwise(shards, tmp_path):
    full = tmp_path / "full"
    _quiet(_cfg(shards, full, **SHAPES)).run()
    rows = _rows(full)
    # step 4 is the first of 3 × 48, step 6 the first of 1 × 24 (two micro-batches each)
    assert [r["tokens"] for r in rows] == [160, 320, 480, 768, 1056, 1104, 1152, 1200]
    for k in (2, 3, 4, 5, 6):  # checkpoints just before, at and after each change
        run = tmp_path / f"from-{k}"
        shutil.copytree(full, run)
        for p in ckpt.list_checkpoints(run):
            if int(p.name[5:]) > k:
                shutil.rmtree(p)
        trainer = _quiet(_cfg(shards, run, **SHAPES), resume=True)
        assert trainer.step == k
        trainer.run()
        assert _rows(run) == rows, k
        a, b = _weights(full), _weights(run)
        assert all(torch.equal(a[n], b[n]) for n in a), k


@pytest.mark.parametrize("kill_in_step", [4, 6])
def test_sigkill_at_a_batch_schedule_change_then_resume_is_bitwise(shards, tmp_path, kill_in_step):
    """A real SIGKILL inside the first step at the new shape (checkpoint.every = 1: the resume starts
    exactly at the change)."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    _quiet(_cfg(shards, full, **SHAPES)).run()
    args = ["pretrain", "--no-progress", *[f"--{o}" for o in debug_overrides(shards, killed, **{**TINY, **SHAPES})]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _KILLER, "step", str(kill_in_step), *args], env=env, cwd=ROOT,
                       capture_output=True, timeout=300)
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    assert ckpt.latest_checkpoint(killed).name == ckpt.checkpoint_name(kill_in_step - 1)
    assert main(["pretrain", "--no-progress", "--resume", str(killed)]) == 0  # its saved config.json
    assert _losses(killed) == _losses(full)
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# ---- document masking: odd sequence lengths, documents longer than a row -----------------------------
@torch.no_grad()
@pytest.mark.parametrize("seq_len", [50, 65, 130])
def test_masked_loss_equals_segments_run_alone_at_odd_lengths(shards, seq_len):
    """A document longer than seq_len is split across rows; each row's piece is its own document
    (positions from 0, no attention to the previous row). The packed loss is the token-weighted
    loss of every piece run alone."""
    args = get_preset("debug").replace(vocab_size=258, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    model = Transformer(args)
    model.init_weights(generator=torch.Generator().manual_seed(seq_len))
    model.eval()
    obj = NextTokenLM()
    loader = PackedLoader(shards, batch_size=3, seq_len=seq_len, seed=2, vocab_size=258)
    whole_rows = 0
    for i in range(6):
        batch = loader.batch(i)
        whole_rows += sum(len(r.unique()) == 1 for r in batch.doc_ids)
        total, count = 0.0, 0
        for row, ids in zip(batch.tokens, batch.doc_ids, strict=True):
            for d in ids.unique():
                seg = row[ids == d]
                if len(seg) > 1:
                    total += float(F.cross_entropy(model(seg[None, :-1])[0], seg[1:], reduction="sum"))
                    count += len(seg) - 1
        assert count == obj.num_terms(batch)
        assert float(obj.loss_sum(model, batch)) / count == pytest.approx(total / count, abs=5e-6)
    assert whole_rows > 0, "some row should be the inside of one long document"


# ---- recipes: annealing to zero, Polyak average, decay horizon ---------------------------------------
RECIPE = """
[model]
preset = "debug"
vocab_size = 258
dim = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
[data]
path = "{shards}"
val_batches = 1
[optim]
lr = 3e-3
[schedule]
warmup_steps = 2
min_lr = 3e-4
decay_steps = {decay}
[train]
steps = 6
batch_size = 2
seq_len = 24
eval_every = 0
threads = 1
out_dir = "{out}"
[checkpoint]
every = 3
keep = 0
[[stages]]
name = "pretrain"
[[stages]]
name = "anneal"
average = true
model.max_seq_len = 512
model.rope_theta = 100000.0
train.seq_len = 70
train.steps = 4
schedule.name = "linear"
schedule.warmup_steps = 0
checkpoint.every = 1
{extra}
"""


def _recipe(tmp_path, shards, decay=0, extra=""):
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE.format(shards=shards, out=tmp_path / "run", decay=decay, extra=extra))
    return path


def test_anneal_goes_linearly_to_zero_and_the_average_is_the_mean(shards, tmp_path):
    final = run_recipe(load_recipe(_recipe(tmp_path, shards, decay=6, extra="schedule.decay_steps = 0")),
                       log=lambda m: None, progress=False)
    anneal = tmp_path / "run" / "2-anneal"
    lrs = [json.loads(line)["lr"] for line in (anneal / "metrics.jsonl").read_text().splitlines()]
    # peak · (1 - s/4): the line through 0 at step 4, one past the last (transformers' convention)
    assert lrs == pytest.approx([3e-3, 2.25e-3, 1.5e-3, 0.75e-3], rel=1e-12)
    parts = [read_checkpoint(anneal / ckpt.checkpoint_name(s) / "model").state_dict for s in (1, 2, 3, 4)]
    avg = read_checkpoint(final).state_dict
    assert avg.keys() == parts[0].keys()
    for k in avg:  # the exact mean, rounded once to fp32
        assert torch.equal(avg[k], torch.stack([p[k].double() for p in parts]).mean(0).float()), k
    # `herd average` of three of them (1/3 is no power of two)
    three = [str(anneal / ckpt.checkpoint_name(s)) for s in (1, 2, 4)]
    assert main(["average", *three, "--out", str(tmp_path / "avg3")]) == 0
    avg = read_checkpoint(tmp_path / "avg3").state_dict
    for k in avg:
        assert torch.equal(avg[k], torch.stack([parts[i][k].double() for i in (0, 1, 3)]).mean(0).float()), k


def test_average_is_the_mean_rounded_once():
    """Each term scaled by 1/3 before the sum moved exact ties between two fp32 values to one side:
    ~0.16% of the weights of a 3-checkpoint average were 1 ulp off the mean."""
    from herd.train.average import average_state_dicts

    g = torch.Generator().manual_seed(0)
    for n in (3, 5, 7):
        sds = [{"w": torch.randn(200_000, generator=g)} for _ in range(n)]
        want = torch.stack([sd["w"].double() for sd in sds]).mean(0).float()
        assert torch.equal(average_state_dicts(sds)["w"], want), n
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    got = average_state_dicts([{"w": a}, {"w": b}], [1.0, 2.0])["w"]
    assert torch.equal(got, ((a.double() + 2 * b.double()) / 3).float())


def test_a_stage_inheriting_the_base_decay_horizon_is_refused(shards, tmp_path, capsys):
    """The base's decay_steps (6) is merged into a 4-step annealing stage: its LR would end at 50% of
    the peak, and its checkpoints would be averaged as if annealed. Refused before stage 1 runs."""
    path = _recipe(tmp_path, shards, decay=6)
    with pytest.raises(HerdError, match=r"stage 2 \(anneal\): schedule\.decay_steps = 6 comes from the base "
                                        r"config, but the stage runs train\.steps = 4: its linear schedule "
                                        r"would end at 50% of optim\.lr"):
        load_recipe(path)
    assert main(["pretrain", "--no-progress", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set schedule.decay_steps in the stage (0 = its train.steps)" in err[0], err
    assert not (tmp_path / "run" / "1-pretrain").exists()
    load_recipe(path, ["--schedule.decay_steps=0"])  # said for every stage: taken as meant
    load_recipe(_recipe(tmp_path, shards, decay=6, extra="schedule.decay_steps = 4"))
    load_recipe(_recipe(tmp_path, shards, decay=0))


# ---- CLI overrides -----------------------------------------------------------------------------------
def test_short_runs_still_write_their_final_checkpoint(shards, tmp_path, capsys):
    """--train.steps below the warm-up (said once) and --checkpoint.every beyond train.steps: the run
    still ends with its checkpoint."""
    run = tmp_path / "run"
    over = debug_overrides(shards, run, **{**TINY, "train.steps": 2, "schedule.warmup_steps": 5,
                                           "checkpoint.every": 100})
    assert main(["pretrain", "--no-progress", *[f"--{o}" for o in over]]) == 0
    assert "schedule.warmup_steps=5 exceeds train.steps=2" in capsys.readouterr().err
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt-00000002"]
    assert [r["lr"] for r in _rows(run)] == pytest.approx([3e-3 / 5, 3e-3 * 2 / 5])


@pytest.mark.parametrize("override, fragment", [
    ("--optim.betas=[0.9]", "optim.betas: expected a list of 2 values"),
    ("--train.batch_schedule=[[1, 2]]", "train.batch_schedule: expected a list of 3 values"),
    ("--train.batch_schedule=[[1, 2, 3.5]]", "train.batch_schedule: expected int, got 3.5"),
    ("--train.batch_schedule={a=1}", "train.batch_schedule: expected a list"),
    ("--model.rope_theta=[1]", "model.rope_theta"),
    ("--checkpoint.every=true", "checkpoint.every: expected int, got True"),
    ("--parallel.tp=x", "parallel.tp: expected int"),
])
def test_wrong_types_in_nested_keys_are_one_line_exit_2(shards, tmp_path, capsys, override, fragment):
    run = tmp_path / "run"
    code = main(["pretrain", "--no-progress", *[f"--{o}" for o in debug_overrides(shards, run, **TINY)], override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("herd: error: ") and fragment in err[0], err
    assert not run.exists()


def test_text_fields_take_number_like_overrides_as_text(shards, tmp_path, monkeypatch):
    """`--train.out_dir=2024` was read as TOML, an int, and refused by the str field (and a float such
    as 1e3 cannot be turned back into the text typed)."""
    cfg = load_config(overrides=["--train.out_dir=2024", "--data.path=1e3", "--data.source=true",
                                 '--data.tokenizer="bytes"', "--train.steps=5"])
    assert (cfg.train.out_dir, cfg.data.path, cfg.data.source, cfg.data.tokenizer) == ("2024", "1e3", "true", "bytes")
    assert cfg.train.steps == 5
    with pytest.raises(HerdError, match="train.steps: expected int, got '5x'"):
        load_config(overrides=["--train.steps=5x"])
    run = tmp_path / "123"
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--no-progress", *[f"--{o}" for o in debug_overrides(shards, run, **TINY)],
                 "--train.steps=1", "--train.out_dir=123"]) == 0
    assert ckpt.latest_checkpoint(run) is not None


def test_a_stage_inheriting_the_base_batch_schedule_is_refused(shards, tmp_path):
    """The base's batch_schedule counts from each stage's step 0: a stage that sets its own seq_len
    (70) went back to the base's 2 × 32 at its step 2. Refused; `train.batch_schedule = []` in the
    stage (or entries of its own) is accepted, and the stage then keeps its shape."""
    base = 'batch_schedule = [[2, 2, 32]]\n'
    text = _recipe(tmp_path, shards).read_text().replace("seq_len = 24\n", "seq_len = 24\n" + base, 1)
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    with pytest.raises(HerdError, match=r"stage 2 \(anneal\): train\.batch_schedule comes from the base config, "
                                        r"but the stage sets its own train\.seq_len: from its step 2 it would "
                                        r"train at 2 × 32 instead of 2 × 70"):
        load_recipe(path)
    load_recipe(path, ["--train.batch_schedule=[]"])
    path.write_text(text + "train.batch_schedule = []\n")
    run_recipe(load_recipe(path), log=lambda m: None, progress=False)
    tokens = [r["tokens"] for r in _rows(tmp_path / "run" / "2-anneal")]
    assert tokens == [140, 280, 420, 560]  # 2 × 70 every step
    assert [r["tokens"] for r in _rows(tmp_path / "run" / "1-pretrain")][:3] == [48, 96, 160]  # base: 2 × 32 from step 3


def test_a_batch_schedule_shape_too_large_for_the_data_is_refused_before_step_1(shards, tmp_path, capsys):
    """It failed when its step came (here after two steps and two checkpoints; at step 60 of the
    405B recipe), not when the run started."""
    run = tmp_path / "run"
    over = debug_overrides(shards, run, **{**TINY, "train.steps": 4, "checkpoint.every": 1,
                                           "train.batch_schedule": "[[2, 5000, 200]]"})
    assert main(["pretrain", "--no-progress", *[f"--{o}" for o in over]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.batch_schedule [2, 5000, 200]: " in err[0] and "fewer than one batch" in err[0]
    assert not ckpt.list_checkpoints(run)


def test_sigkill_inside_the_anneal_stage_after_its_checkpoints_resumes_bitwise(shards, tmp_path):
    """Killed in the anneal stage's 3rd step (its checkpoints 1 and 2 written): the resumed recipe
    continues from ckpt-2 and ends with the uninterrupted run's metrics and Polyak average."""
    full, part = tmp_path / "full", tmp_path / "part"
    full.mkdir()
    part.mkdir()
    extra = "schedule.decay_steps = 0\ntrain.grad_accum = 2"
    run_recipe(load_recipe(_recipe(full, shards, decay=6, extra=extra)), log=lambda m: None, progress=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _KILLER, "step", str(6 + 3), "pretrain", "--no-progress", "--config",
                        str(_recipe(part, shards, decay=6, extra=extra))], env=env, cwd=ROOT, capture_output=True,
                       timeout=300)
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    anneal = part / "run" / "2-anneal"
    assert ckpt.latest_checkpoint(anneal).name == ckpt.checkpoint_name(2)
    assert main(["pretrain", "--no-progress", "--resume", str(part / "run")]) == 0
    for stage in ("1-pretrain", "2-anneal"):
        assert _losses(part / "run" / stage) == _losses(full / "run" / stage), stage
    a = read_checkpoint(full / "run" / "2-anneal" / "averaged").state_dict
    b = read_checkpoint(anneal / "averaged").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
