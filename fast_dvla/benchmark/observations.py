"""Random observations shaped for a policy, for timing decoders without a simulator or data."""
from __future__ import annotations

import numpy as np


def random_observation(policy, batch: int, seed: int) -> dict:
    """A batch of random uint8 images for every camera the policy reads, a normal state and a fixed
    instruction (seeded: the same observation for the same seed), shaped as the policy's model says
    (``observation_spec()``: cameras, image size, state size)."""
    spec = policy.io.observation_spec()
    rng = np.random.default_rng(seed)
    size = (batch, *spec["image_size"], 3)
    return {"images": {c: rng.integers(0, 256, size, dtype=np.uint8) for c in spec["cameras"]},
            "state": rng.normal(size=(batch, spec["state_dim"])).astype(np.float32),
            "instruction": ["pick up the alphabet soup and place it in the basket"] * batch}
