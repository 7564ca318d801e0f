"""fast-dvla tune: the sweep's measurements, the recommendation, resuming, the command."""
import json

import numpy as np
import pytest
import torch

from fast_dvla import ActionTokenizer, DecodeConfig, FastDVLAPolicy, decode
from fast_dvla.benchmark.stats import intervals_overlap, wilson_interval
from fast_dvla.cli import main as cli
from fast_dvla.processor import StateNormalizer
from fast_dvla.tuning import NoSettingMeets, tune
from fast_dvla.tuning.grid import parse_values, product_grid, read_settings_file, validated_configs
from fast_dvla.tuning.recommend import METRICS, pareto_front, recommend
from fast_dvla.tuning.sweep import SweepStore
from fast_dvla.training.synthetic import write_synthetic_dataset
from helpers import ScriptedModel, fallback_steps, scripted_prefix, tiny_model

HORIZON, DIM, K = 4, 7, 7
L = HORIZON * DIM


class ScriptedPolicy(FastDVLAPolicy):
    """A real policy (processor, tokenizer, queue) whose chunk comes from a ScriptedModel: every
    slot's token and confidence are the test's, whatever the observation."""

    def __init__(self, target: torch.Tensor, conf: torch.Tensor, **kw):
        model = tiny_model(0, horizon=HORIZON, block_size=K)
        rng = np.random.default_rng(0)
        tok = ActionTokenizer.fit(rng.uniform(-1, 1, (200, DIM)), gripper_dims=(6,))
        super().__init__(model, tok, StateNormalizer.fit(rng.normal(size=(50, 8))), **kw)
        self.scripted = ScriptedModel(conf[None], target[None], block_size=K, n_bins=model.n_bins)
        self.calls = 0

    def decode_prefix(self, prefix, config):
        self.calls += 1
        return decode(self.scripted, scripted_prefix(prefix.shape[0]), config)


def targets(seed: int) -> torch.Tensor:
    """Random tokens whose gripper slots are 0 or n_bins-1 (what a binary gripper can hold)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 256, (HORIZON, DIM), generator=g)
    t[:, 6] = torch.randint(0, 2, (HORIZON,), generator=g) * 255
    return t.flatten()


def observations(n: int):
    rng = np.random.default_rng(1)
    return [{"images": {c: rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for c in ("agentview", "wrist")},
             "state": rng.normal(size=8).astype(np.float32), "instruction": "put the soup in the basket"}
            for _ in range(n)]


@pytest.fixture
def pair():
    """A teacher and a student that differ at a known share of the slots; the student's confidences
    are distinct within a block (no ties) and all in [0.55, 0.61], so thresholds at or below 0.55
    commit whole blocks and those above 0.61 leave every commit to the fallback."""
    teacher_tokens = targets(0)
    student_tokens = teacher_tokens.clone()
    differ = torch.arange(0, L, 4)                       # a quarter of the slots
    student_tokens[differ] = (student_tokens[differ] + 128) % 256
    student_tokens.view(HORIZON, DIM)[:, 6] = teacher_tokens.view(HORIZON, DIM)[:, 6]  # grippers agree
    agree = float((student_tokens == teacher_tokens).float().mean())
    teacher = ScriptedPolicy(teacher_tokens, torch.full((L,), 0.9),
                             decode_config=DecodeConfig(method="vanilla", vanilla_steps=4))
    student = ScriptedPolicy(student_tokens, 0.55 + 0.01 * (torch.arange(L) % K),
                             decode_config=DecodeConfig(method="block_diffusion", fallback_n=2))
    return teacher, student, agree


def test_the_sweep_reports_the_nfe_and_agreement_the_thresholds_imply(pair, tmp_path):
    teacher, student, agree = pair
    result = tune(student, observations(3), teacher, [{"tau_conf": 0.5}, {"tau_conf": 0.9}],
                  method="block_diffusion", timing_frames=2, progress=False)
    rows = {r["setting"]: r for r in result.rows}
    blocks = L // K
    assert rows["tau_conf=0.5"]["nfe"] == blocks                         # all >= 0.5: one forward a block
    assert rows["tau_conf=0.9"]["nfe"] == blocks * fallback_steps(K, 2)  # nothing confident: fallback only
    assert rows["teacher vanilla"]["nfe"] == 4 and rows["teacher vanilla"]["teacher_agreement"] == 1.0
    for name in ("tau_conf=0.5", "tau_conf=0.9"):
        assert rows[name]["teacher_agreement"] == pytest.approx(agree)
        assert rows[name]["speedup"] > 0 and rows[name]["action_hz"] > 0
    assert 0.5 < agree < 1.0
    # the policy's own setting (tau_conf 0.5 by default) is in the sweep and named as current
    assert result.current == "tau_conf=0.5"


def test_demonstrations_give_the_action_error(pair):
    teacher, student, _ = pair
    frames = [(o, teacher.predict_action_chunk(o)) for o in observations(2)]
    result = tune(student, frames, teacher, [{"tau_conf": 0.5}], method="block_diffusion", timing_frames=1,
                  progress=False)
    teacher_row, row = result.rows
    assert teacher_row["mae"] == 0 and teacher_row["token_accuracy"] == 1.0
    expected = np.abs(student.predict_action_chunk(frames[0][0]) - frames[0][1]).mean()
    assert row["mae"] == pytest.approx(expected, rel=1e-5) and row["mae"] > 0
    assert result.metric == "mae"


def test_a_resumed_sweep_decodes_only_what_is_missing(pair, tmp_path):
    teacher, student, _ = pair
    obs = observations(2)
    first = tune(student, obs, teacher, [{"tau_conf": 0.5}], method="block_diffusion", timing_frames=1,
                 out=str(tmp_path), progress=False)
    calls = student.calls
    again = tune(student, obs, teacher, [{"tau_conf": 0.5}], method="block_diffusion", timing_frames=1,
                 out=str(tmp_path), progress=False)
    assert student.calls == calls and again.rows == first.rows
    tune(student, obs, teacher, [{"tau_conf": 0.5}, {"tau_conf": 0.7}], method="block_diffusion",
         timing_frames=1, out=str(tmp_path), progress=False)
    assert student.calls > calls
    with pytest.raises(ValueError, match="frames_sha1"):
        tune(student, observations(3)[1:], teacher, [{"tau_conf": 0.5}], method="block_diffusion",
             timing_frames=1, out=str(tmp_path), progress=False)


def row(name, speedup, hz, mae):
    return {"setting": name, "config": {"tau_conf": float(name)}, "speedup": speedup, "action_hz": hz, "mae": mae}


ROWS = [row("0.9", 2.0, 100, 0.0115), row("0.5", 3.0, 150, 0.012), row("0.3", 3.5, 175, 0.020),
        row("0.1", 4.0, 200, 0.050), row("0.2", 3.4, 170, 0.030)]
TEACHER = {"setting": "teacher", "speedup": 1.0, "action_hz": 50, "mae": 0.010}


def test_the_recommendation_is_the_fastest_setting_within_the_drop():
    mae = METRICS["mae"]
    r = recommend(ROWS, TEACHER, mae, max_drop=0.005)
    assert r["setting"] == "0.5" and r["bound_by"] == ["max_drop"]
    assert r["drop"] == pytest.approx(0.002) and r["drop_margin"] == pytest.approx(0.003)
    assert recommend(ROWS, TEACHER, mae, max_drop=0.011)["setting"] == "0.3"
    assert recommend(ROWS, TEACHER, mae, max_drop=1.0)["bound_by"] == ["none: no better setting in the sweep"]
    # the default budget is the metric's own
    assert recommend(ROWS, TEACHER, mae)["setting"] == "0.3"


def test_a_target_rate_alone_buys_the_most_faithful_setting_that_reaches_it():
    mae = METRICS["mae"]
    r = recommend(ROWS, TEACHER, mae, target_hz=160)
    assert r["setting"] == "0.3" and r["bound_by"] == ["target_hz"] and r["hz_margin"] == pytest.approx(15)
    assert recommend(ROWS, TEACHER, mae, max_drop=0.011, target_hz=170)["setting"] == "0.3"
    with pytest.raises(NoSettingMeets, match=r"drop <= 0.011 and >= 180 action Hz.*smallest mae drop was 0.*"
                                             r"fastest setting 200.0"):
        recommend(ROWS, TEACHER, mae, max_drop=0.011, target_hz=180)


def test_no_setting_meeting_the_drop_is_refused_with_the_best_drop():
    with pytest.raises(NoSettingMeets, match=r"mae drop <= 0.001.*smallest mae drop was 0.0015"):
        recommend(ROWS, TEACHER, METRICS["mae"], max_drop=0.001)


def test_the_pareto_front_keeps_only_undominated_settings():
    front = [r["setting"] for r in pareto_front(ROWS, METRICS["mae"])]
    assert front == ["0.1", "0.3", "0.5", "0.9"]   # 0.2 is slower and worse than 0.3


def test_success_uses_higher_is_better_and_flags_noise():
    success = METRICS["success"]
    rows = [{"setting": "a", "config": {}, "speedup": 3, "action_hz": 1, "success": 0.9,
             "interval": list(wilson_interval(36, 40))}]
    teacher = {"setting": "t", "success": 0.95, "interval": list(wilson_interval(38, 40))}
    r = recommend(rows, teacher, success, max_drop=0.06)
    assert r["drop"] == pytest.approx(0.05) and r["within_noise"] is True


def test_wilson_intervals():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(113, 120)
    assert (round(lo, 3), round(hi, 3)) == (0.884, 0.971)  # by hand: centre 0.9280, half-width 0.0435
    assert intervals_overlap((0.1, 0.3), (0.3, 0.5)) and not intervals_overlap((0.1, 0.2), (0.3, 0.5))
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_grids_and_settings_files_are_checked(tmp_path):
    assert product_grid({"tau_conf": [0.5, 0.3], "near_bins": [0, 3]}) == [
        {"tau_conf": 0.5, "near_bins": 0}, {"tau_conf": 0.5, "near_bins": 3},
        {"tau_conf": 0.3, "near_bins": 0}, {"tau_conf": 0.3, "near_bins": 3}]
    with pytest.raises(ValueError, match="--tau-conf: cannot read"):
        parse_values("tau_conf", "0.5,abc")
    with pytest.raises(ValueError, match="--token-rule: unknown"):
        parse_values("token_rule", "argmax,median")
    bad = tmp_path / "s.yaml"
    bad.write_text("- {tau_conf: 0.5}\n- {tau_cnf: 0.3}\n")
    with pytest.raises(ValueError, match=r"s.yaml: setting 1: cannot sweep \['tau_cnf'\]"):
        read_settings_file(str(bad))
    with pytest.raises(ValueError, match="setting 'tau_conf=1.5'"):
        validated_configs(DecodeConfig(method="fast_dvla"), [{"tau_conf": 1.5}])


def test_a_sweep_folder_of_other_inputs_is_refused(tmp_path):
    SweepStore(str(tmp_path), {"frames": 2})
    with pytest.raises(ValueError, match="frames differ"):
        SweepStore(str(tmp_path), {"frames": 3})


def tiny_policy_dir(path, method="fast_dvla"):
    model = tiny_model(0, sharpness=8.0)
    rng = np.random.default_rng(0)
    tok = ActionTokenizer.fit(rng.uniform(-1, 1, (200, 7)), gripper_dims=(6,))
    FastDVLAPolicy(model, tok, StateNormalizer.fit(rng.normal(size=(50, 8))),
                   decode_config=DecodeConfig(method=method)).save_pretrained(str(path))
    return str(path)


def test_the_command_writes_table_plot_and_applies_the_recommendation(tmp_path, capsys):
    data = write_synthetic_dataset(str(tmp_path / "data"), episodes=2)
    student = tiny_policy_dir(tmp_path / "student")
    teacher = tiny_policy_dir(tmp_path / "teacher", method="vanilla")
    out = tmp_path / "tune"
    args = ["tune", "--policy", student, "--teacher", teacher, "--data", data, "--frames", "4",
            "--timing-frames", "2", "--tau-conf", "0.9,0.3", "--metric", "teacher_agreement",
            "--max-drop", "1.0", "--out", str(out), "--apply"]
    cli(args)
    report = json.loads((out / "tune.json").read_text())
    assert report["recommendation"]["setting"] in ("tau_conf=0.9", "tau_conf=0.3", "tau_conf=0.5")
    assert (out / "tune.png").stat().st_size > 0 and "Recommended" in (out / "tune.md").read_text()
    kept = FastDVLAPolicy.from_pretrained(student).decode_config_for("fast_dvla").tau_conf
    assert kept == report["recommendation"]["config"]["tau_conf"]
    with pytest.raises(SystemExit, match="nothing to measure"):
        cli(["tune", "--policy", student, "--teacher", teacher, "--out", str(out)])
    with pytest.raises(SystemExit, match="no setting gives"):
        cli(args[:-1] + ["--target-hz", "1e9"])
