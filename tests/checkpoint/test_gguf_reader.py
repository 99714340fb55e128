"""herd's own GGUF header parser (`GGUFFile`) against `gguf.GGUFReader`, the reference: every
metadata key, value and type, and every tensor's name, type, shape and raw bytes, are the same on
the real SmolLM2 file, on files herd's writer makes and on one with every value type; a truncated
or corrupt file, wherever it is cut, is one clear HerdError line."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from herd.checkpoint import read_checkpoint
from herd.checkpoint.gguf import GGUFFile, open_gguf, read_gguf_args, read_gguf_metadata, write_gguf
from herd.errors import HerdError
from herd.models.args import PRESETS
from tests.reference import random_state_dict

V = GGUFValueType
ARGS = PRESETS["debug"]  # Llama 3.1 RoPE scaling, so a rope_freqs tensor too


def assert_same_as_reference(path) -> GGUFFile:
    ours, ref = open_gguf(path), GGUFReader(path)
    meta = read_gguf_metadata(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(meta) == keys  # same keys, in file order
    for key in keys:
        field = ref.fields[key]
        want, is_array = field.contents(), field.types[0] == V.ARRAY
        got = meta[key]
        assert got == want and type(got) is type(want), key
        if is_array:
            assert {type(x) for x in got} == {type(x) for x in want}, key  # int stays int, float float
        assert meta.types[key] == (field.types[0], field.types[-1] if is_array else None), key
    assert (ours.alignment, ours.data_offset) == (ref.alignment, ref.data_offset)
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert a.tensor_type == b.tensor_type, a.name
        assert a.shape.dtype == np.uint64 and a.shape.tolist() == b.shape.tolist(), a.name
        assert (a.n_elements, a.n_bytes, a.data_offset) == (b.n_elements, b.n_bytes, b.data_offset), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert a.data.tobytes() == b.data.tobytes(), a.name
        assert not a.data.flags.writeable
    return ours


def tokenizer_writer(w: GGUFWriter) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    tokens = ["<s>", "</s>", "", "é", "日本", "Ġthe", "\n", "🦙"] + [f"t{i}" for i in range(ARGS.vocab_size - 8)]
    w.add_token_list(tokens)
    w.add_token_types([1] * 5 + [3] * (ARGS.vocab_size - 5))
    w.add_token_scores([float(-i) / 3 for i in range(ARGS.vocab_size)])
    w.add_token_merges(["Ġ t", "h e", "日 本"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")


@pytest.fixture(scope="module")
def state_dict():
    return random_state_dict(ARGS)


@pytest.fixture(scope="module")
def q8_gguf(state_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "q8.gguf"
    write_gguf(path, ARGS, state_dict, dtype="Q8_0", tokenizer_writer=tokenizer_writer)
    return path


# ---- the same as gguf.GGUFReader -----------------------------------------------------------------
def test_smollm2_same_as_gguf_reader(smollm2_gguf):
    ours = assert_same_as_reference(smollm2_gguf)
    assert {t.tensor_type for t in ours.tensors} == {Q.F32, Q.Q8_0, Q.Q4_1}
    assert ours.metadata["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(ours.metadata["tokenizer.ggml.merges"]) == 48900
    assert read_gguf_args(smollm2_gguf).vocab_size == 49152


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "Q8_0"])
def test_herd_written_same_as_gguf_reader(state_dict, tmp_path, dtype):
    write_gguf(tmp_path / "m.gguf", ARGS, state_dict, dtype=dtype, tokenizer_writer=tokenizer_writer)
    ours = assert_same_as_reference(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type for t in ours.tensors}
    assert types["blk.0.attn_q.weight"] == Q[dtype] and types["blk.0.attn_norm.weight"] == Q.F32
    assert types["rope_freqs.weight"] == Q.F32
    ckpt = read_checkpoint(tmp_path / "m.gguf")
    a = ckpt.args
    assert (a.dim, a.n_layers, a.ffn_dim, a.vocab_size, a.rope_scaling) == (
        ARGS.dim, ARGS.n_layers, ARGS.ffn_dim, ARGS.vocab_size, ARGS.rope_scaling)
    assert ckpt.metadata.types["tokenizer.ggml.token_type"] == (V.ARRAY, V.INT32)
    if dtype == "F32":
        assert all(torch.equal(ckpt.state_dict[k], v) for k, v in state_dict.items())


def test_every_value_and_tensor_type(tmp_path):
    w = GGUFWriter(str(tmp_path / "all.gguf"), "llama")
    w.add_custom_alignment(64)
    for vtype, value in [(V.UINT8, 255), (V.INT8, -128), (V.UINT16, 65535), (V.INT16, -32768),
                         (V.UINT32, 2**32 - 1), (V.INT32, -(2**31)), (V.UINT64, 2**64 - 1), (V.INT64, -(2**63)),
                         (V.FLOAT32, 1e-5), (V.FLOAT64, 1 / 3), (V.BOOL, True), (V.STRING, "naïve 日本 🦙")]:
        w.add_key_value(f"test.{vtype.name.lower()}", value, vtype)
        w.add_key_value(f"test.array.{vtype.name.lower()}", [value] * 3, V.ARRAY, vtype)
    w.add_key_value("test.bools", [True, False, True], V.ARRAY, V.BOOL)
    w.add_key_value("test.strings", ["", "a", "\x00b", "é" * 300], V.ARRAY, V.STRING)
    w.add_key_value("test.nested", [[1, 2], [3], [4, 5, 6]], V.ARRAY)  # GGUFReader flattens these
    rng = np.random.default_rng(0)
    w.add_tensor("f32.3d", rng.standard_normal((2, 3, 64)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((5, 32)).astype(np.float16))
    w.add_tensor("f64", rng.standard_normal(7))
    w.add_tensor("i8", rng.integers(-128, 127, (3, 4), dtype=np.int8))
    w.add_tensor("i32", rng.integers(-9, 9, 11, dtype=np.int32))
    w.add_tensor("scalar-ish", np.ones(1, np.float32))
    w.add_tensor("empty", np.zeros((0, 4), np.float32))
    for qtype, (rows, bytes_per_row) in {Q.Q4_0: (3, 2 * 18), Q.Q6_K: (2, 210), Q.BF16: (4, 2 * 16),
                                         Q.IQ4_NL: (2, 18)}.items():
        w.add_tensor(qtype.name, rng.integers(0, 0x3C, (rows, bytes_per_row), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = assert_same_as_reference(tmp_path / "all.gguf")
    assert ours.alignment == 64 and ours.data_offset % 64 == 0
    assert ours.metadata["test.nested"] == [1, 2, 3, 4, 5, 6]
    assert ours.metadata["test.float32"] == float(np.float32(1e-5))
    by_name = {t.name: t for t in ours.tensors}
    assert by_name["Q6_K"].data.shape == (2, 210) and by_name["f32.3d"].data.shape == (2, 3, 64)
    assert by_name["empty"].data.shape == (0, 4)
    # A GGUFFile's metadata handed out is a copy, types included.
    meta = read_gguf_metadata(ours)
    meta["test.uint8"] = 0
    meta.types.clear()
    assert ours.metadata["test.uint8"] == 255 and ours.metadata.types["test.uint8"] == (V.UINT8, None)


# ---- hand-made files -----------------------------------------------------------------------------
def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _file(kvs: list[bytes], tensors: list[tuple[str, tuple[int, ...], int, int]] = (), data: bytes = b"",
          version: int = 3) -> bytes:
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs)
    for name, dims, ttype, offset in tensors:
        out += _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)
    return out + b"\0" * (-len(out) % 32) + data


def test_empty_array_keeps_its_item_type(tmp_path):
    # GGUFWriter cannot write one; GGUFReader gives (ARRAY, ARRAY) since it learns the item type
    # from the first item. We keep the declared one.
    (tmp_path / "e.gguf").write_bytes(_file([_kv("a.empty", V.ARRAY, struct.pack("<IQ", V.UINT32, 0)),
                                             _kv("a.none", V.ARRAY, struct.pack("<IQ", V.STRING, 0))]))
    meta = read_gguf_metadata(tmp_path / "e.gguf")
    assert meta == {"a.empty": [], "a.none": []} and GGUFReader(tmp_path / "e.gguf").fields["a.empty"].contents() == []
    assert meta.types == {"a.empty": (V.ARRAY, V.UINT32), "a.none": (V.ARRAY, V.STRING)}


CORRUPT = {
    "bad magic": (b"GGUX" + _file([])[4:], "not a GGUF file"),
    "version 1": (_file([], version=1), "GGUF version 1 is not supported"),
    "big-endian": (_file([], version=3 << 24), "big-endian GGUF"),
    "unknown value type": (_file([_kv("k", 99, b"\0" * 8)]), "'k' has unknown value type 99"),
    "unknown array type": (_file([_kv("k", V.ARRAY, struct.pack("<IQ", 77, 1) + b"\0" * 8)]), "unknown value type 77"),
    "key not UTF-8": (_file([_kv(b"\xff\xfe", V.UINT8, b"\1")]), "is not UTF-8"),
    "string not UTF-8": (_file([_kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 2) + _s("ok") + _s(b"\xc3("))]),
                         "string 1 at byte .* is not UTF-8"),
    "duplicate key": (_file([_kv("k", V.UINT8, b"\1"), _kv("k", V.UINT8, b"\2")]), "'k' appears twice"),
    "duplicate tensor": (_file([], [("t", (4,), Q.F32, 0), ("t", (4,), Q.F32, 0)], b"\0" * 16), "'t' appears twice"),
    "unknown tensor type": (_file([], [("t", (4,), 999, 0)], b"\0" * 64), "unknown GGML type 999"),
    "partial block": (_file([], [("t", (40,), Q.Q8_0, 0)], b"\0" * 64), "not a whole number of 32-value blocks"),
    "alignment 48": (_file([_kv("general.alignment", V.UINT32, struct.pack("<I", 48))]), "not a power of two"),
    "alignment uint64": (_file([_kv("general.alignment", V.UINT64, struct.pack("<Q", 32))]), "not a uint32"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_file_is_one_herd_error(tmp_path, case):
    content, match = CORRUPT[case]
    (tmp_path / "c.gguf").write_bytes(content)
    with pytest.raises(HerdError, match=match) as e:
        read_gguf_metadata(tmp_path / "c.gguf")
    assert "\n" not in str(e.value) and len(str(e.value)) < 400 and "c.gguf" in str(e.value)


# ---- truncated files -----------------------------------------------------------------------------
def _cut_points(path) -> dict[str, int]:
    """Byte counts to keep: in each section, and at the seams between them."""
    ref = GGUFReader(path)
    tokens = ref.fields["tokenizer.ggml.tokens"]
    first, mid = ref.tensors[0].field.offset, ref.tensors[len(ref.tensors) // 2]
    last = ref.tensors[-1]
    return {"empty": 0, "magic": 3, "counts": 15, "first key": 30,
            "key length": ref.fields["general.architecture"].offset + 4,
            "token strings": tokens.offset + 500, "token types": ref.fields["tokenizer.ggml.token_type"].offset + 40,
            "end of metadata": first, "tensor name": first + 12, "tensor dims": mid.field.offset + 8 + len(mid.name) + 6,
            "end of tensor infos": last.field.offset + sum(int(p.nbytes) for p in last.field.parts),
            "padding": ref.data_offset - 1, "start of data": ref.data_offset,
            "middle of a tensor": mid.data_offset + mid.n_bytes // 2, "last byte": last.data_offset + last.n_bytes - 1}


def test_truncated_anywhere_is_one_herd_error(q8_gguf, tmp_path):
    data = q8_gguf.read_bytes()
    for where, keep in _cut_points(q8_gguf).items():
        assert 0 <= keep < len(data), where
        cut = tmp_path / f"cut-{keep}.gguf"
        cut.write_bytes(data[:keep])
        for read in (open_gguf, read_gguf_metadata, read_gguf_args, read_checkpoint):
            with pytest.raises(HerdError, match="truncated") as e:
                read(cut)
            msg = str(e.value)
            assert "\n" not in msg and len(msg) < 400 and cut.name in msg, (where, msg)
        cut.unlink()


def test_corrupt_lengths_read_as_truncated(q8_gguf, tmp_path):
    data = bytearray(q8_gguf.read_bytes())
    ref = GGUFReader(q8_gguf)
    tokens, t0 = ref.fields["tokenizer.ggml.tokens"], ref.tensors[0]
    n_tokens_at = tokens.offset + 8 + len(tokens.name) + 4 + 4  # after key, value type, item type
    for at, value, what in [(16, 2**40, "the metadata"), (8, 2**40, "the tensor infos"),
                            (n_tokens_at, 2**50, "tokenizer.ggml.tokens"),
                            (n_tokens_at + 8, 2**60, "tokenizer.ggml.tokens"),  # the first token's length
                            (t0.field.offset + 8 + len(t0.name) + 4 + 8 * len(t0.shape) + 4, 2**40, t0.name)]:
        bad = bytearray(data)
        struct.pack_into("<Q", bad, at, value)
        (tmp_path / "bad.gguf").write_bytes(bad)
        with pytest.raises(HerdError, match=f"truncated GGUF file: .*{what}"):
            open_gguf(tmp_path / "bad.gguf")
