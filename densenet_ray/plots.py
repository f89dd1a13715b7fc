"""Figures logged with runs, as PNG bytes (matplotlib's Figure without pyplot: no global state, no display).

    png = curves(history)                    # one panel per metric against epoch: training_curves.png
    png = error_vs_params(rows, "sweep1")    # a sweep's trials: the paper's Figure 4 view
"""

from __future__ import annotations

import io
import math
import numbers

from matplotlib.figure import Figure


def curves(history: list[dict]) -> bytes:
    """One panel per numeric metric against epoch, from the per-epoch metric dicts."""
    keys = [k for k, v in history[0].items() if k != "epoch" and isinstance(v, numbers.Real)]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows), layout="constrained")
    epochs = [h.get("epoch", i) for i, h in enumerate(history)]
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(epochs, [h.get(key, math.nan) for h in history], marker=".")
        ax.set(title=key, xlabel="epoch")
        ax.grid(alpha=0.3)
    return _png(fig, dpi=100)


def error_vs_params(rows: list[dict], title: str) -> bytes:
    """Best validation error against parameters, one point per trial (rows of tune.summarise)."""
    fig = Figure(figsize=(7, 5), dpi=120)
    ax = fig.add_subplot()
    done = [r for r in rows if not math.isnan(r["best_val_top1_err"])]
    for stopped, marker, label in ((False, "o", "ran every epoch"), (True, "x", "stopped by the scheduler")):
        pts = [r for r in done if (r["status"] == "stopped early") == stopped]
        ax.scatter([r["params"] for r in pts], [100 * r["best_val_top1_err"] for r in pts], marker=marker,
                   label=label)
        for r in pts:
            ax.annotate(f"k={r['k']} L={r['L']} θ={r['theta']:g}", (r["params"], 100 * r["best_val_top1_err"]),
                        fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("best validation top-1 error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig, bbox_inches="tight")


def _png(fig: Figure, **savefig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    return buf.getvalue()
