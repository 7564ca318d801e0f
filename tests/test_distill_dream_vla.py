"""The project's training on the Dream-VLA adapter's model (the tiny checkpoint of
scripts/goldens/dream_vla_tiny.py, a synthetic task in the episodes format): LoRA distillation with
the same weights, adapter off, as the teacher; the teacher stage as a fine-tune of a checkpoint in
Dream-VLA's own format; the exported student as a policy."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from fast_dvla import FastDVLAPolicy, decode
from fast_dvla.adapters import DreamVLA
from fast_dvla.masks import BIDIRECTIONAL, BLOCK_CAUSAL
from fast_dvla.training.config import TrainConfig
from fast_dvla.training.dataset import batch_prefixes
from fast_dvla.training.lora import adapter_disabled
from fast_dvla.training.losses import forward_full
from fast_dvla.training.noise import student_noise
from fast_dvla.training.synthetic import write_synthetic_dataset
from fast_dvla.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _tiny_module():
    spec = importlib.util.spec_from_file_location("dream_vla_tiny", ROOT / "scripts/goldens/dream_vla_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(_tiny_module().write(tmp_path_factory.mktemp("dream") / "ckpt"))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    # three instructions of different lengths: Dream's byte-level prompts differ in length
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("synthetic")), 6, image_size=16, T=12, seed=1)


def distill_config(checkpoint, synthetic, out, **overrides):
    settings = dict(stage="distill", data=synthetic, out=str(out), teacher=checkpoint, student="lora", lora_rank=8,
                    steps=2, batch_size=6, lr=1e-2, warmup_steps=1, log_every=1, save_every=100, seed=0)
    return TrainConfig(**{**settings, **overrides})


def fixed_batch(trainer):
    rows = list(range(0, len(trainer.dataset), len(trainer.dataset) // 6))[:6]
    batch = trainer.dataset.batch(rows)
    model = trainer.model
    mask, weight = student_noise(len(rows), model.num_blocks, model.block_size, torch.Generator().manual_seed(0))
    return batch, mask, weight


def test_lora_distillation_learns_and_adapter_off_is_the_teacher(checkpoint, synthetic, tmp_path):
    trainer = Trainer(distill_config(checkpoint, synthetic, tmp_path / "run"), progress=False)
    assert isinstance(trainer.model, DreamVLA)
    assert trainer.dataset.action_tokenizer is None  # the model's own bins
    adapted = {n.split(".lora_")[0] for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapted and all(n.startswith("model.layers.") for n in adapted)  # the decoder only, not ViT/lm_head
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"}
    batch, mask, weight = fixed_batch(trainer)
    assert len(batch_prefixes(trainer.model, batch)) > 1  # rows with prompts of different lengths
    losses = []
    for _ in range(12):
        loss = trainer.loss_module(batch, mask, weight)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        losses.append(loss.item())
    # soft-target cross-entropy: its floor is the teacher's entropy, not 0
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses

    teacher = DreamVLA.from_pretrained(checkpoint)
    obs = batch["obs"]
    rows = [i for i, text in enumerate(obs["instruction"]) if text == obs["instruction"][0]]
    sub = {"images": {c: v[rows] for c, v in obs["images"].items()}, "state": obs["state"][rows],
           "instruction": [obs["instruction"][i] for i in rows]}
    tokens = torch.where(mask[rows], trainer.model.mask_token_id, batch["tokens"][rows])
    trainer.model.eval()
    with torch.no_grad():
        want = forward_full(teacher, teacher.observation_prefix(sub)[0], tokens, BIDIRECTIONAL)
        with adapter_disabled(trainer.model):
            off = forward_full(trainer.model, trainer.model.observation_prefix(sub)[0], tokens, BIDIRECTIONAL)
        on = forward_full(trainer.model, trainer.model.observation_prefix(sub)[0], tokens, BIDIRECTIONAL)
    assert torch.equal(off, want)  # adapter off: exactly the teacher
    assert not torch.allclose(on, want, atol=1e-3)  # and the adapter did learn something


def test_grouped_loss_is_the_mean_of_rows_alone(checkpoint, synthetic, tmp_path):
    """Rows of different prompt lengths are taken in groups; the batch's loss is each row's as if alone."""
    trainer = Trainer(distill_config(checkpoint, synthetic, tmp_path / "run"), progress=False)
    batch, mask, weight = fixed_batch(trainer)
    with torch.no_grad():
        whole = trainer.loss_module(batch, mask, weight)
        alone = []
        for r in range(len(batch["tokens"])):
            obs = batch["obs"]
            row = {"obs": {"images": {c: v[[r]] for c, v in obs["images"].items()}, "state": obs["state"][[r]],
                           "instruction": [obs["instruction"][r]]}, "tokens": batch["tokens"][[r]]}
            alone.append(trainer.loss_module(row, mask[[r]], weight[[r]]))
    torch.testing.assert_close(whole, torch.stack(alone).mean(), rtol=1e-5, atol=1e-6)


def test_distilled_student_is_a_policy_that_decodes_exactly_cached(checkpoint, synthetic, tmp_path):
    trainer = Trainer(distill_config(checkpoint, synthetic, tmp_path / "run", steps=3), progress=False)
    trainer.train()
    assert len(trainer.history) == 3 and all(np.isfinite(h["loss"]) for h in trainer.history)
    # logged beside the loss: KL(teacher || student) = the loss minus the teacher's entropy, >= 0
    assert all(-1e-5 < h["kl"] < h["loss"] for h in trainer.history), trainer.history
    path = trainer.export()
    assert (Path(path) / "adapter.safetensors").is_file()
    policy = FastDVLAPolicy.from_pretrained(path)
    assert isinstance(policy.model, DreamVLA) and policy.decode_config.method == "fast_dvla"
    obs = trainer.dataset.observation([0, 1, 2])
    assert len(set(obs["instruction"])) == 1  # one episode's frames: one prompt length, so one batch
    with torch.no_grad():
        prefix, _ = policy.io.observation_prefix(obs)
        # the merged weights are the adapter-carrying model's
        tokens = torch.full((3, policy.model.chunk_len), policy.model.mask_token_id)
        trainer.model.eval()
        torch.testing.assert_close(forward_full(policy.model, prefix, tokens, BLOCK_CAUSAL),
                                   forward_full(trainer.model, trainer.model.observation_prefix(obs)[0], tokens,
                                                BLOCK_CAUSAL), rtol=1e-4, atol=1e-4)
    for method in ("fast_dvla", "block_diffusion", "vanilla_cached"):
        config = policy.decode_config_for(method).replace(tau_conf=0.02)
        cached = decode(policy.model, prefix, config)
        full = decode(policy.model, prefix, config.replace(use_cache=False))
        assert torch.equal(cached.tokens, full.tokens), method
        assert cached.stats.nfe == full.stats.nfe and cached.stats.query_tokens < full.stats.query_tokens
    assert policy.predict_action_chunk(trainer.dataset.observation([0])).shape == (1, 8, 7)


def test_teacher_stage_fine_tunes_a_dream_checkpoint(checkpoint, synthetic, tmp_path):
    config = TrainConfig(stage="teacher", data=synthetic, out=str(tmp_path / "teacher"), init_from=checkpoint,
                         freeze=["lm_head"], steps=2, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1,
                         save_every=100)
    trainer = Trainer(config, progress=False)
    start = DreamVLA.from_pretrained(checkpoint).state_dict()
    trainer.train()
    after = trainer.model.state_dict()
    assert torch.equal(after["lm_head.weight"], start["lm_head.weight"])  # frozen
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(after[q], start[q])
    assert not torch.equal(after["visual.blocks.0.attn.qkv.weight"], start["visual.blocks.0.attn.qkv.weight"])
    policy = FastDVLAPolicy.from_pretrained(trainer.export())
    assert isinstance(policy.model, DreamVLA) and policy.decode_config.method == "vanilla"
    with pytest.raises(ValueError, match="names no parameter"):
        Trainer(TrainConfig(**{**config.to_dict(), "out": str(tmp_path / "t2"), "freeze": ["lm_heads"]}),
                progress=False)
    with pytest.raises(ValueError, match="state_ignore"):
        Trainer(TrainConfig(**{**config.to_dict(), "out": str(tmp_path / "t3"), "state_ignore": [1]}), progress=False)
    with pytest.raises(ValueError, match="freeze"):
        TrainConfig(stage="distill", data=synthetic, out="o", teacher=checkpoint, freeze=["lm_head"])


def test_actions_to_bins_inverts_bins_to_actions(checkpoint):
    model = DreamVLA.from_pretrained(checkpoint)
    bins = np.random.default_rng(0).integers(0, 255, (5, model.chunk_len))
    actions = model.bins_to_actions(bins)
    assert actions.shape == (5, 8, 7)
    assert np.array_equal(model.actions_to_bins(actions), bins)
    assert np.array_equal(model.actions_to_bins(model.bins_to_actions(np.full((1, 56), 255))), np.full((1, 56), 254))
    with pytest.raises(ValueError, match="actions must be"):
        model.actions_to_bins(np.zeros((2, 7, 7)))
