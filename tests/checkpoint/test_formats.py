"""Random small models written as HF, Meta (one and two model-parallel shards) and GGUF: every
reader gives back the same weights and logits, and the references — transformers on the HF
directory and on our GGUF, the `gguf` package's own quantizer — agree."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from herd.checkpoint import build_model, detect_format, read_args, read_checkpoint, write_checkpoint
from herd.checkpoint.gguf import scaling_from_rope_freqs
from herd.models.args import PRESETS, ModelArgs, RopeScaling
from herd.models.llama3 import Transformer

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # GQA ratio 4, llama3 RoPE scaling with an original context of 32 (positions below go past it).
    "debug": PRESETS["debug"],
    # GQA ratio 3, tied embeddings, Llama 3.2's factor 32; dim 48 is not a multiple of the Q8_0
    # block, so those matrices take llama.cpp's F16 fallback.
    "gqa3-tied": ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=320, multiple_of=32,
                           rope_theta=10000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 64),
                           max_seq_len=512, tie_embeddings=True),
    # A foreign shape: explicit head dim (≠ dim/n_heads) and FFN width; no RoPE scaling, so
    # transformers' GGUF loader (which ignores llama.cpp's rope_freqs) can be a reference too.
    "head-dim-ffn": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_hidden_dim=96,
                              vocab_size=256, rope_theta=10000.0, norm_eps=1e-6, max_seq_len=128),
}
POSITIONS = torch.arange(100, 124)  # beyond every original context above


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    g = torch.Generator().manual_seed(seed)
    model = Transformer(args)
    model.init_weights(std=0.3, generator=g)  # large weights: a wrong row shows in the logits
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5, generator=g)  # norms ≠ 1, so a swapped norm shows too
    return model.eval()


def equivalent(a: ModelArgs, b: ModelArgs) -> bool:
    """Same model: the FFN width may be stated directly or through Meta's sizing rule."""
    def norm(x):
        return dataclasses.replace(x, ffn_hidden_dim=x.ffn_dim, multiple_of=256, ffn_dim_multiplier=None)
    return norm(a) == norm(b)


def logits(model, tokens):
    with torch.no_grad():
        if isinstance(model, Transformer):
            return model(tokens, positions=POSITIONS.expand_as(tokens))
        return model(tokens, position_ids=POSITIONS.expand_as(tokens)).logits


@pytest.fixture(scope="module", params=list(CONFIGS))
def written(request, tmp_path_factory):
    """One random model per config, written in every format once."""
    args = CONFIGS[request.param]
    model = random_model(args)
    sd = {k: v for k, v in model.state_dict().items() if not (args.tie_embeddings and k == "output.weight")}
    root = tmp_path_factory.mktemp(request.param)
    paths = {"hf": root / "hf", "meta": root / "meta", "meta-mp2": root / "meta-mp2", "gguf": root / "m.gguf",
             "gguf-q8": root / "q8.gguf"}
    write_checkpoint(paths["hf"], "hf", args, sd)
    write_checkpoint(paths["meta"], "meta", args, sd)
    write_checkpoint(paths["meta-mp2"], "meta", args, sd, model_parallel=2)
    write_checkpoint(paths["gguf"], "gguf", args, sd)
    write_checkpoint(paths["gguf-q8"], "gguf", args, sd, dtype="q8_0")
    tokens = torch.randint(0, args.vocab_size, (2, len(POSITIONS)), generator=torch.Generator().manual_seed(1))
    return request.param, args, model, sd, paths, tokens


@pytest.mark.parametrize("fmt", ["hf", "meta", "meta-mp2", "gguf"])
def test_exact_round_trip(written, fmt):
    name, args, model, sd, paths, tokens = written
    assert detect_format(paths[fmt]) == fmt.split("-")[0]
    ckpt = read_checkpoint(paths[fmt])
    assert equivalent(ckpt.args, args) and equivalent(read_args(paths[fmt]), args), ckpt.args
    assert ckpt.state_dict.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(ckpt.state_dict[k], v), k
    assert torch.equal(logits(build_model(ckpt.args, ckpt.state_dict), tokens), logits(model, tokens))


def test_meta_shards_are_meta_layout(written):
    """Two ranks as fairscale lays them out: column-parallel on dim 0, row-parallel on dim 1, the
    embedding on the vocabulary (VocabParallelEmbedding), norms replicated."""
    name, args, model, sd, paths, tokens = written
    s0, s1 = (torch.load(paths["meta-mp2"] / f"consolidated.0{i}.pth", weights_only=True) for i in (0, 1))
    assert torch.equal(torch.cat([s0["layers.0.attention.wq.weight"], s1["layers.0.attention.wq.weight"]]),
                       sd["layers.0.attention.wq.weight"])
    assert torch.equal(torch.cat([s0["layers.1.feed_forward.w2.weight"], s1["layers.1.feed_forward.w2.weight"]], 1),
                       sd["layers.1.feed_forward.w2.weight"])
    assert s0["tok_embeddings.weight"].shape == (args.vocab_size // 2, args.dim)
    assert torch.equal(s1["norm.weight"], sd["norm.weight"])
    assert "output.weight" in s0  # Meta's model has a separate output layer even when tied


def test_transformers_reads_our_hf_directory(written):
    name, args, model, sd, paths, tokens = written
    ref = transformers.LlamaForCausalLM.from_pretrained(paths["hf"], dtype=torch.float32).eval()
    torch.testing.assert_close(logits(ref, tokens), logits(model, tokens), rtol=0, atol=1e-4)


def test_transformers_reads_our_gguf(written):
    name, args, model, sd, paths, tokens = written
    if args.rope_scaling is not None:
        pytest.skip("transformers' GGUF loader ignores llama.cpp's rope_freqs tensor")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        paths["gguf"].parent, gguf_file=paths["gguf"].name, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(ref, tokens), logits(model, tokens), rtol=0, atol=1e-4)


def test_q8_0_equals_gguf_quantizer(written):
    """Q8_0 weights read back are exactly the `gguf` package's quantize→dequantize of the originals
    (F16 where a row is not a whole number of 32-blocks, as llama.cpp does); logits stay close."""
    name, args, model, sd, paths, tokens = written
    ckpt = read_checkpoint(paths["gguf-q8"])
    for k, v in sd.items():
        w = v.numpy()
        if v.ndim == 1:
            want = w
        elif w.shape[-1] % 32:
            want = w.astype(np.float16).astype(np.float32)
        else:
            want = dequantize(quantize(w, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
        assert np.array_equal(ckpt.state_dict[k].numpy(), want), k
    ours, exact = logits(build_model(ckpt.args, ckpt.state_dict), tokens), logits(model, tokens)
    # std-0.3 random weights amplify rounding; these bounds hold with margin (measured ≥ 0.9988, ≥ 0.92).
    assert torch.nn.functional.cosine_similarity(ours.flatten(), exact.flatten(), dim=0) > 0.995
    assert (ours.argmax(-1) == exact.argmax(-1)).float().mean() > 0.85


def test_meta_reference_reads_our_meta_checkpoint(tmp_path, meta_reference):
    """llama-models' own Llama 3 Transformer loads our consolidated.00.pth strictly from our
    params.json (a foreign FFN width included) and computes the same logits."""
    llama3_model, llama3_args, _ = meta_reference
    for args in (ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                           ffn_dim_multiplier=1.3, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), max_seq_len=64),
                 ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=256, ffn_hidden_dim=100,
                           rope_theta=10000.0, max_seq_len=64)):
        model = random_model(args, seed=3)
        write_checkpoint(tmp_path / "m", "meta", args, model.state_dict())
        import json
        params = json.loads((tmp_path / "m" / "params.json").read_text())
        ref = llama3_model.Transformer(llama3_args.ModelArgs(max_seq_len=64, max_batch_size=1, **params))
        ref.load_state_dict(torch.load(tmp_path / "m" / "consolidated.00.pth", weights_only=True), strict=True)
        tokens = torch.randint(0, args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(ref(tokens, 0), model(tokens), rtol=0, atol=1e-4)


def test_meta_reshard_agrees_with_our_merge(written, meta_reference):
    """llama-models' `reshard_mp` (MP 2 → 1) merges our two shards into the same dict we read."""
    name, args, model, sd, paths, tokens = written
    _, _, checkpoint = meta_reference
    shards = [torch.load(paths["meta-mp2"] / f"consolidated.0{i}.pth", weights_only=True) for i in (0, 1)]
    merged = checkpoint.reshard_mp(shards, size=1, rank=0)
    ours = read_checkpoint(paths["meta-mp2"]).state_dict
    for k, v in ours.items():
        assert torch.equal(merged[k], v), k


def _llama_cpp_rope_freqs(theta, dim, factor, low_freq_factor, high_freq_factor, old_context_len):
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.generate_extra_tensors`, transcribed."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(1)
        elif wavelen > low_freq_wavelen:
            out.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("preset", ["llama3.1-8b", "llama3.2-1b", "llama3.1-405b"])
def test_rope_scaling_recovered_from_llama_cpp_rope_freqs(preset):
    """A llama.cpp GGUF carries Llama 3.1/3.2 scaling only as rope_freqs; we recover the numbers."""
    args = PRESETS[preset]
    s = args.rope_scaling
    divisors = _llama_cpp_rope_freqs(args.rope_theta, args.hd, s.factor, s.low_freq_factor, s.high_freq_factor,
                                      s.original_max_position_embeddings)
    assert scaling_from_rope_freqs(divisors, args.hd, args.rope_theta) == s
    # Without the Meta constants to try first, the ramp alone pins them down.
    odd = RopeScaling(16.0, 1.0, 8.0, 4096)
    divisors = _llama_cpp_rope_freqs(args.rope_theta, args.hd, 16.0, 1.0, 8.0, 4096)
    assert scaling_from_rope_freqs(divisors, args.hd, args.rope_theta) == odd
    assert scaling_from_rope_freqs(np.ones(args.hd // 2), args.hd, args.rope_theta) is None


class _FakeTokenizer:
    """What write_checkpoint needs of herd.tokenizer's tokenizers: save(dir, layout), write_gguf(writer)."""

    def __init__(self, n_tokens: int):
        self.n_tokens, self.saved = n_tokens, []

    def save(self, directory, layout="hf"):
        (directory / "tokenizer.json").write_text("{}")
        self.saved.append(layout)

    def write_gguf(self, writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(self.n_tokens)])
        writer.add_bos_token_id(0)


def test_tokenizer_travels_with_the_weights(tmp_path):
    args = CONFIGS["debug"]
    tok = _FakeTokenizer(args.vocab_size)
    sd = random_model(args).state_dict()
    for fmt in ("hf", "meta"):
        write_checkpoint(tmp_path / fmt, fmt, args, sd, tokenizer=tok)
        assert (tmp_path / fmt / "tokenizer.json").exists()
        assert read_checkpoint(tmp_path / fmt).format == fmt  # extra files do not confuse the reader
    assert tok.saved == ["hf", "meta"]
    write_checkpoint(tmp_path / "m.gguf", "gguf", args, sd, tokenizer=tok)
    meta = read_checkpoint(tmp_path / "m.gguf").metadata
    assert len(meta["tokenizer.ggml.tokens"]) == args.vocab_size and meta["tokenizer.ggml.bos_token_id"] == 0


def test_build_model_ties_and_materializes(written):
    name, args, model, sd, paths, tokens = written
    built = build_model(args, sd)
    assert not built.training and all(not p.is_meta for p in built.parameters())
    assert not any(b.is_meta for b in built.buffers())
    tied = built.output.weight.data_ptr() == built.tok_embeddings.weight.data_ptr()
    assert tied == args.tie_embeddings
    assert built.output.weight is built.tok_embeddings.weight or not args.tie_embeddings
