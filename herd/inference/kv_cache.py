"""A preallocated key/value cache for one batch of sequences (DESIGN principle 6).

Keys and values of every layer live in two tensors sized for the longest sequence the batch may
reach, so decoding never reallocates. The model writes new positions at `offset` and reads
[0, offset + T); `advance` moves the offset once all layers have written.
"""

from __future__ import annotations

import torch

from herd.errors import HerdError
from herd.models.args import ModelArgs


class KVCache:
    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_len > args.max_seq_len:
            raise HerdError(f"cache of {max_len} positions exceeds the model's context of {args.max_seq_len}")
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

    def advance(self, n: int) -> None:
        self.offset += n

    def reset(self) -> None:
        self.offset = 0

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
