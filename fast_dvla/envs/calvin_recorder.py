"""Recording scripted-expert demonstrations on CALVIN, chained as the evaluation chains subtasks.

Each chain (from :func:`fast_dvla.envs.calvin_protocol.restricted_chains`
over the subtasks the expert covers) starts from its initial scene; each
subtask gets its instruction and runs until calvin_env's oracle sees it done
(as the evaluation ends it: the next subtask starts from wherever the robot
is then), at most ``steps_per_subtask`` steps; a failure ends the chain. Every
completed subtask is one episode of the dataset (``episode_<chain * 10 +
position>.npz``, its instruction, ``task_id`` = the subtask's index in
``SUBTASKS``, ``init_state_id`` = the chain's index). Each chain's outcome is
written to ``attempts/chain<NNNNN>.json`` last, so an interrupted run resumes
with the chains it lacks.

``action_noise`` (DART-style): the simulator executes the expert's position
command plus Gaussian noise of that standard deviation (action units; the
label stays the expert's clean action), seeded by the chain.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import numpy as np
from tqdm import tqdm

from ..benchmark.report import markdown_table
from ..data import list_episodes, write_dataset_info, write_episode
from . import calvin_protocol as protocol
from .calvin_env import ACTION_DIM, CAMERAS, STATE_DIM

SUITE = "calvin_D"
FPS = 30  # calvin_env's control frequency


def episode_index(chain: int, position: int) -> int:
    return chain * 10 + position


def attempt_path(out: str, chain: int) -> str:
    return os.path.join(out, "attempts", f"chain{chain:05d}.json")


def _write_json(path: str, payload) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


class ChainRecorder:
    """One simulator and expert, recording one chain at a time."""

    def __init__(self, out: str, chains: list, image_size: int | None, action_noise: float = 0.0,
                 steps_per_subtask: int = protocol.STEPS_PER_SUBTASK, seed: int = 0, calvin_path=None):
        from .calvin_env import CalvinEnv
        from .calvin_expert import CalvinExpert

        self.out, self.chains, self.image_size = out, chains, image_size
        self.action_noise, self.steps_per_subtask, self.seed = float(action_noise), int(steps_per_subtask), seed
        self.env = CalvinEnv(image_size=image_size, calvin_path=calvin_path)
        self.expert = CalvinExpert(self.env)

    def record(self, index: int) -> dict:
        t0 = time.time()
        try:
            result = self._chain(index)
        except Exception as err:  # noqa: BLE001 - recorded, reported, tried again by the next run
            result = {"chain": index, "completed": 0, "subtasks": [], "error": f"{type(err).__name__}: {err}"}
        result["seconds"] = round(time.time() - t0, 3)
        _write_json(attempt_path(self.out, index), result)
        return result

    def _chain(self, index: int) -> dict:
        condition, chain = self.chains[index]
        env, expert = self.env, self.expert
        env.reset(*protocol.initial_scene(condition))
        noise = np.random.default_rng([self.seed, index])  # the same noise when a run resumes
        outcomes = []
        for position, name in enumerate(chain):
            obs = env.start_subtask(name, protocol.INSTRUCTIONS[name])
            expert.reset(name)
            frames = {c: [] for c in CAMERAS} if self.image_size else {}
            states, actions = [], []
            success = False
            while len(actions) < self.steps_per_subtask and not expert.done:
                action = np.asarray(expert.act(), dtype=np.float64)
                for c in frames:
                    frames[c].append(obs["images"][c])
                states.append(obs["state"])
                actions.append(action.astype(np.float32))
                executed = action.copy()
                if self.action_noise > 0:
                    executed[:3] += noise.normal(0.0, self.action_noise, 3)
                obs, info = env.step(executed)
                if info["success"]:
                    success = True
                    break
            outcomes.append({"subtask": name, "success": success, "steps": len(actions)})
            if success and self.image_size:
                episode = {f"image_{c}": np.stack(frames[c]) for c in frames}
                episode.update(state=np.stack(states), action=np.stack(actions), instruction=protocol.INSTRUCTIONS[name],
                               task_id=protocol.SUBTASKS.index(name), init_state_id=index, suite=SUITE)
                write_episode(self.out, episode_index(index, position), episode)
            if not success:
                break
        return {"chain": index, "condition": condition, "subtasks": outcomes,
                "completed": sum(o["success"] for o in outcomes), "action_noise": self.action_noise}

    def close(self) -> None:
        self.env.close()


_worker = None


def _worker_init(*args):
    global _worker
    _worker = ChainRecorder(*args)


def _worker_record(index: int) -> dict:
    return _worker.record(index)


def load_attempts(out: str) -> list[dict]:
    folder = os.path.join(out, "attempts")
    if not os.path.isdir(folder):
        return []
    return [json.load(open(os.path.join(folder, f))) for f in sorted(os.listdir(folder)) if f.endswith(".json")]


def summarize(attempts: list[dict]) -> dict:
    """Per subtask: attempts, successes, mean steps; chains: average completed subtasks."""
    per = {}
    for a in attempts:
        for s in a["subtasks"]:
            row = per.setdefault(s["subtask"], {"subtask": s["subtask"], "attempts": 0, "successes": 0, "steps": []})
            row["attempts"] += 1
            row["successes"] += int(s["success"])
            row["steps"].append(s["steps"])
    rows = []
    for name in sorted(per):
        row = per[name]
        steps = row.pop("steps")
        row.update(rate=row["successes"] / row["attempts"], mean_steps=float(np.mean(steps)))
        rows.append(row)
    summary = protocol.chain_summary([a["completed"] for a in attempts]) if attempts else None
    return {"chains": len(attempts), "errors": [a["chain"] for a in attempts if "error" in a],
            "chain_summary": summary, "subtasks": rows}


def record_chains(out: str, num_chains: int, seed: int = 0, subtasks=None, image_size: int | None = 64,
                  workers: int = 1, action_noise: float = 0.0,
                  steps_per_subtask: int = protocol.STEPS_PER_SUBTASK, calvin_path=None) -> dict:
    """Record ``num_chains`` chains into ``out`` (resuming), then write ``report.json`` / ``report.md``."""
    if subtasks is None:
        from .calvin_expert import COVERED
        subtasks = list(COVERED)
    chains = protocol.restricted_chains(num_chains, subtasks, seed=seed)
    os.makedirs(os.path.join(out, "attempts"), exist_ok=True)
    settings = {"seed": seed, "subtasks": sorted(subtasks), "image_size": image_size, "action_noise": action_noise,
                "steps_per_subtask": steps_per_subtask, "num_chains": num_chains}
    settings_file = os.path.join(out, "recording.json")
    if os.path.exists(settings_file):
        saved = json.load(open(settings_file))
        differ = [k for k in settings if saved.get(k) != settings[k]]
        if differ:
            raise ValueError(f"{out} holds a recording with other settings ({', '.join(f'{k}: {saved.get(k)!r}' for k in differ)}); "
                             "use another --out")
    else:
        _write_json(settings_file, settings)
    if image_size:
        write_dataset_info(out, CAMERAS, (image_size, image_size), STATE_DIM, ACTION_DIM, fps=FPS,
                           source=f"fast-dvla record calvin (scripted expert, seed {seed})")
    done = {a["chain"] for a in load_attempts(out) if "error" not in a}
    todo = [i for i in range(num_chains) if i not in done]
    init_args = (out, chains, image_size, action_noise, steps_per_subtask, seed, calvin_path)
    bar = tqdm(total=num_chains, initial=num_chains - len(todo), desc="CALVIN chains")
    if workers <= 1:
        recorder = ChainRecorder(*init_args)
        try:
            for i in todo:
                recorder.record(i)
                bar.update(1)
        finally:
            recorder.close()
    else:
        with mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=init_args) as pool:
            for _ in pool.imap_unordered(_worker_record, todo):
                bar.update(1)
    bar.close()
    attempts = [a for a in load_attempts(out) if a["chain"] < num_chains]
    report = summarize(attempts)
    if image_size:
        report["demonstrations"] = len(list_episodes(out))
        write_dataset_info(out, CAMERAS, (image_size, image_size), STATE_DIM, ACTION_DIM, fps=FPS,
                           episodes=report["demonstrations"],
                           source=f"fast-dvla record calvin (scripted expert, seed {seed})")
    _write_json(os.path.join(out, "report.json"), report)
    with open(os.path.join(out, "report.md"), "w") as f:
        s = report["chain_summary"]
        f.write(f"{report['chains']} chains, average length {s['avg_len']:.2f}\n\n" if s else "no chains\n\n")
        f.write(markdown_table(report["subtasks"], [("subtask", "subtask", "s"), ("attempts", "attempts", "d"),
                                                    ("successes", "successes", "d"), ("rate", "rate", ".0%"),
                                                    ("mean_steps", "mean steps", ".0f")]) + "\n")
    return report
