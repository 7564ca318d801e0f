"""Curves as PNG (matplotlib, headless)."""
from __future__ import annotations

from ..plotting import headless_pyplot


def plot_curves(runs: dict[str, list[dict]], key: str, path: str, title: str = "", x: str = "step",
                logy: bool = True) -> None:
    plt = headless_pyplot()
    if plt is None:
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


def plot_bands(runs: dict[str, list[list[dict]]], key: str, path: str, title: str = "", x: str = "step",
               hline: float | None = None, hline_label: str = "") -> None:
    """One line per run (the mean over its seeds) in a band from the lowest to the highest seed;
    each run's seeds must share their x values. ``hline`` draws a reference level (e.g. a target)."""
    import numpy as np

    plt = headless_pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, seeds in runs.items():
        xs = [h[x] for h in seeds[0] if key in h]
        ys = np.array([[h[key] for h in history if key in h] for history in seeds])
        line, = ax.plot(xs, ys.mean(axis=0), label=f"{name} ({len(seeds)} seeds)")
        ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.2)
    if hline is not None:
        ax.axhline(hline, color="k", linestyle="--", linewidth=1, label=hline_label or None)
    ax.set_xlabel(x)
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
