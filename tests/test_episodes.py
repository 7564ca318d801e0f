"""The episodes format: round trip, a clear error for each kind of corruption,
and atomic writes."""
import json
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
            "instruction": "pick up the bowl", "task_id": 3, "init_state_id": 7, "suite": "libero_object"}


@pytest.fixture
def root(tmp_path):
    write_dataset_info(str(tmp_path), ["agentview"], [8, 8], 8, 7, episodes=2, source="test")
    return str(tmp_path)


def test_round_trip(root):
    write_episode(root, 1003, episode(T=3))
    write_episode(root, 2, episode())
    info = read_dataset_info(root)
    assert info["episodes"] == 2 and info["source"] == "test" and info["fps"] == 20 and info["version"] == 1
    paths = list_episodes(root)
    assert [os.path.basename(p) for p in paths] == ["episode_000002.npz", "episode_001003.npz"]
    ep = read_episode(paths[0], info)
    want = episode()
    assert ep["instruction"] == "pick up the bowl" and ep["name"] == "episode_000002.npz"
    assert (ep["task_id"], ep["init_state_id"], ep["suite"]) == (3, 7, "libero_object")
    assert np.array_equal(ep["images"]["agentview"], want["image_agentview"])
    assert np.array_equal(ep["action"], want["action"]) and np.array_equal(ep["state"], want["state"])
    assert ep["state"].dtype == np.float32 and ep["action"].dtype == np.float32
    assert read_episode(paths[1])["images"]["agentview"].shape == (3, 8, 8, 3)  # cameras found without info


def test_float64_input_is_stored_as_float32(root):
    ep = episode()
    ep["action"] = ep["action"].astype(np.float64)
    out = read_episode(write_episode(root, 0, ep), read_dataset_info(root))
    assert out["action"].dtype == np.float32 and np.allclose(out["action"], episode()["action"])


def _set(key, value_fn):
    return lambda e: e.update({key: value_fn(e)})


CORRUPTIONS = [
    ("missing action", lambda e: e.pop("action"), "missing 'action'"),
    ("missing instruction", lambda e: e.pop("instruction"), "missing 'instruction'"),
    ("short state", _set("state", lambda e: e["state"][:3]), "3 states for 5 actions"),
    ("NaN action", lambda e: e["action"].__setitem__((2, 4), np.nan),
     r"action contains NaN or inf \(first at step 2, dim 4\)"),
    ("inf state", lambda e: e["state"].__setitem__((0, 0), np.inf), "state contains NaN or inf"),
    ("float64 action", _set("action", lambda e: e["action"].astype(np.float64)), "action must be float32"),
    ("1-D action", _set("action", lambda e: e["action"][:, 0]), r"must be \[T, dim\]"),
    ("empty", lambda e: e.update(state=e["state"][:0], action=e["action"][:0],
                                 image_agentview=e["image_agentview"][:0]), "empty episode"),
    ("image size", _set("image_agentview", lambda e: e["image_agentview"][:, :4]), r"as dataset.json says"),
    ("image dtype", _set("image_agentview", lambda e: e["image_agentview"].astype(np.float32)), "must be uint8"),
    ("image steps", _set("image_agentview", lambda e: e["image_agentview"][:4]), r"uint8 \[T=5"),
    ("action dim", _set("action", lambda e: e["action"][:, :6]), "dims 8/6 != dataset's 8/7"),
    ("missing camera", lambda e: e.pop("image_agentview"), "missing camera 'image_agentview'"),
    ("instruction type", _set("instruction", lambda e: np.arange(3)), "instruction must be a 0-d string"),
    ("perturbed steps", _set("perturbed", lambda e: np.zeros(4, bool)), r"perturbed must be bool \[T=5\]"),
    ("perturbed dtype", _set("perturbed", lambda e: np.zeros(5, np.int64)), "perturbed must be bool"),
]


WRITER_FIXES = ("action must be float32", "instruction must be a 0-d string")


@pytest.mark.parametrize("corrupt,match", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_each_corruption_is_named(root, corrupt, match):
    ep = {k: np.asarray(v) for k, v in episode().items()}
    corrupt(ep)
    path = os.path.join(root, "episode_000000.npz")
    np.savez_compressed(path, **ep)  # as if written by other code or damaged afterwards
    with pytest.raises(EpisodeError, match=match) as err:
        read_episode(path, read_dataset_info(root))
    assert path in str(err.value)
    if match in WRITER_FIXES:  # the writer casts float64 and str()s the instruction instead
        return
    with pytest.raises(EpisodeError, match=match):  # the writer refuses the same episode up front
        write_episode(root, 1, ep, read_dataset_info(root))
    assert not os.path.exists(os.path.join(root, "episode_000001.npz"))


def test_truncated_file(root):
    path = write_episode(root, 0, episode())
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(EpisodeError, match="episode_000000.npz: unreadable"):
        read_episode(path)


@pytest.mark.parametrize("edit,match", [
    (lambda i: i.update(format="other"), "format is 'other'"),
    (lambda i: i.update(version=2), "version 2"),
    (lambda i: i.pop("cameras"), "'cameras' must be a list"),
    (lambda i: i.update(image_size=[8]), r"image_size must be \[H, W\]"),
])
def test_bad_dataset_info(root, edit, match):
    path = os.path.join(root, "dataset.json")
    info = json.load(open(path))
    edit(info)
    json.dump(info, open(path, "w"))
    with pytest.raises(ValueError, match=match):
        read_dataset_info(root)


def test_missing_dataset_info(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a fast-dvla episodes directory"):
        read_dataset_info(str(tmp_path))


def test_interrupted_write_leaves_the_old_file_and_no_partial_one(root, monkeypatch):
    path = write_episode(root, 0, episode(T=5))

    def dies_halfway(file, **arrays):  # a writer killed after some bytes
        with open(file, "wb") as f:
            f.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        write_episode(root, 0, episode(T=3))
    with pytest.raises(KeyboardInterrupt):
        write_episode(root, 1, episode(T=3))
    assert sorted(os.listdir(root)) == ["dataset.json", "episode_000000.npz"]  # no temp file, no episode 1
    assert len(read_episode(path)["action"]) == 5  # the complete earlier version is intact


def test_leftover_temp_file_is_not_an_episode(root):
    write_episode(root, 0, episode())
    open(os.path.join(root, "episode_000001.tmp.npz"), "wb").close()  # as a SIGKILL mid-write would leave
    assert [os.path.basename(p) for p in list_episodes(root)] == ["episode_000000.npz"]


def test_pushed_steps_round_trip_and_drop_the_chunks_that_follow_them(root):
    """Recovery pushes: a chunk starting at t is dropped when a step in t .. t + H - 2 was pushed
    (the labels after a pushed step answer where the push moved the robot); the chunks
    starting after the push, which show the way back, are kept."""
    from fast_dvla.model import ModelConfig
    from fast_dvla.training.dataset import ChunkDataset, chunk_starts

    ep = episode(T=12)
    ep["perturbed"] = np.zeros(12, bool)
    ep["perturbed"][[5, 6]] = True
    out = read_episode(write_episode(root, 0, ep), read_dataset_info(root))
    assert np.array_equal(out["perturbed"], ep["perturbed"])
    assert "perturbed" not in read_episode(write_episode(root, 1, episode()))
    assert chunk_starts(out, horizon=4) == [0, 1, 2, 7, 8, 9, 10, 11]  # 3: its steps 3..5 hold a push
    assert chunk_starts(out, horizon=1) == list(range(12))  # a one-step chunk is the pushed step's own label
    assert chunk_starts(episode(T=6), horizon=4) == list(range(6))  # no pushes: every step
    data = ChunkDataset(root, ModelConfig(cameras=("agentview",), image_size=8, horizon=4, block_size=7),
                        progress=False)
    assert len(data) == 8 + 5 and data.skipped_after_pushes == 4  # episode 0 as above, episode 1 whole
