"""A policy around any DVLAModel: registered models saved and loaded by name (fast_dvla/registry.py),
a Dream-VLA checkpoint in its published format loaded as a policy, unknown names refused, and the
shipped reference policies, saved before models had names, loading as before."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2Model

from fast_dvla import ActionTokenizer, ConfigError, DecodeConfig, FastDVLAPolicy, ReferenceDVLA, decode
from fast_dvla.adapters import DreamVLA
from fast_dvla.backbone import TransformersBackbone
from fast_dvla.policy import reference_policy_dir
from fast_dvla.policy_model import PolicyModel
from fast_dvla.registry import register_model, registered_models, unregister_model
from helpers import ScriptedModel, redraw_attention

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests/golden/dream_vla_tiny.json").read_text())


# -- a user's own model -------------------------------------------------------------------------------
class StateQwenDVLA(PolicyModel):
    """A user's dVLA: the robot state becomes ``prefix_len`` tokens, a transformers Qwen2 decoder runs
    under the engine's masks and cache, and bins map linearly onto [-1, 1]."""

    def __init__(self, state_dim=5, prefix_len=3, horizon=2, action_dim=4, n_bins=32, hidden=32):
        super().__init__()
        self.init_args = dict(state_dim=state_dim, prefix_len=prefix_len, horizon=horizon, action_dim=action_dim,
                              n_bins=n_bins, hidden=hidden)
        self.horizon, self.action_dim, self.n_bins, self.prefix_len = horizon, action_dim, n_bins, prefix_len
        self.chunk_len, self.block_size = horizon * action_dim, action_dim
        self.state_proj = nn.Linear(state_dim, prefix_len * hidden)
        self.action_embed = nn.Embedding(n_bins + 1, hidden)  # + [MASK]
        self.slot_embed = nn.Parameter(torch.randn(self.chunk_len, hidden))
        self.backbone = TransformersBackbone(Qwen2Model(Qwen2Config(
            vocab_size=2, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=prefix_len + self.chunk_len)))
        self.head = nn.Linear(hidden, n_bins)

    def policy_settings(self):
        return dict(self.init_args)

    def observation_prefix(self, obs):
        state = torch.as_tensor(np.asarray(obs["state"], dtype=np.float32))
        prefix = self.state_proj(state.reshape(-1, state.shape[-1]))
        return prefix.view(prefix.shape[0], self.prefix_len, -1), state.ndim == 1

    def bins_to_actions(self, bins):
        return (bins.reshape(-1, self.horizon, self.action_dim) + 0.5) * 2 / self.n_bins - 1

    def embed_actions(self, tokens, slots):
        return self.action_embed(tokens) + self.slot_embed[slots]

    def backbone_forward(self, embeds, positions, layout, cache):
        return self.backbone(embeds, positions, layout, cache)

    def action_logits(self, hidden):
        return self.head(hidden)

    def new_cache(self, batch_size, max_len):
        return self.backbone.new_cache(batch_size, max_len, self.head.weight.dtype, self.head.weight.device)


@pytest.fixture
def state_qwen():
    register_model("state_qwen", StateQwenDVLA)
    yield
    unregister_model("state_qwen")


def user_model(seed=0) -> StateQwenDVLA:
    torch.manual_seed(seed)
    model = StateQwenDVLA().eval()
    redraw_attention(model, 2.0)  # so that different states decode to different tokens
    with torch.no_grad():
        model.head.weight.mul_(8.0)  # confidences spread over [0, 1], so thresholds commit several tokens a step
    return model


def tokens_of(policy, obs, config):
    with torch.no_grad():
        return decode(policy.model, policy.model.observation_prefix(obs)[0], config).tokens


def test_a_user_registered_model_saves_and_loads_as_a_policy(state_qwen, tmp_path):
    policy = FastDVLAPolicy(user_model(), decode_config=DecodeConfig(method="fast_dvla", tau_conf=0.3),
                            n_action_steps=2)
    assert policy.action_tokenizer is None and policy.processor is None  # the model processes for itself
    obs = {"state": np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32), "instruction": ["stack"] * 4}
    before = tokens_of(policy, obs, policy.decode_config)
    chunk = policy.predict_action_chunk(obs)
    policy.save_pretrained(str(tmp_path / "p"))

    saved = json.loads((tmp_path / "p" / "config.json").read_text())
    assert saved["model_type"] == "state_qwen" and saved["model"] == policy.model.init_args
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["config.json", "model.safetensors"]
    loaded = FastDVLAPolicy.from_pretrained(str(tmp_path / "p"))
    assert type(loaded.model) is StateQwenDVLA and loaded.decode_config == policy.decode_config
    assert loaded.n_action_steps == 2
    for name, tensor in policy.model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name

    after = tokens_of(loaded, obs, loaded.decode_config)
    assert torch.equal(before, after)
    assert len({tuple(row.tolist()) for row in after}) == 4  # the rows really decode differently
    for method in ("vanilla", "vanilla_cached"):
        config = DecodeConfig(method=method, vanilla_steps=4)
        assert torch.equal(tokens_of(policy, obs, config), tokens_of(loaded, obs, config))
    np.testing.assert_array_equal(loaded.predict_action_chunk(obs), chunk)
    assert chunk.shape == (4, 2, 4) and chunk.dtype == np.float32
    expected = (before.numpy().reshape(4, 2, 4) + 0.5) * 2 / 32 - 1
    np.testing.assert_array_equal(chunk, expected.astype(np.float32))

    single = {"state": obs["state"][0], "instruction": "stack"}
    assert loaded.predict_action_chunk(single).shape == (2, 4)
    np.testing.assert_array_equal(loaded.select_action(single), loaded.predict_action_chunk(single)[0])
    with pytest.raises(ValueError, match="call policy.reset"):
        loaded.select_action(obs)  # a batch while a single observation's actions are queued
    loaded.reset()
    assert loaded.select_action(obs).shape == (4, 4)


# -- Dream-VLA ----------------------------------------------------------------------------------------
def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts/goldens" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dream_checkpoint(tmp_path_factory):
    return _load("dream_vla_tiny").write(tmp_path_factory.mktemp("dream") / "ckpt")


@pytest.fixture(scope="module")
def dream_policy(dream_checkpoint):
    return FastDVLAPolicy.from_pretrained(str(dream_checkpoint), adapter="dream_vla")


@pytest.fixture(scope="module")
def dream_observations(dream_checkpoint):
    """The golden cases with a proprio state, as fast-dvla observations: the two images by camera name,
    and the raw state whose normalisation is the golden's (normalised) proprio."""
    sys.path.insert(0, str(ROOT / "scripts/goldens"))
    try:
        cases = _load("dream_vla_golden").cases()
    finally:
        sys.path.remove(str(ROOT / "scripts/goldens"))
    stats = json.loads((dream_checkpoint / "dataset_statistics.json").read_text())["libero_10_no_noops"]["proprio"]
    lo, hi = np.asarray(stats["q01"]), np.asarray(stats["q99"])
    out = []
    for case in cases:
        if case["proprio"] is None:
            continue
        raw = lo + (np.asarray(case["proprio"]) + 1) / 2 * (hi - lo + 1e-8)
        out.append({"images": {"agentview": case["images"][0], "wrist": case["images"][1]}, "state": raw,
                    "instruction": case["instruction"]})
    assert len(out) == 3
    return out


def adapter_path(model: DreamVLA, obs: dict, config: DecodeConfig) -> np.ndarray:
    """The adapter's own functions, one after another: the proprio normalised, the prefix embedded,
    the chunk decoded, the bins un-normalised."""
    images = [obs["images"]["agentview"], obs["images"]["wrist"]]
    prefix = model.embed_prefix([images], [obs["instruction"]], [model.normalize_proprio(obs["state"])])
    with torch.no_grad():
        tokens = decode(model, prefix, config).tokens
    return model.bins_to_actions(tokens.numpy())[0]


def test_a_dream_vla_checkpoint_loads_as_a_policy(dream_checkpoint, dream_policy, dream_observations):
    model = DreamVLA.from_pretrained(dream_checkpoint)
    assert isinstance(dream_policy.model, DreamVLA)
    # its LIBERO evaluation's decoding (one bidirectional step) unless told otherwise
    assert dream_policy.decode_config == DecodeConfig(method="vanilla", vanilla_steps=1)
    for obs, case in zip(dream_observations, GOLDEN["cases"]):
        np.testing.assert_allclose(model.normalize_proprio(obs["state"]), case["proprio"], rtol=0, atol=1e-12)
        chunk = dream_policy.predict_action_chunk(obs)
        assert chunk.shape == (8, 7) and chunk.dtype == np.float32
        np.testing.assert_array_equal(chunk, adapter_path(model, obs, dream_policy.decode_config).astype(np.float32))
        run = next(r for r in case["runs"] if r["steps"] == 1)
        # and so the original code's actions (its argmaxes were all action ids at one step)
        np.testing.assert_allclose(chunk, np.asarray(run["actions"]), rtol=0, atol=1e-6)
    student = DecodeConfig(method="fast_dvla", tau_conf=0.02)  # a cached decoder, through the same processing
    obs = dream_observations[1]
    np.testing.assert_array_equal(dream_policy.predict_action_chunk(obs, student),
                                  adapter_path(model, obs, student).astype(np.float32))
    batch = {"images": {c: np.stack([o["images"][c] for o in dream_observations]) for c in ("agentview", "wrist")},
             "state": np.stack([o["state"] for o in dream_observations]),
             "instruction": [o["instruction"] for o in dream_observations]}
    chunks = dream_policy.predict_action_chunk(batch)
    assert chunks.shape == (3, 8, 7)
    for row, obs in zip(chunks, dream_observations):
        np.testing.assert_array_equal(row, dream_policy.predict_action_chunk(obs))
    dream_policy.reset()
    np.testing.assert_array_equal(dream_policy.select_action(obs), dream_policy.predict_action_chunk(obs)[0])
    dream_policy.reset()


def test_a_dream_vla_checkpoint_is_recognised_by_its_config(dream_checkpoint, dream_policy, dream_observations):
    detected = FastDVLAPolicy.from_pretrained(str(dream_checkpoint))
    assert isinstance(detected.model, DreamVLA) and detected.decode_config == dream_policy.decode_config
    obs = dream_observations[0]
    np.testing.assert_array_equal(detected.predict_action_chunk(obs), dream_policy.predict_action_chunk(obs))


def test_a_dream_vla_policy_saves_its_registered_name_and_loads_back(dream_checkpoint, dream_policy,
                                                                      dream_observations, tmp_path):
    config = DecodeConfig(method="vanilla_cached", vanilla_steps=8)
    FastDVLAPolicy(dream_policy.model, decode_config=config).save_pretrained(str(tmp_path / "p"))
    saved = json.loads((tmp_path / "p" / "config.json").read_text())
    assert saved["model_type"] == "dream_vla" and saved["model"]["checkpoint_config"]["model_type"] == "dream-vla"
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):  # the checkpoint's own, unchanged
        assert (tmp_path / "p" / name).read_bytes() == (dream_checkpoint / name).read_bytes()
    loaded = FastDVLAPolicy.from_pretrained(str(tmp_path / "p"))
    assert isinstance(loaded.model, DreamVLA) and loaded.decode_config == config
    assert loaded.model.proprio_projector is not None
    for name, tensor in dream_policy.model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name
    obs = dream_observations[2]
    np.testing.assert_array_equal(loaded.predict_action_chunk(obs), dream_policy.predict_action_chunk(obs, config))
    # naming the adapter of a directory saved by fast-dvla is allowed when it names the same model
    assert isinstance(FastDVLAPolicy.from_pretrained(str(tmp_path / "p"), adapter="dream_vla").model, DreamVLA)


def test_a_dream_vla_observation_is_checked_by_name(dream_policy, dream_observations):
    obs = dream_observations[0]
    with pytest.raises(KeyError, match=r"missing cameras \['wrist'\]"):
        dream_policy.predict_action_chunk({**obs, "images": {"agentview": obs["images"]["agentview"]}})
    with pytest.raises(KeyError, match="missing 'state'"):
        dream_policy.predict_action_chunk({k: v for k, v in obs.items() if k != "state"})
    with pytest.raises(ValueError, match=r"state must have shape \(8,\)"):
        dream_policy.predict_action_chunk({**obs, "state": obs["state"][:5]})


# -- names refused ------------------------------------------------------------------------------------
def saved_reference_policy(path) -> Path:
    from helpers import tiny_model

    model = tiny_model(0)
    FastDVLAPolicy(model, ActionTokenizer(np.full(7, -1.0), np.ones(7), model.config.n_bins)).save_pretrained(str(path))
    return Path(path)


def test_unknown_names_are_refused_listing_the_registered_ones(dream_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'dream_vla'\?") as e:
        FastDVLAPolicy.from_pretrained(str(dream_checkpoint), adapter="dreamvla")
    assert e.value.field == "adapter" and "('dream_vla', 'reference')" in str(e.value)

    path = saved_reference_policy(tmp_path / "p")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "reference"  # written by save_pretrained
    (path / "config.json").write_text(json.dumps({**config, "model_type": "refrence"}))
    with pytest.raises(ConfigError, match=r"did you mean 'reference'\?") as e:
        FastDVLAPolicy.from_pretrained(str(path))
    assert (e.value.file, e.value.field) == (str(path / "config.json"), "model_type")
    assert str(registered_models()) in str(e.value)
    # a name is looked up, never imported
    (path / "config.json").write_text(json.dumps({**config, "model_type": "os.system"}))
    with pytest.raises(ConfigError, match="registered model must be one of"):
        FastDVLAPolicy.from_pretrained(str(path))

    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="holds a 'reference' model, not 'dream_vla'") as e:
        FastDVLAPolicy.from_pretrained(str(path), adapter="dream_vla")
    assert e.value.field == "model_type"
    with pytest.raises(ConfigError, match="no checkpoint format of its own") as e:
        FastDVLAPolicy.from_pretrained(str(dream_checkpoint), adapter="reference")
    assert "adapters that do: ('dream_vla',)" in str(e.value)

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llava", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="pass adapter=") as e:
        FastDVLAPolicy.from_pretrained(str(tmp_path / "other"))
    assert e.value.field == "format"


def test_a_user_model_is_refused_unregistered_or_misconfigured(state_qwen, tmp_path):
    class Unregistered(PolicyModel):  # no registered name builds it
        horizon, action_dim, chunk_len, block_size, n_bins = 1, 1, 1, 1, 2

    with pytest.raises(ConfigError, match=r"not a registered model.*register_model\('some_name', Unregistered\)"):
        FastDVLAPolicy(Unregistered()).save_pretrained(str(tmp_path / "u"))
    assert not (tmp_path / "u").exists()

    FastDVLAPolicy(user_model()).save_pretrained(str(tmp_path / "p"))
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    config["model"]["hiden"] = config["model"].pop("hidden")
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"model\.hiden: unknown key; did you mean 'hidden'\?") as e:
        FastDVLAPolicy.from_pretrained(str(tmp_path / "p"))
    assert e.value.file == str(tmp_path / "p" / "config.json")

    with pytest.raises(ValueError, match="already registered for StateQwenDVLA"):
        register_model("state_qwen", StateQwenDVLA)
    with pytest.raises(ValueError, match="built in"):
        register_model("reference", StateQwenDVLA)
    with pytest.raises(ValueError, match="built in"):
        unregister_model("dream_vla")
    with pytest.raises(TypeError, match="PolicyModel"):
        register_model("plain", ReferenceDVLA)
    with pytest.raises(ValueError, match="identifier"):
        register_model("my model", StateQwenDVLA)


def test_a_policy_needs_a_model_that_processes_observations():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="takes no action_tokenizer"):
        FastDVLAPolicy(user_model(), ActionTokenizer.fit(rng.uniform(-1, 1, (50, 4)), n_bins=32))
    scripted = ScriptedModel(torch.full((1, 7), 0.9), torch.zeros(1, 7, dtype=torch.long), block_size=7)
    with pytest.raises(TypeError, match="subclass fast_dvla.policy_model.PolicyModel"):
        FastDVLAPolicy(scripted)


# -- the reference model ------------------------------------------------------------------------------
@pytest.mark.parametrize("role,block_size", [("teacher", 7), ("student", 14)])
def test_the_shipped_reference_policies_load_unchanged(role, block_size):
    path = Path(reference_policy_dir(role))
    assert "model_type" not in json.loads((path / "config.json").read_text())  # saved before models had names
    policy = FastDVLAPolicy.from_pretrained(str(path))
    assert type(policy.model) is ReferenceDVLA and policy.model.block_size == block_size
    assert policy.config_dict()["model_type"] == "reference"
    rng = np.random.default_rng(0)
    obs = {"images": {c: rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for c in ("agentview", "wrist")},
           "state": rng.normal(size=8).astype(np.float32), "instruction": "put the soup in the basket"}
    chunk = policy.predict_action_chunk(obs)
    assert chunk.shape == (8, 7) and np.isfinite(chunk).all()
    assert set(np.unique(chunk[:, 6])) <= {-1.0, 1.0}  # the gripper through its action tokenizer
