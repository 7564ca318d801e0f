"""CALVIN's long-horizon protocol: chains of 5 subtasks, their initial scenes, and the score.

Everything here is plain Python and numpy (no simulator), so it is tested
where calvin_env is absent.

- The 34 subtasks as symbolic transitions (preconditions on a coarse scene
  state -> effects) and their categories; a chain never repeats a category.
- :func:`official_chains` reproduces CALVIN's evaluation sequence generator
  (``get_sequences``): the same initial conditions, per-condition seeds and
  final shuffle, so ``official_chains(1000)`` is the benchmark's 1000 chains in
  order (checked against golden output of CALVIN's own code in the tests).
- :func:`restricted_chains` samples chains from a subset of subtasks (those a
  scripted expert covers): a deviation from the official protocol, reported
  as such by the benchmark.
- :func:`initial_scene` is CALVIN's ``get_env_state_for_initial_condition``:
  the robot's home pose and a scene whose block placement and yaw are seeded
  by an FNV-1 hash of the condition (CALVIN hashes with ``pyhash``, which does
  not build on Python 3.11; :func:`fnv1_32` is the same function).
- :func:`chain_summary`: success at each chain position and the average chain
  length, with intervals.

The task table, instructions and initial scenes restate CALVIN's protocol
(github.com/mees/calvin, MIT licence) so that results compare with published
ones.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from fast_dvla.benchmark.stats import wilson_interval

CHAIN_LENGTH = 5
STEPS_PER_SUBTASK = 360
BLOCKS = ("red", "blue", "pink")

# The language instruction of each subtask (CALVIN's validation annotations).
INSTRUCTIONS = {
    **{f"rotate_{c}_block_{d}": f"take the {c} block and rotate it to the {d}"
       for c in BLOCKS for d in ("right", "left")},
    **{f"push_{c}_block_{d}": f"go push the {c} block {d}" for c in BLOCKS for d in ("right", "left")},
    "move_slider_left": "push the sliding door to the left side",
    "move_slider_right": "push the sliding door to the right side",
    "open_drawer": "pull the handle to open the drawer",
    "close_drawer": "push the handle to close the drawer",
    **{f"lift_{c}_block_table": f"grasp and lift the {c} block" for c in BLOCKS},
    **{f"lift_{c}_block_slider": f"lift the {c} block from the sliding cabinet" for c in BLOCKS},
    **{f"lift_{c}_block_drawer": f"Take the {c} block from the drawer" for c in BLOCKS},
    "place_in_slider": "store the grasped block in the sliding cabinet",
    "place_in_drawer": "store the grasped block in the drawer",
    "push_into_drawer": "slide the block that it falls into the drawer",
    "stack_block": "stack the grasped block",
    "unstack_block": "remove the stacked block",
    "turn_on_lightbulb": "use the switch to turn on the light bulb",
    "turn_off_lightbulb": "use the switch to turn off the light bulb",
    "turn_on_led": "press the button to turn on the led light",
    "turn_off_led": "press the button to turn off the led light",
}


def _block(c: str) -> str:
    return f"{c}_block"


def _task_table() -> dict[str, list[tuple[dict, dict]]]:
    """Subtask -> [(condition, effect)], in CALVIN's order (the official sampler draws from this order)."""
    t: dict[str, list[tuple[dict, dict]]] = {}
    on_table_free = lambda c: {_block(c): "table", "grasped": 0}  # noqa: E731
    for verb in ("rotate", "push"):
        for c in BLOCKS:
            for d in ("right", "left"):
                t[f"{verb}_{c}_block_{d}"] = [(on_table_free(c), {_block(c): "table"})]
    t["move_slider_left"] = [({"slider": "right", "grasped": 0}, {"slider": "left"})]
    t["move_slider_right"] = [({"slider": "left", "grasped": 0}, {"slider": "right"})]
    t["open_drawer"] = [({"drawer": "closed", "grasped": 0}, {"drawer": "open"})]
    t["close_drawer"] = [({"drawer": "open", "grasped": 0}, {"drawer": "closed"})]
    lifted = lambda c: {_block(c): "grasped", "grasped": 1}  # noqa: E731
    for c in BLOCKS:
        t[f"lift_{c}_block_table"] = [(on_table_free(c), lifted(c))]
        # a block in one half of the sliding cabinet is reachable when the door covers the other half
        t[f"lift_{c}_block_slider"] = [({_block(c): "slider_left", "slider": "right", "grasped": 0}, lifted(c)),
                                       ({_block(c): "slider_right", "slider": "left", "grasped": 0}, lifted(c))]
        t[f"lift_{c}_block_drawer"] = [({_block(c): "drawer", "drawer": "open", "grasped": 0}, lifted(c))]
    t["place_in_slider"] = [({_block(c): "grasped", "slider": s, "grasped": 1}, {_block(c): f"slider_{s}", "grasped": 0})
                            for c in BLOCKS for s in ("right", "left")]
    t["place_in_drawer"] = [({_block(c): "grasped", "drawer": "open", "grasped": 1}, {_block(c): "drawer", "grasped": 0})
                            for c in BLOCKS]
    pairs = [(top, bottom) for top in BLOCKS for bottom in BLOCKS if top != bottom]
    t["stack_block"] = [({_block(a): "grasped", _block(b): "table", "grasped": 1},
                         {_block(a): "stacked_top", _block(b): "stacked_bottom", "grasped": 0}) for a, b in pairs]
    t["unstack_block"] = [({_block(a): "stacked_top", _block(b): "stacked_bottom", "grasped": 0},
                           {_block(a): "table", _block(b): "table"}) for a, b in pairs]
    for light in ("lightbulb", "led"):
        t[f"turn_on_{light}"] = [({light: 0, "grasped": 0}, {light: 1})]
        t[f"turn_off_{light}"] = [({light: 1, "grasped": 0}, {light: 0})]
    in_slider = ["slider_right", "slider_left"]
    t["push_into_drawer"] = [({_block(c): "table", **{_block(o): in_slider for o in BLOCKS if o != c},
                               "drawer": "open", "grasped": 0}, {_block(c): "drawer", "grasped": 0}) for c in BLOCKS]
    return t


TASKS = _task_table()
SUBTASKS = tuple(TASKS)


def _category(name: str) -> int:
    """Subtasks of one category never appear twice in a chain."""
    if name.startswith(("rotate_", "push_")) and name != "push_into_drawer":
        return 1
    if name.startswith("move_slider"):
        return 2
    if name in ("open_drawer", "close_drawer"):
        return 3
    if name.startswith("lift_"):
        return {"table": 4, "slider": 5, "drawer": 6}[name.rsplit("_", 1)[1]]
    if name.startswith("place_in"):
        return 7
    if name.startswith("turn_"):
        return 8
    return {"push_into_drawer": 9, "stack_block": 10, "unstack_block": 11}[name]


CATEGORIES = {name: _category(name) for name in SUBTASKS}

# the symbolic scene variables and their values, in CALVIN's order (the order is part of the hash seed)
CONDITION_VALUES = {
    "led": [0, 1],
    "lightbulb": [0, 1],
    "slider": ["right", "left"],
    "drawer": ["closed", "open"],
    "red_block": ["table", "slider_right", "slider_left"],
    "blue_block": ["table", "slider_right", "slider_left"],
    "pink_block": ["table", "slider_right", "slider_left"],
    "grasped": [0],
}


def initial_conditions() -> list[dict]:
    """CALVIN's evaluation start states: one or two blocks on the table, at most one per cabinet half."""
    out = []
    for values in itertools.product(*CONDITION_VALUES.values()):
        blocks = values[4:7]
        if blocks.count("table") in (1, 2) and blocks.count("slider_right") < 2 and blocks.count("slider_left") < 2:
            out.append(dict(zip(CONDITION_VALUES, values)))
    return out


def _holds(state: dict, condition: dict) -> bool:
    for key, want in condition.items():
        have = state[key]
        if isinstance(want, list):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


def next_states(state: dict, subtask: str) -> list[dict]:
    """The states ``subtask`` can lead to from ``state`` (empty when its preconditions do not hold)."""
    return [{**state, **effect} for condition, effect in TASKS[subtask] if _holds(state, condition)]


def is_valid_chain(state: dict, chain) -> bool:
    """Each subtask's preconditions hold (with exactly one outcome) in turn, and no category repeats."""
    for name in chain:
        states = next_states(state, name)
        if len(states) != 1:
            return False
        state = states[0]
    categories = [CATEGORIES[name] for name in chain]
    return len(set(categories)) == len(categories)


def _per_condition_counts(num_chains: int, num_conditions: int) -> list[int]:
    return [len(part) for part in np.array_split(np.arange(num_chains), num_conditions)]


def official_chains(num_chains: int = 1000) -> list[tuple[dict, tuple[str, ...]]]:
    """CALVIN's evaluation chains ``[(initial condition, (5 subtask names))]``, exactly as its generator orders them."""
    conditions = initial_conditions()
    categories = [CATEGORIES[name] for name in SUBTASKS]
    pairs = []
    for i, (condition, count) in enumerate(zip(conditions, _per_condition_counts(num_chains, len(conditions)))):
        rng = np.random.RandomState(i)  # CALVIN seeds each condition's worker with its index
        found = []
        while len(found) < count:
            # CALVIN draws rng.choice(subtasks, 5, replace=False), which is permutation(34)[:5] of the
            # same stream; the cheap category test first, as most draws fail it
            picks = rng.permutation(len(SUBTASKS))[:CHAIN_LENGTH]
            if len({categories[k] for k in picks}) < CHAIN_LENGTH:
                continue
            chain = tuple(SUBTASKS[k] for k in picks)
            if is_valid_chain(condition, chain):
                found.append(chain)
        pairs.extend((condition, chain) for chain in found)
    np.random.RandomState(0).shuffle(pairs)  # the final shuffle under CALVIN's temporary seed 0
    return pairs


def valid_chains(condition: dict, subtasks) -> list[tuple[str, ...]]:
    """Every valid chain from ``condition`` using only ``subtasks`` (in subtask order, depth-first)."""
    subtasks = [s for s in SUBTASKS if s in set(subtasks)]
    out: list[tuple[str, ...]] = []

    def extend(state, chain, used):
        if len(chain) == CHAIN_LENGTH:
            out.append(tuple(chain))
            return
        for name in subtasks:
            if CATEGORIES[name] in used:
                continue
            states = next_states(state, name)
            if len(states) == 1:
                extend(states[0], chain + [name], used | {CATEGORIES[name]})

    extend(condition, [], frozenset())
    return out


def restricted_chains(num_chains: int, subtasks, seed: int = 0) -> list[tuple[dict, tuple[str, ...]]]:
    """Chains drawn only from ``subtasks``: uniform over the valid chains of each initial condition that has any,
    the chains spread evenly over those conditions, then shuffled (all from ``seed``)."""
    unknown = sorted(set(subtasks) - set(SUBTASKS))
    if unknown:
        raise ValueError(f"unknown CALVIN subtasks {unknown}")
    usable = [(c, chains) for c in initial_conditions() if (chains := valid_chains(c, subtasks))]
    if not usable:
        raise ValueError(f"no chain of {CHAIN_LENGTH} distinct-category subtasks can be built from {sorted(subtasks)}")
    rng = np.random.RandomState(seed)
    pairs = []
    for (condition, chains), count in zip(usable, _per_condition_counts(num_chains, len(usable))):
        for k in rng.choice(len(chains), size=count, replace=count > len(chains)):
            pairs.append((condition, chains[k]))
    rng.shuffle(pairs)
    return pairs


def fnv1_32(data: bytes | str, seed: int = 0) -> int:
    """32-bit FNV-1 as ``pyhash.fnv1_32`` computes it: seed 0 by default, ``str`` hashed as UTF-16-LE."""
    if isinstance(data, str):
        data = data.encode("utf-16-le")
    h = seed & 0xFFFFFFFF
    for byte in data:
        h = (h * 0x01000193) & 0xFFFFFFFF
        h ^= byte
    return h


# CALVIN's evaluation start: the robot's home pose (tcp pos 3, euler 3, width, 7 joints, gripper open)
HOME_ROBOT_OBS = np.array([0.02586889, -0.2313129, 0.5712808, 3.09045411, -0.02908596, 1.50013585, 0.07999963,
                           -1.21779124, 1.03987629, 2.11978254, -2.34205014, -0.87015899, 1.64119093, 0.55344928,
                           1.0])
_SLIDER_LEFT = np.array([-2.40851662e-01, 9.24044687e-02, 4.60990009e-01])
_SLIDER_RIGHT = np.array([7.03416330e-02, 9.24044687e-02, 4.60990009e-01])
_TABLE = (np.array([5.00000896e-02, -1.20000177e-01, 4.59990009e-01]),
          np.array([2.29995412e-01, -1.19995140e-01, 4.59990010e-01]))
_YAW_RANGE = (math.pi / 2 - math.pi / 8, math.pi / 2 + math.pi / 8)


def initial_scene(condition: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(robot_obs [15], scene_obs [24])`` of an initial condition, as CALVIN's evaluation resets the scene.

    scene_obs: slider, drawer, button, switch, lightbulb, led (6), then each block's position and euler xyz
    (red, blue, pink). Which table spot each block gets and its yaw are seeded by the condition's hash.
    """
    missing = [k for k in CONDITION_VALUES if k not in condition]
    if missing:
        raise KeyError(f"initial condition lacks {missing}")
    rng = np.random.RandomState(fnv1_32(str(condition.values())))
    table = list(_TABLE)
    rng.shuffle(table)
    scene = np.zeros(24)
    if condition["slider"] == "left":
        scene[0] = 0.28
    if condition["drawer"] == "open":
        scene[1] = 0.22
    if condition["lightbulb"] == 1:
        scene[3] = 0.088
    scene[4], scene[5] = condition["lightbulb"], condition["led"]
    cabinet = {"slider_right": _SLIDER_RIGHT, "slider_left": _SLIDER_LEFT}
    scene[6:9] = cabinet.get(condition["red_block"], table[0])
    scene[11] = rng.uniform(*_YAW_RANGE)
    if condition["blue_block"] in cabinet:
        scene[12:15] = cabinet[condition["blue_block"]]
    else:  # the second table spot when red took the first
        scene[12:15] = table[1] if condition["red_block"] == "table" else table[0]
    scene[17] = rng.uniform(*_YAW_RANGE)
    scene[18:21] = cabinet.get(condition["pink_block"], table[1])
    scene[23] = rng.uniform(*_YAW_RANGE)
    return HOME_ROBOT_OBS.copy(), scene


def chain_summary(lengths) -> dict:
    """Success at each chain position (fraction of chains completing at least i subtasks, Wilson 95%) and the
    average chain length (number of consecutive subtasks completed, 0-5; 95% normal interval)."""
    lengths = [int(x) for x in lengths]
    bad = [x for x in lengths if not 0 <= x <= CHAIN_LENGTH]
    if bad:
        raise ValueError(f"chain lengths must lie in [0, {CHAIN_LENGTH}], got {bad[:5]}")
    n = len(lengths)
    arr = np.asarray(lengths, dtype=np.float64)
    mean = float(arr.mean()) if n else 0.0
    half = 1.96 * float(arr.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    positions = []
    for i in range(1, CHAIN_LENGTH + 1):
        k = int((arr >= i).sum())
        lo, hi = wilson_interval(k, n)
        positions.append({"position": i, "successes": k, "rate": k / n if n else 0.0, "ci95": [lo, hi]})
    return {"chains": n, "avg_len": mean, "avg_len_ci95": [mean - half, mean + half], "positions": positions}
