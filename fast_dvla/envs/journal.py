"""A journal of finished episodes, so that a benchmark killed mid-run resumes where it stopped.

The journal is a JSON-lines file. Its first line names the arguments of the run that wrote it
(``{"arguments": {...}}``); each further line is one finished episode
(``{"decoder", "task", "init", "result", "observations"}``), written whole, flushed and fsynced
before the next episode starts. A process killed mid-write leaves at most its last line torn
(no newline at its end): that line is dropped when the journal is opened again, and its episode
runs again. A resumed run must have the same arguments (its results would mix two settings
otherwise); the first that differs is named.

Observations an episode kept (for timing decoders on them later) are written beside the journal,
one ``.npz`` per episode, renamed into place before the episode's line is written: an episode in
the journal always has its observations on disk.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil

import numpy as np

JOURNAL_SUFFIX = ".episodes.jsonl"


def journal_path(stem: str) -> str:
    """Where the results written to ``stem.json`` keep their journal."""
    return stem + JOURNAL_SUFFIX


def observations_dir(path: str) -> str:
    """The folder beside journal ``path`` that holds its episodes' kept observations."""
    return path[: -len(".jsonl")] + ".obs" if path.endswith(".jsonl") else path + ".obs"


def policy_location(path: str | None) -> str:
    """A policy argument as a journal keeps it: absolute, so a run resumed from another directory
    is checked against the same policy."""
    return os.path.abspath(path) if path else "shipped reference"


def canonical(arguments: dict) -> dict:
    """``arguments`` as they read back from JSON (tuples become lists), so that they compare
    equal to the ones a journal holds."""
    return json.loads(json.dumps(arguments))


def differing_arguments(saved: dict, current: dict) -> list[str]:
    """The argument names whose values differ between ``saved`` and ``current`` (in ``current``'s order,
    then those only ``saved`` has)."""
    names = list(current) + [k for k in saved if k not in current]
    return [k for k in names if saved.get(k) != current.get(k)]


def check_arguments(path: str, saved: dict, current: dict) -> None:
    """Raise ``ValueError`` naming each argument whose value in journal ``path`` differs from this run's."""
    current = canonical(current)
    differ = differing_arguments(saved, current)
    if differ:
        shown = "; ".join(f"{k} was {saved.get(k)!r}, now {current.get(k)!r}" for k in differ)
        raise ValueError(f"{path}: written by a run with other arguments ({shown}); rerun with the journal's "
                         f"arguments to resume it, or start over (--fresh, or another --out)")


def episode_key(decoder: str, task: int, init: int) -> tuple[str, int, int]:
    return str(decoder), int(task), int(init)


def parse_entry(path: str, number: int, line: bytes) -> dict:
    try:
        entry = json.loads(line)
    except ValueError:
        raise ValueError(f"{path}: line {number} is not JSON; a journal's lines are written whole "
                         f"(only the last can be torn, by a kill mid-write)") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: line {number}: expected a JSON object, got {type(entry).__name__}")
    return entry


def read_journal(path: str) -> tuple[dict | None, dict, int]:
    """Journal ``path`` as ``(arguments, {(decoder, task, init): line}, intact bytes)``: a torn last
    line is left out of both and of the byte count; ``arguments`` is ``None`` for a missing or empty
    journal. An episode recorded twice is an error (it would count twice)."""
    if not os.path.exists(path):
        return None, {}, 0
    with open(path, "rb") as f:
        data = f.read()
    arguments, episodes, intact = None, {}, 0
    lines = data.split(b"\n")[:-1]  # what follows the last newline is torn (or nothing)
    for number, line in enumerate(lines, 1):
        entry = parse_entry(path, number, line)
        if number == 1:
            if not isinstance(entry.get("arguments"), dict):
                raise ValueError(f"{path}: line 1 must name the run's arguments ({{\"arguments\": {{...}}}}), "
                                 f"got keys {sorted(entry)}")
            arguments = entry["arguments"]
        else:
            missing = [k for k in ("decoder", "task", "init", "result") if k not in entry]
            if missing:
                raise ValueError(f"{path}: line {number} lacks {missing}; an episode line holds decoder, "
                                 f"task, init and result")
            key = episode_key(entry["decoder"], entry["task"], entry["init"])
            if key in episodes:
                raise ValueError(f"{path}: line {number} records episode {key} (decoder, task, init) again; "
                                 f"each episode is recorded once")
            episodes[key] = entry
        intact += len(line) + 1
    return arguments, episodes, intact


def save_observations(path: str, observations: list[dict]) -> None:
    """Policy observations (``images``, ``state``, ``instruction``; the same cameras in each) stacked
    into one ``.npz`` at ``path``, written to a temporary file and renamed over it."""
    arrays = {"state": np.stack([o["state"] for o in observations]),
              "instruction": np.array([o["instruction"] for o in observations])}
    for cam in observations[0]["images"]:
        arrays[f"images.{cam}"] = np.stack([o["images"][cam] for o in observations])
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
    os.replace(tmp, path)


def load_observations(path: str, count: int) -> list[dict]:
    """The ``count`` observations ``save_observations`` wrote to ``path``."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: missing; the journal beside it records {count} observations kept there")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if len(arrays.get("state", ())) != count:
        raise ValueError(f"{path}: holds {len(arrays.get('state', ()))} observations, the journal records {count}")
    cams = [k.split(".", 1)[1] for k in arrays if k.startswith("images.")]
    return [{"images": {c: arrays[f"images.{c}"][i] for c in cams}, "state": arrays["state"][i],
             "instruction": str(arrays["instruction"][i])} for i in range(count)]


class EpisodeJournal:
    """An open journal: ``done``/``result`` ask what it holds, ``record`` adds a finished episode.
    ``fresh``: forget what it holds (and its observations), a run that starts over. One process
    at a time: a second one opening the same journal is refused."""

    def __init__(self, path: str, arguments: dict, fresh: bool = False):
        self.path, self.arguments = path, canonical(arguments)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "ab")
        try:
            self._take_over(fresh)
        except BaseException:
            self.file.close()  # a refused journal stays as it was, and unlocked
            raise

    def _take_over(self, fresh: bool) -> None:
        """Lock the journal, check whose it is and drop a torn last line (or, ``fresh``, everything)."""
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel if the process dies
        except BlockingIOError:
            raise ValueError(f"{self.path}: another process is writing this journal "
                             f"(same --out and --shard?)") from None
        if fresh:
            self.file.truncate(0)
            shutil.rmtree(observations_dir(self.path), ignore_errors=True)
        saved, self.episodes, intact = read_journal(self.path)
        if saved is not None:
            check_arguments(self.path, saved, self.arguments)
        self.file.truncate(intact)  # drop a torn last line: its episode runs again
        if saved is None:
            self._append({"arguments": self.arguments})

    def __len__(self) -> int:
        return len(self.episodes)

    def done(self, decoder: str, task: int, init: int) -> bool:
        return episode_key(decoder, task, init) in self.episodes

    def result(self, decoder: str, task: int, init: int) -> dict:
        return self.episodes[episode_key(decoder, task, init)]["result"]

    def observations_path(self, decoder: str, task: int, init: int) -> str:
        return os.path.join(observations_dir(self.path), f"{decoder}_task{int(task):03d}_init{int(init):04d}.npz")

    def observations(self, decoder: str, task: int, init: int) -> list[dict]:
        """The observations a recorded episode kept (none if it kept none)."""
        count = self.episodes[episode_key(decoder, task, init)].get("observations", 0)
        return load_observations(self.observations_path(decoder, task, init), count) if count else []

    def record(self, decoder: str, task: int, init: int, result: dict, observations: list | None = None) -> None:
        """Add a finished episode (its kept ``observations`` first, then its line)."""
        key = episode_key(decoder, task, init)
        if key in self.episodes:
            raise ValueError(f"{self.path}: episode {key} (decoder, task, init) is recorded already")
        if observations:
            os.makedirs(observations_dir(self.path), exist_ok=True)
            save_observations(self.observations_path(*key), observations)
        entry = {"decoder": key[0], "task": key[1], "init": key[2], "result": result,
                 "observations": len(observations or [])}
        self._append(entry)
        self.episodes[key] = canonical(entry)

    def _append(self, entry: dict) -> None:
        self.file.write((json.dumps(entry) + "\n").encode())
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
