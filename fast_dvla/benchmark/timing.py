"""Clock reads that wait for the device, and latency summaries."""
from __future__ import annotations

import time

import numpy as np
import torch


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device="cpu"):
    """``(result, seconds)`` with the device synchronised before each clock read."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def summarize(seconds: list[float]) -> dict:
    arr = np.asarray(seconds, dtype=np.float64)
    return {"median_s": float(np.median(arr)), "p90_s": float(np.percentile(arr, 90)),
            "mean_s": float(arr.mean()), "n": int(arr.size)}
