"""Both training stages on a synthetic task with a known answer."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fast_dvla import DecodeConfig, FastDVLAPolicy, decode
from fast_dvla.masks import BLOCK_CAUSAL
from fast_dvla.training.config import TrainConfig
from fast_dvla.training.losses import distillation_loss, forward_full
from fast_dvla.training.noise import bias_to_high_noise, forcing_ratios, mask_tails, student_noise, teacher_noise
from fast_dvla.training.synthetic import write_synthetic_dataset
from fast_dvla.training.trainer import Trainer
from helpers import TINY, random_prefix, tiny_model


# -- noise ----------------------------------------------------------------------
def test_forcing_ratios_are_monotone_and_in_range():
    g = torch.Generator().manual_seed(0)
    p = forcing_ratios(1000, 8, g)
    assert (p[:, 1:] >= p[:, :-1]).all()
    assert (p[:, 0] >= 0.2).all() and (p[:, 0] <= 0.7).all() and (p <= 0.7 + 1e-6).all()
    again = forcing_ratios(1000, 8, torch.Generator().manual_seed(0))
    assert torch.equal(p, again)


def test_noise_masks_follow_their_ratios():
    g = torch.Generator().manual_seed(1)
    mask, weight = student_noise(4000, 8, 7, g)
    assert mask.any(1).all() and mask.shape == (4000, 56)
    per_block = mask.view(4000, 8, 7).float().mean((0, 2))
    assert per_block[-1] > per_block[0] + 0.1  # later blocks noisier on average
    assert torch.allclose(weight.view(4000, 8, 7)[..., 0:1].expand(-1, -1, 7), weight.view(4000, 8, 7))
    tmask, tweight = teacher_noise(2000, 56, g)
    assert tmask.any(1).all() and (tweight >= 1).all()
    assert tweight.max() <= 56 and tweight.max() > 50  # 1/t, capped at L for t < 1/L
    assert 0.4 < tmask.float().mean() < 0.6  # E[t] = 1/2


def test_masked_tails_cover_all_mask_blocks_and_default_to_d2f():
    p = forcing_ratios(2000, 8, torch.Generator().manual_seed(3))
    assert torch.equal(mask_tails(p, 0.0, torch.Generator().manual_seed(4)), p)  # off: D2F's ratios, untouched
    tailed = mask_tails(p, 0.5, torch.Generator().manual_seed(4))
    assert (tailed[:, 1:] >= tailed[:, :-1]).all()  # still non-decreasing
    full = tailed == 1.0
    assert 0.4 < full.any(1).float().mean() < 0.6  # about half the samples have a tail
    assert (full[:, 1:] >= full[:, :-1]).all()  # a tail runs to the last block
    assert full[:, 0].any() and (full.sum(1) == 1).any()  # from the first block, or only the last
    assert torch.equal(tailed[~full], p[~full])  # blocks before a tail keep their ratios
    mask, weight = student_noise(500, 8, 7, torch.Generator().manual_seed(5), masked_tail_prob=1.0)
    assert mask.view(500, 8, 7)[:, -1].all()  # every sample's last block is all [MASK]
    assert (weight.view(500, 8, 7)[:, -1] == 1).all()
    with pytest.raises(ValueError, match="masked_tail_prob"):
        TrainConfig(stage="distill", data="d", out="o", teacher="t", masked_tail_prob=1.5)
    with pytest.raises(ValueError, match="distill stage"):
        TrainConfig(stage="teacher", data="d", out="o", masked_tail_prob=0.5)


def test_high_noise_bias_moves_ratios_toward_all_mask_and_defaults_to_d2f():
    p = forcing_ratios(4000, 8, torch.Generator().manual_seed(3))
    assert torch.equal(bias_to_high_noise(p, 0.0), p)
    biased = bias_to_high_noise(p, 2.0)
    assert torch.allclose(1 - biased, (1 - p) ** 3)  # the family's definition
    assert (biased >= p).all() and (biased[:, 1:] >= biased[:, :-1]).all()  # noisier, order kept
    assert biased.mean() > p.mean() + 0.15
    plain = student_noise(500, 8, 7, torch.Generator().manual_seed(5))
    off = student_noise(500, 8, 7, torch.Generator().manual_seed(5), high_noise_bias=0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, off))  # off: bit for bit the default
    mask, weight = student_noise(4000, 8, 7, torch.Generator().manual_seed(5), high_noise_bias=3.0)
    assert mask.float().mean() > plain[0].float().mean() + 0.15  # more of each block hidden
    assert (weight >= 1).all() and weight.max() < 1 / 0.2 + 1e-4  # 1/p' stays bounded by D2F's smallest ratio
    for bad in (-1.0, 100.0, True):
        with pytest.raises(ValueError, match="high_noise_bias"):
            TrainConfig(stage="distill", data="d", out="o", teacher="t", high_noise_bias=bad)
    with pytest.raises(ValueError, match="distill stage"):
        TrainConfig(stage="teacher", data="d", out="o", high_noise_bias=1.0)


# -- losses ---------------------------------------------------------------------
def test_distillation_gradient_vanishes_when_student_matches_teacher():
    model = tiny_model(0, sharpness=4.0).train()
    prefix = random_prefix(model, 2)
    tokens = torch.randint(0, 256, (2, 28))
    mask = torch.rand(2, 28) < 0.5
    noised = torch.where(mask, torch.full_like(tokens, model.mask_token_id), tokens)
    with torch.no_grad():
        target = forward_full(model, prefix, noised, BLOCK_CAUSAL)
    loss, _ = distillation_loss(model, prefix, target, tokens, mask, torch.ones(2, 28))
    loss.backward()
    grads = [p.grad.abs().max() for p in model.parameters() if p.grad is not None]
    assert max(grads) < 1e-5
    # the teacher's logits at unmasked positions do not matter
    target2 = target.clone()
    target2[~mask] = torch.randn_like(target2[~mask])
    loss2, _ = distillation_loss(model, prefix, target2, tokens, mask, torch.ones(2, 28))
    assert torch.allclose(loss, loss2)


# -- end to end on the synthetic task ---------------------------------------------
def accuracy(model, dataset, method):
    batch = dataset.batch(range(0, len(dataset), 5))
    with torch.no_grad():
        prefix = model.embed_prefix(batch["images"], batch["instr_ids"], batch["state"])
        tokens = decode(model, prefix, DecodeConfig(method=method)).tokens
    return (tokens == batch["tokens"]).float().mean().item()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("synthetic")), 60)


@pytest.fixture(scope="module")
def teacher(synthetic, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teacher"))
    cfg = TrainConfig(stage="teacher", data=synthetic, out=out, model=dict(TINY), steps=600, batch_size=32,
                      lr=2e-3, warmup_steps=20, log_every=100, save_every=1000)
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    return trainer, trainer.export()


def test_teacher_learns_the_synthetic_task(teacher):
    trainer, path = teacher
    acc = accuracy(trainer.model.eval(), trainer.dataset, "vanilla")
    assert acc > 0.4, acc  # chance is 1/256
    assert trainer.history[-1]["loss"] < trainer.history[0]["loss"] / 2
    for name in ("log.json", "loss.png", "checkpoint.pt"):
        assert os.path.isfile(os.path.join(trainer.config.out, name))
    loaded = FastDVLAPolicy.from_pretrained(path)
    assert accuracy(loaded.model, trainer.dataset, "vanilla") == acc


def test_fidelity_scores_the_trained_teacher_above_an_untrained_one(teacher, synthetic):
    from fast_dvla.benchmark import fidelity
    from fast_dvla.data.frames import sample_frames
    from fast_dvla.training.trainer import load_policy
    from fast_dvla_eval.fidelity import to_markdown
    trainer, path = teacher
    exported = load_policy(path)
    from_run = load_policy(trainer.config.out)  # the run directory: its checkpoint, exported in memory
    frames = sample_frames(synthetic, 30, exported.model.config.horizon, seed=0)
    assert len(frames) == 30 and frames[0][1].shape == (4, 7)
    trained = fidelity.measure(exported, frames, "vanilla", progress=False)
    assert fidelity.measure(from_run, frames, "vanilla", progress=False) == trained
    untrained = Trainer(TrainConfig(stage="teacher", data=synthetic, out=str(trainer.config.out) + "_untrained",
                                    model=dict(TINY), steps=1), progress=False).policy()
    baseline = fidelity.measure(untrained, frames, "vanilla", progress=False)
    assert trained["token_accuracy"] > 0.4 > baseline["token_accuracy"] + 0.2, (trained, baseline)
    assert "| vanilla | 0.5 | 30 | 12.00 |" in to_markdown({"policy": path, "data": synthetic, "frames": 30, "seed": 0,
                                                          "rows": [trained]})


def test_fidelity_sweeps_the_confidence_threshold(teacher, synthetic, tmp_path):
    import argparse
    import json

    from fast_dvla_eval import fidelity
    _, path = teacher
    p = argparse.ArgumentParser()
    fidelity.add_arguments(p)
    out = str(tmp_path / "sweep")
    fidelity.main(p.parse_args(["--policy", path, "--data", synthetic, "--frames", "12", "--decoders",
                                "fast_dvla", "--tau-conf", "0.95,0.05", "--out", out]))
    strict, loose = json.loads(open(out + ".json").read())["rows"]
    assert (strict["tau_conf"], loose["tau_conf"]) == (0.95, 0.05)
    assert loose["nfe"] < strict["nfe"] and loose["query_tokens"] < strict["query_tokens"]
    with pytest.raises(SystemExit, match="tau-conf"):
        fidelity.main(p.parse_args(["--policy", path, "--data", synthetic, "--tau-conf", "0.5,2"]))


def test_finetuning_starts_from_the_given_policy_and_can_drop_state_entries(teacher, synthetic, tmp_path):
    trainer, path = teacher
    cfg = TrainConfig(stage="teacher", data=synthetic, out=str(tmp_path), init_from=path, state_ignore=[2, 3],
                      steps=3, batch_size=8, lr=1e-4, warmup_steps=1)
    tuned = Trainer(cfg, progress=False)
    start = FastDVLAPolicy.from_pretrained(path)
    assert all(torch.equal(v, start.model.state_dict()[k]) for k, v in tuned.model.state_dict().items())
    assert tuned.dataset.action_tokenizer.to_dict() == start.action_tokenizer.to_dict()  # same bins
    assert tuned.dataset.state_norm.ignore == (2, 3)
    assert (tuned.dataset.batch(range(10))["state"][:, 2:4] == 0).all()
    tuned.train()
    assert FastDVLAPolicy.from_pretrained(tuned.export()).state_norm.ignore == (2, 3)
    with pytest.raises(ValueError, match="init_from"):
        TrainConfig(stage="distill", data="d", out="o", teacher="t", init_from=path)
    with pytest.raises(ValueError, match="model"):
        Trainer(TrainConfig(stage="teacher", data=synthetic, out=str(tmp_path / "x"), init_from=path,
                            model={"num_layers": 1}), progress=False)


@pytest.mark.parametrize("student", ["lora", "full"])
def test_distilled_student_matches_teacher(teacher, synthetic, tmp_path, student):
    t_trainer, t_path = teacher
    teacher_acc = accuracy(t_trainer.model.eval(), t_trainer.dataset, "vanilla")
    cfg = TrainConfig(stage="distill", data=synthetic, out=str(tmp_path), teacher=t_path, student=student,
                      steps=300, batch_size=32, lr=3e-3 if student == "lora" else 1e-3, warmup_steps=20,
                      log_every=100, save_every=1000)
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    policy = FastDVLAPolicy.from_pretrained(trainer.export())
    assert policy.decode_config.method == "fast_dvla"
    student_acc = accuracy(policy.model, trainer.dataset, "fast_dvla")
    assert student_acc >= teacher_acc - 0.02, (student_acc, teacher_acc)
    if student == "lora":
        assert os.path.isfile(os.path.join(cfg.out, "policy", "adapter.safetensors"))
        # the exported merged weights behave as the adapter-carrying model
        assert accuracy(trainer.model.eval(), trainer.dataset, "fast_dvla") == student_acc


def test_a_student_can_take_blocks_of_several_timesteps(teacher, synthetic, tmp_path):
    _, t_path = teacher
    cfg = TrainConfig(stage="distill", data=synthetic, out=str(tmp_path / "k14"), teacher=t_path,
                      loss="block_diffusion", student_block_size=14, steps=3, log_every=1, save_every=100)
    trainer = Trainer(cfg, progress=False)
    assert trainer.model.num_blocks == TINY["horizon"] * TINY["action_dim"] // 14
    trainer.train()
    policy = FastDVLAPolicy.from_pretrained(trainer.export())
    assert policy.model.block_size == 14 == policy.model.config.block_size
    assert FastDVLAPolicy.from_pretrained(t_path).model.block_size == 7  # the teacher on disk is untouched
    prefix = random_prefix(policy.model, batch=2, seed=3)
    result = decode(policy.model, prefix, DecodeConfig(method="fast_dvla"))
    assert (result.tokens != policy.model.mask_token_id).all() and result.stats.nfe >= 2
    with pytest.raises(ValueError, match="does not divide"):
        Trainer(TrainConfig(stage="distill", data=synthetic, out=str(tmp_path / "k5"), teacher=t_path,
                            student_block_size=5), progress=False)
    for bad in (0, 7.5):
        with pytest.raises(ValueError, match="student_block_size"):
            TrainConfig(stage="distill", data="d", out="o", teacher="t", student_block_size=bad)
    with pytest.raises(ValueError, match="distill stage"):
        TrainConfig(stage="teacher", data="d", out="o", student_block_size=14)


def test_resume_gives_the_same_weights(synthetic, tmp_path):
    def cfg(out):
        return TrainConfig(stage="teacher", data=synthetic, out=str(out), model=dict(TINY), steps=12,
                           batch_size=8, lr=1e-3, warmup_steps=3, log_every=2, save_every=6)
    straight = Trainer(cfg(tmp_path / "a"), progress=False)
    straight.train()
    first = Trainer(cfg(tmp_path / "b"), progress=False)
    first.train(until=6)  # "interrupted" after the checkpoint at step 6
    resumed = Trainer(cfg(tmp_path / "b"), progress=False)
    torch.manual_seed(1234)  # a different process state: resume must restore it
    assert resumed.resume() and resumed.step == 6
    resumed.train()
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    other = cfg(tmp_path / "b")
    other.lr = 5e-4  # another recipe in the same run directory is refused, not silently resumed
    with pytest.raises(ValueError, match="other settings \\(lr\\)"):
        Trainer(other, progress=False).resume()
    from fast_dvla.training.trainer import changed_settings
    older = {k: v for k, v in cfg(tmp_path / "b").to_dict().items() if k not in ("state_ignore", "init_from")}
    assert changed_settings(older, cfg(tmp_path / "b").to_dict()) == []  # written before those settings existed


def _ddp_worker(rank, world, port, data, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from fast_dvla.training.distributed import init_distributed
    torch.set_num_threads(1)
    cfg = TrainConfig(stage="teacher", data=data, out=out, model=dict(TINY), steps=4, batch_size=8, lr=1e-3,
                      warmup_steps=1, log_every=2, save_every=100)
    trainer = Trainer(cfg, init_distributed(), progress=False)
    trainer.train()
    torch.save(trainer.model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_ranks_hold_identical_weights(synthetic, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, synthetic, str(tmp_path)), nprocs=2, join=True)
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    init = tiny_model(0).state_dict()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(not torch.equal(w0[k], init[k]) for k in w0 if k in init)  # and they did train


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"stage": "teacher", "data": "d", "out": "o", "stpes": 3})
    with pytest.raises(ValueError, match="needs 'teacher'"):
        TrainConfig(stage="distill", data="d", out="o")
    with pytest.raises(ValueError, match="student must be"):
        TrainConfig(stage="distill", data="d", out="o", teacher="t", student="adapter")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(data="d", out="o", steps=0)
    path = tmp_path / "c.yaml"
    path.write_text("stage: teacher\ndata: d\nout: o\n")
    assert TrainConfig.load(str(path), ["steps=7", "model.num_layers=1"]).model == {"num_layers": 1}


def test_convergence_command_writes_its_table(tmp_path):
    import argparse
    import json

    from fast_dvla_eval import convergence

    parser = argparse.ArgumentParser()
    convergence.add_arguments(parser)
    args = parser.parse_args(["--steps", "10", "--eval-every", "5", "--teacher-steps", "10", "--episodes", "6",
                              "--seeds", "0,1", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "conv")])
    convergence.main(args)
    result = json.loads((tmp_path / "conv.json").read_text())
    assert [t["target_fraction"] for t in result["tables"]] == [0.95, 1.0]
    assert all([r["run"] for r in t["rows"]] == list(convergence.RUNS) for t in result["tables"])
    assert [s["seed"] for s in result["seeds"]] == [0, 1]
    for seed in result["seeds"]:
        assert all([h["step"] for h in c] == [0, 5, 10] for c in seed["curves"].values())
    # step 0 is evaluated before training: both students started from the teacher start equal
    for seed in result["seeds"]:
        from_teacher = [c[0]["accuracy"] for name, c in seed["curves"].items() if "from teacher" in name]
        assert len(from_teacher) == 2 and from_teacher[0] == from_teacher[1]
    # the two seeds train different teachers
    assert result["seeds"][0]["curves"] != result["seeds"][1]["curves"]
    assert (tmp_path / "conv.md").exists() and (tmp_path / "conv.png").exists()


def test_convergence_summary_counts_steps_and_ratios_per_seed():
    import json

    from fast_dvla_eval import convergence

    def seed(target, **accs):  # a teacher at 1.0 and a target of `target` of it
        curves = {name: [{"step": 25 * i, "accuracy": a} for i, a in enumerate(accs[key])]
                  for name, key in zip(convergence.RUNS, ("a", "b", "c", "d"))}
        return convergence.with_target({"teacher_accuracy": 1.0, "curves": curves}, target)

    seeds = [seed(0.5, a=[0.4, 0.5, 0.6, 0.6], b=[0.4, 0.45, 0.5, 0.6], c=[0.1, 0.2, 0.3, 0.5], d=[0.1, 0.2, 0.3, 0.4]),
             seed(0.5, a=[0.4, 0.45, 0.5, 0.6], b=[0.4, 0.4, 0.4, 0.5], c=[0.1, 0.2, 0.3, 0.4], d=[0.1, 0.1, 0.1, 0.1])]
    summary = convergence.summarise(seeds, steps=75)
    json.dumps(summary)  # plain Python values: the command writes them as JSON
    rows = {r["run"]: r for r in summary}
    a, b, c, d = (rows[n] for n in convergence.RUNS)
    assert a["steps_to_target"] == [25, 50] and a["x_slower"] == 1.0 and a["reached"] == "2/2"
    assert b["steps_to_target"] == [50, 75] and b["x_slower"] == 1.75  # median of 2.0 and 1.5
    assert c["steps_to_target"] == [75, None] and c["reached"] == "1/2" and c["median_steps"] is None
    assert d["steps_to_target"] == [None, None] and d["x_slower_at_least"] and d["x_slower_text"] == ">= 2.0"
    assert abs(a["start_minus_target"] + 0.1) < 1e-9
