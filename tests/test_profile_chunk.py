"""fast-dvla profile-chunk on tiny random policies: every category present,
none negative, together the profiled wall time (Python is the remainder)."""
import argparse
import json

import numpy as np

from fast_dvla import FastDVLAPolicy
from fast_dvla.tokenizer import ActionTokenizer
from fast_dvla_eval import profile_chunk
from helpers import tiny_model


def save_tiny_policy(path, seed):
    tok = ActionTokenizer(-np.ones(7), np.ones(7), gripper_dims=(6,))
    FastDVLAPolicy(tiny_model(seed, sharpness=4.0), tok).save_pretrained(str(path))
    return str(path)


def test_profile_chunk_attributes_the_wall_time(tmp_path):
    from fast_dvla.cache import BlockKVCache

    argv = ["--teacher", save_tiny_policy(tmp_path / "t", 0), "--student", save_tiny_policy(tmp_path / "s", 1),
            "--repeats", "2", "--warmup", "1", "--out", str(tmp_path / "p")]
    parser = argparse.ArgumentParser()
    profile_chunk.add_arguments(parser)
    update = BlockKVCache.update
    profile_chunk.main(parser.parse_args(argv), argv)
    assert BlockKVCache.update is update  # the instrumentation is undone

    result = json.loads((tmp_path / "p.json").read_text())
    assert result["torch_threads"] == 1 and result["command"].startswith("fast-dvla profile-chunk --teacher")
    assert list(result["decoders"]) == ["vanilla", "fast_dvla"]
    for method, row in result["decoders"].items():
        cats = row["categories"]
        assert set(cats) == set(profile_chunk.CATEGORIES), method
        assert all(c["ms"] >= 0 for c in cats.values()), (method, cats)
        total = sum(c["ms"] for c in cats.values())
        assert total <= row["wall_ms"] * (1 + 1e-9) and abs(total - row["wall_ms"]) < 1e-6 * row["wall_ms"] + 1e-9
        # the model's parts were seen: labels reached them
        for key in ("attention", "attn_proj", "mlp", "head", "prefix"):
            assert cats[key]["ms"] > 0, (method, key)
        assert row["nfe"] >= 1 and row["query_tokens"] > 0
    assert result["decoders"]["vanilla"]["categories"]["cache"]["ms"] == 0  # the teacher decodes without a cache
    assert result["decoders"]["fast_dvla"]["categories"]["cache"]["ms"] > 0
    assert "| MLP (gate/up/down, activation) |" in (tmp_path / "p.md").read_text()
