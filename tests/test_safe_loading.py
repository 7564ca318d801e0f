"""Training checkpoints load without running code, survive a write that dies
half-way, and still restore every random state."""
import contextlib
import os
import pathlib
import random

import numpy as np
import pytest
import torch

from fast_dvla.training.config import TrainConfig
from fast_dvla.training.synthetic import write_synthetic_dataset
from fast_dvla.training.trainer import CHECKPOINT, Trainer, load_policy
from helpers import TINY


class WritesMarker:
    """Unpickling this writes ``marker``: the way a shared checkpoint would run its code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (pathlib.Path(self.marker), "code ran")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("synthetic")), 4)


def small_run(data: str, out) -> TrainConfig:
    return TrainConfig(stage="teacher", data=data, out=str(out), model=dict(TINY), steps=2, batch_size=4,
                       lr=1e-3, warmup_steps=1, log_every=1, save_every=1)


def plant_code_checkpoint(run_dir, marker) -> None:
    os.makedirs(run_dir, exist_ok=True)
    torch.save({"model": WritesMarker(str(marker)), "config": {}}, os.path.join(run_dir, CHECKPOINT))


def test_a_checkpoint_that_would_run_code_is_refused_on_resume(synthetic, tmp_path):
    marker = tmp_path / "marker"
    plant_code_checkpoint(tmp_path / "run", marker)
    trainer = Trainer(small_run(synthetic, tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match=CHECKPOINT):
        trainer.resume()
    assert not marker.exists()


def test_a_run_directory_that_would_run_code_is_refused_as_a_policy(tmp_path):
    marker = tmp_path / "marker"
    plant_code_checkpoint(tmp_path / "run", marker)
    with pytest.raises(ValueError, match=CHECKPOINT):
        load_policy(str(tmp_path / "run"))  # what `fast-dvla fidelity --policy <run dir>` does
    assert not marker.exists()


def test_checkpoints_hold_only_plain_data_and_restore_every_random_state(synthetic, tmp_path):
    trainer = Trainer(small_run(synthetic, tmp_path / "run"), progress=False)
    trainer.train(until=1)
    np.random.seed(7)
    random.seed(7)
    trainer.save_checkpoint()
    expected = (np.random.rand(3), random.random(), torch.rand(3))
    # the weights-only loader refuses anything but tensors and plain containers
    saved = torch.load(trainer.checkpoint_path, weights_only=True)
    assert saved["step"] == 1
    np.random.seed(99)
    random.seed(99)
    torch.manual_seed(99)
    resumed = Trainer(small_run(synthetic, tmp_path / "run"), progress=False)
    assert resumed.resume()
    restored = (np.random.rand(3), random.random(), torch.rand(3))
    assert np.array_equal(restored[0], expected[0]) and restored[1] == expected[1]
    assert torch.equal(restored[2], expected[2])


def test_a_checkpoint_write_that_dies_leaves_the_last_checkpoint_whole(synthetic, tmp_path, monkeypatch):
    trainer = Trainer(small_run(synthetic, tmp_path / "run"), progress=False)
    trainer.train(until=1)
    trainer.save_checkpoint()
    before = pathlib.Path(trainer.checkpoint_path).read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as out:
            out.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # a kill in the middle of the write

    trainer.train_step()
    files = sorted(os.listdir(tmp_path / "run"))
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    assert pathlib.Path(trainer.checkpoint_path).read_bytes() == before
    assert sorted(os.listdir(tmp_path / "run")) == files  # no half-written file left behind either
