"""The one source of attention masks for every backend.

Positions are laid out as ``[prefix | block 0 | block 1 | ... | block N-1]``.
``block_id(p) = -1`` for prefix positions and ``(p - prefix_len) // block_size``
for action positions. The student (block-causal) rule is
``visible(q, k) = block_id(k) <= block_id(q)``: the prefix is bidirectional
among itself and blind to actions, action blocks see the prefix and every
earlier block, bidirectionally inside their own block. The teacher sees
everything (``bidirectional``). See docs/design.md#attention-masks.

A forward's attention is described once, by an :class:`AttentionLayout`;
every backend derives what it reads from it: the dense boolean mask (SDPA),
the additive float mask (eager), the FlexAttention block mask, or the cache
length of the fused kernels (triton, flash).

Padded batches (rows whose prefixes differ in length, left-padded to one
``prefix_len``): the layout's ``pad_lens`` says how many leading slots of each
row are padding. Those keys are hidden from every query, and a padding slot's
own query sees only itself (so it never attends over nothing and never makes
NaN; its output is never used). See docs/design.md#padded-batches.

Boolean masks use ``True`` = may attend (the SDPA convention).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

BLOCK_CAUSAL = "block_causal"
BIDIRECTIONAL = "bidirectional"
MASK_KINDS = (BLOCK_CAUSAL, BIDIRECTIONAL)


def block_ids(positions: torch.Tensor, prefix_len: int, block_size: int) -> torch.Tensor:
    """Block index of each absolute position (-1 for the prefix)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    rel = positions - prefix_len
    return torch.where(rel < 0, torch.full_like(rel, -1), torch.div(rel, block_size, rounding_mode="floor"))


def check_kind(kind: str) -> str:
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
    return kind


def visible(
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    prefix_len: int,
    block_size: int,
    kind: str = BLOCK_CAUSAL,
) -> torch.Tensor:
    """``[Q, K]`` boolean: may query position ``q`` attend to key position ``k``."""
    if check_kind(kind) == BIDIRECTIONAL:
        return torch.ones(q_positions.numel(), k_positions.numel(), dtype=torch.bool, device=q_positions.device)
    qb = block_ids(q_positions, prefix_len, block_size)
    kb = block_ids(k_positions, prefix_len, block_size)
    return kb[None, :] <= qb[:, None]


def to_additive(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean mask -> additive float mask (0 where visible, dtype-min elsewhere).

    transformers' ``eager`` attention adds the mask to the scores; a boolean
    mask there would be silently wrong.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"expected a boolean mask, got {mask.dtype}")
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~mask, torch.finfo(dtype).min)


@dataclass(frozen=True)
class AttentionLayout:
    """One forward's attention: queries at absolute positions
    ``q_start .. q_start + q_len`` over keys ``0 .. kv_len`` of
    ``[prefix (prefix_len) | blocks of block_size]``, under mask ``kind``
    (:data:`BLOCK_CAUSAL` or :data:`BIDIRECTIONAL`).

    ``pad_lens`` (optional, one int per batch row): row ``b``'s first
    ``pad_lens[b]`` slots are left padding, hidden from every query; a padding
    slot's query sees only its own key. None: no row is padded, and every mask
    is the batch-independent ``[1, 1, q_len, kv_len]`` one.

    Frozen and hashable: the masks derived from it are memoised per layout
    and device (a decode sees only a handful of distinct windows; a padded
    decode one padding pattern).
    """

    prefix_len: int
    block_size: int
    q_start: int
    q_len: int
    kv_len: int
    kind: str = BLOCK_CAUSAL
    pad_lens: tuple[int, ...] | None = None

    def __post_init__(self):
        check_kind(self.kind)
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.prefix_len < 0 or self.q_start < 0 or self.q_len <= 0 or self.q_start + self.q_len > self.kv_len:
            raise ValueError(f"bad layout: queries [{self.q_start}, {self.q_start + self.q_len}) over "
                             f"{self.kv_len} keys, prefix {self.prefix_len}")
        if self.pad_lens is not None:
            object.__setattr__(self, "pad_lens", check_pad_lens(self.pad_lens, self.prefix_len))

    @classmethod
    def full(cls, prefix_len: int, block_size: int, length: int, kind: str = BLOCK_CAUSAL) -> "AttentionLayout":
        """An uncached forward over the whole sequence ``[0, length)`` (training, uncached decoding)."""
        return cls(prefix_len, block_size, 0, length, length, kind)

    @property
    def padded(self) -> bool:
        return self.pad_lens is not None

    def dense_mask(self, device: torch.device | str = "cpu", key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """4D boolean mask ``[B or 1, 1, q_len, kv_len]`` (the SDPA form; ``B`` rows when ``pad_lens``
        is set).

        ``key_valid`` (``[B, kv_len]`` bool, optional) hides further key positions.
        Without it the mask is memoised: treat it as read-only.
        """
        mask = _dense(self, torch.device(device))
        if key_valid is not None:
            if key_valid.shape[-1] != self.kv_len:
                raise ValueError(f"key_valid covers {key_valid.shape[-1]} keys, mask has {self.kv_len}")
            mask = mask & key_valid[:, None, None, :].to(torch.bool)
        return mask

    def additive_mask(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """The dense mask in additive form (transformers' ``eager``); memoised, read-only."""
        return _additive(self, dtype, torch.device(device))

    def flex_block_mask(self, device: torch.device | str = "cpu"):
        """The same rule as a FlexAttention ``BlockMask``; memoised."""
        return _flex(self, torch.device(device))

    def pad_lens_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``pad_lens`` as an int32 tensor ``[B]`` (a fused kernel's per-row key start); memoised, read-only."""
        if self.pad_lens is None:
            raise ValueError("the layout has no pad_lens: no row is padded")
        return _pad_lens_tensor(self.pad_lens, torch.device(device))

    @property
    def fused_cache_len(self) -> int | None:
        """The cache length when the forward is "cache unmasked + in-flight
        blocks block-causal", the shape the fused kernels compute; else None
        (the prefix forward, the teacher, Fast-dLLM windows), and backends
        use the dense mask instead. With ``pad_lens`` the cache of row ``b``
        starts with ``pad_lens[b]`` padding slots, which a kernel must skip."""
        aligned = self.q_start >= self.prefix_len and (self.q_start - self.prefix_len) % self.block_size == 0
        if self.kind == BLOCK_CAUSAL and aligned and self.kv_len == self.q_start + self.q_len:
            return self.q_start
        return None


def check_pad_lens(pad_lens, prefix_len: int) -> tuple[int, ...]:
    """``pad_lens`` as a tuple of ints, each in ``[0, prefix_len)`` (every row keeps a real prefix token)."""
    # plain ints only: the layout is hashed (the masks' memo) and a tensor would hash by identity
    if isinstance(pad_lens, torch.Tensor) or not isinstance(pad_lens, (tuple, list)) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in pad_lens):
        raise TypeError(f"pad_lens must be a tuple of ints (one per batch row), got {pad_lens!r}")
    pad_lens = tuple(pad_lens)
    if not pad_lens or not all(0 <= p < prefix_len for p in pad_lens):
        raise ValueError(f"pad_lens must hold one count per row, each in [0, prefix_len={prefix_len}) so that "
                         f"every row keeps a real prefix token, got {pad_lens}")
    return pad_lens


def hide_padding(rule: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """``rule [1, 1, Q, K]`` -> ``[B, 1, Q, K]`` for rows with ``pad [B]`` leading padding slots: padding keys
    hidden from every query, and a padding query sees only its own key (a query that saw no key would
    give NaN; its output is never used)."""
    real_key = k_pos[None, :] >= pad[:, None]                          # [B, K]
    pad_query = q_pos[None, :] < pad[:, None]                          # [B, Q]
    own_key = q_pos[:, None] == k_pos[None, :]                         # [Q, K]
    return torch.where(pad_query[:, None, :, None], own_key[None, None], rule & real_key[:, None, None, :])


# bounded: a long-lived process (a policy server, a benchmark sweep) sees new shapes now and then
@functools.lru_cache(maxsize=128)
def _dense(layout: AttentionLayout, device: torch.device) -> torch.Tensor:
    q_pos = torch.arange(layout.q_start, layout.q_start + layout.q_len, device=device)
    k_pos = torch.arange(layout.kv_len, device=device)
    rule = visible(q_pos, k_pos, layout.prefix_len, layout.block_size, layout.kind)[None, None]
    if layout.pad_lens is None:
        return rule
    return hide_padding(rule, q_pos, k_pos, layout.pad_lens_tensor(device))


@functools.lru_cache(maxsize=128)
def _pad_lens_tensor(pad_lens: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(pad_lens, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=128)
def _additive(layout: AttentionLayout, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return to_additive(layout.dense_mask(device), dtype)


@functools.lru_cache(maxsize=64)
def _flex(layout: AttentionLayout, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    prefix_len, block_size, q_start = layout.prefix_len, layout.block_size, layout.q_start
    bidirectional = layout.kind == BIDIRECTIONAL

    def mask_mod(b, h, q_idx, kv_idx):
        if bidirectional:
            return kv_idx >= 0
        q_pos = q_idx + q_start
        qb = torch.where(q_pos < prefix_len, -1, (q_pos - prefix_len) // block_size)
        kb = torch.where(kv_idx < prefix_len, -1, (kv_idx - prefix_len) // block_size)
        return kb <= qb

    if layout.pad_lens is None:
        return create_block_mask(mask_mod, B=None, H=None, Q_LEN=layout.q_len, KV_LEN=layout.kv_len, device=device)
    pad = layout.pad_lens_tensor(device)

    def padded_mask_mod(b, h, q_idx, kv_idx):  # hide_padding's rule, per element
        q_pos = q_idx + q_start
        return torch.where(q_pos < pad[b], kv_idx == q_pos, mask_mod(b, h, q_idx, kv_idx) & (kv_idx >= pad[b]))

    return create_block_mask(padded_mask_mod, B=len(layout.pad_lens), H=None, Q_LEN=layout.q_len,
                             KV_LEN=layout.kv_len, device=device)


def dense_mask(
    prefix_len: int,
    block_size: int,
    q_start: int,
    q_len: int,
    kv_len: int,
    kind: str = BLOCK_CAUSAL,
    key_valid: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Shorthand for ``AttentionLayout(...).dense_mask(device, key_valid)``."""
    return AttentionLayout(prefix_len, block_size, q_start, q_len, kv_len, kind).dense_mask(device, key_valid)


def flex_block_mask(
    prefix_len: int,
    block_size: int,
    q_start: int,
    q_len: int,
    kv_len: int,
    kind: str = BLOCK_CAUSAL,
    device: torch.device | str = "cpu",
):
    """Shorthand for ``AttentionLayout(...).flex_block_mask(device)``."""
    return AttentionLayout(prefix_len, block_size, q_start, q_len, kv_len, kind).flex_block_mask(device)
