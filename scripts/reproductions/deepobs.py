"""Item 7: DeepOBS's learning-rate protocol for all twelve optimizers with ten seeds at every lr, trained as
populations, docs/reproductions.md section 7.

Config: ``studies/deepobs_protocol.yaml`` (MNIST-1D MLP, 36 lrs from 1e-5 to 1e2, seeds 0-9, ``population: 36``),
run by ``optstudy study run`` in ``--workdir`` (a journal file and an MLflow SQLite file there; a finished study
there is read back, an unfinished one resumed). Every seed's final val_loss is read from its MLflow run (a trial
whose seed diverged has no mean, but its other seeds are still points of the curve). ``--sample N`` also runs N
random (optimizer, lr) points of the same grid one at a time (``--population 1``, one seed) for the one-at-a-time
estimate. Writes ``deepobs.json``, ``deepobs.png`` (all twelve medians) and ``deepobs_panels.png`` (one panel per
optimizer: median, interquartile and min-max bands over the seeds, diverged seeds marked).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

from ._common import COLORS, SCRATCH, figure, optstudy_command, save, shown, table, write_json

STUDY = Path(str(resources.files("optstudy._studies") / "deepobs_protocol.yaml"))  # the repository's studies/
CHANCE = float(np.log(10))  # MNIST-1D's ten classes
QUICK = {"optimizers": ("sgd", "adam"), "lrs": 4, "seeds": 2, "epochs": 1}


def defaults(args) -> None:
    if getattr(args, "workers", None) is None:
        args.workers = 1  # one worker with both cores: a population's batched matmuls use them
    if getattr(args, "workdir", None) is None:
        args.workdir = Path(tempfile.mkdtemp(prefix="deepobs-")) if args.quick else SCRATCH / "deepobs"
    if getattr(args, "sample", None) is None:
        args.sample = 2 if args.quick else 24


def run(args) -> dict:
    import yaml

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_load(STUDY.read_text())
    study_file = _shrunk(spec, workdir / "deepobs_quick.yaml") if args.quick else STUDY
    start = time.perf_counter()
    _study_run(study_file, workdir, args.workers)
    invocation = time.perf_counter() - start
    seeds = _seed_values(spec["name"], workdir)
    curves = _curves(seeds, list(spec["optimizers"]))
    wall = _wall_seconds(spec["name"], workdir)
    data = {"study_file": str(shown(STUDY)), "quick": bool(args.quick), "workers": args.workers,
            "population": spec.get("population"), "runs": len(seeds["value"]),
            "wall_seconds": wall, "this_invocation_seconds": invocation,
            "one_at_a_time": _one_at_a_time(spec, workdir, args), "optimizers": _numbers(curves)}
    sample = data["one_at_a_time"]
    if sample:
        sample["estimate_seconds"] = sample["seconds_per_run"] * data["runs"]
        sample["speedup"] = sample["estimate_seconds"] / wall
    _plot(curves, args.out, spec)
    _print(data)
    write_json(args.out, "deepobs", data)
    return data


def _shrunk(spec: dict, path: Path) -> Path:
    """--quick: two optimizers, four lrs, two seeds, one epoch, populations of 4 (the pipeline, not the numbers)."""
    import yaml

    keep = {k: {"lr": v["lr"][::9][:QUICK["lrs"]]} for k, v in spec["optimizers"].items() if k in QUICK["optimizers"]}
    spec.update(name="deepobs_protocol_quick", optimizers=keep, seeds=list(range(QUICK["seeds"])),
                population=QUICK["lrs"], overrides=[*spec["overrides"], f"trainer.max_epochs={QUICK['epochs']}"])
    path.write_text(yaml.safe_dump(spec))
    return path


def _env(workdir: Path) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}


def _study_run(study_file: Path, workdir: Path, workers: int, *extra: str) -> None:
    command = [*optstudy_command(), "study", "run", str(study_file), "--storage", str(workdir / "optuna.journal"), *extra]
    procs = [subprocess.Popen(command, cwd=workdir, env=_env(workdir), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(workers)]
    for proc in procs:
        log = proc.communicate()[0]
        if proc.returncode:
            raise SystemExit(f"optstudy study run failed ({proc.returncode}):\n{log[-3000:]}")


def _trials(name: str, workdir: Path):
    import optuna

    from optstudy.study.storage import open_storage

    storage = open_storage(str(workdir / "optuna.journal"))[0]
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def _wall_seconds(name: str, workdir: Path) -> float:
    """First trial's start to last trial's end: the study's wall time whether it ran in one go or was resumed
    (a worker's ~8 s start-up before its first trial is not in it)."""
    trials = [t for t in _trials(name, workdir) if t.datetime_complete]
    return (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()


def _seed_values(name: str, workdir: Path) -> dict:
    """Every member run of the study: optimizer, lr, seed, final val_loss (NaN where the seed diverged)."""
    import mlflow

    trials = {t.number: t for t in _trials(name, workdir)}
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[name], max_results=100_000,
                              filter_string="tags.`optuna.trial` != ''")
    out = {"optimizer": [], "lr": [], "seed": [], "value": []}
    for _, run in runs.iterrows():
        trial = trials.get(int(run["tags.optuna.trial"]))
        if trial is None or not trial.state.is_finished() or run["tags.seed"] is None:
            continue
        value = run.get("metrics.val_loss", np.nan)
        finished = run["status"] == "FINISHED" and np.isfinite(value)
        out["optimizer"].append(trial.params["optimizer"])
        out["lr"].append(float(trial.params["lr"]))
        out["seed"].append(int(run["tags.seed"]))
        out["value"].append(float(value) if finished else np.nan)
    return {k: np.asarray(v) for k, v in out.items()}


def _curves(seeds: dict, order: list[str]) -> dict:
    """Per optimizer, per lr: median, quartiles, min and max over the seeds that finished, and how many diverged."""
    curves = {}
    for name in [n for n in order if n in set(seeds["optimizer"])]:  # the study file's order
        mine = seeds["optimizer"] == name
        lrs = np.unique(seeds["lr"][mine])
        rows = []
        for lr in lrs:
            v = seeds["value"][mine & (seeds["lr"] == lr)]
            ok = v[np.isfinite(v)]
            q = np.percentile(ok, [0, 25, 50, 75, 100]) if len(ok) else [np.nan] * 5
            rows.append([lr, *q, len(v) - len(ok), len(v), ok.mean() if len(ok) else np.nan,
                         ok.std() if len(ok) else np.nan])
        curves[name] = np.array(rows)  # columns: lr, min, q25, median, q75, max, diverged, seeds, mean, std
    return curves


def _numbers(curves: dict) -> list[dict]:
    """Best lr by the median over seeds, the width of the lrs within 5% of it (all seeds finished), the seed spread
    there, and where divergence starts (the smallest lr with a diverged seed) and is total."""
    from optstudy.dashboards.robustness import good_region

    rows = []
    for name, c in curves.items():
        usable = c[:, 6] == 0  # every seed finished: a median over survivors would flatter a half-diverged lr
        lrs, median = c[usable, 0], c[usable, 3]
        i = int(np.nanargmin(median)) if np.isfinite(median).any() else None
        region = good_region(lrs, median, 1.0)
        some, every = c[c[:, 6] > 0, 0], c[c[:, 6] == c[:, 7], 0]
        rows.append({"optimizer": name, "best_lr": lrs[i] if i is not None else np.nan,
                     "best_median": median[i] if i is not None else np.nan,
                     "seed_std_at_best": c[usable][i, 9] if i is not None else np.nan,
                     "seed_range_at_best": (c[usable][i, 5] - c[usable][i, 1]) if i is not None else np.nan,
                     "width_decades_5pct": region["width_decades"], "region_lr_low": region["region_lr_low"],
                     "region_lr_high": region["region_lr_high"],
                     "first_diverged_lr": float(some.min()) if len(some) else None,
                     "all_diverged_from_lr": float(every.min()) if len(every) else None,
                     "diverged_runs": int(c[:, 6].sum()), "runs": int(c[:, 7].sum())})
    return rows


def _one_at_a_time(spec: dict, workdir: Path, args) -> dict | None:
    """``args.sample`` random grid points (optimizer, lr; seed 0) run by the same study machinery one trial at a
    time (``--population 1``) in a study of their own: seconds per run, end to end."""
    import yaml

    if not args.sample:
        return None
    rng = np.random.default_rng(0)
    points = [(name, lr) for name, space in spec["optimizers"].items() for lr in space["lr"]]
    chosen = [points[i] for i in sorted(rng.choice(len(points), size=min(args.sample, len(points)), replace=False))]
    sample = {**spec, "name": f"{spec['name']}_sample", "seeds": [0], "population": 1, "sampler": {"name": "grid"},
              "optimizers": {}}
    for name, lr in chosen:
        sample["optimizers"].setdefault(name, {"lr": []})["lr"].append(lr)
    path = workdir / "deepobs_sample.yaml"
    path.write_text(yaml.safe_dump(sample))
    _study_run(path, workdir, 1, "--population", "1")
    wall = _wall_seconds(sample["name"], workdir)
    runs = sum(len(s["lr"]) for s in sample["optimizers"].values())
    return {"points": [f"{n} lr={lr:g}" for n, lr in chosen], "runs": runs, "seconds": wall,
            "seconds_per_run": wall / runs}


def _plot(curves: dict, out: Path, spec: dict) -> None:
    low = min(np.nanmin(c[:, 1]) for c in curves.values() if np.isfinite(c[:, 1]).any())
    ylim = (0.9 * low, CHANCE + 0.25)  # above chance level is "learned nothing": clipped at the top
    lrs = np.concatenate([c[:, 0] for c in curves.values()])
    lims = {"xlim": (lrs.min() / 1.5, lrs.max() * 1.5), "ylim": ylim}
    fig, axes = figure(1, 1, figsize=(9, 5.5), dpi=110)
    ax = axes[0, 0]
    for i, (name, c) in enumerate(curves.items()):
        ax.plot(c[:, 0], c[:, 3], "o-", ms=2.5, lw=1.2, color=COLORS[i % len(COLORS)], label=name)
    _axes(ax, lims, "median over seeds")
    ax.legend(fontsize=7, ncol=3)
    save(fig, out / "deepobs.png")
    rows = int(np.ceil(len(curves) / 4))
    fig, axes = figure(rows, 4, figsize=(16, 3.2 * rows), dpi=100)
    for ax, (i, (name, c)) in zip(axes.flat, enumerate(curves.items())):
        color = COLORS[i % len(COLORS)]
        ax.fill_between(c[:, 0], c[:, 1], c[:, 5], color=color, alpha=0.15, lw=0, label="min-max")
        ax.fill_between(c[:, 0], c[:, 2], c[:, 4], color=color, alpha=0.35, lw=0, label="quartiles")
        ax.plot(c[:, 0], c[:, 3], "-", color=color, lw=1.2, label="median")
        bad = c[:, 6] > 0  # at the top edge, whatever the y range: size is the share of seeds that diverged
        ax.scatter(c[bad, 0], np.full(bad.sum(), 0.96), marker="x", s=4 + 40 * c[bad, 6] / c[bad, 7],
                   color="red", transform=ax.get_xaxis_transform(), label="diverged seeds")
        _axes(ax, lims, "")
        ax.set_title(name, fontsize=10)
    for ax in list(axes.flat)[len(curves):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=6, loc="lower left")
    save(fig, out / "deepobs_panels.png")


def _axes(ax, lims, what: str) -> None:
    ax.axhline(CHANCE, color="grey", ls=":", lw=0.8)  # ln 10: a uniform guess over the ten classes
    ax.set(xscale="log", **lims, xlabel="lr", ylabel=f"final val_loss ({what})" if what else "final val_loss")
    ax.grid(True, which="major", alpha=0.3)


def _print(data: dict) -> None:
    print(f"\n{data['runs']} runs; study wall time {data['wall_seconds']:.0f} s "
          f"(populations of up to {data['population']} configurations x seeds, {data['workers']} worker)")
    print(table(data["optimizers"], ["optimizer", "best_lr", "best_median", "seed_std_at_best", "width_decades_5pct",
                                     "first_diverged_lr", "all_diverged_from_lr", "diverged_runs"]))
    s = data["one_at_a_time"]
    if s:
        print(f"one at a time: {s['runs']} sampled runs, {s['seconds_per_run']:.2f} s a run -> "
              f"{s['estimate_seconds']:.0f} s for all {data['runs']}; populations {s['speedup']:.1f}x faster")
