"""Published dVLAs as :class:`~fast_dvla.backbone.DVLAModel` s, loaded from their own checkpoint folders.

- :mod:`fast_dvla.adapters.dream_vla`: Dream-VLA (DreamLM/Dream-VLX), ``DreamVLA.from_pretrained(dir)``.

Each adapter is written on transformers building blocks; none of the original projects' code is
used. Its docstring says what reproduces the original exactly and what differs.
"""
from .dream_vla import DreamVLA, dream_maskgit_plus, dream_transfer_counts

__all__ = ["DreamVLA", "dream_maskgit_plus", "dream_transfer_counts"]
