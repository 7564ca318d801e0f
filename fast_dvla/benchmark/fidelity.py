"""Open-loop fidelity: how closely a policy's chunks match demonstrated chunks,
frame by frame, per action dimension (exact tokens, absolute error, gripper sign)."""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from ..config import DecodeConfig
from ..policy import FastDVLAPolicy


def decode_config(policy: FastDVLAPolicy, method: str, tau_conf: float | None = None) -> DecodeConfig:
    """The policy's own settings with ``method``, and ``tau_conf`` when given (validated)."""
    return policy.decode_config_for(method).replace(**({} if tau_conf is None else {"tau_conf": tau_conf}))


def measure(policy: FastDVLAPolicy, frames, method: str, progress: bool = True, tau_conf: float | None = None) -> dict:
    """``tau_conf``: decode with this threshold instead of the policy's own."""
    tok = policy.action_tokenizer
    config = decode_config(policy, method, tau_conf)
    grip = list(tok.gripper_dims)
    hits, errors, grip_wrong, nfe, query = [], [], [], [], []
    for obs, demo in tqdm(frames, desc=f"fidelity {method} tau_conf={config.tau_conf}", disable=not progress):
        pred = policy.predict_action_chunk(obs, config)
        nfe.append(policy.last_stats.nfe)
        query.append(policy.last_stats.query_tokens)
        hits.append(tok.encode(pred) == tok.encode(demo))
        errors.append(np.abs(pred - demo))
        grip_wrong.append(np.sign(pred[:, grip]) != np.sign(demo[:, grip]))
    hits, errors = np.concatenate(hits), np.concatenate(errors)
    return {"method": method, "tau_conf": config.tau_conf, "frames": len(frames),
            "nfe": float(np.mean(nfe)), "query_tokens": float(np.mean(query)),
            "token_accuracy": float(hits.mean()),
            "token_accuracy_per_dim": hits.mean(0).round(4).tolist(),
            "mae_per_dim": errors.mean(0).round(4).tolist(), "position_mae": float(errors[:, :3].mean()),
            "gripper_wrong": float(np.mean(grip_wrong)) if tok.gripper_dims else None}
