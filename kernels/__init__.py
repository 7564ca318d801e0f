"""Attention kernels for cached block-causal attention.

Importing this package never requires a GPU: the Triton kernel compiles at
its first launch (use ``TRITON_INTERPRET=1`` on a CPU, set before import),
and flash-attn is imported only when its path is called.
"""
from .block_attention import triton_block_causal_attention
from .flash_block_attention import flash_block_causal_attention, merge_partials

__all__ = ["triton_block_causal_attention", "flash_block_causal_attention", "merge_partials"]
