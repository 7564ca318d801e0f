"""A policy's files and a training YAML are a schema: every key known, every value of its type and
range, every error naming the file and the field at fault."""
import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fast_dvla import ActionTokenizer, DecodeConfig, FastDVLAPolicy, ModelConfig
from fast_dvla.policy import reference_policy_dir
from fast_dvla.processor import StateNormalizer
from fast_dvla.schema import ConfigError
from fast_dvla.training.config import TrainConfig
from helpers import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny policy directory, saved once; each test edits a copy."""
    rng = np.random.default_rng(0)
    policy = FastDVLAPolicy(tiny_model(0), ActionTokenizer.fit(rng.uniform(-1, 1, (200, 7)), gripper_dims=(6,)),
                            StateNormalizer.fit(rng.normal(size=(50, 8))), DecodeConfig(method="vanilla_cached"),
                            method_settings={"fast_dvla": {"near_bins": 3}})
    path = tmp_path_factory.mktemp("policy") / "p"
    policy.save_pretrained(str(path))
    return path


@pytest.fixture
def copy(saved, tmp_path):
    path = tmp_path / "p"
    shutil.copytree(saved, path)
    return path


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def refused(path, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        FastDVLAPolicy.from_pretrained(str(path), **kw)
    return e.value


def test_shipped_policies_and_every_training_config_load():
    for role, block_size in (("teacher", 7), ("student", 14)):
        assert FastDVLAPolicy.from_pretrained(reference_policy_dir(role)).model.block_size == block_size
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
    assert len(paths) >= 10
    for path in paths:
        assert TrainConfig.load(path).stage in ("teacher", "distill"), path


@pytest.mark.parametrize("section,key,value,field,nearest", [
    ("model", "blocksize", 14, "model.blocksize", "block_size"),
    ("decode", "tau_cnf", 0.3, "decode.tau_cnf", "tau_conf"),
    (None, "n_action_step", 4, "n_action_step", "n_action_steps"),
])
def test_an_unknown_key_is_refused_with_the_nearest_name(copy, section, key, value, field, nearest):
    edit_json(copy / "config.json", lambda c: (c[section] if section else c).update({key: value}))
    error = refused(copy)
    assert (error.file, error.field) == (str(copy / "config.json"), field)
    assert f"did you mean {nearest!r}" in str(error) and str(error).startswith(str(copy / "config.json"))


@pytest.mark.parametrize("section,key,value,field", [
    ("model", "hidden_size", "256", "model.hidden_size"),
    ("model", "block_size", "14", "model.block_size"),
    ("model", "cameras", "agentview", "model.cameras"),
    ("decode", "temperature", "0.0", "decode.temperature"),
    ("decode", "use_cache", "false", "decode.use_cache"),
    ("decode", "fallback_n", True, "decode.fallback_n"),
    ("decode", "seed", "abc", "decode.seed"),
    ("decode", "temperature", float("inf"), "decode.temperature"),  # json writes Infinity
    ("decode", "tau_conf", float("nan"), "decode.tau_conf"),
    (None, "n_action_steps", "8", "n_action_steps"),
    (None, "n_action_steps", 0, "n_action_steps"),
    (None, "decode", None, "decode"),
    (None, "model", None, "model"),
    (None, "method_settings", None, "method_settings"),
    (None, "version", 2, "version"),
])
def test_a_wrong_value_is_named_where_it_is(copy, section, key, value, field):
    edit_json(copy / "config.json", lambda c: (c[section] if section else c).update({key: value}))
    error = refused(copy)
    assert (error.file, error.field) == (str(copy / "config.json"), field)
    assert "expected" in error.problem


def test_a_bad_entry_for_another_decoder_names_it(copy):
    edit_json(copy / "config.json", lambda c: c["method_settings"]["fast_dvla"].update(near_bins=-1))
    error = refused(copy)
    assert error.file == str(copy / "config.json") and "method_settings['fast_dvla']: near_bins" in str(error)


def test_n_action_steps_is_an_int_in_the_horizon_not_a_fallback(copy):
    for bad in (0, True, 5, "2"):  # the tiny model's horizon is 4
        assert refused(copy, n_action_steps=bad).field == "n_action_steps"
    assert FastDVLAPolicy.from_pretrained(str(copy), n_action_steps=2).n_action_steps == 2
    policy = FastDVLAPolicy.from_pretrained(str(copy))
    for bad in (0, True):  # built in Python: 0 is not "the horizon" either
        with pytest.raises(ConfigError, match="n_action_steps"):
            FastDVLAPolicy(policy.model, policy.action_tokenizer, policy.state_norm, n_action_steps=bad)
    policy.n_action_steps = 0  # set after construction: saving checks again, and writes nothing
    with pytest.raises(ConfigError, match="n_action_steps") as e:
        policy.save_pretrained(str(copy.parent / "bad"))
    assert e.value.file == str(copy.parent / "bad" / "config.json") and not (copy.parent / "bad").exists()


@pytest.mark.parametrize("settings,field", [
    (dict(seed=1.5), "seed"), (dict(seed="abc"), "seed"), (dict(seed=True), "seed"), (dict(seed=2 ** 64), "seed"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="0.0"), "temperature"), (dict(tau_add=float("inf")), "tau_add"),
    (dict(use_cache="false"), "use_cache"), (dict(method="fast_dvla2"), "method"),
])
def test_the_python_api_refuses_what_a_file_may_not_hold(settings, field):
    with pytest.raises(ConfigError) as e:
        DecodeConfig(**settings)
    assert e.value.field == field and e.value.file is None


def test_model_config_checks_its_fields():
    for settings, field in ((dict(hidden_size="256"), "hidden_size"), (dict(block_size="14"), "block_size"),
                            (dict(num_layers=0), "num_layers"), (dict(attn_backend="sdpaa"), "attn_backend"),
                            (dict(horizon=True), "horizon")):
        with pytest.raises(ConfigError) as e:
            ModelConfig(**settings)
        assert e.value.field == field
    with pytest.raises(ConfigError, match="did you mean 'block_size'"):
        ModelConfig.from_dict({"blocksize": 14})
    assert DecodeConfig(seed=3).seed == 3 and ModelConfig.from_dict({"cameras": ["wrist"]}).cameras == ("wrist",)


def test_non_finite_weights_are_refused_naming_the_tensor(copy):
    weights = load_file(str(copy / "model.safetensors"))
    name = next(k for k in weights if "mlp" in k and k.endswith("weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, str(copy / "model.safetensors"))
    error = refused(copy)
    assert (error.file, error.field) == (str(copy / "model.safetensors"), name)


def test_a_model_with_non_finite_weights_is_not_saved(saved, tmp_path):
    policy = FastDVLAPolicy.from_pretrained(str(saved))
    with torch.no_grad():
        policy.model.head.weight[0, 0] = 1e6  # finite in float32, inf in float16
    policy.save_pretrained(str(tmp_path / "fp32"))
    with pytest.raises(ConfigError, match="non-finite") as e:
        policy.save_pretrained(str(tmp_path / "fp16"), dtype=torch.float16)
    assert e.value.field == "head.weight" and not (tmp_path / "fp16").exists()


def test_unreadable_files_are_named(copy):
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert refused(copy).file == str(copy / "model.safetensors")
    (copy / "model.safetensors").write_bytes(data)
    for name in ("action_stats.json", "state_stats.json", "config.json"):  # the reverse of the order they load in
        (copy / name).write_text('{"mean": [0.0,')
        assert refused(copy).file == str(copy / name)


@pytest.mark.parametrize("name,change,field", [
    ("state_stats.json", lambda d: d.pop("std"), "std"),
    ("state_stats.json", lambda d: d.update(mean=d["mean"][:5]), "std"),
    ("state_stats.json", lambda d: d.update(mean=d["mean"][:5], std=d["std"][:5]), "mean"),  # the model's is 8
    ("state_stats.json", lambda d: d["std"].__setitem__(2, float("nan")), "std[2]"),
    ("state_stats.json", lambda d: d.update(ignore=[8]), "ignore"),
    ("state_stats.json", lambda d: d.update(ignor=[3]), "ignor"),
    ("action_stats.json", lambda d: d.pop("q99"), "q99"),
    ("action_stats.json", lambda d: d.update(q99=d["q99"][:6]), "q99"),
    # the model's action_dim is 7
    ("action_stats.json", lambda d: d.update(q01=d["q01"][:6], q99=d["q99"][:6], gripper_dims=[5]), "q01"),
    ("action_stats.json", lambda d: d["q01"].__setitem__(0, float("inf")), "q01[0]"),
    ("action_stats.json", lambda d: d.update(n_bins="256"), "n_bins"),
    ("action_stats.json", lambda d: d.update(n_bins=128), "n_bins"),  # the model's is 256
])
def test_statistics_errors_name_the_file_and_the_entry(copy, name, change, field):
    edit_json(copy / name, change)
    error = refused(copy)
    assert (error.file, error.field) == (str(copy / name), field)


def write_yaml(tmp_path, text):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("extra,field,words", [
    ("stpes: 3", "stpes", "did you mean 'steps'"),
    ("model: {blocksize: 14}", "model.blocksize", "did you mean 'block_size'"),
    ("model: {hidden_size: '256'}", "model.hidden_size", "expected an integer"),
    ("lr: 1e-3", "lr", "1.0e-3"),  # YAML 1.1 reads this as a string
    ("steps: true", "steps", "expected an integer"),
    ("steps: 0", "steps", ">= 1"),
    ("gripper_dims: [six]", "gripper_dims[0]", "expected an integer"),
    ("threads: 0", "threads", ">= 1"),
    ("model: null", "model", "expected a mapping"),
    ("grad_clip: .nan", "grad_clip", "finite"),
])
def test_training_yaml_errors_name_the_file_and_the_key(tmp_path, extra, field, words):
    path = write_yaml(tmp_path, f"stage: teacher\ndata: d\nout: o\n{extra}\n")
    with pytest.raises(ConfigError) as e:
        TrainConfig.load(path)
    assert (e.value.file, e.value.field) == (path, field) and words in str(e.value)


def test_training_yaml_refuses_what_its_stage_would_ignore(tmp_path):
    distill = "stage: distill\ndata: d\nout: o\nteacher: t\n"
    for extra, field in (("model: {num_layers: 2}", "model"), ("state_ignore: [3]", "state_ignore")):
        with pytest.raises(ConfigError, match="applies to the teacher stage") as e:
            TrainConfig.load(write_yaml(tmp_path, distill + extra))
        assert e.value.field == field


def test_a_training_file_that_is_not_a_mapping_or_not_yaml_is_named(tmp_path):
    for text in ("- a\n- b\n", "stage: [teacher\n"):
        path = write_yaml(tmp_path, text)
        with pytest.raises(ConfigError) as e:
            TrainConfig.load(path)
        assert e.value.file == path
    path = write_yaml(tmp_path, "stage: teacher\ndata: d\nout: o\n")
    with pytest.raises(ConfigError) as e:
        TrainConfig.load(path, ["steps=abc"])
    assert (e.value.file, e.value.field) == (path, "steps")
    assert TrainConfig.load(path, ["steps=7", "model.num_layers=1"]).model == {"num_layers": 1}
