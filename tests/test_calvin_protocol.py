"""CALVIN's protocol without the simulator: the hash, the chains, the initial scenes, the score.

The golden file was written by scripts/goldens/calvin_protocol.py from CALVIN's
own evaluation code (its commit is recorded in the file).
"""
import json
from pathlib import Path

import numpy as np
import pytest

from fast_dvla.envs import calvin_protocol as cp

GOLDEN = json.loads((Path(__file__).parent / "golden" / "calvin_protocol.json").read_text())


def test_fnv1_32_matches_pyhash_published_values():
    # pyhash's own test suite (tests/test_fnv1.py, data b"test" / u"test"): bytes, seeded with the first
    # hash, and a str (which pyhash hashes as UTF-16-LE)
    assert cp.fnv1_32(b"test") == 3698262380
    assert cp.fnv1_32(b"test", seed=3698262380) == 660137056
    assert cp.fnv1_32("test") == 3910690890
    assert cp.fnv1_32(b"") == 0  # pyhash's FNV starts from seed 0, not the usual offset basis


def test_task_table_and_categories_match_calvin():
    assert list(cp.SUBTASKS) == GOLDEN["subtasks"]
    assert cp.CATEGORIES == GOLDEN["categories"]
    assert len(cp.SUBTASKS) == 34 and set(cp.INSTRUCTIONS) == set(cp.SUBTASKS)


def test_initial_conditions_match_calvin():
    assert cp.initial_conditions() == GOLDEN["conditions"]


def test_official_chains_reproduce_calvins_generator_in_order():
    conditions = GOLDEN["conditions"]
    want = [(conditions[c], tuple(GOLDEN["subtasks"][i] for i in seq)) for c, seq in GOLDEN["chains"]]
    got = cp.official_chains(len(want))
    assert got == want
    assert all(cp.is_valid_chain(c, chain) for c, chain in got)


def test_initial_scenes_match_calvin():
    for condition, (robot, scene) in zip(GOLDEN["conditions"], GOLDEN["initial_scenes"]):
        got_robot, got_scene = cp.initial_scene(condition)
        np.testing.assert_array_equal(got_robot, robot)
        np.testing.assert_array_equal(got_scene, scene)


def test_initial_scene_depends_on_the_hash():
    # the negative control: another seed for the block shuffle and yaws gives other scenes
    condition = GOLDEN["conditions"][5]
    _, scene = cp.initial_scene(condition)
    rng = np.random.RandomState(cp.fnv1_32(str(condition.values())) + 1)
    assert not np.isclose(scene[11], rng.uniform(*cp._YAW_RANGE))


def test_chain_validity_rules():
    cond = {"led": 0, "lightbulb": 0, "slider": "right", "drawer": "closed", "red_block": "table",
            "blue_block": "slider_left", "pink_block": "table", "grasped": 0}
    assert cp.is_valid_chain(cond, ["open_drawer", "turn_on_led", "move_slider_left", "lift_red_block_table",
                                    "place_in_drawer"])
    assert not cp.is_valid_chain(cond, ["close_drawer", "turn_on_led", "move_slider_left",
                                        "lift_red_block_table", "place_in_drawer"])  # drawer is closed
    assert not cp.is_valid_chain(cond, ["turn_on_led", "turn_on_lightbulb", "open_drawer", "move_slider_left",
                                        "lift_red_block_table"])  # two lighting subtasks
    assert cp.next_states(cond, "place_in_slider") == []  # nothing is held


def test_restricted_chains_use_only_the_given_subtasks_and_are_seeded():
    covered = ["open_drawer", "close_drawer", "move_slider_left", "move_slider_right", "turn_on_led",
               "turn_off_led", "turn_on_lightbulb", "turn_off_lightbulb", "lift_red_block_table",
               "lift_blue_block_table", "lift_pink_block_table", "place_in_drawer", "place_in_slider"]
    chains = cp.restricted_chains(200, covered, seed=3)
    assert len(chains) == 200
    assert all(set(chain) <= set(covered) and cp.is_valid_chain(c, chain) for c, chain in chains)
    assert chains == cp.restricted_chains(200, covered, seed=3)
    assert chains != cp.restricted_chains(200, covered, seed=4)
    assert len({tuple(sorted(c.items())) for c, _ in chains}) > 10  # spread over initial conditions


def test_restricted_chains_refuse_what_cannot_form_a_chain():
    with pytest.raises(ValueError, match="unknown CALVIN subtasks"):
        cp.restricted_chains(5, ["open_drawer", "fly"])
    with pytest.raises(ValueError, match="no chain"):
        cp.restricted_chains(5, ["open_drawer", "close_drawer"])  # one category


def test_chain_summary():
    s = cp.chain_summary([5, 0, 2, 3, 5])
    assert s["chains"] == 5 and s["avg_len"] == pytest.approx(3.0)
    assert [p["successes"] for p in s["positions"]] == [4, 4, 3, 2, 2]
    lo, hi = s["positions"][0]["ci95"]
    assert lo < 0.8 < hi
    assert s["avg_len_ci95"][0] < 3.0 < s["avg_len_ci95"][1]
    with pytest.raises(ValueError, match="chain lengths"):
        cp.chain_summary([6])
