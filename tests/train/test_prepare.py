"""A run that names a corpus and a tokenizer that do not exist yet prepares both, says so, and
leaves checkpoints that are complete model directories (tokenizer included) with TensorBoard
events and a loss curve next to metrics.jsonl."""

from __future__ import annotations

import json

import pytest
import torch

import herd
from herd.cli import main as herd_main
from herd.data.shards import python_stdlib_files, read_meta
from herd.errors import HerdError
from herd.train.config import load_config
from herd.train.loop import pretrain


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory of .txt files: real text (the interpreter's own sources)."""
    root = tmp_path_factory.mktemp("corpus")
    for p in python_stdlib_files(limit=12):
        (root / f"{p.stem}.txt").write_text(p.read_text(encoding="utf-8", errors="replace"), encoding="utf-8")
    return root


def _cfg(tmp_path, corpus, **extra):
    table = {
        "model": {"preset": "debug", "vocab_size": 600},
        "data": {"path": str(tmp_path / "shards"), "source": str(corpus), "tokenizer": str(tmp_path / "tok"),
                 "tokenizer_vocab_size": 600, "val_split": "tails", "val_fraction": 0.1, "val_batches": 1},
        "train": {"steps": 6, "batch_size": 2, "seq_len": 32, "eval_every": 3, "threads": 1,
                  "out_dir": str(tmp_path / "run")},
        "checkpoint": {"every": 3, "keep": 0},
        "schedule": {"warmup_steps": 1},
        "optim": {"lr": 3e-3},
    }
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        table[section][key] = value
    return load_config(data=table)


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    tmp_path = tmp_path_factory.mktemp("prep")
    said: list[str] = []
    trainer = pretrain(_cfg(tmp_path, corpus), log=said.append, progress=False)
    return tmp_path, trainer, said


def test_missing_tokenizer_and_shards_are_prepared_and_said(run, corpus):
    tmp_path, trainer, said = run
    assert any("training tokenizer" in s for s in said) and any("preparing shards" in s for s in said)
    tok = herd.tokenizer.load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == 600
    meta = read_meta(tmp_path / "shards")
    # "tails": every document gives its last 10% to validation, so both splits hold every document
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["documents"] == val["documents"] == len(list(corpus.glob("*.txt")))
    assert 0.07 < val["tokens"] / (train["tokens"] + val["tokens"]) < 0.12
    # the shards are the tokenizer's ids of the texts, with BOS/EOS around each document
    first = sorted(corpus.glob("*.txt"))[0].read_text(encoding="utf-8")
    ids = tok.encode(first, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:-1]) == first


def test_checkpoint_is_a_complete_base_model_directory(run, capsys):
    tmp_path, trainer, _ = run
    ckpt = tmp_path / "run" / "ckpt-00000006"
    assert (ckpt / "model" / "tokenizer.model").read_bytes() == (tmp_path / "tok" / "tokenizer.model").read_bytes()
    model, tok = herd.load(ckpt)  # a training checkpoint stands for its model/
    assert tok is not None and tok.chat is None  # a base model completes text, no chat wrapping
    ref = trainer.model.eval()
    ids = torch.tensor([tok.encode("def main():\n    return", bos=True)])
    torch.testing.assert_close(model(ids), ref(ids), rtol=1e-5, atol=1e-5)
    assert herd_main(["generate", "--model", str(ckpt), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    # the run directory stands for its newest checkpoint (not for an HF directory: it has a config.json)
    newest, _ = herd.load(tmp_path / "run")
    torch.testing.assert_close(newest(ids), ref(ids), rtol=1e-5, atol=1e-5)
    # averaging keeps the tokenizer with the weights
    out = tmp_path / "avg"
    assert herd_main(["average", str(tmp_path / "run" / "ckpt-00000003"), str(ckpt), "--out", str(out)]) == 0
    _, tok2 = herd.load(out)
    assert tok2 is not None and tok2.chat is None and tok2.vocab_size == tok.vocab_size


def test_tensorboard_events_and_loss_png_follow_metrics(run):
    tmp_path, _, _ = run
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    train = [(e.step, e.value) for e in acc.Scalars("loss/train")]
    assert [s for s, _ in train] == [r["step"] for r in rows]
    assert [v for _, v in train] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    val = [(e.step, e.value) for e in acc.Scalars("loss/val")]
    assert val == pytest.approx([(r["step"], r["val_loss"]) for r in rows if "val_loss" in r], rel=1e-6)
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_resume_purges_tensorboard_events_after_the_checkpoint(tmp_path, corpus):
    cfg = _cfg(tmp_path, corpus, train__steps=4, checkpoint__every=2)
    pretrain(cfg, log=lambda s: None, progress=False)
    # lose the last checkpoint: the resumed run repeats steps 3-4, TensorBoard must not hold them twice
    import shutil

    shutil.rmtree(tmp_path / "run" / "ckpt-00000004")
    pretrain(cfg, resume=True, log=lambda s: None, progress=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/train")] == [1, 2, 3, 4]


def test_vocab_mismatch_and_missing_tokenizer_are_one_line(tmp_path, corpus, capsys):
    cfg = _cfg(tmp_path, corpus, model__vocab_size=512)
    with pytest.raises(HerdError, match="vocabulary mismatch"):
        pretrain(cfg, log=lambda s: None, progress=False)
    cfg = _cfg(tmp_path, corpus, data__tokenizer_vocab_size=0, data__tokenizer=str(tmp_path / "nope"),
               data__path=str(tmp_path / "other"))
    with pytest.raises(HerdError, match="no such tokenizer"):
        pretrain(cfg, log=lambda s: None, progress=False)
    capsys.readouterr()
    code = herd_main(["pretrain", "--train.steps=1", f"--data.path={tmp_path / 'x'}", "--data.source=/no/such/dir",
                      f"--out={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no such corpus" in err[0]
