"""Exactness as properties over random models, batches and decoding settings.

Each property holds for every model shape (heads, kv heads, head size, layers,
prefix length, chunk and block size), every batch and every setting of the
block-causal decoders: the cache changes nothing, rows of a batch do not
affect each other, forwards stay within the proven bound, and the Triton
kernel is the block-causal attention it claims to be. A model is the
reference dVLA (a transformers Llama) or a foreign Qwen2 decoder wrapped by
TransformersBackbone.

Example counts come from the hypothesis profile in conftest.py: "ci" by
default, ``HYPOTHESIS_PROFILE=long`` for a longer search by hand.
"""
import itertools
import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fast_dvla import DecodeConfig, decode
from fast_dvla.backbone import TransformersBackbone
from fast_dvla.config import METHODS, TOKEN_RULES
from fast_dvla.decoding import max_nfe
from fast_dvla_kernels import triton_block_causal_attention
from helpers import random_prefix, redraw_attention, tiny_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_CAUSAL_METHODS = ("block_diffusion", "fast_dvla", "vanilla_cached")
PIPELINED = ("block_diffusion", "fast_dvla")
# float32 rounding of one logit computed in another order, per unit of the logits' scale
LOGIT_NOISE = 5e-6
# the kernel in each dtype against float64: float32 up to summation order, half precision up to its rounding
KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


# -- models ----------------------------------------------------------------------
def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# 1: confidences near 1/n_bins, every commit a fallback; sharper heads spread them over [0, 1]
SHARPNESS = st.sampled_from([1.0, 4.0, 8.0, 16.0])
# sharp enough that rows commit different counts, so each row's blocks complete at its own pace
ROWS_APART = st.sampled_from([4.0, 8.0, 16.0])


@st.composite
def model_specs(draw, sharpness=SHARPNESS) -> dict:
    """A small model: its shape, prefix, chunk and blocking, seed, head sharpness and backbone."""
    num_kv_heads = draw(st.integers(1, 2))
    num_heads = num_kv_heads * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([4, 8, 16]))  # even: RoPE rotates pairs
    horizon, action_dim = draw(st.integers(1, 4)), draw(st.integers(1, 7))
    return dict(
        shape=dict(num_heads=num_heads, num_kv_heads=num_kv_heads, hidden_size=num_heads * head_dim,
                   intermediate_size=2 * num_heads * head_dim, num_layers=draw(st.integers(1, 3)),
                   horizon=horizon, action_dim=action_dim,
                   block_size=draw(st.sampled_from(divisors(horizon * action_dim))),
                   instr_len=draw(st.integers(0, 4)), image_grid=draw(st.integers(1, 2)),
                   cameras=draw(st.sampled_from([("agentview",), ("agentview", "wrist")])),
                   state_dim=draw(st.sampled_from([0, 8])), n_bins=draw(st.sampled_from([16, 256]))),
        seed=draw(st.integers(0, 2 ** 16)),
        sharpness=draw(sharpness),
        backbone=draw(st.sampled_from(["llama", "qwen2", "qwen2-unfused"])),
    )


def build(spec: dict, config: DecodeConfig):
    event(f"backbone: {spec['backbone']}")  # the statistics show what the examples covered
    event(f"method: {config.method}")
    model = tiny_model(spec["seed"], sharpness=spec["sharpness"], **spec["shape"])
    if spec["backbone"] != "llama":
        use_qwen2_backbone(model, spec["seed"], lean=spec["backbone"] == "qwen2")
    return model


def use_qwen2_backbone(model, seed: int, lean: bool) -> None:
    """Swap in a random Qwen2 decoder of the same size (biases on q/k/v, unlike Llama);
    ``lean=False`` runs it through transformers' own forward instead of the lean one."""
    from transformers import Qwen2Config, Qwen2Model

    cfg = model.config
    torch.manual_seed(seed + 1)
    decoder = Qwen2Model(Qwen2Config(vocab_size=2, hidden_size=cfg.hidden_size,
                                     intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                                     num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                                     max_position_embeddings=cfg.prefix_len + cfg.chunk_len)).eval()
    model.backbone = TransformersBackbone(decoder, "sdpa", lean=lean)
    redraw_attention(model, 2.0)  # as tiny_model does for Llama: attention that reads the prefix
    with torch.no_grad():
        for layer in decoder.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.normal_(0.0, 0.5)


def categorical_slots(model):
    """None (every slot ordinal) or a random set of categorical slots."""
    return st.one_of(st.none(), st.lists(st.booleans(), min_size=model.chunk_len, max_size=model.chunk_len)
                     .map(torch.tensor))


# -- decoding settings --------------------------------------------------------------
ANY_THRESHOLD = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
# at 0 or 1 every row commits alike (all at once, or only the fallback's count)
INTERIOR_THRESHOLD = st.floats(0.1, 0.9)


@st.composite
def decode_configs(draw, methods=BLOCK_CAUSAL_METHODS, sampling: bool = True, unit=ANY_THRESHOLD) -> DecodeConfig:
    """Any valid settings of ``methods``: thresholds (drawn from ``unit``), fallback n, vanilla
    schedule, token rule, near bins and (if ``sampling``) temperature sampling, which only the
    argmax rule takes."""
    rule = draw(st.sampled_from(TOKEN_RULES))
    near_bins = draw(st.integers(0, 3))
    sample = sampling and rule == "argmax" and near_bins == 0 and draw(st.booleans())
    return DecodeConfig(method=draw(st.sampled_from(methods)), tau_conf=draw(unit), tau_add=draw(unit),
                        tau_act=draw(unit), fallback_n=draw(st.integers(1, 5)),
                        # past chunk_len too: chunks here are 1 to 28 tokens
                        vanilla_steps=draw(st.integers(1, 16)), schedule=draw(st.sampled_from(["cosine", "linear"])),
                        token_rule=rule, near_bins=near_bins, temperature=1.0 if sample else 0.0,
                        seed=draw(st.integers(0, 2 ** 31)) if sample else None)


def max_logit_gap(trace_a: list, trace_b: list) -> float:
    """Largest difference between the logits of the same step, over the positions both forwarded
    (a cached vanilla forward covers only the tail of the chunk: align from the right)."""
    assert len(trace_a) == len(trace_b)
    gap = 0.0
    for a, b in zip(trace_a, trace_b):
        la, lb = a["logits"], b["logits"]
        n = min(la.shape[1], lb.shape[1])
        gap = max(gap, (la[:, la.shape[1] - n:] - lb[:, lb.shape[1] - n:]).abs().max().item())
    return gap


def logit_scale(trace: list) -> float:
    return max(1.0, max(step["logits"].abs().max().item() for step in trace))


# -- the helpers' batches really differ ----------------------------------------------
@pytest.mark.parametrize("seed,sharpness", [(0, 1.0), (1, 8.0)])
@pytest.mark.parametrize("method", ["vanilla", "fast_dvla"])
def test_rows_of_a_random_batch_decode_differently(seed, sharpness, method):
    """Otherwise a batch test could not tell one row's state from another's."""
    model = tiny_model(seed, sharpness=sharpness)
    tokens = decode(model, random_prefix(model, 4, seed), DecodeConfig(method=method)).tokens
    differing = [int((tokens[a] != tokens[b]).sum()) for a, b in itertools.combinations(range(4), 2)]
    assert min(differing) > 0, differing
    assert sum(differing) / len(differing) > model.chunk_len / 2, differing


# -- properties of the decoders ---------------------------------------------------------
@pytest.mark.parametrize("method", BLOCK_CAUSAL_METHODS)
@given(data=st.data())
def test_cached_decoding_equals_recomputing_everything(method, data):
    spec, config = data.draw(model_specs(), label="model"), data.draw(decode_configs((method,)), label="config")
    batch = data.draw(st.integers(1, 4), label="batch")
    model = build(spec, config)
    prefix = random_prefix(model, batch, spec["seed"])
    categorical = data.draw(categorical_slots(model), label="categorical")
    trace_c, trace_f = [], []
    cached = decode(model, prefix, config, trace=trace_c, categorical=categorical)
    full = decode(model, prefix, config.replace(use_cache=False), trace=trace_f, categorical=categorical)
    assert torch.equal(cached.tokens, full.tokens)
    assert cached.stats.nfe == full.stats.nfe
    assert max_logit_gap(trace_c, trace_f) <= LOGIT_NOISE * logit_scale(trace_f)
    assert cached.stats.query_tokens <= full.stats.query_tokens


# sampling is left out: the batch shares one generator, so a row's draws depend on the rows before it
@pytest.mark.parametrize("method", BLOCK_CAUSAL_METHODS)
@given(data=st.data())
def test_each_row_of_a_batch_decodes_as_if_alone(method, data):
    spec = data.draw(model_specs(sharpness=ROWS_APART), label="model")
    config = data.draw(decode_configs((method,), sampling=False, unit=INTERIOR_THRESHOLD), label="config")
    batch, use_cache = data.draw(st.integers(2, 4), label="batch"), data.draw(st.booleans(), label="use_cache")
    model = build(spec, config)
    prefix = random_prefix(model, batch, spec["seed"])
    categorical = data.draw(categorical_slots(model), label="categorical")
    config = config.replace(use_cache=use_cache)
    together = decode(model, prefix, config, categorical=categorical).tokens
    for row in range(batch):
        alone = decode(model, prefix[row:row + 1], config, categorical=categorical).tokens
        assert torch.equal(together[row], alone[0]), f"row {row}"


@given(spec=model_specs(), config=decode_configs(methods=METHODS), batch=st.integers(1, 4))
def test_forwards_stay_within_the_bound(spec, config, batch):
    model = build(spec, config)
    result = decode(model, random_prefix(model, batch, spec["seed"]), config)
    assert result.stats.nfe <= max_nfe(model, config)
    # every forward commits a token in every row that has one left, so at least one forward per block
    least = model.num_blocks if config.method in PIPELINED else 1
    assert result.stats.nfe >= least
    assert (result.tokens < model.n_bins).all()  # every token committed: no [MASK] left


# -- the Triton kernel --------------------------------------------------------------------
def float64_block_causal_attention(q, k, v, cache_lens, block_size):
    """Per row: the cache fully visible, in-flight key j visible to query i iff
    j // block_size <= i // block_size; kv heads shared by groups of query heads."""
    groups, n_q = q.shape[1] // k.shape[1], q.shape[2]
    i = torch.arange(n_q)[:, None]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, c in enumerate(cache_lens.tolist()):
        j = torch.arange(c + n_q)[None, :] - c  # in-flight index; negative: the cache
        visible = (j < 0) | (torch.div(j, block_size, rounding_mode="floor") <= i // block_size)
        kk = k[b, :, :c + n_q].double().cpu().repeat_interleave(groups, 0)
        vv = v[b, :, :c + n_q].double().cpu().repeat_interleave(groups, 0)
        scores = q[b].double().cpu() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
        out[b] = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vv
    return out


@settings(max_examples=3 * settings.default.max_examples)  # the cheapest property: search it harder
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 2), groups=st.integers(1, 3), n_q=st.integers(1, 40),
       block_size=st.integers(1, 16), head_dim=st.sampled_from([16, 32, 64]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), spare=st.integers(0, 5),
       seed=st.integers(0, 2 ** 16), data=st.data())
def test_triton_kernel_equals_float64_attention(batch, kv_heads, groups, n_q, block_size, head_dim, dtype, spare,
                                                seed, data):
    cache_lens = torch.tensor(data.draw(st.lists(st.integers(0, 60), min_size=batch, max_size=batch),
                                        label="cache_lens"))
    slots = int(cache_lens.max()) + n_q + spare
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, n_q, head_dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, slots, head_dim, generator=g) for _ in range(2))
    for b, c in enumerate(cache_lens.tolist()):  # a read past a row's keys would poison its output
        k[b, :, c + n_q:] = v[b, :, c + n_q:] = float("nan")
    q, k, v = (t.to(DEVICE, dtype) for t in (q, k, v))
    out = triton_block_causal_attention(q, k, v, cache_lens.to(DEVICE), block_size)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    err = (out.double().cpu() - float64_block_causal_attention(q, k, v, cache_lens, block_size)).abs().max().item()
    assert err < KERNEL_TOL[dtype], err


def test_sampled_vanilla_cached_draws_alike_cached_and_uncached():
    """Found by the long profile: the uncached student sampled over the whole chunk while the
    cached one sampled only its window, so the two drew different numbers from the generator."""
    model = tiny_model(0, sharpness=4, num_heads=1, num_kv_heads=1, hidden_size=4, intermediate_size=8,
                       num_layers=1, horizon=1, action_dim=3, block_size=1, instr_len=0, image_grid=1,
                       cameras=("agentview",), state_dim=0, n_bins=16)
    prefix = random_prefix(model, 1, 0)
    config = DecodeConfig(method="vanilla_cached", vanilla_steps=3, temperature=1.0, seed=0)
    assert torch.equal(decode(model, prefix, config).tokens,
                       decode(model, prefix, config.replace(use_cache=False)).tokens)
