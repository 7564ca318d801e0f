"""The settings a sweep tries: a product grid over the decoder's knobs, or a list from a file."""
from __future__ import annotations

import itertools

import yaml

from ..config import TOKEN_RULES, DecodeConfig

# the paper's range for the threshold, with the high end dense: that is where speed is cheap
DEFAULT_TAU_CONF = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)

# knobs a sweep may vary, with how a value is read from a comma-separated flag
AXES = {
    "tau_conf": float,
    "tau_add": float,
    "tau_act": float,
    "fallback_n": int,
    "token_rule": str,
    "near_bins": int,
}


def parse_values(name: str, text: str) -> list:
    """``"0.5,0.3"`` -> ``[0.5, 0.3]`` for axis ``name``; a ``ValueError`` names the axis."""
    if name not in AXES:
        raise ValueError(f"cannot sweep {name!r}; expected some of {sorted(AXES)}")
    try:
        values = [AXES[name](v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name.replace('_', '-')}: cannot read {text!r} as {AXES[name].__name__}s") from None
    if name == "token_rule" and set(values) - set(TOKEN_RULES):
        raise ValueError(f"--token-rule: unknown {sorted(set(values) - set(TOKEN_RULES))}; expected some of "
                         f"{TOKEN_RULES}")
    if not values:
        raise ValueError(f"--{name.replace('_', '-')}: no values in {text!r}")
    return values


def product_grid(axes: dict[str, list]) -> list[dict]:
    """Every combination of the axes' values, in order: ``{"tau_conf": [0.5, 0.3]}`` ->
    ``[{"tau_conf": 0.5}, {"tau_conf": 0.3}]``."""
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]


def read_settings_file(path: str) -> list[dict]:
    """A YAML list of settings, each a mapping of knob -> value (``- {tau_conf: 0.5, near_bins: 3}``)."""
    with open(path) as f:
        settings = yaml.safe_load(f)
    if not isinstance(settings, list) or not settings:
        raise ValueError(f"{path}: expected a non-empty YAML list of settings, got {type(settings).__name__}")
    for i, s in enumerate(settings):
        if not isinstance(s, dict) or not s:
            raise ValueError(f"{path}: setting {i} is not a mapping of knob -> value: {s!r}")
        unknown = sorted(set(s) - set(AXES))
        if unknown:
            raise ValueError(f"{path}: setting {i}: cannot sweep {unknown}; expected some of {sorted(AXES)}")
    return settings


def setting_name(setting: dict) -> str:
    """A stable, readable key: ``tau_conf=0.5,near_bins=3`` (axes in a fixed order)."""
    return ",".join(f"{k}={setting[k]}" for k in AXES if k in setting)


def validated_configs(base: DecodeConfig, settings: list[dict]) -> dict[str, DecodeConfig]:
    """``{name: base with the setting}``; a setting the decoder refuses fails here, named,
    before anything is decoded. Duplicate settings are kept once."""
    configs = {}
    for s in settings:
        try:
            configs[setting_name(s)] = base.replace(**s)
        except (TypeError, ValueError) as e:
            raise ValueError(f"setting {setting_name(s)!r}: {e}") from None
    return configs
