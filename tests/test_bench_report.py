"""Merging benchmark shards and the comparison table (no simulator needed)."""
import json

import numpy as np
import pytest

from fast_dvla.envs.rollout import libero_jobs
from fast_dvla_eval.bench_libero import merge, report, table_rows


def shard(idx, successes, with_speed):
    result = {"suite": "libero_object", "date": "2026-11-22", "machine": "x86_64", "torch_threads": 2,
              "shard": f"{idx}/2", "episodes": {m: [{"success": s, "task": idx, "init": k}
                                                   for k, s in enumerate(successes)]
                                               for m in ("vanilla", "fast_dvla")}}
    if with_speed:
        result["throughput"] = [{"method": "vanilla", "tokens_per_s": 100.0, "speedup": 1.0, "nfe": 12.0},
                                {"method": "fast_dvla", "tokens_per_s": 300.0, "speedup": 3.0, "nfe": 8.0}]
        result["agreement"] = {"vanilla": 1.0, "fast_dvla": 0.9}
        result["timing_observations"] = 4
    return result


def test_merge_keeps_every_episode_and_one_speed_measurement(tmp_path):
    merged = merge([shard(1, [False, True], False), shard(0, [True, True], True)])
    rows = {r["method"]: r for r in table_rows(merged)}
    assert rows["vanilla"]["episodes"] == 4 and rows["vanilla"]["success"] == 0.75
    assert rows["fast_dvla"]["speedup"] == 3.0 and rows["fast_dvla"]["agreement"] == 0.9
    report(merged, str(tmp_path / "r"))
    assert json.loads((tmp_path / "r.json").read_text())["episodes"]["fast_dvla"][0]["success"]
    table = (tmp_path / "r.md").read_text()
    assert "| fast_dvla | 4 | 75% | 90% |" in table
    # per task: shard 1 is task 1 (1 of 2 succeeded), shard 0 task 0 (2 of 2)
    assert "| task | vanilla | fast_dvla |" in table and "| 0 | 2/2 | 2/2 |" in table and "| 1 | 1/2 | 1/2 |" in table


def tiny_policy(**kwargs):
    """A random tiny policy (``FastDVLAPolicy`` keyword arguments: decode_config, n_action_steps)."""
    from fast_dvla import FastDVLAPolicy
    from fast_dvla.tokenizer import ActionTokenizer

    from helpers import tiny_model

    model = tiny_model()
    cfg = model.config
    tok = ActionTokenizer(np.full(cfg.action_dim, -1.0), np.ones(cfg.action_dim), cfg.n_bins)
    return FastDVLAPolicy(model, tok, **kwargs)


def test_each_decoder_runs_with_its_policys_saved_settings_unless_overridden():
    from fast_dvla import DecodeConfig
    from fast_dvla.benchmark.throughput import policy_configs

    teacher = tiny_policy(decode_config=DecodeConfig(method="vanilla", tau_conf=0.5, vanilla_steps=10))
    student = tiny_policy(decode_config=DecodeConfig(method="fast_dvla", tau_conf=0.2, tau_act=0.6))
    configs = policy_configs(["vanilla", "fast_dllm", "block_diffusion", "fast_dvla"], teacher, student)
    assert {m: c.method for m, c in configs.items()} == {m: m for m in configs}
    assert configs["fast_dllm"].tau_conf == 0.5 and configs["vanilla"].vanilla_steps == 10
    assert configs["fast_dvla"].tau_conf == 0.2 and configs["block_diffusion"].tau_act == 0.6
    forced = policy_configs(["vanilla", "fast_dvla"], teacher, student, tau_conf=0.7, tau_act=None)
    assert forced["fast_dvla"].tau_conf == 0.7 == forced["vanilla"].tau_conf and forced["fast_dvla"].tau_act == 0.6
    # settings a student keeps for a decoder that is not its default
    student = tiny_policy(decode_config=DecodeConfig(method="vanilla_cached", vanilla_steps=5),
                          method_settings={"fast_dvla": {"token_rule": "mean", "near_bins": 3}})
    configs = policy_configs(["vanilla_cached", "fast_dvla", "block_diffusion"], teacher, student)
    assert (configs["fast_dvla"].token_rule, configs["fast_dvla"].near_bins) == ("mean", 3)
    assert configs["vanilla_cached"].token_rule == "argmax" == configs["block_diffusion"].token_rule
    assert policy_configs(["fast_dvla"], teacher, student, tau_conf=0.7)["fast_dvla"].near_bins == 3


@pytest.mark.parametrize("module", ["bench_libero", "micro_bench"])
def test_both_benchmarks_take_the_same_override_flags(module):
    import argparse
    import importlib

    from fast_dvla import DecodeConfig
    from fast_dvla.benchmark.throughput import overrides_from, policy_configs

    parser = argparse.ArgumentParser()
    importlib.import_module(f"fast_dvla_eval.{module}").add_arguments(parser)
    extra = []
    unset = overrides_from(parser.parse_args(extra))
    assert set(unset.values()) == {None}  # nothing forced: each policy's own settings
    args = parser.parse_args(extra + ["--tau-conf", "0.3", "--vanilla-steps", "6", "--token-rule", "mean",
                                      "--near-bins", "2"])
    student = tiny_policy(decode_config=DecodeConfig(method="fast_dvla", tau_act=0.6))
    config = policy_configs(["fast_dvla"], tiny_policy(), student, **overrides_from(args))["fast_dvla"]
    assert (config.tau_conf, config.vanilla_steps, config.token_rule, config.near_bins) == (0.3, 6, "mean", 2)
    assert config.tau_act == 0.6


@pytest.mark.parametrize("module", ["fast_dvla_eval.bench_libero", "fast_dvla_eval.micro_bench", "fast_dvla.commands.export"])
def test_every_command_taking_decoding_settings_takes_all_of_them(module):
    import argparse
    import importlib

    from fast_dvla.config import TUNABLE_SETTINGS

    parser = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(parser)
    flags = {opt for action in parser._actions for opt in action.option_strings}
    assert {f"--{name.replace('_', '-')}" for name, _, _ in TUNABLE_SETTINGS} <= flags


def test_report_names_the_settings_each_decoder_ran_with(tmp_path):
    result = shard(0, [True], True)
    result["decode"] = {"vanilla": {"tau_conf": 0.5, "vanilla_steps": 12},
                        "fast_dvla": {"tau_conf": 0.2, "tau_add": 0.5, "tau_act": 0.7, "fallback_n": 2}}
    report(result, str(tmp_path / "r"))
    text = (tmp_path / "r.md").read_text()
    assert "vanilla: tau_conf=0.5, vanilla_steps=12; fast_dvla: tau_conf=0.2, tau_add=0.5" in text


def test_shards_split_the_task_and_initial_state_pairs():
    shards = [libero_jobs("libero_object", "0-1", "15-17", f"{i}/2") for i in range(2)]
    assert shards[0] == [(0, 15), (0, 17), (1, 16)] and shards[1] == [(0, 16), (1, 15), (1, 17)]
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(SystemExit, match="--shard"):
            libero_jobs("libero_object", "0-1", "15-17", bad)


def test_action_hz_counts_the_steps_each_policy_executes_per_chunk():
    from fast_dvla import DecodeConfig
    from fast_dvla.benchmark.throughput import measure

    teacher, student = tiny_policy(), tiny_policy(n_action_steps=2)
    cfg = teacher.model.config
    rng = np.random.default_rng(0)
    obs = {"images": {c: rng.integers(0, 255, (cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
                      for c in cfg.cameras},
           "state": np.zeros(cfg.state_dim, np.float32), "instruction": "pick up the box"}
    rows = {r["method"]: r for r in measure(teacher, student, [obs], DecodeConfig(), ["vanilla", "fast_dvla"],
                                            warmup=0, progress=False)}
    assert rows["vanilla"]["action_hz"] == pytest.approx(rows["vanilla"]["chunk_hz"] * cfg.horizon)
    assert rows["fast_dvla"]["action_hz"] == pytest.approx(rows["fast_dvla"]["chunk_hz"] * 2)
