"""The UD-VLA adapter against the original's own outputs (tests/golden/ud_vla_tiny.json, made by
scripts/goldens/ud_vla_golden.py from OpenHelix-Team/Unified-Diffusion-VLA at the commit recorded
there), the engine's decoders on it, and its block-causal student's exact cache."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fast_dvla import ConfigError, DecodeConfig, FastDVLAPolicy, decode
from fast_dvla.adapters import UDVLA, is_ud_vla_config, ud_vla_sampler
from fast_dvla.adapters.dream_vla import DreamKVCache
from fast_dvla.adapters.ud_vla_sampler import blockwise_attention, make_mask, masked_after_steps
from fast_dvla.adapters.ud_vla_tokens import EOA_ID, MASK_ID
from fast_dvla.masks import BIDIRECTIONAL, BLOCK_CAUSAL, AttentionLayout

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests/golden/ud_vla_tiny.json").read_text())
CASES = GOLDEN["cases"]


def run_of(case, steps):
    return next(r for r in case["runs"] if r["steps"] == steps)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("ud_vla_tiny", ROOT / "scripts/goldens/ud_vla_tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    return tiny.write(tmp_path_factory.mktemp("udvla") / "ckpt")


@pytest.fixture(scope="module")
def model(checkpoint):
    torch.set_num_threads(1)
    return UDVLA.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def prompts(model):
    return [model.prompt(c["instruction"], c["static_codes"], c["gripper_codes"]) for c in CASES]


def batch(prompts, rows):
    return UDVLA.batch_ids([prompts[i] for i in rows])


# -- the original's sampler ---------------------------------------------------------------------------
def test_goldens_name_the_original_commit():
    assert GOLDEN["source"] == "github.com/OpenHelix-Team/Unified-Diffusion-VLA"
    assert GOLDEN["commit"].startswith("97756cc")
    assert GOLDEN["environment"]["transformers"] == "4.44.0"
    assert GOLDEN["sampler"]["mask_token_id"] == MASK_ID and GOLDEN["sampler"]["action_vocab"] == 1024


def test_prompt_ids_match_the_original_tokenizer_and_processor(prompts):
    for (text, frames), case in zip(prompts, CASES):
        assert text == case["text_ids"]
        region = make_mask(torch.tensor([frames]), MASK_ID)[0].tolist()
        for run in case["runs"]:
            assert text + frames[:-1] + region == run["input_ids"] and run["gen_len"] == len(region)


# every case at 2 steps (case 1's last samples hold <eoa>s), and case 2 at 8 steps, which commits an <eoa>
# at step 4: the following steps re-mask the inputs after it and attend to them as a causal run
SAMPLED = [(i, 2) for i in range(len(CASES))] + [(2, 8)]


@pytest.mark.parametrize("index,steps", SAMPLED, ids=[f"case{i}-{s}steps" for i, s in SAMPLED])
def test_original_sampler_reproduced_token_for_token(model, prompts, index, steps):
    """UD-VLA's denoise loop (seed 42, multinomial + Gumbel re-masking) on our model: the same
    sampled ids, the same state after every step, the same actions."""
    run = run_of(CASES[index], steps)
    history = []
    out = model.generate_original(*batch(prompts, [index]), steps, history=history)
    assert out[0].tolist() == run["generated_ids"]
    assert [int((h == MASK_ID).sum()) for h in history] == run["masked_after_step"]
    positions = torch.arange(1, run["gen_len"] + 1)
    assert [int((h[0] * positions).sum()) for h in history] == run["gen_checksums"]
    np.testing.assert_allclose(model.generated_to_actions(out.numpy())[0], np.asarray(run["actions"]), rtol=1e-6)


def test_goldens_exercise_eoa():
    assert run_of(CASES[1], 2)["eoa_positions"] and run_of(CASES[2], 8)["eoa_positions"]
    assert not run_of(CASES[0], 2)["eoa_positions"]


def test_schedules_of_every_golden_run_including_the_evaluations_72_steps(prompts):
    """The masked counts after each step follow the cosine schedule (72 steps is CALVIN's setting)."""
    for (text, frames), case in zip(prompts, CASES):
        n_masked = int((make_mask(torch.tensor([frames]), MASK_ID) == MASK_ID).sum())
        for run in case["runs"]:
            assert masked_after_steps(run["gen_len"], n_masked, run["steps"]) == run["masked_after_step"]
    assert run_of(CASES[0], 72)["masked_after_step"][-1] == 1


def test_first_forward_logits_match_the_original(model, prompts):
    for index, case in enumerate(CASES):
        run = case["runs"][0]
        with torch.no_grad():
            logits = model.original_logits(torch.tensor([run["input_ids"]]), run["gen_len"])[0].double()
        expected = run["first_logits"]
        assert abs(float(logits.sum()) - expected["sum"]) < 1e-6 * expected["abs_sum"]
        assert abs(float(logits.abs().sum()) - expected["abs_sum"]) < 1e-6 * expected["abs_sum"]
        assert abs(float(logits[-69:].sum()) - expected["action_rows_sum"]) < 1e-6 * expected["abs_sum"]


# -- negative controls: a wrong sampler or model does not reproduce the goldens --------------------------
def generated_with(model, prompts, index=1, steps=2):
    return model.generate_original(*batch(prompts, [index]), steps)[0].tolist()


def test_unshifted_logits_do_not_reproduce_the_goldens(model, prompts, monkeypatch):
    def unshifted(input_ids, seq_len):
        embeds = model.model.get_input_embeddings()(input_ids)
        positions = torch.arange(input_ids.shape[1])[None]
        from fast_dvla.backbone import lean_forward
        hidden = lean_forward(model.model, embeds, positions, blockwise_attention(input_ids), None)
        return model.lm_head(hidden[:, -seq_len:]).float()

    monkeypatch.setattr(model, "original_logits", unshifted)
    assert generated_with(model, prompts) != run_of(CASES[1], 2)["generated_ids"]


def test_reversed_remasking_order_does_not_reproduce_the_goldens(model, prompts, monkeypatch):
    original = ud_vla_sampler.mask_by_random_topk

    def most_confident_masked(mask_len, probs, temperature, generator):
        return original(mask_len, 1.0 / probs, temperature, generator)

    monkeypatch.setattr(ud_vla_sampler, "mask_by_random_topk", most_confident_masked)
    assert generated_with(model, prompts) != run_of(CASES[1], 2)["generated_ids"]


def test_causal_attention_does_not_reproduce_the_goldens(model, prompts, monkeypatch):
    def causal(ids):
        length = ids.shape[1]
        return torch.tril(torch.ones(length, length, dtype=torch.bool))[None, None].expand(ids.shape[0], 1, -1, -1)

    monkeypatch.setattr("fast_dvla.adapters.ud_vla.blockwise_attention", causal)
    assert generated_with(model, prompts) != run_of(CASES[1], 2)["generated_ids"]


# -- the engine on UD-VLA -------------------------------------------------------------------------------
def test_engine_prefix_and_mask_are_the_originals_first_step(model, prompts):
    """The bidirectional layout over [prefix | all-masked chunk] is the original's first input and
    mask (text causal, one bidirectional block after it), and gives its action logits."""
    prefix = model.engine_prefix(*batch(prompts, [0]))
    P, L = prefix.shape[1], model.chunk_len
    ids = torch.tensor([run_of(CASES[0], 2)["input_ids"]])
    assert torch.equal(prefix, model.model.get_input_embeddings()(ids[:, :P]))
    tokens = torch.full((1, L), model.mask_token_id)
    seq = torch.cat([prefix, model.embed_actions(tokens, torch.arange(L))], dim=1)
    layout = AttentionLayout.full(P, model.block_size, P + L, BIDIRECTIONAL)
    assert torch.equal(model.engine_mask(layout, seq), blockwise_attention(ids))
    with torch.no_grad():
        ours = model.action_logits(model.backbone_forward(seq, torch.arange(P + L), layout, None)[:, P:])
        full = model.original_logits(ids, run_of(CASES[0], 2)["gen_len"])[:, -L:, model.action_ids]
    assert torch.allclose(ours, full, atol=1e-5, rtol=0)


def test_every_decoder_runs_and_the_actions_decode(model, prompts):
    prefix = model.engine_prefix(*batch(prompts, [0, 1, 2]))
    for method in ("vanilla", "fast_dllm", "block_diffusion", "vanilla_cached", "fast_dvla"):
        result = decode(model, prefix, DecodeConfig(method=method, vanilla_steps=8, tau_conf=0.2))
        assert result.tokens.shape == (3, 69) and int(result.tokens.max()) < model.n_bins, method
        actions = model.bins_to_actions(result.tokens.numpy())
        assert actions.shape == (3, 10, 7) and np.isfinite(actions).all()
        assert set(np.unique(actions[..., -1])) <= {-1, 1}  # the gripper's sign


def test_engine_bins_decode_to_the_originals_actions(model):
    """The golden action tokens as engine bins give the golden actions (cut at the first <eoa>)."""
    for index, steps in SAMPLED:
        run = run_of(CASES[index], steps)
        bins = model.ids_to_bins(torch.tensor(run["generated_ids"][-69:]))
        assert int(bins.min()) >= 0
        np.testing.assert_allclose(model.bins_to_actions(bins[None].numpy())[0], np.asarray(run["actions"]), rtol=1e-6)
    assert int(model.ids_to_bins(torch.tensor([EOA_ID]))) == model.n_bins - 1


STUDENT_CASES = [DecodeConfig(method="fast_dvla", tau_conf=0.2), DecodeConfig(method="block_diffusion", tau_conf=0.2),
                 DecodeConfig(method="vanilla_cached", vanilla_steps=12)]


@pytest.mark.parametrize("config", STUDENT_CASES, ids=lambda c: c.method)
def test_block_causal_cached_equals_uncached(model, prompts, config):
    prefix = model.engine_prefix(*batch(prompts, [0, 1, 2]))
    cached = decode(model, prefix, config)
    full = decode(model, prefix, config.replace(use_cache=False))
    assert torch.equal(cached.tokens, full.tokens)
    assert cached.stats.nfe == full.stats.nfe and cached.stats.query_tokens < full.stats.query_tokens
    assert len({tuple(r.tolist()) for r in cached.tokens}) == 3  # the rows really decode differently


class ZeroingCache(DreamKVCache):
    """A broken cache: every commit zeroes the first layer's keys of the first cached slots."""

    def commit(self, length):
        super().commit(length)
        self.keys[0][:, :, :length // 2] = 0


def test_a_broken_cache_changes_the_tokens(model, prompts, monkeypatch):
    prefix = model.engine_prefix(*batch(prompts, [0, 1, 2]))
    config = DecodeConfig(method="vanilla_cached", vanilla_steps=12)
    reference = decode(model, prefix, config.replace(use_cache=False)).tokens
    cfg = model.model.config
    monkeypatch.setattr(model, "new_cache", lambda b, n: ZeroingCache(
        cfg.num_hidden_layers, b, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, n,
        hidden_size=cfg.hidden_size))
    assert not torch.equal(decode(model, prefix, config).tokens, reference)


def test_text_rows_stay_causal_under_the_student_layout(model, prompts):
    prefix = model.engine_prefix(*batch(prompts, [3]))
    P, text = prefix.shape[1], len(prompts[3][0])
    mask = model.engine_mask(AttentionLayout.full(P, model.block_size, P + 69, BLOCK_CAUSAL), prefix)[0, 0]
    assert int(model.text_lengths(prefix)) == text
    assert torch.equal(mask[:text, :text], torch.tril(torch.ones(text, text, dtype=torch.bool)))
    assert not mask[:text, text:].any() and mask[text:P, :P].all() and not mask[:P, P:].any()


# -- loading ---------------------------------------------------------------------------------------------
def test_loading_and_recognition(checkpoint, model):
    config = json.loads((checkpoint / "config.json").read_text())
    assert is_ud_vla_config(config) and not is_ud_vla_config({**config, "use_blockwise_attn_mask": False})
    assert model.n_bins == 1026 and model.mask_token_id == 1026 and model.chunk_len == 69 and model.num_blocks == 3
    assert UDVLA.from_pretrained(checkpoint, block_size=3).num_blocks == 23
    with pytest.raises(ValueError, match="block_size 7 does not divide"):
        UDVLA.from_pretrained(checkpoint, block_size=7)
    # a UD-VLA folder is decoded as a model; as a policy it is refused with the way to load it
    with pytest.raises(ConfigError, match=r"UDVLA\.from_pretrained") as e:
        FastDVLAPolicy.from_pretrained(str(checkpoint))
    assert e.value.field == "architectures"


def test_configs_the_adapter_does_not_reproduce_are_refused(checkpoint, model):
    config = json.loads((checkpoint / "config.json").read_text())
    for change, field in (({"use_blockwise_attn_mask": False}, "use_blockwise_attn_mask"),
                          ({"boi_token_id": 7}, "boi_token_id"), ({"qkv_bias": True}, "qkv_bias")):
        with pytest.raises(ConfigError) as e:
            UDVLA({**config, **change}, model.actions)
        assert e.value.field == field


MISSING = ("config.json", "model.safetensors", "emu3.tiktoken", "emu3_vision_tokens.txt",
           "action_tokenizer/processor_config.json", "action_tokenizer/tokenizer.json")


@pytest.mark.parametrize("missing", MISSING)
def test_a_missing_file_is_named(checkpoint, tmp_path, missing):
    for path in checkpoint.rglob("*"):
        if path.is_file() and path.relative_to(checkpoint).as_posix() != missing:
            link = tmp_path / path.relative_to(checkpoint)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path, link)
    name = missing.split("/")[-1].replace(".", r"\.")
    with pytest.raises(FileNotFoundError, match=name):
        UDVLA.from_pretrained(tmp_path)
