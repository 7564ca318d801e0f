"""Each decoder's behaviour on models whose confidences the test controls."""

import pytest
import torch

from fast_dvla import DecodeConfig, decode
from fast_dvla.decoding import max_nfe
from fast_dvla.decoding.unmask import (block_threshold_commit, fallback_steps_per_block, masked_after_step,
                                       threshold_or_top1_commit, topk_commit)
from helpers import ScriptedModel, fallback_steps, random_prefix, scripted_prefix, tiny_model

METHODS = ["vanilla", "fast_dllm", "block_diffusion", "fast_dvla", "vanilla_cached"]


def scripted(conf_rows, k=7, seed=0):
    conf = torch.tensor(conf_rows, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 16, conf.shape, generator=g)
    return ScriptedModel(conf, target, k), target


# -- the commit rules ---------------------------------------------------------
def test_semi_activated_commits_only_above_threshold():
    conf = torch.tensor([[[0.9, 0.2, 0.5, 0.49, 0.1, 0.3, 0.8]]])
    eligible = torch.ones_like(conf, dtype=torch.bool)
    eligible[0, 0, 6] = False  # already committed
    commit = block_threshold_commit(conf, eligible, torch.tensor([[False]]), 0.5, 2)
    assert commit[0, 0].tolist() == [True, False, True, False, False, False, False]
    none = block_threshold_commit(conf * 0.1, eligible, torch.tensor([[False]]), 0.5, 2)
    assert not none.any()  # a semi-activated block may commit nothing


def test_fully_activated_fallback_commits_at_least_r_over_n():
    conf = torch.tensor([[[0.1, 0.2, 0.3, 0.05, 0.15, 0.25, 0.35]]])
    eligible = torch.ones_like(conf, dtype=torch.bool)
    commit = block_threshold_commit(conf, eligible, torch.tensor([[True]]), 0.5, 2)
    # R = 7, m = 3: the three most confident (0.35, 0.3, 0.25)
    assert commit[0, 0].tolist() == [False, False, True, False, False, True, True]
    commit = block_threshold_commit(conf, eligible, torch.tensor([[True]]), 0.5, 4)  # m = 1
    assert commit[0, 0].sum() == 1 and commit[0, 0, 6]
    high = block_threshold_commit(conf + 0.6, eligible, torch.tensor([[True]]), 0.5, 2)
    assert high.all()  # above tau_conf everything goes, more than m


def test_other_rules():
    conf = torch.tensor([[0.1, 0.7, 0.3], [0.2, 0.1, 0.05]])
    eligible = torch.tensor([[True, True, True], [True, True, False]])
    assert threshold_or_top1_commit(conf, eligible, 0.5).tolist() == [[False, True, False], [True, False, False]]
    assert topk_commit(conf, eligible, 2).tolist() == [[False, True, True], [True, True, False]]
    assert [masked_after_step(56, 12, s, "cosine") for s in (11,)] == [0]
    left = [masked_after_step(56, 12, s, "linear") for s in range(12)]
    assert left == sorted(left, reverse=True) and left[-1] == 0


def test_fallback_formula():
    assert [fallback_steps_per_block(7, n) for n in (1, 2, 3, 4)] == [1, 4, 6, 7]
    assert all(fallback_steps_per_block(k, n) == fallback_steps(k, n) for k in range(1, 20) for n in range(1, 6))


# -- progress and the NFE bound ---------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("level", [0.1, 0.45, 0.97])  # all above 1/16: the target stays the argmax
def test_every_decode_ends_within_its_bound(method, level):
    model, target = scripted([[level] * 28, [min(level * 1.5, 0.99)] * 28], k=7)
    config = DecodeConfig(method=method, tau_conf=0.5)
    result = decode(model, scripted_prefix(2), config)
    assert torch.equal(result.tokens, target)  # every token committed to the model's prediction
    assert model.num_blocks <= result.stats.nfe <= max_nfe(model, config) or method.startswith("vanilla")
    assert result.stats.nfe <= max_nfe(model, config)
    assert result.stats.committed_matrix().sum(0).tolist() == [28, 28]


def test_confident_model_needs_one_forward_per_block():
    model, _ = scripted([[0.99] * 28], k=7)
    for method in ("fast_dvla", "block_diffusion", "fast_dllm"):
        assert decode(model, scripted_prefix(1), DecodeConfig(method=method)).stats.nfe == 4
    assert decode(model, scripted_prefix(1), DecodeConfig(method="vanilla", vanilla_steps=10)).stats.nfe == 10


def test_unconfident_block_diffusion_hits_the_bound_exactly():
    distinct = (torch.arange(28) % 7 * 0.02 + 0.1).tolist()  # below tau_conf, no ties
    model, _ = scripted([distinct], k=7)
    config = DecodeConfig(method="block_diffusion", fallback_n=2)
    assert decode(model, scripted_prefix(1), config).stats.nfe == 4 * fallback_steps(7, 2)


def test_pipelined_schedule_step_by_step():
    b0 = [0.9, 0.9, 0.9, 0.9, 0.3, 0.2, 0.1]
    b1 = [0.6, 0.4, 0.45, 0.35, 0.3, 0.2, 0.1]
    model, _ = scripted([b0 + b1], k=7)
    trace = []
    decode(model, scripted_prefix(1), DecodeConfig(method="fast_dvla", tau_conf=0.5, tau_add=0.5, tau_act=0.7),
           trace=trace)
    committed = [t["committed"][0].view(2, 7).tolist() for t in trace]
    T, F = True, False
    # step 1: block 0 alone, fully activated: the four 0.9s (>= tau_conf, more than m = 3)
    assert committed[0] == [[T, T, T, T, F, F, F], [F] * 7]
    # step 2: 4/7 >= tau_add adds block 1, semi-activated (4/7 < tau_act): only its 0.6;
    # block 0 (R = 3, m = 1) commits down to min(0.5, 0.3)
    assert trace[1]["n_added"].tolist() == [2] and trace[1]["fully_active"][0].tolist() == [T, F]
    assert committed[1] == [[T, T, T, T, T, F, F], [T, F, F, F, F, F, F]]
    # step 3: 5/7 >= tau_act: block 1 is fully activated and falls back to m = 3 of its 6
    assert trace[2]["fully_active"][0].tolist() == [T, T]
    assert committed[2][1] == [T, T, T, T, F, F, F]


def test_blocks_are_cached_only_when_complete_and_in_order():
    torch.manual_seed(0)
    conf = torch.rand(3, 28) * 0.9 + 0.05
    model = ScriptedModel(conf, torch.randint(0, 16, (3, 28)), 7)
    trace = []
    decode(model, scripted_prefix(3, 5), DecodeConfig(method="fast_dvla", tau_conf=0.6), trace=trace)
    cached = [(t["final_len"] - 5) // 7 for t in trace]
    assert cached == sorted(cached) and cached[-1] >= 1
    for t, c in zip(trace, cached):
        assert t["complete_before"][:, :c].all()  # complete in every row before the forward that cached it
        assert t["window_blocks"][0] <= c


def test_vanilla_cached_caches_blocks_as_they_complete():
    """Confidence falling slot by slot: the linear schedule commits 4 tokens per forward in
    slot order, so block b is complete before forward 2b + 2 and read from the cache after it."""
    model, target = scripted([torch.linspace(0.99, 0.1, 28).tolist()], k=7)
    trace = []
    result = decode(model, scripted_prefix(1, 3), DecodeConfig(method="vanilla_cached", vanilla_steps=7,
                                                                schedule="linear"), trace=trace)
    assert torch.equal(result.tokens, target)
    assert result.stats.committed_matrix()[:, 0].tolist() == [4] * 7
    assert [t["final_len"] for t in trace] == [3, 3, 10, 10, 17, 17, 24]
    assert result.stats.query_tokens == 31 + 28 + 28 + 21 + 21 + 14 + 14


# -- batches ------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_batch_rows_do_not_influence_each_other(method):
    model = tiny_model(3, sharpness=8.0)
    prefix = random_prefix(model, 3, 3)
    config = DecodeConfig(method=method, tau_conf=0.3)
    together = decode(model, prefix, config).tokens
    for row in range(3):
        alone = decode(model, prefix[row:row + 1], config).tokens
        if method == "fast_dllm":
            continue  # its approximate cache is refreshed on the batch's schedule; rows share it by design
        assert torch.equal(alone[0], together[row])


def test_scripted_rows_keep_their_own_state():
    conf = torch.stack([torch.full((28,), 0.95), torch.arange(28) % 7 * 0.02 + 0.1])
    model = ScriptedModel(conf, torch.randint(0, 16, (2, 28)), 7)
    result = decode(model, scripted_prefix(2), DecodeConfig(method="fast_dvla"))
    per_step = result.stats.committed_matrix()
    assert per_step[0].tolist() == [7, 3]  # the confident row takes its block at once, the other falls back


# -- errors ------------------------------------------------------------------
def test_bad_inputs_are_named():
    model = tiny_model(0)
    prefix = random_prefix(model, 1)
    with pytest.raises(ValueError, match="empty prefix"):
        decode(model, prefix[:, :0])
    with pytest.raises(ValueError, match="NaN"):
        decode(model, prefix * float("nan"))
    with pytest.raises(ValueError, match=r"\[batch, prefix_len, hidden\]"):
        decode(model, prefix[0])
    with pytest.raises(ValueError, match="dtype"):
        decode(model, prefix.double())
    with pytest.raises(TypeError):
        decode(model, prefix, {"method": "fast_dvla"})
    for bad in (dict(tau_conf=1.5), dict(tau_add=-0.1), dict(tau_act=float("nan")), dict(method="ar"),
                dict(fallback_n=0), dict(vanilla_steps=0), dict(temperature=-1.0),
                # a bool is an int to Python, but True here is a mistake, not 1
                dict(fallback_n=True), dict(vanilla_steps=True), dict(tau_conf=True), dict(fast_dllm_block_size=True),
                dict(fast_dllm_block_size="7"), dict(token_rule="mean", near_bins=True)):
        with pytest.raises(ValueError):
            DecodeConfig(**bad)
    from fast_dvla.model import ModelConfig
    with pytest.raises(ValueError, match="does not divide"):
        ModelConfig(block_size=5)
