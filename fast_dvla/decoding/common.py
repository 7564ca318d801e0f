"""Pieces every decoder shares: the windowed forward, confidences, results."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..backbone import DVLAModel
from ..cache import BlockKVCache
from ..config import DecodeConfig
from ..masks import AttentionLayout

MAJORITY = 0.5  # token_rule="majority" keeps an argmax holding at least this share of the mass


@dataclass
class DecodeStats:
    method: str
    nfe: int = 0                       # forward passes of the backbone
    query_tokens: int = 0              # tokens forwarded as queries, per chunk (prefix included)
    committed_per_step: list = field(default_factory=list)  # one [B] tensor per forward

    def record(self, window: int, committed: torch.Tensor) -> None:
        self.nfe += 1
        self.query_tokens += window
        # kept on the device: a copy to the host here would be a synchronisation per step
        self.committed_per_step.append(committed.detach())

    def committed_matrix(self) -> torch.Tensor:
        """``[steps, B]``: tokens committed by each forward, per row (on the host)."""
        if not self.committed_per_step:
            return torch.zeros(0, 0, dtype=torch.long)
        return torch.stack(self.committed_per_step).to("cpu")

    def to_dict(self) -> dict:
        per_step = self.committed_matrix().float().mean(1).tolist() if self.committed_per_step else []
        return {"method": self.method, "nfe": self.nfe, "query_tokens": self.query_tokens,
                "committed_per_step": per_step}


@dataclass
class DecodeResult:
    tokens: torch.Tensor               # [B, chunk_len] action tokens
    stats: DecodeStats


class NonFiniteLogitsError(FloatingPointError):
    """A forward of a decode produced NaN or inf action logits: the model's
    weights, or its activations, are not finite. Raised rather than decoding
    on, since every commit rule turns NaN confidences into plausible tokens
    (all bin 0) or into a decode that never finishes."""

    def __init__(self, decoder: str, forward: int, start: int, end: int):
        self.decoder, self.forward, self.window = decoder, forward, (start, end)
        super().__init__(
            f"decode(model=...) with method {decoder!r}: forward {forward} (query positions [{start}, {end}) "
            f"of prefix + chunk) produced NaN or inf action logits; expected finite logits. The model's "
            f"weights contain NaN/inf, or its activations overflow (a half-precision model: try float32)")


def window_logits(model: DVLAModel, embeds: torch.Tensor, positions: torch.Tensor, layout: AttentionLayout,
                  cache: BlockKVCache | None, action_from: int) -> torch.Tensor:
    """One forward: hidden states of the window, then the action logits of its slots from ``action_from`` on."""
    hidden = model.backbone_forward(embeds, positions, layout, cache)
    return model.action_logits(hidden[:, action_from:])


_compiled_window_logits: dict = {}


def compiled_window_logits(mode: str = "default"):
    """:func:`window_logits` through ``torch.compile`` in ``mode``, built on first use (one per mode and
    process: dynamo keys its graphs on the model and the window's shape, so a static-shape decode
    compiles twice). ``reduce-overhead`` records CUDA graphs on a GPU."""
    if mode not in _compiled_window_logits:
        compiled = torch.compile(window_logits, dynamic=False, mode=mode)

        def run(*args):
            with warnings.catch_warnings():
                # the masks' memo (an lru_cache keyed on the frozen layout) is traced through: its
                # result is a constant of the window, which is what a compiled static window wants
                warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
                return compiled(*args)

        _compiled_window_logits[mode] = run
    return _compiled_window_logits[mode]


def compile_mode(config: DecodeConfig) -> str | None:
    """The ``torch.compile`` mode ``config`` asks the forwards to run in, or None for eager."""
    return config.compile_mode if config.compile else None


class WindowForward:
    """Runs the backbone over positions ``[start, end)`` of
    ``[prefix | action chunk]`` and returns the action logits of that window.

    Each forward is described once, by an :class:`~fast_dvla.masks.AttentionLayout`
    built here from the window and the mask ``kind``; the backbone's attention
    derives its mask from it (memoised per layout).

    Each forward also records, on the device, whether its logits are all
    finite (one reduction, no sync); :meth:`raise_if_nonfinite` reads them
    once, at the end of a decode.

    ``pad_lens`` (a padded batch, one count per row; docs/design.md#padded-batches):
    row ``b``'s first ``pad_lens[b]`` prefix slots are padding. Every layout
    carries them (its masks hide those keys), and each row's positions are
    shifted back by its padding, so its real tokens sit at ``0 ..`` as they
    would in the row decoded alone.
    """

    def __init__(self, model: DVLAModel, prefix: torch.Tensor, cache: BlockKVCache | None, compile: str | None = None,
                 pad_lens: tuple[int, ...] | None = None):
        """``compile``: a ``torch.compile`` mode to run the forwards through, or None (eager)."""
        self.model, self.prefix, self.cache = model, prefix, cache
        self.logits_fn = compiled_window_logits(compile) if compile else window_logits
        self.prefix_len = prefix.shape[1]
        self.total_len = self.prefix_len + model.chunk_len
        self.pad_lens = pad_lens
        self.pad = None if pad_lens is None else torch.tensor(pad_lens, device=prefix.device)[:, None]  # [B, 1]
        self.finite: list[torch.Tensor] = []       # per forward: 0-d bool, on the device
        self.windows: list[tuple[int, int]] = []   # per forward: its query positions [start, end)

    def positions(self, start: int, end: int) -> torch.Tensor:
        """RoPE positions of slots ``[start, end)``: ``[Q]``, or ``[B, Q]`` in a padded batch, where row
        ``b``'s slot ``p`` is at ``p - pad_lens[b]`` (padding slots at 0: only they ever see them)."""
        slots = torch.arange(start, end, device=self.prefix.device)
        if self.pad is None:
            return slots
        return (slots[None, :] - self.pad).clamp(min=0)

    def layout(self, start: int, end: int, kv_len: int, kind: str) -> AttentionLayout:
        """The forward's attention: queries ``[start, end)`` over keys ``[0, kv_len)``, padding hidden."""
        shape = (self.prefix_len, self.model.block_size, start, end - start, kv_len, kind)
        if self.pad_lens is None:
            return AttentionLayout(*shape)
        return AttentionLayout(*shape, pad_lens=self.pad_lens)

    def __call__(self, tokens: torch.Tensor, start: int, end: int, kind: str, use_cache: bool,
                 read_len: int | None = None) -> torch.Tensor:
        """Queries at ``[start, end)`` over keys ``[0, read_len)`` (default ``end``) under mask ``kind``;
        ``use_cache``: write the window's keys/values into the cache and read the rest from it."""
        P = self.prefix_len
        kv_len = end if read_len is None else read_len
        if use_cache:
            self.cache.begin_forward(start, end, kv_len)
            cache = self.cache
        else:
            if start != 0 or kv_len != end:
                raise ValueError("an uncached forward must cover the sequence from position 0")
            cache = None
        parts = []
        if start < P:
            parts.append(self.prefix[:, start:min(end, P)])
        a0, a1 = max(start, P) - P, end - P
        if a1 > a0:
            slots = torch.arange(a0, a1, device=tokens.device)
            parts.append(self.model.embed_actions(tokens[:, a0:a1], slots))
        embeds = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        layout = self.layout(start, end, kv_len, kind)
        logits = self.logits_fn(self.model, embeds, self.positions(start, end), layout, cache, max(start, P) - start)
        self.finite.append(torch.isfinite(logits).all())
        self.windows.append((start, end))
        return logits

    def last_forward_finite(self) -> torch.Tensor:
        """0-d bool on the device: whether the latest forward's logits were all finite (True before any),
        for a decoder whose loop would not end on NaN confidences to stop on without a sync of its own."""
        return self.finite[-1] if self.finite else torch.ones((), dtype=torch.bool, device=self.prefix.device)

    def raise_if_nonfinite(self, decoder: str) -> None:
        """Raises :class:`NonFiniteLogitsError` naming the first forward whose logits had NaN or inf
        (one sync: call it once, when the decode ends)."""
        if not self.finite:
            return
        finite = torch.stack(self.finite)
        if bool(finite.all()):
            return
        forward = int((~finite).nonzero()[0, 0])
        raise NonFiniteLogitsError(decoder, forward, *self.windows[forward])


def confidences(logits: torch.Tensor, config: DecodeConfig, generator: torch.Generator | None,
                categorical: torch.Tensor | None = None):
    """(confidence, token) per position: the argmax and its probability, or a
    sample and its probability when ``config.temperature > 0``.

    With ``config.token_rule == "mean"`` the token is the bin nearest the
    expected bin at ordinal slots (all but ``categorical``, ``[Q]`` bool);
    with ``"majority"`` only where the argmax holds less than half the mass.
    The confidence stays the argmax's probability, so the commit schedule is
    unchanged, unless ``config.near_bins``: then an ordinal slot's confidence
    is the probability within that many bins of its token."""
    logits = logits.float()
    if config.temperature > 0:
        probs = torch.softmax(logits / config.temperature, dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
        return probs.gather(-1, tokens[..., None]).squeeze(-1), tokens
    probs = torch.softmax(logits, dim=-1)
    conf, tokens = probs.max(dim=-1)
    if config.token_rule == "argmax" and not config.near_bins:
        return conf, tokens
    bins = torch.arange(probs.shape[-1], dtype=probs.dtype, device=probs.device)
    ordinal = torch.ones_like(tokens, dtype=torch.bool) if categorical is None else ~categorical.to(tokens.device)
    if config.token_rule != "argmax":
        moved = ordinal if config.token_rule == "mean" else ordinal & (conf < MAJORITY)
        tokens = torch.where(moved, (probs @ bins).round().long(), tokens)
    if config.near_bins:
        near = ((bins.long() - tokens[..., None]).abs() <= config.near_bins).to(probs.dtype)
        conf = torch.where(ordinal, (probs * near).sum(-1), conf)
    return conf, tokens


def check_categorical(model: DVLAModel, categorical, device) -> torch.Tensor | None:
    """``categorical`` (``[chunk_len]`` bool, any array-like, or None) as a bool tensor on ``device``."""
    if categorical is None:
        return None
    slots = torch.as_tensor(categorical, device=device)
    if slots.dtype != torch.bool:
        raise TypeError(f"categorical must be a boolean mask over the chunk's slots, got dtype {slots.dtype}")
    if tuple(slots.shape) != (model.chunk_len,):
        raise ValueError(f"categorical must have shape ({model.chunk_len},) (one flag per chunk slot), "
                         f"got {tuple(slots.shape)}")
    return slots


def categorical_window(categorical: torch.Tensor | None, a0: int, a1: int) -> torch.Tensor | None:
    """``categorical`` over chunk slots ``[a0, a1)`` (None: every slot ordinal)."""
    return None if categorical is None else categorical[a0:a1]


def make_generator(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
