"""What a forward's attention looks like, in structural form.

The dense mask says everything but is expensive to read; fused kernels need
the structure instead: which keys are the final cache (seen unmasked) and
where the block-causal in-flight part starts. The engine passes this next to
the dense mask built from the same rule (``fast_dvla.masks``).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..masks import BLOCK_CAUSAL


@dataclass(frozen=True)
class AttentionLayout:
    prefix_len: int
    block_size: int
    q_start: int
    q_len: int
    kv_len: int
    kind: str

    @property
    def fused_cache_len(self) -> int | None:
        """The cache length when the forward is "cache unmasked + in-flight
        blocks block-causal", the shape the fused kernels compute; else None
        (the prefix forward, the teacher, Fast-dLLM windows), and backends
        use the dense mask instead."""
        aligned = self.q_start >= self.prefix_len and (self.q_start - self.prefix_len) % self.block_size == 0
        if self.kind == BLOCK_CAUSAL and aligned and self.kv_len == self.q_start + self.q_len:
            return self.q_start
        return None
