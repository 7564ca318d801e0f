"""The static-shape mode (two fixed forward shapes, no host read inside a step
but the stopping test) against the dynamic decoders, on every backend, with
negative controls, the host reads it is allowed, and torch.compile."""
import random

import pytest
import torch

from fast_dvla import DecodeConfig, decode
from fast_dvla.attention import unavailable_reason, use_backend
from fast_dvla.benchmark.syncs import HostSyncCounter
from fast_dvla.cache import BlockKVCache
from fast_dvla.config import ConfigError
from fast_dvla.decoding import common
from fast_dvla.masks import BIDIRECTIONAL, AttentionLayout
from helpers import random_prefix, tiny_model

SHARP = 8.0
FLOAT32_NOISE = 1e-4  # as in test_exactness: a wrong mask or prefix moves logits by > 1e-3
STATIC_METHODS = ("fast_dvla", "block_diffusion", "vanilla_cached")
BACKENDS = ["sdpa"] + [b for b in ("eager", "flex", "triton") if unavailable_reason(b) is None]


def decode_traced(model, prefix, config):
    trace = []
    return decode(model, prefix, config, trace=trace), trace


def step_logit_gap(trace_a, trace_b, block_size, num_blocks):
    """Largest difference between the logits two decodes computed, step by step, for the blocks
    the dynamic decode forwarded (its window; the static one forwards every block)."""
    gap = 0.0
    for a, b in zip(trace_a, trace_b):
        first, last = a.get("window_blocks", (num_blocks - a["logits"].shape[1] // block_size, num_blocks))
        s_first = b.get("window_blocks", (num_blocks - b["logits"].shape[1] // block_size, num_blocks))[0]
        la = a["logits"]
        lb = b["logits"][:, (first - s_first) * block_size:(last - s_first) * block_size]
        gap = max(gap, (la - lb).abs().max().item())
    return gap


def random_case(seed):
    """A tiny model with a random chunk layout and prefix length, a batch, and a decode config."""
    rng = random.Random(seed)
    horizon, action_dim = rng.choice([(4, 7), (2, 7), (6, 4), (3, 8)])
    chunk = horizon * action_dim
    block_size = rng.choice([d for d in range(2, chunk + 1) if chunk % d == 0 and d <= 16])
    model = tiny_model(seed, sharpness=SHARP, horizon=horizon, action_dim=action_dim, block_size=block_size,
                       instr_len=rng.randint(1, 9), image_grid=rng.choice([1, 2]))
    method = STATIC_METHODS[seed % len(STATIC_METHODS)]
    config = DecodeConfig(method=method, tau_conf=rng.choice([0.1, 0.3, 0.6, 0.9]), tau_add=rng.choice([0.2, 0.5, 1.0]),
                          tau_act=rng.choice([0.3, 0.7, 1.0]), fallback_n=rng.choice([1, 2, 3]),
                          vanilla_steps=rng.choice([3, 8, 12]), token_rule=rng.choice(["argmax", "mean"]))
    return model, random_prefix(model, rng.choice([1, 2, 3]), seed), config


@pytest.mark.parametrize("seed", range(12))
def test_static_equals_dynamic_on_random_shapes(seed):
    model, prefix, config = random_case(seed)
    dynamic, trace_d = decode_traced(model, prefix, config)
    for use_cache in (True, False):
        static, trace_s = decode_traced(model, prefix, config.replace(static_shapes=True, use_cache=use_cache))
        assert torch.equal(static.tokens, dynamic.tokens)
        assert static.stats.nfe == dynamic.stats.nfe
        assert torch.equal(static.stats.committed_matrix(), dynamic.stats.committed_matrix())
        assert step_logit_gap(trace_d, trace_s, model.block_size, model.num_blocks) < FLOAT32_NOISE
    # rows of the batch really decode differently (the per-row state is exercised)
    if prefix.shape[0] > 1:
        assert not torch.equal(dynamic.tokens[0], dynamic.tokens[1])


def test_every_forward_has_one_of_two_shapes():
    model, prefix, config = random_case(1)
    windows = []
    original = common.WindowForward.__call__

    def spy(self, tokens, start, end, kind, use_cache, read_len=None):
        windows.append((start, end, read_len))
        return original(self, tokens, start, end, kind, use_cache, read_len)

    common.WindowForward.__call__ = spy
    try:
        for method in STATIC_METHODS:
            windows.clear()
            result = decode(model, prefix, config.replace(method=method, static_shapes=True))
            P, L = prefix.shape[1], model.chunk_len
            assert windows[0] == (0, P + L, None) and set(windows[1:]) <= {(P, P + L, None)}
            assert result.stats.query_tokens == P + L + (result.stats.nfe - 1) * L
    finally:
        common.WindowForward.__call__ = original


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", STATIC_METHODS)
def test_static_equals_dynamic_on_every_backend(backend, method):
    model = tiny_model(3, sharpness=SHARP)
    prefix = random_prefix(model, 2, 3)
    config = DecodeConfig(method=method, tau_conf=0.3)
    use_backend(model, backend)
    try:
        dynamic, trace_d = decode_traced(model, prefix, config)
        static, trace_s = decode_traced(model, prefix, config.replace(static_shapes=True))
    finally:
        use_backend(model, "sdpa")
    assert torch.equal(static.tokens, dynamic.tokens)
    assert step_logit_gap(trace_d, trace_s, model.block_size, model.num_blocks) < FLOAT32_NOISE


class ForgetfulCache(BlockKVCache):
    """Returns zeros for the prefix's keys/values once they are cached: a cache that lost them."""

    def update(self, key, value, layer_idx, *args, **kwargs):
        keys, values = super().update(key, value, layer_idx)
        if self.length:
            keys, values = keys.clone(), values.clone()
            keys[:, :, :self.length] = 0
            values[:, :, :self.length] = 0
        return keys, values


class BidirectionalLayout(AttentionLayout):
    def __init__(self, prefix_len, block_size, q_start, q_len, kv_len, kind):
        super().__init__(prefix_len, block_size, q_start, q_len, kv_len, BIDIRECTIONAL)


def test_a_lost_prefix_cache_is_caught(monkeypatch):
    model = tiny_model(4, sharpness=SHARP)
    prefix = random_prefix(model, 2, 4)
    config = DecodeConfig(method="fast_dvla", tau_conf=0.3)
    _, reference = decode_traced(model, prefix, config)
    cfg = model.backbone.config
    monkeypatch.setattr(model, "new_cache", lambda b, n: ForgetfulCache(
        cfg.num_hidden_layers, b, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, n))
    _, broken = decode_traced(model, prefix, config.replace(static_shapes=True))
    assert step_logit_gap(reference, broken, model.block_size, model.num_blocks) > 1e-3


def test_a_wrong_mask_is_caught(monkeypatch):
    """In the static window every block sees every other under a bidirectional mask: later,
    still-masked blocks then leak into earlier ones, and the comparison sees it."""
    model = tiny_model(5, sharpness=SHARP)
    prefix = random_prefix(model, 2, 5)
    config = DecodeConfig(method="fast_dvla", tau_conf=0.3)
    _, reference = decode_traced(model, prefix, config)
    monkeypatch.setattr(common, "AttentionLayout", BidirectionalLayout)
    _, broken = decode_traced(model, prefix, config.replace(static_shapes=True))
    assert step_logit_gap(reference, broken, model.block_size, model.num_blocks) > 1e-3


def test_host_reads_per_chunk():
    """Static: one read per step (the stopping test) plus the fixed ones of every decode (the prefix's
    finiteness check, the loop's last test, the logits' finiteness check); the schedule-driven
    vanilla decoders none per step."""
    model = tiny_model(6, sharpness=SHARP)
    prefix = random_prefix(model, 2, 6)
    counts = {}
    for method in ("fast_dvla", "block_diffusion", "vanilla_cached", "vanilla"):
        for static in (False, True):
            with HostSyncCounter() as syncs:
                result = decode(model, prefix, DecodeConfig(method=method, tau_conf=0.3, static_shapes=static))
            counts[method, static] = (syncs.total, result.stats.nfe)
    for method in ("fast_dvla", "block_diffusion"):
        total, nfe = counts[method, True]
        assert total == nfe + 3
        assert counts[method, False][0] > total  # the dynamic loop reads its window and cache length too
    assert counts["vanilla_cached", True][0] == 2 < counts["vanilla_cached", False][0]
    assert counts["vanilla", True][0] == counts["vanilla", False][0] == 2


def test_static_shapes_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="compile"):
        DecodeConfig(compile=True)
    with pytest.raises(ConfigError, match="static_shapes"):
        DecodeConfig(method="fast_dvla", static_shapes=True, temperature=1.0)
    DecodeConfig(method="vanilla", static_shapes=True, temperature=1.0)  # the teacher's shapes are fixed anyway
    with pytest.raises(ConfigError, match="compile_mode"):
        DecodeConfig(static_shapes=True, compile_mode="reduce-overhead")  # a mode without compile=True
    with pytest.raises(ConfigError, match="compile_mode"):
        DecodeConfig(static_shapes=True, compile=True, compile_mode="fast")


def test_compiled_static_decode_equals_eager_without_recompiling():
    """Compiled once (two graphs), then chunk after chunk of new observations with no recompile."""
    from torch._dynamo.utils import counters

    model = tiny_model(7, sharpness=SHARP)
    config = DecodeConfig(method="fast_dvla", tau_conf=0.3, static_shapes=True)
    first = random_prefix(model, 1, 0)
    assert torch.equal(decode(model, first, config.replace(compile=True)).tokens, decode(model, first, config).tokens)
    graphs = counters["stats"]["unique_graphs"]
    for seed in range(1, 5):
        prefix = random_prefix(model, 1, seed)
        assert torch.equal(decode(model, prefix, config.replace(compile=True)).tokens,
                           decode(model, prefix, config).tokens)
    assert counters["stats"]["unique_graphs"] == graphs
