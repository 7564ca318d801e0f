"""``token_rule``: which token a greedy commit writes (argmax, or the bin
nearest the expected bin on ordinal slots), and that it changes nothing else;
``near_bins``: the confidence a slot's neighbourhood gives."""
import numpy as np
import pytest
import torch

from fast_dvla import ActionTokenizer, DecodeConfig, FastDVLAPolicy, decode
from fast_dvla.decoding.common import MAJORITY, confidences
from fast_dvla.processor import StateNormalizer
from helpers import ScriptedModel, random_prefix, scripted_prefix, tiny_model


def test_mean_writes_the_expected_bin_and_keeps_the_argmax_on_categorical_slots():
    # a clipped action: 40% on the end bin, the rest of the mass two and three bins in
    probs = torch.tensor([[[0.4, 0.0, 0.0, 0.3, 0.3], [0.4, 0.0, 0.0, 0.3, 0.3], [0.1, 0.1, 0.6, 0.1, 0.1]]])
    logits = torch.log(probs.clamp(min=1e-12))
    conf_a, tok_a = confidences(logits, DecodeConfig(), None)
    conf_m, tok_m = confidences(logits, DecodeConfig(token_rule="mean"), None,
                                categorical=torch.tensor([False, True, False]))
    assert tok_a.tolist() == [[0, 0, 2]]
    assert tok_m.tolist() == [[2, 0, 2]]  # 0.3*3 + 0.3*4 = 2.1; the categorical slot keeps its argmax
    assert torch.equal(conf_a, conf_m)  # the confidence, hence the schedule, is the argmax's either way
    assert torch.allclose(conf_m, torch.tensor([[0.4, 0.4, 0.6]]))


def test_majority_keeps_an_argmax_that_holds_half_the_mass():
    # slot 0: a clipped action, 40% on the end bin (mean 2.1); slot 1: a spike holding 60% (mean 1.9);
    # slot 2: the same spike on a categorical slot
    probs = torch.tensor([[[0.4, 0.0, 0.0, 0.3, 0.3], [0.0, 0.6, 0.0, 0.0, 0.4], [0.0, 0.6, 0.0, 0.0, 0.4]]])
    logits = torch.log(probs.clamp(min=1e-12))
    categorical = torch.tensor([False, False, True])
    conf_a, _ = confidences(logits, DecodeConfig(), None, categorical)
    _, tok_m = confidences(logits, DecodeConfig(token_rule="mean"), None, categorical)
    conf_j, tok_j = confidences(logits, DecodeConfig(token_rule="majority"), None, categorical)
    assert tok_m.tolist() == [[2, 2, 1]]
    assert tok_j.tolist() == [[2, 1, 1]]
    assert torch.equal(conf_a, conf_j)  # the schedule is the argmax's


def test_near_bins_with_the_argmax_scores_the_argmax_neighbourhood():
    probs = torch.tensor([[[0.4, 0.0, 0.0, 0.3, 0.3], [0.1, 0.1, 0.6, 0.1, 0.1]]])
    logits = torch.log(probs.clamp(min=1e-12))
    conf, tok = confidences(logits, DecodeConfig(near_bins=1), None)
    assert tok.tolist() == [[0, 2]]
    assert torch.allclose(conf, torch.tensor([[0.4, 0.8]]), atol=1e-6)


@pytest.mark.parametrize("method", ["fast_dvla", "vanilla_cached", "vanilla"])
def test_mean_changes_the_tokens_not_the_schedule(method):
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(2, 28, generator=g) * 0.9 + 0.05
    target = torch.randint(0, 16, (2, 28), generator=g)
    config = DecodeConfig(method=method, tau_conf=0.6, vanilla_steps=6)
    a = decode(ScriptedModel(conf, target, block_size=7), scripted_prefix(2), config)
    m = decode(ScriptedModel(conf, target, block_size=7), scripted_prefix(2), config.replace(token_rule="mean"))
    assert torch.equal(a.tokens, target)
    # the scripted model spreads 1 - p evenly over the other 15 bins, so E[bin] = p t + (1 - p)(120 - t) / 15
    expected = (conf * target + (1 - conf) * (120 - target) / 15).round().long()
    assert torch.equal(m.tokens, expected) and not torch.equal(m.tokens, a.tokens)
    assert a.stats.nfe == m.stats.nfe
    assert torch.equal(a.stats.committed_matrix(), m.stats.committed_matrix())


def _policy(model):
    rng = np.random.default_rng(0)
    tok = ActionTokenizer.fit(rng.uniform(-1, 1, (200, 7)), gripper_dims=(6,))
    return FastDVLAPolicy(model, tok, StateNormalizer.fit(rng.normal(size=(50, 8))))


@pytest.mark.parametrize("config", [DecodeConfig(method="fast_dvla", tau_conf=0.3, token_rule="mean"),
                                    DecodeConfig(method="vanilla_cached", vanilla_steps=8, token_rule="mean"),
                                    DecodeConfig(method="fast_dvla", tau_conf=0.3, token_rule="majority",
                                                 near_bins=3)])
def test_every_commit_is_the_rule_applied_to_that_forward(config):
    """On a real model, through a policy: each token committed at a step is round(E[bin]) of that
    step's logits (majority: where the argmax holds less than half), except on the gripper's slots
    (from the tokenizer), where it is the argmax."""
    model = tiny_model(3, sharpness=8.0)
    policy = _policy(model)
    categorical = torch.as_tensor(policy.action_tokenizer.categorical_slots(model.config.horizon))
    assert categorical.tolist() == [d == 6 for d in range(7)] * model.config.horizon
    prefix = random_prefix(model, 2, 3)
    trace = []
    tokens = decode(model, prefix, config, trace=trace, categorical=categorical).tokens
    # the policy decodes with the same slots: the same tokens from the same prefix
    assert torch.equal(policy.decode_prefix(prefix, config).tokens, tokens)
    before = torch.zeros_like(tokens, dtype=torch.bool)
    L, seen_mean_differs = model.chunk_len, False
    for step in trace:
        logits = step["logits"].float()
        a0 = L - logits.shape[1] if "window_blocks" not in step else step["window_blocks"][0] * model.block_size
        probs = logits.softmax(-1)
        argmax = probs.argmax(-1)
        mean = (probs @ torch.arange(probs.shape[-1], dtype=probs.dtype)).round().long()
        moved = ~categorical[a0:a0 + logits.shape[1]]
        if config.token_rule == "majority":
            moved = moved & (probs.max(-1).values < MAJORITY)
        want = torch.where(moved, mean, argmax)
        new = step["committed"] & ~before
        window_new = new[:, a0:a0 + logits.shape[1]]
        assert torch.equal(tokens[:, a0:a0 + logits.shape[1]][window_new], want[window_new])
        seen_mean_differs |= bool((want != argmax)[window_new].any())
        before = step["committed"].clone()
    assert before.all() and seen_mean_differs


def test_near_bins_scores_the_committed_bins_neighbourhood():
    probs = torch.tensor([[[0.4, 0.0, 0.0, 0.3, 0.3], [0.4, 0.0, 0.0, 0.3, 0.3], [0.1, 0.1, 0.6, 0.1, 0.1]]])
    logits = torch.log(probs.clamp(min=1e-12))
    categorical = torch.tensor([False, True, False])
    for near, want in [(1, [0.3, 0.4, 0.8]), (2, [1.0, 0.4, 1.0])]:
        conf, tok = confidences(logits, DecodeConfig(token_rule="mean", near_bins=near), None, categorical)
        assert tok.tolist() == [[2, 0, 2]]  # the tokens do not depend on near_bins
        assert torch.allclose(conf, torch.tensor([want]), atol=1e-6), near  # categorical: the argmax's 0.4


def test_token_rule_is_validated():
    with pytest.raises(ValueError, match="token_rule"):
        DecodeConfig(token_rule="median")
    for rule in ("mean", "majority"):
        with pytest.raises(ValueError, match="greedy"):
            DecodeConfig(token_rule=rule, temperature=1.0)
        assert DecodeConfig.from_dict(DecodeConfig(token_rule=rule).to_dict()).token_rule == rule
    with pytest.raises(ValueError, match="greedy decoding"):
        DecodeConfig(near_bins=3, temperature=1.0)
    assert DecodeConfig(near_bins=3).near_bins == 3  # the argmax's neighbourhood
    with pytest.raises(ValueError, match="near_bins"):
        DecodeConfig(token_rule="mean", near_bins=-1)


def test_categorical_is_an_explicit_argument():
    """Without ``categorical`` every slot is ordinal; with it, its slots keep the argmax. It is
    checked against the chunk."""
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(2, 28, generator=g) * 0.85 + 0.1  # above 1/16: the target is the argmax
    target = torch.randint(0, 16, (2, 28), generator=g)
    config = DecodeConfig(method="fast_dvla", tau_conf=0.6, token_rule="mean")
    categorical = torch.arange(28) % 7 == 6
    ordinal = decode(ScriptedModel(conf, target, block_size=7), scripted_prefix(2), config).tokens
    mixed = decode(ScriptedModel(conf, target, block_size=7), scripted_prefix(2), config,
                   categorical=categorical.numpy()).tokens
    assert torch.equal(mixed[:, categorical], target[:, categorical])
    assert torch.equal(mixed[:, ~categorical], ordinal[:, ~categorical])
    assert not torch.equal(mixed, ordinal)
    with pytest.raises(ValueError, match="shape"):
        decode(ScriptedModel(conf, target, block_size=7), scripted_prefix(2), config, categorical=categorical[:7])
    with pytest.raises(TypeError, match="boolean"):
        decode(ScriptedModel(conf, target, block_size=7), scripted_prefix(2), config, categorical=categorical.long())
