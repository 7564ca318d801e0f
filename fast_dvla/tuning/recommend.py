"""The speed/fidelity Pareto front of a sweep and the setting it recommends."""
from __future__ import annotations

from dataclasses import dataclass

from ..benchmark.stats import intervals_overlap


@dataclass(frozen=True)
class Metric:
    key: str                 # the row field
    higher_is_better: bool
    default_max_drop: float  # in the metric's own units
    meaning: str


METRICS = {
    "mae": Metric("mae", False, 0.01, "mean absolute action error against the demonstrations (action units, [-1, 1])"),
    "token_accuracy": Metric("token_accuracy", True, 0.02, "share of action tokens equal to the demonstrated ones"),
    "gripper_wrong": Metric("gripper_wrong", False, 0.01, "share of steps whose gripper sign differs from the "
                                                          "demonstration"),
    "teacher_agreement": Metric("teacher_agreement", True, 0.05, "share of action tokens equal to the teacher's "
                                                                 "vanilla decoding"),
    "success": Metric("success", True, 0.05, "closed-loop success rate"),
}

# "faster" ranks settings by their speedup over the teacher's vanilla decoding timed beside them,
# which drift and other load hit alike; a target rate is checked against the absolute action Hz
SPEED_KEY = "speedup"
HZ_KEY = "action_hz"


class NoSettingMeets(ValueError):
    """No setting of the sweep satisfies the constraints asked for."""


def drop(row: dict, teacher: dict, metric: Metric) -> float:
    """How much worse than the teacher ``row`` is, in the metric's units (negative: better)."""
    gap = teacher[metric.key] - row[metric.key]
    return (gap if metric.higher_is_better else -gap) + 0.0  # + 0.0: no "-0" in messages


def pareto_front(rows: list[dict], metric: Metric) -> list[dict]:
    """The rows no other row beats on both speed and fidelity, fastest first."""
    def quality(r):
        return r[metric.key] if metric.higher_is_better else -r[metric.key]

    front = [r for r in rows
             if not any(o[SPEED_KEY] >= r[SPEED_KEY] and quality(o) >= quality(r)
                        and (o[SPEED_KEY] > r[SPEED_KEY] or quality(o) > quality(r)) for o in rows)]
    return sorted(front, key=lambda r: -r[SPEED_KEY])


def recommend(rows: list[dict], teacher: dict, metric: Metric, max_drop: float | None = None,
              target_hz: float | None = None) -> dict:
    """The setting to use.

    With ``max_drop`` (the default when neither is given: the metric's own): the fastest setting
    whose drop against the teacher stays within it (and that reaches ``target_hz``, if given).
    With ``target_hz`` alone: the most faithful setting that reaches it, a latency budget spent
    on fidelity. Says which constraint bound the choice (the one a better setting breaks) and
    with what margin; raises ``NoSettingMeets`` naming the best each constraint could get."""
    if max_drop is None and target_hz is None:
        max_drop = metric.default_max_drop
    candidates = [r for r in rows if r.get(metric.key) is not None]
    if not candidates:
        raise NoSettingMeets(f"no setting has a {metric.key!r} value (does the sweep measure it?)")

    def within_drop(r):
        return max_drop is None or drop(r, teacher, metric) <= max_drop + 1e-12

    def fast_enough(r):
        return target_hz is None or r[HZ_KEY] >= target_hz

    meets = [r for r in candidates if within_drop(r) and fast_enough(r)]
    if not meets:
        best_drop = min(drop(r, teacher, metric) for r in candidates)
        best_hz = max(r[HZ_KEY] for r in candidates)
        asked = " and ".join(x for x in (max_drop is not None and f"a {metric.key} drop <= {max_drop:g}",
                                          target_hz is not None and f">= {target_hz:g} action Hz") if x)
        raise NoSettingMeets(f"no setting gives {asked}: the smallest {metric.key} drop was {best_drop:.4g}, "
                             f"the fastest setting {best_hz:.1f} action Hz")
    if max_drop is not None:
        best = max(meets, key=lambda r: r[SPEED_KEY])
        better = [r for r in candidates if r[SPEED_KEY] > best[SPEED_KEY]]       # faster
    else:
        best = min(meets, key=lambda r: (drop(r, teacher, metric), -r[SPEED_KEY]))
        better = [r for r in candidates if drop(r, teacher, metric) < drop(best, teacher, metric)]  # more faithful
    bound = [name for name, ok in (("max_drop", within_drop), ("target_hz", fast_enough))
             if any(not ok(r) for r in better)]
    result = {"setting": best["setting"], "config": best["config"], "metric": metric.key,
              "value": best[metric.key], "teacher_value": teacher[metric.key],
              "drop": drop(best, teacher, metric), "max_drop": max_drop, "target_hz": target_hz,
              "action_hz": best[HZ_KEY], "speedup": best[SPEED_KEY],
              "bound_by": bound or ["none: no better setting in the sweep"],
              "drop_margin": None if max_drop is None else max_drop - drop(best, teacher, metric),
              "hz_margin": None if target_hz is None else best[HZ_KEY] - target_hz}
    if "interval" in best and "interval" in teacher:
        result["within_noise"] = intervals_overlap(best["interval"], teacher["interval"])
    return result
