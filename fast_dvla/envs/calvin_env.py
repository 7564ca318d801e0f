"""CALVIN through a user's checkout of ``calvin_env`` (pybullet), headless on the CPU.

``calvin_env`` is on no package registry. A user installs it from a checkout::

    git clone https://github.com/mees/calvin_env.git
    pip install -e calvin_env            # editable: it finds its data/ beside its code
    pip install "fast-dvla[calvin]"      # pybullet and the libraries calvin_env imports

(``--recursive`` is not needed: the tactile-sensor submodule is never used
here.) Instead of installing it, the checkout's path can be given as
``calvin_path=`` or in ``FAST_DVLA_CALVIN_ENV``.

:class:`CalvinEnv` builds CALVIN's evaluation scene (``calvin_scene_D``, the
Panda with the longer fingers, the static and gripper cameras) from the
checkout's own YAML files, without the CALVIN dataset and without Hydra's
command-line composition; TinyRenderer renders on the CPU. It converts
observations into the policy observation and the policy's actions into
calvin_env's relative actions. The policy observation (the contract with every
policy)::

    {"images": {"static": uint8 [H, W, 3], "gripper": uint8 [H, W, 3]},
     "state": float32 [8],   # tcp position 3, tcp euler xyz 3, gripper opening width, gripper command
     "instruction": str}

Actions are 7-D in [-1, 1]: tcp position delta (x 0.02 m), tcp euler delta
(x 0.05 rad), gripper (> 0 open -> +1, otherwise close -> -1), CALVIN's
``rel_actions`` convention. Success of a subtask comes from calvin_env's task
oracle (``Tasks`` with ``new_playtable_tasks.yaml``) comparing the scene at
the subtask's start with the scene now.

calvin_env's snags are handled here, without editing the checkout: its
environment logs the checkout's git commit on construction and fails outside a
git checkout (a downloaded archive, a vendored copy); here the lookup falls
back to ``"unknown"``.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np

CAMERAS = ("static", "gripper")
STATE_DIM = 8
ACTION_DIM = 7
SCENE = "calvin_scene_D"  # CALVIN's evaluation scene (ABCD->D and ABC->D evaluate on D)
ROBOT = "panda_longer_finger"
TASKS_FILE = "new_playtable_tasks.yaml"
NATIVE_SIZE = {"static": 200, "gripper": 84}  # what CALVIN's own policies see
ENV_VAR = "FAST_DVLA_CALVIN_ENV"
INSTALL_HINT = ("calvin_env is not installed. It is on no package registry: "
                "git clone https://github.com/mees/calvin_env.git && pip install -e calvin_env "
                "&& pip install 'fast-dvla[calvin]' (or pass the checkout's path as --calvin-env / "
                f"calvin_path=, or set {ENV_VAR})")


def import_calvin_env(calvin_path: str | os.PathLike | None = None):
    """The ``calvin_env`` package: installed, or from the checkout at ``calvin_path`` / ``$FAST_DVLA_CALVIN_ENV``."""
    path = calvin_path or os.environ.get(ENV_VAR)
    if path:
        root = Path(path).expanduser().resolve()
        if not (root / "calvin_env" / "__init__.py").is_file():
            raise FileNotFoundError(f"{root} is not a calvin_env checkout (no calvin_env/__init__.py in it)")
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    try:
        import calvin_env
        import pybullet  # noqa: F401  (the simulator; imported here so that its absence gets the hint)
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} [{err}]") from err
    return calvin_env


def checkout_root(calvin_env_module) -> Path:
    """The checkout folder holding ``conf/`` and ``data/`` beside the package."""
    root = Path(calvin_env_module.__file__).resolve().parents[1]
    for sub in ("conf", "data"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"calvin_env at {root} has no {sub}/ folder: install it from a checkout "
                                    "with pip install -e (a non-editable install leaves conf/ and data/ behind)")
    return root


def _tolerate_missing_git(play_table_env) -> None:
    original = play_table_env.get_git_commit_hash
    if getattr(original, "_fast_dvla_tolerant", False):
        return

    def commit_or_unknown(repo_path):
        try:
            return original(repo_path)
        except Exception:  # not a git checkout, or gitpython absent: the hash is only logged
            return "unknown"

    commit_or_unknown._fast_dvla_tolerant = True
    play_table_env.get_git_commit_hash = commit_or_unknown


def env_config(root: Path, camera_sizes: dict[str, int]):
    """calvin_env's environment config assembled from its YAML files (what its Hydra defaults would compose)."""
    from omegaconf import OmegaConf

    conf = root / "conf"

    def load(rel):
        return OmegaConf.load(conf / rel)

    robot = OmegaConf.merge(load("robot/panda.yaml"), load(f"robot/{ROBOT}.yaml"))
    robot.pop("defaults", None)
    cameras = {}
    for name in CAMERAS:
        cam = load(f"cameras/cameras/{name}.yaml")
        cam.width = cam.height = int(camera_sizes[name])
        cameras[name] = cam
    cfg = OmegaConf.create({"data_path": str(root / "data"), "use_vr": False, "robot": robot,
                            "scene": load(f"scene/{SCENE}.yaml"), "cameras": cameras})
    cfg.env = load("env/play_table_env.yaml")
    OmegaConf.resolve(cfg)
    return cfg.env, load(f"tasks/{TASKS_FILE}")


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Area-averaged (antialiased) resize of a uint8 [H, W, 3] image to [size, size, 3]."""
    import torch
    import torch.nn.functional as F

    image = np.asarray(image)
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image, dtype=np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def policy_state(robot_obs: np.ndarray) -> np.ndarray:
    """The policy's 8-D state from calvin_env's 15-D ``robot_obs`` (euler observations)."""
    robot_obs = np.asarray(robot_obs, dtype=np.float64)
    if robot_obs.shape != (15,):
        raise ValueError(f"robot_obs must have 15 entries (tcp pos 3, euler 3, width, 7 joints, gripper "
                         f"command), got shape {robot_obs.shape}")
    return np.concatenate([robot_obs[:7], robot_obs[14:15]]).astype(np.float32)


def policy_observation(raw: dict, instruction: str, image_size: int | None) -> dict:
    """The policy observation of a calvin_env observation dictionary (``rgb_obs``, ``robot_obs``)."""
    images = {}
    if image_size is not None:
        rgb = raw.get("rgb_obs", {})
        for cam in CAMERAS:
            key = f"rgb_{cam}"
            if key not in rgb:
                raise KeyError(f"observation has no {key!r} image (has {sorted(rgb)})")
            images[cam] = resize_image(rgb[key], image_size)
    return {"images": images, "state": policy_state(raw["robot_obs"]), "instruction": instruction}


def env_action(action) -> np.ndarray:
    """calvin_env's relative action from the policy's 7-D action: clipped, the gripper made binary (+1 open)."""
    action = np.asarray(action, dtype=np.float64)
    if action.shape != (ACTION_DIM,):
        raise ValueError(f"CALVIN takes a 7-D action (dpos 3, deuler 3, gripper), got shape {action.shape}")
    if not np.isfinite(action).all():
        raise ValueError(f"action contains NaN or inf: {action}")
    out = np.clip(action, -1.0, 1.0)
    out[6] = 1.0 if action[6] > 0 else -1.0
    return out


class CalvinEnv:
    """CALVIN's evaluation scene with its task oracle.

    ``reset(robot_obs, scene_obs)`` sets a state (see
    :func:`fast_dvla.envs.calvin_protocol.initial_scene`); ``start_subtask``
    records the scene the oracle compares against; ``step(action)`` returns
    ``(obs, info)`` with ``info["success"]`` for the current subtask.
    ``image_size=None`` renders nothing (for scripted experts, faster);
    ``camera_size="policy"`` (default) renders each camera directly at
    ``image_size``, ``"native"`` at CALVIN's sizes (200 / 84) and resizes.
    """

    def __init__(self, image_size: int | None = 64, camera_size: str = "policy",
                 calvin_path: str | os.PathLike | None = None, seed: int = 0):
        if image_size is not None and int(image_size) < 8:
            raise ValueError(f"image_size must be >= 8 or None, got {image_size}")
        if camera_size not in ("policy", "native"):
            raise ValueError(f"camera_size must be 'policy' or 'native', got {camera_size!r}")
        calvin_env = import_calvin_env(calvin_path)
        root = checkout_root(calvin_env)
        # gym prints a deprecation notice and hydra warns about its decorator on import: noise, not problems
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            play_table_env = importlib.import_module("calvin_env.envs.play_table_env")
        _tolerate_missing_git(play_table_env)
        import hydra.utils

        self.image_size = None if image_size is None else int(image_size)
        if self.image_size is not None and camera_size == "policy":
            sizes = {cam: self.image_size for cam in CAMERAS}
        else:
            sizes = dict(NATIVE_SIZE)
        env_cfg, tasks_cfg = env_config(root, sizes)
        if self.image_size is None:
            env_cfg.cameras = {}
        with contextlib.redirect_stdout(io.StringIO()):  # pybullet prints its renderer banner
            self.env = hydra.utils.instantiate(env_cfg, show_gui=False, use_vr=False, use_scene_info=True,
                                               use_egl=False, seed=seed)
        self.oracle = hydra.utils.instantiate(tasks_cfg)
        self.raw_obs: dict = {}
        self.subtask: str | None = None
        self.instruction = ""
        self._start_info = None

    @property
    def subtasks(self) -> list[str]:
        """The 34 subtask names the oracle knows."""
        return list(self.oracle.tasks)

    def reset(self, robot_obs=None, scene_obs=None) -> dict:
        """The scene and robot set to ``robot_obs``/``scene_obs`` (defaults: calvin_env's), with nothing
        carried over from the previous episode: calvin_env's own reset leaves the robot's gripper
        command and the buttons' last-pressed flags as the previous episode left them, so the
        first observation (its gripper-command entry) and a press at the first step depended on
        what ran before; here they follow ``robot_obs`` and the reset scene."""
        if robot_obs is not None and np.shape(robot_obs) != (15,):
            raise ValueError(f"robot_obs must have 15 entries (calvin_env's robot_obs), got shape {np.shape(robot_obs)}")
        robot = self.env.robot
        robot.gripper_action = 1 if robot_obs is None or float(np.asarray(robot_obs)[14]) > 0 else -1
        self.raw_obs = self.env.reset(robot_obs=robot_obs, scene_obs=scene_obs)
        for button in self.env.scene.buttons:
            button.prev_is_pressed = button._is_pressed
        self.subtask, self._start_info = None, None
        return self.observation()

    def start_subtask(self, subtask: str, instruction: str) -> dict:
        """Begin ``subtask`` from the current scene (the oracle's reference point) and return the observation."""
        if subtask not in self.oracle.tasks:
            raise ValueError(f"unknown CALVIN subtask {subtask!r}; the oracle knows {sorted(self.oracle.tasks)}")
        if not self.raw_obs:
            raise RuntimeError("call reset() before start_subtask()")
        self.subtask, self.instruction = subtask, instruction
        self._start_info = self.env.get_info()
        return self.observation()

    def step(self, action) -> tuple[dict, dict]:
        if not self.raw_obs:
            raise RuntimeError("call reset() before step()")
        self.raw_obs, _, _, info = self.env.step(env_action(action))
        info = dict(info)
        info["success"] = self.subtask is not None and self.subtask in self.completed(info, {self.subtask})
        return self.observation(), info

    def completed(self, info: dict | None = None, subtasks=None) -> set[str]:
        """Subtasks the oracle sees done since ``start_subtask`` (all 34 unless ``subtasks`` is given)."""
        if self._start_info is None:
            raise RuntimeError("call start_subtask() first")
        info = self.env.get_info() if info is None else info
        if subtasks is None:
            return set(self.oracle.get_task_info(self._start_info, info))
        return set(self.oracle.get_task_info_for_set(self._start_info, info, set(subtasks)))

    def scene_info(self) -> dict:
        """calvin_env's privileged scene description (object poses, joint states, lights) for scripted experts."""
        return self.env.get_info()

    def observation(self) -> dict:
        return policy_observation(self.raw_obs, self.instruction, self.image_size)

    def close(self) -> None:
        env, self.env = getattr(self, "env", None), None
        if env is None:
            return
        with contextlib.redirect_stdout(io.StringIO()):  # calvin_env prints on disconnecting
            with contextlib.suppress(Exception):
                env.close()
            env.cid = -1  # its __del__ would disconnect a second time and fail noisily
            del env  # ... and print: let it run here

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
