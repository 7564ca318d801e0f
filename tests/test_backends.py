"""The same model and decoder on every attention backend that can run here."""

import pytest
import torch

from fast_dvla import DecodeConfig, decode
from fast_dvla.attention import BackendUnavailable, unavailable_reason, use_backend
from fast_dvla.masks import BIDIRECTIONAL, BLOCK_CAUSAL, AttentionLayout
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


def test_attention_backends_need_the_layout():
    """fast-dvla's backends read the forward's AttentionLayout, never a bare mask tensor."""
    from fast_dvla.attention import backends
    from fast_dvla.backbone import TransformersBackbone

    q = torch.randn(1, 2, 3, 4)
    for fn in (backends.sdpa_attention, backends.flex_attention, backends.triton_attention):
        with pytest.raises(RuntimeError, match="AttentionLayout"):
            fn(None, q, q, q, torch.ones(1, 1, 3, 3, dtype=torch.bool))
    backbone = tiny_model(0).backbone
    with pytest.raises(TypeError, match="AttentionLayout"):
        backbone(torch.randn(1, 3, 64), torch.arange(3), torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="queries"):
        backbone(torch.randn(1, 3, 64), torch.arange(3), AttentionLayout.full(1, 2, 5))
    assert isinstance(backbone, TransformersBackbone)


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


@pytest.mark.parametrize("backend", ["sdpa"] + RUNNABLE)
def test_lean_forward_equals_the_transformers_forward(backend):
    """The Llama-layout fast path against ``decoder(inputs_embeds=...)`` on fresh random
    inputs: a prefix forward that fills the cache, then a cached block-causal window, with a
    LoRA adapter on the projections (it must reach them) and the same gradients through the
    uncached forward that training runs."""
    from peft import LoraConfig, inject_adapter_in_model

    from fast_dvla.decoding.common import WindowForward

    model = tiny_model(5, sharpness=4.0)
    assert model.backbone.lean
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False),
                            model.backbone.decoder)
    use_backend(model, backend)
    prefix = random_prefix(model, 2, 7)
    tokens = torch.randint(0, model.n_bins + 1, (2, model.chunk_len), generator=torch.Generator().manual_seed(7))
    P, k = model.prefix_len, model.block_size
    outputs = {}
    trains = backend in ("sdpa", "eager")  # the backends training uses (flex has no CPU backward)
    for lean in (True, False):
        model.backbone.lean = lean
        with torch.set_grad_enabled(trains):
            cache = model.new_cache(2, P + model.chunk_len)
            fwd = WindowForward(model, prefix, cache)
            first = fwd(tokens, 0, P + k, BLOCK_CAUSAL, use_cache=True)
            cache.commit(P + k)
            window = fwd(tokens, P + k, P + 3 * k, BLOCK_CAUSAL, use_cache=True)
            full = WindowForward(model, prefix, None)(tokens, 0, P + model.chunk_len, BIDIRECTIONAL, use_cache=False)
        outputs[lean] = [first.detach(), window.detach(), full.detach()]
        if trains:
            full.square().mean().backward()
            outputs[lean].append(next(p.grad for n, p in model.named_parameters() if "lora_B" in n).clone())
            model.zero_grad()
    use_backend(model, "sdpa")
    for fast, plain in zip(outputs[True], outputs[False]):
        assert torch.allclose(fast, plain, atol=1e-5, rtol=1e-5)
    if trains:
        assert outputs[True][3].abs().sum() > 0  # the adapter is on the path


def test_lean_forward_on_a_qwen2_decoder():
    """Qwen2 has biases on q/k/v: the lean path must call the projections as modules."""
    from transformers import Qwen2Config, Qwen2Model

    from fast_dvla.backbone import TransformersBackbone

    torch.manual_seed(0)
    decoder = Qwen2Model(Qwen2Config(vocab_size=2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
    for layer in decoder.layers:
        torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
    backbone = TransformersBackbone(decoder, "sdpa")
    assert backbone.lean
    embeds, positions = torch.randn(2, 17, 32), torch.arange(17)
    layout = AttentionLayout.full(3, 7, 17, BLOCK_CAUSAL)
    fast = backbone(embeds, positions, layout)
    backbone.lean = False
    assert torch.allclose(fast, backbone(embeds, positions, layout), atol=1e-5)


def test_only_llama_layout_decoders_take_the_lean_path():
    from transformers import GPT2Config, GPT2Model

    from fast_dvla.backbone import TransformersBackbone

    assert not TransformersBackbone(GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2))).lean
    assert not TransformersBackbone(tiny_model(0).backbone.decoder, lean=False).lean
