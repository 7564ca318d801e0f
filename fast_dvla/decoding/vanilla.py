"""Vanilla dVLA decoding: MaskGIT-style confidence unmasking over a fixed
number of steps, each committing the most confident tokens per a schedule.

``vanilla``: the bidirectional teacher, every forward recomputing the whole
sequence (no cache is exact for a bidirectional model).

``vanilla_cached``: the same schedule on the block-causal student. Its
prefix never sees action tokens and a complete block's keys/values never
change, so each forward reads the prefix and the leading complete blocks
from the exact cache and recomputes only the rest of the chunk. The commits
are the teacher's rule; a decode costs ``vanilla_steps`` forwards, each over
the incomplete blocks only. With ``static_shapes`` every forward after the
first covers the whole chunk over the cached prefix (complete blocks are
recomputed, not read), and no step reads a value back to the host.
"""
from __future__ import annotations

import torch

from ..backbone import DVLAModel
from ..config import DecodeConfig
from ..masks import BIDIRECTIONAL, BLOCK_CAUSAL
from .common import (DecodeResult, DecodeStats, WindowForward, categorical_window, check_categorical, compile_mode,
                     confidences, make_generator)
from .pipelined import complete_blocks, leading_complete_blocks
from .unmask import masked_after_step, topk_commit


def decode_vanilla(model: DVLAModel, prefix: torch.Tensor, config: DecodeConfig,
                   trace: list | None = None, categorical=None,
                   pad_lens: tuple[int, ...] | None = None) -> DecodeResult:
    """``categorical``: ``[chunk_len]`` bool, the slots where the mean and majority token rules
    keep the argmax (see ``decode``).
    ``pad_lens``: a padded batch's leading padding slots per row (see ``decode``'s ``prefix_mask``)."""
    B, P = prefix.shape[:2]
    L, k = model.chunk_len, model.block_size
    categorical = check_categorical(model, categorical, prefix.device)
    student = config.method == "vanilla_cached"
    cached = student and config.use_cache
    static = student and config.static_shapes
    fwd = WindowForward(model, prefix, model.new_cache(B, P + L) if cached else None, compile=compile_mode(config),
                        pad_lens=pad_lens)
    gen = make_generator(config.seed, prefix.device)
    stats = DecodeStats(config.method)
    tokens = torch.full((B, L), model.mask_token_id, dtype=torch.long, device=prefix.device)
    committed = torch.zeros(B, L, dtype=torch.bool, device=prefix.device)
    final_len = 0  # leading positions whose keys/values are final (the student's; tracked uncached too)
    masked = L
    for step in range(config.vanilla_steps):
        if masked == 0:
            break
        if cached and static:
            logits = fwd(tokens, min(final_len, P), P + L, BLOCK_CAUSAL, use_cache=True)
            final_len = P  # the prefix never sees the chunk: its keys/values are final after the first forward
            fwd.cache.commit(final_len)
        elif cached:
            logits = fwd(tokens, final_len, P + L, BLOCK_CAUSAL, use_cache=True)
        else:
            logits = fwd(tokens, 0, P + L, BLOCK_CAUSAL if student else BIDIRECTIONAL, use_cache=False)
            if student and not static:  # the cached decode's window, so that sampling draws the same numbers
                logits = logits[:, max(final_len - P, 0):]
        a0 = L - logits.shape[1]  # positions before the window are committed and cached
        conf, pred = confidences(logits, config, gen, categorical_window(categorical, a0, L))
        # at least one token per forward, so no forward is wasted
        target = masked_after_step(L, config.vanilla_steps, step, config.schedule)
        count = max(1, masked - target)
        # only the student needs it: vanilla's loop is the baseline every speedup is timed against
        complete_before = complete_blocks(committed, k) if student and not static else None
        commit = topk_commit(conf, ~committed[:, a0:], count)
        tokens[:, a0:] = torch.where(commit, pred, tokens[:, a0:])
        committed[:, a0:] |= commit
        masked -= count
        start, end = fwd.windows[-1]
        stats.record(end - start, commit.sum(-1))
        if student and not static:  # blocks complete before this forward got their final keys/values in it
            final_len = P + int(leading_complete_blocks(complete_before)) * k
            if cached:
                fwd.cache.commit(final_len)
        if trace is not None:
            trace.append({"logits": logits.detach().clone(), "committed": committed.clone(), "final_len": final_len})
    fwd.raise_if_nonfinite(config.method)
    return DecodeResult(tokens, stats)
