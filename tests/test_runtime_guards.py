"""Guards at run time: non-finite logits stop a decode, the instruction has a
contract, and the action queue keeps the batch it was filled for."""
import warnings

import numpy as np
import pytest
import torch

from fast_dvla import ActionTokenizer, DecodeConfig, FastDVLAPolicy
from fast_dvla.decoding import DECODERS, NonFiniteLogitsError, decode, max_nfe
from fast_dvla.processor import InstructionWarning, StateNormalizer
from helpers import random_prefix, tiny_model


def nan_weight_model():
    """A tiny model with one NaN in an MLP weight: every forward's logits are NaN."""
    model = tiny_model(0, sharpness=8.0)
    with torch.no_grad():
        model.backbone.decoder.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    return model


def nan_action_embedding_model():
    """A tiny model whose every action bin embeds as NaN ([MASK] is finite): the first forward,
    all [MASK], is finite; the next, which sees a committed token, is not."""
    model = tiny_model(0, sharpness=8.0)
    with torch.no_grad():
        model.action_embed.weight[:model.mask_token_id] = float("nan")
    return model


def bounded(model, config):
    """Fails a decode that runs past its NFE bound (NaN confidences could keep it from ending)."""
    limit, calls = max_nfe(model, config), []

    def count(module, args):
        calls.append(1)
        if len(calls) > limit:
            raise AssertionError(f"{config.method} ran past its bound of {limit} forwards")
    model.backbone.register_forward_pre_hook(count)
    return model


@pytest.mark.parametrize("method", list(DECODERS))
def test_nan_weight_stops_every_decoder(method):
    config = DecodeConfig(method=method)
    model = bounded(nan_weight_model(), config)
    prefix = random_prefix(model, 1)  # the NaN is in the backbone: the prefix is finite
    with pytest.raises(NonFiniteLogitsError, match=rf"method '{method}': forward 0 \(query positions \[0, ") as err:
        decode(model, prefix, config)
    assert isinstance(err.value, FloatingPointError) and err.value.forward == 0


@pytest.mark.parametrize("method", ["vanilla", "fast_dvla"])
def test_error_names_the_first_nonfinite_forward(method):
    config = DecodeConfig(method=method)
    model = bounded(nan_action_embedding_model(), config)
    with pytest.raises(NonFiniteLogitsError, match="forward 1 ") as err:
        decode(model, random_prefix(model, 1), config)
    start, end = err.value.window
    assert err.value.decoder == method and 0 <= start < end <= model.prefix_len + model.chunk_len


@pytest.mark.parametrize("method", ["fast_dvla", "vanilla_cached"])
def test_finite_decode_is_unchanged(method):
    model, config = tiny_model(0, sharpness=8.0), DecodeConfig(method=method)
    prefix = random_prefix(model, 2)
    cached, full = decode(model, prefix, config), decode(model, prefix, config.replace(use_cache=False))
    assert torch.equal(cached.tokens, full.tokens) and cached.stats.nfe <= max_nfe(model, config)


def make_policy(model=None, **kw):
    rng = np.random.default_rng(0)
    tok = ActionTokenizer.fit(rng.uniform(-1, 1, (200, 7)), gripper_dims=(6,))
    return FastDVLAPolicy(model or tiny_model(0, sharpness=8.0), tok, StateNormalizer.fit(rng.normal(size=(50, 8))),
                          **kw)


def obs(batch=None, instruction="put the soup in the basket"):
    rng = np.random.default_rng(0)
    shape = (16, 16, 3) if batch is None else (batch, 16, 16, 3)
    return {"images": {c: rng.integers(0, 255, shape, dtype=np.uint8) for c in ("agentview", "wrist")},
            "state": rng.normal(size=(8,) if batch is None else (batch, 8)).astype(np.float32),
            "instruction": instruction if batch is None else [instruction] * batch}


def test_policy_with_a_nan_weight_raises_instead_of_acting():
    policy = make_policy(bounded(nan_weight_model(), DecodeConfig()))
    with pytest.raises(NonFiniteLogitsError, match="fast_dvla"):
        policy.select_action(obs())
    assert policy.needs_chunk  # nothing was queued


@pytest.mark.parametrize("instruction,received", [
    (None, "NoneType"), (3, "int"), ([], "empty list"), (["put the soup", 3], r"\[1\] must be a str, got int"),
])
def test_instruction_of_the_wrong_type_is_named(instruction, received):
    o = obs()
    o["instruction"] = instruction
    with pytest.raises(ValueError, match=rf"obs\['instruction'\].*{received}"):
        make_policy().predict_action_chunk(o)


def test_instructions_must_match_the_batch():
    o = obs(batch=3)
    o["instruction"] = o["instruction"][:2]
    with pytest.raises(ValueError, match=r"obs\['instruction'\] has 2 strings but obs\['state'\] a batch of 3"):
        make_policy().predict_action_chunk(o)


def instruction_warnings(policy, *instructions):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for text in instructions:
            assert np.isfinite(policy.predict_action_chunk(obs(instruction=text))).all()  # still acted on
    return [str(w.message) for w in caught if issubclass(w.category, InstructionWarning)]


@pytest.mark.parametrize("instruction,reason", [
    ("", "empty"), ("   ", "empty"), ("把汤放进篮子", "no letter or digit"), ("put the soupé away", "drops 'é'"),
])
def test_unread_instruction_warns(instruction, reason):
    messages = instruction_warnings(make_policy(), instruction)
    assert len(messages) == 1 and reason in messages[0] and "obs['instruction']" in messages[0]


def test_each_reason_warns_once_per_policy():
    policy = make_policy()
    assert len(instruction_warnings(policy, "", " ", "")) == 1
    assert len(instruction_warnings(policy, "把汤", "")) == 1  # a new reason warns, the old one no more
    assert len(instruction_warnings(make_policy(), "")) == 1   # a new policy warns again


def test_readable_instruction_does_not_warn():
    assert instruction_warnings(make_policy(), "Put the soup in the basket, please!") == []


def test_queue_refuses_another_batch_size_until_reset():
    policy = make_policy(n_action_steps=2)
    assert policy.select_action(obs(batch=2)).shape == (2, 7)
    queued_for_two = r"obs is a single observation, but the queued actions are for a batch of 2; call policy.reset"
    with pytest.raises(ValueError, match=queued_for_two):
        policy.select_action(obs())
    policy.reset()
    assert policy.select_action(obs()).shape == (7,)
    with pytest.raises(ValueError, match="reset"):
        policy.select_action(obs(batch=1))
    assert policy.select_action(obs()).shape == (7,)  # the same batch is still served from the queue
