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
    if not bool(torch.isfinite(prefix).all()):
        raise ValueError("prefix contains NaN or inf")
    if model.chunk_len % model.block_size:
        raise ValueError(f"block_size {model.block_size} does not divide chunk_len {model.chunk_len}")


@torch.no_grad()
def decode(model: DVLAModel, prefix: torch.Tensor, config: DecodeConfig | None = None,
           trace: list | None = None, categorical=None) -> DecodeResult:
    """Decode one action chunk per row of ``prefix`` (``[B, P, H]`` prefix
    embeddings). Returns the tokens ``[B, chunk_len]`` and the statistics.
    Pass a list as ``trace`` to record every step (tests, debugging).

    ``categorical`` (``[chunk_len]`` bool, e.g. ``ActionTokenizer.categorical_slots(horizon)``):
    slots whose bins are categories rather than ordered values (a gripper's
    open/close), where ``token_rule="mean"``/``"majority"`` keep the argmax
    and ``near_bins`` does not widen the confidence; None: every slot is
    ordinal (see docs/design.md#token-rules)."""
    config = config or DecodeConfig()
    if not isinstance(config, DecodeConfig):
        raise TypeError(f"config must be a DecodeConfig, got {type(config).__name__}")
    check_prefix(model, prefix)
    categorical = check_categorical(model, categorical, prefix.device)
    return DECODERS[config.method](model, prefix, config, trace, categorical=categorical)


def max_nfe(model: DVLAModel, config: DecodeConfig) -> int:
    """The most forwards a decode can take (the bound the tests check)."""
    if config.method in ("vanilla", "vanilla_cached"):
        return min(config.vanilla_steps, model.chunk_len)
    if config.method == "fast_dllm":
        return model.chunk_len  # at least one token per forward
    return model.num_blocks * fallback_steps_per_block(model.block_size, config.fallback_n)


__all__ = ["decode", "DecodeResult", "DecodeStats", "DECODERS", "NonFiniteLogitsError", "max_nfe"]
