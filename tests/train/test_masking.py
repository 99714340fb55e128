"""Document masking (SPEC §3.4): a packed batch's loss equals the token-weighted mean loss of its
documents run separately, so packing changes nothing but throughput."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herd.data.shards import PackedBatch, PackedLoader
from herd.models.args import get_preset
from herd.models.llama3 import Transformer
from herd.train.objectives import NextTokenLM, document_mask, document_positions


def _model(seed=0):
    torch.manual_seed(seed)
    model = Transformer(get_preset("debug").replace(vocab_size=258))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model.eval()


def _separate_loss(model, batch: PackedBatch) -> tuple[float, int]:
    """Sum of next-token losses of every document segment, each run alone from position 0."""
    total, count = 0.0, 0
    for row, ids in zip(batch.tokens, batch.doc_ids, strict=True):
        for d in ids.unique():
            seg = row[ids == d]
            if len(seg) < 2:
                continue
            logits = model(seg[None, :-1])
            total += float(F.cross_entropy(logits[0], seg[1:], reduction="sum"))
            count += len(seg) - 1
    return total, count


def test_positions_and_mask_restart_at_document_starts():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0]]
    m = document_mask(ids)[0, 0]
    assert m.shape == (6, 6)
    assert m[4].tolist() == [False, False, False, True, True, False]  # doc 1 sees only doc 1, causally
    assert m[2].tolist() == [True, True, True, False, False, False]


@torch.no_grad()
def test_packed_loss_equals_documents_run_separately(shards):
    model = _model()
    loader = PackedLoader(shards, batch_size=3, seq_len=256, seed=1, vocab_size=258)
    # the first batch whose every row packs several documents (segments)
    batch = next(b for b in map(loader.batch, range(100))
                 if all(len(r.unique()) >= 2 for r in b.doc_ids) and sum(len(r.unique()) for r in b.doc_ids) >= 8)
    obj = NextTokenLM()
    packed = float(obj.loss_sum(model, batch)) / obj.num_terms(batch)
    total, count = _separate_loss(model, batch)
    assert count == obj.num_terms(batch)
    assert abs(packed - total / count) <= 1e-5
    # Without document masking the documents see each other: a different (wrong) number.
    unmasked = float(NextTokenLM(document_masking=False).loss_sum(model, batch)) / count
    assert abs(unmasked - total / count) > 1e-4  # (an untrained model: small, but 10× the tolerance)


@torch.no_grad()
def test_hand_packed_documents():
    model = _model(1)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 258, (n,), generator=g) for n in (5, 11, 2, 14)]
    tokens = torch.cat(docs)[None]
    ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    batch = PackedBatch(tokens, ids)
    obj = NextTokenLM()
    total, count = _separate_loss(model, batch)
    assert count == sum(len(d) - 1 for d in docs) == obj.num_terms(batch)
    assert abs(float(obj.loss_sum(model, batch)) / count - total / count) <= 1e-5


def test_cross_entropy_sum_is_torch_cross_entropy():
    """The eager CPU loss (objectives.cross_entropy_sum, its own backward) gives torch's
    F.cross_entropy(reduction="sum", ignore_index) loss and logits gradient, ignored targets, an
    ignored row holding -inf and an upstream weight included."""
    from herd.train.objectives import IGNORE, cross_entropy_sum

    torch.manual_seed(0)
    logits = torch.randn(37, 101) * 4
    logits[5, 0] = float("-inf")  # an ignored row whose placeholder target column is -inf
    targets = torch.randint(0, 101, (37,))
    targets[[0, 5, 17, 36]] = IGNORE
    for weight in (1.0, 0.37):
        a = logits.clone().requires_grad_()
        b = logits.clone().requires_grad_()
        la, lb = cross_entropy_sum(a, targets), F.cross_entropy(b, targets, ignore_index=IGNORE, reduction="sum")
        (la * weight).backward()
        (lb * weight).backward()
        assert torch.isfinite(la) and abs(float(la) - float(lb)) <= 1e-5 * abs(float(lb))
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
        assert not a.grad[[0, 5, 17, 36]].any()
