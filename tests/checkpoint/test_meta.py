"""Meta checkpoints as Meta ships them (no `herd` block in params.json): the RoPE factor that
`use_scaled_rope` means, Llama 2 conventions, and model-parallel shards beyond the simple case."""

from __future__ import annotations

import json

import torch

from herd.checkpoint import read_checkpoint, write_checkpoint
from herd.models.args import PRESETS, ModelArgs, RopeScaling
from herd.models.llama3 import Transformer


def _meta_dir(tmp_path, args: ModelArgs, *, drop_herd: bool = True, seed: int = 0, **params_changes):
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    sd = model.state_dict()
    write_checkpoint(tmp_path, "meta", args, sd)
    params = json.loads((tmp_path / "params.json").read_text())
    if drop_herd:
        params.pop("herd")
        params.pop("rope_scaling_factor", None)
    params.update(params_changes)
    (tmp_path / "params.json").write_text(json.dumps(params))
    return sd


def test_use_scaled_rope_means_factor_8_or_32_for_tied_llama_3_2(tmp_path):
    # Llama 3.2 1B/3B: params.json says only use_scaled_rope; the weights are tied (the .pth still
    # holds output.weight, equal to the embedding); the factor is 32 (HF config, transformers' converter).
    scaled = RopeScaling(32.0, 1.0, 4.0, 8192)
    tied = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32,
                     ffn_dim_multiplier=1.5, rope_scaling=scaled, tie_embeddings=True, max_seq_len=131072)
    _meta_dir(tmp_path / "3.2", tied)
    pth = torch.load(tmp_path / "3.2" / "consolidated.00.pth", weights_only=True)
    assert torch.equal(pth["output.weight"], pth["tok_embeddings.weight"])
    assert read_checkpoint(tmp_path / "3.2").args == tied

    untied = tied.replace(tie_embeddings=False, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))
    _meta_dir(tmp_path / "3.1", untied)
    assert read_checkpoint(tmp_path / "3.1").args == untied

    # Llama 4 names the factor; we honour the key when present.
    _meta_dir(tmp_path / "l4", untied, rope_scaling_factor=16.0)
    assert read_checkpoint(tmp_path / "l4").args.rope_scaling.factor == 16.0


def test_llama_2_conventions(tmp_path):
    """vocab_size -1, no rope_theta (10000), a stored `rope.freqs` buffer, and the embedding split on
    its *feature* dim across ranks (Llama 2's ParallelEmbedding)."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=96, multiple_of=32, rope_theta=10000.0,
                     norm_eps=1e-6, max_seq_len=8192)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    sd = model.state_dict()
    write_checkpoint(tmp_path, "meta", args, sd, model_parallel=2)
    params = json.loads((tmp_path / "params.json").read_text())
    for key in ("herd", "rope_theta", "use_scaled_rope", "n_kv_heads"):
        params.pop(key)
    params["vocab_size"] = -1
    (tmp_path / "params.json").write_text(json.dumps(params))
    for i in range(2):
        f = tmp_path / f"consolidated.0{i}.pth"
        shard = torch.load(f, weights_only=True)
        shard["tok_embeddings.weight"] = sd["tok_embeddings.weight"].chunk(2, dim=1)[i].clone()
        shard["rope.freqs"] = torch.ones(8)
        torch.save(shard, f)
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.args == args.replace(n_kv_heads=4)
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in sd.items())


def test_more_ranks_than_kv_heads(tmp_path):
    """4 ranks, 2 KV heads: each KV head is stored on two ranks (as llama-models lays out 405B on 16
    GPUs) and read back once."""
    args = PRESETS["debug"]
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    sd = model.state_dict()
    write_checkpoint(tmp_path, "meta", args, sd, model_parallel=4)
    shards = [torch.load(tmp_path / f"consolidated.0{i}.pth", weights_only=True) for i in range(4)]
    wk = [s["layers.0.attention.wk.weight"] for s in shards]
    assert torch.equal(wk[0], wk[1]) and not torch.equal(wk[1], wk[2])
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.args == args and all(torch.equal(ckpt.state_dict[k], v) for k, v in sd.items())


def test_bf16_write_keeps_dtype(tmp_path):
    args = PRESETS["debug"]
    sd = Transformer(args).state_dict()
    write_checkpoint(tmp_path / "m", "meta", args, sd, dtype="bfloat16")
    ckpt = read_checkpoint(tmp_path / "m")
    assert all(v.dtype == torch.bfloat16 for v in ckpt.state_dict.values())
    assert torch.equal(ckpt.state_dict["norm.weight"], sd["norm.weight"].bfloat16())
