"""Fast-dVLA pipelined decoding of a block-causal student (DESIGN.md s.5).

Blocks move through absent -> semi-activated -> fully-activated -> complete
-> cached. Each step adds at most one block, activates blocks, runs one
forward over every block not yet cached (reading the exact cache), commits
by confidence, and extends the cache over blocks that were complete before
that forward (their keys/values in it are final), strictly left to right.

Block diffusion is this engine with ``tau_add = tau_act = 1``: a block is
added only when its predecessor is complete, so one block is in flight at a
time and it is always fully activated.

Worst case: the earliest incomplete block is always fully activated (its
predecessor is complete), so it commits ``max(1, floor(R/n))`` per step and
``NFE <= num_blocks * fallback_steps_per_block(block_size, n)``; at best
``NFE = num_blocks`` (one block is added per step).
"""
from __future__ import annotations

import torch

from ..backbone import DVLAModel
from ..config import DecodeConfig
from ..masks import BLOCK_CAUSAL
from .common import DecodeResult, DecodeStats, WindowForward, categorical_window, confidences, make_generator
from .unmask import block_threshold_commit


def leading_complete_blocks(complete: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` bool -> blocks complete from the left in *every* row (the
    cache is shared by the batch, so it extends only as far as all rows)."""
    return complete.long().cumprod(dim=1).sum(dim=1).min()


def cacheable_blocks(complete_before: torch.Tensor, complete_after: torch.Tensor) -> torch.Tensor:
    """Blocks whose keys/values in the forward just run are final: those that
    were complete *before* it. A block completed by this step's commit still
    had [MASK]s in that forward; it is cached after the next one."""
    return leading_complete_blocks(complete_before)


def decode_pipelined(model: DVLAModel, prefix: torch.Tensor, config: DecodeConfig,
                     trace: list | None = None, _forward: WindowForward | None = None) -> DecodeResult:
    B, P = prefix.shape[:2]
    L, k = model.chunk_len, model.block_size
    N = L // k
    dev = prefix.device
    tau_add, tau_act = config.tau_add, config.tau_act
    if config.method == "block_diffusion":
        tau_add = tau_act = 1.0

    if _forward is not None:
        fwd, cache = _forward, _forward.cache
    else:
        cache = model.new_cache(B, P + L) if config.use_cache else None
        fwd = WindowForward(model, prefix, cache)
    gen = make_generator(config.seed, dev)
    stats = DecodeStats(config.method)

    tokens = torch.full((B, L), model.mask_token_id, dtype=torch.long, device=dev)
    committed = torch.zeros(B, L, dtype=torch.bool, device=dev)
    n_added = torch.zeros(B, dtype=torch.long, device=dev)
    fully_active = torch.zeros(B, N, dtype=torch.bool, device=dev)
    block_idx = torch.arange(N, device=dev)
    ones = torch.ones(B, 1, device=dev)
    final_len = 0  # leading positions whose keys/values are final

    while not bool(committed.all()):
        frac = committed.view(B, N, k).float().mean(-1)
        # 1. add: the prefix counts as a complete block, so block 0 comes at once
        last = frac.gather(1, (n_added - 1).clamp(min=0)[:, None]).squeeze(1)
        last = torch.where(n_added > 0, last, torch.ones_like(last))
        n_added = n_added + ((n_added < N) & (last >= tau_add)).long()
        added = block_idx[None] < n_added[:, None]
        # 2. activate
        prev_frac = torch.cat([ones, frac[:, :-1]], dim=1)
        fully_active |= added & (prev_frac >= tau_act)
        complete_before = committed.view(B, N, k).all(-1)

        # 3. forward over every block not yet cached
        first = max(final_len - P, 0) // k
        last_block = int(n_added.max())
        a0, a1 = first * k, last_block * k
        if config.use_cache:
            logits = fwd(tokens, final_len, P + a1, BLOCK_CAUSAL, use_cache=True)
            query = P + a1 - final_len
        else:
            logits = fwd(tokens, 0, P + L, BLOCK_CAUSAL, use_cache=False)[:, a0:a1]
            query = P + L
        conf, pred = confidences(logits, config, gen, categorical_window(model, a0, a1))

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
        complete_after = committed.view(B, N, k).all(-1)
        final_len = P + int(cacheable_blocks(complete_before, complete_after)) * k
        if cache is not None:
            cache.commit(final_len)
        if trace is not None:
            trace.append({"window_blocks": (first, last_block), "logits": logits.detach().clone(),
                          "complete_before": complete_before.clone(), "final_len": final_len,
                          "committed": committed.clone(), "fully_active": fully_active.clone(),
                          "n_added": n_added.clone()})
    return DecodeResult(tokens, stats)
