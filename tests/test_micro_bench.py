import argparse
import json

import pytest

from fast_dvla_eval import micro_bench


def test_micro_bench_reports_every_decoder(tmp_path):
    parser = argparse.ArgumentParser()
    micro_bench.add_arguments(parser)
    args = parser.parse_args(["--random", "--repeats", "2", "--warmup", "1", "--out", str(tmp_path / "r.json")])
    micro_bench.main(args)
    result = json.loads((tmp_path / "r.json").read_text())
    rows = {r["method"]: r for r in result["results"]}
    assert set(rows) == {"vanilla", "fast_dllm", "block_diffusion", "fast_dvla", "vanilla_cached"}
    assert rows["vanilla"]["speedup"] == 1.0
    assert rows["vanilla"]["nfe"] == 12 and rows["vanilla"]["query_tokens"] == 12 * (49 + 56)
    # the exact cache forwards far fewer query tokens than recomputing everything
    assert rows["fast_dvla"]["query_tokens"] < rows["vanilla"]["query_tokens"] / 2
    # the teacher's schedule on the student: as many forwards, the prefix never recomputed
    assert rows["vanilla_cached"]["nfe"] == 12
    assert rows["vanilla_cached"]["query_tokens"] <= 49 + 12 * 56
    assert all(r["tokens_per_s"] > 0 and r["p90_ms"] >= r["latency_ms"] for r in rows.values())


def test_micro_bench_times_demonstration_frames(tmp_path):
    from fast_dvla.training.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(str(tmp_path / "demos"), 2, image_size=64, T=5)
    parser = argparse.ArgumentParser()
    micro_bench.add_arguments(parser)
    args = parser.parse_args(["--random", "--data", data, "--decoders", "vanilla,fast_dvla", "--repeats", "3",
                              "--warmup", "0", "--out", str(tmp_path / "r.json")])
    micro_bench.main(args)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["observations"] == data and result["repeats"] == 3
    assert [r["method"] for r in result["results"]] == ["vanilla", "fast_dvla"]
    for bad, match in ((["--decoders", "vanila"], "unknown decoders"), (["--batch", "2"], "--batch 1")):
        args = parser.parse_args(["--random", "--data", data, *bad])
        with pytest.raises(SystemExit, match=match):
            micro_bench.run(args)


def test_micro_bench_runs_each_decoder_with_its_policys_own_settings(tmp_path):
    """As bench libero: a student saved with vanilla_steps 5 decodes vanilla_cached in 5 forwards
    while the teacher's vanilla keeps its 12; a flag overrides both."""
    from fast_dvla.training.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(str(tmp_path / "demos"), 1, image_size=64, T=3)
    teacher = micro_bench.random_policy(0)
    student = micro_bench.random_policy(1)
    student.decode_config = student.decode_config.replace(vanilla_steps=5)
    teacher.save_pretrained(str(tmp_path / "t"))
    student.save_pretrained(str(tmp_path / "s"))
    parser = argparse.ArgumentParser()
    micro_bench.add_arguments(parser)
    common = ["--teacher", str(tmp_path / "t"), "--student", str(tmp_path / "s"), "--data", data,
              "--decoders", "vanilla,vanilla_cached", "--repeats", "2", "--warmup", "0"]
    rows = {r["method"]: r for r in micro_bench.run(parser.parse_args(common))["results"]}
    assert rows["vanilla"]["nfe"] == 12 and rows["vanilla_cached"]["nfe"] == 5
    rows = {r["method"]: r for r in micro_bench.run(parser.parse_args(common + ["--vanilla-steps", "7"]))["results"]}
    assert rows["vanilla"]["nfe"] == 7 and rows["vanilla_cached"]["nfe"] == 7


def test_micro_bench_times_a_ud_vla_checkpoint(tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("ud_vla_tiny", root / "scripts/goldens/ud_vla_tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    checkpoint = str(tiny.write(tmp_path / "ckpt"))
    parser = argparse.ArgumentParser()
    micro_bench.add_arguments(parser)
    args = parser.parse_args(["--ud-vla", checkpoint, "--repeats", "2", "--warmup", "0",
                              "--decoders", "vanilla,fast_dvla,vanilla_cached", "--out", str(tmp_path / "r.json")])
    micro_bench.main(args)
    result = json.loads((tmp_path / "r.json").read_text())
    rows = {r["method"]: r for r in result["results"]}
    P, L = result["prefix_tokens"], result["chunk_tokens"]
    assert L == 69 and P > 600  # the prompt with both cameras' codes and the masked future frames
    assert rows["vanilla"]["nfe"] == 12 and rows["vanilla"]["query_tokens"] == 12 * (P + L)
    assert rows["fast_dvla"]["query_tokens"] < rows["vanilla"]["query_tokens"] / 2
    assert rows["vanilla_cached"]["nfe"] == 12 and rows["vanilla_cached"]["query_tokens"] <= P + 12 * L
    assert all(r["action_hz"] is None and r["tokens_per_s"] > 0 for r in rows.values())
    with pytest.raises(SystemExit, match="no --teacher"):
        micro_bench.run(parser.parse_args(["--ud-vla", checkpoint, "--random"]))
