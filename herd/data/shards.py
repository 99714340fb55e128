"""Token shards on disk and the packed, resumable loader that reads them.

Layout of a shards directory (written atomically: built under a temporary name, fsynced, renamed):

    meta.json             vocab_size, dtype, per split: documents, tokens, shard names
    train-00000.bin       uint32 token ids of whole documents, back to back
    train-00000.idx       int64 document start offsets into the .bin, plus the end (n_docs + 1)
    val-00000.bin / .idx  the held-out validation split, same format

`PackedLoader` memory-maps one split and yields fixed (B, T+1) windows cut from the documents
concatenated in a seed-dependent order, packed across document boundaries (SPEC §3: attention is
masked between documents packed into one sequence, so each row carries per-token document ids).
A batch is a pure function of (seed, epoch, token offset): `state_dict()` is that position, and a
resumed run continues at exactly the next batch.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from herd.errors import HerdError
from herd.files import atomic_write

FORMAT_VERSION = 1
TOKEN_DTYPE = np.uint32
SPLITS = ("train", "val")


# ---- writing ------------------------------------------------------------------------------------
def fsync_tree(root: Path) -> None:
    """fsync every file under `root` and the directories themselves, so a rename that follows
    publishes data that is already on disk (DESIGN principle 12)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_dir(tmp: Path, dest: Path) -> None:
    """fsync `tmp`, then rename it onto `dest` (replacing an old `dest`) and fsync the parent."""
    fsync_tree(tmp)
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old)
    else:
        tmp.rename(dest)
    _fsync_dir(dest.parent)


def _is_val(doc_index: int, val_fraction: float, seed: int) -> bool:
    """Deterministic split by a hash of the document's index (stable across runs and machines)."""
    if val_fraction <= 0:
        return False
    h = zlib.crc32(f"{seed}:{doc_index}".encode()) / 2**32
    return h < val_fraction


class _SplitWriter:
    def __init__(self, root: Path, split: str, shard_tokens: int):
        self.root, self.split, self.shard_tokens = root, split, shard_tokens
        self.shards: list[dict] = []
        self.documents = self.tokens = 0
        self._buf: list[np.ndarray] = []
        self._buf_tokens = 0

    def add(self, doc: np.ndarray) -> None:
        self._buf.append(doc)
        self._buf_tokens += len(doc)
        self.documents += 1
        self.tokens += len(doc)
        if self._buf_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        name = f"{self.split}-{len(self.shards):05d}"
        lengths = np.array([len(d) for d in self._buf], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.concatenate(self._buf).astype(TOKEN_DTYPE).tofile(self.root / f"{name}.bin")
        offsets.tofile(self.root / f"{name}.idx")
        self.shards.append({"name": name, "documents": len(self._buf), "tokens": int(offsets[-1])})
        self._buf, self._buf_tokens = [], 0


def remove_orphaned_temps(out: Path) -> None:
    """Delete `.OUT.tmp-PID` directories left by a killed writer (PID no longer running): a SIGKILL
    during a first run's shard preparation otherwise leaves one behind for good."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def write_shards(documents: Iterable[Sequence[int]], out: str | os.PathLike, vocab_size: int, *,
                 val_fraction: float = 0.05, shard_tokens: int = 1 << 24, seed: int = 0,
                 tokenizer: str | None = None, val_split: str = "documents") -> Path:
    """Write token-id documents as train/val shards under `out`, atomically. Empty documents are
    dropped. `val_split="documents"` holds out whole documents (by a hash of their index);
    `"tails"` holds out the last `val_fraction` of every document instead, so near-duplicate
    documents (two editions of one play) put their twin passages on the same side. Returns `out`."""
    if val_split not in ("documents", "tails"):
        raise HerdError(f"val_split {val_split!r}: choose documents or tails")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temps(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writers = {s: _SplitWriter(tmp, s, shard_tokens) for s in SPLITS}
        max_id = -1
        for i, doc in enumerate(documents):
            arr = np.asarray(doc, dtype=np.int64)
            if arr.size == 0:
                continue
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= vocab_size:
                raise HerdError(f"document {i}: token id {lo if lo < 0 else hi} outside the vocabulary "
                                f"(vocab_size={vocab_size})")
            max_id = max(max_id, hi)
            if val_split == "tails":
                cut = len(arr) - int(len(arr) * val_fraction)
                writers["train"].add(arr[:cut])
                if cut < len(arr):
                    writers["val"].add(arr[cut:])
            else:
                writers["val" if _is_val(i, val_fraction, seed) else "train"].add(arr)
        for w in writers.values():
            w.flush()
        if writers["train"].tokens == 0:
            raise HerdError("empty corpus: no training tokens to write")
        meta = {"format": FORMAT_VERSION, "dtype": "uint32", "vocab_size": vocab_size, "max_token_id": max_id,
                "tokenizer": tokenizer,
                "splits": {s: {"documents": w.documents, "tokens": w.tokens, "shards": w.shards}
                           for s, w in writers.items()}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- a tiny built-in way to make shards (the real pipeline is herd/data's other stages) ----------
BYTE_VOCAB = 258  # 256 byte values, then BOS (256) and EOS (257)
BYTE_BOS, BYTE_EOS = 256, 257


def byte_tokenize(text: str) -> list[int]:
    """Byte-level ids with BOS/EOS: a tokenizer that needs no files, for tests and smoke runs."""
    return [BYTE_BOS, *text.encode("utf-8"), BYTE_EOS]


def text_documents(paths: Iterable[str | os.PathLike], split_on_blank_lines: bool = False) -> Iterator[str]:
    for p in paths:
        try:
            text = Path(p).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise HerdError(f"{p}: cannot read ({e.strerror})") from None
        if split_on_blank_lines:
            yield from (d for d in text.split("\n\n") if d.strip())
        elif text.strip():
            yield text


def shards_from_texts(texts: Iterable[str], out: str | os.PathLike, tokenizer: str = "bytes", **kw) -> Path:
    """Tokenize texts (one document each) with `tokenizer` ("bytes", or a herd tokenizer name such
    as "llama3") and write shards."""
    if tokenizer == "bytes":
        return write_shards((byte_tokenize(t) for t in texts), out, BYTE_VOCAB, tokenizer="bytes", **kw)
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    docs = (tok.encode(t, bos=True, eos=True) for t in texts)
    return write_shards(docs, out, tok.vocab_size, tokenizer=tokenizer, **kw)


def python_stdlib_files(limit: int | None = None) -> list[Path]:
    """The interpreter's own standard library sources: real text that is always installed offline
    (the issue's code domain)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    return files[:limit] if limit else files


# ---- reading ------------------------------------------------------------------------------------
def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise HerdError(f"{path}: not a shards directory (no meta.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise HerdError(f"{path / 'meta.json'}: corrupt ({e})") from None
    if meta.get("format") != FORMAT_VERSION or "splits" not in meta:
        raise HerdError(f"{path / 'meta.json'}: unsupported shards format {meta.get('format')!r}")
    return meta


@dataclass
class _Split:
    tokens: list[np.memmap]  # per shard
    starts: np.ndarray  # (n_docs,) global document index → (shard, offset, length)
    shard_of: np.ndarray
    lengths: np.ndarray


def _open_split(path: Path, meta: dict, split: str) -> _Split:
    info = meta["splits"].get(split)
    if not info or not info["shards"]:
        raise HerdError(f"{path}: the {split!r} split is empty")
    tokens, starts, shard_of, lengths = [], [], [], []
    for k, sh in enumerate(info["shards"]):
        bin_path, idx_path = path / f"{sh['name']}.bin", path / f"{sh['name']}.idx"
        try:
            n_bytes = bin_path.stat().st_size
            offsets = np.fromfile(idx_path, dtype=np.int64)
        except OSError as e:
            raise HerdError(f"{path}: missing shard file ({e.filename})") from None
        itemsize = np.dtype(TOKEN_DTYPE).itemsize
        if n_bytes != sh["tokens"] * itemsize:
            raise HerdError(f"{bin_path}: truncated or corrupt shard ({n_bytes} bytes, meta.json says "
                            f"{sh['tokens']} tokens = {sh['tokens'] * itemsize} bytes)")
        if (len(offsets) != sh["documents"] + 1 or offsets[0] != 0 or offsets[-1] != sh["tokens"]
                or np.any(np.diff(offsets) <= 0)):
            raise HerdError(f"{idx_path}: corrupt document index")
        mm = np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r")
        tokens.append(mm)
        starts.append(offsets[:-1])
        lengths.append(np.diff(offsets))
        shard_of.append(np.full(sh["documents"], k, dtype=np.int64))
    return _Split(tokens, np.concatenate(starts), np.concatenate(shard_of), np.concatenate(lengths))


@dataclass
class PackedBatch:
    """tokens (B, T+1) int64; doc_ids (B, T+1) int64, document number within its row (0, 1, ...)."""

    tokens: torch.Tensor
    doc_ids: torch.Tensor

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    def to(self, device) -> PackedBatch:
        return PackedBatch(self.tokens.to(device), self.doc_ids.to(device))


class PackedLoader:
    """Fixed (batch_size, seq_len + 1) windows over one split, packed across documents.

    Epoch e orders the documents by a permutation drawn from (seed, e); a batch is B consecutive
    windows of seq_len + 1 tokens of that concatenation starting at the loader's offset (the tail
    of an epoch that does not fill a batch is dropped). The shape may change between batches
    (`set_shape`); at a fixed shape, batch i is windows [j·B, (j+1)·B) of epoch i // batches_per_epoch.
    """

    def __init__(self, path: str | os.PathLike, *, batch_size: int, seq_len: int, split: str = "train",
                 seed: int = 0, vocab_size: int | None = None):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        if vocab_size is not None and self.meta["vocab_size"] != vocab_size:
            raise HerdError(f"{self.path}: vocabulary mismatch: shards were tokenized with vocab_size="
                            f"{self.meta['vocab_size']} ({self.meta.get('tokenizer')}), the model has "
                            f"vocab_size={vocab_size}")
        self.split, self.seed = split, seed
        self._data = _open_split(self.path, self.meta, split)
        self.total_tokens = int(self._data.lengths.sum())
        self.set_shape(batch_size, seq_len)
        self.epoch, self.offset = 0, 0  # where the next batch starts
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    # ---- resumable position: (epoch, token offset into that epoch's document stream) ----
    def set_shape(self, batch_size: int, seq_len: int) -> None:
        """Change the batch shape from the next batch on (SPEC §3.4: batch size and sequence length
        grow during pre-training); the position in the stream is kept, so nothing is skipped or
        repeated."""
        if batch_size * (seq_len + 1) > self.total_tokens:
            raise HerdError(f"{self.path}: the {self.split!r} split has {self.total_tokens} tokens, fewer "
                            f"than one batch of {batch_size} × {seq_len + 1}")
        self.batch_size, self.seq_len, self.window = batch_size, seq_len, seq_len + 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "split"):
            if state.get(k) != getattr(self, k):
                raise HerdError(f"data loader state has {k}={state.get(k)}, this run has {getattr(self, k)}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        need = self.batch_size * self.window
        if self.offset + need > self.total_tokens:  # the tail that does not fill a batch is dropped
            self.epoch, self.offset = self.epoch + 1, 0
        batch = self._batch_at(self.epoch, self.offset)
        self.offset += need
        return batch

    # ---- pure functions of (seed, epoch, offset) ----
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._data.lengths))
            ends = np.cumsum(self._data.lengths[order])
            self._epoch_cache = (epoch, order, ends)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _window(self, order: np.ndarray, ends: np.ndarray, lo: int) -> tuple[np.ndarray, np.ndarray]:
        hi = lo + self.window
        first = int(np.searchsorted(ends, lo, side="right"))  # document containing stream position lo
        toks, ids = [], []
        pos, k = lo, first
        while pos < hi:
            doc = order[k]
            doc_start_in_stream = ends[k] - self._data.lengths[doc]
            a, b = pos - doc_start_in_stream, min(hi, ends[k]) - doc_start_in_stream
            base = self._data.starts[doc]
            toks.append(self._data.tokens[self._data.shard_of[doc]][base + a: base + b])
            ids.append(np.full(b - a, k - first, dtype=np.int64))
            pos += b - a
            k += 1
        return np.concatenate(toks).astype(np.int64), np.concatenate(ids)

    def _batch_at(self, epoch: int, offset: int) -> PackedBatch:
        order, ends = self._epoch(epoch)
        rows = [self._window(order, ends, offset + r * self.window) for r in range(self.batch_size)]
        tokens = np.stack([t for t, _ in rows])
        # Sizes are checked when the shards open; the ids only here, as they are read (one pass over
        # a batch is nothing next to a step): a shard overwritten in place otherwise fails as an
        # index error inside the embedding, or trains on nonsense ids within the vocabulary.
        largest = self.meta.get("max_token_id", self.meta["vocab_size"] - 1)
        if tokens.size and int(tokens.max()) > largest:
            raise HerdError(f"{self.path}: token id {int(tokens.max())} in the {self.split!r} split is beyond "
                            f"the shards' largest id ({largest}): a corrupt shard; rebuild it")
        return PackedBatch(torch.from_numpy(tokens), torch.from_numpy(np.stack([d for _, d in rows])))

    def batch(self, index: int) -> PackedBatch:
        """Batch `index` of a run at the current shape from the start (validation uses a fixed set)."""
        epoch, j = divmod(index, self.batches_per_epoch)
        return self._batch_at(epoch, j * self.batch_size * self.window)

    @property
    def batches_per_epoch(self) -> int:
        return self.total_tokens // (self.batch_size * self.window)


# ---- pieces for writers that produce shards in parallel (herd/data/pipeline.py) ------------------
def write_shard_files(root: str | os.PathLike, name: str, docs: Sequence[Sequence[int]]) -> dict:
    """Write one shard `root/name.bin` + `.idx` (the format above) from whole token documents and
    return its meta.json entry. Several processes may each write their own names into one
    directory; `write_meta` then lists them."""
    root = Path(root)
    arrs = [np.asarray(d, dtype=TOKEN_DTYPE) for d in docs if len(d)]
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrs], dtype=np.int64)]).astype(np.int64)
    # atomically: the pipeline marks a unit done right after its shards are written, and after a
    # power cut (not just a kill) that marker must not outlive a partial shard
    atomic_write(root / f"{name}.bin", (np.concatenate(arrs) if arrs else np.zeros(0, TOKEN_DTYPE)).tofile)
    atomic_write(root / f"{name}.idx", offsets.tofile)
    return {"name": name, "documents": len(arrs), "tokens": int(offsets[-1])}


def write_meta(root: str | os.PathLike, vocab_size: int, shards: dict[str, list[dict]], *,
               max_token_id: int, tokenizer: str | None = None) -> dict:
    """Write `root/meta.json` listing per split the shard entries from `write_shard_files` (empty
    shards are left out). PackedLoader reads the result."""
    splits = {}
    for s in SPLITS:
        entries = [e for e in shards.get(s, []) if e["documents"]]
        splits[s] = {"documents": sum(e["documents"] for e in entries),
                     "tokens": sum(e["tokens"] for e in entries), "shards": entries}
    if splits["train"]["tokens"] == 0:
        raise HerdError("empty corpus: no training tokens to write")
    meta = {"format": FORMAT_VERSION, "dtype": "uint32", "vocab_size": vocab_size, "max_token_id": max_token_id,
            "tokenizer": tokenizer, "splits": splits}
    (Path(root) / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta
