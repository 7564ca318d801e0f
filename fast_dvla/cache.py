"""A preallocated KV cache that stores complete blocks only.

Slot ``p`` of the buffer holds the keys/values of sequence position ``p``.
``length`` is the number of leading slots whose keys/values are final (the
prefix plus complete blocks, left to right). A forward over a window of
positions ``[start, end)`` writes its keys/values into those slots as
scratch and attends over ``[0, read_len)``. The block-causal decoders start
every window at or after ``length``, so the final region is only read;
Fast-dLLM's refresh forward starts at 0 and rewrites it (its cache is an
approximation by design). The buffer is allocated once, at full length.

The object is duck-typed for transformers: attention layers call
``update(key, value, layer_idx)`` and get back the keys/values to attend to.
"""
from __future__ import annotations

import torch


class BlockKVCache:
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0
        self._write: tuple[int, int] | None = None
        self._read_len = 0

    def begin_forward(self, start: int, end: int, read_len: int | None = None) -> None:
        """Declare the next forward: queries at positions ``[start, end)``,
        attending over slots ``[0, read_len)`` (default ``end``)."""
        read_len = end if read_len is None else read_len
        if start > self.length:
            raise RuntimeError(f"window starts at {start} but only {self.length} slots are final: a gap")
        if not (0 <= start < end <= read_len <= self.max_len):
            raise ValueError(f"bad window [{start}, {end}) reading {read_len} of {self.max_len} slots")
        self._write = (start, end)
        self._read_len = read_len

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self._write is None:
            raise RuntimeError("BlockKVCache.update called outside begin_forward()")
        start, end = self._write
        if key.shape[-2] != end - start:
            raise RuntimeError(f"got {key.shape[-2]} new keys for a window of {end - start}")
        self.keys[layer_idx][:, :, start:end] = key
        self.values[layer_idx][:, :, start:end] = value
        return self.keys[layer_idx][:, :, : self._read_len], self.values[layer_idx][:, :, : self._read_len]

    def commit(self, length: int) -> None:
        """Mark slots ``[0, length)`` final. The cache only grows left to right."""
        if length < self.length:
            raise RuntimeError(f"cache cannot shrink from {self.length} to {length}")
        if self._write is not None and length > self._write[1]:
            raise RuntimeError(f"cannot mark {length} slots final: the last forward wrote up to {self._write[1]}")
        self.length = length

    # transformers may ask these of a cache object
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    @property
    def is_compileable(self) -> bool:
        return False
