"""Published dVLAs as :class:`~fast_dvla.backbone.DVLAModel` s, loaded from their own checkpoint folders.

- :mod:`fast_dvla.adapters.dream_vla`: Dream-VLA (DreamLM/Dream-VLX), ``DreamVLA.from_pretrained(dir)``.
- :mod:`fast_dvla.adapters.ud_vla`: UD-VLA (OpenHelix-Team/Unified-Diffusion-VLA), ``UDVLA.from_pretrained(dir)``.

Each adapter is written on transformers building blocks; none of the original projects' code is
used. Its docstring says what reproduces the original exactly and what differs.
"""
from .dream_vla import DreamVLA, dream_maskgit_plus, dream_transfer_counts
from .ud_vla import UDVLA, is_ud_vla_config

__all__ = ["DreamVLA", "UDVLA", "dream_maskgit_plus", "dream_transfer_counts", "is_ud_vla_config"]
