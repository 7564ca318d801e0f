"""fast-dvla: block-causal distillation and pipelined, exactly cached decoding
for discrete-diffusion vision-language-action models (Fast-dVLA)."""
from .cache import BlockKVCache
from .config import DecodeConfig
from .decoding import DecodeResult, DecodeStats, NonFiniteLogitsError, decode
from .model import ModelConfig, ReferenceDVLA
from .policy import FastDVLAPolicy
from .policy_model import PolicyModel
from .processor import InstructionError, InstructionWarning
from .registry import register_model
from .schema import ConfigError
from .tokenizer import ActionTokenizer
from .tuning import tune

__version__ = "0.1.0"
__all__ = ["ActionTokenizer", "BlockKVCache", "ConfigError", "DecodeConfig", "DecodeResult", "DecodeStats",
           "FastDVLAPolicy", "InstructionError", "InstructionWarning", "ModelConfig", "NonFiniteLogitsError",
           "PolicyModel", "ReferenceDVLA", "decode", "register_model", "tune"]
