"""fast-dvla compile-bench on tiny random policies: three modes per decoder, equal actions,
the static modes' host reads below the dynamic ones', no graph compiled while timing."""
import argparse
import json

from fast_dvla_eval import compile_bench
from test_profile_chunk import save_tiny_policy


def test_compile_bench_compares_the_modes(tmp_path):
    argv = ["--teacher", save_tiny_policy(tmp_path / "t", 0), "--student", save_tiny_policy(tmp_path / "s", 1),
            "--decoders", "fast_dvla", "--repeats", "3", "--warmup", "1", "--warm-compile-cache",
            "--out", str(tmp_path / "c")]
    parser = argparse.ArgumentParser()
    compile_bench.add_arguments(parser)
    compile_bench.main(parser.parse_args(argv), argv)

    result = json.loads((tmp_path / "c.json").read_text())
    assert result["command"].startswith("fast-dvla compile-bench --teacher") and result["frames"] == 3
    rows = {(r["method"], r["mode"]): r for r in result["results"]}
    assert set(rows) == {(m, mode) for m in ("fast_dvla",) for mode in compile_bench.MODES}
    for row in rows.values():
        assert row["frames_with_token_mismatch"] == 0
        assert row["latency_ms"] > 0 and row["nfe"] >= 1
    for method in ("fast_dvla",):
        assert rows[method, "compiled"]["recompiles"] == 0 and rows[method, "compiled"]["graphs_at_warmup"] >= 1
        assert rows[method, "compiled"]["compile_s"] > 0
        assert rows[method, "static"]["nfe"] == rows[method, "dynamic"]["nfe"]
    # the static student reads one value per step; the dynamic one three
    assert rows["fast_dvla", "static"]["host_syncs"] == rows["fast_dvla", "static"]["nfe"] + 3
    assert rows["fast_dvla", "dynamic"]["host_syncs"] > rows["fast_dvla", "static"]["host_syncs"]
    assert (tmp_path / "c.md").read_text().count("| fast_dvla |") == 3
