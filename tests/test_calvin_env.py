"""The CALVIN adapter: conversions on a recorded calvin_env observation (always), the simulator (when
calvin_env is installed; skipped otherwise, naming what is missing)."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from fast_dvla.envs import calvin_env as ce
from fast_dvla.envs import calvin_protocol as protocol

GOLDEN = Path(__file__).parent / "golden" / "calvin_observation.npz"  # scripts/goldens/calvin_observation.py
HAVE_CALVIN = importlib.util.find_spec("calvin_env") is not None and importlib.util.find_spec("pybullet") is not None
needs_calvin = pytest.mark.skipif(not HAVE_CALVIN, reason="calvin_env is not installed (a checkout: "
                                  "pip install -e calvin_env; see fast_dvla/envs/calvin_env.py)")


def recorded():
    d = np.load(GOLDEN)
    return {"rgb_obs": {"rgb_static": d["rgb_static"], "rgb_gripper": d["rgb_gripper"]},
            "robot_obs": d["robot_obs"], "scene_obs": d["scene_obs"]}


def test_policy_observation_of_a_recorded_observation():
    raw = recorded()
    obs = ce.policy_observation(raw, "open the drawer", image_size=64)
    assert set(obs) == {"images", "state", "instruction"} and obs["instruction"] == "open the drawer"
    assert set(obs["images"]) == set(ce.CAMERAS)
    for cam, img in obs["images"].items():
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        native = raw["rgb_obs"][f"rgb_{cam}"].astype(np.float64)
        # an area-weighted resize keeps the mean colour and the coarse layout (not flipped or transposed)
        assert abs(img.mean() - native.mean()) < 2.0
        quarters = lambda a: [a[: a.shape[0] // 2].mean(), a[a.shape[0] // 2:].mean(),  # noqa: E731
                              a[:, : a.shape[1] // 2].mean(), a[:, a.shape[1] // 2:].mean()]
        np.testing.assert_allclose(quarters(img.astype(np.float64)), quarters(native), atol=3.0)
    robot = raw["robot_obs"]
    np.testing.assert_allclose(obs["state"], np.concatenate([robot[:7], robot[14:]]).astype(np.float32))
    assert obs["state"].dtype == np.float32 and obs["state"][-1] == -1.0  # the recorded gripper command: close
    assert ce.policy_observation(raw, "x", image_size=None)["images"] == {}


def test_resize_is_exact_on_flat_images_and_identity_at_size():
    flat = np.full((84, 84, 3), 37, np.uint8)
    assert (ce.resize_image(flat, 32) == 37).all()
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert ce.resize_image(img, 64) is not None and (ce.resize_image(img, 64) == img).all()


def test_bad_observations_are_refused_by_name():
    raw = recorded()
    with pytest.raises(ValueError, match="15 entries"):
        ce.policy_state(raw["robot_obs"][:8])
    del raw["rgb_obs"]["rgb_gripper"]
    with pytest.raises(KeyError, match="rgb_gripper"):
        ce.policy_observation(raw, "x", image_size=64)


def test_env_action_conversion():
    out = ce.env_action([2.0, -3.0, 0.5, 0.0, 0.1, -0.1, 0.2])
    np.testing.assert_allclose(out, [1.0, -1.0, 0.5, 0.0, 0.1, -0.1, 1.0])
    assert ce.env_action([0, 0, 0, 0, 0, 0, -0.01])[6] == -1.0
    assert ce.env_action([0, 0, 0, 0, 0, 0, 0.0])[6] == -1.0  # no command to open: close (binary)
    with pytest.raises(ValueError, match="7-D"):
        ce.env_action([0.0] * 6)
    with pytest.raises(ValueError, match="NaN"):
        ce.env_action([np.nan, 0, 0, 0, 0, 0, 1])


def test_absent_calvin_env_names_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "calvin_env", None)  # import calvin_env raises ImportError
    monkeypatch.delenv(ce.ENV_VAR, raising=False)
    with pytest.raises(ImportError, match="git clone https://github.com/mees/calvin_env.git"):
        ce.import_calvin_env()
    with pytest.raises(FileNotFoundError, match="not a calvin_env checkout"):
        ce.import_calvin_env(tmp_path)


@needs_calvin
def test_scene_resets_to_calvins_initial_scenes():
    with ce.CalvinEnv(image_size=None) as env:
        for condition, _ in protocol.official_chains(40)[::8]:
            robot, scene = protocol.initial_scene(condition)
            env.reset(robot, scene)
            got = env.raw_obs["scene_obs"]
            np.testing.assert_allclose(got[:2], scene[:2], atol=1e-3)  # slider, drawer
            np.testing.assert_allclose(got[4:6], scene[4:6])  # lightbulb, led
            for b in range(3):  # block positions (they settle by a millimetre or so)
                np.testing.assert_allclose(got[6 + 6 * b: 9 + 6 * b], scene[6 + 6 * b: 9 + 6 * b], atol=5e-3)
            np.testing.assert_allclose(env.raw_obs["robot_obs"][:3], robot[:3], atol=1e-3)


@needs_calvin
def test_rendered_observation_matches_the_policy_contract_and_the_recorded_one():
    condition, _ = protocol.official_chains(1)[0]
    with ce.CalvinEnv(image_size=64, camera_size="native") as env:
        env.reset(*protocol.initial_scene(condition))
        obs = env.start_subtask("open_drawer", protocol.INSTRUCTIONS["open_drawer"])
        assert obs["instruction"] == "pull the handle to open the drawer"
        for _ in range(5):
            obs, info = env.step(np.array([0.3, -0.2, -0.4, 0.0, 0.0, 0.2, -1.0]))
        assert info["success"] is False
        golden = recorded()
        # the simulator is deterministic: the steps of scripts/goldens/calvin_observation.py again
        np.testing.assert_allclose(env.raw_obs["robot_obs"], golden["robot_obs"], atol=1e-6)
        np.testing.assert_array_equal(env.raw_obs["rgb_obs"]["rgb_static"], golden["rgb_obs"]["rgb_static"])


@needs_calvin
def test_an_episode_repeats_exactly_after_another_in_the_same_process():
    """A benchmark runs many chains in one environment: the second run of an episode must see what the
    first saw. calvin_env's own reset keeps the previous episode's gripper command (checked first, so
    that this test would catch the leak), which changed the policy's first observation."""
    condition, _ = protocol.official_chains(1)[0]
    robot, scene = protocol.initial_scene(condition)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(12, 7))
    actions[:, 6] = np.where(np.arange(12) < 6, 1.0, -1.0)  # ends with the gripper closed

    with ce.CalvinEnv(image_size=32) as env:
        def episode():
            obs = env.reset(robot, scene)
            seen = [(obs["state"], obs["images"]["static"], obs["images"]["gripper"])]
            for a in actions:
                obs, _ = env.step(a)
                seen.append((obs["state"], obs["images"]["static"], obs["images"]["gripper"]))
            return seen

        first = episode()
        assert env.raw_obs["robot_obs"][14] == -1
        assert env.env.reset(robot_obs=robot, scene_obs=scene)["robot_obs"][14] == -1  # calvin_env's leak
        second = episode()
    assert first[0][0][7] == 1.0
    for step, (a, b) in enumerate(zip(first, second)):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y, err_msg=f"step {step}")
    with pytest.raises(ValueError, match="robot_obs must have 15"):
        with ce.CalvinEnv(image_size=None) as env:
            env.reset(robot[:8], scene)


@needs_calvin
def test_oracle_reports_a_subtask_only_after_it_happens():
    cond = next(c for c in protocol.initial_conditions() if c["drawer"] == "closed")
    with ce.CalvinEnv(image_size=None) as env:
        robot, scene = protocol.initial_scene(cond)
        env.reset(robot, scene)
        env.start_subtask("open_drawer", protocol.INSTRUCTIONS["open_drawer"])
        _, info = env.step(np.zeros(7) + [0, 0, 0, 0, 0, 0, 1])
        assert info["success"] is False and env.completed() == set()
        opened = scene.copy()
        opened[1] = 0.2  # the drawer pulled out by 20 cm (the oracle's threshold is 12)
        env.env.scene.reset(opened)  # moved by hand, as a stand-in for a policy
        _, info = env.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))
        assert info["success"] is True and "open_drawer" in env.completed()


@needs_calvin
def test_recorded_chains_are_valid_episodes_and_resume(tmp_path):
    from fast_dvla.data import list_episodes, read_dataset_info, read_episode
    from fast_dvla.envs.calvin_expert import COVERED
    from fast_dvla.envs.calvin_recorder import record_chains

    out = str(tmp_path / "demos")
    report = record_chains(out, 2, seed=0, image_size=16, action_noise=0.1)
    assert report["chains"] == 2 and not report["errors"]
    info = read_dataset_info(out)
    assert info["cameras"] == list(ce.CAMERAS) and info["image_size"] == [16, 16]
    files = list_episodes(out)
    assert len(files) == report["demonstrations"] == sum(r["successes"] for r in report["subtasks"]) >= 2
    for path in files:
        ep = read_episode(path, info)
        assert protocol.SUBTASKS[int(ep["task_id"])] in COVERED
        assert str(ep["instruction"]) == protocol.INSTRUCTIONS[protocol.SUBTASKS[int(ep["task_id"])]]
        assert 1 <= len(ep["action"]) <= protocol.STEPS_PER_SUBTASK
        assert set(np.unique(ep["action"][:, 6])) <= {-1.0, 1.0}
    again = record_chains(out, 2, seed=0, image_size=16, action_noise=0.1)  # nothing left to do
    assert again["demonstrations"] == report["demonstrations"]
    with pytest.raises(ValueError, match="other settings"):
        record_chains(out, 2, seed=1, image_size=16)
