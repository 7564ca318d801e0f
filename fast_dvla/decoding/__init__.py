"""``decode(model, prefix, config)``: one entry point for every decoder."""
from __future__ import annotations

import torch

from ..backbone import DVLAModel
from ..config import DecodeConfig
from .common import DecodeResult, DecodeStats, NonFiniteLogitsError, check_categorical
from .fast_dllm import decode_fast_dllm
from .pipelined import decode_pipelined
from .unmask import fallback_steps_per_block
from .vanilla import decode_vanilla

DECODERS = {
    "vanilla": decode_vanilla,
    "fast_dllm": decode_fast_dllm,
    "block_diffusion": decode_pipelined,
    "fast_dvla": decode_pipelined,
    "vanilla_cached": decode_vanilla,
}


def check_prefix(model: DVLAModel, prefix: torch.Tensor) -> None:
    """``prefix`` ``[B, P, H]``, non-empty, in the model's dtype and on its device."""
    if not isinstance(prefix, torch.Tensor):
        raise TypeError(f"prefix must be a tensor of prefix embeddings [B, P, H], got {type(prefix).__name__}")
    if prefix.dim() != 3:
        raise ValueError(f"prefix must be [batch, prefix_len, hidden], got shape {tuple(prefix.shape)}")
    if prefix.shape[0] == 0 or prefix.shape[1] == 0:
        raise ValueError(f"empty prefix (shape {tuple(prefix.shape)}): a dVLA needs observations to condition on")
    param = next(model.parameters(), None)
    if param is not None:
        if prefix.dtype != param.dtype:
            raise ValueError(f"prefix dtype {prefix.dtype} differs from the model's {param.dtype}")
        if prefix.device != param.device:
            raise ValueError(f"prefix is on {prefix.device}, the model on {param.device}")
    if model.chunk_len % model.block_size:
        raise ValueError(f"block_size {model.block_size} does not divide chunk_len {model.chunk_len}")


def check_finite(prefix: torch.Tensor, pad_lens: tuple[int, ...] | None) -> None:
    """NaN or inf at a real token (``pad_lens``: each row's leading padding slots; None: none).
    Padding slots may hold anything: ``decode`` replaces them with zeros."""
    if pad_lens is None:
        if not bool(torch.isfinite(prefix).all()):
            raise ValueError("prefix contains NaN or inf")
    elif not bool((torch.isfinite(prefix).all(-1) | ~real_tokens(pad_lens, prefix)).all()):
        raise ValueError("prefix contains NaN or inf at a real token (prefix_mask True)")


def left_padding(prefix_mask, prefix: torch.Tensor) -> tuple[int, ...] | None:
    """The leading padding slots of each row of ``prefix_mask`` (``[B, P]`` bool, any array-like;
    True = real token), checked: one flag per prefix slot, left-padded (each row's real tokens are
    the last ones of the row), at least one real token per row. None when no row is padded (the
    batch then decodes exactly as without a mask). One host read (the mask's copy)."""
    try:
        mask = torch.as_tensor(prefix_mask)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"prefix_mask must be a boolean tensor [B, P] (True = real token), got "
                        f"{type(prefix_mask).__name__}") from err
    if mask.dtype != torch.bool:
        raise TypeError(f"prefix_mask must be a boolean tensor [B, P] (True = real token), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(prefix.shape[:2]):
        raise ValueError(f"prefix_mask must have the prefix's batch and length, {tuple(prefix.shape[:2])}, "
                         f"got shape {tuple(mask.shape)}")
    rows = mask.cpu().tolist()
    empty = [b for b, row in enumerate(rows) if not any(row)]
    if empty:
        raise ValueError(f"prefix_mask rows {empty} have no real token: every row needs at least one")
    pad_lens = tuple(row.count(False) for row in rows)
    wrong = [b for b, (row, pad) in enumerate(zip(rows, pad_lens)) if any(row[:pad]) or not all(row[pad:])]
    if wrong:
        raise ValueError(f"prefix_mask rows {wrong} are not left-padded: a row's real tokens must be its last "
                         f"ones, after its padding (e.g. [False, False, True, True])")
    return pad_lens if any(pad_lens) else None


def real_tokens(pad_lens: tuple[int, ...], prefix: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` bool on the prefix's device: True past each row's padding."""
    pad = torch.tensor(pad_lens, device=prefix.device)
    return torch.arange(prefix.shape[1], device=prefix.device)[None, :] >= pad[:, None]


def check_supports_padding(model: DVLAModel) -> None:
    if not getattr(model, "supports_padding", False):
        raise ValueError(f"prefix_mask pads rows, but {type(model).__name__} does not support padded batches "
                         "(its backbone_forward must take per-row positions [B, Q] and honour "
                         "AttentionLayout.pad_lens; then set supports_padding = True). Decode rows of different "
                         "prefix lengths one at a time, or in batches of equal length, instead")


@torch.no_grad()
def decode(model: DVLAModel, prefix: torch.Tensor, config: DecodeConfig | None = None,
           trace: list | None = None, categorical=None, prefix_mask=None) -> DecodeResult:
    """Decode one action chunk per row of ``prefix`` (``[B, P, H]`` prefix
    embeddings). Returns the tokens ``[B, chunk_len]`` and the statistics.
    Pass a list as ``trace`` to record every step (tests, debugging).

    ``categorical`` (``[chunk_len]`` bool, e.g. ``ActionTokenizer.categorical_slots(horizon)``):
    slots whose bins are categories rather than ordered values (a gripper's
    open/close), where ``token_rule="mean"``/``"majority"`` keep the argmax
    and ``near_bins`` does not widen the confidence; None: every slot is
    ordinal (see docs/design.md#token-rules).

    ``prefix_mask`` (``[B, P]`` bool, True = real token): a batch of prefixes of
    different lengths, left-padded to ``P`` (each row's real tokens are the
    last of its ``P`` slots). Each row decodes as it would alone with only its
    real prefix: padding is hidden from every query, positions start at 0 at
    each row's first real token, padding slots are zeroed. None: every token
    is real (see docs/design.md#padded-batches)."""
    config = config or DecodeConfig()
    if not isinstance(config, DecodeConfig):
        raise TypeError(f"config must be a DecodeConfig, got {type(config).__name__}")
    check_prefix(model, prefix)
    pad_lens = None if prefix_mask is None else left_padding(prefix_mask, prefix)
    check_finite(prefix, pad_lens)
    categorical = check_categorical(model, categorical, prefix.device)
    if pad_lens is None:
        return DECODERS[config.method](model, prefix, config, trace, categorical=categorical)
    check_supports_padding(model)
    # whatever the padding slots hold (NaN included), only zeros enter the forward
    prefix = prefix.masked_fill(~real_tokens(pad_lens, prefix)[..., None], 0)
    return DECODERS[config.method](model, prefix, config, trace, categorical=categorical, pad_lens=pad_lens)


def max_nfe(model: DVLAModel, config: DecodeConfig) -> int:
    """The most forwards a decode can take (the bound the tests check)."""
    if config.method in ("vanilla", "vanilla_cached"):
        return min(config.vanilla_steps, model.chunk_len)
    if config.method == "fast_dllm":
        return model.chunk_len  # at least one token per forward
    return model.num_blocks * fallback_steps_per_block(model.block_size, config.fallback_n)


__all__ = ["decode", "DecodeResult", "DecodeStats", "DECODERS", "NonFiniteLogitsError", "max_nfe"]
