"""Recording scripted-expert demonstrations on LIBERO-Object into the episodes format.

Every (task, initial state) pair is attempted once; its outcome is written to
``attempts/task<TT>_init<III>.json`` and, when the expert succeeded (checked
after the release), its episode to ``episode_<task * 1000 + init>.npz``, so
an interrupted run resumes where it stopped. The command ``fast-dvla record
libero`` documents the recording options (noise, pushes, relabelling).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import numpy as np
from tqdm import tqdm

from ..benchmark.report import markdown_table
from ..data import list_episodes, read_dataset_info, write_dataset_info, write_episode

CAMERAS = ("agentview", "wrist")
PUSH_STEPS = 8                          # steps one recovery push lasts at most
PUSH_PHASES = ("hover", "descend")      # the approach, where a lateral error decides the grasp
STATE_DIM, ACTION_DIM, FPS = 8, 7, 20


def episode_index(task: int, init: int) -> int:
    """The episode file's index: derived from the pair, so a resumed run writes the same names."""
    return task * 1000 + init


def attempt_path(out: str, task: int, init: int) -> str:
    return os.path.join(out, "attempts", f"task{task:02d}_init{init:03d}.json")


def _write_json(path: str, payload) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written record


class Recorder:
    """Runs the expert on one (task, init) pair at a time, keeping the last task's simulator."""

    def __init__(self, suite: str, out: str, image_size: int, cameras=CAMERAS, max_steps: int | None = None,
                 action_noise: float = 0.0, policy: str | None = None, expert_prob: float = 0.0,
                 push_prob: float = 0.0, push_size: float = 0.0):
        self.suite, self.out, self.image_size, self.cameras = suite, out, image_size, tuple(cameras)
        self.action_noise = float(action_noise)
        self.push_prob, self.push_size = float(push_prob), float(push_size)
        self.policy_path, self.expert_prob = policy, float(expert_prob)
        self.policy = None
        if policy:
            from fast_dvla.training.trainer import load_policy
            self.policy = load_policy(policy)
        self.render = bool(self.cameras)  # no cameras: the expert alone, no episode written
        self.max_steps = max_steps
        self.env, self.expert = None, None

    def _env_for(self, task: int):
        if self.env is None or self.env.task_id != task:
            from fast_dvla.envs.libero_env import LiberoTaskEnv
            from fast_dvla.envs.libero_expert import LiberoObjectExpert
            self.close()
            self.env = LiberoTaskEnv(self.suite, task, image_size=self.image_size, cameras=self.cameras,
                                     render=self.render)
            self.expert = LiberoObjectExpert(self.env)
        return self.env

    def record(self, pair: tuple[int, int]) -> dict:
        """Attempt one pair; its outcome is written to ``attempts/`` (and its episode when successful).

        A simulator error during the episode ends the attempt as a failure with
        the error in its record (retried by the next run; the simulator is
        rebuilt) instead of ending the run. An error building the simulator is
        a setup problem and is raised.
        """
        task, init = pair
        t_build = time.time()
        env = self._env_for(task)
        t0 = time.time()  # per-episode time excludes building the simulator (once per task and worker)
        try:
            result = self._episode(env, task, init)
        except Exception as err:  # noqa: BLE001 - recorded, reported, retried next run
            self.close()
            result = {"task": task, "init": init, "success": False, "steps": 0, "retries": 0,
                      "rendered": self.render, "error": f"{type(err).__name__}: {err}"}
        result.update(seconds=round(time.time() - t0, 3), build_seconds=round(t0 - t_build, 3))
        _write_json(attempt_path(self.out, task, init), result)  # last: the episode file is complete by now
        return result

    def _episode(self, env, task: int, init: int) -> dict:
        obs = env.reset(init)
        self.expert.reset(obs)
        frames = {c: [] for c in env.cameras}
        states, actions, perturbed = [], [], []
        first_done = None
        noise = np.random.default_rng(episode_index(task, init))  # the same noise when a run resumes
        pushes = np.random.default_rng([episode_index(task, init), 1])  # its own stream: noise draws unchanged
        push, push_left = np.zeros(3), 0
        driver, expert_steps = "expert", 0
        if self.policy is not None:
            self.policy.reset()
            chunk = self.policy.n_action_steps
        while not self.expert.done and len(actions) < (self.max_steps or env.max_steps):
            approaching = self.expert.phase in PUSH_PHASES  # the phase this step's command belongs to
            action = self.expert.act(obs)
            for c in env.cameras:
                frames[c].append(obs["images"][c])
            states.append(obs["state"])
            actions.append(action.astype(np.float32))  # the label is the expert's clean action
            if self.policy is not None and (len(actions) - 1) % chunk == 0:  # who drives the next chunk
                driver = "expert" if noise.random() < self.expert_prob else "policy"
                self.policy.reset()  # a policy taking over plans from the current state
            pushed_now = False
            if driver == "policy":
                executed = self.policy.select_action(obs).astype(np.float64)
            else:
                executed, expert_steps = action.copy(), expert_steps + 1
                if self.action_noise > 0:
                    executed[:3] += noise.normal(0.0, self.action_noise, 3)
                if self.push_prob > 0:
                    push_left = push_left if approaching else 0  # a push ends with the approach
                    if push_left == 0 and approaching and pushes.random() < self.push_prob:
                        angle = pushes.uniform(0.0, 2 * np.pi)
                        push, push_left = self.push_size * np.array([np.cos(angle), np.sin(angle), 0.0]), PUSH_STEPS
                    if push_left > 0:
                        executed[:3] += push
                        push_left, pushed_now = push_left - 1, True
            perturbed.append(pushed_now)
            obs, _, done, _ = env.step(executed)
            if done and first_done is None:
                first_done = len(actions)
            if done and self.policy is not None:
                break  # relabelling: the policy got there; what follows is the expert's business
        success = env.success()  # after the release: `done` can fire while the object is still held
        if (success or self.policy is not None) and self.render:
            episode = {f"image_{c}": np.stack(frames[c]) for c in env.cameras}
            episode.update(state=np.stack(states), action=np.stack(actions), instruction=env.instruction,
                           task_id=task, init_state_id=init, suite=self.suite)
            if self.push_prob > 0:  # training skips the chunks whose later labels follow a push
                episode["perturbed"] = np.array(perturbed, dtype=bool)
            write_episode(self.out, episode_index(task, init), episode)
        result = {"task": task, "init": init, "success": success, "steps": len(actions),
                  "first_done_step": first_done, "retries": self.expert.retries, "rendered": self.render,
                  "action_noise": self.action_noise}
        if self.push_prob > 0:
            result.update(push_prob=self.push_prob, push_size=self.push_size, pushed_steps=sum(perturbed))
        if self.policy is not None:
            result.update(policy=self.policy_path, expert_prob=self.expert_prob,
                          expert_steps=expert_steps)
        return result

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
        self.env, self.expert = None, None


_WORKER: Recorder | None = None


def _worker_init(suite, out, image_size, cameras, max_steps, action_noise, policy=None, expert_prob=0.0,
                 push_prob=0.0, push_size=0.0):
    os.environ.setdefault("MUJOCO_GL", "egl")
    import torch
    torch.set_num_threads(1)  # one core per worker; the simulator is single-threaded anyway
    global _WORKER
    _WORKER = Recorder(suite, out, image_size, cameras, max_steps, action_noise, policy, expert_prob,
                       push_prob, push_size)


def _worker_record(pair):
    return _WORKER.record(pair)


def _finished(out: str, task: int, init: int) -> bool:
    """An outcome is recorded (an attempt that ended in a simulator error is not one)."""
    path = attempt_path(out, task, init)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return "error" not in json.load(f)


def load_attempts(out: str) -> list[dict]:
    folder = os.path.join(out, "attempts")
    if not os.path.isdir(folder):
        return []
    attempts = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                attempts.append(json.load(f))
    return attempts


def summarize(attempts: list[dict]) -> dict:
    """Per-task and total success of the expert over every recorded attempt."""
    rows = []
    for task in sorted({a["task"] for a in attempts}):
        mine = [a for a in attempts if a["task"] == task]
        ok = [a for a in mine if a["success"]]
        rows.append({"task": task, "attempts": len(mine), "successes": len(ok),
                     "success_rate": len(ok) / len(mine),
                     "mean_steps": float(np.mean([a["steps"] for a in mine])),
                     "mean_steps_success": float(np.mean([a["steps"] for a in ok])) if ok else None,
                     "min_steps": min(a["steps"] for a in mine), "max_steps": max(a["steps"] for a in mine),
                     "retries": sum(a.get("retries", 0) for a in mine),
                     "seconds_per_episode": float(np.mean([a["seconds"] for a in mine]))})
    total, ok = len(attempts), sum(bool(a["success"]) for a in attempts)
    return {"tasks": rows, "attempts": total, "successes": ok, "success_rate": ok / total if total else None,
            "mean_steps": float(np.mean([a["steps"] for a in attempts])) if attempts else None,
            "seconds_per_episode": float(np.mean([a["seconds"] for a in attempts])) if attempts else None,
            "failures": [{k: a[k] for k in ("task", "init", "steps", "retries", "error") if k in a}
                         for a in attempts if not a["success"]]}


TABLE = [("task", "task", "d"), ("attempts", "attempts", "d"), ("successes", "successes", "d"),
         ("success_rate", "success", ".0%"), ("mean_steps", "mean steps", ".1f"), ("min_steps", "min", "d"),
         ("max_steps", "max", "d"), ("retries", "retries", "d"), ("seconds_per_episode", "s/episode", ".1f")]


def _refuse_mixed(out: str, seen: set, wanted, flags: str, setting: str) -> None:
    """A resumed run appends to ``out``: one value of each recording setting per directory,
    or demonstrations of different kinds mix silently."""
    if seen and seen != {wanted}:
        raise SystemExit(f"{out} holds attempts recorded with {flags} {sorted(seen, key=str)}; a resumed run "
                         f"must use the same {setting}: pick another --out")


def _check_out_dir(out: str, cameras: tuple, image_size: int, attempts: list[dict], action_noise: float,
                   policy: str | None = None, expert_prob: float = 0.0, push: tuple = (0.0, 0.0)) -> None:
    """Refuse to mix runs that would make the directory inconsistent."""
    render = bool(cameras)
    has_info = os.path.exists(os.path.join(out, "dataset.json"))
    _refuse_mixed(out, {(a.get("policy"), a.get("expert_prob", 0.0)) for a in attempts},
                  (policy, expert_prob if policy else 0.0), "(--policy, --expert-prob)", "--policy and --expert-prob")
    _refuse_mixed(out, {a.get("action_noise", 0.0) for a in attempts}, action_noise, "--action-noise", "noise")
    _refuse_mixed(out, {(a.get("push_prob", 0.0), a.get("push_size", 0.0)) for a in attempts}, tuple(push),
                  "(--push-prob, --push-size)", "pushes")
    _refuse_mixed(out, {a.get("rendered", has_info) for a in attempts}, render, "rendering", "mode")
    if render and has_info:
        info = read_dataset_info(out)
        if list(info["image_size"]) != [image_size, image_size] or list(info["cameras"]) != list(cameras):
            raise SystemExit(f"{out} holds {info['image_size']} images of {info['cameras']}; this run asks for "
                             f"{[image_size, image_size]} of {list(cameras)}: pick another --out")


def record_demos(suite: str, tasks: list[int], inits: list[int], out: str, image_size: int = 64,
                 cameras: tuple = CAMERAS, workers: int = 1, max_steps: int | None = None, action_noise: float = 0.0,
                 policy: str | None = None, expert_prob: float = 0.0, push: tuple = (0.0, 0.0)) -> dict:
    """Attempts every (task, init) pair not yet recorded under ``out`` and returns the report of every
    attempt there (also written to ``report.json`` and ``report.md``). ``cameras=()``: the expert alone,
    success statistics only. Refuses (``SystemExit``) to add to a directory recorded otherwise."""
    render = bool(cameras)
    os.makedirs(os.path.join(out, "attempts"), exist_ok=True)
    _check_out_dir(out, cameras, image_size, load_attempts(out), action_noise, policy,
                   expert_prob, push)
    info_extra = {"source": f"scripted expert (fast_dvla.envs.libero_expert), {suite}",
                  "action_noise": action_noise}
    if push[0]:
        info_extra.update(push_prob=push[0], push_size=push[1], push_steps=PUSH_STEPS)
    if policy:
        info_extra.update(source=f"policy {policy} relabelled by the scripted expert, {suite}",
                          expert_prob=expert_prob)
    if render:
        write_dataset_info(out, cameras, [image_size] * 2, STATE_DIM, ACTION_DIM, fps=FPS,
                           episodes=len(list_episodes(out)), **info_extra)

    pending = [(t, i) for t in tasks for i in inits if not _finished(out, t, i)]
    skipped = len(tasks) * len(inits) - len(pending)
    t0, ok, done = time.time(), 0, 0
    kind = "relabelled policy episodes" if policy else "expert episodes"
    bar = tqdm(total=len(pending), desc=f"{kind} ({skipped} done before)", unit="ep")
    workers = max(1, min(workers, len(pending)))

    def tick(result):
        nonlocal ok, done
        ok, done = ok + int(result["success"]), done + 1
        bar.set_postfix(success=f"{ok}/{done} ({ok / done:.0%})", task=result["task"], refresh=False)
        bar.update(1)

    if workers > 1:
        ctx = mp.get_context("spawn")  # each worker its own simulator and GL context
        pool = ctx.Pool(workers, initializer=_worker_init, initargs=(suite, out, image_size, cameras,
                                                                      max_steps, action_noise,
                                                                      policy, expert_prob, *push))
        try:
            for result in pool.imap_unordered(_worker_record, pending):
                tick(result)
            pool.close()
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
    else:
        recorder = Recorder(suite, out, image_size, cameras, max_steps, action_noise,
                            policy, expert_prob, *push)
        try:
            for pair in pending:
                tick(recorder.record(pair))
        finally:
            recorder.close()
    bar.close()

    report_path = os.path.join(out, "report.json")
    earlier_wall = 0.0
    if os.path.exists(report_path):  # a resumed run adds to the earlier runs' wall time
        with open(report_path) as f:
            earlier_wall = json.load(f).get("wall_s_total", 0.0)
    wall = time.time() - t0
    report = summarize(load_attempts(out))
    report.update(suite=suite, rendered=render, cameras=list(cameras),
                  image_size=image_size if render else None, workers=workers,
                  attempted_this_run=len(pending), skipped_this_run=skipped,
                  wall_s_this_run=round(wall, 1), wall_s_total=round(earlier_wall + wall, 1))
    if render:
        report["demonstrations"] = len(list_episodes(out))
        write_dataset_info(out, cameras, [image_size] * 2, STATE_DIM, ACTION_DIM, fps=FPS,
                           episodes=report["demonstrations"], **info_extra)
    _write_json(report_path, report)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown_table(report["tasks"], TABLE) + "\n")
    return report

