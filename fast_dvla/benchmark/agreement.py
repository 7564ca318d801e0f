"""How often a decoder writes the same action tokens as the teacher's own decoding."""
from __future__ import annotations

import numpy as np

from ..config import DecodeConfig
from ..policy import FastDVLAPolicy
from .throughput import policy_for


def decoded_chunk(policy: FastDVLAPolicy, obs: dict, config: DecodeConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(actions [horizon, dim], their tokens)`` of the chunk ``policy`` decodes for ``obs`` with ``config``."""
    actions = policy.predict_action_chunk(obs, config)
    # the model's own actions -> bins (the reference: its action tokenizer), shaped as the actions
    return actions, policy.io.actions_to_bins(actions[None])[0].reshape(actions.shape)


def chunk_tokens(policy: FastDVLAPolicy, obs: dict, config: DecodeConfig) -> np.ndarray:
    """The action tokens of the chunk ``policy`` decodes for ``obs`` with ``config``."""
    return decoded_chunk(policy, obs, config)[1]


def token_agreement(teacher: FastDVLAPolicy, student: FastDVLAPolicy, observations: list[dict],
                    configs: dict, methods, reference: DecodeConfig) -> dict:
    """``{method: share of action tokens equal to the teacher's decoding with reference}``."""
    ref = [chunk_tokens(teacher, o, reference) for o in observations]
    out = {}
    for m in methods:
        policy = policy_for(m, teacher, student)
        same = [np.mean(chunk_tokens(policy, o, configs[m]) == r) for o, r in zip(observations, ref)]
        out[m] = float(np.mean(same))
    return out
