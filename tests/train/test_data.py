"""Token shards and the packed loader: determinism, exact continuation, and bad input as one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from herd.data.shards import BYTE_VOCAB, PackedLoader, read_meta, write_shards
from herd.errors import HerdError


def test_meta_counts_and_split(shards):
    meta = read_meta(shards)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    assert meta["vocab_size"] == BYTE_VOCAB and tr["documents"] > 5 * va["documents"] > 0
    assert sum(s["tokens"] for s in tr["shards"]) == tr["tokens"]
    assert (shards / "train-00000.bin").stat().st_size == 4 * tr["shards"][0]["tokens"]


def test_loader_is_deterministic_and_resumes_at_the_next_batch(shards):
    a = PackedLoader(shards, batch_size=3, seq_len=40, seed=7)
    first = [next(a) for _ in range(5)]
    state = a.state_dict()
    after = [next(a) for _ in range(3)]
    b = PackedLoader(shards, batch_size=3, seq_len=40, seed=7)
    b.load_state_dict(state)
    for x, y in zip(after, [next(b) for _ in range(3)], strict=True):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.doc_ids, y.doc_ids)
    c = PackedLoader(shards, batch_size=3, seq_len=40, seed=8)
    assert not torch.equal(first[0].tokens, c.batch(0).tokens)
    assert first[0].tokens.shape == (3, 41) and first[0].tokens.dtype == torch.int64
    with pytest.raises(HerdError, match="seed"):
        c.load_state_dict(state)


def test_windows_tile_each_epoch_without_loss(tmp_path):
    docs = [list(range(1, n + 1)) for n in (3, 7, 2, 9, 4, 6)]  # 31 tokens
    path = write_shards(docs, tmp_path / "s", vocab_size=16, val_fraction=0.0)
    loader = PackedLoader(path, batch_size=2, seq_len=4, seed=0)  # windows of 5: 6 per epoch, 3 batches
    assert loader.batches_per_epoch == 3
    epoch = torch.cat([loader.batch(i).tokens.flatten() for i in range(3)])
    order = np.random.default_rng([0, 0]).permutation(len(docs))
    assert epoch.tolist() == [t for i in order for t in docs[i]][:30]
    ids = torch.cat([loader.batch(i).doc_ids for i in range(3)])
    assert all(r[0] == 0 and (r.diff() >= 0).all() for r in ids)
    assert not torch.equal(loader.batch(3).tokens, loader.batch(0).tokens)  # next epoch reshuffles


def test_bad_shards_are_one_line_errors(shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    with pytest.raises(HerdError, match="vocabulary mismatch.*vocab_size=258.*vocab_size=512"):
        PackedLoader(bad, batch_size=2, seq_len=8, vocab_size=512)
    with open(bad / "train-00000.bin", "r+b") as f:  # truncate the shard
        f.truncate(1000)
    with pytest.raises(HerdError, match="truncated or corrupt shard"):
        PackedLoader(bad, batch_size=2, seq_len=8)
    shutil.copy(shards / "train-00000.bin", bad / "train-00000.bin")
    np.array([0, 5, 3], dtype=np.int64).tofile(bad / "train-00000.idx")
    with pytest.raises(HerdError, match="corrupt document index"):
        PackedLoader(bad, batch_size=2, seq_len=8)
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(HerdError, match="meta.json: corrupt"):
        PackedLoader(bad, batch_size=2, seq_len=8)
    with pytest.raises(HerdError, match="not a shards directory"):
        PackedLoader(tmp_path / "nothing", batch_size=2, seq_len=8)
    with pytest.raises(HerdError, match="empty corpus"):
        write_shards([[], []], tmp_path / "empty", vocab_size=10)
    with pytest.raises(HerdError, match="outside the vocabulary"):
        write_shards([[1, 2, 10]], tmp_path / "oov", vocab_size=10)
    assert not (tmp_path / "empty").exists() and not (tmp_path / "oov").exists()
    meta = json.loads((shards / "meta.json").read_text())
    with pytest.raises(HerdError, match="fewer than one batch"):
        PackedLoader(shards, batch_size=meta["splits"]["val"]["tokens"], seq_len=8, split="val")


def test_shape_change_continues_the_stream(tmp_path):
    docs = [list(range(1, n + 1)) for n in (3, 7, 2, 9, 4, 6, 8, 5)]  # 44 tokens
    path = write_shards(docs, tmp_path / "s", vocab_size=16, val_fraction=0.0)
    loader = PackedLoader(path, batch_size=2, seq_len=4, seed=0)
    a = next(loader)
    loader.set_shape(1, 9)
    b = next(loader)
    order = np.random.default_rng([0, 0]).permutation(len(docs))
    stream = [t for i in order for t in docs[i]]
    assert a.tokens.flatten().tolist() + b.tokens.flatten().tolist() == stream[:20]
    assert loader.state_dict()["offset"] == 20
    loader.set_shape(3, 8)  # 27 tokens do not fit in the 24 left after offset 20: next epoch
    c = next(loader)
    assert loader.state_dict() == {"epoch": 1, "offset": 27, "seed": 0, "split": "train"}
    assert c.tokens.shape == (3, 9)
