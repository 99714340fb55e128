"""Fixtures for the training tests: small byte-level shards of real text (the interpreter's own
Python sources, always installed) and configs for the `debug` preset."""

from __future__ import annotations

import pytest

from herd.data.shards import python_stdlib_files, shards_from_texts, text_documents


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """~740K byte tokens in ~3,300 documents (stdlib files split at blank lines), 10% held out."""
    texts = list(text_documents(python_stdlib_files(limit=30), split_on_blank_lines=True))
    return shards_from_texts(texts, tmp_path_factory.mktemp("data") / "shards", val_fraction=0.1)


def debug_overrides(shards, out, **extra) -> list[str]:
    items = {"model.preset": '"debug"', "model.vocab_size": 258, "data.path": f'"{shards}"',
             "train.out_dir": f'"{out}"', "train.batch_size": 4, "train.seq_len": 32, "train.threads": 1,
             "train.eval_every": 0, "checkpoint.every": 0, "checkpoint.keep": 0, "data.val_batches": 2,
             "schedule.warmup_steps": 2, "optim.lr": 3e-3}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]
