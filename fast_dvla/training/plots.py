"""Curves as PNG (matplotlib, headless)."""
from __future__ import annotations


def plot_curves(runs: dict[str, list[dict]], key: str, path: str, title: str = "", x: str = "step",
                logy: bool = True) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: the JSON beside them has the numbers
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, history in runs.items():
        pts = [(h[x], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), label=name)
    ax.set_xlabel(x)
    ax.set_ylabel(key)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
