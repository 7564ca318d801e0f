"""Dream-VLA (github.com/DreamLM/Dream-VLX, ``vla/``) as a :class:`~fast_dvla.backbone.DVLAModel`.

Written on transformers building blocks (``Qwen2Model`` for the Dream-7B decoder) plus a small
Qwen2-VL vision tower of our own whose parameter names and shapes are the published ones, so a
checkpoint folder in Dream-VLA's format (``config.json``, ``model.safetensors`` or shards,
``vocab.json``/``merges.txt``/``tokenizer_config.json``, ``dataset_statistics.json``, optionally
``proprio_projector--*_checkpoint.pt``) loads with :meth:`DreamVLA.from_pretrained`. None of the
original code is used or needed.

What the original does, and what this module reproduces
--------------------------------------------------------
* **Prompt** (its LIBERO evaluation): the Dream-VL chat template,
  ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n`` then one
  ``<|image_pad|>`` run per image (``grid_t * grid_h * grid_w / merge**2`` tokens: 64 for 224 px),
  ``What action should the robot take to {task}?<|im_end|>\\n<|im_start|>assistant\\n``. Text is
  byte-level BPE (Qwen2) from the checkpoint's ``vocab.json``/``merges.txt``; special and action
  tokens at the ids of ``tokenizer_config.json``. Images go through the Qwen2-VL processor's steps
  (smart resize, bicubic, rescale, CLIP mean/std, temporal tiling, 2x2-merge patch order); the
  evaluation's TensorFlow centre crop and JPEG round trip happen before the processor and are the
  caller's. With ``proprio``, the OpenVLA-OFT projector's token is put *first* in the sequence.
* **Forward**: attention is bidirectional (the original's mask covers padding only); positions are
  ``attention_mask.cumsum(1)``, i.e. 1, 2, ... (its 3-D multimodal RoPE reduces to 1-D RoPE since
  the three position rows are equal); the logits at position ``p`` come from the hidden state at
  ``p - 1`` (it shifts the logits one place right, keeping the first).
* **Generation** (``diffusion_generate`` as ``predict_action(use_discrete_diffusion=True)`` calls it):
  the prompt is followed by ``8 * 7 + 2 = 58`` ``<|mask|>`` tokens (the 56 action tokens and the
  chat suffix ``<|im_end|>\\n``, which is *generated too*); with ``alg="maskgit_plus"``,
  temperature 0, ``timesteps = linspace(1, eps, steps + 1)``, step ``i`` commits the
  ``int(n_masked * (1 - t[i+1] / t[i]))`` most confident masked positions (everything at the last
  step), confidence = the probability of the argmax over the **whole vocabulary**.
  :func:`dream_maskgit_plus` is that rule as a pure function and :meth:`DreamVLA.generate_original`
  runs it on this model: on the tiny checkpoint it gives the original's tokens exactly
  (``tests/test_adapter_dream_vla.py``). The LIBERO evaluation's default is ``steps=1``.
* **Action ids**: token ``id`` -> bin ``len(tokenizer) - 1 - id`` (0..255), bin centre index
  ``min(bin, 254)`` of ``linspace(-1, 1, 256)``'s 255 centres, then q01/q99 un-normalisation where
  the statistics' mask is true.

How it maps onto fast-dvla's engine, and what differs
------------------------------------------------------
The engine's action vocabulary is the 256 bins (``mask_token_id == n_bins == 256``), the chunk is
the 56 action tokens in blocks of ``block_size`` (7 = one timestep), and the sequence is
``[prefix | chunk]``.

* :meth:`DreamVLA.action_logits` keeps the 256 action rows of ``lm_head``. The original's argmax
  runs over all 152,064 rows and **can land outside the action ids** (it then clips the bin to 0 or
  254): nothing in its sampler restricts it. A fine-tuned model puts nearly all mass on action ids
  at action positions, but the restriction also renormalises the confidences, so the commit order of
  a multi-step decode can differ from the original's. ``tests/golden/dream_vla_tiny.json`` records,
  per case, whether every argmax landed on an action id.
* The two suffix positions are not chunk slots. Under the **bidirectional** layout
  :meth:`DreamVLA.backbone_forward` appends them as ``<|mask|>`` queries whenever the forward's keys
  reach the end of the chunk (their keys/values join that forward's and are never cached), which is
  the original's state until it commits them; the original commits them at some step and then
  attends to the committed tokens, which the engine cannot track. Under the **block-causal** layout
  they would form a block after the last action block, which no action position can see: leaving
  them out is exact.
* The engine's ``vanilla`` schedule (``masked_after_step``, cosine or linear) is not Dream's
  ``int(n * (1 - s / t))``; with ``vanilla_steps=1`` (the LIBERO evaluation's default ``steps=1``)
  both commit every argmax at once, and ``decode(method="vanilla", vanilla_steps=1)`` reproduces the
  original's action tokens wherever its argmaxes are action ids (checked on the goldens). Other step
  counts need :meth:`DreamVLA.generate_original`.
* The one-place shift under the block-causal cache: a window starting at ``s > 0`` needs the hidden
  state at ``s - 1``, which an earlier forward computed. :class:`DreamKVCache` keeps each position's
  final hidden state next to its keys/values, written by the same forward, so it is final exactly
  when they are; uncached forwards start at 0 and shift within themselves.
* Batches: the original's sampler takes its top-k over the masked positions of the *flattened*
  batch (rows compete for the per-step budget) and, on the CPU, hands SDPA the ``[B, N]`` padding
  mask as is, which broadcasts as a per-row key mask only for batch size 1 (not checked for larger
  batches); its evaluation calls it one observation at a time. Here
  every row is decoded as if alone (equal prompt lengths; left padding is not implemented yet).
* Attention runs in this module's own layer loop over the ``Qwen2Model``'s modules with PyTorch
  SDPA and the layout's dense boolean mask (the original's CPU path); the fused backends of
  ``fast_dvla.attention`` are not wired to it.
* Precision: the original evaluation casts the model and pixels to bfloat16 on a GPU; the goldens
  and this module run float32 on the CPU.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..cache import BlockKVCache
from ..masks import BIDIRECTIONAL, AttentionLayout
from ..policy_model import PolicyModel
from ..processor import check_instructions
from ..schema import ConfigError, check_entries

MASK_TOKEN_ID = 151666
IMAGE_TOKEN = "<|image_pad|>"
SUFFIX_LEN = 2  # "<|im_end|>\n" after the action tokens, generated by the original too
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
CAMERAS = ("agentview", "wrist")  # the LIBERO evaluation's image order: third-person, then wrist


def is_dream_vla_config(config: dict) -> bool:
    """Whether a parsed ``config.json`` is a Dream-VLA checkpoint's (as its ``from_pretrained`` tells)."""
    architectures = config.get("architectures")
    return config.get("model_type") == "dream-vla" or (
        isinstance(architectures, list) and "DreamVLAForActionPrediction" in architectures)


# -- the original's sampler ---------------------------------------------------------------------
def dream_transfer_counts(n_masked: int, steps: int, eps: float = 1e-3) -> list[int]:
    """How many tokens Dream's ``maskgit_plus`` commits at each step when ``n_masked`` positions
    start masked (one row): ``int(n * (1 - t[i+1] / t[i]))`` of the ``n`` still masked, computed in
    float32 like the original, and all that remain at the last step."""
    timesteps = torch.linspace(1, eps, steps + 1)
    counts, n = [], n_masked
    for i in range(steps):
        k = int(torch.tensor(n) * (1 - timesteps[i + 1] / timesteps[i])) if i < steps - 1 else n
        counts.append(k)
        n -= k
    return counts


def dream_maskgit_plus(logits_fn, x: torch.Tensor, mask_id: int, steps: int, eps: float = 1e-3,
                       history: list | None = None) -> torch.Tensor:
    """Dream's ``diffusion_generate`` with ``alg="maskgit_plus"``, ``temperature=0``, ``alg_temp=0``,
    ``top_p``/``top_k`` unset and ``eos_penalty=0`` (its LIBERO evaluation's settings), per row.

    ``x``: ``[B, N]`` the generated region's token ids, ``mask_id`` where masked; ``logits_fn(x)``
    returns ``[B, N, V]`` logits for those positions (already shifted as the model shifts them).
    Each step takes the softmax over the whole last dimension, the argmax and its probability at
    the masked positions, and commits the ``k`` most confident (``torch.topk`` order), ``k`` from
    :func:`dream_transfer_counts`. A step with ``k = 0`` still costs a forward, as in the original.
    Rows are independent (the original pools the budget over the flattened batch; for one row the
    two are the same). ``history``: a list to append, per step, ``[B, N]`` bool of the positions it
    committed. Returns the final ``x`` (a new tensor)."""
    x = x.clone()
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
    for i in range(steps):
        mask_index = x == mask_id
        logits = logits_fn(x)
        committed = torch.zeros_like(mask_index)
        t, s = timesteps[i], timesteps[i + 1]
        for b in range(x.shape[0]):
            where = mask_index[b].nonzero().squeeze(1)
            if where.numel() == 0:
                continue
            probs = torch.softmax(logits[b][mask_index[b]], dim=-1)
            confidence, x0 = probs.max(dim=-1)
            n = mask_index[b].sum()
            k = int(n * (1 - s / t)) if i < steps - 1 else int(n)
            if k > 0:
                _, transfer = torch.topk(confidence, k)
                x[b, where[transfer]] = x0[transfer]
                committed[b, where[transfer]] = True
        if history is not None:
            history.append(committed)
    return x


# -- checkpoint pieces ----------------------------------------------------------------------------
class DreamVisionTower(nn.Module):
    """The Qwen2-VL vision transformer Dream-VL uses (parameter names as published under ``visual.``):
    3-D patch embedding, blocks of LayerNorm -> attention with 2-D rotary positions (each image
    attends within itself) -> LayerNorm -> MLP, and the 2x2 patch merger. Attention as the
    original's ``sdpa`` path (a block-diagonal boolean mask over all images at once)."""

    def __init__(self, cfg: dict):
        super().__init__()
        from transformers.activations import ACT2FN

        self.embed_dim, self.num_heads = cfg["embed_dim"], cfg["num_heads"]
        self.patch_size, self.temporal_patch_size = cfg["patch_size"], cfg["temporal_patch_size"]
        self.merge = cfg["spatial_merge_size"]
        self.in_channels = cfg.get("in_channels", cfg.get("in_chans", 3))
        e, kernel = self.embed_dim, (self.temporal_patch_size, self.patch_size, self.patch_size)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(self.in_channels, e, kernel_size=kernel, stride=kernel, bias=False)
        hidden = int(e * cfg["mlp_ratio"])
        self.blocks = nn.ModuleList()
        for _ in range(cfg["depth"]):
            block = nn.Module()
            block.norm1, block.norm2 = nn.LayerNorm(e, eps=1e-6), nn.LayerNorm(e, eps=1e-6)
            block.attn = nn.Module()
            block.attn.qkv, block.attn.proj = nn.Linear(e, 3 * e), nn.Linear(e, e)
            block.mlp = nn.Module()
            block.mlp.fc1, block.mlp.fc2 = nn.Linear(e, hidden), nn.Linear(hidden, e)
            self.blocks.append(block)
        self.act = ACT2FN[cfg["hidden_act"]]
        merged = e * self.merge ** 2
        self.merger = nn.Module()
        self.merger.ln_q = nn.LayerNorm(e, eps=1e-6)
        self.merger.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, cfg["hidden_size"]))
        head_dim = e // self.num_heads
        rot_dim = head_dim // 2
        self.register_buffer("inv_freq", 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float) / rot_dim)),
                             persistent=False)

    def rotary(self, grid_thw: torch.Tensor) -> torch.Tensor:
        pos = []
        m = self.merge
        for t, h, w in grid_thw.tolist():
            hpos = torch.arange(h).unsqueeze(1).expand(-1, w).reshape(h // m, m, w // m, m).permute(0, 2, 1, 3)
            wpos = torch.arange(w).unsqueeze(0).expand(h, -1).reshape(h // m, m, w // m, m).permute(0, 2, 1, 3)
            pos.append(torch.stack([hpos.flatten(), wpos.flatten()], dim=-1).repeat(t, 1))
        pos = torch.cat(pos)
        seq = torch.arange(int(grid_thw[:, 1:].max()), dtype=self.inv_freq.dtype, device=self.inv_freq.device)
        freqs = torch.outer(seq, self.inv_freq)
        return freqs[pos].flatten(1)

    @staticmethod
    def _rotate(x, cos, sin):
        dtype = x.dtype
        x, cos, sin = x.float(), cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos + rotated * sin).to(dtype)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """``pixel_values [patches, C * T * P * P]``, ``grid_thw [images, 3]`` -> ``[merged patches, hidden]``."""
        x = pixel_values.view(-1, self.in_channels, self.temporal_patch_size, self.patch_size, self.patch_size)
        x = self.patch_embed.proj(x.to(self.patch_embed.proj.weight.dtype)).view(-1, self.embed_dim)
        emb = self.rotary(grid_thw)
        emb = torch.cat((emb, emb), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        lengths = (grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).tolist()
        S = x.shape[0]
        mask = torch.zeros(1, S, S, dtype=torch.bool, device=x.device)
        start = 0
        for n in lengths:
            mask[..., start:start + n, start:start + n] = True
            start += n
        for blk in self.blocks:
            h = blk.norm1(x)
            q, k, v = blk.attn.qkv(h).reshape(S, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            out = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask, dropout_p=0.0)
            x = x + blk.attn.proj(out.squeeze(0).transpose(0, 1).reshape(S, -1))
            x = x + blk.mlp.fc2(self.act(blk.mlp.fc1(blk.norm2(x))))
        return self.merger.mlp(self.merger.ln_q(x).view(-1, self.embed_dim * self.merge ** 2))


class DreamProjector(nn.Module):
    """``projector.linear_1 -> act -> projector.linear_2`` (vision width -> decoder width)."""

    def __init__(self, vision_hidden: int, hidden: int, act: str):
        super().__init__()
        from transformers.activations import ACT2FN

        self.linear_1, self.linear_2 = nn.Linear(vision_hidden, hidden), nn.Linear(hidden, hidden)
        self.act = ACT2FN[act]

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class ProprioProjector(nn.Module):
    """OpenVLA-OFT's proprio projector (``fc1 -> GELU -> fc2``), one token per observation."""

    def __init__(self, proprio_dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(proprio_dim, hidden), nn.Linear(hidden, hidden)
        self.act_fn1 = nn.GELU()

    def forward(self, x):
        return self.fc2(self.act_fn1(self.fc1(x)))


class DreamPromptTokenizer:
    """The checkpoint's tokenizer for the one prompt shape Dream-VLA uses: added tokens (specials,
    ``<|mask|>``, ``<|action_n|>``) by their ids from ``tokenizer_config.json``, text in between by
    byte-level BPE (transformers' ``Qwen2Tokenizer`` on ``vocab.json``/``merges.txt``, Dream's
    ``DreamTokenizer`` being Qwen2's slow tokenizer). ``len(self)`` is the original's
    ``len(processor.tokenizer)``, the base of the action ids."""

    def __init__(self, path):
        from transformers import Qwen2Tokenizer

        path = Path(path)
        # kept as read, so that a policy saved from this model writes the same files
        self.files = {name: (path / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES}
        cfg = json.loads(self.files["tokenizer_config.json"])
        self.added = {v["content"]: int(k) for k, v in cfg.get("added_tokens_decoder", {}).items()}
        vocab = json.loads(self.files["vocab.json"])
        merges = [line for line in self.files["merges.txt"].splitlines()[1:] if line]
        self.regular_size = len(vocab)
        self.bpe = Qwen2Tokenizer(vocab=vocab, merges=merges)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)) + ")")

    def __len__(self) -> int:
        return len(set(range(self.regular_size)) | set(self.added.values()))

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self._split.split(text):
            if not piece:
                continue
            if piece in self.added:
                ids.append(self.added[piece])
            else:
                ids.extend(self.bpe.encode(piece, add_special_tokens=False))
        return ids

    @staticmethod
    def prompt_text(instruction: str, n_images: int, image_tokens: int) -> str:
        """The Dream-VL chat template applied to the LIBERO evaluation's one user turn, image pads expanded."""
        images = IMAGE_TOKEN * image_tokens * n_images
        return (f"{SYSTEM}<|im_start|>user\n{images}What action should the robot take to {instruction}?"
                "<|im_end|>\n<|im_start|>assistant\n")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of ``factor``, pixel count within ``[min_pixels, max_pixels]``."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be under 200, got {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class DreamKVCache(BlockKVCache):
    """:class:`BlockKVCache` plus each position's final hidden state (after the last norm), written by
    the forward that writes its keys/values: the hidden state that predicts position ``s`` is the one
    at ``s - 1`` (Dream's one-place shift), and a window starting at ``s`` reads it from here."""

    def __init__(self, *args, hidden_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        batch, max_len = self.keys[0].shape[0], self.max_len
        self.hidden = torch.zeros(batch, max_len, hidden_size, dtype=self.keys[0].dtype, device=self.keys[0].device)

    @classmethod
    def for_decoder(cls, config, batch_size: int, max_len: int, like: torch.Tensor) -> "DreamKVCache":
        """A cache for a transformers decoder ``config`` (layers, key/value heads, head and hidden
        sizes), in ``like``'s dtype and on its device."""
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads,
                   config.hidden_size // config.num_attention_heads, max_len, dtype=like.dtype, device=like.device,
                   hidden_size=config.hidden_size)


def shift_one_place(hidden: torch.Tensor, cache: DreamKVCache | None, start: int) -> torch.Tensor:
    """The hidden states that predict the window's positions ``[start, start + Q)`` from the decoder's
    outputs there (``hidden [B, Q, H]``): for position ``p`` the output at ``p - 1`` (at 0 its own).
    The window's outputs are stored in the cache, whose earlier entries supply the one before ``start``;
    an uncached forward must start at 0."""
    Q = hidden.shape[1]
    if cache is not None:
        cache.hidden[:, start:start + Q] = hidden
        first = cache.hidden[:, start - 1:start] if start > 0 else hidden[:, :1]
    else:
        if start != 0:
            raise ValueError("an uncached forward must start at position 0")
        first = hidden[:, :1]
    return torch.cat([first, hidden[:, :-1]], dim=1)


# -- the model --------------------------------------------------------------------------------------
class DreamVLA(PolicyModel):
    """Dream-VLA over a checkpoint folder in its published format; see the module docstring for what
    matches the original and what differs.

    As a policy's model (registered as ``dream_vla``): an observation's images are
    ``obs["images"][camera]`` for ``cameras`` in prompt order, its ``"state"`` the raw proprio
    state (normalised here, as the original's evaluation does before the model), and actions are
    un-normalised with the statistics of ``unnorm_key`` (None: the checkpoint's only dataset)."""

    def __init__(self, config: dict, tokenizer: DreamPromptTokenizer, norm_stats: dict,
                 horizon: int = 8, action_dim: int = 7, block_size: int = 7, n_bins: int = 256,
                 proprio_dim: int | None = None, preprocessor: dict | None = None,
                 cameras: tuple[str, ...] = CAMERAS, unnorm_key: str | None = None):
        super().__init__()
        from transformers import Qwen2Config, Qwen2Model

        self.config = dict(config)
        self.tokenizer, self.norm_stats = tokenizer, norm_stats
        self.horizon, self.action_dim = horizon, action_dim
        self.cameras = tuple(cameras)
        if unnorm_key is not None and unnorm_key not in norm_stats:
            raise ConfigError(f"{unnorm_key!r} is not among the checkpoint's statistics {sorted(norm_stats)}",
                              "unnorm_key")
        self.unnorm_key = unnorm_key
        self.chunk_len, self.block_size, self.n_bins = horizon * action_dim, block_size, n_bins
        if self.chunk_len % block_size:
            raise ValueError(f"block_size {block_size} does not divide the chunk of {self.chunk_len} tokens")
        self.preprocessor = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": 14,
                             "temporal_patch_size": 2, "merge_size": 2, "image_mean": list(CLIP_MEAN),
                             "image_std": list(CLIP_STD), "rescale_factor": 1 / 255, "resample": 3,
                             **(preprocessor or {})}
        hidden = config["hidden_size"]
        self.mask_id = int(config.get("mask_token_id", MASK_TOKEN_ID))
        self.image_token_id = int(config.get("image_token_id", 151655))
        self.visual = DreamVisionTower(config["vision_config"])
        self.projector = DreamProjector(config["vision_config"]["hidden_size"], hidden,
                                        config.get("projector_hidden_act") or "gelu")
        qcfg = Qwen2Config(vocab_size=config["vocab_size"], hidden_size=hidden,
                           intermediate_size=config["intermediate_size"],
                           num_hidden_layers=config["num_hidden_layers"],
                           num_attention_heads=config["num_attention_heads"],
                           num_key_value_heads=config["num_key_value_heads"],
                           hidden_act=config.get("hidden_act", "silu"),
                           rms_norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=config.get("rope_theta", 10000.0),
                           max_position_embeddings=config.get("max_position_embeddings", 32768),
                           attention_dropout=0.0, use_sliding_window=False, tie_word_embeddings=False,
                           bos_token_id=None, eos_token_id=None, pad_token_id=None)
        self.model = Qwen2Model(qcfg)
        self.model.get_input_embeddings().requires_grad_(False)  # see TransformersBackbone.freeze_unused
        self.lm_head = nn.Linear(hidden, config["vocab_size"], bias=False)
        self.proprio_projector = ProprioProjector(proprio_dim, hidden) if proprio_dim else None
        # engine bin b <-> Dream id len(tokenizer) - 1 - b (the original's ``len(tokenizer) - id`` minus one)
        base = len(tokenizer)
        self.register_buffer("action_ids", base - 1 - torch.arange(n_bins), persistent=False)
        bins = np.linspace(-1, 1, n_bins)
        self.bin_centers = (bins[:-1] + bins[1:]) / 2.0

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, horizon: int = 8, block_size: int = 7, dtype: torch.dtype = torch.float32,
                        **kwargs) -> "DreamVLA":
        """Load a Dream-VLA checkpoint folder (see the module docstring for the files read); ``kwargs``
        go to the constructor (``action_dim``, ``cameras``, ``unnorm_key``)."""
        from safetensors.torch import load_file

        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        norm_stats = json.loads((path / "dataset_statistics.json").read_text()) \
            if (path / "dataset_statistics.json").exists() else {}
        pre = json.loads((path / "preprocessor_config.json").read_text()) \
            if (path / "preprocessor_config.json").exists() else {}
        proprio_files = sorted(p for p in path.iterdir() if "proprio_projector" in p.name and "checkpoint" in p.name)
        if len(proprio_files) > 1:
            raise ValueError(f"expected at most one proprio projector checkpoint in {path}, found "
                             f"{[p.name for p in proprio_files]}")
        proprio = None
        if proprio_files:
            proprio = {k.removeprefix("module."): v
                       for k, v in torch.load(proprio_files[0], map_location="cpu", weights_only=True).items()}
        shards = sorted(path.glob("model*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"no model*.safetensors in {path}")
        state = {}
        for shard in shards:
            state.update(load_file(str(shard)))
        n_bins = config.get("n_action_bins") or 256
        model = cls(config, DreamPromptTokenizer(path), norm_stats, horizon=horizon, block_size=block_size,
                    n_bins=n_bins, proprio_dim=proprio["fc1.weight"].shape[1] if proprio else None,
                    preprocessor=pre, **kwargs)
        groups = {"visual.": model.visual, "projector.": model.projector, "model.": model.model,
                  "lm_head.": model.lm_head}
        for prefix, module in groups.items():
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            module.load_state_dict(part, strict=True)
        unknown = [k for k in state if not k.startswith(tuple(groups))]
        if unknown:
            raise ValueError(f"unexpected tensors in the checkpoint: {unknown[:5]}")
        if proprio is not None:
            model.proprio_projector.load_state_dict(proprio, strict=True)
        return model.to(dtype).eval()

    # -- as a policy's model (fast_dvla.policy_model.PolicyModel) -------------------------------------
    # A policy directory holds this model as config.json's "model" settings (the checkpoint's own
    # config among them), model.safetensors (every tensor, proprio projector included) and the
    # tokenizer's files as the checkpoint had them.
    POLICY_SETTINGS = {"checkpoint_config": dict, "norm_stats": dict, "preprocessor": dict, "horizon": int,
                       "action_dim": int, "block_size": int, "n_bins": int, "proprio_dim": int | None,
                       "cameras": list[str], "unnorm_key": str | None}

    def policy_settings(self) -> dict:
        return {"checkpoint_config": self.config, "norm_stats": self.norm_stats, "preprocessor": self.preprocessor,
                "horizon": self.horizon, "action_dim": self.action_dim, "block_size": self.block_size,
                "n_bins": self.n_bins,
                "proprio_dim": None if self.proprio_projector is None else self.proprio_projector.fc1.in_features,
                "cameras": list(self.cameras), "unnorm_key": self.unnorm_key}

    @classmethod
    def from_policy_settings(cls, settings: dict, directory: str) -> "DreamVLA":
        check_entries(settings, cls.POLICY_SETTINGS, required=tuple(cls.POLICY_SETTINGS))
        options = {k: v for k, v in settings.items() if k != "checkpoint_config"}
        try:
            return cls(settings["checkpoint_config"], DreamPromptTokenizer(directory), **options)
        except KeyError as e:  # a field the checkpoint's config or a statistic lacks
            raise ConfigError(f"missing {e}", "checkpoint_config") from None

    def policy_files(self, directory: str) -> dict:
        return dict(self.tokenizer.files)

    def observation_prefix(self, obs: dict) -> tuple[torch.Tensor, bool]:
        """``{"images": {camera: uint8 [H, W, 3]}, "state": [proprio_dim], "instruction": str}`` (a batch:
        ``[B, H, W, 3]``, ``[B, proprio_dim]``, a list of ``B`` strings) -> ``([B, P, H], single)``. The
        state is read only by a checkpoint with a proprio projector. Differentiable (training runs the
        vision tower and projectors through it); the policy calls it under ``torch.no_grad``."""
        if not isinstance(obs, dict):
            raise TypeError(f"observation must be a dict, got {type(obs).__name__}")
        instructions, single = check_instructions(obs.get("instruction"))
        batch = len(instructions)
        images = obs.get("images")
        if not isinstance(images, dict):
            raise TypeError("obs['images'] must be a dict {camera name: uint8 [H, W, 3] array}")
        absent = [c for c in self.cameras if c not in images]
        if absent:
            raise KeyError(f"images are missing cameras {absent}; the model expects {list(self.cameras)}, "
                           "in that order")
        per_camera = []
        for camera in self.cameras:
            image = np.asarray(images[camera])
            image = image[None] if single else image
            if image.ndim != 4 or image.shape[0] != batch:
                want = "[H, W, 3]" if single else f"[{batch}, H, W, 3] (one per row)"
                raise ValueError(f"image {camera!r} must be {want}, got {np.shape(images[camera])}")
            per_camera.append(image)
        proprio = None
        if self.proprio_projector is not None:
            dim = self.proprio_projector.fc1.in_features
            if "state" not in obs:
                raise KeyError(f"observation is missing 'state': this checkpoint reads a {dim}-D proprio state")
            state = np.asarray(obs["state"], dtype=np.float64)
            state = state[None] if single else state
            if state.shape != (batch, dim):
                want = (dim,) if single else (batch, dim)
                raise ValueError(f"state must have shape {want}, got {np.shape(obs['state'])}")
            if not np.isfinite(state).all():
                raise ValueError("state contains NaN or inf")
            proprio = [self.normalize_proprio(row) for row in state]
        rows = [[camera[b] for camera in per_camera] for b in range(batch)]
        return self.embed_prefix(rows, instructions, proprio), single

    # -- prefix --------------------------------------------------------------------------------
    def preprocess_images(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[H, W, 3]`` images (a list, one observation's cameras) -> Qwen2-VL
        ``pixel_values [patches, 3 * 2 * 14 * 14]`` and ``grid_thw [images, 3]``, float32."""
        from PIL import Image

        pre = self.preprocessor
        p, tp, m = pre["patch_size"], pre["temporal_patch_size"], pre["merge_size"]
        mean = np.array(pre["image_mean"], dtype=np.float32)
        std = np.array(pre["image_std"], dtype=np.float32)
        out, grids = [], []
        for img in images:
            img = np.asarray(img)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
                raise ValueError(f"expected a uint8 [H, W, 3] image, got {img.dtype} {img.shape}")
            h, w = smart_resize(img.shape[0], img.shape[1], p * m, pre["min_pixels"], pre["max_pixels"])
            img = np.array(Image.fromarray(img).resize((w, h), resample=pre["resample"]))
            x = (img.astype(np.float64) * pre["rescale_factor"]).astype(np.float32)
            x = ((x - mean) / std).transpose(2, 0, 1)[None]          # [1, C, H, W]
            x = np.tile(x, (tp, 1, 1, 1))
            gt, gh, gw = x.shape[0] // tp, h // p, w // p
            x = x.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
            out.append(x.reshape(gt * gh * gw, 3 * tp * p * p))
            grids.append((gt, gh, gw))
        return torch.from_numpy(np.concatenate(out)), torch.tensor(grids)

    def prompt_ids(self, instruction: str, grid_thw: torch.Tensor) -> list[int]:
        """The original processor's ``input_ids`` for one observation."""
        per_image = [int(g.prod()) // self.preprocessor["merge_size"] ** 2 for g in grid_thw]
        if len(set(per_image)) > 1:
            raise ValueError("images of different sizes in one observation are not supported")
        text = DreamPromptTokenizer.prompt_text(instruction, len(per_image), per_image[0])
        return self.tokenizer.encode(text)

    def normalize_proprio(self, state, unnorm_key: str | None = None) -> np.ndarray:
        """OpenVLA-OFT's BOUNDS_Q99 normalisation of a raw proprio state (LIBERO's setting)."""
        stats = self.norm_stats[self._key(unnorm_key)]["proprio"]
        lo, hi = np.asarray(stats["q01"]), np.asarray(stats["q99"])
        mask = np.asarray(stats.get("mask", np.ones_like(lo, dtype=bool)))
        state = np.asarray(state, dtype=np.float64)
        return np.clip(np.where(mask, 2 * (state - lo) / (hi - lo + 1e-8) - 1, state), -1.0, 1.0)

    def embed_observation(self, images, instruction: str, proprio=None) -> tuple[torch.Tensor, list[int]]:
        """One observation -> (prefix embeddings ``[P, H]``, prompt ids): token embeddings with the
        projected image features at the ``<|image_pad|>`` positions, and, given a (normalised)
        ``proprio``, the projector's token first."""
        pixels, grid = self.preprocess_images(images)
        ids = self.prompt_ids(instruction, grid)
        param = self.lm_head.weight
        ids_t = torch.tensor(ids, device=param.device)
        embeds = self.model.get_input_embeddings()(ids_t)
        feats = self.projector(self.visual(pixels.to(param.device, param.dtype), grid.to(param.device)))
        slots = ids_t == self.image_token_id
        if int(slots.sum()) != feats.shape[0]:
            raise ValueError(f"{int(slots.sum())} image tokens for {feats.shape[0]} image features")
        embeds = embeds.masked_scatter(slots[:, None].expand_as(embeds), feats.to(embeds.dtype))
        if proprio is not None:
            if self.proprio_projector is None:
                raise ValueError("this checkpoint has no proprio projector")
            token = self.proprio_projector(torch.as_tensor(np.asarray(proprio), dtype=param.dtype, device=param.device))
            embeds = torch.cat([token.reshape(1, -1), embeds])
        return embeds, ids

    def embed_prefix(self, images, instructions, proprio=None) -> torch.Tensor:
        """A batch of observations (``images[b]``: list of uint8 ``[H, W, 3]``; ``instructions[b]``;
        ``proprio[b]`` normalised or None) -> ``[B, P, H]``. Rows must have equal prompt lengths."""
        rows = [self.embed_observation(images[b], instructions[b], None if proprio is None else proprio[b])[0]
                for b in range(len(instructions))]
        lengths = {r.shape[0] for r in rows}
        if len(lengths) > 1:
            raise ValueError(f"prompts of different lengths {sorted(lengths)}: left padding is not supported yet")
        return torch.stack(rows)

    def observation_spec(self) -> dict:
        """Cameras in prompt order, the LIBERO evaluation's 224 x 224 images, the proprio state's size."""
        state_dim = 0 if self.proprio_projector is None else self.proprio_projector.fc1.in_features
        return {"cameras": list(self.cameras), "image_size": (224, 224), "state_dim": state_dim}

    # -- the engine's contract ------------------------------------------------------------------
    def lora_target(self) -> nn.Module:
        """The Qwen2 decoder stack (its ``q/k/v/o_proj`` and ``gate/up/down_proj``): a LoRA student adapts
        the decoder only, not the vision tower, the projectors or ``lm_head``."""
        return self.model

    def embed_actions(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Bins (``n_bins`` = [MASK]) -> Dream's token embeddings (the action ids, ``<|mask|>``).
        Dream has no slot embedding: the slot is the position."""
        return self.model.get_input_embeddings()(self.bins_to_ids(tokens))

    def bins_to_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = self.action_ids[tokens.clamp(max=self.n_bins - 1)]
        return torch.where(tokens == self.n_bins, torch.full_like(ids, self.mask_id), ids)

    def ids_to_bins(self, ids: torch.Tensor) -> torch.Tensor:
        """Dream ids -> bins as the original reads them (``len(tokenizer) - 1 - id``; ids outside the
        action range give out-of-range bins, which :meth:`bins_to_actions` clips as the original does)."""
        return len(self.tokenizer) - 1 - ids

    def backbone_forward(self, embeds, positions, layout: AttentionLayout, cache):
        """Hidden states that predict the query positions: for position ``p``, the decoder's output at
        ``p - 1`` (at ``p = 0`` its own). Positions are Dream's ``p + 1``. Under the bidirectional
        layout, when the keys reach the end of the chunk, the two suffix ``<|mask|>`` positions
        join as queries and keys (not cached)."""
        if not isinstance(layout, AttentionLayout):
            raise TypeError(f"expected the forward's fast_dvla.masks.AttentionLayout, got {type(layout).__name__}")
        B, Q = embeds.shape[:2]
        suffix = layout.kind == BIDIRECTIONAL and layout.kv_len == layout.prefix_len + self.chunk_len
        mask = layout.dense_mask(embeds.device)
        if suffix:
            tail = self.model.get_input_embeddings()(torch.full((B, SUFFIX_LEN), self.mask_id, device=embeds.device))
            embeds = torch.cat([embeds, tail.to(embeds.dtype)], dim=1)
            positions = torch.cat([positions, layout.kv_len + torch.arange(SUFFIX_LEN, device=positions.device)])
            mask = torch.ones(1, 1, Q + SUFFIX_LEN, layout.kv_len + SUFFIX_LEN, dtype=torch.bool, device=embeds.device)
        hidden = self._decoder(embeds, positions + 1, mask, cache, cached_queries=Q)[:, :Q]
        return shift_one_place(hidden, cache, layout.q_start)

    def _decoder(self, embeds, positions, mask, cache, cached_queries: int):
        """The Qwen2 decoder stack with our mask: norm -> q/k/v (+bias) -> RoPE -> SDPA -> o ->
        residual -> norm -> SwiGLU -> residual, then the final norm. The first ``cached_queries``
        queries' keys/values go through ``cache`` (when given), the rest are appended uncached."""
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, repeat_kv

        dec = self.model
        B, L = embeds.shape[:2]
        pos = positions.reshape(1, -1).expand(B, -1)
        cos, sin = dec.rotary_emb(embeds, pos)
        h = embeds
        for i, layer in enumerate(dec.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            shape = (B, L, -1, attn.head_dim)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if cache is not None:
                ck, cv = cache.update(k[:, :, :cached_queries], v[:, :, :cached_queries], i)
                k = torch.cat([ck, k[:, :, cached_queries:]], dim=2)
                v = torch.cat([cv, v[:, :, cached_queries:]], dim=2)
            groups = attn.config.num_attention_heads // attn.config.num_key_value_heads
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
            h = h + attn.o_proj(out.transpose(1, 2).reshape(B, L, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return dec.norm(h)

    def action_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head`` restricted to the 256 action ids, in bin order (see the module docstring)."""
        return F.linear(hidden, self.lm_head.weight[self.action_ids])

    def new_cache(self, batch_size: int, max_len: int) -> DreamKVCache:
        return DreamKVCache.for_decoder(self.model.config, batch_size, max_len, like=self.lm_head.weight)

    # -- the original's generation ----------------------------------------------------------------
    @torch.no_grad()
    def generate_original(self, prefix: torch.Tensor, steps: int, eps: float = 1e-3,
                          history: list | None = None) -> torch.Tensor:
        """Dream's own decoding (:func:`dream_maskgit_plus`) of the ``chunk_len + 2`` generated
        positions after ``prefix`` (``[B, P, H]``), bidirectional, full-vocabulary logits, every
        forward over the whole sequence (``use_cache=False``, as its evaluation runs). Returns the
        generated Dream ids ``[B, chunk_len + 2]`` (actions, then the two suffix tokens)."""
        B, P = prefix.shape[:2]
        N = self.chunk_len + SUFFIX_LEN
        embed = self.model.get_input_embeddings()

        def logits_fn(x):
            seq = torch.cat([prefix, embed(x).to(prefix.dtype)], dim=1)
            mask = torch.ones(1, 1, P + N, P + N, dtype=torch.bool, device=prefix.device)
            hidden = self._decoder(seq, torch.arange(P + N, device=prefix.device) + 1, mask, None, P + N)
            return self.lm_head(hidden[:, P - 1:P + N - 1])  # position p predicted from p - 1

        x = torch.full((B, N), self.mask_id, dtype=torch.long, device=prefix.device)
        return dream_maskgit_plus(logits_fn, x, self.mask_id, steps, eps, history)

    # -- actions -------------------------------------------------------------------------------------
    def _key(self, unnorm_key):
        unnorm_key = self.unnorm_key if unnorm_key is None else unnorm_key
        if unnorm_key is None:
            if len(self.norm_stats) != 1:
                raise ValueError(f"several datasets' statistics: pass unnorm_key (or build the model with it), one "
                                 f"of {sorted(self.norm_stats)}")
            return next(iter(self.norm_stats))
        if unnorm_key not in self.norm_stats:
            raise KeyError(f"unnorm_key {unnorm_key!r} not in {sorted(self.norm_stats)}")
        return unnorm_key

    def actions_to_bins(self, actions, unnorm_key: str | None = None) -> np.ndarray:
        """``[..., horizon, action_dim]`` actions -> ``[..., chunk_len]`` bins, as Dream-VLA's training labels
        are made (OpenVLA's action tokenizer after its BOUNDS_Q99 normalisation): ``2 (a - q01) / (q99 -
        q01 + 1e-8) - 1`` where the statistics' mask is set, clipped to [-1, 1], then
        ``np.digitize`` over ``linspace(-1, 1, n_bins)`` (the original's token ``len(tokenizer) -
        digitized``, i.e. bin ``digitized - 1``). :meth:`bins_to_actions` of a bin below 255 gives it back."""
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim < 2 or a.shape[-2:] != (self.horizon, self.action_dim):
            raise ValueError(f"actions must be [..., {self.horizon}, {self.action_dim}], got {a.shape}")
        stats = self.norm_stats[self._key(unnorm_key)]["action"]
        lo, hi = np.asarray(stats["q01"]), np.asarray(stats["q99"])
        mask = np.asarray(stats.get("mask", np.ones_like(lo, dtype=bool)))
        normalized = np.clip(np.where(mask, 2 * (a - lo) / (hi - lo + 1e-8) - 1, a), -1.0, 1.0)
        bins = np.digitize(normalized, np.linspace(-1, 1, self.n_bins)) - 1
        return np.clip(bins, 0, self.n_bins - 1).reshape(*a.shape[:-2], self.chunk_len)

    def bins_to_actions(self, bins, unnorm_key: str | None = None) -> np.ndarray:
        """``[..., chunk_len]`` bins -> ``[..., horizon, action_dim]`` actions, as the original's
        ``predict_action``: bin centre ``min(max(bin, 0), 254)``, then q01/q99 where the mask is set."""
        bins = np.clip(np.asarray(bins), 0, self.bin_centers.shape[0] - 1)
        normalized = self.bin_centers[bins].reshape(*bins.shape[:-1], -1, self.action_dim)
        stats = self.norm_stats[self._key(unnorm_key)]["action"]
        lo, hi = np.asarray(stats["q01"]), np.asarray(stats["q99"])
        mask = np.asarray(stats.get("mask", np.ones_like(lo, dtype=bool)))
        return np.where(mask, 0.5 * (normalized + 1) * (hi - lo + 1e-8) + lo, normalized)
