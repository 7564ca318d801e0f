"""Results as a readable Markdown table (the JSON is written beside it)."""
from __future__ import annotations

import json
import os


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec) triples."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, spec))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def settings_text(decode: dict) -> str:
    """The thresholds each decoder ran with (older results hold one setting for all)."""
    keys = ("tau_conf", "tau_add", "tau_act", "fallback_n", "vanilla_steps", "token_rule", "near_bins")
    per_method = decode if all(isinstance(v, dict) for v in decode.values()) else {"every decoder": decode}
    return "; ".join(f"{m}: " + ", ".join(f"{k}={c[k]}" for k in keys if k in c) for m, c in per_method.items())
