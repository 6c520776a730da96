"""The sensitivity report of a study: a real small study (two optimizers x three lrs x two seeds, trained and tracked
in MLflow, in a JournalStorage file) plus a failed, a pruned and a surplus trial; the page rendered by headless
Chromium; the CSVs against the page and against MLflow; the robustness numbers on hand-made data."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from optstudy.dashboards import write
from optstudy.dashboards.robustness import expected_best, good_region
from optstudy.dashboards.trials import configurations, lr_curve
from optstudy.train import train

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "report-study"
OPTIMIZERS = ["adam", "momentum", "adabound"]  # adabound: one failed trial, nothing completed
SEEDS = [0, 1]
EPOCHS = 2
CONFIGS = [("adam", {"lr": 1e-3}), ("adam", {"lr": 1e-2}), ("adam", {"lr": 1e-1}),
           ("momentum", {"lr": 1e-2, "momentum": 0.9}), ("momentum", {"lr": 1e-1, "momentum": 0.5}),
           ("momentum", {"lr": 3e-1, "momentum": 0.9})]
DISTS = {"optimizer": CategoricalDistribution(OPTIMIZERS), "lr": FloatDistribution(1e-4, 1.0, log=True),
         "momentum": FloatDistribution(0.0, 0.99), "final_lr": FloatDistribution(1e-3, 1.0, log=True)}
HEADINGS = ["1. Study", "2. Objective against each hyperparameter", "3. Learning-rate sensitivity, all optimizers",
            "4. Robustness", "5. Hyperparameter importances", "6. Learning curves of the best configurations",
            "7. Effective learning rates of the best runs"]
IMAGES = 2 + 1 + 1 + 1 + 1 + 2 + 1  # per optimizer; momentum's lr x momentum; lr axis; importances; curves;
# two heatmaps; final distributions (no bound schedules: adabound completed nothing)


def run_seed(optimizer: str, params: dict, seed: int, tmp: Path):
    overrides = [f"optimizer={optimizer}", *(f"optimizer.{k}={v}" for k, v in params.items()),
                 f"trainer.max_epochs={EPOCHS}", "checkpoint.enabled=false", f"seed={seed}",
                 f"logger.experiment={EXPERIMENT}", "logger.eff_lr_every_n_steps=5", f"checkpoint.dir={tmp}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return train(compose(config_name="train", overrides=overrides))


def epoch_values(client: MlflowClient, run_id: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, "val_loss"), key=lambda m: m.step)]


def trained_trial(client, optimizer, params, tmp):
    """Trains every seed like the study driver and returns the trial it records."""
    results = [run_seed(optimizer, params, s, tmp / f"{optimizer}-{params['lr']}-{s}") for s in SEEDS]
    values, ids = [r.value for r in results], [r.run_id for r in results]
    intermediate = {i * EPOCHS + epoch: v for i, r in enumerate(results)
                    for epoch, v in enumerate(epoch_values(client, r.run_id))}
    return create_trial(params={"optimizer": optimizer, **params},
                        distributions={k: DISTS[k] for k in ["optimizer", *params]}, value=float(np.mean(values)),
                        user_attrs={"seed_values": values, "mlflow_run_ids": ids, "mlflow_run_id": ids[0]},
                        intermediate_values=intermediate)


@pytest.fixture(scope="module")
def study(tmp_path_factory, mlflow_uri):
    tmp = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: the autouse fixture is per test
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        mp.chdir(tmp)
        client = MlflowClient(mlflow_uri)
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp / "journal.log")))
        study = optuna.create_study(study_name="report-test", storage=storage, direction="minimize")
        for attr, value in dict(objective="val_loss", direction="minimize", optimizers=OPTIMIZERS, seeds=SEEDS,
                                mlflow_experiment=EXPERIMENT, tracking_uri=mlflow_uri).items():
            study.set_user_attr(attr, value)
        for optimizer, params in CONFIGS:
            study.add_trial(trained_trial(client, optimizer, params, tmp))
        study.add_trial(create_trial(state=TrialState.PRUNED, params={"optimizer": "adam", "lr": 1e-4},
                                     distributions={k: DISTS[k] for k in ["optimizer", "lr"]}))
        study.add_trial(create_trial(state=TrialState.FAIL, params={"optimizer": "adabound", "lr": 1e-3,
                                                                     "final_lr": 0.1},
                                     distributions={k: DISTS[k] for k in ["optimizer", "lr", "final_lr"]},
                                     user_attrs={"fail_reason": "training diverged: loss is nan at step 7"}))
        study.add_trial(create_trial(params={"optimizer": "adam", "lr": 5e-2},  # better than all, but surplus
                                     distributions={k: DISTS[k] for k in ["optimizer", "lr"]}, value=-1.0,
                                     user_attrs={"seed_values": [-1.0, -1.0], "surplus": True}))
        experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
        parent = client.create_run(experiment, run_name="study report-test").info.run_id
        study.set_user_attr("mlflow_parent_run_id", parent)
    return study


@pytest.fixture(scope="module")
def report(study, tmp_path_factory):
    return write(study, tmp_path_factory.mktemp("report"))


class Tables(HTMLParser):
    """The text of every cell of every table with an id, and the headings and images of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.headings, self.images, self._table, self._cell, self._heading = {}, [], 0, None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id"):
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ""
        elif tag == "h2":
            self._heading = ""
        elif tag == "img":
            self.images += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None:
            self._table[-1].append(self._cell.strip())
            self._cell = None
        elif tag == "h2":
            self.headings.append(self._heading.strip())
            self._heading = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._heading is not None:
            self._heading += data

    def frame(self, table_id: str) -> pd.DataFrame:
        header, *rows = self.tables[table_id]
        return pd.DataFrame(rows, columns=header)


def agree(page: pd.DataFrame, csv: pd.DataFrame):
    """Every cell of the page's table equals the CSV's value to the page's 5 significant digits."""
    assert list(page.columns) == list(csv.columns) and len(page) == len(csv)
    for column in csv:
        for shown, value in zip(page[column], csv[column]):
            if isinstance(value, (float, np.floating)) and math.isnan(value):
                assert shown == "—"
            elif isinstance(value, (float, np.floating)):
                assert float(shown) == pytest.approx(value, rel=1e-4, abs=1e-12), (column, shown, value)
            else:
                assert shown == str(value), (column, shown, value)


# --- the page and its tables ---------------------------------------------------------------------------------------

def test_header_counts_best_trial_and_failures(study, report):
    page = Tables(report.read_text())
    assert page.headings == HEADINGS
    states = dict(page.frame("states").values.tolist())
    shown = [states[k] for k in ("COMPLETE", "PRUNED", "FAIL", "surplus (ignored)", "total")]
    assert shown == ["6", "1", "1", "1", "9"]  # the surplus trial is complete, but counted apart
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE and not t.user_attrs.get("surplus")]
    best = min(completed, key=lambda t: t.value)  # not the surplus trial's -1
    text = report.read_text()
    assert f"<dt>trial</dt><dd>{best.number}</dd>" in text
    assert all(run_id in text for run_id in best.user_attrs["mlflow_run_ids"])
    assert dict(page.frame("best-params").values.tolist())["optimizer"] == best.params["optimizer"]
    assert "training diverged: loss is nan at step 7" in text
    assert "adabound diverged at lr 0.001 (marked x on the top edge)" in text  # on the sensitivity figure too
    assert "val_loss (minimize)" in text and "report-test" in text


def test_csvs_exist_and_trials_follow_the_study(study, report):
    out = report.parent
    names = {"trials.csv", "seed_values.csv", "configurations.csv", "lr_sensitivity.csv", "robustness.csv",
             "importances.csv", "learning_curves.csv", "eff_lr_final.csv"}
    assert names <= {p.name for p in out.iterdir()}
    seeds = pd.read_csv(out / "seed_values.csv")
    assert len(seeds) == len(CONFIGS) * len(SEEDS)  # pruned, failed and surplus trials left out
    configs = pd.read_csv(out / "configurations.csv")
    for trial in study.trials:
        if trial.state == TrialState.COMPLETE and not trial.user_attrs.get("surplus"):
            row = configs[configs["trials"] == f"[{trial.number}]"].iloc[0]
            assert row["mean"] == pytest.approx(trial.value)
            assert (row["min"], row["max"]) == pytest.approx(sorted(trial.user_attrs["seed_values"]))


def test_robustness_csv_agrees_with_the_page_and_the_study(study, report):
    csv = pd.read_csv(report.parent / "robustness.csv")
    page = Tables(report.read_text()).frame("robustness-table")  # a column per optimizer
    agree(page.set_index("quantity").T.rename_axis("optimizer").reset_index(), csv)
    assert list(csv["optimizer"]) == OPTIMIZERS
    for optimizer in ["adam", "momentum"]:
        values = [t.value for t in study.trials if t.state == TrialState.COMPLETE
                  and t.params["optimizer"] == optimizer and not t.user_attrs.get("surplus")]
        row = csv.set_index("optimizer").loc[optimizer]
        assert row["best"] == pytest.approx(min(values))
        assert row["expected_best_k1"] == pytest.approx(np.mean(values))
        assert row["expected_best_k8"] < row["expected_best_k1"]
        assert (row["configurations"], row["seeds"], row["seed_values"], row["lr_points"]) == (3, 2, 6, 3)
    adabound = csv.set_index("optimizer").loc["adabound"]
    assert adabound["fail_trials"] == 1 and adabound["configurations"] == 0 and math.isnan(adabound["best"])
    assert "adabound: no completed configuration (1 fail)" in report.read_text()


def test_importances_with_notes_where_they_cannot_be_computed(report):
    csv = pd.read_csv(report.parent / "importances.csv")
    agree(Tables(report.read_text()).frame("importances-table"), csv)
    by_scope = {scope: set(rows["param"]) for scope, rows in csv.groupby("scope")}
    assert by_scope == {"all optimizers": {"optimizer", "lr"}, "momentum": {"lr", "momentum"}}
    assert csv.groupby("scope")["importance"].sum().to_numpy() == pytest.approx([1, 1])
    text = report.read_text()
    assert "adam: only lr searched" in text and "adabound: no completed trials" in text


def test_learning_curves_are_the_mean_of_the_best_runs_in_mlflow(study, report, mlflow_uri):
    csv = pd.read_csv(report.parent / "learning_curves.csv")
    configs = pd.read_csv(report.parent / "configurations.csv")
    client = MlflowClient(mlflow_uri)
    for optimizer, rows in csv.groupby("optimizer"):
        best = configs[configs["optimizer"] == optimizer].sort_values("mean").iloc[0]
        runs = [epoch_values(client, r) for r in json.loads(best["run_ids"])]
        assert list(rows["step"]) == [23, 46]  # ceil(1437 / 64) steps per epoch
        assert rows["mean"].to_numpy() == pytest.approx(np.mean(runs, axis=0))
        assert rows["min"].to_numpy() == pytest.approx(np.min(runs, axis=0))
        assert rows["mean"].iloc[-1] == pytest.approx(best["mean"])  # the last epoch is the objective
    assert set(csv["optimizer"]) == {"adam", "momentum"}


def test_final_effective_lr_distributions(report):
    csv = pd.read_csv(report.parent / "eff_lr_final.csv")
    assert set(csv["optimizer"]) == {"adam", "momentum"}
    assert csv.groupby("optimizer")["fraction"].sum().to_numpy() == pytest.approx([1, 1])
    assert (csv["step"] == 46).all()  # recorded after step 1, every 5th and the last: the last of 46 steps


def test_page_is_self_contained(report):
    text = report.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", text, re.I)
    assert not re.search(r"url\(|@import|<script|<link", text, re.I)
    assert "http://" not in text and "https://" not in text  # nothing else either (the store is SQLite)
    assert text.count('src="data:image/png;base64,') == IMAGES


# --- in a browser ----------------------------------------------------------------------------------------------------

def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI"):  # .ci/run installs it: a missing browser there is a failure, not a skip
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    flags = ["--headless", "--disable-gpu", f"--user-data-dir={tmp / 'profile'}"]
    if os.geteuid() == 0:
        flags.append("--no-sandbox")  # Chromium refuses to run its sandbox as root
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def test_chromium_renders_the_page(report, tmp_path):
    shot = tmp_path / "page.png"
    res = chromium(f"--screenshot={shot}", "--window-size=1280,6000", report.as_uri(), tmp=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (6000, 1280, 3)
    assert (pixels.min(-1) < 240).mean() > 0.02  # not blank: text and figures
    colored = (pixels.max(-1) - pixels.min(-1)) > 60
    assert colored.sum() > 5000  # the figures' coloured lines, dots and bands were decoded and drawn


def test_chromium_dom_has_every_section_and_image(report, tmp_path):
    res = chromium("--dump-dom", report.as_uri(), tmp=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = Tables(res.stdout)
    assert dom.headings == HEADINGS
    assert dom.images == IMAGES
    assert "Uncaught" not in res.stderr


# --- missing pieces --------------------------------------------------------------------------------------------------

def copy(study: optuna.Study, trials=None, **attrs) -> optuna.Study:
    new = optuna.create_study(study_name="copy", direction=attrs.get("direction", "minimize"))
    for key, value in {**study.user_attrs, **attrs}.items():
        if value is not None:
            new.set_user_attr(key, value)
    new.add_trials(study.trials if trials is None else trials)
    return new


def test_without_tracking_uri_the_mlflow_sections_say_so(study, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    text = write(copy(study, tracking_uri=None), tmp_path).read_text()
    assert Tables(text).headings == HEADINGS
    assert text.count("no MLflow tracking URI") == 2
    assert (tmp_path / "robustness.csv").is_file() and (tmp_path / "learning_curves.csv").is_file()


def test_a_run_without_histograms_or_curves_is_a_note(study, tmp_path, mlflow_uri):
    client = MlflowClient(mlflow_uri)
    bare = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
    trials = []
    for t in study.trials:
        if t.params.get("optimizer") == "momentum" and t.state == TrialState.COMPLETE:
            t = create_trial(params=t.params, distributions=t.distributions, value=t.value,
                             user_attrs={**t.user_attrs, "mlflow_run_ids": [bare, "0" * 32]})
        trials.append(t)
    path = write(copy(study, trials), tmp_path)
    text = path.read_text()
    assert f"momentum: run {bare}: no readable eff_lr_histograms.npz" in text
    assert f"momentum: run {bare} has no val_loss history" in text
    assert f"momentum: run {'0' * 32}:" in text
    assert set(pd.read_csv(tmp_path / "eff_lr_final.csv")["optimizer"]) == {"adam"}
    assert Tables(text).images == IMAGES - 1  # no momentum heatmap; the curve and final figures keep adam


def test_a_maximized_objective(study, tmp_path, mlflow_uri):
    """The same runs as a study of val_acc, to maximize: best, region, curves and best trial all turn around."""
    client = MlflowClient(mlflow_uri)
    trials = []
    for t in study.trials:
        if t.state == TrialState.COMPLETE and not t.user_attrs.get("surplus"):
            acc = [client.get_run(r).data.metrics["val_acc"] for r in t.user_attrs["mlflow_run_ids"]]
            t = create_trial(params=t.params, distributions=t.distributions, value=float(np.mean(acc)),
                             user_attrs={**t.user_attrs, "seed_values": acc})
        trials.append(t)
    maximized = copy(study, trials, direction="maximize", objective="val_acc")
    text = write(maximized, tmp_path).read_text()
    assert "val_acc (maximize)" in text
    best = max((t for t in maximized.trials if t.state == TrialState.COMPLETE and not t.user_attrs.get("surplus")),
               key=lambda t: t.value)
    assert f"<dt>trial</dt><dd>{best.number}</dd>" in text
    robust = pd.read_csv(tmp_path / "robustness.csv").set_index("optimizer")
    curves = pd.read_csv(tmp_path / "learning_curves.csv")
    for optimizer in ["adam", "momentum"]:
        values = [t.value for t in maximized.trials if t.state == TrialState.COMPLETE
                  and t.params["optimizer"] == optimizer and not t.user_attrs.get("surplus")]
        assert robust.loc[optimizer, "best"] == pytest.approx(max(values))
        assert robust.loc[optimizer, "expected_best_k8"] > robust.loc[optimizer, "expected_best_k1"]
        assert curves[curves["optimizer"] == optimizer]["mean"].iloc[-1] == pytest.approx(max(values))


def test_an_empty_study(tmp_path):
    study = optuna.create_study(study_name="empty")
    text = write(study, tmp_path).read_text()
    page = Tables(text)
    assert page.headings == HEADINGS and page.images == 0
    assert "no completed trial" in text and "no MLflow tracking URI" in text
    assert pd.read_csv(tmp_path / "robustness.csv").empty


# --- robustness numbers on hand-made data ----------------------------------------------------------------------------

LRS = [1e-4, 1e-3, 1e-2, 1e-1]


@pytest.mark.parametrize("values, sign, width", [
    ([2.0, 1.0, 1.0, 2.0], 1, 0.05 + 1 + 0.05),  # threshold 1.05: 0.05 / 1 of each outer decade
    ([-2.0, -4.0, -4.0, -2.0], 1, 0.1 + 1 + 0.1),  # negative, minimize: threshold -3.8
    ([1.0, 2.0, 2.0, 1.0], -1, 0.1 + 1 + 0.1),  # maximize: threshold 1.9
    ([-3.0, -1.0, -1.0, -3.0], -1, 0.025 + 1 + 0.025),  # negative, maximize: threshold -1.05
    ([1.0, 2.0, 1.0, 3.0], 1, 0.05 + 0.05 + 0.05 / 2),  # two separate stretches add up
    ([5.0, 5.0, 5.0, 5.0], 1, 3.0),  # all equal: the whole range
    ([3.0, 2.0, 1.0, 0.0], 1, 0.0),  # best 0: ties only, a point
])
def test_width_within_five_percent(values, sign, width):
    region = good_region(LRS, values, sign)
    assert region["width_decades"] == pytest.approx(width)


def test_region_bounds_order_and_edges():
    region = good_region(LRS[::-1], [2.0, 1.0, 1.0, 2.0][::-1], 1)  # any order of lrs
    assert region["width_decades"] == pytest.approx(1.1)
    assert region["region_lr_low"] == pytest.approx(10 ** (-3.05))
    assert region["region_lr_high"] == pytest.approx(10 ** (-1.95))
    assert (region["lrs_within"], region["lr_points"], region["touches_edge"]) == (2, 4, False)
    assert good_region(LRS, [1.0, 1.5, 2.0, 3.0], 1)["touches_edge"]
    assert good_region([0.1, 0.3], [2.0, 1.0], 1)["region_lr_high"] == 0.3  # the grid's lr, not 10**log10(0.3)
    single = good_region([1e-3], [0.7], 1)
    assert (single["width_decades"], single["region_lr_low"], single["touches_edge"]) == (0.0, 1e-3, True)


@pytest.mark.parametrize("sign, expected", [(1, [2.5, 1.875, 1.3828125]), (-1, [2.5, 3.125, 3.6171875])])
def test_expected_best_of_k_known_values(sign, expected):
    # 1..4, k=2: min is 1, 2, 3, 4 with probability 7, 5, 3, 1 / 16; k=4: 175, 65, 15, 1 / 256
    assert [expected_best([4.0, 1.0, 3.0, 2.0], k, sign) for k in (1, 2, 4)] == pytest.approx(expected)


@pytest.mark.parametrize("sign", [1, -1])
def test_expected_best_of_k_equals_enumeration(sign):
    values = np.random.default_rng(0).normal(size=5).round(1)
    values[3] = values[1]  # a tie
    for k in (1, 2, 3):
        draws = [sign * min(sign * v for v in pick) for pick in itertools.product(values, repeat=k)]
        assert expected_best(values, k, sign) == pytest.approx(np.mean(draws))


@pytest.mark.parametrize("sign", [1, -1])
def test_lr_curve_takes_the_best_configuration_at_each_lr(sign):
    seeds = pd.DataFrame({"trial": [0, 0, 1, 1, 2, 2], "optimizer": "sgd", "config": ["a", "a", "b", "b", "c", "c"],
                          "value": [1.0, 3.0, 4.0, 4.0, 5.0, 7.0], "run_id": None,
                          "params_lr": [0.1, 0.1, 0.1, 0.1, 0.01, 0.01]})
    curve = lr_curve(configurations(seeds, sign), sign)
    assert list(curve["lr"]) == [0.01, 0.1]
    assert list(curve["mean"]) == [6.0, 2.0 if sign == 1 else 4.0]
    assert list(curve["min"]) == [5.0, 1.0 if sign == 1 else 4.0]


def test_a_non_grid_lr_curve_keeps_the_best_configuration_of_each_lr_bin():
    """TPE gives every trial its own lr: the line used to zig-zag through configurations that differ in their other
    hyperparameters (a spike to 1.51 from one final_lr=0.004 trial between two good ones)."""
    lrs = [0.0010, 0.0011, 0.0012, 0.010, 0.011]
    values = [0.50, 1.51, 0.48, 0.40, 0.90]  # 1.51: a bad final_lr beside good ones in the same quarter decade
    seeds = pd.DataFrame({"trial": range(5), "optimizer": "adabound", "config": list("abcde"), "value": values,
                          "run_id": None, "params_lr": lrs, "params_final_lr": [0.1, 0.004, 0.1, 0.1, 0.004]})
    configs = configurations(seeds, 1.0)
    assert list(lr_curve(configs, 1.0)["mean"]) == values  # per distinct lr: every trial, the spike included
    binned = lr_curve(configs, 1.0, binned=True)
    assert list(binned["lr"]) == [0.0012, 0.010] and list(binned["mean"]) == [0.48, 0.40]


def test_a_conditional_parameter_gets_importances_over_the_trials_that_have_it():
    """bound.rate exists only in trials with bound=exponential: it was left out of every scope."""
    from optstudy.dashboards.importance import importances
    from optstudy.dashboards.trials import Settings

    study = optuna.create_study()
    rng = np.random.default_rng(0)
    dists = {"optimizer": CategoricalDistribution(["adabound"]), "lr": FloatDistribution(1e-4, 1, log=True),
             "bound": CategoricalDistribution(["hyperbolic", "exponential"]),
             "bound.rate": FloatDistribution(1e-4, 1e-1, log=True), "bound.gamma": FloatDistribution(1e-4, 1e-1)}
    for i in range(24):
        kind = ["hyperbolic", "exponential"][i % 2]
        params = {"optimizer": "adabound", "lr": float(10 ** rng.uniform(-4, 0)), "bound": kind,
                  **({"bound.rate": float(10 ** rng.uniform(-4, -1))} if kind == "exponential" else
                     {"bound.gamma": float(rng.uniform(1e-4, 1e-1))})}
        value = 0.1 * abs(np.log10(params["lr"]) + 2) + 3 * abs(np.log10(params.get("bound.rate", 1e-2)) + 2)
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  value=float(value)))
    table, notes = importances(study, Settings("val_loss", "minimize", ["adabound"], [0]), ["adabound"])
    by_scope = {scope: dict(zip(rows["param"], rows["importance"])) for scope, rows in table.groupby("scope")}
    rate = by_scope["adabound, trials with bound.rate"]
    assert set(rate) == {"lr", "bound.rate"} and rate["bound.rate"] > rate["lr"]
    assert set(by_scope["adabound, trials with bound.gamma"]) == {"lr", "bound.gamma"}
    assert set(by_scope["adabound"]) == {"lr", "bound"}
    assert any("all optimizers, trials with bound.rate: the same trials as scope" in n for n in notes)
