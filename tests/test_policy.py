import numpy as np
import pytest
import torch

from fast_dvla import ActionTokenizer, DecodeConfig, FastDVLAPolicy
from fast_dvla.processor import StateNormalizer
from helpers import tiny_model


def make_policy(**kw):
    model = tiny_model(0, sharpness=8.0)
    rng = np.random.default_rng(0)
    tok = ActionTokenizer.fit(rng.uniform(-1, 1, (200, 7)), gripper_dims=(6,))
    return FastDVLAPolicy(model, tok, StateNormalizer.fit(rng.normal(size=(50, 8))), **kw)


def obs(batch=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (16, 16, 3) if batch is None else (batch, 16, 16, 3)
    return {"images": {c: rng.integers(0, 255, shape, dtype=np.uint8) for c in ("agentview", "wrist")},
            "state": rng.normal(size=(8,) if batch is None else (batch, 8)).astype(np.float32),
            "instruction": "put the soup in the basket" if batch is None else ["put the soup in the basket"] * batch}


def test_predict_shapes_and_stats():
    policy = make_policy()
    chunk = policy.predict_action_chunk(obs())
    assert chunk.shape == (4, 7) and chunk.dtype == np.float32 and np.isfinite(chunk).all()
    assert set(np.unique(chunk[:, 6])) <= {-1.0, 1.0}
    assert policy.last_stats.nfe >= 4
    batch = policy.predict_action_chunk(obs(batch=3))
    assert batch.shape == (3, 4, 7)
    assert np.allclose(batch[0], policy.predict_action_chunk(obs(batch=3))[0])


def test_select_action_serves_a_queue():
    policy = make_policy(n_action_steps=3)
    o = obs()
    chunk = policy.predict_action_chunk(o)
    calls = []
    original = policy.predict_action_chunk
    policy.predict_action_chunk = lambda ob, config=None: calls.append(1) or original(ob, config)
    actions = [policy.select_action(o) for _ in range(4)]
    assert len(calls) == 2  # refilled after n_action_steps
    assert np.allclose(actions[:3], chunk[:3])
    policy.reset()
    policy.select_action(o)
    assert len(calls) == 3
    batch = make_policy(n_action_steps=2)
    assert batch.select_action(obs(batch=2)).shape == (2, 7)


def test_export_saves_the_decoding_settings_chosen_for_a_policy(tmp_path):
    from fast_dvla.cli import main as cli

    make_policy(decode_config=DecodeConfig(method="fast_dvla", tau_conf=0.5)).save_pretrained(tmp_path / "run")
    cli(["export", "--policy", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--tau-conf", "0.2"])
    exported = FastDVLAPolicy.from_pretrained(str(tmp_path / "out"))
    assert exported.decode_config == DecodeConfig(method="fast_dvla", tau_conf=0.2)
    assert exported.model.action_embed.weight.dtype == torch.float32  # stored half, loaded in the model's dtype
    with pytest.raises(SystemExit, match="tau_conf"):
        cli(["export", "--policy", str(tmp_path / "run"), "--out", str(tmp_path / "bad"), "--tau-conf", "1.5"])
    cli(["export", "--policy", str(tmp_path / "run"), "--out", str(tmp_path / "sampler"),
         "--method", "vanilla_cached", "--vanilla-steps", "5"])
    chosen = FastDVLAPolicy.from_pretrained(str(tmp_path / "sampler")).decode_config
    assert chosen == DecodeConfig(method="vanilla_cached", vanilla_steps=5)
    with pytest.raises(SystemExit, match="vanilla_steps"):
        cli(["export", "--policy", str(tmp_path / "run"), "--out", str(tmp_path / "bad"), "--vanilla-steps", "0"])
    cli(["export", "--policy", str(tmp_path / "run"), "--out", str(tmp_path / "mean"), "--token-rule", "mean"])
    assert FastDVLAPolicy.from_pretrained(str(tmp_path / "mean")).decode_config.token_rule == "mean"
    cli(["export", "--policy", str(tmp_path / "mean"), "--out", str(tmp_path / "near"), "--near-bins", "3"])
    assert FastDVLAPolicy.from_pretrained(str(tmp_path / "near")).decode_config.near_bins == 3
    with pytest.raises(SystemExit, match="near_bins"):
        cli(["export", "--policy", str(tmp_path / "run"), "--out", str(tmp_path / "bad"), "--near-bins", "-1"])


def test_a_policy_keeps_settings_for_decoders_asked_for_by_name(tmp_path):
    default = DecodeConfig(method="vanilla_cached", vanilla_steps=5)
    tuned = {"fast_dvla": {"token_rule": "mean", "near_bins": 3}}
    policy = make_policy(decode_config=default, method_settings=tuned)
    assert policy.decode_config_for("vanilla_cached") == default
    assert policy.decode_config_for("fast_dvla") == DecodeConfig(method="fast_dvla", vanilla_steps=5, token_rule="mean",
                                                                 near_bins=3)
    assert policy.decode_config_for("block_diffusion") == default.replace(method="block_diffusion")
    policy.save_pretrained(tmp_path / "p")
    loaded = FastDVLAPolicy.from_pretrained(str(tmp_path / "p"))
    assert loaded.decode_config == default and loaded.method_settings == tuned
    # a default given at load time replaces the saved one, and with it that decoder's saved entry
    chosen = FastDVLAPolicy.from_pretrained(str(tmp_path / "p"), decode_config=DecodeConfig(method="fast_dvla"))
    assert chosen.method_settings == {} and chosen.decode_config_for("fast_dvla") == DecodeConfig(method="fast_dvla")
    assert FastDVLAPolicy.from_pretrained(str(tmp_path / "p"), decode_config=default.replace(vanilla_steps=7)
                                          ).decode_config_for("fast_dvla").near_bins == 3


@pytest.mark.parametrize("settings,match", [
    ({"fast_dvla_v2": {"tau_conf": 0.5}}, "unknown decoder"),
    ({"vanilla_cached": {"vanilla_steps": 6}}, "default decoder"),
    ({"fast_dvla": {"temperature": 1.0}}, "unknown settings"),
    ({"fast_dvla": {"near_bins": -1}}, r"method_settings\['fast_dvla'\]: near_bins"),
    ({"fast_dvla": {"tau_conf": 2.0}}, "tau_conf"),
])
def test_bad_method_settings_are_named(settings, match, tmp_path):
    default = DecodeConfig(method="vanilla_cached")
    with pytest.raises(ValueError, match=match):
        make_policy(decode_config=default, method_settings=settings)
    policy = make_policy(decode_config=default)
    policy.method_settings = settings  # set after construction: saving checks again
    if "vanilla_cached" not in settings:  # the default's own entry: see the next test
        with pytest.raises(ValueError, match=match):
            policy.save_pretrained(tmp_path / "bad")


def test_a_default_set_after_construction_replaces_that_decoders_saved_settings(tmp_path):
    policy = make_policy(decode_config=DecodeConfig(method="vanilla_cached"),
                         method_settings={"fast_dvla": {"token_rule": "mean"}, "block_diffusion": {"tau_conf": 0.7}})
    policy.decode_config = DecodeConfig(method="fast_dvla", tau_conf=0.3)
    assert policy.decode_config_for("fast_dvla") == policy.decode_config
    policy.save_pretrained(tmp_path / "p")
    loaded = FastDVLAPolicy.from_pretrained(str(tmp_path / "p"))
    assert loaded.decode_config == DecodeConfig(method="fast_dvla", tau_conf=0.3)
    assert loaded.method_settings == {"block_diffusion": {"tau_conf": 0.7}}


def test_export_saves_settings_for_a_decoder_by_name(tmp_path):
    from fast_dvla.cli import main as cli

    make_policy(decode_config=DecodeConfig(method="vanilla_cached", vanilla_steps=5)).save_pretrained(tmp_path / "run")
    cli(["export", "--policy", str(tmp_path / "run"), "--out", str(tmp_path / "tuned"), "--for-method", "fast_dvla",
         "--token-rule", "mean", "--near-bins", "3"])
    tuned = FastDVLAPolicy.from_pretrained(str(tmp_path / "tuned"))
    assert tuned.decode_config == DecodeConfig(method="vanilla_cached", vanilla_steps=5)
    assert tuned.method_settings == {"fast_dvla": {"token_rule": "mean", "near_bins": 3}}
    cli(["export", "--policy", str(tmp_path / "tuned"), "--out", str(tmp_path / "more"), "--for-method", "fast_dvla",
         "--tau-conf", "0.7"])
    assert FastDVLAPolicy.from_pretrained(str(tmp_path / "more")).method_settings == {
        "fast_dvla": {"token_rule": "mean", "near_bins": 3, "tau_conf": 0.7}}
    # making it the default takes its saved settings along
    cli(["export", "--policy", str(tmp_path / "tuned"), "--out", str(tmp_path / "switched"), "--method", "fast_dvla"])
    switched = FastDVLAPolicy.from_pretrained(str(tmp_path / "switched"))
    assert switched.decode_config == DecodeConfig(method="fast_dvla", vanilla_steps=5, token_rule="mean", near_bins=3)
    assert switched.method_settings == {}
    with pytest.raises(SystemExit, match="at least one"):
        cli(["export", "--policy", str(tmp_path / "run"), "--out", str(tmp_path / "bad"), "--for-method", "fast_dvla"])
    with pytest.raises(SystemExit, match="near_bins"):
        cli(["export", "--policy", str(tmp_path / "run"), "--out", str(tmp_path / "bad"), "--for-method", "fast_dvla",
             "--near-bins", "-1"])


def test_save_and_load_round_trip(tmp_path):
    policy = make_policy(decode_config=DecodeConfig(tau_conf=0.4), n_action_steps=2)
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = FastDVLAPolicy.from_pretrained(str(tmp_path / "ckpt"))
    assert loaded.decode_config == policy.decode_config and loaded.n_action_steps == 2
    assert np.array_equal(loaded.predict_action_chunk(obs()), policy.predict_action_chunk(obs()))
    policy.save_pretrained(tmp_path / "half", dtype=torch.float16)
    half = FastDVLAPolicy.from_pretrained(str(tmp_path / "half"))
    assert next(half.model.parameters()).dtype == torch.float32
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < 0.6 * (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    with pytest.raises(FileNotFoundError, match="not a fast-dvla checkpoint"):
        FastDVLAPolicy.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("mutate,err,match", [
    (lambda o: o["images"].pop("wrist"), KeyError, "missing cameras"),
    (lambda o: o["images"].update(wrist=o["images"]["wrist"][:8]), ValueError, "shape"),
    (lambda o: o["images"].update(wrist=o["images"]["wrist"].astype(np.float32)), TypeError, "uint8"),
    (lambda o: o.update(state=np.full(8, np.nan)), ValueError, "NaN"),
    (lambda o: o.update(state=np.zeros(5)), ValueError, "state must have shape"),
    (lambda o: o.pop("instruction"), KeyError, "instruction"),
    (lambda o: o.update(instruction=[]), TypeError, "instruction"),
])
def test_bad_observations_are_named(mutate, err, match):
    policy = make_policy()
    o = obs()
    mutate(o)
    with pytest.raises(err, match=match):
        policy.predict_action_chunk(o)


def test_mismatched_tokenizer_is_rejected():
    with pytest.raises(ValueError, match="action_dim"):
        FastDVLAPolicy(tiny_model(0), ActionTokenizer(np.zeros(6), np.ones(6)))


def test_ignored_state_entries_are_never_read(tmp_path):
    rng = np.random.default_rng(1)
    norm = StateNormalizer.fit(rng.normal(size=(50, 8)), ignore=[3, 4, 5])
    policy = make_policy()
    policy = FastDVLAPolicy(policy.model, policy.action_tokenizer, norm)
    base = obs()
    moved = {**base, "state": base["state"].copy()}
    moved["state"][3:6] += 100.0  # far out of range
    state_in = lambda o: policy.processor(o)[0]["state"]  # noqa: E731  what the model receives
    assert torch.equal(state_in(base), state_in(moved))
    assert np.array_equal(policy.predict_action_chunk(base), policy.predict_action_chunk(moved))
    other = {**base, "state": base["state"].copy()}
    other["state"][0] += 1.0  # a read entry still reaches the model
    assert not torch.equal(state_in(base), state_in(other))
    policy.save_pretrained(tmp_path / "p")
    assert FastDVLAPolicy.from_pretrained(str(tmp_path / "p")).state_norm.ignore == (3, 4, 5)
    # statistics saved before the option existed load as "read everything"
    assert StateNormalizer.from_dict({"mean": [0.0] * 8, "std": [1.0] * 8}).ignore == ()
    with pytest.raises(ValueError, match="out of range"):
        StateNormalizer.fit(rng.normal(size=(50, 8)), ignore=[8])


def test_the_backbone_family_is_saved_and_refused_by_name(tmp_path):
    from fast_dvla.schema import ConfigError

    model = tiny_model(0, backbone="qwen2")
    tok = ActionTokenizer(np.full(7, -1.0), np.ones(7), model.config.n_bins)
    FastDVLAPolicy(model, tok).save_pretrained(str(tmp_path / "q"))
    loaded = FastDVLAPolicy.from_pretrained(str(tmp_path / "q"))
    assert loaded.model.config.backbone == "qwen2"
    assert type(loaded.model.backbone.decoder).__name__ == "Qwen2Model"
    for name, p in model.state_dict().items():
        assert torch.equal(p, loaded.model.state_dict()[name]), name
    with pytest.raises(ConfigError, match="did you mean 'qwen2'"):
        tiny_model(0, backbone="qwen")
