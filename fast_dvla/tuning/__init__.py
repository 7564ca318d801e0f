"""Choosing a decoder's thresholds: a sweep of settings measured on the same
frames (speed against the teacher's vanilla decoding, fidelity against the
teacher and the demonstrations), its Pareto front, and a recommendation.

    from fast_dvla.tuning import tune
    result = tune(student, frames, teacher=teacher, max_drop=0.01)
    result.recommendation["setting"], result.table()
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..benchmark.report import markdown_table
from ..policy import FastDVLAPolicy
from .grid import DEFAULT_TAU_CONF, setting_name, validated_configs
from .recommend import METRICS, NoSettingMeets, pareto_front, recommend
from .sweep import SweepStore, frames_fingerprint, sweep

__all__ = ["tune", "TuneResult", "NoSettingMeets", "METRICS", "DEFAULT_TAU_CONF", "current_setting"]

COLUMNS = [("setting", "setting", "s"), ("nfe", "NFE/chunk", ".2f"), ("query_tokens", "query tokens/chunk", ".0f"),
           ("latency_ms", "latency ms (median)", ".1f"), ("p90_ms", "p90 ms", ".1f"),
           ("tokens_per_s", "action tokens/s", ".0f"), ("action_hz", "action Hz", ".1f"),
           ("speedup", "x vanilla", ".2f"), ("teacher_agreement", "tokens = teacher", ".3f"),
           ("token_accuracy", "tokens = demo", ".3f"), ("mae", "MAE", ".4f"),
           ("gripper_wrong", "gripper wrong", ".3f"), ("front", "on front", "s")]


@dataclass
class TuneResult:
    rows: list[dict]                      # the teacher's vanilla row first, then one per setting
    metric: str
    recommendation: dict | None = None
    refusal: str | None = None            # why nothing was recommended
    current: str | None = None            # the policy's own setting, by name, when the sweep has it
    front: list[str] = field(default_factory=list)

    @property
    def teacher(self) -> dict:
        return self.rows[0]

    def table(self) -> str:
        rows = [dict(r, front="yes" if r["setting"] in self.front else "") for r in self.rows]
        return markdown_table(rows, COLUMNS)


def current_setting(policy: FastDVLAPolicy, method: str, axes) -> dict:
    """The policy's own values of the swept ``axes`` for ``method``."""
    config = policy.decode_config_for(method).to_dict()
    return {a: config[a] for a in axes}


def tune(policy: FastDVLAPolicy, frames: list, teacher: FastDVLAPolicy | None = None,
         settings: list[dict] | None = None, method: str = "fast_dvla", metric: str | None = None,
         max_drop: float | None = None, target_hz: float | None = None, timing_frames: int = 32,
         out: str | None = None, progress: bool = True, measure: bool = True) -> TuneResult:
    """Sweep ``settings`` (default: ``tau_conf`` over ``DEFAULT_TAU_CONF``, plus the policy's current
    setting) of ``method`` on ``frames`` and recommend one.

    ``frames``: observations, or ``(observation, demonstrated chunk)`` pairs (then the action
    error against the demonstrations is measured too). ``teacher``: the policy whose vanilla
    decoding is the reference for speed and agreement (default: ``policy`` itself).
    ``metric`` (default ``mae`` with demonstrations, else ``teacher_agreement``), ``max_drop`` and
    ``target_hz``: see :func:`fast_dvla.tuning.recommend.recommend`. ``out``: a folder where each
    setting's row is saved as it finishes; a re-run skips those already measured (``measure=False``:
    measures nothing, only reads them back)."""
    teacher = teacher or policy
    pairs = bool(frames) and isinstance(frames[0], tuple)
    observations = [f[0] for f in frames] if pairs else list(frames)
    demos = [np.asarray(f[1]) for f in frames] if pairs else None
    metric = metric or ("mae" if pairs else "teacher_agreement")
    if metric not in METRICS or metric == "success":
        raise ValueError(f"metric {metric!r}: an open-loop sweep measures "
                         f"{[m for m in METRICS if m != 'success']}")
    if METRICS[metric].key in ("mae", "token_accuracy", "gripper_wrong") and not pairs:
        raise ValueError(f"metric {metric!r} needs demonstrated chunks: pass (observation, chunk) pairs")
    settings = list(settings) if settings else [{"tau_conf": t} for t in DEFAULT_TAU_CONF]
    axes = sorted({a for s in settings for a in s})
    current = current_setting(policy, method, axes)
    if current not in settings:
        settings.append(current)
    configs = validated_configs(policy.decode_config_for(method), settings)
    store = None
    if out:
        store = SweepStore(out, {"method": method, "frames": len(observations), "timing_frames": timing_frames,
                                 "demos": pairs, "frames_sha1": frames_fingerprint(observations, demos)})
    rows = sweep(policy, teacher, configs, observations, demos, timing_frames, store, progress, measure)
    result = TuneResult(rows=rows, metric=metric, current=setting_name(current))
    result.front = [r["setting"] for r in pareto_front(rows[1:], METRICS[metric])]
    try:
        result.recommendation = recommend(rows[1:], rows[0], METRICS[metric], max_drop, target_hz)
    except NoSettingMeets as e:
        result.refusal = str(e)
    return result
