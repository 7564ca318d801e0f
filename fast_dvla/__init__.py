"""fast-dvla: block-causal distillation and pipelined, exactly cached decoding
for discrete-diffusion vision-language-action models (Fast-dVLA)."""
from .cache import BlockKVCache
from .config import DecodeConfig
from .decoding import DecodeResult, DecodeStats, decode
from .model import ModelConfig, ReferenceDVLA
from .policy import FastDVLAPolicy
from .tokenizer import ActionTokenizer

__version__ = "0.1.0"
__all__ = ["ActionTokenizer", "BlockKVCache", "DecodeConfig", "DecodeResult", "DecodeStats", "FastDVLAPolicy",
           "ModelConfig", "ReferenceDVLA", "decode"]
