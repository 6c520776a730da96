"""Figures. ``trajectory_plot`` draws optimizer paths over a 2-D objective model's surface (``beale``,
``rosenbrock``, ``saddle`` in ``optstudy.models``), as in Ruder's "An overview of gradient descent optimization
algorithms" (2016)."""

from __future__ import annotations

import numpy as np


def trajectory_plot(model, paths: dict, path, *, resolution: int = 300):
    """Contours of ``model.surface`` over ``model.extent``, one line per entry of ``paths`` (optimizer name ->
    array-like of shape ``(n, 2)``, the iterates in order), a star at ``model.minimum``; saved as a PNG at ``path``,
    which is returned.

    Contour levels are log-spaced when the surface is >= 0 (Beale and Rosenbrock span five or more decades, so linear
    levels would all crowd the walls) and linear otherwise (the saddle is unbounded below).
    """
    # Figure, not pyplot: no global state, no GUI backend, safe in a training process and under pytest
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    xmin, xmax, ymin, ymax = model.extent
    x, y = np.meshgrid(np.linspace(xmin, xmax, resolution), np.linspace(ymin, ymax, resolution))
    z = np.asarray(model.surface(x, y), dtype=float)
    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if z.min() >= 0:
        # log levels need a positive floor, and the grid may hit a zero minimum exactly: floor at 1e-6 × the top
        levels = np.geomspace(max(z.min(), z.max() * 1e-6), z.max(), 30)
        ax.contour(x, y, z, levels=levels, norm=LogNorm(), cmap="viridis", linewidths=0.7)
    else:
        ax.contour(x, y, z, levels=30, cmap="viridis", linewidths=0.7)
    for name, xy in paths.items():
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        (line,) = ax.plot(xy[:, 0], xy[:, 1], lw=1.5, label=name)
        ax.plot(xy[0, 0], xy[0, 1], "o", color=line.get_color(), ms=4)
    if model.minimum is not None:
        ax.plot(*model.minimum, "*", color="crimson", ms=14, label="minimum")
    ax.set(xlim=(xmin, xmax), ylim=(ymin, ymax), xlabel="x", ylabel="y", title=type(model).__name__)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def iterate_plot(rows: list[dict], label: str, path):
    """Every metric of a synthetic problem without a 2-D surface (the counterexample's ``x``, the noisy quadratic's
    loss, ...) against the step, one panel each; saved as a PNG at ``path``, which is returned."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [k for k in rows[0] if k != "step"]
    fig = Figure(figsize=(6, 2.2 * len(keys)), dpi=100)
    FigureCanvasAgg(fig)
    steps = [r["step"] for r in rows]
    for i, key in enumerate(keys):
        ax = fig.add_subplot(len(keys), 1, i + 1)
        ax.plot(steps, [r[key] for r in rows], lw=1.2, label=label)
        ax.set(ylabel=key, xlabel="step" if i == len(keys) - 1 else None)
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
