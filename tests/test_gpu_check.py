"""scripts/gpu_check.sh --dry-run: every step of the GPU check on the CPU at tiny
sizes (Triton under its interpreter), through the shell script, into the summary files."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["environment", "kernel_check", "engine_check", "bench_kernels", "micro_bench", "static_graphs"]


def test_gpu_check_dry_run_writes_every_step_ok(tmp_path):
    out = tmp_path / "gpu check"  # a space: the script must quote its paths
    env = {**os.environ, "FAST_DVLA_PYTHON": sys.executable}  # this interpreter: no set-up in the test
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"results in {out}" in done.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in summary["steps"]), [(s["name"], s.get("error")) for s in summary["steps"]]
    steps = {s["name"]: s["detail"] for s in summary["steps"]}
    assert steps["environment"]["triton_interpret"] is True
    kernel_rows = steps["kernel_check"]["rows"]
    assert {r["dtype"] for r in kernel_rows} == {"fp32", "fp16", "bf16"}
    assert all(r["ok"] and r["kv_heads"] < r["q_heads"] and len(set(r["cache_lens"])) > 1 for r in kernel_rows)
    assert all(r["tokens_equal"] for r in steps["engine_check"]["rows"])
    assert [r["name"] for r in steps["micro_bench"]["runs"]] and all(r["rows"] for r in steps["micro_bench"]["runs"])
    graphs = {(r["method"], r["mode"]): r for r in steps["static_graphs"]["results"]}
    assert {mode for _, mode in graphs} == {"dynamic", "static", "compiled"}
    assert all(r["frames_with_token_mismatch"] == 0 for r in graphs.values())
    assert graphs["fast_dvla", "compiled"]["recompiles"] == 0
    for name in ("kernels.json", "kernels.md", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "summary.md").read_text()
    for name in STEPS:
        assert f"| {name} | ok |" in table, name


def test_gpu_check_refuses_without_cuda_or_unknown_arguments(tmp_path):
    script = os.path.join(ROOT, "scripts", "gpu_check.sh")
    env = {**os.environ, "FAST_DVLA_PYTHON": sys.executable}
    bad = subprocess.run(["bash", script, "--fast"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument --fast" in bad.stderr
    import torch
    if torch.cuda.is_available():
        return
    done = subprocess.run(["bash", script, "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "--dry-run" in done.stderr
