"""The teacher decoded left to right (eval/decode_order.py): block order, bidirectional attention."""
import numpy as np
import pytest
import torch

from fast_dvla import DecodeConfig
from fast_dvla.decoding.common import WindowForward
from fast_dvla.decoding.pipelined import decode_pipelined
from fast_dvla_eval.decode_order import LeftToRightPolicy, decode_left_to_right
from fast_dvla.masks import BIDIRECTIONAL, BLOCK_CAUSAL
from helpers import random_prefix, tiny_model
from test_policy import make_policy, obs


def test_left_to_right_commits_block_by_block_under_bidirectional_attention():
    model = tiny_model(1, sharpness=4.0)
    prefix = random_prefix(model, 2, seed=3)
    B, P, L, k = prefix.shape[0], prefix.shape[1], model.chunk_len, model.block_size
    trace = []
    result = decode_left_to_right(model, prefix, DecodeConfig(tau_conf=0.9), trace=trace)
    assert bool((result.tokens != model.mask_token_id).all())
    assert result.stats.query_tokens == result.stats.nfe * (P + L)  # uncached: the whole sequence every time
    for step in trace:  # a block commits only once every earlier block is complete
        done = step["committed"].view(B, -1, k)
        started = done.any(-1)
        complete = done.all(-1)
        earlier_complete = torch.cat([torch.ones(B, 1, dtype=torch.bool), complete[:, :-1].cumprod(1).bool()], 1)
        assert bool((~started | earlier_complete).all())
    # the first forward saw [prefix | all MASK] with bidirectional attention, not block-causal
    masked = torch.full((B, L), model.mask_token_id)
    forward = WindowForward(model, prefix, None)
    with torch.no_grad():
        bidirectional = forward(masked, 0, P + L, BIDIRECTIONAL, use_cache=False)[:, :k]
        causal = forward(masked, 0, P + L, BLOCK_CAUSAL, use_cache=False)[:, :k]
    assert torch.allclose(trace[0]["logits"], bidirectional, atol=1e-5)
    assert not torch.allclose(trace[0]["logits"], causal, atol=1e-3)


def test_left_to_right_policy_returns_a_chunk():
    base = make_policy()
    policy = LeftToRightPolicy(base.model, base.action_tokenizer, base.state_norm)
    chunk = policy.predict_action_chunk(obs())
    assert chunk.shape == (4, 7) and np.isfinite(chunk).all()
    assert policy.last_stats.nfe >= base.model.num_blocks


def test_the_attention_a_decoder_may_be_given_is_validated():
    """The pipelined order takes the student's or the teacher's mask, and the teacher's only
    uncached: no cache is exact for a bidirectional model."""
    model = tiny_model(1, sharpness=4.0)
    prefix = random_prefix(model, 1, seed=3)
    for bad in ("token_causal", "causal"):
        with pytest.raises(ValueError, match="attention"):
            decode_pipelined(model, prefix, DecodeConfig(use_cache=False), attention=bad)
    with pytest.raises(ValueError, match="use_cache=False"):
        decode_pipelined(model, prefix, DecodeConfig(), attention=BIDIRECTIONAL)
    student = decode_pipelined(model, prefix, DecodeConfig(tau_conf=0.9), attention=BLOCK_CAUSAL)
    assert torch.equal(student.tokens, decode_pipelined(model, prefix, DecodeConfig(tau_conf=0.9)).tokens)
