"""The training loop: it learns, skips non-finite steps, writes metrics, keeps the newest
checkpoints, never loads a half-written one, and averages checkpoints (SPEC §3.4.3)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from herd.checkpoint import read_checkpoint
from herd.errors import HerdError
from herd.train import checkpoint as ckpt
from herd.train.average import average_checkpoints
from herd.train.config import load_config
from herd.train.loop import Trainer, pretrain
from herd.train.objectives import NextTokenLM

from .conftest import debug_overrides


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_loss_well_below_unigram_entropy(shards, tmp_path):
    tokens = np.fromfile(shards / "train-00000.bin", dtype=np.uint32)
    p = np.bincount(tokens)
    p = p[p > 0] / p.sum()
    unigram = float(-(p * np.log(p)).sum())  # nats/token; ≈ 3.2 for byte-level Python source
    cfg = load_config(overrides=debug_overrides(
        shards, tmp_path / "run", **{"train.steps": 300, "train.batch_size": 16, "train.seq_len": 64,
                                     "optim.lr": 5e-3, "schedule.warmup_steps": 10, "schedule.min_lr": 3e-4,
                                     "data.val_batches": 16, "train.eval_every": 150}))
    pretrain(cfg, progress=False, log=lambda m: None)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 301))
    assert {"step", "tokens", "loss", "lr", "tokens_per_s", "grad_norm", "mfu"} <= set(rows[0])
    assert [r["step"] for r in rows if "val_loss" in r] == [150, 300]
    val = rows[-1]["val_loss"]
    assert val < unigram - 0.4, (val, unigram)
    assert rows[0]["loss"] > unigram + 1.5  # starts near ln(258) ≈ 5.55
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "ckpt-00000300"


class _NaNOnCall(NextTokenLM):
    def __init__(self, bad_call):
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def loss_sum(self, model, batch):
        self.calls += 1
        loss = super().loss_sum(model, batch)
        return loss * float("nan") if self.calls == self.bad_call else loss


def test_nan_loss_skips_the_step(shards, tmp_path):
    cfg = load_config(overrides=debug_overrides(shards, tmp_path / "run", **{"train.steps": 3}))
    logged = []
    trainer = Trainer(cfg, objective=_NaNOnCall(bad_call=2), log=logged.append, progress=False)
    rows = trainer.run()
    assert [r.get("skipped", False) for r in rows] == [False, True, False]
    assert np.isnan(rows[1]["loss"]) and np.isfinite(rows[2]["loss"])
    assert any("step 2: non-finite" in m for m in logged)
    assert trainer.optimizer.state  # steps 1 and 3 updated


def test_nan_step_leaves_weights_untouched(shards, tmp_path):
    from herd.train.loop import train_step

    cfg = load_config(overrides=debug_overrides(shards, tmp_path / "run", **{"train.steps": 1}))
    trainer = Trainer(cfg, progress=False, log=lambda m: None)
    w0 = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = train_step(trainer.model, _NaNOnCall(bad_call=1), [trainer.train_data.batch(0)], trainer.optimizer, 1.0)
    assert result.skipped
    assert all(torch.equal(w0[k], v) for k, v in trainer.model.state_dict().items())
    assert not trainer.optimizer.state and all(p.grad is None for p in trainer.model.parameters())


def test_keep_last_n_half_written_checkpoints_and_averaging(shards, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(overrides=debug_overrides(shards, run, **{"train.steps": 6, "checkpoint.every": 2,
                                                                 "checkpoint.keep": 2}))
    pretrain(cfg, progress=False, log=lambda m: None)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt-00000004", "ckpt-00000006"]

    # A kill mid-write leaves a hidden temporary directory; a copy that lost its complete.json
    # (e.g. written by a tool without our rename) must not count either.
    (run / ".ckpt-00000008.tmp-999" / "model").mkdir(parents=True)
    (run / ".ckpt-00000008.tmp-999" / "train_state.pt").write_bytes(b"\x00" * 10)
    shutil.copytree(run / "ckpt-00000006", run / "ckpt-00000010")
    (run / "ckpt-00000010" / "complete.json").unlink()
    (run / "ckpt-00000010" / "train_state.pt").write_bytes(b"garbage")
    assert ckpt.latest_checkpoint(run).name == "ckpt-00000006"
    with pytest.raises(HerdError, match="incomplete checkpoint"):
        ckpt.load_train_state(run / "ckpt-00000010")
    cfg.train.steps = 7
    trainer = Trainer(cfg, resume=True, progress=False, log=lambda m: None)
    assert trainer.step == 6
    assert not (run / ".ckpt-00000008.tmp-999").exists()  # the interrupted write was cleaned up
    with pytest.raises(HerdError, match="already holds checkpoints"):
        Trainer(cfg, progress=False, log=lambda m: None)

    a, b = (read_checkpoint(run / f"ckpt-0000000{i}" / "model") for i in (4, 6))
    out = average_checkpoints([run / "ckpt-00000004", run / "ckpt-00000006"], tmp_path / "avg")
    avg = read_checkpoint(out)
    for k, v in avg.state_dict.items():
        torch.testing.assert_close(v, (a.state_dict[k] + b.state_dict[k]) / 2, rtol=0, atol=1e-7)
    weighted = read_checkpoint(average_checkpoints([run / "ckpt-00000004", run / "ckpt-00000006"],
                                                   tmp_path / "w", weights=[1.0, 3.0]))
    for k, v in weighted.state_dict.items():
        want = (a.state_dict[k].double() + 3 * b.state_dict[k].double()) / 4  # averaged in float64
        torch.testing.assert_close(v, want.float(), rtol=0, atol=1e-7)


def test_batch_and_sequence_schedule_resumes_exactly(shards, tmp_path):
    """SPEC §3.4's growing batch/sequence: shapes change at the scheduled steps, the data stream
    continues without a gap, and a resume across the change reproduces the uninterrupted run."""
    sched = {"train.batch_schedule": "[[3, 2, 48], [5, 6, 8]]", "train.steps": 6, "checkpoint.every": 2,
             "schedule.decay_steps": 6}  # the LR schedule must not depend on the stop-early run's steps
    full = load_config(overrides=debug_overrides(shards, tmp_path / "full", **sched))
    pretrain(full, progress=False, log=lambda m: None)
    rows = _rows(tmp_path / "full")
    assert [r["tokens"] for r in rows] == [128, 256, 384, 480, 576, 624]  # 4×32, 4×32, 4×32, 2×48, 2×48, 6×8
    assert full.train.shape_at(0) == (4, 32) and full.train.shape_at(4) == (2, 48)

    part = load_config(overrides=debug_overrides(shards, tmp_path / "part", **{**sched, "train.steps": 4}))
    pretrain(part, progress=False, log=lambda m: None)
    part.train.steps = 6
    pretrain(part, resume=True, progress=False, log=lambda m: None)
    assert [(r["step"], r["loss"]) for r in _rows(tmp_path / "part")] == [(r["step"], r["loss"]) for r in rows]
    with pytest.raises(HerdError, match="batch_schedule"):
        load_config(overrides=["train.batch_schedule=[[5, 2, 8], [3, 2, 8]]"])
    with pytest.raises(HerdError, match="increasing steps"):  # the same step twice: one entry unused
        load_config(overrides=["train.batch_schedule=[[3, 2, 8], [3, 4, 8]]"])


def test_anneal_stage_from_a_checkpoint_then_average(shards, tmp_path):
    """§3.4.3 as two runs: pre-train, then anneal from its last checkpoint with the LR decayed
    linearly to 0 (fresh optimizer), and Polyak-average the annealing checkpoints."""
    base = load_config(overrides=debug_overrides(shards, tmp_path / "base", **{"train.steps": 2}))
    trainer = pretrain(base, progress=False, log=lambda m: None)
    start = ckpt.latest_checkpoint(tmp_path / "base")
    anneal = load_config(overrides=debug_overrides(shards, tmp_path / "anneal", **{
        "train.steps": 4, "train.init_from": f'"{start}"', "schedule.name": '"linear"',
        "schedule.warmup_steps": 0, "checkpoint.every": 1, "train.seed": 1}))
    logged = []
    annealer = Trainer(anneal, progress=False, log=logged.append)
    assert any("initialized weights from" in m for m in logged)
    sd0 = trainer.model.state_dict()
    assert all(torch.equal(v, sd0[k]) for k, v in annealer.model.state_dict().items())
    rows = annealer.run()
    assert [r["lr"] for r in rows] == pytest.approx([3e-3, 2.25e-3, 1.5e-3, 0.75e-3])
    average_checkpoints(ckpt.list_checkpoints(tmp_path / "anneal"), tmp_path / "final")
    assert read_checkpoint(tmp_path / "final").args == anneal.model.args()
    bad = load_config(overrides=debug_overrides(shards, tmp_path / "bad", **{
        "train.init_from": f'"{start}"', "model.dim": 128}))
    with pytest.raises(HerdError, match="model shape differs"):
        Trainer(bad, progress=False, log=lambda m: None)


def test_bf16_autocast_path_runs(shards, tmp_path):
    """The GPU path (bf16 autocast, SPEC §3: BF16 training) also runs under CPU autocast."""
    cfg = load_config(overrides=debug_overrides(shards, tmp_path / "run", **{"train.steps": 2,
                                                                              "train.dtype": "bfloat16"}))
    rows = pretrain(cfg, progress=False, log=lambda m: None).run() or _rows(tmp_path / "run")
    assert all(np.isfinite(r["loss"]) and not r.get("skipped") for r in rows) and rows[-1]["val_loss"] > 0


def test_adamw_implementations_give_the_same_update():
    """optim.implementation only picks torch's kernel: fused, foreach and the per-tensor loop take
    the same three steps (decay on matrices only) to the same weights; an unknown name is refused."""
    import copy

    from herd.models.args import get_preset
    from herd.models.llama3 import Transformer
    from herd.train.config import OptimConfig
    from herd.train.loop import build_optimizer

    torch.manual_seed(0)
    base = Transformer(get_preset("debug"))
    grads = [[torch.randn_like(p) for p in base.parameters()] for _ in range(3)]
    finals = {}
    for impl in ("for-loop", "foreach", "fused"):
        m = copy.deepcopy(base)
        opt = build_optimizer(m, OptimConfig(lr=1e-2, implementation=impl))
        for g in grads:
            for p, gi in zip(m.parameters(), g, strict=True):
                p.grad = gi.clone()
            opt.step()
        finals[impl] = [p.detach().clone() for p in m.parameters()]
    moved = max((a - b).abs().max().item() for a, b in zip(finals["fused"], base.parameters(), strict=True))
    assert moved > 1e-3  # the steps really moved the weights
    for impl in ("foreach", "fused"):
        for a, b in zip(finals[impl], finals["for-loop"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(HerdError, match="optim.implementation 'adam8bit': choose fused, foreach, for-loop"):
        build_optimizer(base, OptimConfig(implementation="adam8bit"))


def test_a_byte_level_run_is_a_model_with_its_tokenizer(shards, tmp_path):
    """A run on byte-level ids (`data.tokenizer = "bytes"`, configs/debug.toml) writes its tokenizer
    into each checkpoint, so `herd generate` / `herd average` / `herd convert` work on it; the files
    are an HF tokenizer that transformers reads with the very ids the shards hold."""
    from transformers import AutoTokenizer

    from herd.api import generate, load
    from herd.data.shards import byte_tokenize

    cfg = load_config(overrides=debug_overrides(shards, tmp_path / "run", **{"train.steps": 2,
                                                                             "checkpoint.every": 2}))
    pretrain(cfg, progress=False, log=lambda m: None)
    model_dir = ckpt.latest_checkpoint(tmp_path / "run") / "model"
    model, tok = load(model_dir)
    ref = AutoTokenizer.from_pretrained(model_dir)
    for text in ["def f(x):\n    return x  # héllo 世界 🙂", "  \t\n\n<|end_of_text|>", "ÿ\x00\x7f"]:
        ids = byte_tokenize(text)
        assert tok.encode(text, bos=True, eos=True) == ids
        # transformers adds BOS as the shards do; split_special_tokens: special-token text stays bytes
        assert ref(text, split_special_tokens=True)["input_ids"] + [ids[-1]] == ids
        assert tok.decode(ids[1:-1]) == text == ref.decode(ids[1:-1])
    out = generate(model, tok, "import ", max_new_tokens=4, temperature=0)
    assert isinstance(out, str) and len(out.encode()) <= 4 * 4
