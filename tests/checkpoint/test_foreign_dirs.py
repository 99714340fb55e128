"""Other people's checkpoint directories: what else lies beside the weights (stray files, a second
layout), config values of the wrong type, a tokenizer smaller than the model, and configs herd's
own writer never produces run across the short-attention boundary (T = 512) — checked against
transformers and the `gguf` package, or refused with one HerdError line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader, GGUFWriter, TokenType
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from herd.checkpoint import build_model, read_checkpoint, write_checkpoint
from herd.checkpoint.gguf import write_gguf
from herd.cli import main
from herd.errors import HerdError
from herd.inference.generate import generate_batch
from herd.models import short_attention

_DENSE = dict(vocab_size=101, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, head_dim=12, max_position_embeddings=1024,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _save(path: Path, scale: float = 1.0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(**{**_DENSE, **overrides})).eval()
    if scale != 1.0:  # sharp logits: greedy ties cannot hide a difference
        with torch.no_grad():
            for p in ref.parameters():
                if p.ndim == 2:
                    p.mul_(scale)
    ref.save_pretrained(path)
    return ref


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _logits_diff(ref, path: Path, tokens: torch.Tensor) -> float:
    ckpt = read_checkpoint(path)
    model = build_model(ckpt.args, ckpt.state_dict)
    with torch.no_grad():
        return (model(tokens) - ref(tokens).logits.float()).abs().max().item()


# ---- files beside the weights --------------------------------------------------------------------
def test_stray_safetensors_beside_model_safetensors_is_ignored_like_transformers(tmp_path):
    """transformers reads model.safetensors alone; herd read every *.safetensors in the directory,
    so a stray file sorting after it (an adapter, a leftover copy) replaced the model's tensors."""
    _save(tmp_path)
    norm = load_file(tmp_path / "model.safetensors")["model.norm.weight"]
    save_file({"model.norm.weight": torch.full_like(norm, 3.0)}, tmp_path / "zz_adapter.safetensors")
    ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    assert _logits_diff(ref, tmp_path, tokens) <= 1e-5
    # the shards and index of another save beside it: transformers still reads model.safetensors
    (tmp_path / "zz_adapter.safetensors").unlink()
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**_DENSE)).save_pretrained(tmp_path / "other", max_shard_size="20KB")
    for f in (tmp_path / "other").glob("model*"):
        shutil.copy(f, tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert _logits_diff(ref, tmp_path, tokens) <= 1e-5


def test_a_tensor_in_two_weight_files_is_refused(tmp_path):
    """Without model.safetensors or an index every *.safetensors is read: a tensor in two of them
    is ambiguous, and which copy won used to depend on the file names."""
    _save(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(sd)
    save_file({k: sd[k] for k in names[: len(names) // 2]}, tmp_path / "a.safetensors")
    save_file({k: sd[k] for k in names[len(names) // 2:]} | {names[0]: sd[names[0]] * 2}, tmp_path / "b.safetensors")
    with pytest.raises(HerdError, match=f"tensor '{names[0]}' is also stored in another weights file"):
        read_checkpoint(tmp_path)
    # without the duplicate the two files are one model
    save_file({k: sd[k] for k in names[len(names) // 2:]}, tmp_path / "b.safetensors")
    assert len(read_checkpoint(tmp_path).state_dict) == len(names)


def test_a_directory_with_two_checkpoints_is_refused_in_one_line(tmp_path, capsys):
    hf = tmp_path / "hf"
    ref = _save(hf)
    write_checkpoint(tmp_path / "meta", "meta", *(lambda c: (c.args, c.state_dict))(read_checkpoint(hf)))
    both = tmp_path / "both"
    shutil.copytree(hf, both)
    for f in (tmp_path / "meta").iterdir():
        shutil.copy(f, both)
    capsys.readouterr()  # transformers' progress bars
    assert main(["info", str(both)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: " in err and "two checkpoints" in err and "Traceback" not in err
    with pytest.raises(HerdError, match="two checkpoints"):
        read_checkpoint(both)
    # One description without its weights is no second checkpoint: the one with weights is read.
    tokens = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(0))
    (both / "consolidated.00.pth").unlink()
    assert read_checkpoint(both).format == "hf"
    assert _logits_diff(ref, both, tokens) <= 1e-5
    meta_with_config = tmp_path / "meta2"
    shutil.copytree(tmp_path / "meta", meta_with_config)
    shutil.copy(hf / "config.json", meta_with_config)
    assert read_checkpoint(meta_with_config).format == "meta"
    assert _logits_diff(ref, meta_with_config, tokens) <= 1e-5


# ---- config values of the wrong type -------------------------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("hidden_size", 48.5),  # int() truncated it to 48 and the model loaded
    ("num_hidden_layers", 2.5),
    ("num_attention_heads", True),  # int(True) == 1
    ("intermediate_size", "72"),
    ("tie_word_embeddings", "false"),  # bool("false") is True
    ("tie_word_embeddings", 0),
], ids=["fractional-hidden", "fractional-layers", "bool-heads", "quoted-ffn", "quoted-bool", "int-bool"])
def test_wrongly_typed_hf_config_values_are_refused(tmp_path, capsys, key, value):
    _save(tmp_path)
    _edit_config(tmp_path, **{key: value})
    capsys.readouterr()  # transformers' progress bars
    with pytest.raises(HerdError, match=f"config.json: malformed value .*{key}"):
        read_checkpoint(tmp_path)
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "Traceback" not in err
    # ... whereas transformers' own spelling of the same numbers still loads
    _edit_config(tmp_path, hidden_size=48.0, num_hidden_layers=2, num_attention_heads=6, intermediate_size=72,
                 tie_word_embeddings=False)
    assert read_checkpoint(tmp_path).args.dim == 48


@pytest.mark.parametrize("text", ["[1, 2]", '"llama"', "null"])
def test_info_on_a_config_that_is_not_an_object_is_one_line(tmp_path, capsys, text):
    """`herd info` reads only the config (read_args), which parsed it without the object check
    read_checkpoint has: a traceback (AttributeError: 'list' object has no attribute 'get')."""
    _save(tmp_path)
    (tmp_path / "config.json").write_text(text)
    capsys.readouterr()
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json: expected a JSON object" in err and "Traceback" not in err


@pytest.mark.parametrize("where, key, value", [
    ("params", "dim", 48.5), ("params", "n_layers", True), ("herd", "tie_embeddings", "false"),
    ("herd", "head_dim", 12.5),
])
def test_wrongly_typed_meta_params_are_refused(tmp_path, where, key, value):
    _save(tmp_path / "hf")
    ckpt = read_checkpoint(tmp_path / "hf")
    write_checkpoint(tmp_path / "meta", "meta", ckpt.args, ckpt.state_dict)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    (params if where == "params" else params.setdefault("herd", {}))[key] = value
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    with pytest.raises(HerdError, match=f"malformed value .*{key}"):
        read_checkpoint(tmp_path / "meta")


@pytest.mark.parametrize("key, value", [("num_local_experts", 2.5), ("hidden_size", "48"),
                                        ("use_qk_norm", "false"), ("tie_word_embeddings", 1)])
def test_wrongly_typed_llama4_config_values_are_refused(tmp_path, key, value):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=97, hidden_size=48, intermediate_size=40, intermediate_size_mlp=72, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, num_local_experts=2,
        attention_chunk_size=16, no_rope_layer_interval=2)).save_pretrained(tmp_path)
    assert read_checkpoint(tmp_path).args.dim == 48
    _edit_config(tmp_path, **{key: value})
    with pytest.raises(HerdError, match=f"config.json: malformed value .*{key}"):
        read_checkpoint(tmp_path)


_LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=16)


@pytest.mark.parametrize("rope", [
    dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0), rope_scaling=_LLAMA3),
    dict(rope_parameters=dict(_LLAMA3, rope_theta=5000.0), rope_scaling=dict(rope_type="linear", factor=2.0)),
    dict(rope_parameters=dict(_LLAMA3, rope_theta=5000.0), rope_scaling=None, rope_theta=7.0),
], ids=["llama3-over-default", "linear-over-llama3", "null-scaling"])
def test_rope_scaling_beside_rope_parameters_is_read_as_transformers_reads_it(tmp_path, rope):
    """A config with both keys (an old one edited, a tool adding the new key): transformers takes a
    non-empty `rope_scaling` in place of `rope_parameters`; herd read rope_parameters."""
    _save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, 101, (1, 80), generator=torch.Generator().manual_seed(0))
    assert _logits_diff(ref, tmp_path, tokens) <= 1e-5


# ---- GGUF vocabulary -----------------------------------------------------------------------------
@pytest.mark.parametrize("with_scores", [False, True])
def test_gguf_token_list_is_padded_to_the_model_vocabulary(tmp_path, with_scores):
    """A tokenizer with fewer tokens than the model's embedding rows (a vocabulary padded to a
    multiple of 64, ...) was written as is: a GGUF whose token list disagrees with token_embd, which
    llama.cpp and herd's reader refuse. convert_hf_to_gguf pads with [PAD{i}] tokens of type UNUSED."""
    _save(tmp_path / "hf")
    ckpt = read_checkpoint(tmp_path / "hf")
    n = 90

    def tokenizer_writer(w: GGUFWriter):
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(n)])
        w.add_token_types([int(TokenType.NORMAL)] * n)
        if with_scores:
            w.add_token_scores([float(-i) for i in range(n)])

    write_gguf(tmp_path / "m.gguf", ckpt.args, ckpt.state_dict, tokenizer_writer=tokenizer_writer)
    reader = GGUFReader(tmp_path / "m.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert len(tokens) == int(emb.shape[-1]) == reader.fields["llama.vocab_size"].contents() == 101
    assert tokens[:n] == [f"t{i}" for i in range(n)] and tokens[n:] == [f"[PAD{i}]" for i in range(n, 101)]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(types) == 101 and set(types[n:]) == {int(TokenType.UNUSED)}
    if with_scores:
        assert len(reader.fields["tokenizer.ggml.scores"].contents()) == 101
    back = read_checkpoint(tmp_path / "m.gguf")
    assert back.args == ckpt.args
    assert all(torch.equal(back.state_dict[k], v) for k, v in ckpt.state_dict.items())


# ---- configs herd never writes, across the short-attention boundary ------------------------------
@pytest.mark.parametrize("overrides", [
    dict(),  # explicit head_dim 12 (not 48 / 6), GQA 3
    dict(num_attention_heads=8, num_key_value_heads=1, head_dim=10, tie_word_embeddings=True, rms_norm_eps=1e-2,
         rope_scaling=dict(rope_type="yarn", factor=3.0, original_max_position_embeddings=200, beta_fast=8.0)),
], ids=["headdim-gqa3", "gqa8-tied-yarn"])
def test_logits_and_greedy_ids_equal_transformers_around_512(tmp_path, overrides):
    ref = _save(tmp_path, scale=5.0, **overrides)
    ckpt = read_checkpoint(tmp_path)
    model = build_model(ckpt.args, ckpt.state_dict)
    L = short_attention.MAX_LEN
    g = torch.Generator().manual_seed(0)
    for T in (1, 2, L - 1, L, L + 1):
        tokens = torch.randint(0, 101, (2, T), generator=g)
        with torch.no_grad():
            diff = (model(tokens) - ref(tokens).logits).abs().max().item()
        assert diff <= 1e-4, (T, diff)
    # greedy decoding, the cache growing across the boundary, from left-padded batches whose prefill
    # is masked short attention (longest prompt L) or the fused kernel (L + 2)
    for lengths in ((L, 1, L - 3), (L + 2, 5)):
        prompts = [torch.randint(0, 101, (n,), generator=g).tolist() for n in lengths]
        got = generate_batch(model, prompts, max_new_tokens=6)
        for p, c in zip(prompts, got, strict=True):
            with torch.no_grad():
                want = ref.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
            assert c.ids == want[0, len(p):].tolist(), len(p)
