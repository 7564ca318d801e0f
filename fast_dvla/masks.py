"""The one source of attention masks for every backend.

Positions are laid out as ``[prefix | block 0 | block 1 | ... | block N-1]``.
``block_id(p) = -1`` for prefix positions and ``(p - prefix_len) // block_size``
for action positions. The student (block-causal) rule is
``visible(q, k) = block_id(k) <= block_id(q)``: the prefix is bidirectional
among itself and blind to actions, action blocks see the prefix and every
earlier block, bidirectionally inside their own block. The teacher sees
everything (``bidirectional``).

Boolean masks use ``True`` = may attend (the SDPA convention).
"""
from __future__ import annotations

import torch

BLOCK_CAUSAL = "block_causal"
BIDIRECTIONAL = "bidirectional"
TOKEN_CAUSAL = "token_causal"  # only used by tests to show a wrong mask is caught
MASK_KINDS = (BLOCK_CAUSAL, BIDIRECTIONAL, TOKEN_CAUSAL)


def block_ids(positions: torch.Tensor, prefix_len: int, block_size: int) -> torch.Tensor:
    """Block index of each absolute position (-1 for the prefix)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    rel = positions - prefix_len
    return torch.where(rel < 0, torch.full_like(rel, -1), torch.div(rel, block_size, rounding_mode="floor"))


def visible(
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    prefix_len: int,
    block_size: int,
    kind: str = BLOCK_CAUSAL,
) -> torch.Tensor:
    """``[Q, K]`` boolean: may query position ``q`` attend to key position ``k``."""
    if kind == BIDIRECTIONAL:
        return torch.ones(q_positions.numel(), k_positions.numel(), dtype=torch.bool, device=q_positions.device)
    if kind == TOKEN_CAUSAL:
        return k_positions[None, :] <= q_positions[:, None]
    if kind != BLOCK_CAUSAL:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
    qb = block_ids(q_positions, prefix_len, block_size)
    kb = block_ids(k_positions, prefix_len, block_size)
    return kb[None, :] <= qb[:, None]


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
    """4D boolean mask ``[B or 1, 1, q_len, kv_len]`` for queries at absolute
    positions ``q_start .. q_start + q_len`` over keys ``0 .. kv_len``.

    ``key_valid`` (``[B, kv_len]`` bool, optional) hides padded key positions.
    """
    q_pos = torch.arange(q_start, q_start + q_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    mask = visible(q_pos, k_pos, prefix_len, block_size, kind)[None, None]
    if key_valid is not None:
        if key_valid.shape[-1] != kv_len:
            raise ValueError(f"key_valid covers {key_valid.shape[-1]} keys, mask has {kv_len}")
        mask = mask & key_valid[:, None, None, :].to(torch.bool)
    return mask


def to_additive(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean mask -> additive float mask (0 where visible, dtype-min elsewhere).

    transformers' ``eager`` attention adds the mask to the scores; a boolean
    mask there would be silently wrong.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"expected a boolean mask, got {mask.dtype}")
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~mask, torch.finfo(dtype).min)


def flex_block_mask(
    prefix_len: int,
    block_size: int,
    q_start: int,
    q_len: int,
    kv_len: int,
    kind: str = BLOCK_CAUSAL,
    device: torch.device | str = "cpu",
):
    """The same rule as a FlexAttention ``BlockMask``."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + q_start
        if kind == BIDIRECTIONAL:
            return kv_idx >= 0
        if kind == TOKEN_CAUSAL:
            return kv_idx <= q_pos
        qb = torch.where(q_pos < prefix_len, -1, (q_pos - prefix_len) // block_size)
        kb = torch.where(kv_idx < prefix_len, -1, (kv_idx - prefix_len) // block_size)
        return kb <= qb

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)
