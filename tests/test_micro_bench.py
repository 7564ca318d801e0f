import argparse
import json

from fast_dvla.eval import micro_bench


def test_micro_bench_reports_every_decoder(tmp_path):
    parser = argparse.ArgumentParser()
    micro_bench.add_arguments(parser)
    args = parser.parse_args(["--random", "--repeats", "2", "--warmup", "1", "--out", str(tmp_path / "r.json")])
    micro_bench.main(args)
    result = json.loads((tmp_path / "r.json").read_text())
    rows = {r["method"]: r for r in result["results"]}
    assert set(rows) == {"vanilla", "fast_dllm", "block_diffusion", "fast_dvla"}
    assert rows["vanilla"]["speedup"] == 1.0
    assert rows["vanilla"]["nfe"] == 12 and rows["vanilla"]["query_tokens"] == 12 * (49 + 56)
    # the exact cache forwards far fewer query tokens than recomputing everything
    assert rows["fast_dvla"]["query_tokens"] < rows["vanilla"]["query_tokens"] / 2
    assert all(r["tokens_per_s"] > 0 and r["p90_ms"] >= r["latency_ms"] for r in rows.values())
