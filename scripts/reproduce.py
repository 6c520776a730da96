#!/usr/bin/env python
"""The papers' claims, reproduced at CPU size: one subcommand per item of docs/reproductions.md.

    python scripts/reproduce.py counterexample   # 1. AMSGrad's counterexample (Reddi et al. 2018)
    python scripts/reproduce.py surfaces         # 2. trajectories on Beale, Rosenbrock and the saddle (Ruder 2016)
    python scripts/reproduce.py sensitivity      # 3. lr / final_lr / gamma sensitivity, as optstudy studies
    python scripts/reproduce.py efflr            # 4. effective learning rates over training (AdaBound's Fig. 1)
    python scripts/reproduce.py bias             # 5. Adam with and without bias correction (Adam's Sec. 6.4)
    python scripts/reproduce.py configs          # 6. the GPU-scale experiment files and what they report
    python scripts/reproduce.py all              # all six, in that order

Each prints its numbers and writes them, with its figures, into ``--out`` (default ``docs/figures/``): ``<item>.json``
plus PNGs (and GIFs, CSVs). ``--quick`` shrinks every item to seconds (the tests run it); the numbers in the document
come from the full runs. Runs go through ``optstudy.train.train`` on configs composed from ``conf/`` (no MLflow unless
an item needs a run's artifacts), except where a docstring below says it uses a plain loop over ``optstudy.optim``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a script: files only, no window

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
SCRATCH = Path(tempfile.gettempdir()) / "optstudy-reproduce"
ITEMS = ("counterexample", "surfaces", "sensitivity", "efflr", "bias", "configs")
# twelve colours that stay apart on a contour plot (matplotlib's default cycle has ten)
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf", "#000000", "#b8860b"]


# --- shared helpers -------------------------------------------------------------------------------------------------
def compose(*overrides: str, logger: str = "none"):
    """``conf/train.yaml`` with ``overrides``, no checkpoint files, no progress bar; ``logger=none`` unless asked."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    # a run directory outside the repository (Lightning's default_root_dir), unless the caller wants the artifacts
    scratch = [] if any(o.startswith("checkpoint.dir=") for o in overrides) else [f"checkpoint.dir={SCRATCH}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=[
            "checkpoint.enabled=false", f"logger={logger}", "trainer.enable_progress_bar=false", *scratch, *overrides])


def train(cfg, callbacks=()):
    """``optstudy.train.train`` with its per-epoch lines kept off the terminal; ``(result, None)``, or ``(None,
    reason)`` when the run diverged (NaN/Inf loss)."""
    from optstudy.lit import Diverged
    from optstudy.train import train as run

    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return run(cfg, callbacks=list(callbacks)), None
        except Diverged as exc:
            return None, str(exc)


def sig(x, digits: int = 4):
    """Rounded for the JSON and the tables (the runs are deterministic; more digits would only be noise to read)."""
    if isinstance(x, dict):
        return {k: sig(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [sig(v, digits) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return float(f"{x:.{digits}g}")
    return x


def write_json(out: Path, name: str, data: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(sig(data), indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain text table for the terminal (the document's tables are written from the JSON)."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(map(_cell, v)) + "]"
    return "" if v is None else str(v)


def figure(nrows=1, ncols=1, **kw):
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


class Recorder(pl.Callback):
    """The training loss after every step and the validation loss after every epoch (``trainer.callback_metrics``)."""

    def __init__(self):
        self.train_loss: list[float] = []
        self.val_loss: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.train_loss.append(float(trainer.callback_metrics["train_loss"]))

    def on_train_epoch_end(self, trainer, module):  # after this epoch's validation
        if "val_loss" in trainer.callback_metrics:
            self.val_loss.append(float(trainer.callback_metrics["val_loss"]))


# --- 1. AMSGrad's counterexample ------------------------------------------------------------------------------------
BETA_OPTIMIZERS = ("adam", "amsgrad", "adabound", "amsbound")


class Clipped(pl.Callback):
    """For AdaBound/AMSBound: the number of steps whose step size was raised to the lower bound or cut to the upper
    one (``optstudy.optim.lr_histogram``'s clipped fractions; the counterexample has one element)."""

    def __init__(self):
        self.lower = self.upper = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        from optstudy.optim import lr_histogram

        hist = lr_histogram(trainer.optimizers[0])
        if hist.clipped_lower is not None:
            self.lower += int(hist.clipped_lower.sum() > 0)
            self.upper += int(hist.clipped_upper.sum() > 0)


def _epochs(steps: int, per: int = 1000) -> list[str]:
    """The experiment files' 1000 steps an epoch where ``steps`` allows it (the stochastic variant's noise stream
    depends on the epoch boundaries: the data loader draws a seed from torch's RNG each epoch)."""
    per = per if steps % per == 0 else steps
    return [f"data.steps_per_epoch={per}", f"trainer.max_epochs={steps // per}"]


def counterexample(args) -> dict:
    """experiment=counterexample and counterexample_stochastic through ``train`` with a trajectory callback."""
    from optstudy.lit import Trajectory

    seeds = list(range(args.seeds))
    variants = {
        "online": ("counterexample", [], args.steps, [0]),
        "online_scale10": ("counterexample", ["model.scale=10"], args.steps, [0]),
        "stochastic": ("counterexample_stochastic", [], args.stochastic_steps, seeds),
    }
    results, paths = {}, {}
    for variant, (experiment, extra, steps, variant_seeds) in variants.items():
        results[variant], paths[variant] = {}, {}
        for name in BETA_OPTIMIZERS:
            finals, clipped = [], []
            for seed in variant_seeds:
                recorder, clip = Trajectory(), Clipped()
                cfg = compose(f"experiment={experiment}", f"optimizer={name}", f"seed={seed}", *extra,
                              *_epochs(steps))
                bounded = name in ("adabound", "amsbound")  # the per-step histogram only where there are bounds
                result, failed = train(cfg, [recorder, clip] if bounded else [recorder])
                assert failed is None, failed
                xs = [r["x"] for r in recorder.rows]
                finals.append(xs[-1])
                clipped.append([clip.lower, clip.upper])
                if seed == variant_seeds[0]:
                    paths[variant][name] = xs
            last = np.asarray(paths[variant][name][-101:])  # the last period (seed 0): x oscillates within it
            results[variant][name] = {"final_x": finals[0] if len(finals) == 1 else finals,
                                      "mean_final_x": float(np.mean(finals)), "last_period_mean": float(last.mean()),
                                      "last_period_min": float(last.min()), "last_period_max": float(last.max())}
            if bounded:  # steps clipped at [lower, upper], per seed
                results[variant][name]["clipped_steps"] = clipped[0] if len(clipped) == 1 else clipped
            print(f"{variant:15s} {name:9s} x_T = {', '.join(f'{x:+.3f}' for x in finals)}   last 101 steps: mean "
                  f"{last.mean():+.3f}, range [{last.min():+.3f}, {last.max():+.3f}]" + (
                      f"   steps clipped (lower, upper): {clipped}" if bounded else ""))
    data = {
        "settings": {"betas": [0.9, 0.99], "lr": "1/sqrt(t)", "x0": 0.0, "steps": args.steps,
                     "stochastic_steps": args.stochastic_steps, "stochastic_seeds": seeds,
                     "final_lr": 0.1, "gamma": 1e-3},
        "results": results,
        "commands": [f"python train.py experiment=counterexample optimizer={n}" for n in BETA_OPTIMIZERS]
        + ["python train.py experiment=counterexample optimizer=adabound model.scale=10",
           "python train.py experiment=counterexample_stochastic optimizer=amsgrad seed=1"],
    }
    fig, axes = figure(1, 3, figsize=(13, 3.8), dpi=100)
    titles = {"online": "online: f_t = 101x (t mod 101 = 1), else -x",
              "online_scale10": "online, model.scale=10: 1010x / -10x",
              "stochastic": f"stochastic: 101x w.p. 0.01, else -x (seed {seeds[0]})"}
    for ax, (variant, lines) in zip(axes[0], paths.items()):
        for i, (name, xs) in enumerate(lines.items()):
            # the bounded ones dashed and thin over the unbounded ones, which they often equal
            bounded = name in ("adabound", "amsbound")
            ax.plot(np.arange(len(xs)), xs, color=COLORS[i], ls="--" if bounded else "-", lw=1.1 if bounded else 2.6,
                    alpha=1.0 if bounded else 0.55, label=name)
        ax.axhline(-1, color="crimson", lw=0.8, ls=":")
        ax.set(title=titles[variant], xlabel="step t", ylabel="x_t", ylim=(-1.05, 1.05))
        ax.title.set_fontsize(9)
    axes[0][0].legend(fontsize=8, loc="center right")
    save(fig, args.out / "counterexample.png")
    write_json(args.out, "counterexample", data)
    return data


# --- 2. trajectories on 2-D surfaces --------------------------------------------------------------------------------
SURFACES = ("beale", "rosenbrock", "saddle")
SWEEP_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def _surface_model(cfg):
    from optstudy import data, models

    return models.build(cfg.model, data.load(cfg.data, cfg.seed))


def plain_surface_run(cfg, steps: int) -> np.ndarray:
    """A plain loop (the sweep runs 200+ of these: Lightning's per-step overhead would dominate): the same model,
    optimizer keywords (``optstudy.lit.optimizer_kwargs``) and seed as ``train``; returns the iterates, (steps+1, 2),
    cut after the first non-finite loss."""
    import optstudy.optim as optim
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


def surfaces(args) -> dict:
    """Each surface's experiment file, all twelve optimizers at its lr (``train`` with the trajectory callback), then
    a per-optimizer lr sweep in a plain loop for the "each at its best lr" figure."""
    import optstudy.optim as optim
    from optstudy.lit import Trajectory
    from optstudy.plots import trajectory_plot

    data = {"settings": {"sweep_lrs": list(SWEEP_LRS)}, "surfaces": {}}
    for surface in SURFACES:
        base = compose(f"experiment={surface}")
        lr, steps = float(base.optimizer.lr), int(base.trainer.max_epochs) * int(base.data.steps_per_epoch)
        if args.steps:
            steps = min(steps, args.steps)
        model = _surface_model(base)
        common, paths = {}, {}
        for name in optim.NAMES:
            recorder = Trajectory()
            cfg = compose(f"experiment={surface}", f"optimizer={name}", f"optimizer.lr={lr}",
                          *_epochs(steps, per=int(base.data.steps_per_epoch)))
            _, failed = train(cfg, [recorder])
            xy = np.array([[r["x"], r["y"]] for r in recorder.rows], dtype=float)
            common[name] = _ends(model, xy, steps, failed is not None)
            paths[name] = xy
        # the sweep: best final f per optimizer (the saddle is unbounded below, so "best" would only mean "largest
        # lr that stays finite": no sweep there)
        tuned, tuned_paths, check = {}, {}, None
        if model.minimum is not None:
            for name in optim.NAMES:
                best = None
                cfg = compose(f"experiment={surface}", f"optimizer={name}")
                for sweep_lr in (SWEEP_LRS if not args.quick else (lr, 1e-3)):
                    cfg.optimizer.lr = sweep_lr
                    xy = plain_surface_run(cfg, steps)
                    row = _ends(model, xy, steps, False)
                    if name == "adam" and sweep_lr == lr:  # the loop against train(): the same path
                        check = float(np.abs(xy[-1] - paths["adam"][-1]).max())
                    if not row["diverged"] and (best is None or row["f"] < best[1]["f"]):
                        best = (sweep_lr, row, xy)
                if best is None:  # diverged at every lr of the sweep
                    tuned[name] = {"lr": None, "diverged": True}
                else:
                    tuned[name] = {"lr": best[0], **best[1]}
                    tuned_paths[name] = best[2]
        from matplotlib import rc_context

        # a diverged path is drawn up to where it first leaves the plot: beyond, it is straight lines across it
        shown = {(f"{n} (diverged)" if common[n]["diverged"] else n): _inside(model, xy) if common[n]["diverged"]
                 else xy for n, xy in paths.items()}
        with rc_context({"axes.prop_cycle": matplotlib.cycler(color=COLORS)}):
            trajectory_plot(model, shown, args.out / f"{surface}.png")
            if tuned_paths:
                trajectory_plot(model, tuned_paths, args.out / f"{surface}_tuned.png")
        if not args.quick:
            animate(model, shown, args.out / f"{surface}.gif", f"{surface}, lr {lr:g}")
        data["surfaces"][surface] = {"lr": lr, "steps": steps, "start": list(base.model.start), "common_lr": common,
                                     "best_lr": tuned, "plain_loop_vs_train_max_diff": check}
        if surface == "rosenbrock" and not args.quick:
            # AdaBound's steps tend to SGD's with lr final_lr, which Rosenbrock's walls need below 3e-3
            extra = {}
            for name in ("adabound", "amsbound"):
                recorder = Trajectory()
                _, failed = train(compose(f"experiment={surface}", f"optimizer={name}", "optimizer.final_lr=2e-3"),
                                  [recorder])
                xy = np.array([[r["x"], r["y"]] for r in recorder.rows], dtype=float)
                extra[name] = _ends(model, xy, steps, failed is not None)
            data["surfaces"][surface]["final_lr_2e-3"] = extra
        print(f"\n{surface}: all at lr {lr:g}, {steps} steps from {list(base.model.start)}")
        cols = ["optimizer", "x", "y", "f", "diverged", "inside_plot"] + (
            ["escape_step"] if model.minimum is None else [])
        print(table([{"optimizer": n, **r} for n, r in common.items()], cols))
        if tuned:
            print(f"{surface}: each at its best lr of {list(SWEEP_LRS)} (plain loop; adam at lr {lr:g} differs "
                  f"from train() by {check:.2g})")
            print(table([{"optimizer": n, **r} for n, r in tuned.items()],
                        ["optimizer", "lr", "x", "y", "f", "diverged"]))
        if "final_lr_2e-3" in data["surfaces"][surface]:
            print(f"{surface}: at lr {lr:g} with final_lr 2e-3")
            print(table([{"optimizer": n, **r} for n, r in data["surfaces"][surface]["final_lr_2e-3"].items()],
                        ["optimizer", "x", "y", "f", "diverged"]))
    write_json(args.out, "surfaces", data)
    return data


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
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ({path.stat().st_size // 1024} KiB)")
    return path


# --- 3. sensitivity studies -----------------------------------------------------------------------------------------
STUDIES = {"mnist1d": ROOT / "studies" / "reproduce_sensitivity.yaml",
           "digits": ROOT / "studies" / "reproduce_sensitivity_digits.yaml"}


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("optstudy")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "optstudy.cli"]


def sensitivity(args) -> dict:
    """``optstudy study run`` (two workers, a journal file in a temporary directory), then the study read back with
    the sensitivity report's tables and robustness table (``optstudy.dashboards``); AdaBound's final_lr and gamma
    slices measured with the same robustness function."""
    import optuna
    import yaml

    from optstudy.dashboards import report, robustness
    from optstudy.study.storage import open_storage

    studies = {"digits": STUDIES["digits"]} if args.quick else STUDIES  # quick: the faster one only
    data = {"settings": {"tolerance": robustness.TOLERANCE, "workers": args.workers}, "problems": {}}
    fig, axes = figure(len(studies), 3, figsize=(14, 4 * len(studies)), dpi=100)
    for row, (problem, study_file) in enumerate(studies.items()):
        with tempfile.TemporaryDirectory(prefix="reproduce-sensitivity-") as tmp:
            tmp = Path(tmp)
            spec = yaml.safe_load(study_file.read_text())
            if args.quick:  # two lrs, one seed, one epoch: the pipeline, not the numbers
                spec["seeds"] = [0]
                spec["overrides"] = [o for o in spec["overrides"] if not o.startswith("trainer.max_epochs=")] + [
                    "trainer.max_epochs=1"]
                for space in spec["optimizers"].values():
                    space["lr"] = space["lr"][2:4]
                    for key in ("final_lr", "gamma"):
                        if key in space:
                            space[key] = space[key][:2]
                study_file = tmp / study_file.name
                study_file.write_text(yaml.safe_dump(spec))
            storage = tmp / "optuna.journal"
            env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
            command = [*_cli(), "study", "run", str(study_file), "--storage", str(storage)]
            start = time.perf_counter()
            workers = [subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True) for _ in range(args.workers)]
            logs = [w.communicate()[0] for w in workers]
            seconds = time.perf_counter() - start
            for w, log in zip(workers, logs):
                if w.returncode:
                    raise SystemExit(f"optstudy study run failed ({w.returncode}):\n{log[-3000:]}")
            # read back with the report's own tables (optstudy.dashboards.report.tables: the configurations' mean,
            # min and max over seeds, the best configuration per lr) and its robustness table
            study = optuna.load_study(study_name=spec["name"], storage=open_storage(str(storage))[0])
            t = report.tables(study)
            robust = robustness.table(t.optimizers, t.configs, t.curve, t.trials, t.settings.sign)
            configs, curve, trials = t.configs, t.curve, t.trials
        robust.to_csv(args.out / f"sensitivity_{problem}_robustness.csv", index=False)
        configs.drop(columns=["config", "trials", "run_ids"], errors="ignore").to_csv(
            args.out / f"sensitivity_{problem}_configurations.csv", index=False)
        result = _sensitivity_numbers(robust, configs, trials)
        result.update(study_file=str(STUDIES[problem].relative_to(ROOT)), overrides=spec["overrides"],
                      seeds=spec["seeds"], seconds=seconds)
        data["problems"][problem] = result
        _sensitivity_plot(axes[row], problem, configs, curve, result)
        print(f"\n{problem}: {result['trials']} trials in {seconds:.0f}s ({args.workers} workers)")
        print(table(result["optimizers"], ["optimizer", "best", "best_lr", "width_decades", "touches_edge"]))
        ab = result["adabound"]
        print(f"adabound at its defaults (final_lr 0.1, gamma 1e-3): best {ab['defaults_best']:.4g}, lr width "
              f"{ab['defaults_width_decades']:.3g} decades")
        for key in ("final_lr", "gamma"):
            print(table([{"at": f"lr {ab['best_lr']:g}, {k}", **v} for k, v in ab[key].items()],
                        ["at", "values", "mean", "worst_over_best", "width_decades"]))
        t = ab["final_lr_tuned_lr"]
        print(f"final_lr {t['values']} each at its best lr (gamma 1e-3): {[round(v, 4) for v in t['best_over_lr']]}, "
              f"worst/best {t['worst_over_best']:.3g}, width {t['width_decades']:.3g} decades")
    save(fig, args.out / "sensitivity.png")
    write_json(args.out, "sensitivity", data)
    return data


def _sensitivity_numbers(robust, configs, trials) -> dict:
    from optstudy.dashboards.robustness import good_region

    rows = [{k: r[k] for k in ("optimizer", "best", "best_lr", "width_decades", "region_lr_low", "region_lr_high",
                               "lrs_within", "lr_points", "touches_edge", "expected_best_k1", "configurations")}
            for _, r in robust.iterrows()]
    ab = configs[configs["optimizer"] == "adabound"]
    best = ab.sort_values("mean").iloc[0]
    at_lr = ab[ab["params_lr"] == best["params_lr"]]
    defaults = ab[(ab["params_final_lr"] == 0.1) & (ab["params_gamma"] == 1e-3)].sort_values("params_lr")
    slices = {}
    for key, other in (("final_lr", "gamma"), ("gamma", "final_lr")):
        per = {}
        for value, group in at_lr.groupby(f"params_{other}"):
            group = group.sort_values(f"params_{key}")
            region = good_region(group[f"params_{key}"], group["mean"], 1.0)
            per[f"{other}={value:g}"] = {
                "values": group[f"params_{key}"].tolist(), "mean": group["mean"].tolist(),
                "worst_over_best": float(group["mean"].max() / group["mean"].min()),
                "width_decades": region["width_decades"],
                "searched_decades": float(np.log10(group[f"params_{key}"].max() / group[f"params_{key}"].min()))}
        slices[key] = per
    # the other reading of "robust to final_lr": each final_lr with its own best lr (gamma at its default 1e-3)
    tuned = ab[ab["params_gamma"] == 1e-3].groupby("params_final_lr")["mean"].min()
    tuned_region = good_region(tuned.index, tuned.values, 1.0)
    slices["final_lr_tuned_lr"] = {"values": tuned.index.tolist(), "best_over_lr": tuned.tolist(),
                                   "worst_over_best": float(tuned.max() / tuned.min()),
                                   "width_decades": tuned_region["width_decades"]}
    defaults_region = good_region(defaults["params_lr"], defaults["mean"], 1.0)
    return {"optimizers": rows, "trials": int((trials["state"] == "COMPLETE").sum()),
            "failed_trials": int((trials["state"] == "FAIL").sum()),
            "adabound": {"best_lr": float(best["params_lr"]), "best_final_lr": float(best["params_final_lr"]),
                         "best_gamma": float(best["params_gamma"]), "best": float(best["mean"]),
                         "defaults_width_decades": defaults_region["width_decades"],
                         "defaults_best": float(defaults["mean"].min()),
                         "final_lr": slices["final_lr"], "gamma": slices["gamma"],
                         "final_lr_tuned_lr": slices["final_lr_tuned_lr"]}}


def _sensitivity_plot(axes, problem, configs, curve, result):
    for i, (name, group) in enumerate(curve.groupby("optimizer", sort=False)):
        group = group.sort_values("lr")
        label = name + (" (best final_lr, γ per lr)" if name == "adabound" else "")
        axes[0].plot(group["lr"], group["mean"], "o-", color=COLORS[i], label=label, ms=3)
        axes[0].fill_between(group["lr"], group["min"], group["max"], color=COLORS[i], alpha=0.15)
    ab = configs[configs["optimizer"] == "adabound"]
    defaults = ab[(ab["params_final_lr"] == 0.1) & (ab["params_gamma"] == 1e-3)].sort_values("params_lr")
    axes[0].plot(defaults["params_lr"], defaults["mean"], "x:", color="black", label="adabound (final_lr 0.1, γ 1e-3)")
    axes[0].set(xscale="log", yscale="log", xlabel="lr", ylabel="val_loss (mean over seeds; band min-max)",
                title=f"{problem}: objective vs lr")
    axes[0].legend(fontsize=7)
    lr = result["adabound"]["best_lr"]
    at_lr = ab[ab["params_lr"] == lr]
    for ax, (key, other) in zip(axes[1:], (("final_lr", "gamma"), ("gamma", "final_lr"))):
        for i, (value, group) in enumerate(at_lr.groupby(f"params_{other}")):
            group = group.sort_values(f"params_{key}")
            ax.errorbar(group[f"params_{key}"], group["mean"],
                        yerr=[group["mean"] - group["min"], group["max"] - group["mean"]], fmt="o-", ms=3,
                        capsize=3, color=COLORS[i], label=f"{other} {value:g}")
        ax.set(xscale="log", yscale="log", xlabel=key, ylabel="val_loss (mean; bar min-max)",
               title=f"{problem}: adabound at lr {lr:g}, vs {key}")
        ax.legend(fontsize=7)


# --- 4. effective learning rates ------------------------------------------------------------------------------------
class ZeroMoments(pl.Callback):
    """At the end of training, the fraction of each parameter's elements whose second moment v is exactly 0: never a
    non-zero gradient, so Adam's effective lr there is lr/eps (the histogram's top)."""

    def __init__(self):
        self.fractions: dict[str, float] = {}

    def on_train_end(self, trainer, module):
        opt = trainer.optimizers[0]
        for name, p in module.model.named_parameters():
            if p in opt.state:
                self.fractions[name] = float((opt.state[p]["exp_avg_sq"] == 0).float().mean())
        sizes = {n: p.numel() for n, p in module.model.named_parameters()}
        self.total = sum(self.fractions[n] * sizes[n] for n in self.fractions) / sum(sizes.values())


def efflr(args) -> dict:
    """model=cnn on digits with Adam and AdaBound through ``train`` with MLflow on (a temporary SQLite store), so
    that the run writes ``eff_lr_histograms.npz`` and ``eff_lr_heatmap.png`` into ``checkpoint.dir``."""
    data = {"settings": {"epochs": args.epochs, "every": args.every}, "optimizers": {}}
    fig, axes = figure(1, 2, figsize=(11, 3.8), dpi=100)
    with tempfile.TemporaryDirectory(prefix="reproduce-efflr-") as tmp:
        tmp = Path(tmp)
        saved = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        try:
            for col, name in enumerate(("adam", "adabound")):
                cfg = compose("model=cnn", "data=digits", f"optimizer={name}", f"trainer.max_epochs={args.epochs}",
                              f"logger.eff_lr_every_n_steps={args.every}", f"checkpoint.dir={tmp / name}",
                              "logger.experiment=reproduce_efflr", logger="mlflow")
                zeros = ZeroMoments()
                result, failed = train(cfg, [zeros])
                assert failed is None, failed
                shutil.copy(tmp / name / "eff_lr_heatmap.png", args.out / f"efflr_heatmap_{name}.png")
                with np.load(tmp / name / "eff_lr_histograms.npz") as npz:
                    arrays = {k: npz[k] for k in npz.files}
                numbers = _efflr_numbers(arrays, result, cfg)
                numbers.update(zero_v_fraction_end=zeros.total, zero_v_fraction_by_param=zeros.fractions)
                data["optimizers"][name] = numbers
                _efflr_plot(axes[0][col], name, arrays, data["optimizers"][name])
        finally:
            if saved is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved
    for name, numbers in data["optimizers"].items():
        print(f"\n{name}: val_loss {numbers['val_loss']:.4f}, val_acc {numbers['val_acc']:.4f}; elements with v = 0 at "
              f"the end: {numbers['zero_v_fraction_end']:.4f}" + (
                  f"; clipped at the end: lower {numbers['clipped_lower_end']:.4f}, upper "
                  f"{numbers['clipped_upper_end']:.4f}" if "clipped_upper_end" in numbers else ""))
        print(table([{"when": w, **r} for w, r in numbers["records"].items()],
                    ["when", "step", "median_log10", "p1_log10", "p99_log10", "below_0.01", "above_1000",
                     "at_lr_over_eps"]))
    save(fig, args.out / "efflr.png")
    write_json(args.out, "efflr", data)
    return data


def _efflr_numbers(arrays, result, cfg) -> dict:
    steps, edges = arrays["steps"], arrays["edges"]
    counts = arrays["counts"].sum(1).astype(float)  # all param groups: (records, bins)
    picks = {"start": 0, "middle": int(np.argmin(np.abs(steps - steps[-1] / 2))), "end": len(steps) - 1}
    centers = (edges[:-1] + edges[1:]) / 2
    records = {}
    for when, i in picks.items():
        frac = counts[i] / counts[i].sum()
        cdf = np.cumsum(frac)
        # the histogram's end bins also hold everything beyond [-10, 6] decades, so these are exact at 0.1 decade
        records[when] = {"step": int(steps[i]),
                         "median_log10": float(centers[np.searchsorted(cdf, 0.5)]),
                         "p1_log10": float(centers[np.searchsorted(cdf, 0.01)]),
                         "p99_log10": float(centers[np.searchsorted(cdf, 0.99)]),
                         "below_0.01": float(frac[edges[1:] <= -2 + 1e-9].sum()),
                         "above_1000": float(frac[edges[:-1] >= 3 - 1e-9].sum()),
                         # Adam's ceiling lr/(bc1·eps), reached where v = 0; within a bin of it (AdaBound: its
                         # upper bound is far lower, so none)
                         "at_lr_over_eps": float(frac[edges[:-1] >= _ceiling(cfg, int(steps[i])) - 0.1 - 1e-9].sum()),
                         "min_log10": float(arrays["min"][i].min()), "max_log10": float(arrays["max"][i].max())}
    out = {"records": records, "val_loss": result.metrics["val_loss"], "val_acc": result.metrics["val_acc"],
           "elements": int(counts[0].sum())}
    if "clipped" in arrays:
        clipped = arrays["clipped"]  # (records, groups, 2): fractions per group; weigh groups by their counts
        weights = arrays["counts"].sum(2) / arrays["counts"].sum((1, 2))[:, None]
        out["clipped_lower_end"] = float((clipped[-1, :, 0] * weights[-1]).sum())
        out["clipped_upper_end"] = float((clipped[-1, :, 1] * weights[-1]).sum())
    return out


def _ceiling(cfg, t: int) -> float:
    """log10 of Adam's largest effective lr at step t, lr/(bc1·eps) (v = 0), clamped to the histogram's range."""
    beta1 = cfg.optimizer.betas[0]
    return min(math.log10(cfg.optimizer.lr / (1 - beta1**t) / cfg.optimizer.eps), 6.0)


def _efflr_plot(ax, name, arrays, numbers):
    edges = arrays["edges"]
    counts = arrays["counts"].sum(1).astype(float)
    index = {int(s): i for i, s in enumerate(arrays["steps"])}
    used = np.nonzero(counts.sum(0))[0]
    for (when, record), color in zip(numbers["records"].items(), ("#1f77b4", "#ff7f0e", "#2ca02c")):
        frac = counts[index[record["step"]]] / counts[index[record["step"]]].sum()
        ax.stairs(np.maximum(frac, 1e-7), edges, color=color, lw=1.3, label=f"{when} (step {record['step']})")
    ax.axvline(-2, color="grey", ls=":", lw=0.8)
    ax.axvline(3, color="grey", ls=":", lw=0.8)
    ax.set(yscale="log", ylim=(1e-6, 1.5), xlim=(edges[used[0]] - 0.5, edges[used[-1] + 1] + 0.5),
           xlabel="log10 effective lr",
           ylabel="fraction of elements", title=f"{name} on the digits CNN (dotted: 0.01 and 1000)")
    ax.legend(fontsize=8)


# --- 5. bias correction ---------------------------------------------------------------------------------------------
def bias(args) -> dict:
    """experiment=digits_mlp with optimizer.bias_correction=true|false over betas and lrs, through ``train`` with a
    callback that keeps the loss of every step and the validation loss of every epoch."""
    lrs = args.lrs
    grid = [(b1, b2) for b1 in args.beta1 for b2 in args.beta2]
    runs = []
    for b1, b2 in grid:
        for lr in lrs:
            for correction in (True, False):
                recorder = Recorder()
                cfg = compose("experiment=digits_mlp", f"optimizer.lr={lr}", f"optimizer.betas=[{b1},{b2}]",
                              f"optimizer.bias_correction={str(correction).lower()}",
                              f"trainer.max_epochs={args.epochs}",
                              "divergence.factor=null")  # the early blow-up is what is reproduced; NaN still stops
                _, failed = train(cfg, [recorder])
                val = recorder.val_loss + [float("inf")] * (args.epochs - len(recorder.val_loss))
                first = recorder.train_loss[: args.early_steps]
                runs.append({"beta1": b1, "beta2": b2, "lr": lr, "bias_correction": correction,
                             "diverged": failed is not None, f"val_loss_epoch{args.early_epoch}":
                             val[args.early_epoch - 1], f"val_loss_epoch{args.epochs}": val[-1],
                             f"max_train_loss_first{args.early_steps}": max(first) if first else float("inf"),
                             "train_loss": recorder.train_loss})
                print(f"beta1={b1} beta2={b2} lr={lr:g} correction={correction!s:5}: "
                      f"val_loss epoch {args.early_epoch} {val[args.early_epoch - 1]:.4g}, "
                      f"epoch {args.epochs} {val[-1]:.4g}" + ("  DIVERGED" if failed else ""))
    summary = []
    for b1, b2 in grid:
        for lr in lrs:
            on, off = (next(r for r in runs if (r["beta1"], r["beta2"], r["lr"], r["bias_correction"]) ==
                            (b1, b2, lr, c)) for c in (True, False))
            summary.append({"beta1": b1, "beta2": b2, "lr": lr,
                            **{f"{k}_{tag}": r[k] for tag, r in (("on", on), ("off", off))
                               for k in (f"val_loss_epoch{args.early_epoch}", f"val_loss_epoch{args.epochs}",
                                         f"max_train_loss_first{args.early_steps}")}})
    _bias_plot(args, runs, lrs, grid)
    data = {"settings": {"lrs": lrs, "beta1": args.beta1, "beta2": args.beta2, "epochs": args.epochs,
                         "early_epoch": args.early_epoch, "early_steps": args.early_steps,
                         "steps_per_epoch": math.ceil(1437 / 128)},
            "summary": summary, "runs": [{k: v for k, v in r.items() if k != "train_loss"} for r in runs]}
    write_json(args.out, "bias", data)
    return data


def _bias_plot(args, runs, lrs, grid):
    betas2 = list(dict.fromkeys(b2 for _, b2 in grid))
    betas1 = list(dict.fromkeys(b1 for b1, _ in grid))
    keys = [(f"val_loss_epoch{args.early_epoch}", f"after epoch {args.early_epoch}"),
            (f"val_loss_epoch{args.epochs}", f"after epoch {args.epochs}")]
    fig, axes = figure(len(keys) + 1, len(betas2), figsize=(4.2 * len(betas2), 3.3 * (len(keys) + 1)), dpi=100)
    for col, b2 in enumerate(betas2):
        for row, (key, when) in enumerate(keys):
            ax = axes[row][col]
            for b1, ls in zip(betas1, ("-", "--", ":")):
                for correction, color in ((True, "#d62728"), (False, "#2ca02c")):
                    ys = [next(r[key] for r in runs if (r["beta1"], r["beta2"], r["lr"], r["bias_correction"]) ==
                               (b1, b2, lr, correction)) for lr in lrs]
                    ys = [y if math.isfinite(y) else np.nan for y in ys]
                    ax.plot(lrs, ys, "o" + ls, color=color, ms=3,
                            label=f"β1={b1}, {'with' if correction else 'without'} correction")
            ax.set(xscale="log", yscale="log", xlabel="lr", ylabel="val_loss", title=f"β2={b2}, {when}")
        # the worst case early on: the largest lr, the loss of every step
        ax = axes[len(keys)][col]
        lr = lrs[-1]
        for b1, ls in zip(betas1, ("-", "--", ":")):
            for correction, color in ((True, "#d62728"), (False, "#2ca02c")):
                r = next(r for r in runs if (r["beta1"], r["beta2"], r["lr"], r["bias_correction"]) ==
                         (b1, b2, lr, correction))
                steps = min(len(r["train_loss"]), 3 * math.ceil(1437 / 128))
                ax.plot(np.arange(1, steps + 1), r["train_loss"][:steps], ls, color=color, lw=1)
        ax.set(yscale="log", xlabel="step", ylabel="train_loss (batch)", title=f"β2={b2}, lr {lr:g}: first steps")
    axes[0][0].legend(fontsize=7)
    axes[len(keys)][0].legend(*axes[0][0].get_legend_handles_labels(), fontsize=7)
    save(fig, args.out / "bias.png")


# --- 6. the GPU-scale experiment files ------------------------------------------------------------------------------
GPU_EXPERIMENTS = ("cifar10_cnn", "cifar10_resnet34", "cifar10_densenet121", "ptb_lstm", "mnist_logreg", "mnist_mlp")


def configs(args) -> dict:
    """No training: each experiment file composed (its settings as train.py would use them) and the results its
    comments report, parsed from the file; written as a Markdown table that docs/reproductions.md includes as is."""
    import re

    data, rows = {}, []
    for name in GPU_EXPERIMENTS:
        path = ROOT / "conf" / "experiment" / f"{name}.yaml"
        cfg = compose(f"experiment={name}")
        opt = cfg.optimizer
        settings = {"model": cfg.model.name, "data": cfg.data.name, "batch": cfg.data.batch_size,
                    "epochs": cfg.trainer.max_epochs, "optimizer": opt.name, "lr": opt.lr,
                    "betas": list(opt.betas) if "betas" in opt else None, "final_lr": opt.get("final_lr"),
                    "gamma": cfg.bound.get("gamma") if "final_lr" in opt else None, "weight_decay": opt.weight_decay,
                    "scheduler": cfg.scheduler.name, "milestones": list(cfg.scheduler.milestones),
                    "augment": cfg.data.get("augment"), "gradient_clip_val": cfg.trainer.gradient_clip_val,
                    "layers": cfg.model.get("layers"), "trainer": cfg.trainer.accelerator, "objective": cfg.objective}
        text = path.read_text()
        reported = [f"{m[0]} {m[1]}% ({m[2]}%)" for m in re.findall(r"(\w+)\s+(\d+\.\d+)%\s+\((\d+\.\d+)%\)", text)]
        comment = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
        demo = re.search(r"\((demos/cifar10/curve/pretrained/[^)]*)\)", comment)
        said = re.search(r"(?:Reported|Paper's result): (.*?)(?:\.\s+[A-Z]|;|$)", comment)
        source = (f"the authors' demo's pretrained curves, github.com/Luolc/AdaBound {demo[1]}" if demo else
                  said[1].strip() if said else "")
        data[name] = {"file": str(path.relative_to(ROOT)), "settings": settings, "reported": reported,
                      "reported_source": source}
        parts = [cfg.model.name + (f" ({cfg.model.layers} layer; model.layers=2, 3)" if "layers" in cfg.model else ""),
                 cfg.data.name + (" (crop + flip)" if settings["augment"] else ""), f"batch {settings['batch']}",
                 f"{settings['epochs']} epochs",
                 f"{opt.name} lr {opt.lr:g}" + (f", final_lr {opt.final_lr:g}, γ {settings['gamma']:g}"
                                                if settings["final_lr"] is not None else "")]
        if opt.weight_decay:
            parts.append(f"weight decay {opt.weight_decay:g}")
        if settings["scheduler"] == "multistep":
            parts.append("lr ×0.1 at epoch " + " and ".join(map(str, settings["milestones"])))
        elif settings["scheduler"] == "inv_sqrt":
            parts.append("lr/√t")
        if settings["gradient_clip_val"]:
            parts.append(f"gradient norm clipped at {settings['gradient_clip_val']:g}")
        parts.append(f"trainer={'gpu' if settings['trainer'] == 'gpu' else 'cpu'}")
        numbers = ("; ".join(reported) + f" — test accuracy at epoch 200 (best epoch in brackets), from {source}"
                   if reported else f"none stated; the file: {source}" if source else "none stated")
        rows.append(f"| `{path.relative_to(ROOT)}` | `python train.py experiment={name}` | {', '.join(parts)} | "
                    f"{numbers} |")
    header = ["| experiment file | command | settings (as composed) | reported numbers (from the file's comments) |",
              "|---|---|---|---|"]
    markdown = "\n".join(header + rows) + "\n"
    (args.out / "configs.md").write_text(markdown)
    print(markdown)
    write_json(args.out, "configs", data)
    return data


# --- the command line ------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("item", choices=(*ITEMS, "all"))
    p.add_argument("--out", type=Path, default=FIGURES, help="where the JSON and figures go (default docs/figures)")
    p.add_argument("--quick", action="store_true", help="seconds per item: the tests' size, not the document's")
    g = p.add_argument_group("counterexample")
    g.add_argument("--steps", type=int, help="steps of the online problem (default 3000; surfaces: cap per surface)")
    g.add_argument("--stochastic-steps", type=int, help="steps of the stochastic problem (default 8000)")
    g.add_argument("--seeds", type=int, help="seeds of the stochastic problem (default 3)")
    g = p.add_argument_group("sensitivity")
    g.add_argument("--workers", type=int, default=2, help="optstudy study run processes (default 2)")
    g = p.add_argument_group("efflr")
    g.add_argument("--epochs", type=int, help="efflr: epochs (default 30); bias: epochs (default 20)")
    g.add_argument("--every", type=int, default=10, help="efflr: steps between histograms (default 10)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    items = ITEMS if args.item == "all" else (args.item,)
    total = time.perf_counter()
    for item in items:
        start = time.perf_counter()
        print(f"=== {item}", flush=True)
        item_args = argparse.Namespace(**vars(args))
        _defaults(item, item_args)
        globals()[item](item_args)
        print(f"=== {item}: {time.perf_counter() - start:.0f}s", flush=True)
    if len(items) > 1:
        print(f"all: {time.perf_counter() - total:.0f}s")
    return 0


def _defaults(item: str, a: argparse.Namespace) -> None:
    """Per-item sizes: the document's, or with --quick the tests'."""
    q = a.quick
    if item == "counterexample":
        a.steps = a.steps or (1000 if q else 3000)
        a.stochastic_steps = a.stochastic_steps or (200 if q else 8000)
        a.seeds = a.seeds or (1 if q else 3)
    elif item == "surfaces":
        a.steps = a.steps or (150 if q else None)
    elif item == "efflr":
        a.epochs = a.epochs or (2 if q else 30)
    elif item == "bias":
        a.epochs = a.epochs or (2 if q else 20)
        a.early_epoch = 1 if q else 2
        a.early_steps = 12 if q else 24
        a.lrs = [1e-3, 1e-2] if q else [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
        a.beta1 = [0.0] if q else [0.0, 0.9]
        a.beta2 = [0.9999] if q else [0.99, 0.999, 0.9999]


if __name__ == "__main__":
    sys.exit(main())
