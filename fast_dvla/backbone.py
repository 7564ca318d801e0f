"""The contract between the decoding engine and a dVLA, and its
implementation for transformers backbones.

The engine needs four things from a model: embeddings for action tokens,
a backbone forward that takes input embeddings, absolute positions, the
forward's :class:`AttentionLayout` (from which it derives its mask) and
(optionally) a :class:`BlockKVCache`, the action-logit head, and the shape
of its chunk. Any backbone that accepts a 4D mask and a KV cache can be
decoded; :class:`TransformersBackbone` wraps a transformers decoder
(``LlamaModel``, ``Qwen2Model``, ...).
"""
from __future__ import annotations

import torch
from torch import nn

from .cache import BlockKVCache
from .masks import AttentionLayout


class DVLAModel(nn.Module):
    """Base class for anything :func:`fast_dvla.decode` can decode.

    Subclasses set ``chunk_len`` (action tokens per chunk), ``block_size``,
    ``n_bins`` (action vocabulary; ``mask_token_id == n_bins``) and
    implement the methods below.

    ``supports_padding``: set it True once ``backbone_forward`` takes per-row
    positions ``[B, Q]`` and attends as a layout with ``pad_lens`` says (its
    ``dense_mask`` already does); only then does ``decode`` take a
    ``prefix_mask`` with padded rows (docs/design.md#padded-batches).
    """

    chunk_len: int
    block_size: int
    n_bins: int
    supports_padding: bool = False

    @property
    def mask_token_id(self) -> int:
        return self.n_bins

    @property
    def num_blocks(self) -> int:
        return self.chunk_len // self.block_size

    def embed_actions(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``tokens [B, Q]`` (``mask_token_id`` for [MASK]) at chunk slots ``slots [Q]`` -> ``[B, Q, H]``."""
        raise NotImplementedError

    def backbone_forward(self, embeds: torch.Tensor, positions: torch.Tensor, layout: AttentionLayout,
                         cache: BlockKVCache | None) -> torch.Tensor:
        """``embeds [B, Q, H]`` at absolute ``positions [Q]`` -> hidden ``[B, Q, H]``, attending as ``layout``
        says (e.g. ``layout.dense_mask(device)``, the boolean ``[1, 1, Q, K]`` mask). A padded batch
        (``layout.pad_lens``, only if ``supports_padding``) has per-row positions ``[B, Q]`` and a
        ``[B, 1, Q, K]`` mask."""
        raise NotImplementedError

    def action_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, Q, H]`` -> ``[B, Q, n_bins]``."""
        raise NotImplementedError

    def new_cache(self, batch_size: int, max_len: int) -> BlockKVCache:
        raise NotImplementedError

    def lora_target(self) -> nn.Module:
        """The decoder stack whose linear layers a LoRA student adapts (``fast_dvla.training.lora``): by
        default ``self.backbone.decoder`` (a :class:`TransformersBackbone`'s); a model built otherwise
        returns its own."""
        backbone = getattr(self, "backbone", None)
        if not isinstance(getattr(backbone, "decoder", None), nn.Module):
            raise NotImplementedError(f"{type(self).__name__}.lora_target(): return the decoder module a LoRA "
                                      "adapter goes into (it has no backbone.decoder)")
        return backbone.decoder


# decoders whose layers are exactly: norm -> q/k/v -> RoPE -> attention -> o -> residual ->
# norm -> gated MLP -> residual, with these module names (transformers' Llama layout)
LEAN_DECODERS = ("LlamaModel", "Qwen2Model")


def lean_forward(decoder: nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                 cache: BlockKVCache | None, **attn_kwargs) -> torch.Tensor:
    """The same computation as ``decoder(inputs_embeds=...)`` for a Llama-layout decoder,
    without its per-call machinery (output capture, mask preparation, keyword plumbing).

    That machinery is a fixed cost per forward: small next to a large model's layers, but
    a visible share of a small model's short cached windows. Submodules are still called
    as modules, so biases (Qwen2) and LoRA adapters (peft) apply.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

    attention = ALL_ATTENTION_FUNCTIONS.get_interface(decoder.config._attn_implementation, eager_attention_forward)
    cos, sin = decoder.rotary_emb(embeds, position_ids)
    batch, length = embeds.shape[:2]
    hidden = embeds
    for i, layer in enumerate(decoder.layers[: decoder.config.num_hidden_layers]):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        heads = (batch, length, -1, attn.head_dim)
        q = attn.q_proj(x).view(heads).transpose(1, 2)
        k = attn.k_proj(x).view(heads).transpose(1, 2)
        v = attn.v_proj(x).view(heads).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, i)
        out, _ = attention(attn, q, k, v, mask, dropout=attn.attention_dropout if attn.training else 0.0,
                           scaling=attn.scaling, **attn_kwargs)
        hidden = hidden + attn.o_proj(out.reshape(batch, length, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return decoder.norm(hidden)


class TransformersBackbone(nn.Module):
    """A transformers decoder run with our own 4D mask and block cache.

    Every forward takes an :class:`AttentionLayout`. fast-dvla's backends
    read it directly (``fast_dvla_layout``); transformers' ``eager`` reads
    only ``attention_mask`` and adds it to the scores, so it gets the
    layout's additive mask, the others its dense boolean mask. transformers
    returns a 4D mask unchanged, so the block-causal rule is never replaced
    by its token-causal default. Padded batches come as per-row positions
    and a layout with ``pad_lens`` (its masks hide the padding). Llama-layout decoders
    (:data:`LEAN_DECODERS`) run through :func:`lean_forward` unless
    ``lean=False``; tests check that both paths agree.
    """

    def __init__(self, decoder: nn.Module, backend: str = "sdpa", lean: bool = True):
        super().__init__()
        self.decoder = decoder
        self.lean = lean and type(decoder).__name__ in LEAN_DECODERS
        self.freeze_unused()
        self.set_backend(backend)

    def freeze_unused(self) -> None:
        """We always pass input embeddings: the token table never receives a
        gradient (and DDP rejects parameters that get none)."""
        table = self.decoder.get_input_embeddings()
        if table is not None:
            table.requires_grad_(False)

    @property
    def config(self):
        return self.decoder.config

    def set_backend(self, name: str) -> None:
        """One of :data:`fast_dvla.attention.BACKEND_NAMES`; raises if it cannot run here."""
        from .attention import transformers_name

        self.decoder.config._attn_implementation = transformers_name(name)
        self.backend = name

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, layout: AttentionLayout,
                cache: BlockKVCache | None = None) -> torch.Tensor:
        if not isinstance(layout, AttentionLayout):
            raise TypeError(f"expected the forward's fast_dvla.masks.AttentionLayout, got {type(layout).__name__}")
        if embeds.shape[1] != layout.q_len:
            raise ValueError(f"{embeds.shape[1]} query embeddings for a layout of {layout.q_len} queries")
        kwargs = {}
        if self.backend == "eager":
            mask = layout.additive_mask(embeds.dtype, embeds.device)
        else:
            mask = layout.dense_mask(embeds.device)
            kwargs["fast_dvla_layout"] = layout
        # [Q] for every row alike, or [B, Q] per row (a padded batch's real tokens start at 0 in each row)
        position_ids = positions.reshape(1, -1).expand(embeds.shape[0], -1) if positions.dim() == 1 else positions
        if self.lean:
            return lean_forward(self.decoder, embeds, position_ids, mask, cache, **kwargs)
        out = self.decoder(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask,
                           past_key_values=cache, use_cache=False, **kwargs)
        return out.last_hidden_state

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype, device) -> BlockKVCache:
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return BlockKVCache(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, head_dim, max_len,
                            dtype=dtype, device=device)
