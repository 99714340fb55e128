"""GGUF (llama.cpp) checkpoints: read any llama-architecture file into the canonical fp32 state
dict, write one llama.cpp and transformers can load. The file's header is parsed here (`GGUFFile`,
fast on 128k-token vocabularies); the `gguf` package dequantizes and writes.

Names map llama.cpp ↔ Meta one to one (`blk.N.attn_q` ↔ `layers.N.attention.wq`, ...). No RoPE
permutation is needed: llama.cpp's `convert_hf_to_gguf.py` permutes HF's q/k rows back to the
adjacent-pair layout Meta's weights (and our model) use, and transformers' GGUF loader reverses that
on its way in. Tied embeddings are a missing `output.weight`.

Biases (transformers' `attention_bias` / `mlp_bias`) are `blk.N.attn_{q,k,v,output}.bias` and
`blk.N.ffn_{gate,up,down}.bias`, optional tensors of llama.cpp's llama architecture; GGUF has no key
for them, so their presence decides `ModelArgs.attention_bias` / `mlp_bias` (all of a group or none:
a partial set is reported as missing tensors). convert_hf_to_gguf permutes the q/k biases with their
weights (`LlamaModel.permute` on `q_proj.bias` / `k_proj.bias`), so they too are in Meta's layout.

Llama 3.1 RoPE scaling is stored by llama.cpp not as keys but as a `rope_freqs.weight` tensor of
per-frequency divisors (convert_hf_to_gguf's `generate_extra_tensors`); we recover the four
`RopeScaling` numbers from it and write the same tensor back. (Writing `llama.rope.scaling.factor`
would be wrong: llama.cpp reads it as *linear* scaling of every frequency.) Because a small head dim
may leave the ramp between the two wavelength bounds empty, we also write the exact numbers under
`herd.rope.scaling.*` keys, which llama.cpp ignores.

Linear and YaRN scaling are llama.cpp keys: `{arch}.rope.scaling.type` = linear/yarn with
`.rope.scaling.factor`, and for yarn `.rope.scaling.original_context_length` and
`.rope.scaling.yarn_beta_fast/_slow` (what convert_hf_to_gguf writes). YaRN's optional
attention_factor / mscale / mscale_all_dim / truncate=false have no llama.cpp key with the same
meaning (llama.cpp derives the 0.1·ln(factor)+1 temperature itself), so herd keeps them under
`herd.rope.scaling.*` for its own round trip.

Dynamic NTK (transformers' rope_type "dynamic") has no llama.cpp scaling type. It is plain RoPE up to
max_position_embeddings (the file's context_length), so the file states no scaling: llama.cpp and
transformers' GGUF loader run plain RoPE, right within the context. Its factor goes under
`herd.rope.scaling.dynamic_factor` (ignored by llama.cpp) so that a GGUF → HF conversion by herd
writes the scaling back.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
    Keys,
    LlamaFileType,
    RopeScalingType,
    TokenType,
)
from gguf.constants import GGML_QUANT_VERSION
from gguf.quants import dequantize, quantize

from herd.checkpoint.common import atomic_path, check_state_dict
from herd.errors import HerdError
from herd.models.args import (
    AnyRopeScaling,
    DynamicNtkRopeScaling,
    LinearRopeScaling,
    ModelArgs,
    RopeScaling,
    YarnRopeScaling,
)
from herd.models.rope import rope_frequencies

ARCH = "llama"

_ATTN_PROJ = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
              "attn_output": "attention.wo"}
_FFN_PROJ = {"ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3"}
_LAYER_MAP = {  # llama.cpp name (under blk.N.) → Meta name (under layers.N.)
    **{f"{g}.{w}": f"{m}.{w}" for g, m in (_ATTN_PROJ | _FFN_PROJ).items() for w in ("weight", "bias")},
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_TOP_MAP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
            "output.weight": "output.weight"}
_TO_GGUF_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_TO_GGUF_TOP = {v: k for k, v in _TOP_MAP.items()}
ROPE_FREQS = "rope_freqs.weight"

# What `gguf.quants.dequantize` implements and we accept; the IQ* grids and ternary types are left
# out on purpose (llama-only K-quants and legacy quants cover what llama.cpp users publish).
Q = GGMLQuantizationType
READABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
            Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
WRITABLE = {"F32": (Q.F32, LlamaFileType.ALL_F32), "F16": (Q.F16, LlamaFileType.MOSTLY_F16),
            "BF16": (Q.BF16, LlamaFileType.MOSTLY_BF16), "Q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0)}


def from_gguf_name(name: str) -> str | None:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_MAP:
        return f"layers.{parts[1]}.{_LAYER_MAP[parts[2]]}"
    return None


def to_gguf_name(name: str) -> str:
    if name in _TO_GGUF_TOP:
        return _TO_GGUF_TOP[name]
    _, idx, rest = name.split(".", 2)
    return f"blk.{idx}.{_TO_GGUF_LAYER[rest]}"


# ---- metadata ------------------------------------------------------------------------------------
class GGUFMetadata(dict):
    """Key → Python value (strings decoded, arrays as lists), plus each key's GGUF type in
    `.types[key] = (type, array item type or None)` so fields can be written back unchanged
    (llama.cpp checks types: a token id must stay uint32)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}


# ---- parsing the file ----------------------------------------------------------------------------
# Our own header parser: `gguf.GGUFReader` makes a numpy view per string (a 128k-token vocabulary
# took ~9 s); struct over the mapped bytes, numeric arrays through np.frombuffer, takes ~0.1 s.
V = GGUFValueType
_SCALARS = {int(t): struct.Struct("<" + c) for t, c in (
    (V.UINT8, "B"), (V.INT8, "b"), (V.UINT16, "H"), (V.INT16, "h"), (V.UINT32, "I"), (V.INT32, "i"),
    (V.FLOAT32, "f"), (V.BOOL, "?"), (V.UINT64, "Q"), (V.INT64, "q"), (V.FLOAT64, "d"))}
_ARRAY_DTYPES = {t: np.dtype(s.format) for t, s in _SCALARS.items()}  # '<f4', '?', ... (little-endian)
# Tensor types GGUFReader hands out as typed arrays; every other one (BF16 included) is uint8 rows of
# blocks, (rows, bytes per row), which is what `gguf.quants.dequantize` takes.
_PLAIN_DTYPES = {Q.F32: np.dtype("<f4"), Q.F16: np.dtype("<f2"), Q.F64: np.dtype("<f8"), Q.I8: np.dtype("i1"),
                 Q.I16: np.dtype("<i2"), Q.I32: np.dtype("<i4"), Q.I64: np.dtype("<i8")}
_U32, _U64, _ARRAY_HEAD, _HEADER = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<IQ"), struct.Struct("<4sIQQ")
GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32


class GGUFTensor(NamedTuple):
    """One tensor, described as `gguf.GGUFReader` does: `shape` lists the dims fastest-first (GGUF's
    order, uint64); `data` is a read-only numpy view of the file's mapped bytes, in row-major order
    (dims reversed): typed for F32/F16/F64/I8-I64, else uint8 of shape (..., rows, bytes per row)."""
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute, in the file
    data: np.ndarray


class GGUFFile:
    """A GGUF file (v2/v3, little-endian): its metadata parsed in full and its tensors as views of
    the memory-mapped file. Every declared length and tensor extent is checked against the file
    size, so a truncated or corrupt file fails here, with one HerdError line, not later."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._src = str(self.path)
        try:
            with open(self.path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        except OSError as e:
            raise HerdError(f"{self._src}: cannot read ({e.strerror or e})") from None
        try:
            self.tensors: list[GGUFTensor] = self._parse()
        except HerdError:
            self._close()
            raise
        except Exception as e:  # a check we did not foresee: still one line, not a traceback
            self._close()
            raise HerdError(f"{self._src}: not a readable GGUF file (truncated or corrupt?): {e}") from None
        if not self.tensors:
            self._close()  # nothing maps the file any more; the views keep it open otherwise

    def _close(self) -> None:
        if isinstance(self._buf, mmap.mmap):
            self._buf.close()
        self._buf = b""

    # -- checks --
    def _truncated(self, off: int, what: str) -> HerdError:
        return HerdError(f"{self._src}: truncated GGUF file: {what} at byte {off} runs past the end of the file "
                         f"({self.size} bytes)")

    def _corrupt(self, why: str) -> HerdError:
        return HerdError(f"{self._src}: not a readable GGUF file (corrupt?): {why}")

    def _need(self, off: int, n: int, what: str) -> None:
        if off + n > self.size:
            raise self._truncated(off, what)

    # -- pieces --
    def _str(self, off: int, what: str) -> tuple[str, int]:
        self._need(off, 8, what)
        (n,) = _U64.unpack_from(self._buf, off)
        self._need(off + 8, n, what)
        try:
            return self._buf[off + 8:off + 8 + n].decode("utf-8"), off + 8 + n
        except UnicodeDecodeError:
            raise self._corrupt(f"{what} at byte {off} is not UTF-8") from None

    def _strings(self, off: int, count: int, what: str) -> tuple[list[str], int]:
        start, buf, size, unpack = off, self._buf, self.size, _U64.unpack_from
        self._need(off, 8 * count, what)  # each string takes at least its 8-byte length
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):  # the hot loop (all the tokens and merges): keep it tight
                (n,) = unpack(buf, off)
                off += 8
                end = off + n
                if end > size:
                    break
                append(buf[off:end].decode("utf-8"))
                off = end
        except struct.error:
            raise self._truncated(start, what) from None
        except UnicodeDecodeError:
            raise self._corrupt(f"{what}: string {len(out)} at byte {off} is not UTF-8") from None
        if len(out) < count:
            raise self._truncated(start, what)
        return out, off

    def _value(self, vtype: int, off: int, what: str) -> tuple[Any, GGUFValueType | None, int]:
        """→ (value, array item type or None, offset after it). Nested arrays are flattened (as
        GGUFReader does), their item type the innermost one."""
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            self._need(off, scalar.size, what)
            return scalar.unpack_from(self._buf, off)[0], None, off + scalar.size
        if vtype == V.STRING:
            s, off = self._str(off, what)
            return s, None, off
        if vtype != V.ARRAY:
            raise self._corrupt(f"{what} has unknown value type {vtype}")
        self._need(off, _ARRAY_HEAD.size, what)
        itype, count = _ARRAY_HEAD.unpack_from(self._buf, off)
        off += _ARRAY_HEAD.size
        dtype = _ARRAY_DTYPES.get(itype)
        if dtype is not None:
            self._need(off, count * dtype.itemsize, what)
            values = np.frombuffer(self._buf, dtype, count, off).tolist() if count else []
            return values, V(itype), off + count * dtype.itemsize
        if itype == V.STRING:
            values, off = self._strings(off, count, what)
            return values, V.STRING, off
        if itype != V.ARRAY:
            raise self._corrupt(f"{what} is an array of unknown value type {itype}")
        self._need(off, count * _ARRAY_HEAD.size, what)
        values, inner = [], None
        for _ in range(count):
            part, sub, off = self._value(V.ARRAY, off, what)
            values.extend(part)
            inner = inner or sub
        return values, inner or V.ARRAY, off

    # -- the whole file --
    def _parse(self) -> list[GGUFTensor]:
        buf = self._buf
        self._need(0, 4, "the magic number")
        if bytes(buf[:4]) != b"GGUF":
            raise HerdError(f"{self._src}: not a GGUF file (no GGUF magic bytes)")
        self._need(0, _HEADER.size, "the header")
        _, version, n_tensors, n_kv = _HEADER.unpack_from(buf, 0)
        if version not in GGUF_VERSIONS:
            if version & 0xFFFF == 0 and (version >> 24) in GGUF_VERSIONS:
                raise HerdError(f"{self._src}: a big-endian GGUF file, which herd does not read")
            raise HerdError(f"{self._src}: GGUF version {version} is not supported (herd reads versions 2 and 3)")
        self.version = version
        off = _HEADER.size

        meta = self.metadata = GGUFMetadata()
        seen: set[str] = set()
        self._need(off, 13 * n_kv, "the metadata")  # each key/value takes at least 13 bytes
        for i in range(n_kv):
            key, off = self._str(off, f"metadata key {i}")
            if key in seen:
                raise self._corrupt(f"metadata key {key!r} appears twice")
            seen.add(key)
            self._need(off, 4, f"the type of metadata key {key!r}")
            (vtype,) = _U32.unpack_from(buf, off)
            value, item_type, off = self._value(vtype, off + 4, f"the value of metadata key {key!r}")
            if not key.startswith("GGUF."):  # GGUFReader's names for the header fields
                meta[key] = value
                meta.types[key] = (V(vtype), item_type)

        infos = []
        self._need(off, 24 * n_tensors, "the tensor infos")  # each takes at least 24 bytes
        for i in range(n_tensors):
            name, off = self._str(off, f"the name of tensor {i}")
            self._need(off, 4, f"the info of tensor {name!r}")
            (n_dims,) = _U32.unpack_from(buf, off)
            off += 4
            self._need(off, 8 * n_dims + 12, f"the info of tensor {name!r}")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, off)
            ttype, rel = _ARRAY_HEAD.unpack_from(buf, off + 8 * n_dims)
            off += 8 * n_dims + 12
            infos.append((name, dims, ttype, rel))

        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in meta:
            if meta.types["general.alignment"] != (V.UINT32, None):
                raise self._corrupt("general.alignment is not a uint32")
            self.alignment = meta["general.alignment"]
            if self.alignment <= 0 or self.alignment & (self.alignment - 1):
                raise self._corrupt(f"general.alignment {self.alignment} is not a power of two")
        self.data_offset = -(-off // self.alignment) * self.alignment

        # Check every tensor before mapping any (a view would pin the mmap open on error).
        checked, names = [], set()
        expected = 0  # where the next tensor's data must start, relative to the data section
        for name, dims, ttype, rel in infos:
            if name in names:
                raise self._corrupt(f"tensor {name!r} appears twice")
            names.add(name)
            try:
                qtype = GGMLQuantizationType(ttype)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise self._corrupt(f"tensor {name!r} has unknown GGML type {ttype}") from None
            n_elements = math.prod(dims)
            shape = tuple(reversed(dims))
            dtype = _PLAIN_DTYPES.get(qtype)
            if dtype is None:
                if not shape or shape[-1] % block:
                    raise self._corrupt(f"tensor {name!r} of type {qtype.name} has rows of {dims[0] if dims else 0} "
                                        f"values, not a whole number of {block}-value blocks")
                dtype, shape = np.dtype(np.uint8), (*shape[:-1], shape[-1] // block * type_size)
            n_bytes = n_elements * type_size // block
            start = self.data_offset + rel
            if start + n_bytes > self.size:
                raise self._truncated(start, f"tensor {name!r} ({n_bytes} bytes)")
            # ggml's reader (gguf_init_from_file) holds every tensor to start where the previous one
            # ends, padded to the alignment: an offset or type corrupted in place otherwise reads
            # another tensor's bytes, or the wrong number of them, as weights without a word.
            if rel != expected:
                raise self._corrupt(f"tensor {name!r} has data offset {rel}, expected {expected} (the end of "
                                    f"the previous tensor, padded to {self.alignment} bytes)")
            expected += -(-n_bytes // self.alignment) * self.alignment
            checked.append((name, qtype, dims, n_elements, n_bytes, start, dtype, shape))
        return [GGUFTensor(name, qtype, np.array(dims, dtype=np.uint64), n_elements, n_bytes, start,
                           np.frombuffer(buf if n_bytes else b"", dtype, n_bytes // dtype.itemsize,
                                         start if n_bytes else 0).reshape(shape))
                for name, qtype, dims, n_elements, n_bytes, start, dtype, shape in checked]


def open_gguf(path: str | Path) -> GGUFFile:
    path = Path(path)
    if not path.is_file():
        raise HerdError(f"{path}: no such GGUF file")
    return GGUFFile(path)


def read_gguf_metadata(source: str | Path | GGUFFile) -> GGUFMetadata:
    """All key/value fields as Python values (strings decoded, arrays as lists), with their types."""
    if isinstance(source, GGUFFile):  # a copy: the caller may change it
        meta = GGUFMetadata(source.metadata)
        meta.types.update(source.metadata.types)
        return meta
    return open_gguf(source).metadata


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 → 1e-05)."""
    return float(str(np.float32(x)))


def _rope_divisors(s: RopeScaling, head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's `rope_freqs` tensor: by how much each frequency is divided."""
    return (rope_frequencies(head_dim, theta) / rope_frequencies(head_dim, theta, s)).double().numpy()


def _scaling_candidates(divisors: np.ndarray, head_dim: int, theta: float, meta: dict, arch: str):
    factor = _f32(divisors.max())
    herd = {k: meta.get(f"herd.rope.scaling.{k}") for k in
            ("factor", "low_freq_factor", "high_freq_factor", "original_context_length")}
    if None not in herd.values():
        yield RopeScaling(float(herd["factor"]), float(herd["low_freq_factor"]), float(herd["high_freq_factor"]),
                          int(herd["original_context_length"]))
    # Meta's constants (3.1: factor 8, 3.2: factor 32), the context as llama.cpp may record it.
    original = int(meta.get(f"{arch}.rope.scaling.original_context_length") or 8192)
    yield RopeScaling(factor, 1.0, 4.0, original)
    wavelen = 2 * math.pi / rope_frequencies(head_dim, theta).double().numpy()
    ramp = (divisors > 1 + 1e-5) & (divisors < factor * (1 - 1e-5))
    if ramp.sum() >= 2:
        # On the ramp 1/d = (1-s)/factor + s with s = (L/λ - lo)/(hi - lo); with lo = 1 that is
        # linear in (L, hi): L/λ - s·hi = 1 - s. (Only L/lo and hi/lo matter, so lo = 1 is no loss.)
        s = (1 / divisors[ramp] - 1 / factor) / (1 - 1 / factor)
        A = np.stack([1 / wavelen[ramp], -s], axis=1)
        (L, hi), *_ = np.linalg.lstsq(A, 1 - s, rcond=None)
        if L > 0 and hi > 1:
            for digits in (2, 4, 6):  # the short decimal it was surely written as, if that fits
                yield RopeScaling(factor, 1.0, float(round(hi, digits)), int(round(L)))
    else:
        # An empty ramp: only the two bounds matter; put them between the kept and divided bands.
        kept, divided = wavelen[divisors <= 1 + 1e-5], wavelen[divisors >= factor * (1 - 1e-5)]
        if len(kept) and len(divided):
            L = math.ceil(divided.min()) - 1
            if L > kept.max():
                yield RopeScaling(factor, 1.0, (L / kept.max() + 1) / 2, int(L))


def scaling_from_rope_freqs(divisors: np.ndarray, head_dim: int, theta: float, meta: dict | None = None,
                            arch: str = ARCH, source: str = "GGUF") -> RopeScaling | None:
    """The `RopeScaling` whose divisors equal llama.cpp's `rope_freqs` tensor (None if all 1)."""
    divisors = np.asarray(divisors, dtype=np.float64).reshape(-1)
    if divisors.shape != (head_dim // 2,):
        raise HerdError(f"{source}: {ROPE_FREQS} has {divisors.size} values, expected head_dim/2 = {head_dim // 2}")
    if np.allclose(divisors, 1.0, rtol=0, atol=1e-6):
        return None
    for cand in _scaling_candidates(divisors, head_dim, theta, meta or {}, arch):
        if np.allclose(_rope_divisors(cand, head_dim, theta), divisors, rtol=1e-4, atol=1e-6):
            return cand
    raise HerdError(f"{source}: {ROPE_FREQS} does not match Llama 3 RoPE scaling (unsupported scaling scheme)")


def _keyed_scaling(meta: dict, get: Callable[..., Any], source: str) -> AnyRopeScaling | None:
    """The linear or YaRN scaling the `rope.scaling.*` keys state, else the dynamic NTK one herd's
    own key records (None: none, or factor 1)."""
    scaling_type = str(get("rope.scaling.type", "none"))
    factor = _f32(get("rope.scaling.factor", 1.0))
    if scaling_type in ("none", "") or factor == 1.0:
        # herd's own record of a dynamic NTK scaling, which llama.cpp runs as this plain RoPE
        dynamic = meta.get("herd.rope.scaling.dynamic_factor")
        return None if dynamic is None else DynamicNtkRopeScaling(_f32(dynamic))
    if scaling_type == "linear":
        return LinearRopeScaling(factor)
    if scaling_type != "yarn":
        raise HerdError(f"{source}: RoPE scaling type {scaling_type!r} is not supported (llama3, linear, yarn or none)")

    # llama.cpp's own temperature knobs, beyond what transformers' Llama computes: refused when they
    # would change anything rather than ignored (neutral values: what llama.cpp does without them).
    for key, neutral in (("attn_factor", (1.0,)), ("yarn_attn_factor", (1.0,)), ("yarn_log_multiplier", (0.0,)),
                         ("yarn_ext_factor", (-1.0, 1.0))):
        value = get(f"rope.scaling.{key}", None)
        if value is not None and float(value) not in neutral:
            raise HerdError(f"{source}: rope.scaling.{key} = {value} is not supported (YaRN as transformers computes it)")

    def herd_key(key: str) -> float | None:
        value = meta.get(f"herd.rope.scaling.{key}")
        return None if value is None else _f32(value)

    return YarnRopeScaling(
        factor, int(get("rope.scaling.original_context_length", get("context_length", 8192))),  # llama.cpp's default
        beta_fast=_f32(get("rope.scaling.yarn_beta_fast", 32.0)),
        beta_slow=_f32(get("rope.scaling.yarn_beta_slow", 1.0)),
        attention_factor=herd_key("attention_factor"), mscale=herd_key("mscale"),
        mscale_all_dim=herd_key("mscale_all_dim"), truncate=bool(meta.get("herd.rope.scaling.truncate", True)))


def _write_keyed_scaling(writer: GGUFWriter, s: LinearRopeScaling | YarnRopeScaling) -> None:
    writer.add_rope_scaling_type(RopeScalingType.LINEAR if s.kind == "linear" else RopeScalingType.YARN)
    writer.add_rope_scaling_factor(s.factor)
    if isinstance(s, YarnRopeScaling):
        writer.add_rope_scaling_orig_ctx_len(s.original_max_position_embeddings)
        writer.add_rope_scaling_yarn_beta_fast(s.beta_fast)
        writer.add_rope_scaling_yarn_beta_slow(s.beta_slow)
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(s, key) is not None:
                writer.add_float32(f"herd.rope.scaling.{key}", getattr(s, key))
        if not s.truncate:
            writer.add_bool("herd.rope.scaling.truncate", False)


def args_from_gguf_metadata(meta: dict, *, vocab_rows: int | None = None, rope_freqs: np.ndarray | None = None,
                            tied: bool = False, attention_bias: bool = False, mlp_bias: bool = False,
                            source: str = "GGUF") -> ModelArgs:
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise HerdError(f"{source}: architecture {arch!r} is not supported (only 'llama' GGUF files)")

    def get(key: str, default: Any = KeyError) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is KeyError:
            raise HerdError(f"{source}: missing metadata key {arch}.{key}")
        if isinstance(value, list):  # per-layer values (some hybrid models); fine when uniform
            if len(set(value)) != 1:
                raise HerdError(f"{source}: per-layer {arch}.{key} = {value[:4]}... is not supported")
            value = value[0]
        return value

    def get_int(key: str, default: Any = KeyError) -> int:
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise HerdError(f"{source}: metadata {arch}.{key} must be an integer, got {value!r}")
        return value

    def get_float(key: str, default: Any = KeyError) -> float:
        # inf or NaN: an infinite norm epsilon gave a model of all-zero logits, an infinite RoPE base
        # an OverflowError traceback
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise HerdError(f"{source}: metadata {arch}.{key} must be a finite number, got {value!r}")
        return float(value)

    dim, n_heads = get_int("embedding_length"), get_int("attention.head_count")
    if dim <= 0 or n_heads <= 0:  # a 0 divided by below (ZeroDivisionError)
        raise HerdError(f"{source}: {arch}.embedding_length ({dim}) and {arch}.attention.head_count ({n_heads}) "
                        "must be positive")
    if "attention.key_length" not in {k[len(arch) + 1:] for k in meta} and dim % n_heads:
        # llama.cpp asserts the same (n_embd % n_head == 0) when no key_length gives the head size
        raise HerdError(f"{source}: {arch}.embedding_length ({dim}) is not divisible by "
                        f"{arch}.attention.head_count ({n_heads})")
    head_dim = get_int("attention.key_length", dim // n_heads)
    if get_int("attention.value_length", head_dim) != head_dim:
        raise HerdError(f"{source}: key and value head dims differ, which Llama does not do")
    rope_dim = get_int("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise HerdError(f"{source}: partial rotary embeddings (rope.dimension_count {rope_dim} of "
                        f"head dim {head_dim}) are not supported")
    theta = get_float("rope.freq_base", 10000.0)
    scaling = _keyed_scaling(meta, get, source)
    if rope_freqs is not None:
        # two scalings at once: llama.cpp would apply both, transformers neither way. (herd's dynamic
        # NTK key beside the tensor is no such conflict: llama.cpp ignores the key; the tensor wins.)
        if scaling is not None and not isinstance(scaling, DynamicNtkRopeScaling):
            raise HerdError(f"{source}: both {ROPE_FREQS} and rope.scaling.type {scaling.kind!r}: unsupported")
        scaling = scaling_from_rope_freqs(rope_freqs, head_dim, theta, meta, arch, source)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get_int("vocab_size") if f"{arch}.vocab_size" in meta else None
    if vocab is None:
        vocab = len(tokens) if tokens is not None else vocab_rows
    if vocab is None:
        raise HerdError(f"{source}: cannot tell the vocabulary size (no {arch}.vocab_size, tokens or embedding)")
    if tokens is not None and len(tokens) != int(vocab):
        raise HerdError(f"{source}: vocabulary mismatch: tokenizer has {len(tokens)} tokens, model {vocab}")
    return ModelArgs(
        dim=dim, n_layers=get_int("block_count"), n_heads=n_heads,
        n_kv_heads=get_int("attention.head_count_kv", n_heads), vocab_size=int(vocab),
        ffn_hidden_dim=get_int("feed_forward_length"),
        head_dim=None if head_dim == dim // n_heads else head_dim,
        norm_eps=_f32(get_float("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=_f32(theta),
        rope_scaling=scaling, max_seq_len=get_int("context_length", 8192), tie_embeddings=tied,
        attention_bias=attention_bias, mlp_bias=mlp_bias,
    )


# ---- reading -------------------------------------------------------------------------------------
def dequantize_tensor(t, source: str = "GGUF") -> torch.Tensor:
    """One GGUF tensor → fp32 torch tensor in PyTorch's (rows, cols) order."""
    if t.tensor_type not in READABLE:
        raise HerdError(f"{source}: tensor {t.name!r} has quantization type {t.tensor_type.name}, which herd "
                        f"cannot read (supported: {', '.join(q.name for q in READABLE)})")
    if t.data.nbytes != t.n_bytes:
        raise HerdError(f"{source}: tensor {t.name!r} is cut short (truncated file?)")
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
    arr = dequantize(t.data, t.tensor_type).reshape(shape)
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))


def _args(reader: GGUFFile, meta: GGUFMetadata, source: str) -> ModelArgs:
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise HerdError(f"{source}: architecture {arch!r} is not supported (only 'llama' GGUF files)")
    by_name = {t.name: t for t in reader.tensors}
    rope = dequantize_tensor(by_name[ROPE_FREQS], source).numpy() if ROPE_FREQS in by_name else None
    emb = by_name.get("token_embd.weight")

    def has_bias(group: dict[str, str]) -> bool:  # any layer's: a partial set fails as missing tensors
        return any(n.startswith("blk.") and n.endswith(".bias") and n.split(".")[2] in group for n in by_name)

    return args_from_gguf_metadata(meta, vocab_rows=None if emb is None else int(emb.shape[-1]),
                                   rope_freqs=rope, tied="output.weight" not in by_name,
                                   attention_bias=has_bias(_ATTN_PROJ), mlp_bias=has_bias(_FFN_PROJ), source=source)


def read_gguf_args(path: str | Path) -> ModelArgs:
    """Just the config (metadata and tensor names; no weights dequantized)."""
    reader = open_gguf(path)
    return _args(reader, read_gguf_metadata(reader), str(path))


def read_gguf(path: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor], GGUFMetadata]:
    """→ (args, canonical fp32 state dict, the file's metadata)."""
    path = Path(path)
    reader = open_gguf(path)
    meta = read_gguf_metadata(reader)
    source = str(path)
    args = _args(reader, meta, source)
    by_name = {t.name: t for t in reader.tensors}
    # Check types, names and shapes before dequantizing anything (cheap, and a clear error first).
    shapes = {}
    for name, t in by_name.items():
        if t.tensor_type not in READABLE:
            dequantize_tensor(t, source)  # raises the unsupported-type error
        if name == ROPE_FREQS:
            continue
        canon = from_gguf_name(name)
        if canon is None:
            raise HerdError(f"{source}: unexpected tensor {name!r} for a dense llama model")
        shapes[canon] = torch.empty(tuple(int(d) for d in reversed(t.shape.tolist())), device="meta")
    check_state_dict(shapes, args, source)
    sd = {}
    for name, t in by_name.items():
        if name == ROPE_FREQS:
            continue
        w = sd[from_gguf_name(name)] = dequantize_tensor(t, source)
        # Random or damaged bytes in a block's f16 scale field dequantize (as gguf.quants does) to
        # inf/NaN weights, which loaded silently and made every logit NaN; llama.cpp's
        # ggml_validate_row_data refuses such scales too. One line naming the tensor instead.
        if not torch.isfinite(w).all():
            raise HerdError(f"{source}: tensor {name!r} ({t.tensor_type.name}) holds {(~torch.isfinite(w)).sum().item()} "
                            f"inf/NaN weights after dequantization (corrupt scales?)")
    return args, check_state_dict(sd, args, source), meta


# ---- writing -------------------------------------------------------------------------------------
def _gguf_dtype(dtype: str | None) -> str:
    key = (dtype or "F32").upper().replace("FLOAT32", "F32").replace("FLOAT16", "F16").replace("BFLOAT16", "BF16")
    if key not in WRITABLE:
        raise HerdError(f"GGUF output type {dtype!r} is not supported (choose {', '.join(WRITABLE)})")
    return key


def _encode(t: torch.Tensor, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    arr = t.detach().to(torch.float32).contiguous().numpy()
    if t.ndim == 1 or qtype == Q.F32:
        return arr, None  # norms stay F32, as llama.cpp requires
    if qtype == Q.F16:
        return arr.astype(np.float16), None
    if qtype == Q.Q8_0 and arr.shape[-1] % 32:
        return arr.astype(np.float16), None  # llama.cpp's fallback for rows not a multiple of a block
    return quantize(arr, qtype), qtype


def copy_fields(writer: GGUFWriter, source_metadata: dict, prefixes: tuple[str, ...],
                skip: Collection[str] = ()) -> None:
    """Copy the fields whose keys start with `prefixes` into `writer`, with their original GGUF types
    when `source_metadata` is a `GGUFMetadata` (else inferred)."""
    types = getattr(source_metadata, "types", {})
    for key, value in source_metadata.items():
        if not key.startswith(prefixes) or key in skip:
            continue
        if key in types:
            vtype, sub = types[key]
        else:  # a plain dict: infer, with llama.cpp's uint32 for token ids
            vtype = GGUFValueType.get_type(value)
            sub = GGUFValueType.get_type(value[0]) if isinstance(value, list) and value else None
            if vtype == GGUFValueType.INT32 and key.endswith("_id"):
                vtype = GGUFValueType.UINT32
        if vtype == GGUFValueType.ARRAY and not value:
            continue
        writer.add_key_value(key, value, vtype, sub)


def _pad_vocabulary(writer: GGUFWriter, vocab_size: int) -> None:
    """Pad the token list a tokenizer wrote up to the model's vocabulary, as convert_hf_to_gguf does
    (`[PAD{i}]`, type UNUSED): a model whose embedding has more rows than its tokenizer has tokens
    (vocabularies padded to a multiple of 64, ...) was written with the shorter list, a file that
    llama.cpp and herd's own reader refuse (their vocabulary is the token list's length)."""
    kv = writer.kv_data[0]
    tokens = kv.get(Keys.Tokenizer.LIST)
    if tokens is None or len(tokens.value) >= vocab_size:
        return  # a longer list is the reader's vocabulary mismatch to report
    n = len(tokens.value)
    tokens.value = [*tokens.value, *(f"[PAD{i}]" for i in range(n, vocab_size))]
    for key, pad in ((Keys.Tokenizer.TOKEN_TYPE, int(TokenType.UNUSED)), (Keys.Tokenizer.SCORES, -1000.0)):
        if key in kv and len(kv[key].value) == n:
            kv[key].value = [*kv[key].value, *([pad] * (vocab_size - n))]


def write_gguf(path: str | Path, args: ModelArgs, sd: dict[str, torch.Tensor], *, dtype: str | None = None,
               tokenizer_writer: Callable[[GGUFWriter], None] | None = None,
               source_metadata: dict | None = None, name: str | None = None) -> None:
    """Write a llama GGUF atomically. `dtype`: F32 (default), F16, BF16 or Q8_0 for the matrices.

    Tokenizer fields come from `tokenizer_writer(writer)` if given, else are copied (with their
    original types) from `source_metadata`, the metadata of the GGUF this model was read from;
    `general.*` descriptive fields are copied from it too."""
    sd = check_state_dict(sd, args, "model")
    key = _gguf_dtype(dtype)
    qtype, ftype = WRITABLE[key]
    with atomic_path(path) as tmp:
        writer = GGUFWriter(os.fspath(tmp), ARCH)
        try:
            skip = {"general.architecture", "general.file_type", "general.quantization_version"}
            if source_metadata:
                copy_fields(writer, source_metadata, ("general.",), skip)
            if name:
                writer.add_name(name)
            elif not (source_metadata or {}).get("general.name"):
                writer.add_name("herd export")
            # The hyper-parameters llama.cpp's convert_hf_to_gguf writes for a LlamaForCausalLM.
            writer.add_vocab_size(args.vocab_size)
            writer.add_context_length(args.max_seq_len)
            writer.add_embedding_length(args.dim)
            writer.add_block_count(args.n_layers)
            writer.add_feed_forward_length(args.ffn_dim)
            writer.add_rope_dimension_count(args.hd)
            writer.add_head_count(args.n_heads)
            writer.add_head_count_kv(args.kv_heads)
            if args.hd != args.dim // args.n_heads:
                writer.add_key_length(args.hd)
                writer.add_value_length(args.hd)
            writer.add_rope_freq_base(args.rope_theta)
            writer.add_layer_norm_rms_eps(args.norm_eps)
            writer.add_file_type(ftype)
            writer.add_quantization_version(GGML_QUANT_VERSION)
            s = args.rope_scaling
            if isinstance(s, DynamicNtkRopeScaling):
                # No llama.cpp key: plain RoPE, which is what dynamic NTK computes up to the
                # context_length written above (module docstring); the factor for herd alone.
                writer.add_float32("herd.rope.scaling.dynamic_factor", s.factor)
                s = None
            elif s is not None and not isinstance(s, RopeScaling):
                _write_keyed_scaling(writer, s)
                s = None  # no rope_freqs tensor: that one is llama3's
            if s is not None:
                writer.add_float32("herd.rope.scaling.factor", s.factor)
                writer.add_float32("herd.rope.scaling.low_freq_factor", s.low_freq_factor)
                writer.add_float32("herd.rope.scaling.high_freq_factor", s.high_freq_factor)
                writer.add_uint32("herd.rope.scaling.original_context_length", s.original_max_position_embeddings)
            if tokenizer_writer is not None:
                tokenizer_writer(writer)
                _pad_vocabulary(writer, args.vocab_size)
            elif source_metadata:
                copy_fields(writer, source_metadata, ("tokenizer.",))

            if s is not None:
                writer.add_tensor(ROPE_FREQS, _rope_divisors(s, args.hd, args.rope_theta).astype(np.float32))
            for canon, t in sd.items():
                arr, raw = _encode(t, qtype)
                writer.add_tensor(to_gguf_name(canon), arr, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
