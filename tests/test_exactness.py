"""The cached decoders against uncached recomputation, and proof that the
comparison would catch a wrong mask or a wrongly cached block."""
import pytest
import torch

from fast_dvla import DecodeConfig, decode
from fast_dvla.decoding import common, pipelined
from fast_dvla.masks import BIDIRECTIONAL, AttentionLayout
from helpers import random_prefix, tiny_model

SHARP = 8.0  # spreads confidences over [0, 1] while logits stay O(1-10)
# float32 rounding between two exact computations in a different order, at logits up to ~20
# through attention that really reads the prefix; a wrong mask or cached block moves them > 1e-3
FLOAT32_NOISE = 1e-4

CASES = [  # (seed, batch, config)
    (0, 1, DecodeConfig(method="fast_dvla", tau_conf=0.3)),
    (1, 3, DecodeConfig(method="fast_dvla", tau_conf=0.2, tau_add=0.3, tau_act=0.5)),
    (2, 2, DecodeConfig(method="fast_dvla", tau_conf=0.9, fallback_n=3)),
    (3, 2, DecodeConfig(method="block_diffusion", tau_conf=0.4)),
    (4, 2, DecodeConfig(method="fast_dvla", tau_conf=0.3, temperature=1.0, seed=7)),
    (5, 2, DecodeConfig(method="fast_dvla", tau_conf=0.3, token_rule="mean")),
    (6, 2, DecodeConfig(method="fast_dvla", tau_conf=0.6, token_rule="mean", near_bins=3)),
    (7, 2, DecodeConfig(method="fast_dvla", tau_conf=0.6, near_bins=2)),
    (8, 2, DecodeConfig(method="fast_dvla", tau_conf=0.6, token_rule="majority", near_bins=3)),
]


def run(model, prefix, config):
    trace = []
    result = decode(model, prefix, config, trace=trace)
    return result, trace


def per_block_logits(step, k):
    first, last = step["window_blocks"]
    return {b: step["logits"][:, (b - first) * k:(b - first + 1) * k] for b in range(first, last)}


def max_logit_gap(trace_a, trace_b, k=7):
    """Largest logit difference over the blocks both traces forwarded at the same step."""
    gap = 0.0
    for a, b in zip(trace_a, trace_b):
        la, lb = per_block_logits(a, k), per_block_logits(b, k)
        for blk in la.keys() & lb.keys():
            gap = max(gap, (la[blk] - lb[blk]).abs().max().item())
    return gap


@pytest.mark.parametrize("seed,batch,config", CASES)
def test_cached_equals_uncached(seed, batch, config):
    assert_cached_equals_uncached(tiny_model(seed, sharpness=SHARP), seed, batch, config)


@pytest.mark.parametrize("block_size", [14, 4])  # two timesteps per block (the shipped LIBERO student); 4 splits them
def test_cached_equals_uncached_for_other_block_sizes(block_size):
    model = tiny_model(5, sharpness=SHARP, horizon=8, block_size=block_size)
    assert_cached_equals_uncached(model, 5, 2, DecodeConfig(method="fast_dvla", tau_conf=0.3))


def assert_cached_equals_uncached(model, seed, batch, config):
    prefix = random_prefix(model, batch, seed)
    cached, trace_c = run(model, prefix, config)
    full, trace_f = run(model, prefix, config.replace(use_cache=False))
    assert torch.equal(cached.tokens, full.tokens)
    assert max_logit_gap(trace_c, trace_f, model.block_size) < FLOAT32_NOISE
    assert cached.stats.nfe == full.stats.nfe
    # the cache really saves work: fewer query tokens than recomputing everything
    assert cached.stats.query_tokens < full.stats.query_tokens
    # and several blocks were in flight at once at some step (pipelining happened)
    if config.method == "fast_dvla":
        assert any(t["window_blocks"][1] - t["window_blocks"][0] > 1 for t in trace_c)


# wrong masks, built here: the library has no way to attend with either
class TokenCausalLayout(AttentionLayout):
    """Each position sees itself and every earlier one (an autoregressive LM's mask)."""

    def dense_mask(self, device="cpu", key_valid=None):
        q = torch.arange(self.q_start, self.q_start + self.q_len, device=device)
        return (torch.arange(self.kv_len, device=device)[None, :] <= q[:, None])[None, None]


class BidirectionalLayout(AttentionLayout):
    """The teacher's mask wherever the decoder asks for the student's."""

    def __init__(self, prefix_len, block_size, q_start, q_len, kv_len, kind):
        super().__init__(prefix_len, block_size, q_start, q_len, kv_len, BIDIRECTIONAL)


@pytest.mark.parametrize("wrong", [TokenCausalLayout, BidirectionalLayout])
def test_wrong_mask_is_caught(monkeypatch, wrong):
    model = tiny_model(5, sharpness=SHARP)
    prefix = random_prefix(model, 2, 5)
    config = DecodeConfig(method="fast_dvla", tau_conf=0.3)
    _, reference = run(model, prefix, config.replace(use_cache=False))
    built = []

    def wrong_layout(*args):
        built.append(wrong(*args))
        return built[-1]

    monkeypatch.setattr(common, "AttentionLayout", wrong_layout)  # every forward's layout, in WindowForward
    _, broken = run(model, prefix, config)
    assert built and all(type(layout) is wrong for layout in built)  # the decode really attended wrongly
    assert max_logit_gap(broken, reference) > 1e-3


def test_caching_an_incomplete_block_is_caught(monkeypatch):
    model = tiny_model(6, sharpness=SHARP)
    prefix = random_prefix(model, 2, 6)
    config = DecodeConfig(method="fast_dvla", tau_conf=0.3)
    _, reference = run(model, prefix, config.replace(use_cache=False))
    _, correct = run(model, prefix, config)
    assert max_logit_gap(correct, reference) < FLOAT32_NOISE
    # cache a block as soon as this step's commit completes it: its keys/values
    # in the cache then come from a forward that still had [MASK]s in it.
    # The decoder's `committed` is updated in place: reading it when the cache is
    # extended gives the blocks complete *after* this step's commit.
    live = {}
    complete_blocks = pipelined.complete_blocks

    def spy(committed, block_size):
        live.update(committed=committed, block_size=block_size)
        return complete_blocks(committed, block_size)

    monkeypatch.setattr(pipelined, "complete_blocks", spy)
    monkeypatch.setattr(pipelined, "cacheable_blocks", lambda before: pipelined.leading_complete_blocks(
        complete_blocks(live["committed"], live["block_size"])))
    _, broken = run(model, prefix, config)
    assert max_logit_gap(broken, reference) > 1e-3


def test_eager_attention_matches_sdpa():
    """eager needs the additive mask; a boolean one there would be wrong."""
    model = tiny_model(8, sharpness=SHARP)
    prefix = random_prefix(model, 2, 8)
    config = DecodeConfig(method="fast_dvla", tau_conf=0.3)
    _, sdpa = run(model, prefix, config)
    model.set_attn_backend("eager")
    _, eager = run(model, prefix, config)
    assert max_logit_gap(sdpa, eager) < FLOAT32_NOISE


def _vanilla_cached_gap(trace_cached, trace_full):
    """Largest logit difference over the positions the cached forward recomputed."""
    return max((a["logits"] - b["logits"][:, -a["logits"].shape[1]:]).abs().max().item()
               for a, b in zip(trace_cached, trace_full))


@pytest.mark.parametrize("seed,batch", [(7, 1), (8, 3)])
def test_vanilla_cached_equals_its_uncached_reference(seed, batch):
    """The teacher's schedule on the student: reading the prefix and complete blocks from the
    cache must give what recomputing the whole block-causal sequence gives."""
    model = tiny_model(seed, sharpness=SHARP)
    prefix = random_prefix(model, batch, seed)
    config = DecodeConfig(method="vanilla_cached", vanilla_steps=16)
    trace_c, trace_f, trace_t = [], [], []
    cached = decode(model, prefix, config, trace=trace_c)
    full = decode(model, prefix, config.replace(use_cache=False), trace=trace_f)
    assert torch.equal(cached.tokens, full.tokens)
    assert _vanilla_cached_gap(trace_c, trace_f) < FLOAT32_NOISE
    assert cached.stats.nfe == full.stats.nfe == 16
    assert cached.stats.query_tokens < full.stats.query_tokens
    # it decodes the student's mask: the teacher's bidirectional forwards give other logits
    decode(model, prefix, config.replace(method="vanilla"), trace=trace_t)
    assert (trace_t[0]["logits"] - trace_f[0]["logits"]).abs().max().item() > 1e-3


def test_vanilla_cached_caching_an_incomplete_block_is_caught(monkeypatch):
    from fast_dvla.decoding import vanilla

    model = tiny_model(9, sharpness=SHARP)
    prefix = random_prefix(model, 2, 9)
    config = DecodeConfig(method="vanilla_cached", vanilla_steps=10)
    reference = []
    decode(model, prefix, config.replace(use_cache=False), trace=reference)
    # one block further than complete: its keys/values were computed with [MASK]s still in it
    monkeypatch.setattr(vanilla, "leading_complete_blocks",
                        lambda complete: torch.clamp(pipelined.leading_complete_blocks(complete) + 1,
                                                     max=complete.shape[1] - 1))
    broken = []
    decode(model, prefix, config, trace=broken)
    assert _vanilla_cached_gap(broken, reference) > 1e-3


@pytest.mark.parametrize("config", [DecodeConfig(method="fast_dvla", tau_conf=0.3),
                                    DecodeConfig(method="block_diffusion", tau_conf=0.4)])
def test_cached_equals_uncached_on_a_qwen2_reference_model(config):
    """``ModelConfig.backbone="qwen2"``: biases on q/k/v through the lean path and the cache."""
    model = tiny_model(9, sharpness=SHARP, backbone="qwen2")
    assert type(model.backbone.decoder).__name__ == "Qwen2Model"
    assert model.backbone.decoder.layers[0].self_attn.q_proj.bias is not None
    assert_cached_equals_uncached(model, 9, 2, config)
