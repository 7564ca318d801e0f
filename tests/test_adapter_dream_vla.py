"""The Dream-VLA adapter against the original's own outputs (tests/golden/dream_vla_tiny.json, made by
scripts/goldens/dream_vla_golden.py from DreamLM/Dream-VLX at the commit recorded there), and the
block-causal student's exact cache on it."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fast_dvla import DecodeConfig, decode
from fast_dvla.adapters import DreamVLA, dream_transfer_counts
from fast_dvla.decoding import common
from fast_dvla.masks import BIDIRECTIONAL, AttentionLayout

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests/golden/dream_vla_tiny.json").read_text())


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts/goldens" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tiny = _load("dream_vla_tiny")
    return DreamVLA.from_pretrained(tiny.write(tmp_path_factory.mktemp("dream") / "ckpt"))


@pytest.fixture(scope="module")
def observations():
    import sys

    sys.path.insert(0, str(ROOT / "scripts/goldens"))
    try:
        return _load("dream_vla_golden").cases()
    finally:
        sys.path.remove(str(ROOT / "scripts/goldens"))


@pytest.fixture(scope="module")
def prefixes(model, observations):
    return [model.embed_observation(list(c["images"]), c["instruction"], c["proprio"]) for c in observations]


def test_goldens_name_the_original_commit():
    assert GOLDEN["source"] == "github.com/DreamLM/Dream-VLX"
    assert GOLDEN["commit"].startswith("a72fa41")
    assert GOLDEN["len_tokenizer"] == 151923 and GOLDEN["mask_token_id"] == 151666


def test_prompt_ids_match_the_original_processor(prefixes):
    for (embeds, ids), case in zip(prefixes, GOLDEN["cases"]):
        assert ids == case["input_ids"]
        assert embeds.shape[0] == len(ids) + (case["proprio"] is not None)


def test_original_sampler_reproduced_token_for_token(model, prefixes):
    """Dream's maskgit_plus (full vocabulary, 58 generated positions, its schedule) on our model."""
    for (embeds, _), case in zip(prefixes, GOLDEN["cases"]):
        for run in case["runs"]:
            history = []
            out = model.generate_original(embeds[None], run["steps"], history=history)
            assert out[0].tolist() == run["generated_ids"], (case["name"], run["steps"])
            order = [h[0].nonzero().flatten().tolist() for h in history]
            assert [sorted(o) for o in order] == [sorted(o) for o in run["commit_order"]]
            assert [len(o) for o in order] == dream_transfer_counts(58, run["steps"])


def test_rows_decode_in_a_batch_as_alone(model, prefixes):
    """Equal-length prompts batch; every row gives its golden tokens (the original pools its top-k
    over the flattened batch and runs batch size 1 only)."""
    batch = torch.stack([e for e, _ in prefixes[:3]])
    out = model.generate_original(batch, 8)
    for row, case in zip(out, GOLDEN["cases"][:3]):
        assert row.tolist() == next(r for r in case["runs"] if r["steps"] == 8)["generated_ids"]
    assert len({tuple(r.tolist()) for r in out}) == 3  # the rows really differ


def test_engine_vanilla_one_step_equals_the_original(model, prefixes):
    """steps=1 (the LIBERO evaluation's default): the engine's bidirectional vanilla decode with the
    suffix [MASK]s and action-restricted logits gives the original's action tokens, since every
    argmax there was an action id."""
    batch = torch.stack([e for e, _ in prefixes[:3]])
    result = decode(model, batch, DecodeConfig(method="vanilla", vanilla_steps=1))
    for row, case in zip(result.tokens, GOLDEN["cases"][:3]):
        run = next(r for r in case["runs"] if r["steps"] == 1)
        assert run["all_actions_in_action_range"]
        assert model.bins_to_ids(row).tolist() == run["generated_ids"][:56]
        np.testing.assert_allclose(model.bins_to_actions(row.numpy()), np.asarray(run["actions"]), rtol=0, atol=1e-12)


def test_bidirectional_forward_reproduces_the_original_logits(model, prefixes):
    """The engine-facing forward (bidirectional layout, all [MASK]s) gives the same action logits as
    the original-sampler forward's first step, restricted to the action rows."""
    embeds = prefixes[0][0][None]
    P, L = embeds.shape[1], model.chunk_len
    tokens = torch.full((1, L), model.mask_token_id)
    seq = torch.cat([embeds, model.embed_actions(tokens, torch.arange(L))], dim=1)
    layout = AttentionLayout.full(P, model.block_size, P + L, BIDIRECTIONAL)
    with torch.no_grad():
        ours = model.action_logits(model.backbone_forward(seq, torch.arange(P + L), layout, None)[:, P:])
        captured = []
        from fast_dvla.adapters import dream_vla

        def spy(fn, x, *args, **kwargs):
            captured.append(fn(x))
            return x
        original = dream_vla.dream_maskgit_plus
        try:
            dream_vla.dream_maskgit_plus = lambda fn, x, *a, **k: spy(fn, x)
            model.generate_original(embeds, 1)
        finally:
            dream_vla.dream_maskgit_plus = original
    full = captured[0][:, :L, model.action_ids]
    assert torch.allclose(ours, full, atol=1e-5, rtol=0)


STUDENT_CASES = [DecodeConfig(method="fast_dvla", tau_conf=0.02),
                 DecodeConfig(method="block_diffusion", tau_conf=0.02),
                 DecodeConfig(method="vanilla_cached", vanilla_steps=12)]


@pytest.mark.parametrize("config", STUDENT_CASES, ids=lambda c: c.method)
def test_block_causal_cached_equals_uncached(model, prefixes, config):
    batch = torch.stack([e for e, _ in prefixes[:3]])
    trace_c, trace_f = [], []
    cached = decode(model, batch, config, trace=trace_c)
    full = decode(model, batch, config.replace(use_cache=False), trace=trace_f)
    assert torch.equal(cached.tokens, full.tokens)
    assert cached.stats.nfe == full.stats.nfe
    assert cached.stats.query_tokens < full.stats.query_tokens
    assert len({tuple(r.tolist()) for r in cached.tokens}) == 3
    if config.method == "vanilla_cached":
        gap = max((a["logits"] - b["logits"][:, -a["logits"].shape[1]:]).abs().max().item()
                  for a, b in zip(trace_c, trace_f))
        assert gap < 1e-4


class BidirectionalLayout(AttentionLayout):
    """The teacher's mask wherever the decoder asks for the student's."""

    def __init__(self, prefix_len, block_size, q_start, q_len, kv_len, kind):
        super().__init__(prefix_len, block_size, q_start, q_len, kv_len, BIDIRECTIONAL)


def test_wrong_mask_changes_the_tokens(model, prefixes, monkeypatch):
    """Negative control: the student decoded uncached with the teacher's mask everywhere gives
    other tokens, so the cached = uncached comparison above would see a wrong mask."""
    batch = torch.stack([e for e, _ in prefixes[:3]])
    config = DecodeConfig(method="vanilla_cached", vanilla_steps=12, use_cache=False)
    reference = decode(model, batch, config).tokens
    monkeypatch.setattr(common, "AttentionLayout", BidirectionalLayout)
    broken = decode(model, batch, config).tokens
    assert not torch.equal(broken, reference)


def test_missing_shift_changes_the_original_tokens(model, prefixes, monkeypatch):
    """Negative control: reading logits at p instead of p - 1 does not reproduce the goldens."""
    embeds = prefixes[0][0][None]
    run = next(r for r in GOLDEN["cases"][0]["runs"] if r["steps"] == 8)
    lm_head = model.lm_head

    class Unshifted(torch.nn.Module):
        def forward(self, hidden):
            return lm_head(torch.cat([hidden[:, 1:], hidden[:, -1:]], dim=1))

    monkeypatch.setattr(model, "lm_head", Unshifted())
    out = model.generate_original(embeds, 8)
    assert out[0].tolist() != run["generated_ids"]


def test_transfer_counts_follow_the_original_schedule():
    assert dream_transfer_counts(58, 1) == [58]
    assert dream_transfer_counts(58, 32)[:8] == [1] * 7 + [2]
    counts = dream_transfer_counts(58, 128)  # the step count users report timing
    assert sum(counts) == 58 and counts.count(0) == 71  # int() floors: those forwards commit nothing, as there
