"""A recorded calvin_env observation, for the adapter's conversion tests where calvin_env is absent.

    python scripts/goldens/calvin_observation.py      # needs calvin_env (see fast_dvla.envs.calvin_env)

Builds CALVIN's evaluation scene at its native camera sizes, resets it to the
initial scene of CALVIN's first official chain, takes a few steps of a fixed
action, and writes calvin_env's observation dictionary (``rgb_obs``,
``robot_obs``, ``scene_obs``) to ``tests/golden/calvin_observation.npz``.
"""
from pathlib import Path

import numpy as np

from fast_dvla.envs import calvin_protocol as protocol
from fast_dvla.envs.calvin_env import CalvinEnv

OUT = Path(__file__).resolve().parents[2] / "tests" / "golden" / "calvin_observation.npz"


def main():
    condition, chain = protocol.official_chains(1)[0]
    with CalvinEnv(image_size=64, camera_size="native") as env:
        env.reset(*protocol.initial_scene(condition))
        for _ in range(5):
            env.step(np.array([0.3, -0.2, -0.4, 0.0, 0.0, 0.2, -1.0]))
        raw = env.raw_obs
        np.savez_compressed(OUT, rgb_static=raw["rgb_obs"]["rgb_static"], rgb_gripper=raw["rgb_obs"]["rgb_gripper"],
                            robot_obs=raw["robot_obs"], scene_obs=raw["scene_obs"])
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
