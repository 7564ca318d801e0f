"""Held-out CALVIN frames with the expert's action chunks, for CI's test of the shipped CALVIN policies.

    fast-dvla record calvin --chains 3 --seed 7 --workers 1 --out data/calvin_heldout_seed7   # needs calvin_env
    python scripts/goldens/calvin_frames.py

Seed 7's chains are neither the training demonstrations' (seed 0) nor the benchmark's (seed 1000). Writes
``tests/golden/calvin_frames.npz``: ``FRAMES`` observations drawn over every step of those episodes (images per
camera, state, instruction) and the demonstrated chunk of ``HORIZON`` actions from each.
"""
from pathlib import Path

import numpy as np

from fast_dvla.data.frames import sample_frames

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "calvin_heldout_seed7"
OUT = ROOT / "tests" / "golden" / "calvin_frames.npz"
FRAMES, HORIZON, SEED = 16, 8, 0


def main():
    frames = sample_frames(str(DATA), FRAMES, HORIZON, SEED)
    cameras = sorted(frames[0][0]["images"])
    arrays = {f"image_{c}": np.stack([obs["images"][c] for obs, _ in frames]) for c in cameras}
    arrays["state"] = np.stack([obs["state"] for obs, _ in frames])
    arrays["instruction"] = np.array([obs["instruction"] for obs, _ in frames])
    arrays["action_chunk"] = np.stack([chunk for _, chunk in frames]).astype(np.float32)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(frames)} frames, cameras {cameras})")


if __name__ == "__main__":
    main()
