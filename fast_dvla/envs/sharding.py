"""Splitting a benchmark's episodes over processes, and reading the parts back."""
from __future__ import annotations

import glob
import json


def parse_range(text: str) -> list[int]:
    """``"0,3-5"`` -> ``[0, 3, 4, 5]``; exits naming the bad part."""
    ids: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            lo, _, hi = part.partition("-")
            ids.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
        except ValueError:
            raise SystemExit(f"bad id range {part!r} in {text!r}: use ids like 0,3-5") from None
    return ids


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``, with ``0 <= i < n``."""
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise SystemExit(f"--shard must look like i/n (e.g. 0/2), got {shard!r}") from None
    if not 0 <= i < n:
        raise SystemExit(f"--shard {shard}: need 0 <= i < n")
    return i, n


def shard_of(jobs: list, shard: str) -> list:
    """Shard ``i/n`` of ``jobs``: every n-th from the i-th."""
    i, n = parse_shard(shard)
    return jobs[i::n]


def shard_stem(out: str, shard: str) -> str:
    """Where shard ``i/n`` writes: ``out`` itself when there is one shard, else ``out.shard<i>``."""
    return out if shard == "0/1" else f"{out}.shard{shard.split('/')[0]}"


def read_shards(patterns: list[str]) -> list[dict]:
    """The shard JSON files matching any of ``patterns`` (globs), each read once, in name order."""
    files = sorted({f for pattern in patterns for f in glob.glob(pattern)})
    if not files:
        raise SystemExit(f"no shard files match {patterns}")
    results = []
    for f in files:
        with open(f) as fh:
            results.append(json.load(fh))
    return results
