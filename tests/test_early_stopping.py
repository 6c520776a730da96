"""``trainer.early_stopping``: Lightning's EarlyStopping on real digits-MLP training; what it records in MLflow
(SQLite) and in a study's trials (journal file); per member in a population, where a stopped member is cut from the
stack; with pruning; the report's epochs-saved table; mistakes exit 2 with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import pytorch_lightning as pl
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from optstudy.cli import main as cli
from optstudy.config import compose
from optstudy.errors import ConfigError
from optstudy.population.members import member_configs
from optstudy.population.run import train_population
from optstudy.study import early as report
from optstudy.study.storage import open_storage
from optstudy.train import train

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["checkpoint.enabled=false", "++logger.eff_lr_heatmap=false"]
ES = "trainer.early_stopping"


def reference_stop(values: list[float], patience: int, min_delta: float = 0.0, mode: str = "min"):
    """The patience rule written out on a logged curve (float32, as Lightning compares): (epochs run, best epoch),
    epochs from 1; ``None`` for epochs run when it never fires."""
    sign = 1.0 if mode == "min" else -1.0
    best, best_epoch, wait = np.float32(np.inf), 0, 0
    for epoch, v in enumerate(values, start=1):
        v = np.float32(sign * v)
        if v - np.float32(min_delta) < best:
            best, best_epoch, wait = v, epoch, 0
        else:
            wait += 1
            if wait >= patience:
                return epoch, best_epoch
    return None, best_epoch


def history(uri: str, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


# --- one run ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patience", [1, 3])
def test_a_run_that_cannot_improve_stops_after_patience_epochs_and_mlflow_has_it(patience, mlflow_uri):
    """lr = 0: the weights never move, val_loss repeats its first value, which is the only improvement (over +inf):
    the run stops after 1 + patience epochs, whatever max_epochs says."""
    result = train(compose(["optimizer=sgd", "optimizer.lr=0.0", "trainer.max_epochs=10",
                            f"{ES}.patience={patience}", *QUICK]))
    stop = 1 + patience
    assert result.metrics["early_stopping/stopped_epoch"] == stop
    assert result.metrics["early_stopping/epochs_run"] == stop
    assert result.metrics["early_stopping/best_epoch"] == 1
    run = MlflowClient(mlflow_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["early_stopping/stopped_epoch"] == stop
    assert run.data.metrics["early_stopping/stopped"] == 1.0
    assert run.data.tags["early_stopping.stopped"] == "true"
    assert len(history(mlflow_uri, result.run_id, "val_loss")) == stop  # trained no further
    assert run.data.metrics["early_stopping/best_value"] == pytest.approx(result.value, rel=1e-6)  # float32


def test_the_stop_epoch_is_the_patience_rule_on_the_logged_curve_and_the_objective_is_the_last_value(mlflow_uri):
    """adam lr 0.03 on digits overfits after a few epochs: the epoch it stops after, and its best epoch, are those
    the rule gives on the val_loss curve MLflow recorded; the returned objective is the last epoch's value (the
    weights the run ends with), not the best."""
    result = train(compose(["optimizer.lr=0.03", "trainer.max_epochs=20", f"{ES}.patience=2", *QUICK]))
    curve = history(mlflow_uri, result.run_id, "val_loss")
    stop, best_epoch = reference_stop(curve, patience=2)
    assert stop is not None and stop < 20, curve  # the test is about a run that does stop early
    assert len(curve) == stop == result.metrics["early_stopping/stopped_epoch"]
    assert result.metrics["early_stopping/best_epoch"] == best_epoch
    assert result.value == pytest.approx(curve[-1], rel=1e-6)
    assert result.metrics["early_stopping/best_value"] == pytest.approx(min(curve), rel=1e-6)
    assert result.value > result.metrics["early_stopping/best_value"]


def test_val_acc_is_maximised_and_min_delta_counts(mlflow_uri):
    """monitor val_acc: mode max by default; min_delta 0.5 makes no improvement after the first count."""
    result = train(compose(["optimizer.lr=0.01", "trainer.max_epochs=6", f"{ES}.patience=2", f"{ES}.monitor=val_acc",
                            f"{ES}.min_delta=0.5", *QUICK]))
    assert result.metrics["early_stopping/stopped_epoch"] == 3
    curve = history(mlflow_uri, result.run_id, "val_acc")
    assert result.metrics["early_stopping/best_value"] == pytest.approx(curve[0], rel=1e-6)


def test_a_run_to_the_end_records_no_stopped_epoch(mlflow_uri):
    result = train(compose(["optimizer.lr=0.01", "trainer.max_epochs=3", f"{ES}.patience=5", *QUICK]))
    assert result.metrics["early_stopping/epochs_run"] == 3 and result.metrics["early_stopping/stopped"] == 0.0
    run = MlflowClient(mlflow_uri).get_run(result.run_id)
    assert "early_stopping/stopped_epoch" not in run.data.metrics
    assert run.data.tags["early_stopping.stopped"] == "false"


def test_a_resumed_run_keeps_its_early_stopping_state(tmp_path):
    """lr = 0, patience 3: 2 epochs, then resumed from last.ckpt up to 10: it stops after epoch 4 with its best at
    epoch 1, as a run that never stopped; without the restored state it would count again from epoch 3."""
    common = ["optimizer=sgd", "optimizer.lr=0.0", f"{ES}.patience=3", f"checkpoint.dir={tmp_path}",
              "++logger.eff_lr_heatmap=false"]
    first = train(compose([*common, "trainer.max_epochs=2"]))
    assert first.metrics["early_stopping/stopped"] == 0.0
    resumed = train(compose([*common, "trainer.max_epochs=10", f"ckpt_path={tmp_path}/checkpoints/last.ckpt"]))
    assert resumed.metrics["early_stopping/stopped_epoch"] == 4
    assert resumed.metrics["early_stopping/best_epoch"] == 1


def test_off_by_default_and_nothing_recorded(mlflow_uri):
    result = train(compose(["trainer.max_epochs=2", *QUICK]))
    assert not any(k.startswith("early_stopping") for k in result.metrics)
    assert len(history(mlflow_uri, result.run_id, "val_loss")) == 2


# --- a population ---------------------------------------------------------------------------------------------------
def test_each_member_stops_when_its_standalone_run_stops_and_leaves_the_stack(mlflow_uri):
    """Members lr 0 (stops after epoch 2), 0.03 and 0.01 (later, on their own curves): each member's stop epoch,
    best epoch and last value equal its standalone run's; the stack shrinks to 2 rows after the first stop; stopped
    members' runs end FINISHED, not pruned."""
    overrides = ["optimizer=adam", "population.lr=[0.0,0.03,0.01]", "trainer.max_epochs=14", f"{ES}.patience=1",
                 *QUICK]
    result = train_population(compose(overrides))
    configs, _ = member_configs(compose(overrides))
    stops = []
    for member, cfg in zip(result.members, configs):
        alone = train(cfg)
        for key in ("early_stopping/epochs_run", "early_stopping/best_epoch", "early_stopping/stopped"):
            assert member.metrics[key] == alone.metrics[key], key
        assert member.value == pytest.approx(alone.value, rel=1e-5)
        assert member.stopped is None and member.diverged is None
        stops.append(member.metrics["early_stopping/epochs_run"])
        run = MlflowClient(mlflow_uri).get_run(member.run_id)
        assert run.info.status == "FINISHED" and "optuna.pruned" not in run.data.tags
        assert len(history(mlflow_uri, member.run_id, "val_loss")) == member.metrics["early_stopping/epochs_run"]
    assert stops[0] == 2 and all(s < 14 for s in stops), stops  # every member stops before the budget
    # compute: after the first stop (epoch 2, index 1) the stack has 2 rows; the others cut as they stop
    assert result.compactions[0] == (1, 2), result.compactions


def test_a_stopped_member_stops_costing_compute():
    """The stack's parameters shrink from K rows to those still training (what each step costs)."""
    overrides = ["optimizer=sgd", "population.lr=[0.0,0.0,0.0,0.1]", "trainer.max_epochs=4", f"{ES}.patience=1",
                 "logger=none", *QUICK]
    sizes = []

    class Sizes(pl.Callback):
        def on_train_epoch_start(self, trainer, task):
            sizes.append(next(iter(task.model.parameters())).shape[0])

    result = train_population(compose(overrides), callbacks=[Sizes()])
    assert sizes == [4, 4, 1, 1]  # the three lr-0 members stop after epoch 2 and are cut before epoch 3
    assert [m.metrics["early_stopping/epochs_run"] for m in result.members] == [2, 2, 2, 4]


# --- studies --------------------------------------------------------------------------------------------------------
def study_file(tmp_path, name, **fields) -> Path:
    content = {"name": name, "seeds": [0], "sampler": {"name": "grid"}, "pruner": {"name": "none"},
               "overrides": ["trainer.max_epochs=8", f"{ES}.patience=2"],
               "optimizers": {"adam": {"lr": [1e-2, 3e-2, 1e-7]}}, **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def load(name, storage):
    return optuna.load_study(study_name=name, storage=open_storage(storage)[0])


def test_a_study_with_pruning_and_early_stopping_records_both(tmp_path, mlflow_uri):
    """Median pruning and early stopping at once: lr 1e-7 is pruned after its first epoch; lr 0.03 completes,
    stopped early after its 6th epoch (the standalone run's), its trial keeping the stop per seed; lr 0.01 runs all
    8 epochs."""
    path = study_file(tmp_path, "esprune", pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
    storage = str(tmp_path / "esprune.journal")
    assert cli(["study", "run", str(path), "--storage", storage]) == 0
    by_lr = {t.params["lr"]: t for t in load("esprune", storage).get_trials()}
    assert by_lr[1e-7].state == TrialState.PRUNED and max(by_lr[1e-7].intermediate_values) == 0
    fast, slow = by_lr[3e-2], by_lr[1e-2]
    assert fast.state == slow.state == TrialState.COMPLETE
    alone = train(compose(["optimizer.lr=0.03", "trainer.max_epochs=8", f"{ES}.patience=2", *QUICK]))
    es = fast.user_attrs["early_stopping"]
    assert es["max_epochs"] == 8 and es["stopped"] == [True]
    assert es["epochs_run"] == [alone.metrics["early_stopping/epochs_run"]] and es["epochs_run"][0] < 8
    assert len(fast.intermediate_values) == es["epochs_run"][0]  # reported each epoch it trained
    assert fast.value == pytest.approx(alone.value, rel=1e-6)
    assert slow.user_attrs["early_stopping"]["epochs_run"] == [8]
    run = MlflowClient(mlflow_uri).get_run(fast.user_attrs["mlflow_run_id"])
    assert run.data.metrics["early_stopping/stopped_epoch"] == es["epochs_run"][0]


def test_a_population_study_records_each_trials_stops_and_the_report_counts_the_epochs_saved(tmp_path, mlflow_uri):
    """Grid of adam and sgd lrs x 2 seeds, trained as populations: each trial's attrs hold its seeds' stops (equal to
    the standalone runs'); ``epochs_saved`` counts them per optimizer, checked against the attrs by hand."""
    path = study_file(tmp_path, "espop", seeds=[0, 1], population=4,
                      optimizers={"adam": {"lr": [0.0, 3e-2]}, "sgd": {"lr": [0.0, 0.3]}})
    storage = str(tmp_path / "espop.journal")
    assert cli(["study", "run", str(path), "--storage", storage]) == 0
    study = load("espop", storage)
    trials = {(t.params["optimizer"], t.params["lr"]): t for t in study.get_trials()}
    assert all(t.state == TrialState.COMPLETE for t in trials.values())
    assert trials["adam", 0.0].user_attrs["early_stopping"]["epochs_run"] == [3, 3]  # lr 0: 1 + patience
    alone = train(compose(["optimizer.lr=0.03", "trainer.max_epochs=8", f"{ES}.patience=2", "seed=1", *QUICK]))
    assert trials["adam", 0.03].user_attrs["early_stopping"]["epochs_run"][1] == alone.metrics[
        "early_stopping/epochs_run"]

    table = report.epochs_saved(study).set_index("optimizer")
    for name in ("adam", "sgd"):
        attrs = [t.user_attrs["early_stopping"] for (o, _), t in trials.items() if o == name]
        runs = [(e, s) for a in attrs for e, s in zip(a["epochs_run"], a["stopped"])]
        row = table.loc[name]
        assert row["runs"] == len(runs) == 4 and row["budget"] == 8
        assert row["stopped"] == sum(s for _, s in runs)
        assert row["mean_epochs_run"] == pytest.approx(np.mean([e for e, _ in runs]), abs=1e-12)
        assert row["epochs_saved"] == pytest.approx(8 - np.mean([e for e, _ in runs]), abs=1e-12)
        best = min((t for (o, _), t in trials.items() if o == name), key=lambda t: t.value)
        assert row["best_final"] == pytest.approx(best.value, abs=1e-12)
        assert row["best_seen"] == pytest.approx(np.mean(best.user_attrs["early_stopping"]["best_value"]), abs=1e-12)
        assert row["gap"] >= -1e-6  # the end is never better than the best seen (float32 rounding aside)
    fig = report.figure(table.reset_index(), "val_loss")
    fig.savefig(tmp_path / "es.png")
    assert (tmp_path / "es.png").stat().st_size > 1000
    assert "adam: " in report.summary_line(table.reset_index())
    # the study's report page shows it, with its table as a CSV
    from optstudy.dashboards.report import write

    page = write(study, tmp_path / "report").read_text()
    assert "8. Early stopping: epochs saved per optimizer" in page and 'alt="epochs saved by early stopping"' in page
    assert (tmp_path / "report" / "early_stopping.csv").read_text().startswith("optimizer,trials,runs,stopped")


def test_a_study_without_early_stopping_gives_an_empty_table(tmp_path):
    path = study_file(tmp_path, "noes", overrides=["trainer.max_epochs=1"], optimizers={"adam": {"lr": [1e-3]}})
    storage = str(tmp_path / "noes.journal")
    assert cli(["study", "run", str(path), "--storage", storage]) == 0
    assert report.epochs_saved(load("noes", storage)).empty
    from optstudy.dashboards.report import write

    assert "Early stopping" not in write(load("noes", storage), tmp_path / "report").read_text()


# --- mistakes -------------------------------------------------------------------------------------------------------
MISTAKES = [
    (f"{ES}.patience=0", [f"{ES}.patience", "integer >= 1", "0"]),
    (f"{ES}.patience=abc", [f"{ES}.patience", "integer >= 1", "'abc'"]),
    (f"{ES}.patience=2 {ES}.mode=up", [f"{ES}.mode", "min or max", "'up'"]),
    (f"{ES}.patience=2 {ES}.min_delta=-0.1", [f"{ES}.min_delta", "number >= 0", "-0.1"]),
    (f"{ES}.patience=2 {ES}.monitor=val_ppl", [f"{ES}.monitor", "must be one of train_loss, val_loss, val_acc",
                                              "'val_ppl'"]),
]


@pytest.mark.parametrize("overrides,words", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_bad_value_exits_2_with_one_line_and_records_nothing(overrides, words, tmp_path):
    db = tmp_path / "mlflow.db"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides.split()], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}, cwd=tmp_path, timeout=300,
                          check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not db.exists()  # refused before any run was created


def test_a_population_checks_the_monitor_too():
    with pytest.raises(ConfigError, match=rf"{ES}.monitor must be one of train_loss, val_loss, val_acc, got 'x'"):
        train_population(compose(["population.lr=[0.1,0.2]", f"{ES}.patience=1", f"{ES}.monitor=x", "logger=none",
                                  *QUICK]))


def test_help_lists_the_keys():
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0
    block = proc.stdout[proc.stdout.index("early_stopping:"):]
    for key in ("patience: null", "monitor: null", "mode: null", "min_delta: 0.0"):
        assert key in block[:200], key


def test_the_new_key_is_not_passed_to_lightning():
    from optstudy.train import trainer_kwargs

    assert "early_stopping" not in trainer_kwargs(compose([f"{ES}.patience=2"]))


# --- the reproduction -------------------------------------------------------------------------------------------------
def test_the_reproduction_runs_quick_and_its_stops_are_the_rule_on_the_full_curves(tmp_path):
    """``python scripts/reproduce.py early_stopping --quick``: adam at a large lr overfits at once and stops early;
    every member's stop with early stopping is the rule's on its full run's curve, and that run's values at the stop
    are those the early-stopped member ends with (the full run cut at the stop)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["early_stopping", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "early_stopping.json").read_text())
    assert data["agreement"]["equal_to_rule"] == data["agreement"]["members"] == 1
    (run,) = data["runs"]
    assert run["es_stopped"] and run["es_epochs"] < data["settings"]["epochs"]
    assert run["acc_es"] == pytest.approx(run["acc_full_at_stop"], rel=1e-5)
    assert (tmp_path / "early_stopping.png").stat().st_size > 10_000
