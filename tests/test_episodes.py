import os

import numpy as np
import pytest

from fast_dvla.data import (EpisodeError, list_episodes, read_dataset_info, read_episode, write_dataset_info,
                            write_episode)


def episode(T=5, size=8):
    rng = np.random.default_rng(0)
    return {"image_agentview": rng.integers(0, 255, (T, size, size, 3), dtype=np.uint8),
            "state": rng.normal(size=(T, 8)).astype(np.float32),
            "action": rng.uniform(-1, 1, (T, 7)).astype(np.float32),
            "instruction": "pick up the bowl", "task_id": 3}


@pytest.fixture
def root(tmp_path):
    write_dataset_info(str(tmp_path), ["agentview"], [8, 8], 8, 7)
    return str(tmp_path)


def test_round_trip(root):
    write_episode(root, 0, episode())
    write_episode(root, 1, episode(T=3))
    info = read_dataset_info(root)
    paths = list_episodes(root)
    assert [os.path.basename(p) for p in paths] == ["episode_000000.npz", "episode_000001.npz"]
    ep = read_episode(paths[0], info)
    assert ep["instruction"] == "pick up the bowl" and ep["task_id"] == 3
    assert ep["images"]["agentview"].shape == (5, 8, 8, 3) and np.array_equal(ep["action"], episode()["action"])
    assert not [n for n in os.listdir(root) if "tmp" in n]  # atomic writes leave nothing behind


@pytest.mark.parametrize("corrupt,match", [
    (lambda e: e.pop("action"), "missing 'action'"),
    (lambda e: e.update(state=e["state"][:3]), "3 states for 5 actions"),
    (lambda e: e["action"].__setitem__((0, 0), np.nan), "NaN"),
    (lambda e: e.update(image_agentview=e["image_agentview"][:, :4]), "image_agentview must be uint8"),
    (lambda e: e.update(image_agentview=e["image_agentview"].astype(np.float32)), "must be uint8"),
    (lambda e: e.update(action=e["action"][:, :6]), "dims"),
    (lambda e: e.pop("image_agentview"), "missing camera"),
])
def test_corrupt_episodes_are_named(root, corrupt, match):
    ep = episode()
    corrupt(ep)
    path = write_episode(root, 0, ep)
    with pytest.raises(EpisodeError, match=match) as err:
        read_episode(path, read_dataset_info(root))
    assert "episode_000000.npz" in str(err.value)


def test_truncated_file_and_missing_info(root, tmp_path_factory):
    path = write_episode(root, 0, episode())
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(EpisodeError, match="unreadable"):
        read_episode(path)
    with pytest.raises(FileNotFoundError, match="not a fast-dvla episodes directory"):
        read_dataset_info(str(tmp_path_factory.mktemp("empty")))
