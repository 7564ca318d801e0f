"""Vanilla dVLA decoding: the bidirectional teacher, MaskGIT-style
confidence unmasking over a fixed number of steps, every forward
recomputing the whole sequence (no cache is exact for a bidirectional model)."""
from __future__ import annotations

import torch

from ..backbone import DVLAModel
from ..config import DecodeConfig
from ..masks import BIDIRECTIONAL
from .common import DecodeResult, DecodeStats, WindowForward, confidences, make_generator
from .unmask import masked_after_step, topk_commit


def decode_vanilla(model: DVLAModel, prefix: torch.Tensor, config: DecodeConfig,
                   trace: list | None = None, _forward: WindowForward | None = None) -> DecodeResult:
    B, P = prefix.shape[:2]
    L = model.chunk_len
    fwd = _forward or WindowForward(model, prefix, None)
    gen = make_generator(config.seed, prefix.device)
    stats = DecodeStats(config.method)
    tokens = torch.full((B, L), model.mask_token_id, dtype=torch.long, device=prefix.device)
    committed = torch.zeros(B, L, dtype=torch.bool, device=prefix.device)
    masked = L
    for step in range(config.vanilla_steps):
        if masked == 0:
            break
        logits = fwd(tokens, 0, P + L, BIDIRECTIONAL, use_cache=False)
        conf, pred = confidences(logits, config.temperature, gen)
        # at least one token per forward, so no forward is wasted
        target = masked_after_step(L, config.vanilla_steps, step, config.schedule)
        count = max(1, masked - target)
        commit = topk_commit(conf, ~committed, count)
        tokens = torch.where(commit, pred, tokens)
        committed |= commit
        masked -= count
        stats.record(P + L, commit.sum(-1))
        if trace is not None:
            trace.append({"logits": logits.detach().clone(), "committed": committed.clone()})
    return DecodeResult(tokens, stats)
