"""Item 2: the twelve optimizers' paths on Beale, Rosenbrock and a saddle (Ruder 2016), docs/reproductions.md
section 2.

Config: ``conf/experiment/{beale,rosenbrock,saddle}.yaml`` (start, steps and one lr each), every optimizer of
``conf/optimizer/`` at that lr through ``train`` with the trajectory callback; then each optimizer swept over
``SWEEP_LRS`` in a plain loop (Beale and Rosenbrock), and Rosenbrock once more with ``optimizer.final_lr=2e-3``.
Writes ``surfaces.json``, ``<surface>.png``, ``<surface>_tuned.png`` and (full runs) ``<surface>.gif``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch

from ._common import COLORS, compose, epochs, figure, shown, table, train, write_json

SURFACES = ("beale", "rosenbrock", "saddle")
SWEEP_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def defaults(a) -> None:
    """--steps caps each surface's steps; --quick caps them at 150."""
    a.steps = a.steps or (150 if a.quick else None)


def run(args) -> dict:
    """Each surface's experiment file, all twelve optimizers at its lr (``train`` with the trajectory callback), then
    a per-optimizer lr sweep in a plain loop for the "each at its best lr" figure."""
    data = {"settings": {"sweep_lrs": list(SWEEP_LRS)}, "surfaces": {}}
    for surface in SURFACES:
        data["surfaces"][surface] = _surface(surface, args)
    write_json(args.out, "surfaces", data)
    return data


def _surface(surface: str, args) -> dict:
    """One surface: its runs, figures and printed tables; its entry of the JSON."""
    from matplotlib import rc_context

    from optstudy.plots import trajectory_plot

    base = compose(f"experiment={surface}")
    lr, steps = float(base.optimizer.lr), int(base.trainer.max_epochs) * int(base.data.steps_per_epoch)
    if args.steps:
        steps = min(steps, args.steps)
    model = _surface_model(base)
    common, paths = _at_common_lr(surface, base, lr, steps, model)
    # the sweep: best final f per optimizer (the saddle is unbounded below, so "best" would only mean "largest lr
    # that stays finite": no sweep there)
    tuned, tuned_paths, check = {}, {}, None
    if model.minimum is not None:
        tuned, tuned_paths, check = _sweep(surface, lr, steps, model, paths["adam"], args.quick)
    # a diverged path is drawn up to where it first leaves the plot: beyond, it is straight lines across it
    drawn = {(f"{n} (diverged)" if common[n]["diverged"] else n): _inside(model, xy) if common[n]["diverged"]
             else xy for n, xy in paths.items()}
    with rc_context({"axes.prop_cycle": matplotlib.cycler(color=COLORS)}):
        trajectory_plot(model, drawn, args.out / f"{surface}.png")
        if tuned_paths:
            trajectory_plot(model, tuned_paths, args.out / f"{surface}_tuned.png")
    if not args.quick:
        animate(model, drawn, args.out / f"{surface}.gif", f"{surface}, lr {lr:g}")
    entry = {"lr": lr, "steps": steps, "start": list(base.model.start), "common_lr": common, "best_lr": tuned,
             "plain_loop_vs_train_max_diff": check}
    if surface == "rosenbrock" and not args.quick:
        # AdaBound's steps tend to SGD's with lr final_lr, which Rosenbrock's walls need below 3e-3
        entry["final_lr_2e-3"] = {n: _final_lr_2e_3(surface, n, steps, model) for n in ("adabound", "amsbound")}
    _print(surface, entry, model)
    return entry


def _at_common_lr(surface: str, base, lr: float, steps: int, model) -> tuple[dict, dict]:
    """All twelve optimizers at the experiment file's lr through ``train``: their end points and paths."""
    from optstudy import optim
    from optstudy.lit import Trajectory

    common, paths = {}, {}
    for name in optim.NAMES:
        recorder = Trajectory()
        cfg = compose(f"experiment={surface}", f"optimizer={name}", f"optimizer.lr={lr}",
                      *epochs(steps, per=int(base.data.steps_per_epoch)))
        _, failed = train(cfg, [recorder])
        xy = np.array([[r["x"], r["y"]] for r in recorder.rows], dtype=float)
        common[name] = _ends(model, xy, steps, failed is not None)
        paths[name] = xy
    return common, paths


def _sweep(surface: str, lr: float, steps: int, model, adam_path: np.ndarray, quick: bool):
    """Each optimizer at the lr of the sweep with the lowest final f (plain loop): its end points, its path, and how
    far the loop's Adam at the file's lr ends from ``train``'s (``adam_path``)."""
    from optstudy import optim

    tuned, tuned_paths, check = {}, {}, None
    for name in optim.NAMES:
        best = None
        cfg = compose(f"experiment={surface}", f"optimizer={name}")
        for sweep_lr in (SWEEP_LRS if not quick else (lr, 1e-3)):
            cfg.optimizer.lr = sweep_lr
            xy = plain_surface_run(cfg, steps)
            row = _ends(model, xy, steps, False)
            if name == "adam" and sweep_lr == lr:  # the loop against train(): the same path
                check = float(np.abs(xy[-1] - adam_path[-1]).max())
            if not row["diverged"] and (best is None or row["f"] < best[1]["f"]):
                best = (sweep_lr, row, xy)
        if best is None:  # diverged at every lr of the sweep
            tuned[name] = {"lr": None, "diverged": True}
        else:
            tuned[name] = {"lr": best[0], **best[1]}
            tuned_paths[name] = best[2]
    return tuned, tuned_paths, check


def _final_lr_2e_3(surface: str, name: str, steps: int, model) -> dict:
    from optstudy.lit import Trajectory

    recorder = Trajectory()
    _, failed = train(compose(f"experiment={surface}", f"optimizer={name}", "optimizer.final_lr=2e-3"), [recorder])
    xy = np.array([[r["x"], r["y"]] for r in recorder.rows], dtype=float)
    return _ends(model, xy, steps, failed is not None)


def _print(surface: str, entry: dict, model) -> None:
    lr, check = entry["lr"], entry["plain_loop_vs_train_max_diff"]
    print(f"\n{surface}: all at lr {lr:g}, {entry['steps']} steps from {entry['start']}")
    cols = ["optimizer", "x", "y", "f", "diverged", "inside_plot"] + (
        ["escape_step"] if model.minimum is None else [])
    print(table([{"optimizer": n, **r} for n, r in entry["common_lr"].items()], cols))
    if entry["best_lr"]:
        print(f"{surface}: each at its best lr of {list(SWEEP_LRS)} (plain loop; adam at lr {lr:g} differs "
              f"from train() by {check:.2g})")
        print(table([{"optimizer": n, **r} for n, r in entry["best_lr"].items()],
                    ["optimizer", "lr", "x", "y", "f", "diverged"]))
    if "final_lr_2e-3" in entry:
        print(f"{surface}: at lr {lr:g} with final_lr 2e-3")
        print(table([{"optimizer": n, **r} for n, r in entry["final_lr_2e-3"].items()],
                    ["optimizer", "x", "y", "f", "diverged"]))


def _surface_model(cfg):
    from optstudy import data, models

    return models.build(cfg.model, data.load(cfg.data, cfg.seed))


def plain_surface_run(cfg, steps: int) -> np.ndarray:
    """A plain loop (the sweep runs 200+ of these: Lightning's per-step overhead would dominate): the same model,
    optimizer keywords (``optstudy.lit.optimizer_kwargs``) and seed as ``train``; returns the iterates, (steps+1, 2),
    cut after the first non-finite loss."""
    from optstudy import optim
    from optstudy.lit import optimizer_kwargs

    torch.manual_seed(cfg.seed)
    model = _surface_model(cfg)
    kwargs = optimizer_kwargs(cfg)
    opt = optim.build(kwargs.pop("name"), model.parameters(), **kwargs)
    path = [model.xy.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        loss = model(None)
        if not torch.isfinite(loss):
            break
        loss.backward()
        opt.step()
        path.append(model.xy.detach().clone())
    return torch.stack(path).double().numpy()


def _ends(model, xy: np.ndarray, steps: int, diverged: bool) -> dict:
    finite = np.isfinite(xy).all(1)
    last = xy[finite][-1] if finite.any() else np.array([np.nan, np.nan])
    xmin, xmax, ymin, ymax = model.extent
    f = float(model.surface(torch.tensor(last[0]), torch.tensor(last[1]))) if finite.any() else float("nan")
    # diverged: the run stopped at a non-finite loss (train() raises, the plain loop stops early)
    diverged = diverged or not finite.all() or len(xy) - 1 < steps
    row = {"x": float(last[0]), "y": float(last[1]), "f": f, "diverged": bool(diverged),
           "inside_plot": bool(xmin <= last[0] <= xmax and ymin <= last[1] <= ymax), "steps": len(xy) - 1}
    if model.minimum is not None:
        row["distance_to_min"] = float(np.hypot(*(last - np.asarray(model.minimum))))
    else:  # the saddle: when the iterate first leaves the ridge (|y| >= 1)
        out = np.flatnonzero(np.abs(xy[:, 1]) >= 1)
        row["escape_step"] = int(out[0]) if len(out) else None
    return row


def _inside(model, xy: np.ndarray) -> np.ndarray:
    """The path up to and including its first point outside the plot's extent."""
    xmin, xmax, ymin, ymax = model.extent
    with np.errstate(invalid="ignore"):
        out = ~((xmin <= xy[:, 0]) & (xy[:, 0] <= xmax) & (ymin <= xy[:, 1]) & (xy[:, 1] <= ymax))
    return xy[: int(np.argmax(out)) + 1] if out.any() else xy


def animate(model, paths: dict, path: Path, title: str, frames: int = 40, limit: int = 2_000_000) -> Path:
    """The paths drawn step by step over the contours, as a GIF (Pillow); fewer frames until it is under ``limit``."""
    from matplotlib.animation import FuncAnimation, PillowWriter
    from matplotlib.colors import LogNorm

    xmin, xmax, ymin, ymax = model.extent
    x, y = np.meshgrid(np.linspace(xmin, xmax, 200), np.linspace(ymin, ymax, 200))
    z = np.asarray(model.surface(x, y), dtype=float)
    while True:
        fig, axes = figure(figsize=(5.2, 4.2), dpi=72)
        ax = axes[0][0]
        if z.min() >= 0:
            ax.contour(x, y, z, levels=np.geomspace(max(z.min(), z.max() * 1e-6), z.max(), 25), norm=LogNorm(),
                       cmap="viridis", linewidths=0.6)
        else:
            ax.contour(x, y, z, levels=25, cmap="viridis", linewidths=0.6)
        if model.minimum is not None:
            ax.plot(*model.minimum, "*", color="crimson", ms=12)
        lines = {n: ax.plot([], [], lw=1.4, color=COLORS[i], label=n)[0] for i, n in enumerate(paths)}
        ax.set(xlim=(xmin, xmax), ylim=(ymin, ymax), title=title)
        ax.legend(fontsize=6, loc="best", ncol=2)
        longest = max(len(p) for p in paths.values())
        cuts = np.unique(np.linspace(1, longest, frames).astype(int))

        def draw(k):
            for n, line in lines.items():
                line.set_data(paths[n][:k, 0], paths[n][:k, 1])
            ax.set_title(f"{title}: step {k - 1}")
            return list(lines.values())

        fig.tight_layout()
        FuncAnimation(fig, draw, frames=cuts, blit=False).save(path, writer=PillowWriter(fps=8))
        if path.stat().st_size < limit or frames <= 10:
            break
        frames //= 2
    print(f"wrote {shown(path)} ({path.stat().st_size // 1024} KiB)")
    return path
