"""Edges of the pre-training loop a torchtitan user reaches for: schedules checked against torch's
own LR schedulers, configs that would silently train another run than the one written (refused in
one line, or said when a quick run shortens a config), a step with no loss terms, gradient accumulation through the whole loop, and the CPU
short-attention path inside real training against torch's scaled_dot_product_attention."""

from __future__ import annotations

import copy
import json
from unittest import mock

import pytest
import torch

from herd.data.shards import PackedBatch
from herd.errors import HerdError
from herd.models import short_attention
from herd.models.args import get_preset
from herd.models.llama3 import Transformer
from herd.train.cli import main
from herd.train.config import ScheduleConfig, load_config
from herd.train.loop import Trainer, accumulate_gradients
from herd.train.objectives import NextTokenLM
from herd.train.schedule import lr_at

from .conftest import debug_overrides


# ---- schedules (SPEC §3.4) against torch.optim.lr_scheduler ----------------------------------------
@pytest.mark.parametrize("warmup, total, min_lr", [(5, 20, 0.1), (1, 7, 0.0), (4, 4, 0.2)])
def test_warmup_cosine_matches_torch_schedulers(warmup, total, min_lr):
    """Linear warm-up from peak/warmup (step 0) to the peak (step warmup-1), then cosine to min_lr:
    torch's LinearLR followed by CosineAnnealingLR, at every step including the boundaries."""
    peak = 2.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0,
                                             total_iters=max(warmup - 1, 1))
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total - warmup, 1), eta_min=min_lr)
    ref = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[warmup])
    sched = ScheduleConfig("cosine", warmup_steps=warmup, min_lr=min_lr)
    for step in range(total + 1):
        assert lr_at(step, peak, sched, total) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), step
        opt.step()
        ref.step()


# ---- configs that would train another schedule than the one written --------------------------------
@pytest.mark.parametrize("overrides, fragment", [
    (["train.steps=3", "schedule.warmup_steps=5"], "schedule.warmup_steps=5 exceeds train.steps=3"),
    (["train.steps=3", "schedule.warmup_steps=2", "schedule.decay_steps=1"],
     "schedule.warmup_steps=2 exceeds schedule.decay_steps=1"),
])
def test_a_warmup_longer_than_the_schedule_is_said(shards, tmp_path, overrides, fragment):
    """Not refused — `--train.steps=N` shortens any config for a quick run (tiny.toml warms up over
    30 steps) — but said once, at the start, in the run's log."""
    lines = []
    Trainer(load_config(overrides=debug_overrides(shards, tmp_path / "run") + overrides), progress=False,
            log=lines.append).run()
    assert sum(fragment in line and line.startswith("warning: ") for line in lines) == 1, lines


@pytest.mark.parametrize("overrides, fragment", [
    (["optim.lr=0"], "optim.lr must be a finite number > 0"),
    (["model.n_kv_heads=0"], "model.n_kv_heads must be > 0"),
])
def test_silently_wrong_values_are_one_line_exit_2(shards, tmp_path, capsys, overrides, fragment):
    with pytest.raises(HerdError, match=fragment.replace(".", r"\.")):
        load_config(overrides=debug_overrides(shards, tmp_path / "x") + overrides)
    run = tmp_path / "run"
    code = main(["pretrain", "--no-progress", *[f"--{o}" for o in debug_overrides(shards, run) + overrides]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("herd: error: ") and fragment in err[0], err
    assert not run.exists()  # refused before anything was written


def test_a_short_run_of_a_longer_schedule_is_allowed(shards, tmp_path):
    """Stopping early to resume later sets decay_steps to the full run: the warm-up may be longer
    than this run's train.steps, and the schedule is the full run's."""
    cfg = load_config(overrides=debug_overrides(shards, tmp_path / "x", **{
        "train.steps": 2, "schedule.warmup_steps": 3, "schedule.decay_steps": 10}))
    assert lr_at(1, cfg.optim.lr, cfg.schedule, cfg.train.steps) == pytest.approx(cfg.optim.lr * 2 / 3)


def test_a_recipe_stage_with_a_non_table_section_is_one_line(shards, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\npreset = "debug"\nvocab_size = 258\n[data]\npath = "{shards}"\n'
                      '[train]\nsteps = 2\nbatch_size = 2\nseq_len = 16\n'
                      '[[stages]]\nname = "a"\ntrain = 3\n')
    code = main(["pretrain", "--no-progress", "--config", str(recipe), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "stage 1 (a): train = 3 is not a config section" in err[0], err


# ---- a step with nothing to learn from ---------------------------------------------------------------
class _CorruptSecond:
    """The run's loader, except that its 2nd batch has every token in its own document (no target)."""

    def __init__(self, loader):
        self.loader, self.calls = loader, 0

    def __next__(self):
        b = next(self.loader)
        self.calls += 1
        if self.calls == 2:
            b = PackedBatch(b.tokens, torch.arange(b.tokens.numel()).view_as(b.tokens))
        return b

    def __getattr__(self, name):
        return getattr(self.loader, name)


def test_a_step_without_loss_terms_changes_no_weight(shards, tmp_path):
    """A zero gradient still moves AdamW's weights (momentum, weight decay): such a step is skipped
    and logged, so the run after it holds the weights of the run that stopped before it."""
    over = {"schedule.name": '"constant"', "schedule.warmup_steps": 0, "optim.weight_decay": 0.1}
    ref = Trainer(load_config(overrides=debug_overrides(shards, tmp_path / "ref", **over, **{"train.steps": 1})),
                  progress=False, log=lambda m: None)
    ref.run()
    logged = []
    tr = Trainer(load_config(overrides=debug_overrides(shards, tmp_path / "run", **over, **{"train.steps": 2})),
                 progress=False, log=logged.append)
    tr.train_data = _CorruptSecond(tr.train_data)
    rows = tr.run()
    assert [r.get("skipped", False) for r in rows] == [False, True]
    for (name, a), b in zip(ref.model.state_dict().items(), tr.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert all(s["step"] == 1 for s in tr.optimizer.state.values())
    assert any("step 2: no loss terms" in m for m in logged), logged
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    assert line["skipped"] is True and line["loss"] is None  # not a loss of 0.0


# ---- gradient accumulation through the whole loop -----------------------------------------------------
def test_micro_batch_splits_give_the_same_run(shards, tmp_path):
    """B rows in one micro-batch, B/2 in two, B/4 in four: the same data (the stream is consumed in
    the same order), token-weighted loss and, to fp32 rounding, the same weights after AdamW."""
    def run(name, batch, accum):
        cfg = load_config(overrides=debug_overrides(shards, tmp_path / name, **{
            "train.steps": 3, "train.batch_size": batch, "train.grad_accum": accum,
            "optim.implementation": '"for-loop"'}))
        t = Trainer(cfg, progress=False, log=lambda m: None)
        return t, t.run()

    one, rows = run("1", 4, 1)
    for batch, accum in ((2, 2), (1, 4)):
        other, other_rows = run(f"{accum}", batch, accum)
        assert [r["tokens"] for r in other_rows] == [r["tokens"] for r in rows]
        for a, b in zip(rows, other_rows, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        for (name, p), q in zip(one.model.named_parameters(), other.model.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=2e-5, msg=name)


# ---- the CPU short-attention path inside training (herd/models/short_attention.py) -------------------
def _packed(T: int, g: torch.Generator) -> PackedBatch:
    """Two rows of random documents, some of length 1, one spanning the row boundary."""
    n = 2 * (T + 1)
    lens = []
    while sum(lens) < n:
        lens.append(1 if torch.rand((), generator=g) < 0.2 else int(torch.randint(2, 60, (), generator=g)))
    ids = torch.cat([torch.full((k,), i) for i, k in enumerate(lens)])[:n].view(2, T + 1)
    return PackedBatch(torch.randint(0, 64, (2, T + 1), generator=g), ids)


@pytest.mark.parametrize("T, heads, kv_heads, head_dim", [
    (511, 4, 4, 6), (512, 4, 2, 10), (513, 4, 1, 8), (512, 4, 1, 18)])
@pytest.mark.parametrize("masking", [True, False])
def test_short_attention_trains_like_sdpa(T, heads, kv_heads, head_dim, masking):
    args = get_preset("debug").replace(vocab_size=64, dim=32, n_layers=1, n_heads=heads, n_kv_heads=kv_heads,
                                       head_dim=head_dim, max_seq_len=1024)
    model = Transformer(args)
    model.init_weights(generator=torch.Generator().manual_seed(T))
    ref = copy.deepcopy(model)
    batch = _packed(T, torch.Generator().manual_seed(T + head_dim))
    obj = NextTokenLM(document_masking=masking)
    loss, _ = accumulate_gradients(model, obj, [batch])
    with mock.patch.object(short_attention, "applies", lambda q, k: False):  # torch's SDPA everywhere
        want, _ = accumulate_gradients(ref, obj, [batch])
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
