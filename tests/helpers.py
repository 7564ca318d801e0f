"""Models for tests: a tiny real reference dVLA (also with absolute
positions), a model whose confidences the test controls, and batches of
prefixes of different lengths."""
from __future__ import annotations

import math
import random

import torch

from fast_dvla.backbone import DVLAModel
from fast_dvla.cache import BlockKVCache
from fast_dvla.model import ModelConfig, ReferenceDVLA

TINY = dict(image_size=16, image_grid=2, instr_len=4, hidden_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, intermediate_size=128, horizon=4, action_dim=7, block_size=7)


def tiny_model(seed: int = 0, sharpness: float = 1.0, attention_gain: float = 2.0, model_class=None,
               **overrides) -> ReferenceDVLA:
    """A random tiny reference dVLA; ``sharpness`` scales the head so that
    confidences spread over [0, 1] instead of sitting near 1/256.

    ``attention_gain`` re-draws the attention projections with std
    ``gain / sqrt(fan_in)``: at transformers' std of 0.02 attention adds next
    to nothing to the residual stream, so every row of a batch decoded to
    (nearly) the same tokens whatever its prefix, and per-row state went
    untested. At 2 the rows of ``random_prefix`` differ in most tokens.

    ``model_class``: a subclass of ``ReferenceDVLA`` to build instead (e.g.
    :class:`AbsolutePositionDVLA`)."""
    torch.manual_seed(seed)
    model = (model_class or ReferenceDVLA)(ModelConfig(**{**TINY, **overrides})).eval()
    redraw_attention(model, attention_gain)
    with torch.no_grad():
        model.head.weight.mul_(sharpness)
    return model


@torch.no_grad()
def redraw_attention(model: DVLAModel, gain: float) -> None:
    """The q/k/v/o projections of ``model``'s transformers decoder drawn from N(0, gain^2 / fan_in)
    (from torch's global generator; see ``tiny_model``)."""
    for layer in model.backbone.decoder.layers:
        attn = layer.self_attn
        for projection in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            projection.weight.normal_(0.0, gain / math.sqrt(projection.in_features))


class AbsolutePositionDVLA(ReferenceDVLA):
    """The reference model with a learned absolute position embedding added to the backbone's input,
    as GPT-2 has. RoPE alone makes attention depend only on position differences, so shifting every
    position of a row changes nothing but rounding; this model's output depends on where each token
    sits, so it tells a padded row whose positions were not shifted back from the row alone."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.position_embed = torch.nn.Embedding(config.prefix_len + config.chunk_len, config.hidden_size)
        torch.nn.init.normal_(self.position_embed.weight, std=0.5)

    def backbone_forward(self, embeds, positions, layout, cache):
        return super().backbone_forward(embeds + self.position_embed(positions), positions, layout, cache)


def left_padded_batch(model: ReferenceDVLA, batch: int, seed: int = 0, padding: float = 100.0):
    """Prefixes with different numbers of real tokens, left-padded to the model's prefix length.

    Returns ``(prefix [B, P, H], prefix_mask [B, P], lengths)``: row ``b``'s real tokens are the last
    ``lengths[b]`` of ``random_prefix``'s row ``b`` (the first row keeps all ``P``, the others a random,
    distinct, shorter length), and its padding slots hold ``padding`` times random normal noise (NaN
    where ``padding`` is NaN), which no query may see."""
    prefix = random_prefix(model, batch, seed)
    P = prefix.shape[1]
    if batch > P:
        raise ValueError(f"{batch} rows need {batch} distinct lengths, the prefix has {P} slots")
    lengths = [P] + random.Random(seed).sample(range(1, P), batch - 1)
    mask = torch.arange(P)[None, :] >= torch.tensor([P - n for n in lengths])[:, None]
    noise = torch.randn(prefix.shape, generator=torch.Generator().manual_seed(seed)) * padding
    return torch.where(mask[..., None], prefix, noise), mask, lengths


def random_prefix(model: ReferenceDVLA, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    images = torch.rand(batch, len(cfg.cameras), 3, cfg.image_size, cfg.image_size, generator=g)
    instr = torch.randint(0, cfg.instr_vocab, (batch, cfg.instr_len), generator=g)
    state = torch.randn(batch, cfg.state_dim, generator=g)
    with torch.no_grad():
        return model.embed_prefix(images, instr, state)


class ScriptedModel(DVLAModel):
    """Logits come from a table: at chunk slot ``s`` of row ``b`` the model
    predicts ``target[b, s]`` with probability ``conf[b, s]`` (or
    ``conf_fn(b, s, step)`` per forward), whatever the attention sees."""

    def __init__(self, conf: torch.Tensor, target: torch.Tensor, block_size: int, n_bins: int = 16):
        super().__init__()
        self.conf, self.target = conf.float(), target.long()
        self.chunk_len, self.block_size, self.n_bins = conf.shape[1], block_size, n_bins
        self.forwards = 0
        self._dummy = torch.nn.Parameter(torch.zeros(1))

    def embed_actions(self, tokens, slots):
        return slots.float().view(1, -1, 1).expand(tokens.shape[0], -1, 1) + 0 * self._dummy

    def backbone_forward(self, embeds, positions, layout, cache):
        self.forwards += 1
        return embeds

    def action_logits(self, hidden):
        slots = hidden[..., 0].long()                        # [B, Q]
        rows = torch.arange(hidden.shape[0])[:, None].expand_as(slots)
        p = self.conf[rows, slots].clamp(1e-6, 1 - 1e-6)
        other = torch.log((1 - p) / (self.n_bins - 1))
        logits = other[..., None].expand(*slots.shape, self.n_bins).clone()
        logits.scatter_(-1, self.target[rows, slots][..., None], torch.log(p)[..., None])
        return logits

    def new_cache(self, batch_size, max_len):
        return BlockKVCache(0, batch_size, 1, 1, max_len)


def scripted_prefix(batch: int, length: int = 3) -> torch.Tensor:
    return torch.full((batch, length, 1), -1.0)


def fallback_steps(k: int, n: int) -> int:
    r, s = k, 0
    while r:
        r -= max(1, math.floor(r / n))
        s += 1
    return s
