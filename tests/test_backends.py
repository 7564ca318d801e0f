"""The same model and decoder on every attention backend that can run here."""
import os

import pytest
import torch

from fast_dvla import DecodeConfig, decode
from fast_dvla.attention import BackendUnavailable, unavailable_reason, use_backend
from fast_dvla.attention.layout import AttentionLayout
from fast_dvla.masks import BIDIRECTIONAL, BLOCK_CAUSAL
from helpers import random_prefix, tiny_model

RUNNABLE = [b for b in ("eager", "flex", "triton") if unavailable_reason(b) is None]


def decode_with(backend, method, model, prefix):
    use_backend(model, backend)
    trace = []
    tokens = decode(model, prefix, DecodeConfig(method=method, tau_conf=0.3), trace=trace).tokens
    use_backend(model, "sdpa")
    return tokens, trace


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("method", ["fast_dvla", "vanilla"])
def test_backends_give_identical_tokens(backend, method):
    model = tiny_model(2, sharpness=8.0)
    prefix = random_prefix(model, 2, 2)
    reference, ref_trace = decode_with("sdpa", method, model, prefix)
    tokens, trace = decode_with(backend, method, model, prefix)
    assert torch.equal(tokens, reference)
    gap = max((a["logits"] - b["logits"]).abs().max().item() for a, b in zip(trace, ref_trace))
    assert gap < 1e-4


def test_triton_is_runnable_in_tests():
    """conftest sets TRITON_INTERPRET=1 without a GPU, so CI exercises the kernel."""
    assert "triton" in RUNNABLE, unavailable_reason("triton")


def test_fused_layout_only_for_cached_block_causal_windows():
    assert AttentionLayout(10, 7, 24, 14, 38, BLOCK_CAUSAL).fused_cache_len == 24
    assert AttentionLayout(10, 7, 0, 38, 38, BLOCK_CAUSAL).fused_cache_len is None      # prefix forward
    assert AttentionLayout(10, 7, 17, 7, 38, BIDIRECTIONAL).fused_cache_len is None     # the teacher
    assert AttentionLayout(10, 7, 17, 7, 52, BLOCK_CAUSAL).fused_cache_len is None      # reads past the window


def test_unknown_and_unavailable_backends_say_why(monkeypatch):
    model = tiny_model(0)
    with pytest.raises(ValueError, match="unknown attention backend"):
        use_backend(model, "xformers")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            use_backend(model, "flash")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
            use_backend(model, "triton")
