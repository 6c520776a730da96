"""Item 3: lr, final_lr and gamma sensitivity (AdaBound's robustness claim; DeepOBS' lr width), docs/reproductions.md
section 3.

Config: ``studies/reproduce_sensitivity.yaml`` (MNIST-1D, ``experiment=mnist1d_mlp``) and
``studies/reproduce_sensitivity_digits.yaml`` (digits, ``experiment=digits_mlp``), each run by ``optstudy study run``
in ``--workers`` processes and read back with the sensitivity report's own tables (``optstudy.dashboards``).
Writes ``sensitivity.json``, ``sensitivity.png`` and ``sensitivity_<problem>_{robustness,configurations}.csv``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

from ._common import COLORS, ROOT, figure, optstudy_command, save, table, write_json

SHIPPED = resources.files("optstudy._studies")  # the repository's studies/
STUDIES = {"mnist1d": Path(str(SHIPPED / "reproduce_sensitivity.yaml")),
           "digits": Path(str(SHIPPED / "reproduce_sensitivity_digits.yaml"))}


def defaults(args) -> None:
    if getattr(args, "workers", None) is None:
        args.workers = 2


def run(args) -> dict:
    """``optstudy study run`` (two workers, a journal file in a temporary directory), then the study read back with
    the sensitivity report's tables and robustness table (``optstudy.dashboards``); AdaBound's final_lr and gamma
    slices measured with the same robustness function."""
    from optstudy.dashboards import robustness

    studies = {"digits": STUDIES["digits"]} if args.quick else STUDIES  # quick: the faster one only
    data = {"settings": {"tolerance": robustness.TOLERANCE, "workers": args.workers}, "problems": {}}
    fig, axes = figure(len(studies), 3, figsize=(14, 4 * len(studies)), dpi=100)
    for row, (problem, study_file) in enumerate(studies.items()):
        spec, seconds, (robust, configs, curve, trials) = _study(study_file, args)
        robust.to_csv(args.out / f"sensitivity_{problem}_robustness.csv", index=False)
        configs.drop(columns=["config", "trials", "run_ids"], errors="ignore").to_csv(
            args.out / f"sensitivity_{problem}_configurations.csv", index=False)
        result = _numbers(robust, configs, trials)
        result.update(study_file=str(STUDIES[problem].relative_to(ROOT)), overrides=spec["overrides"],
                      seeds=spec["seeds"], seconds=seconds)
        data["problems"][problem] = result
        _plot(axes[row], problem, configs, curve, result)
        _print(problem, result, seconds, args.workers)
    save(fig, args.out / "sensitivity.png")
    write_json(args.out, "sensitivity", data)
    return data


def _study(study_file: Path, args):
    """The study run by ``args.workers`` processes in a temporary directory, then read back: its spec (as run), the
    seconds it took, and the report's tables (robustness, configurations, lr curve, trials)."""
    import optuna
    import yaml

    from optstudy.dashboards import report, robustness
    from optstudy.study.storage import open_storage

    with tempfile.TemporaryDirectory(prefix="reproduce-sensitivity-") as tmp:
        tmp = Path(tmp)
        spec = yaml.safe_load(study_file.read_text())
        if args.quick:
            study_file = _shrunk(spec, tmp / study_file.name)
        storage = tmp / "optuna.journal"
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
        command = [*optstudy_command(), "study", "run", str(study_file), "--storage", str(storage)]
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
        return spec, seconds, (robust, t.configs, t.curve, t.trials)


def _shrunk(spec: dict, path: Path) -> Path:
    """--quick: two lrs, one seed, one epoch (the pipeline, not the numbers); ``spec`` changed in place and written
    to ``path``."""
    import yaml

    spec["seeds"] = [0]
    spec["overrides"] = [o for o in spec["overrides"] if not o.startswith("trainer.max_epochs=")] + [
        "trainer.max_epochs=1"]
    for space in spec["optimizers"].values():
        space["lr"] = space["lr"][2:4]
        for key in ("final_lr", "gamma"):
            if key in space:
                space[key] = space[key][:2]
    path.write_text(yaml.safe_dump(spec))
    return path


def _numbers(robust, configs, trials) -> dict:
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


def _print(problem: str, result: dict, seconds: float, workers: int) -> None:
    print(f"\n{problem}: {result['trials']} trials in {seconds:.0f}s ({workers} workers)")
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


def _plot(axes, problem, configs, curve, result):
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
