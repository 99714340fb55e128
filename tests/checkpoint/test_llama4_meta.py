"""Llama 4 in Meta's layout (params.json + consolidated.NN.pth with the published names): HF → herd →
Meta → herd keeps logits, Meta's own llama-models model loads what herd writes and computes the
same logits, and the published params.json sizing gives the released widths (issue 6)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from herd.checkpoint import read_args, read_checkpoint, write_checkpoint
from herd.checkpoint.meta_llama4 import llama4_args_from_params, params_from_llama4_args
from herd.errors import HerdError
from herd.models.llama4 import LLAMA4_PRESETS, Llama4Args, Transformer, VisionArgs
from herd.models.vision import Llama4Multimodal

# head_dim = dim / n_heads and widths on Meta's rule (ffn_exp 4, multiplier 1.0, multiple_of 32):
# what Meta's llama4 code can build.
ARGS = Llama4Args(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=320, n_experts=4,
                  moe_ffn_dim=96, ffn_hidden_dim=192, moe_every=2, max_seq_len=64, attention_chunk_size=8,
                  floor_scale=4.0, rope_scaling=None)
VISION = VisionArgs(image_size=56, patch_size=14, dim=32, n_layers=2, n_heads=2, output_dim=48, image_token_id=300)


def built(args, cls=Transformer, seed=0):
    torch.manual_seed(seed)
    m = cls(args)
    m.init_weights(std=0.3)
    return m.eval()


@pytest.mark.parametrize("mp", [1, 2])
def test_hf_to_meta_to_herd_keeps_logits(tmp_path, mp):
    from transformers import Llama4ForCausalLM

    args = ARGS.replace(qk_norm=mp == 1, top_k=mp)
    model = built(args)
    write_checkpoint(tmp_path / "hf", "hf", args, model.state_dict())
    hf = read_checkpoint(tmp_path / "hf")
    write_checkpoint(tmp_path / "meta", "meta", hf.args, hf.state_dict, model_parallel=mp)
    assert sorted(p.name for p in (tmp_path / "meta").glob("*.pth")) == [f"consolidated.{i:02d}.pth" for i in range(mp)]
    shard = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert "layers.1.feed_forward.experts.moe_w_in_eD_F" in shard and "layers.0.attention.wqkv.weight" in shard
    assert read_args(tmp_path / "meta") == args
    back = read_checkpoint(tmp_path / "meta")
    again = built(back.args)
    again.load_state_dict(back.state_dict)
    ref = Llama4ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, args.vocab_size, (1, 21))
    with torch.no_grad():
        ours = model(tokens)
        assert torch.equal(again(tokens), ours)
        assert (ref(tokens).logits - ours).abs().max().item() <= 1e-4


def test_meta_round_trip_with_vision(tmp_path):
    args = ARGS.replace(vision=VISION)
    model = built(args, Llama4Multimodal)
    write_checkpoint(tmp_path / "meta", "meta", args, model.state_dict(), model_parallel=2)
    back = read_checkpoint(tmp_path / "meta")
    assert back.args == args
    again = Llama4Multimodal(back.args).eval()
    again.load_state_dict(back.state_dict)
    tokens = torch.randint(0, 299, (1, 20))
    tokens[0, 2:6] = 300
    tiles = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(again(tokens, images=tiles), model(tokens, images=tiles))


def test_published_params_give_the_released_widths():
    """params.json keys as Meta publishes them and transformers' converter reads them (no herd
    block): Meta's sizing rule must give the widths of the released HF configs (the presets)."""
    base = {"dim": 5120, "n_layers": 48, "n_heads": 40, "n_kv_heads": 8, "vocab_size": 202048, "norm_eps": 1e-5,
            "rope_theta": 500000.0, "ffn_exp": 4.0, "ffn_dim_multiplier": 1.2, "multiple_of": 2048,
            "attention_chunk_size": 8192, "nope_layer_interval": 4, "attn_temperature_tuning": True,
            "floor_scale": 8192.0, "attn_scale": 0.1}
    scout = llama4_args_from_params({**base, "use_scaled_rope": True, "use_qk_norm": True,
                                     "moe_args": {"num_experts": 16, "capacity_factor": 1.0, "auto_scale_F": True,
                                                  "top_k": 1, "interleave_moe_layer_step": 1}})
    maverick = llama4_args_from_params({**base, "use_scaled_rope": False, "use_qk_norm": False,
                                        "moe_args": {"num_experts": 128, "capacity_factor": 1.0,
                                                     "auto_scale_F": True, "top_k": 1,
                                                     "interleave_moe_layer_step": 2}})
    for got, name in ((scout, "llama4-scout-17b-16e"), (maverick, "llama4-maverick-17b-128e")):
        want = LLAMA4_PRESETS[name]
        assert (got.moe_ffn_dim, got.ffn_hidden_dim) == (8192, 16384) == (want.moe_ffn_dim, want.ffn_hidden_dim)
        assert got == want.replace(vision_params=0)
    # our params.json for them says the same with Meta's keys alone
    for name in ("llama4-scout-17b-16e", "llama4-maverick-17b-128e"):
        p = params_from_llama4_args(LLAMA4_PRESETS[name])
        p.pop("herd")
        assert llama4_args_from_params(p) == LLAMA4_PRESETS[name].replace(vision_params=0)


def test_meta_expert_count_mismatch_is_one_line(tmp_path):
    model = built(ARGS)
    write_checkpoint(tmp_path / "meta", "meta", ARGS, model.state_dict())
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    params["moe_args"]["num_experts"] = 8
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    with pytest.raises(HerdError, match="expert count mismatch") as e:
        read_checkpoint(tmp_path / "meta")
    assert "\n" not in str(e.value)


META_REFERENCE = textwrap.dedent("""
    import os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    import fairscale.nn.model_parallel.initialize as fs_init
    fs_init.initialize_model_parallel(1)
    torch.Tensor.cuda = lambda self, *a, **k: self  # the reference allocates its KV cache with .cuda()
    from llama_models.llama4.args import ModelArgs
    from llama_models.llama4.datatypes import TransformerInput
    from llama_models.llama4.model import Transformer
    import json
    d = sys.argv[1]
    params = json.load(open(d + "/params.json"))
    model = Transformer(ModelArgs(**params, max_seq_len=64, max_batch_size=1)).float()  # its ViT is bf16
    model.load_state_dict(torch.load(d + "/consolidated.00.pth", weights_only=True), strict=True)
    tokens = torch.load(d + "/tokens.pt")
    image = None
    if os.path.exists(d + "/tiles.pt"):  # generation.py's prefill: the encoder's features at <|patch|>
        from llama_models.llama4.datatypes import MaskedEmbedding
        mask = (tokens == int(sys.argv[3]))[..., None]
        h = model.tok_embeddings(tokens)
        image = MaskedEmbedding(embedding=model.vision_embeddings([[torch.load(d + "/tiles.pt")]], mask, h),
                                mask=mask)
    out = model(TransformerInput(tokens=tokens, tokens_position=0, image_embedding=image))
    torch.save(out.logits, d + "/logits.pt")
""")


@pytest.mark.parametrize("variant", ["plain", "scaled-rope", "vision"])
def test_llama_models_reference_loads_what_herd_writes(tmp_path, variant):
    """Meta's own Llama 4 Transformer (llama-models, run on CPU in a subprocess with fairscale)
    loads herd's consolidated.00.pth strictly and computes the same logits — with its vision
    encoder too, on the tiles of a real photo."""
    pytest.importorskip("fairscale")
    from herd.models.args import RopeScaling

    scaled = variant == "scaled-rope"
    args = ARGS.replace(rope_scaling=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                                 original_max_position_embeddings=8192) if scaled else None,
                        rope_theta=10.0 if scaled else 500000.0,  # small θ: the scaling touches short contexts
                        vision=VISION if variant == "vision" else None)
    model = built(args, Llama4Multimodal if args.vision else Transformer)
    write_checkpoint(tmp_path / "meta", "meta", args, model.state_dict())
    tokens = torch.randint(0, 299, (1, 21))
    tiles = None
    if args.vision:
        import llama_models

        from herd.models.image_processing import load_image, preprocess_image

        dog = Path(llama_models.__file__).parent / "resources" / "dog.jpg"
        tiles = preprocess_image(load_image(dog), dataclasses.replace(VISION, max_tiles=4)).tiles
        n = tiles.shape[0] * VISION.tokens_per_tile  # several 56-pixel tiles and the thumbnail
        tokens = torch.cat([tokens[:, :3], torch.full((1, n), VISION.image_token_id), tokens[:, 3:]], dim=1)
        torch.save(tiles, tmp_path / "meta" / "tiles.pt")
    torch.save(tokens, tmp_path / "meta" / "tokens.pt")
    port = str(29500 + os.getpid() % 400 + ["plain", "scaled-rope", "vision"].index(variant))
    subprocess.run([sys.executable, "-c", META_REFERENCE, str(tmp_path / "meta"), port, str(VISION.image_token_id)],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    theirs = torch.load(tmp_path / "meta" / "logits.pt")
    with torch.no_grad():
        ours = model(tokens) if tiles is None else model(tokens, images=tiles)
        if tiles is not None:  # several tiles, and the picture changes the logits
            assert tiles.shape[0] > 2 and (ours - model(tokens)).abs().max().item() > 1e-2
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_gguf_output_of_llama4_is_refused_in_one_line(tmp_path):
    with pytest.raises(HerdError, match="GGUF output is not supported for Llama 4") as e:
        write_checkpoint(tmp_path / "x.gguf", "gguf", ARGS, built(ARGS).state_dict())
    assert "\n" not in str(e.value)
