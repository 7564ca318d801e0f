"""Fast-dVLA pipelined decoding of a block-causal student
(docs/design.md#pipelined-decoding).

Blocks move through absent -> semi-activated -> fully-activated -> complete
-> cached. Each step adds at most one block, activates blocks, runs one
forward over every block not yet cached (reading the exact cache), commits
by confidence, and extends the cache over blocks that were complete before
that forward (their keys/values in it are final), strictly left to right.

Block diffusion is this engine with ``tau_add = tau_act = 1``: a block is
added only when its predecessor is complete, so one block is in flight at a
time and it is always fully activated.

Worst case (docs/design.md#nfe-bound): the earliest incomplete block is
always fully activated (its predecessor is complete), so it commits
``max(1, floor(R/n))`` per step and
``NFE <= num_blocks * fallback_steps_per_block(block_size, n)``; at best
``NFE = num_blocks`` (one block is added per step).
"""
from __future__ import annotations

import torch

from ..backbone import DVLAModel
from ..config import DecodeConfig
from ..masks import BIDIRECTIONAL, BLOCK_CAUSAL
from .common import (DecodeResult, DecodeStats, WindowForward, categorical_window, check_categorical, compile_mode,
                     confidences, make_generator)
from .unmask import block_threshold_commit


def leading_complete_blocks(complete: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` bool -> blocks complete from the left in *every* row (the
    cache is shared by the batch, so it extends only as far as all rows)."""
    return complete.long().cumprod(dim=1).sum(dim=1).min()


def complete_blocks(committed: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[B, L]`` committed flags -> ``[B, N]``: blocks whose every position is committed."""
    return committed.view(committed.shape[0], -1, block_size).all(-1)


def cacheable_blocks(complete_before: torch.Tensor) -> torch.Tensor:
    """Blocks whose keys/values in the forward just run are final: the leading
    ones that were complete *before* it (``complete_before``, ``[B, N]``), in
    the tokens it saw. A block completed by this step's commit still had
    [MASK]s in that forward; it is cached after the next one."""
    return leading_complete_blocks(complete_before)


def block_thresholds(config: DecodeConfig) -> tuple[float, float]:
    """(tau_add, tau_act): block diffusion is the engine with both at 1."""
    return (1.0, 1.0) if config.method == "block_diffusion" else (config.tau_add, config.tau_act)


def add_and_activate(committed: torch.Tensor, n_added: torch.Tensor, fully_active: torch.Tensor, block_size: int,
                     tau_add: float, tau_act: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1 and 2 of a pipelined step, on the device: add a block to a row whose last added block is
    ``tau_add`` decoded (the prefix counts as a complete block, so block 0 comes at once), then fully
    activate added blocks whose predecessor is ``tau_act`` decoded (``fully_active`` updated in place).
    Returns the new ``n_added`` ``[B]`` and the added blocks ``[B, N]``."""
    B, N = fully_active.shape
    frac = committed.view(B, N, block_size).float().mean(-1)
    last = frac.gather(1, (n_added - 1).clamp(min=0)[:, None]).squeeze(1)
    last = torch.where(n_added > 0, last, torch.ones_like(last))
    n_added = n_added + ((n_added < N) & (last >= tau_add)).long()
    added = torch.arange(N, device=committed.device)[None] < n_added[:, None]
    prev_frac = torch.cat([torch.ones_like(frac[:, :1]), frac[:, :-1]], dim=1)
    fully_active |= added & (prev_frac >= tau_act)
    return n_added, added


def decode_pipelined(model: DVLAModel, prefix: torch.Tensor, config: DecodeConfig,
                     trace: list | None = None, categorical=None, attention: str = BLOCK_CAUSAL,
                     pad_lens: tuple[int, ...] | None = None) -> DecodeResult:
    """``categorical``: ``[chunk_len]`` bool, the slots where the mean and majority token rules
    keep the argmax (see ``decode``).

    ``attention``: the mask the model attends with. ``BLOCK_CAUSAL`` (the
    student's, the default) or ``BIDIRECTIONAL``: a bidirectional teacher
    decoded in this order (one block after another for ``block_diffusion``),
    uncached only, since no cache is exact for a bidirectional model.
    ``pad_lens``: a padded batch's leading padding slots per row (see ``decode``'s ``prefix_mask``)."""
    if attention not in (BLOCK_CAUSAL, BIDIRECTIONAL):
        raise ValueError(f"attention must be {BLOCK_CAUSAL!r} or {BIDIRECTIONAL!r}, got {attention!r}")
    if attention == BIDIRECTIONAL and config.use_cache:
        raise ValueError("bidirectional attention has no exact cache: decode it with use_cache=False")
    if config.static_shapes:
        return decode_pipelined_static(model, prefix, config, trace, categorical, attention, pad_lens)
    B, P = prefix.shape[:2]
    L, k = model.chunk_len, model.block_size
    N = L // k
    dev = prefix.device
    categorical = check_categorical(model, categorical, dev)
    tau_add, tau_act = block_thresholds(config)

    cache = model.new_cache(B, P + L) if config.use_cache else None
    fwd = WindowForward(model, prefix, cache, pad_lens=pad_lens)
    gen = make_generator(config.seed, dev)
    stats = DecodeStats(config.method)

    tokens = torch.full((B, L), model.mask_token_id, dtype=torch.long, device=dev)
    committed = torch.zeros(B, L, dtype=torch.bool, device=dev)
    n_added = torch.zeros(B, dtype=torch.long, device=dev)
    fully_active = torch.zeros(B, N, dtype=torch.bool, device=dev)
    final_len = 0  # leading positions whose keys/values are final

    # NaN confidences never pass a block's threshold, so a non-finite forward ends the loop (same sync)
    while not bool(committed.all() | ~fwd.last_forward_finite()):
        n_added, added = add_and_activate(committed, n_added, fully_active, k, tau_add, tau_act)
        complete_before = complete_blocks(committed, k)

        # 3. forward over every block not yet cached
        first = max(final_len - P, 0) // k
        last_block = int(n_added.max())
        a0, a1 = first * k, last_block * k
        if config.use_cache:
            logits = fwd(tokens, final_len, P + a1, attention, use_cache=True)
            query = P + a1 - final_len
        else:
            logits = fwd(tokens, 0, P + L, attention, use_cache=False)[:, a0:a1]
            query = P + L
        conf, pred = confidences(logits, config, gen, categorical_window(categorical, a0, a1))

        # 4. commit
        nb = last_block - first
        eligible = ~committed[:, a0:a1] & added[:, first:last_block, None].expand(B, nb, k).reshape(B, -1)
        commit = block_threshold_commit(conf.view(B, nb, k), eligible.view(B, nb, k),
                                        fully_active[:, first:last_block], config.tau_conf,
                                        config.fallback_n).view(B, -1)
        tokens[:, a0:a1] = torch.where(commit, pred, tokens[:, a0:a1])
        committed[:, a0:a1] |= commit
        stats.record(query, commit.sum(-1))

        # 5. cache: blocks complete before this forward got their final keys/values in it
        final_len = P + int(cacheable_blocks(complete_before)) * k
        if cache is not None:
            cache.commit(final_len)
        if trace is not None:
            trace.append({"window_blocks": (first, last_block), "logits": logits.detach().clone(),
                          "complete_before": complete_before.clone(), "final_len": final_len,
                          "committed": committed.clone(), "fully_active": fully_active.clone(),
                          "n_added": n_added.clone()})
    fwd.raise_if_nonfinite(config.method)
    return DecodeResult(tokens, stats)


def decode_pipelined_static(model: DVLAModel, prefix: torch.Tensor, config: DecodeConfig,
                            trace: list | None = None, categorical=None,
                            attention: str = BLOCK_CAUSAL, pad_lens: tuple[int, ...] | None = None) -> DecodeResult:
    """The same decode with two fixed forward shapes (docs/design.md#static-shapes): the first over
    ``[prefix | chunk]``, which caches the prefix, then every step over the whole chunk reading the
    prefix from the cache. A block-causal block's logits depend only on it and the blocks before it,
    so recomputing complete blocks and running not-yet-added ones (whose predictions are never
    eligible) gives the dynamic decode's tokens, with every rule applied to all blocks at once.
    The only host read inside a step is the loop's stopping test."""
    B, P = prefix.shape[:2]
    L, k = model.chunk_len, model.block_size
    N = L // k
    dev = prefix.device
    categorical = check_categorical(model, categorical, dev)
    tau_add, tau_act = block_thresholds(config)
    cache = model.new_cache(B, P + L) if config.use_cache else None
    fwd = WindowForward(model, prefix, cache, compile=compile_mode(config), pad_lens=pad_lens)
    gen = make_generator(config.seed, dev)
    stats = DecodeStats(config.method)

    tokens = torch.full((B, L), model.mask_token_id, dtype=torch.long, device=dev)
    committed = torch.zeros(B, L, dtype=torch.bool, device=dev)
    n_added = torch.zeros(B, dtype=torch.long, device=dev)
    fully_active = torch.zeros(B, N, dtype=torch.bool, device=dev)
    while not bool(committed.all() | ~fwd.last_forward_finite()):
        n_added, added = add_and_activate(committed, n_added, fully_active, k, tau_add, tau_act)
        if cache is None or not stats.nfe:
            logits = fwd(tokens, 0, P + L, attention, use_cache=cache is not None)
            if cache is not None:
                cache.commit(P)  # the prefix never sees the chunk: its keys/values are final
            query = P + L
        else:
            logits = fwd(tokens, P, P + L, attention, use_cache=True)
            query = L
        conf, pred = confidences(logits, config, gen, categorical)
        eligible = ~committed & added.repeat_interleave(k, dim=1)
        commit = block_threshold_commit(conf.view(B, N, k), eligible.view(B, N, k), fully_active,
                                        config.tau_conf, config.fallback_n).view(B, L)
        tokens = torch.where(commit, pred, tokens)
        committed = committed | commit
        stats.record(query, commit.sum(-1))
        if trace is not None:
            trace.append({"window_blocks": (0, N), "logits": logits.detach().clone(), "committed": committed.clone(),
                          "fully_active": fully_active.clone(), "n_added": n_added.clone()})
    fwd.raise_if_nonfinite(config.method)
    return DecodeResult(tokens, stats)
