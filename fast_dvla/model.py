"""The reference dVLA: a small vision encoder, hashed instruction tokens and
proprio in front of a transformers decoder (Llama or Qwen2, ``ModelConfig.backbone``),
predicting a chunk of discrete action tokens.

The same weights run as the bidirectional teacher and as the block-causal
student: only the mask differs. Nothing is downloaded: the backbone is built
from a config.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

from .attention import BACKEND_NAMES
from .backbone import DVLAModel, TransformersBackbone
from .schema import ConfigError, check_at_least, check_choice, check_fields, from_mapping


# decoder family -> (transformers config class, model class); Qwen2 differs from Llama by biases on q/k/v
BACKBONES = {"llama": (LlamaConfig, LlamaModel), "qwen2": (Qwen2Config, Qwen2Model)}


@dataclass
class ModelConfig:
    cameras: tuple[str, ...] = ("agentview", "wrist")
    image_size: int = 64
    image_grid: int = 4            # image tokens per camera = image_grid ** 2
    state_dim: int = 8
    instr_vocab: int = 1024
    instr_len: int = 16
    horizon: int = 8               # timesteps per chunk
    action_dim: int = 7
    block_size: int = 7            # tokens per block (the paper: the action dim)
    n_bins: int = 256
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    attn_backend: str = "sdpa"        # see fast_dvla.attention.BACKEND_NAMES
    backbone: str = "llama"           # the decoder family: one of BACKBONES

    def __post_init__(self):
        """Every field checked by type and range (``ConfigError``, a ``ValueError``, naming it)."""
        check_fields(self)
        self.cameras = tuple(self.cameras)
        if len(set(self.cameras)) != len(self.cameras):
            raise ConfigError(f"camera names must be distinct, got {list(self.cameras)}", "cameras")
        check_at_least(self, ("image_size", "image_grid", "horizon", "action_dim", "block_size", "hidden_size",
                              "num_layers", "num_heads", "num_kv_heads", "intermediate_size"), 1)
        check_at_least(self, ("state_dim", "instr_len"), 0)
        check_at_least(self, ("instr_vocab", "n_bins"), 2)  # instruction id 0 is padding; a token needs a choice
        check_choice(self.attn_backend, BACKEND_NAMES, "attn_backend", "attention backend")
        check_choice(self.backbone, tuple(BACKBONES), "backbone", "backbone family")
        if self.chunk_len % self.block_size:
            raise ConfigError(f"block_size {self.block_size} does not divide the chunk of "
                              f"{self.horizon} x {self.action_dim} = {self.chunk_len} tokens", "block_size")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}", "num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} must divide by num_kv_heads {self.num_kv_heads}",
                              "num_kv_heads")
        if not self.cameras and self.state_dim == 0 and self.instr_len == 0:
            raise ConfigError("the model needs a non-empty prefix (cameras, state or instruction)", "cameras")

    @property
    def chunk_len(self) -> int:
        return self.horizon * self.action_dim

    @property
    def prefix_len(self) -> int:
        return len(self.cameras) * self.image_grid ** 2 + self.instr_len + (1 if self.state_dim > 0 else 0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cameras"] = list(self.cameras)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Fields by name (a saved config's ``"model"``); an unknown name is refused, naming the
        nearest field, rather than dropped (a misspelt ``blocksize`` would build another model)."""
        return from_mapping(cls, d)


class ImageEncoder(nn.Module):
    """uint8-range images ``[B, 3, H, W]`` -> ``[B, grid*grid, hidden]``."""

    def __init__(self, hidden: int, grid: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(grid),
        )
        self.proj = nn.Linear(128, hidden)
        self.pos = nn.Parameter(torch.zeros(grid * grid, hidden))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.net(images).flatten(2).transpose(1, 2)  # [B, grid*grid, 128]
        return self.proj(feats) + self.pos


class ReferenceDVLA(DVLAModel):
    supports_padding = True  # TransformersBackbone takes per-row positions and the layout's padding

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.chunk_len = config.chunk_len
        self.block_size = config.block_size
        self.n_bins = config.n_bins
        h = config.hidden_size
        self.image_encoder = ImageEncoder(h, config.image_grid)
        self.camera_embed = nn.Parameter(torch.zeros(max(len(config.cameras), 1), h))
        self.instr_embed = nn.Embedding(config.instr_vocab, h)
        self.instr_pos = nn.Parameter(torch.zeros(config.instr_len, h))
        self.state_proj = nn.Linear(config.state_dim, h) if config.state_dim > 0 else None
        self.action_embed = nn.Embedding(config.n_bins + 1, h)  # + [MASK]
        self.slot_embed = nn.Parameter(torch.zeros(config.chunk_len, h))
        config_class, model_class = BACKBONES[config.backbone]
        decoder_config = config_class(
            vocab_size=2,  # unused: the backbone reads input embeddings
            hidden_size=h, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            max_position_embeddings=config.prefix_len + config.chunk_len,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
        self.backbone = TransformersBackbone(model_class(decoder_config), config.attn_backend)
        self.head = nn.Linear(h, config.n_bins)
        for p in (self.camera_embed, self.instr_pos, self.slot_embed, self.image_encoder.pos):
            nn.init.normal_(p, std=0.02)

    @property
    def prefix_len(self) -> int:
        return self.config.prefix_len

    # -- prefix -------------------------------------------------------------
    def embed_prefix(self, images: torch.Tensor | None, instr_ids: torch.Tensor, state: torch.Tensor | None):
        """images ``[B, n_cam, 3, H, W]`` float in [0, 1], instr_ids ``[B, instr_len]``,
        state ``[B, state_dim]`` (normalised) -> ``[B, P, H]``."""
        parts = []
        if self.config.cameras:
            b, n_cam = images.shape[:2]
            feats = self.image_encoder(images.flatten(0, 1) * 2.0 - 1.0)
            feats = feats.view(b, n_cam, -1, feats.shape[-1]) + self.camera_embed[:n_cam, None]
            parts.append(feats.flatten(1, 2))
        parts.append(self.instr_embed(instr_ids) + self.instr_pos)
        if self.state_proj is not None:
            parts.append(self.state_proj(state)[:, None])
        return torch.cat(parts, dim=1)

    # -- the engine's contract ---------------------------------------------
    def embed_actions(self, tokens, slots):
        return self.action_embed(tokens) + self.slot_embed[slots]

    def backbone_forward(self, embeds, positions, layout, cache):
        return self.backbone(embeds, positions, layout, cache)

    def action_logits(self, hidden):
        return self.head(hidden)

    def new_cache(self, batch_size, max_len):
        p = next(self.parameters())
        return self.backbone.new_cache(batch_size, max_len, p.dtype, p.device)

    def set_attn_backend(self, name: str) -> None:
        self.backbone.set_backend(name)
        self.config.attn_backend = name
