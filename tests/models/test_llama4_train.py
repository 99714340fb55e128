"""Training a small Llama 4 MoE through the shared loop (`herd pretrain` with a llama4 preset):
the loss falls, router statistics are logged per step, the checkpoint reloads as Llama 4; and the
expert-parallel hook computes exactly the full layer's expert outputs (issue 6)."""

from __future__ import annotations

import json

import pytest
import torch

from herd.checkpoint import build_model, read_checkpoint
from herd.cli import main
from herd.data.shards import python_stdlib_files, shards_from_texts, text_documents
from herd.errors import HerdError
from herd.models.llama4 import LLAMA4_PRESETS, MoE, local_experts, router_stats, shard_experts


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    texts = list(text_documents(python_stdlib_files(limit=8), split_on_blank_lines=True))
    return shards_from_texts(texts, tmp_path_factory.mktemp("data") / "shards", val_fraction=0.1)


def test_pretrain_llama4_preset_learns_and_logs_router_stats(shards, tmp_path, capsys):
    run = tmp_path / "run"
    steps, batch, seq = 40, 4, 32
    code = main(["pretrain", "--config", "configs/debug.toml", "--model.preset=llama4-debug",
                 "--model.vocab_size=258", "--model.n_experts=4", f"--data.path={shards}", f"--out={run}",
                 f"--train.steps={steps}", f"--train.batch_size={batch}", f"--train.seq_len={seq}",
                 "--train.eval_every=0", "--checkpoint.every=0", "--train.threads=1", "--optim.lr=3e-3"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == steps
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert first > 5.0 and last < first - 1.5, (first, last)  # starts near ln(258) ≈ 5.55
    args = LLAMA4_PRESETS["llama4-debug"]
    moe_layers = [i for i in range(args.n_layers) if args.is_moe_layer(i)]
    for r in rows:  # every MoE layer routed each of the step's tokens to top_k experts
        for i in moe_layers:
            counts = r[f"moe.layers.{i}.feed_forward.tokens_per_expert"]
            assert len(counts) == 4 and sum(counts) == batch * seq * args.top_k
        assert 1.0 <= r["moe_max_load"] <= 4.0
    ckpt = read_checkpoint(sorted(run.glob("ckpt-*"))[-1] / "model")
    assert ckpt.args == args.replace(vocab_size=258)
    model = build_model(ckpt.args, ckpt.state_dict)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 258, (1, 16)))).all()


def test_expert_parallel_shards_reproduce_the_experts():
    """What an expert-parallel layer does with the hook: each rank runs its block of experts on the
    rows routed there; concatenated in rank order they equal the whole Experts module's output."""
    torch.manual_seed(0)
    args = LLAMA4_PRESETS["llama4-debug"].replace(n_experts=8)
    moe = MoE(args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    counts = torch.tensor([3, 0, 5, 2, 7, 1, 0, 4])
    rows = torch.randn(int(counts.sum()), args.dim)
    with torch.no_grad():
        full = moe.experts(rows, counts)
        for ep in (2, 4):
            parts, start = [], 0
            for rank in range(ep):
                block = local_experts(8, rank, ep)
                n = int(counts[block.start:block.stop].sum())
                parts.append(shard_experts(moe.experts, rank, ep)(rows[start:start + n], counts[block.start:block.stop]))
                start += n
            assert torch.allclose(torch.cat(parts), full, atol=1e-6)
    local = shard_experts(moe.experts, 1, 4)
    assert local.w1.shape[0] == 2 and local.w1.data_ptr() == moe.experts.w1[2].data_ptr()  # a view, no copy
    with pytest.raises(HerdError, match="multiple of the group size"):
        local_experts(8, 0, 3)


def test_router_stats_count_training_tokens_only():
    torch.manual_seed(0)
    args = LLAMA4_PRESETS["llama4-debug"]
    from herd.models.llama4 import Transformer

    model = Transformer(args)
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (2, 10))
    model.eval()
    model(tokens)
    assert router_stats(model) == {}
    model.train()
    model(tokens)
    model(tokens)
    stats = router_stats(model)
    assert sum(stats["moe.layers.1.feed_forward.tokens_per_expert"]) == 40
    assert router_stats(model) == {}  # reset by reading
