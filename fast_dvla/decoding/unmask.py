"""Commit rules: which masked positions a forward's predictions fill in.

Each is a pure, batched tensor function (the scheduler ``step`` of the
decoders): no Python loop over rows, no per-row ``.item()``.
"""
from __future__ import annotations

import math

import torch


def block_threshold_commit(conf: torch.Tensor, eligible: torch.Tensor, fully_active: torch.Tensor,
                           tau_conf: float, n: int) -> torch.Tensor:
    """Fast-dVLA's rule for blocks in flight.

    conf, eligible: ``[B, nb, k]``; fully_active: ``[B, nb]``.
    A semi-activated block commits every eligible position with
    ``conf >= tau_conf`` (possibly none). A fully-activated block with ``R``
    eligible positions uses threshold ``min(tau_conf, m-th largest conf)``,
    ``m = max(1, floor(R / n))``, so it commits at least ``m`` per step.
    """
    masked = conf.masked_fill(~eligible, float("-inf"))
    remaining = eligible.sum(-1)
    m = torch.clamp(torch.div(remaining, n, rounding_mode="floor"), min=1)
    ranked = masked.sort(dim=-1, descending=True).values
    mth = ranked.gather(-1, (m - 1).unsqueeze(-1)).squeeze(-1)
    tau = torch.full_like(mth, tau_conf)
    threshold = torch.where(fully_active, torch.minimum(mth, tau), tau)
    return eligible & (conf >= threshold.unsqueeze(-1))


def threshold_or_top1_commit(conf: torch.Tensor, eligible: torch.Tensor, tau_conf: float) -> torch.Tensor:
    """Fast-dLLM's parallel rule over ``[B, Q]``: every eligible position with
    ``conf >= tau_conf``, and at least the single most confident one."""
    masked = conf.masked_fill(~eligible, float("-inf"))
    top = torch.zeros_like(eligible).scatter_(-1, masked.argmax(-1, keepdim=True), True)
    return eligible & ((conf >= tau_conf) | top)


def topk_commit(conf: torch.Tensor, eligible: torch.Tensor, count: int) -> torch.Tensor:
    """MaskGIT's rule over ``[B, Q]``: the ``count`` most confident eligible positions."""
    count = min(count, conf.shape[-1])
    if count <= 0:
        return torch.zeros_like(eligible)
    masked = conf.masked_fill(~eligible, float("-inf"))
    idx = masked.topk(count, dim=-1).indices
    return torch.zeros_like(eligible).scatter_(-1, idx, True) & eligible


def masked_after_step(length: int, steps: int, step: int, schedule: str) -> int:
    """Tokens still masked after ``step`` (0-based) of ``steps``."""
    frac = (step + 1) / steps
    if schedule == "cosine":
        left = math.cos(math.pi / 2 * frac)
    elif schedule == "linear":
        left = 1.0 - frac
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return max(0, min(length, int(math.floor(length * left + 1e-9))))


def fallback_steps_per_block(block_size: int, n: int) -> int:
    """Forwards a fully-activated block needs at worst: each commits
    ``max(1, floor(R / n))`` of its ``R`` remaining positions."""
    remaining, steps = block_size, 0
    while remaining > 0:
        remaining -= max(1, remaining // n)
        steps += 1
    return steps
