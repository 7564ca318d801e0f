"""Golden outputs of CALVIN's own evaluation protocol code, for tests/test_calvin_protocol.py.

Runs the original sequence generator (``get_sequences``) and initial-scene
function (``get_env_state_for_initial_condition``) from a checkout of
github.com/mees/calvin (not part of this repository) and writes what they
return to ``tests/golden/calvin_protocol.json``::

    python scripts/goldens/calvin_protocol.py --calvin /path/to/calvin [--commit SHA]

CALVIN's code hashes with ``pyhash``, which does not build on Python 3.11; it
is replaced here by ``fast_dvla.envs.calvin_protocol.fnv1_32``, which the
tests check against pyhash's own published test values. Nothing else of the
original is changed: its modules are loaded with stubs for the imports the two
functions do not use (models, torch, cv2).
"""
import argparse
import ast
import contextlib
import json
import sys
import types
from pathlib import Path

import numpy as np

from fast_dvla.envs.calvin_protocol import SUBTASKS, fnv1_32, initial_conditions


@contextlib.contextmanager
def temp_seed(seed):  # CALVIN's helper (evaluation/utils.py), needed by the generator
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def load_generator(calvin: Path):
    for name in ("calvin_agent", "calvin_agent.evaluation"):
        sys.modules.setdefault(name, types.ModuleType(name))
    utils = types.ModuleType("calvin_agent.evaluation.utils")
    utils.temp_seed = temp_seed
    sys.modules["calvin_agent.evaluation.utils"] = utils
    module = types.ModuleType("calvin_multistep_sequences")
    sys.modules[module.__name__] = module  # its worker processes pickle functions by module name
    src = (calvin / "calvin_models/calvin_agent/evaluation/multistep_sequences.py").read_text()
    exec(compile(src, "multistep_sequences.py", "exec"), module.__dict__)
    return module


def load_initial_scene(calvin: Path):
    src = (calvin / "calvin_models/calvin_agent/evaluation/utils.py").read_text()
    fn = next(n for n in ast.parse(src).body
              if isinstance(n, ast.FunctionDef) and n.name == "get_env_state_for_initial_condition")
    namespace = {"np": np, "pi": np.pi, "hasher": fnv1_32, "temp_seed": temp_seed}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "utils.py", "exec"), namespace)
    return namespace["get_env_state_for_initial_condition"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calvin", type=Path, required=True, help="a checkout of github.com/mees/calvin")
    ap.add_argument("--commit", default="unknown", help="the checkout's commit, recorded in the output")
    ap.add_argument("--num-chains", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "tests/golden/calvin_protocol.json")
    args = ap.parse_args()
    generator = load_generator(args.calvin)
    scene_of = load_initial_scene(args.calvin)
    conditions = initial_conditions()
    chains = generator.get_sequences(args.num_chains, num_workers=2)
    index = {name: i for i, name in enumerate(SUBTASKS)}
    out = {
        "source": f"github.com/mees/calvin@{args.commit}",
        "made_by": "scripts/goldens/calvin_protocol.py",
        "subtasks": list(generator.tasks),
        "categories": generator.task_categories,
        "conditions": conditions,
        # each chain as [condition index, [subtask indices into "subtasks"]]
        "chains": [[conditions.index(c), [index[s] for s in seq]] for c, seq in chains],
        "initial_scenes": [[list(map(float, part)) for part in scene_of(dict(c))] for c in conditions],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {args.out}: {len(out['chains'])} chains, {len(conditions)} initial conditions")


if __name__ == "__main__":
    main()
