"""Fast-dLLM-style decoding of the bidirectional teacher (the baseline).

The chunk is decoded in blocks, left to right. At the start of each block a
full forward refreshes the keys/values of the whole sequence; the following
forwards recompute only the current block's queries and read the others'
keys/values from that refresh (the "dual cache": prefix and suffix). Those
cached values are stale, because in a bidirectional model every position
sees the tokens committed since: the cache is approximate, unlike
Fast-dVLA's. Commits: every position with confidence >= tau_conf, and at
least the most confident one.

Its forwards already have fixed shapes (the whole sequence, or one block
over the whole cache), so ``static_shapes`` changes nothing here.
"""
from __future__ import annotations

import torch

from ..backbone import DVLAModel
from ..config import DecodeConfig
from ..masks import BIDIRECTIONAL
from .common import (DecodeResult, DecodeStats, WindowForward, categorical_window, check_categorical, compile_mode,
                     confidences, make_generator)
from .unmask import threshold_or_top1_commit


def decode_fast_dllm(model: DVLAModel, prefix: torch.Tensor, config: DecodeConfig,
                     trace: list | None = None, categorical=None,
                     pad_lens: tuple[int, ...] | None = None) -> DecodeResult:
    """``categorical``: ``[chunk_len]`` bool, the slots where the mean and majority token rules
    keep the argmax (see ``decode``).
    ``pad_lens``: a padded batch's leading padding slots per row (see ``decode``'s ``prefix_mask``)."""
    B, P = prefix.shape[:2]
    L = model.chunk_len
    categorical = check_categorical(model, categorical, prefix.device)
    bs = config.fast_dllm_block_size or model.block_size
    total = P + L
    cache = model.new_cache(B, total) if config.use_cache else None
    fwd = WindowForward(model, prefix, cache, compile=compile_mode(config), pad_lens=pad_lens)
    gen = make_generator(config.seed, prefix.device)
    stats = DecodeStats(config.method)
    tokens = torch.full((B, L), model.mask_token_id, dtype=torch.long, device=prefix.device)
    committed = torch.zeros(B, L, dtype=torch.bool, device=prefix.device)

    for a0 in range(0, L, bs):
        a1 = min(L, a0 + bs)
        refresh = True
        while not bool(committed[:, a0:a1].all()):
            if refresh or cache is None:
                logits = fwd(tokens, 0, total, BIDIRECTIONAL, use_cache=cache is not None)[:, a0:a1]
                if cache is not None:
                    cache.commit(total)  # everything now "cached", approximately
                query = total
            else:
                logits = fwd(tokens, P + a0, P + a1, BIDIRECTIONAL, use_cache=True, read_len=total)
                query = a1 - a0
            refresh = False
            conf, pred = confidences(logits, config, gen, categorical_window(categorical, a0, a1))
            commit = threshold_or_top1_commit(conf, ~committed[:, a0:a1], config.tau_conf)
            tokens[:, a0:a1] = torch.where(commit, pred, tokens[:, a0:a1])
            committed[:, a0:a1] |= commit
            stats.record(query, commit.sum(-1))
            if trace is not None:
                trace.append({"block": (a0, a1), "logits": logits.detach().clone(), "committed": committed.clone()})
    fwd.raise_if_nonfinite(config.method)  # the top-1 commit still ends a block on NaN confidences
    return DecodeResult(tokens, stats)
