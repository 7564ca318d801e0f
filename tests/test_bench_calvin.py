"""``fast-dvla bench calvin``: the report from chain results (always), and a real run on a tiny policy
with CALVIN's cameras (when calvin_env is installed)."""
import argparse
import importlib.util
import json

import numpy as np
import pytest

from fast_dvla.envs import calvin_protocol as protocol
from fast_dvla.envs.calvin_rollout import calvin_chains, calvin_jobs
from fast_dvla_eval import bench_calvin

HAVE_CALVIN = importlib.util.find_spec("calvin_env") is not None and importlib.util.find_spec("pybullet") is not None


def fake_chain(i, completed, chain):
    subtasks = [{"subtask": s, "success": k < completed, "steps": 50} for k, s in enumerate(chain[: completed + 1])]
    return {"completed": completed, "chain": list(chain), "subtasks": subtasks, "chain_index": i,
            "chunk_latency_s": [0.01], "nfe": [2], "query_tokens": [10]}


def fake_result(shard, indices, lengths):
    chains = protocol.official_chains(10)
    eps = {m: [fake_chain(i, n, chains[i][1]) for i, n in zip(indices, lengths[m])] for m in lengths}
    return {"suite": "calvin_D", "chain_set": "covered", "subtasks": ["open_drawer"], "seed": 1000,
            "steps_per_subtask": 360, "decode": {}, "date": "2026-12-05", "machine": "x86_64",
            "torch_threads": 1, "shard": shard, "episodes": eps}


def test_table_rows_score_chains_as_calvin_does():
    result = fake_result("0/1", [0, 1, 2, 3], {"vanilla": [5, 0, 2, 3], "fast_dvla": [1, 1, 1, 1]})
    rows = {r["method"]: r for r in bench_calvin.table_rows(result)}
    assert rows["vanilla"]["avg_len"] == pytest.approx(2.5)
    assert [rows["vanilla"][f"pos{i}"] for i in range(1, 6)] == [0.75, 0.75, 0.5, 0.25, 0.25]
    assert rows["fast_dvla"]["avg_len"] == 1.0 and rows["fast_dvla"]["pos2"] == 0.0
    per = {r["subtask"]: r for r in bench_calvin.per_subtask_rows(result)}
    chains = [c for _, c in protocol.official_chains(10)[:4]]
    for name, row in per.items():  # attempts: the chains that reached the subtask; successes: those passing it
        tried = [(i, k) for i, c in enumerate(chains) for k, s in enumerate(c) if s == name
                 and k <= [5, 0, 2, 3][i]]
        passed = [(i, k) for i, k in tried if k < [5, 0, 2, 3][i]]
        assert row["vanilla"] == f"{len(passed)}/{len(tried)}"


def test_merge_orders_chains_and_report_states_the_deviation(tmp_path, capsys):
    a = fake_result("0/2", [0, 2], {"vanilla": [5, 2]})
    b = fake_result("1/2", [1, 3], {"vanilla": [0, 3]})
    merged = bench_calvin.merge([b, a])
    assert [e["chain_index"] for e in merged["episodes"]["vanilla"]] == [0, 1, 2, 3]
    bench_calvin.report(merged, str(tmp_path / "r"))
    md = (tmp_path / "r.md").read_text()
    assert "NOT CALVIN's official" in md and "avg len" in md
    assert json.loads((tmp_path / "r.json").read_text())["episodes"]["vanilla"][1]["completed"] == 0


def test_chain_sets_and_shards():
    covered = ["open_drawer", "close_drawer", "move_slider_left", "move_slider_right", "turn_on_led",
               "turn_off_led", "lift_red_block_table", "place_in_drawer"]
    chains = calvin_chains(30, "covered", covered, seed=1000)
    assert all(set(c) <= set(covered) for _, c in chains)
    assert calvin_chains(5, "official") == protocol.official_chains(5)
    shards = [calvin_jobs(chains, f"{i}/3") for i in range(3)]
    assert sorted(sum(shards, [])) == list(range(30))
    with pytest.raises(ValueError, match="needs the list"):
        calvin_chains(5, "covered", None)


def calvin_tiny_policy_dir(path):
    from fast_dvla import DecodeConfig, FastDVLAPolicy
    from fast_dvla.processor import StateNormalizer
    from fast_dvla.tokenizer import ActionTokenizer
    from helpers import tiny_model

    model = tiny_model(0, sharpness=8.0, cameras=("static", "gripper"))
    rng = np.random.default_rng(0)
    tok = ActionTokenizer.fit(rng.uniform(-1, 1, (200, 7)), gripper_dims=(6,))
    FastDVLAPolicy(model, tok, StateNormalizer.fit(rng.normal(size=(50, 8))), n_action_steps=4,
                   decode_config=DecodeConfig(method="fast_dvla")).save_pretrained(str(path))
    return str(path)


@pytest.mark.skipif(not HAVE_CALVIN, reason="calvin_env is not installed (a checkout: pip install -e calvin_env)")
def test_bench_calvin_runs_every_decoder_and_resumes(tmp_path, capsys):
    from fast_dvla.subcommands import add_target_parsers

    policy = calvin_tiny_policy_dir(tmp_path / "policy")
    parser = argparse.ArgumentParser()
    add_target_parsers(parser, {"calvin": "fast_dvla_eval.bench_calvin"})
    argv = ["calvin", "--teacher", policy, "--student", policy, "--chains", "2", "--subtasks",
            "open_drawer,close_drawer,move_slider_left,move_slider_right,turn_on_led,turn_off_led,"
            "turn_on_lightbulb,turn_off_lightbulb,lift_red_block_table,place_in_drawer",
            "--steps-per-subtask", "6", "--decoders", "vanilla,fast_dvla", "--timing-obs", "3",
            "--agreement-obs", "2", "--threads", "1", "--out", str(tmp_path / "b")]
    args = parser.parse_args(argv)
    args.shard = "0/1"
    bench_calvin.main(args)
    out = json.loads((tmp_path / "b.json").read_text())
    for m in ("vanilla", "fast_dvla"):
        eps = out["episodes"][m]
        assert len(eps) == 2 and all(e["subtasks"][0]["steps"] <= 6 for e in eps)
        assert all(len(e["nfe"]) >= 1 for e in eps)  # 6 steps at 4 actions a chunk: 2 chunks per subtask tried
    assert {r["method"] for r in out["throughput"]} == {"vanilla", "fast_dvla"}
    # the same arguments again: every chain comes from the journal
    args = parser.parse_args(argv)
    args.shard = "0/1"
    bench_calvin.main(args)
    assert "resuming" in capsys.readouterr().out
