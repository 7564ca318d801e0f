"""The Pareto plot of a sweep: one point per setting, the front joined, the
teacher, the policy's current setting and the recommendation marked."""
from __future__ import annotations

from ..plotting import headless_pyplot
from .recommend import SPEED_KEY, Metric, pareto_front


def pareto_plot(rows: list[dict], teacher: dict, metric: Metric, path: str, current: str | None = None,
                recommended: str | None = None, title: str = "") -> None:
    plt = headless_pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r[SPEED_KEY] for r in rows], [r[metric.key] for r in rows], color="tab:blue", s=22,
               label="settings", zorder=2)
    front = pareto_front(rows, metric)
    ax.plot([r[SPEED_KEY] for r in front], [r[metric.key] for r in front], color="tab:blue", lw=1, zorder=1,
            label="Pareto front")
    for r in rows:
        ax.annotate(r["setting"], (r[SPEED_KEY], r[metric.key]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points", color="0.35")
    ax.scatter([teacher[SPEED_KEY]], [teacher[metric.key]], marker="s", color="black", s=40,
               label="teacher, vanilla", zorder=3)
    for name, style in ((current, dict(marker="o", facecolors="none", edgecolors="tab:orange", s=120,
                                       label="current setting")),
                        (recommended, dict(marker="*", color="tab:green", s=160, label="recommended"))):
        hit = [r for r in rows if r["setting"] == name]
        if hit:
            ax.scatter([hit[0][SPEED_KEY]], [hit[0][metric.key]], zorder=4, **style)
    ax.set_xlabel("speedup over the teacher's vanilla decoding (timed beside it)")
    ax.set_ylabel(f"{metric.key} ({'higher' if metric.higher_is_better else 'lower'} is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
