"""UD-VLA (github.com/OpenHelix-Team/Unified-Diffusion-VLA) as a :class:`~fast_dvla.backbone.DVLAModel`.

Written on transformers building blocks (``LlamaModel`` for the Emu3-8B decoder, which is Llama's:
RMSNorm, grouped-query attention with RoPE, SwiGLU, no biases) run through the project's
:func:`~fast_dvla.backbone.lean_forward`, so a checkpoint folder in UD-VLA's format
(``config.json`` with ``architectures: ["Emu3MoE"]`` and ``use_blockwise_attn_mask: true``,
``model*.safetensors``, the Emu3 tokenizer's ``emu3.tiktoken`` and ``emu3_vision_tokens.txt``,
and a FAST action tokenizer folder) loads with :meth:`UDVLA.from_pretrained`. None of the original
code is used or needed. The sampler and mask live in :mod:`.ud_vla_sampler`, the prompt and the
FAST decoding in :mod:`.ud_vla_tokens`; docs/ud_vla.md says what matches and what differs.

The original, as its CALVIN evaluation runs it (``EmuVLAModel_i_ia_dis.step``, ``--steps 72``)
-------------------------------------------------------------------------------------------------
* **Prompt**: ``<bos>`` + instruction (text), the observation's frames as Emu3 VQ codes (third-person
  25 x 25, gripper 10 x 10, each ``<image start>1*h*w<image token> codes <eof><image end>``). The VQ
  image tokenizer is a separate model: this adapter takes the codes, and builds the ids with
  :meth:`UDVLA.prompt` (or takes ids built elsewhere).
* **Generated region**: a copy of the frames with every code (and ``1*h*w``, ``<image token>``,
  ``<eof>``) masked, ``<boa>`` and 69 masks: the future frames and up to 69 FAST action tokens,
  generated jointly (747 + 70 positions on CALVIN).
* **Attention**: the text causal; every frame and action position one bidirectional block (runs of
  ``<image start>``/``<boa>`` .. ``<image end>``/``<eoa>`` positions are contiguous here, so the
  "block-wise" rule yields one block) that sees the text; after a committed ``<eoa>`` the positions
  that follow form a causal run the block cannot see. Positions ``0 .. L-1``; the logits at ``p``
  come from position ``p - 1``.
* **Sampler**: :func:`.ud_vla_sampler.sample` (cosine schedule, multinomial draws over the allowed
  ids, Gumbel top-k re-masking with a cumulative temperature, seed 42). :meth:`UDVLA.generate_original`
  runs it on this model and draws the same random numbers in the same order.

What fast-dvla's engine decodes
-------------------------------
The engine decodes a chunk of discrete tokens after a prefix of embeddings. Here:

* **prefix** (:meth:`UDVLA.engine_prefix`): the prompt, the generated region's frame part *as the
  original's first step sees it* (all masked) and ``<boa>``; **chunk**: the 69 action positions.
  The future frames are not generated: they stay masked. With every chunk slot masked, the
  engine's bidirectional forward is the original's first forward exactly (checked on the goldens).
* **action vocabulary** (``n_bins = 1026``): bin ``f`` (0..1024) is FAST id ``f`` (token ``151642 - f``),
  bin 1025 is ``<eoa>``: the ids the original allows at action positions, in that order;
  ``mask_token_id == 1026`` is Emu3's mask 151848. :meth:`UDVLA.action_logits` keeps those
  ``lm_head`` rows (the original's softmax over the allowed ids is the same distribution). FAST
  ids are BPE ids, not ordered values: decode with ``token_rule="argmax"``.
* **masks**: the text rows stay causal under both layouts (the prefix's text ends at its first
  ``<image start>`` embedding, read from the prefix itself); everything else follows the layout:
  ``bidirectional`` is the original's mask (before any ``<eoa>``), ``block_causal`` splits the 69
  slots into ``69 / block_size`` causal blocks (``block_size`` 23 by default; 3 and 69 also divide)
  with the prefix blind to them.
* **the shift under the block-causal cache**: a window starting at ``s`` needs the hidden state at
  ``s - 1``; :class:`~fast_dvla.adapters.dream_vla.DreamKVCache` keeps it next to the keys/values,
  final when they are (the same need as Dream-VLA's).
* Not reproduced by the engine: the multinomial draws (its decoders commit argmaxes, or sample with
  their own generator), the joint future-frame generation, and what follows a committed ``<eoa>``
  (the original re-masks and detaches the positions after it; the engine keeps decoding them, and
  :meth:`UDVLA.bins_to_actions` cuts at the first ``<eoa>`` as the original does).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..backbone import DVLAModel, lean_forward
from ..masks import AttentionLayout
from ..schema import ConfigError
from .dream_vla import DreamKVCache, shift_one_place
from .ud_vla_sampler import ACTION_REGION, blockwise_attention, make_mask, region_vocabularies, sample
from .ud_vla_tokens import (BOA_ID, BOI_ID, EOA_ID, FAST_LAST_ID, MASK_ID, Emu3TextTokenizer, FastActions,
                            prompt_ids)

CHUNK_LEN = ACTION_REGION - 1          # the 69 generated action positions after <boa>
ACTION_TOKENIZER_DIR = "action_tokenizer"
# ids the original hard-codes (mask rule, sampler, wrapper); a config.json that names others is refused
FIXED_IDS = {"pad_token_id": 151643, "bos_token_id": 151849, "img_token_id": 151851, "boi_token_id": 151852,
             "eoi_token_id": 151853, "eof_token_id": 151847, "boa_token_id": BOA_ID}
UNUSED_TENSORS = ("action_projector.", "action_layers.", "action_decoder.")  # the flow-matching expert's


def is_ud_vla_config(config: dict) -> bool:
    """Whether a parsed ``config.json`` is a UD-VLA checkpoint's: an ``Emu3MoE`` trained with the
    block-wise attention mask."""
    architectures = config.get("architectures")
    return (isinstance(architectures, list) and "Emu3MoE" in architectures
            and config.get("use_blockwise_attn_mask") is True)


def check_config(config: dict) -> None:
    """Refuse, by field, what this adapter does not reproduce."""
    if config.get("use_blockwise_attn_mask") is not True or config.get("use_bidirectional_attn_mask"):
        raise ConfigError("UD-VLA's discrete sampler runs an Emu3MoE trained with use_blockwise_attn_mask: true "
                          "(and use_bidirectional_attn_mask false); this config.json says otherwise",
                          "use_blockwise_attn_mask")
    for field, expected in FIXED_IDS.items():
        if config.get(field, expected) != expected:
            raise ConfigError(f"{field} is {config[field]}, but the original's mask and sampler hard-code "
                              f"{expected}", field)
    if config.get("qkv_bias"):
        raise ConfigError("qkv_bias: biases on q/k/v only are not supported (Llama's attention_bias adds o_proj's "
                          "too)", "qkv_bias")
    if config.get("rope_scaling") is not None:
        raise ConfigError("rope_scaling is not supported: UD-VLA's checkpoints use plain RoPE", "rope_scaling")


class UDVLA(DVLAModel):
    """UD-VLA over a checkpoint folder in its published format; see the module docstring.

    ``tokenizer``: the Emu3 text tokenizer (None: :meth:`prompt` is unavailable; ids built elsewhere
    still work). ``actions``: the FAST decoder (its ``vocab_size`` sets the action vocabulary)."""

    def __init__(self, config: dict, actions: FastActions, tokenizer: Emu3TextTokenizer | None = None,
                 block_size: int = 23):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        check_config(config)
        if CHUNK_LEN % block_size:
            raise ValueError(f"block_size {block_size} does not divide the {CHUNK_LEN} action positions "
                             "(1, 3, 23 and 69 do)")
        self.config = dict(config)
        self.tokenizer, self.actions = tokenizer, actions
        self.chunk_len, self.block_size = CHUNK_LEN, block_size
        action_ids = actions.action_token_ids()
        self.n_bins = len(action_ids)
        self.register_buffer("action_ids", torch.tensor(action_ids), persistent=False)
        llama = LlamaConfig(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            hidden_act=config.get("hidden_act", "silu"), rms_norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=config.get("rope_theta", 1000000.0),
            max_position_embeddings=config.get("max_position_embeddings", 9216), attention_bias=False,
            attention_dropout=0.0, mlp_bias=False, tie_word_embeddings=False, pad_token_id=None, bos_token_id=None,
            eos_token_id=None)
        llama._attn_implementation = "sdpa"  # the original's default on the CPU
        self.model = LlamaModel(llama)
        self.model.get_input_embeddings().requires_grad_(False)  # see TransformersBackbone.freeze_unused
        self.lm_head = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, block_size: int = 23, action_tokenizer=None, tokenizer=None,
                        dtype: torch.dtype = torch.float32) -> "UDVLA":
        """Load a UD-VLA checkpoint folder. ``action_tokenizer``: the FAST processor folder (default
        ``<path>/action_tokenizer``; for the CALVIN checkpoint, the repository's
        ``pretrain/fast_calvin_abcd_a10_s50``); ``tokenizer``: the folder of ``emu3.tiktoken`` and
        ``emu3_vision_tokens.txt`` (default ``path``, where UD-VLA's training saves them). A missing
        file raises ``FileNotFoundError`` naming it."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"UD-VLA checkpoint: config.json not found in {path}")
        config = json.loads((path / "config.json").read_text())
        shards = sorted(path.glob("model*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"UD-VLA checkpoint: model.safetensors (or model-*.safetensors shards) not found "
                                    f"in {path}")
        actions = FastActions(Path(action_tokenizer) if action_tokenizer else path / ACTION_TOKENIZER_DIR)
        model = cls(config, actions, Emu3TextTokenizer(Path(tokenizer) if tokenizer else path), block_size)
        state = {}
        for shard in shards:
            state.update(load_file(str(shard)))
        model.load_published(state)
        return model.to(dtype).eval()

    def load_published(self, state: dict) -> None:
        """The published tensors: ``model.*`` into the decoder, ``lm_head.weight`` (the embedding
        table when the config ties them); the flow-matching expert's are not used here."""
        decoder = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        self.model.load_state_dict(decoder, strict=True)
        head = state.get("lm_head.weight")
        if head is None and self.config.get("tie_word_embeddings"):
            head = decoder["embed_tokens.weight"]
        if head is None:
            raise ValueError("the checkpoint has no lm_head.weight (and its config does not tie it)")
        self.lm_head.weight.data.copy_(head)
        unknown = [k for k in state if not k.startswith(("model.", "lm_head.") + UNUSED_TENSORS)]
        if unknown:
            raise ValueError(f"unexpected tensors in the checkpoint: {unknown[:5]}")

    # -- prompts --------------------------------------------------------------------------------
    def prompt(self, instruction: str, static_codes, gripper_codes=None) -> tuple[list[int], list[int]]:
        """(text ids, frame ids ending with ``<boa>``) of one observation: its instruction and VQ code
        grids ``[h, w]`` (third-person, gripper), as the CALVIN wrapper builds them."""
        if self.tokenizer is None:
            raise ValueError("this UDVLA has no Emu3 tokenizer: build the ids elsewhere")
        return prompt_ids(self.tokenizer, instruction, static_codes, gripper_codes)

    @staticmethod
    def batch_ids(rows) -> tuple[torch.Tensor, torch.Tensor]:
        """``[(text ids, frame ids), ...]`` -> two ``[B, .]`` tensors (rows of equal lengths)."""
        for part in (0, 1):
            lengths = {len(r[part]) for r in rows}
            if len(lengths) > 1:
                raise ValueError(f"rows of different {('text', 'frame')[part]} lengths {sorted(lengths)}: left "
                                 "padding is not supported")
        return tuple(torch.tensor([list(r[part]) for r in rows]) for part in (0, 1))

    def engine_prefix(self, text_ids: torch.Tensor, frame_ids: torch.Tensor) -> torch.Tensor:
        """``[B, P, H]``: the embeddings of the prompt, the masked future frames and ``<boa>`` (the
        original's first-step input up to the action positions)."""
        device = self.lm_head.weight.device
        region = make_mask(frame_ids, MASK_ID)[:, :-CHUNK_LEN]
        ids = torch.cat([text_ids, frame_ids[:, :-1], region], dim=1).to(device)
        return self.model.get_input_embeddings()(ids)

    # -- the engine's contract ------------------------------------------------------------------
    def lora_target(self) -> nn.Module:
        """The Emu3 (Llama) decoder stack; a LoRA student adapts it, not the tables."""
        return self.model

    def embed_actions(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Bins (``n_bins`` = [MASK]) -> Emu3's embeddings; no slot embedding (the slot is the position)."""
        return self.model.get_input_embeddings()(self.bins_to_ids(tokens))

    def bins_to_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = self.action_ids[tokens.clamp(max=self.n_bins - 1)]
        return torch.where(tokens == self.n_bins, torch.full_like(ids, MASK_ID), ids)

    def ids_to_bins(self, ids: torch.Tensor) -> torch.Tensor:
        """Emu3 ids -> bins (FAST ids, ``<eoa>`` last); ids outside the action vocabulary give -1."""
        fast = FAST_LAST_ID - ids
        bins = torch.where((fast >= 0) & (fast < self.n_bins - 1), fast, torch.full_like(ids, -1))
        return torch.where(ids == EOA_ID, torch.full_like(ids, self.n_bins - 1), bins)

    def text_lengths(self, prefix: torch.Tensor) -> torch.Tensor:
        """``[B]``: where each row's text ends, i.e. its first ``<image start>`` embedding (no frame: all text)."""
        boi = self.model.get_input_embeddings().weight[BOI_ID].to(prefix.dtype)
        found = (prefix == boi).all(-1)
        first = found.int().argmax(-1)
        return torch.where(found.any(-1), first, torch.full_like(first, prefix.shape[1]))

    def engine_mask(self, layout: AttentionLayout, embeds: torch.Tensor) -> torch.Tensor:
        """The layout's mask with the prefix's text rows causal (``[B, 1, Q, K]`` when a row's text is queried)."""
        mask = layout.dense_mask(embeds.device)
        if layout.q_start >= layout.prefix_len:
            return mask
        if layout.q_start != 0:
            raise ValueError("a forward over part of the prefix must start at position 0")
        text = self.text_lengths(embeds[:, :layout.prefix_len])                        # [B]
        q = torch.arange(layout.q_len, device=embeds.device)
        k = torch.arange(layout.kv_len, device=embeds.device)
        text_row = q[None, :] < text[:, None]                                         # [B, Q]
        return torch.where(text_row[:, None, :, None], (k[None, :] <= q[:, None])[None, None], mask)

    def backbone_forward(self, embeds, positions, layout: AttentionLayout, cache):
        """Hidden states that predict the query positions: for position ``p``, the decoder's output
        at ``p - 1`` (at 0 its own); positions as given (the original's are 0-based too)."""
        if not isinstance(layout, AttentionLayout):
            raise TypeError(f"expected the forward's fast_dvla.masks.AttentionLayout, got {type(layout).__name__}")
        B = embeds.shape[0]
        position_ids = positions.reshape(1, -1).expand(B, -1)
        hidden = lean_forward(self.model, embeds, position_ids, self.engine_mask(layout, embeds), cache)
        return shift_one_place(hidden, cache, layout.q_start)

    def action_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head`` restricted to the action ids, in bin order."""
        return F.linear(hidden, self.lm_head.weight[self.action_ids])

    def new_cache(self, batch_size: int, max_len: int) -> DreamKVCache:
        return DreamKVCache.for_decoder(self.model.config, batch_size, max_len, like=self.lm_head.weight)

    # -- the original's generation ----------------------------------------------------------------
    def original_logits(self, input_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
        """The original's forward: the block-wise mask from the ids, positions ``0 ..``, float32
        logits of the last ``seq_len`` positions, each from the position before it."""
        embeds = self.model.get_input_embeddings()(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        hidden = lean_forward(self.model, embeds, positions, blockwise_attention(input_ids), None)
        return self.lm_head(hidden[:, -(seq_len + 1):-1]).float()

    @torch.no_grad()
    def generate_original(self, text_ids: torch.Tensor, frame_ids: torch.Tensor, steps: int = 72, seed: int = 42,
                          history: list | None = None) -> torch.Tensor:
        """UD-VLA's own decoding (:func:`.ud_vla_sampler.sample`) of the whole generated region after
        the prompt ``[text | frames without <boa>]``: future frames and action tokens. Returns the last
        step's sampled ids ``[B, len(frames) + 69]``, what the original decodes actions from
        (:meth:`generated_to_actions`). The original runs one row; rows here each follow their own
        ``<eoa>`` but share the generator, so a row's draws depend on the batch."""
        device = self.lm_head.weight.device
        text_ids, frame_ids = text_ids.to(device), frame_ids.to(device)
        gen = make_mask(frame_ids, MASK_ID)
        input_ids = torch.cat([text_ids, frame_ids[:, :-1], gen], dim=1)
        image_vocab, action_vocab = region_vocabularies(self.lm_head.out_features, self.action_ids.tolist(), device)
        return sample(lambda ids: self.original_logits(ids, gen.shape[1]), input_ids, gen, steps, MASK_ID,
                      image_vocab, action_vocab, seed, history)

    # -- actions -------------------------------------------------------------------------------------
    def generated_to_actions(self, generated) -> np.ndarray:
        """``[B, region]`` generated ids -> ``[B, 10, 7]`` actions, as the CALVIN wrapper decodes them."""
        return np.stack([self.actions.to_actions(row) for row in np.asarray(generated)])

    def bins_to_actions(self, bins) -> np.ndarray:
        """``[B, 69]`` decoded bins -> ``[B, 10, 7]`` actions: ``<boa>`` then the bins' ids, cut at the
        first ``<eoa>`` and decoded as :meth:`generated_to_actions` does."""
        ids = self.bins_to_ids(torch.as_tensor(np.asarray(bins)).to(self.action_ids.device)).cpu()
        region = torch.cat([torch.full((ids.shape[0], 1), BOA_ID), ids], dim=1)
        return self.generated_to_actions(region.numpy())
