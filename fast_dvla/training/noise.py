"""Which action tokens a training sample hides, and their loss weights (docs/design.md#training)."""
from __future__ import annotations

import torch


def teacher_noise(batch: int, length: int, generator: torch.Generator, device="cpu"):
    """Masked diffusion: ``t ~ U(0, 1)`` per sample, each token masked with
    probability ``t``. Returns ``(mask [B, L] bool, weight [B, L] = 1/t)``;
    every sample hides at least one token (else it would teach nothing).
    (ours) The weight is capped at ``L`` (``t`` floored at ``1/L``): below that
    rate a sample hides about one token anyway (the forced one), and an
    uncapped ``1/t`` (up to 1000) put as much loss on that one token as the
    rest of the batch carries, a spike of gradient noise every few steps."""
    t = torch.rand(batch, 1, generator=generator)
    mask = torch.rand(batch, length, generator=generator) < t
    forced = torch.randint(length, (batch,), generator=generator)
    mask[torch.arange(batch), forced] |= ~mask.any(1)
    weight = 1.0 / t.clamp_min(1.0 / length)
    return mask.to(device), weight.expand(batch, length).to(device)


def forcing_ratios(batch: int, num_blocks: int, generator: torch.Generator) -> torch.Tensor:
    """Diffusion forcing (D2F): per sample ``p0 = U(0,1)/2 + 0.2``, increments
    ``U(0,1) * (0.7 - p0) / (N - 1)``, ``p_b = p0 + cumsum``, clamped to <= 1.
    Non-decreasing from left to right. ``[B, N]``."""
    p0 = torch.rand(batch, 1, generator=generator) / 2 + 0.2
    if num_blocks == 1:
        return p0
    inc = torch.rand(batch, num_blocks - 1, generator=generator) * (0.7 - p0) / (num_blocks - 1)
    return torch.cat([p0, p0 + inc.cumsum(1)], dim=1).clamp(max=1.0)


def mask_tails(ratios: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """(ours, off by default) With probability ``prob`` per sample, blocks from a uniformly
    drawn one to the last are masked entirely (ratio 1); the ratios stay non-decreasing.
    D2F's ratios stop at 0.7, so a student rarely trains on an all-[MASK] block, yet
    pipelined decoding starts every block all-[MASK]. ``prob == 0`` draws nothing."""
    if prob <= 0:
        return ratios
    batch, n = ratios.shape
    tailed = torch.rand(batch, 1, generator=generator) < prob
    start = torch.randint(n, (batch, 1), generator=generator)
    in_tail = tailed & (torch.arange(n)[None] >= start)
    return torch.where(in_tail, torch.ones_like(ratios), ratios)


def bias_to_high_noise(ratios: torch.Tensor, bias: float) -> torch.Tensor:
    """(ours, off by default) ``p -> 1 - (1 - p) ** (1 + bias)``: the family that moves the mask ratios
    toward 1 (``bias = 0``: unchanged; each further unit shrinks the unmasked share ``1 - p`` by another
    factor ``1 - p``). A student trained mostly on nearly-all-[MASK] blocks must commit confidently from
    its first forward over a block, which is where a few-step decoder spends its forwards. Monotone, so
    diffusion forcing's left-to-right order of ratios is kept."""
    if bias == 0:
        return ratios
    return 1 - (1 - ratios) ** (1 + bias)


def student_noise(batch: int, num_blocks: int, block_size: int, generator: torch.Generator, device="cpu",
                  masked_tail_prob: float = 0.0, high_noise_bias: float = 0.0):
    """Every token of block ``b`` masked with probability ``p_b``. Returns
    ``(mask [B, L], weight [B, L] = 1/p_b)``, at least one masked token per sample.
    ``high_noise_bias`` (:func:`bias_to_high_noise`) is applied to the ratios last, so it draws no
    random numbers: with 0 the noise is bit for bit the default's."""
    ratios = mask_tails(forcing_ratios(batch, num_blocks, generator), masked_tail_prob, generator)
    ratios = bias_to_high_noise(ratios, high_noise_bias)
    p = ratios.repeat_interleave(block_size, dim=1)
    length = num_blocks * block_size
    mask = torch.rand(batch, length, generator=generator) < p
    forced = torch.randint(length, (batch,), generator=generator)
    mask[torch.arange(batch), forced] |= ~mask.any(1)
    return mask.to(device), (1.0 / p).to(device)
