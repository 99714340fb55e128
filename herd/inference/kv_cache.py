"""A preallocated key/value cache for one batch of sequences (DESIGN principle 6).

Keys and values of every layer live in two tensors sized for the longest sequence the batch may
reach, so decoding never reallocates. The model writes new positions at `offset` and reads
[0, offset + T); `advance` moves the offset once all layers have written.
"""

from __future__ import annotations

import torch

from herd.errors import HerdError
from herd.models.args import ModelArgs


class _Positions:
    """Position bookkeeping every cache shares: `offset` positions are stored."""

    offset: int = 0

    def advance(self, n: int) -> None:
        self.offset += n

    def reset(self) -> None:
        self.offset = 0


def _check_len(args, max_len: int, padding: int) -> None:
    """`padding`: how many of the slots hold a row's left padding, not positions. A left-padded
    batch (herd/inference/generate.py) lets each row run to the end of the context, so its cache
    has up to that many slots more than the context has positions."""
    if max_len - padding > args.max_seq_len:
        raise HerdError(f"cache of {max_len - padding} positions exceeds the model's context of {args.max_seq_len}")


class KVCache(_Positions):
    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", padding: int = 0):
        _check_len(args, max_len, padding)
        shape = (args.n_layers, batch_size, args.kv_heads, max_len, args.hd)  # (L, B, K, S_max, d)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.offset = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.offset + k.shape[2]
        if end > self.max_len:
            raise HerdError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, self.offset:end] = k
        self.v[layer, :, :, self.offset:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class StaticKVCache(KVCache):
    """The fixed-shape variant torch.compile needs (gpt-fast's): keys/values are written at the
    positions in the tensor `input_pos` — a tensor, so a new position does not recompile — and every
    call returns all `max_len` positions; the caller's mask hides the ones not yet written. Position
    bookkeeping is the caller's, so `advance` does nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_pos = torch.zeros(1, dtype=torch.long, device=self.k.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, self.input_pos, k)
        self.v[layer].index_copy_(2, self.input_pos, v)
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        pass


class ChunkedKVCache(_Positions):
    """Llama 4's cache (iRoPE, SPEC §1): the NoPE layers attend to the whole context and keep every
    position, as KVCache does; the chunked-attention RoPE layers keep only the last
    `attention_chunk_size - 1` positions, all a later query can still see (its chunk started at
    most that far back, whatever a row's left padding). For Scout (chunk 8192, 3 of every 4 layers
    chunked) a long context costs a quarter of KVCache's memory plus a fixed 8191 positions.

    `local_start` is the cache index of the oldest key a chunked layer's `update` returns; the model
    builds those layers' mask over cache indices local_start .. offset + T (llama4.Transformer).
    """

    def __init__(self, args, batch_size: int, max_len: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", padding: int = 0):
        _check_len(args, max_len, padding)
        if not args.attention_chunk_size:
            raise HerdError("ChunkedKVCache needs a model with chunked attention (attention_chunk_size)")
        self.chunk = args.attention_chunk_size
        self.is_local = [not args.is_nope_layer(i) for i in range(args.n_layers)]
        self.slot: list[int] = []  # layer → index in its kind's tensors
        n_global = n_local = 0
        for local in self.is_local:
            self.slot.append(n_local if local else n_global)
            n_local, n_global = n_local + local, n_global + (not local)
        K, d = args.kv_heads, args.hd
        window = min(self.chunk - 1, max_len)
        self.k = torch.zeros((n_global, batch_size, K, max_len, d), dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.local_k = torch.zeros((n_local, batch_size, K, window, d), dtype=dtype, device=device)
        self.local_v = torch.zeros_like(self.local_k)
        self.max_len = max_len
        self.offset = 0

    @property
    def local_start(self) -> int:
        return max(0, self.offset - (self.chunk - 1))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.offset + k.shape[2]
        if end > self.max_len:
            raise HerdError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        i = self.slot[layer]
        if not self.is_local[layer]:
            self.k[i, :, :, self.offset:end] = k
            self.v[i, :, :, self.offset:end] = v
            return self.k[i, :, :, :end], self.v[i, :, :, :end]
        n = self.offset - self.local_start
        keys = torch.cat([self.local_k[i, :, :, :n], k], dim=2)
        values = torch.cat([self.local_v[i, :, :, :n], v], dim=2)
        keep = min(self.chunk - 1, keys.shape[2])
        if keep:
            self.local_k[i, :, :, :keep] = keys[:, :, keys.shape[2] - keep:]
            self.local_v[i, :, :, :keep] = values[:, :, values.shape[2] - keep:]
        return keys, values

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.local_k, self.local_v))


def new_cache(args, batch_size: int, max_len: int, **kwargs):
    """The cache a model needs for generation: ChunkedKVCache for a model with chunked-attention
    layers (Llama 4), else KVCache."""
    chunked = getattr(args, "attention_chunk_size", None) and not all(
        args.is_nope_layer(i) for i in range(args.n_layers))
    return (ChunkedKVCache if chunked else KVCache)(args, batch_size, max_len, **kwargs)
