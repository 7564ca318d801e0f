"""Open-loop measurements of one decoder setting: speed against the teacher's
vanilla decoding timed on the same frames, and fidelity against the teacher's
tokens and the demonstrated actions.

Each setting's row is written as soon as it is measured (``SweepStore``), so
an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from tqdm import tqdm

from ..benchmark.agreement import decoded_chunk
from ..benchmark.timing import summarize, timed
from ..config import DecodeConfig
from ..policy import FastDVLAPolicy

TEACHER_ROW = "teacher vanilla"


def reference_tokens(teacher: FastDVLAPolicy, observations: list[dict], progress: bool = True) -> np.ndarray:
    """The teacher's vanilla tokens for every observation ``[N, horizon, dim]``: what agreement is against."""
    config = teacher.decode_config_for("vanilla")
    return np.stack([decoded_chunk(teacher, o, config)[1]
                     for o in tqdm(observations, desc="teacher reference", disable=not progress)])


def fidelity(policy: FastDVLAPolicy, config: DecodeConfig, observations: list[dict], reference: np.ndarray,
             demos: list[np.ndarray] | None, progress: bool = True, desc: str = "") -> dict:
    """Agreement with ``reference`` tokens and, with ``demos``, action error per dimension, exact-token
    accuracy and gripper sign errors; NFE and query tokens per chunk."""
    tok = policy.action_tokenizer
    grip = list(tok.gripper_dims)
    same, nfe, query, errors, hits, grip_wrong = [], [], [], [], [], []
    for i, obs in enumerate(tqdm(observations, desc=desc, leave=False, disable=not progress)):
        actions, tokens = decoded_chunk(policy, obs, config)
        nfe.append(policy.last_stats.nfe)
        query.append(policy.last_stats.query_tokens)
        same.append(tokens == reference[i])
        if demos is not None:
            errors.append(np.abs(actions - demos[i]))
            hits.append(tokens == tok.encode(demos[i]))
            if grip:
                grip_wrong.append(np.sign(actions[:, grip]) != np.sign(demos[i][:, grip]))
    row = {"nfe": float(np.mean(nfe)), "query_tokens": float(np.mean(query)),
           "teacher_agreement": float(np.mean(same))}
    if demos is not None:
        errors = np.concatenate(errors)
        row.update(mae=float(errors.mean()), mae_per_dim=errors.mean(0).round(5).tolist(),
                   token_accuracy=float(np.mean(np.concatenate(hits))),
                   gripper_wrong=float(np.mean(grip_wrong)) if grip else None)
    return row


def speed(policy: FastDVLAPolicy, config: DecodeConfig, teacher: FastDVLAPolicy, observations: list[dict],
          warmup: int = 2) -> dict:
    """Latency of ``config`` and of the teacher's vanilla decoding, interleaved frame by frame
    (drift hits both alike): median/p90 ms, action tokens/s, chunk and action Hz, ratio to vanilla."""
    vanilla = teacher.decode_config_for("vanilla")
    for _ in range(warmup):  # first calls pay for allocation and lazy init
        policy.predict_action_chunk(observations[0], config)
        teacher.predict_action_chunk(observations[0], vanilla)
    ours, theirs = [], []
    for obs in observations:
        theirs.append(timed(lambda: teacher.predict_action_chunk(obs, vanilla), policy.device)[1])
        ours.append(timed(lambda: policy.predict_action_chunk(obs, config), policy.device)[1])
    ours, theirs = summarize(ours), summarize(theirs)
    return speed_row(ours, policy) | {"speedup": theirs["median_s"] / ours["median_s"],
                                      "vanilla_latency_ms": theirs["median_s"] * 1e3}


def speed_row(latency: dict, policy: FastDVLAPolicy) -> dict:
    median = latency["median_s"]
    return {"latency_ms": median * 1e3, "p90_ms": latency["p90_s"] * 1e3,
            "tokens_per_s": policy.model.chunk_len / median, "chunk_hz": 1.0 / median,
            "action_hz": policy.n_action_steps / median}


def frames_fingerprint(observations: list[dict], demos: list[np.ndarray] | None) -> str:
    """A hash of the frames' states, instructions and demonstrated chunks: a resumed sweep must
    measure the same frames."""
    h = hashlib.sha1()
    for i, obs in enumerate(observations):
        h.update(np.asarray(obs["state"], np.float32).tobytes())
        h.update(str(obs["instruction"]).encode())
        if demos is not None:
            h.update(np.asarray(demos[i], np.float32).tobytes())
    return h.hexdigest()


class SweepStore:
    """One JSON file per finished setting under ``root/settings``, with the inputs that made it.
    A re-run skips settings already measured on the same inputs and refuses a folder made
    from other inputs (naming what differs), rather than mixing two sweeps in one table."""

    def __init__(self, root: str, inputs: dict):
        self.root, self.inputs = root, inputs
        os.makedirs(os.path.join(root, "settings"), exist_ok=True)
        path = os.path.join(root, "inputs.json")
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            differ = sorted(k for k in set(saved) | set(inputs) if saved.get(k) != inputs.get(k))
            if differ:
                raise ValueError(f"{root} holds a sweep of other inputs ({', '.join(differ)} differ): "
                                 f"choose another --out or delete it")
        else:
            self._write(path, inputs)

    def _path(self, name: str) -> str:
        safe = "".join(c if c.isalnum() or c in "=.,_-" else "_" for c in name)
        return os.path.join(self.root, "settings", safe + ".json")

    def get(self, name: str, config: dict) -> dict | None:
        """The saved row of setting ``name``, if it was measured with exactly ``config``."""
        path = self._path(name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            row = json.load(f)
        return row if row.get("config") == config else None

    def put(self, name: str, row: dict) -> None:
        self._write(self._path(name), row)

    def reference(self, compute) -> np.ndarray:
        """The teacher's reference tokens, computed by ``compute()`` once and kept."""
        path = os.path.join(self.root, "teacher_tokens.npy")
        if os.path.exists(path):
            return np.load(path, allow_pickle=False)
        tokens = compute()
        np.save(path + ".tmp.npy", tokens)
        os.replace(path + ".tmp.npy", path)
        return tokens

    @staticmethod
    def _write(path: str, payload: dict) -> None:
        tmp = path + ".tmp"  # a kill mid-write leaves the old file or none, never half of one
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)


def sweep(policy: FastDVLAPolicy, teacher: FastDVLAPolicy, configs: dict[str, DecodeConfig],
          observations: list[dict], demos: list[np.ndarray] | None, timing_frames: int,
          store: SweepStore | None = None, progress: bool = True, measure: bool = True) -> list[dict]:
    """One row per setting (the teacher's vanilla decoding first), each measured on the same
    observations: fidelity on all of them, speed on the first ``timing_frames``. ``measure=False``:
    only read the rows ``store`` holds, refusing if one is missing."""
    if not observations:
        raise ValueError("a sweep needs at least one observation")
    timing = observations[:max(1, timing_frames)]
    reference = None
    named = {TEACHER_ROW: (teacher, teacher.decode_config_for("vanilla"))}
    named.update({name: (policy, c) for name, c in configs.items()})
    rows = []
    bar = tqdm(named.items(), desc="settings", disable=not progress)
    for name, (p, config) in bar:
        bar.set_postfix_str(name)
        row = store.get(name, config.to_dict()) if store else None
        if row is None and not measure:
            raise ValueError(f"setting {name!r} is not measured yet in {store.root if store else 'memory'}")
        if row is None:
            if reference is None:
                def compute():
                    return reference_tokens(teacher, observations, progress)
                reference = store.reference(compute) if store else compute()
            row = {"setting": name, "config": config.to_dict()}
            row.update(fidelity(p, config, observations, reference, demos, progress, desc=name))
            row.update(speed(p, config, teacher, timing))
            if store:
                store.put(name, row)
        rows.append(row)
    return rows
