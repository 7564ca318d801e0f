"""The shipped CALVIN reference policies on held-out recorded frames (no simulator needed):
they load, decode every frame with every decoder, the student's cached decoding equals its
uncached one, and both policies predict the expert's chunks better than the demonstrations'
mean action does (frames: scripts/goldens/calvin_frames.py, chains of a seed used neither in
training nor in the benchmark)."""
from pathlib import Path

import numpy as np
import pytest

from fast_dvla import FastDVLAPolicy
from fast_dvla.policy import reference_policy_dir

FRAMES = Path(__file__).parent / "golden" / "calvin_frames.npz"
SUITE = "calvin_D"


def frames():
    data = np.load(FRAMES)
    cameras = [k[len("image_"):] for k in data.files if k.startswith("image_")]
    return [({"images": {c: data[f"image_{c}"][i] for c in cameras}, "state": data["state"][i],
              "instruction": str(data["instruction"][i])}, data["action_chunk"][i])
            for i in range(len(data["state"]))]


@pytest.fixture(scope="module")
def policies():
    return {role: FastDVLAPolicy.from_pretrained(reference_policy_dir(role, SUITE)) for role in ("teacher", "student")}


def test_shipped_calvin_policies_fit_calvin(policies):
    for policy in policies.values():
        cfg = policy.model.config
        assert set(cfg.cameras) == {"static", "gripper"} and cfg.action_dim == 7 and cfg.state_dim == 8
    assert policies["student"].model.block_size == 14


@pytest.mark.parametrize("role,methods", [("teacher", ("vanilla", "fast_dllm")),
                                          ("student", ("fast_dvla", "block_diffusion", "vanilla_cached"))])
def test_every_decoder_decodes_recorded_frames(policies, role, methods):
    policy = policies[role]
    for obs, _ in frames()[:4]:
        for method in methods:
            config = policy.decode_config_for(method)
            chunk = policy.predict_action_chunk(obs, config)
            assert chunk.shape == (8, 7) and np.isfinite(chunk).all()
            assert set(np.unique(chunk[:, 6])) <= {-1.0, 1.0}  # the gripper is binary
            if role == "student":
                uncached = policy.predict_action_chunk(obs, config.replace(use_cache=False))
                assert np.array_equal(chunk, uncached), method


def test_policies_predict_the_expert_better_than_its_mean_action(policies):
    data = frames()
    demos = np.stack([chunk for _, chunk in data])
    baseline = np.abs(demos - demos.reshape(-1, 7).mean(0)).mean()
    for role, method in (("teacher", "vanilla"), ("student", "fast_dvla")):
        policy = policies[role]
        predicted = np.stack([policy.predict_action_chunk(obs, policy.decode_config_for(method)) for obs, _ in data])
        error = np.abs(predicted - demos).mean()
        assert error < 0.5 * baseline, (role, error, baseline)
