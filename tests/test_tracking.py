"""What a training run leaves in MLflow, read back through the MLflow client: params, tags, curves, effective-LR
metrics and artifacts; failed runs; resuming from a checkpoint; DDP with two CPU processes."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from optstudy.lit import Diverged
from optstudy.train import train

ROOT = Path(__file__).resolve().parents[1]
MLP_PARAMS = 64 * 64 + 64 + 64 * 10 + 10  # digits (64 pixels) -> 64 hidden -> 10 classes


def cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=["checkpoint.dir=.", *overrides])


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory, mlflow_uri):
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri  # module-scoped: the autouse fixture is per test
    os.chdir(tmp_path_factory.mktemp("adam"))
    # an experiment of its own: the name of a repeat in one experiment gets " (2)"
    return train(cfg("trainer.max_epochs=2", "logger.eff_lr_every_n_steps=5", "+tags.study=s1",
                     "logger.experiment=tracking-adam"))


def test_params_tags_name_and_status(adam_run, mlflow_uri):
    run = MlflowClient(mlflow_uri).get_run(adam_run.run_id)
    p = run.data.params
    assert (p["optimizer.name"], p["optimizer.lr"], p["optimizer.betas"]) == ("adam", "0.001", "[0.9, 0.999]")
    assert (p["model.name"], p["model.hidden"], p["data.name"], p["seed"]) == ("mlp", "[64]", "digits", "0")
    t = run.data.tags
    assert (t["optimizer"], t["model"], t["data"], t["study"]) == ("adam", "mlp", "digits", "s1")
    assert re.fullmatch(r"[0-9a-f]{40}", t["mlflow.source.git.commit"])
    assert run.info.run_name == "adam lr=0.001 seed=0"
    assert run.info.status == "FINISHED"


def test_curves(adam_run, mlflow_uri):
    client = MlflowClient(mlflow_uri)
    steps_per_epoch = math.ceil(1437 / 64)  # 1797 digits, 20% held out
    val = history(client, adam_run.run_id, "val_loss")
    assert [s for s, _ in val] == [steps_per_epoch, 2 * steps_per_epoch]
    assert val[-1][1] == pytest.approx(adam_run.value, rel=1e-6) and val[1][1] < val[0][1]
    acc = history(client, adam_run.run_id, "val_acc")
    assert len(acc) == 2 and 0.5 < acc[-1][1] <= 1
    train_loss = history(client, adam_run.run_id, "train_loss")
    # log_every_n_steps=10: the loss of the 10th batch, which update t = 10 steps on, at step 10
    assert [s for s, _ in train_loss] == list(range(10, 2 * steps_per_epoch + 1, 10))
    assert {v for _, v in history(client, adam_run.run_id, "lr/g0")} == {0.001}


def test_effective_lr_metrics_are_ordered_quantiles(adam_run, mlflow_uri):
    client = MlflowClient(mlflow_uri)
    names = ["min", "p1", "p5", "p25", "p50", "p75", "p95", "p99", "max"]
    curves = {n: history(client, adam_run.run_id, f"eff_lr/g0/{n}") for n in names}
    assert [s for s, _ in curves["p50"]] == [1, *range(5, 47, 5), 46]  # the first update, every 5, the last
    for i in range(len(curves["p50"])):
        values = [curves[n][i][1] for n in names]
        assert values == sorted(values)
    # Adam's rate for a pixel that is always 0 is lr / (eps (1 - β1^t)) ~ 1e5: the digits' blank border is the max
    t, top = curves["max"][-1]
    assert top == pytest.approx(math.log10(1e-3 / (1e-8 * (1 - 0.9 ** t))), abs=1e-5)


def test_histogram_artifacts(adam_run, mlflow_uri, tmp_path):
    client = MlflowClient(mlflow_uri)
    names = {a.path for a in client.list_artifacts(adam_run.run_id)}
    assert {"config.yaml", "eff_lr_histograms.npz", "eff_lr_heatmap.png"} <= names
    local = Path(client.download_artifacts(adam_run.run_id, "eff_lr_histograms.npz", str(tmp_path)))
    data = np.load(local)
    assert data["counts"].shape == (len(data["steps"]), 1, 160)
    assert (data["counts"].sum(-1) == MLP_PARAMS).all()  # every element of every parameter, every time
    median = client.get_metric_history(adam_run.run_id, "eff_lr/g0/p50")[-1].value
    cdf = np.cumsum(data["counts"][-1, 0]) / MLP_PARAMS
    assert data["edges"][np.searchsorted(cdf, 0.5)] <= median + 0.1  # the metric agrees with the histogram
    png = Path(client.download_artifacts(adam_run.run_id, "eff_lr_heatmap.png", str(tmp_path))).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    config = Path(client.download_artifacts(adam_run.run_id, "config.yaml", str(tmp_path))).read_text()
    assert "name: adam" in config and "lr: 0.001" in config


def test_adabound_logs_its_bounds_and_clipped_fractions(mlflow_uri):
    res = train(cfg("optimizer=adabound", "trainer.max_epochs=1", "logger.eff_lr_every_n_steps=5"))
    client = MlflowClient(mlflow_uri)
    lower, upper = (dict(history(client, res.run_id, f"bound/g0/{k}")) for k in ("lower", "upper"))
    for t in (10, 20):  # hyperbolic schedule, final_lr 0.1, gamma 1e-3; at step t: the bounds update t uses
        assert lower[t] == pytest.approx(0.1 * (1 - 1 / (1e-3 * t + 1)), rel=1e-6)
        assert upper[t] == pytest.approx(0.1 * (1 + 1 / (1e-3 * t)), rel=1e-6)
    top = dict(history(client, res.run_id, "eff_lr/g0/max"))  # of update t
    assert top[20] <= math.log10(upper[20]) + 1e-6  # no element's step exceeds the upper bound
    clipped = dict(history(client, res.run_id, "eff_lr/g0/clipped_upper"))
    assert 0 < clipped[20] < 1  # the blank pixels' huge Adam rates are cut


def test_diverged_run_is_failed_with_reason_and_keeps_its_curves(mlflow_uri):
    with pytest.raises(Diverged, match=r"loss is (inf|nan).*marked FAILED"):
        train(cfg("data=synthetic", "model=rosenbrock", "optimizer=sgd", "optimizer.lr=0.01",
                  "trainer.log_every_n_steps=1", "logger.experiment=diverging"))
    client = MlflowClient(mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("diverging").experiment_id])
    assert run.info.status == "FAILED"
    assert "training diverged" in run.data.tags["failure_reason"]
    assert len(history(client, run.info.run_id, "train_loss")) >= 3  # the finite steps before it blew up
    assert len(history(client, run.info.run_id, "x")) >= 3


def test_trajectory_of_a_surface(mlflow_uri, tmp_path):
    res = train(cfg("data=synthetic", "data.steps_per_epoch=20", "model=beale", "optimizer.lr=0.05",
                    "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "objective=x"))
    client = MlflowClient(mlflow_uri)
    xs = history(client, res.run_id, "x")
    assert [s for s, _ in xs] == list(range(21)) and xs[-1][1] == res.value  # the start and after every step
    table = Path(client.download_artifacts(res.run_id, "trajectory.csv", str(tmp_path))).read_text().splitlines()
    assert table[0] == "step,x,y" and table[1] == "0,1.0,1.5" and len(table) == 22  # start + 20 steps
    assert "trajectory.png" in {a.path for a in client.list_artifacts(res.run_id)}


def test_every_curve_is_labelled_with_the_update_it_belongs_to(mlflow_uri):
    """bound/g0/upper at step 9 used to belong to t = 10 while eff_lr at step 1 belonged to t = 1: the clipped
    effective lrs sat above the bound drawn at their step."""
    res = train(cfg("optimizer=adabound", "optimizer.lr=0.01", "trainer.max_epochs=1", "trainer.log_every_n_steps=1",
                    "logger.eff_lr_every_n_steps=5"))
    client = MlflowClient(mlflow_uri)
    upper = dict(history(client, res.run_id, "bound/g0/upper"))
    lower = dict(history(client, res.run_id, "bound/g0/lower"))
    assert min(upper) == 1 and upper[1] == pytest.approx(0.1 * (1 + 1 / 1e-3))  # hyperbolic, gamma 1e-3, t = 1
    assert min(dict(history(client, res.run_id, "train_loss"))) == 1
    for step, log_max in history(client, res.run_id, "eff_lr/g0/max"):
        assert 10**log_max <= upper[step] * (1 + 1e-6), step
    for step, log_min in history(client, res.run_id, "eff_lr/g0/min"):
        assert 10**log_min >= lower[step] * (1 - 1e-6), step


def test_the_eff_lr_record_ends_at_the_last_update_and_keeps_adabound_s_bounds(mlflow_uri, tmp_path):
    """A short run's last record was mid-training (step 25 of 46), and the heatmap had no bounds to compare with."""
    res = train(cfg("optimizer=adabound", "trainer.max_epochs=2"))  # 23 updates an epoch, records every 25
    client = MlflowClient(mlflow_uri)
    arrays = np.load(client.download_artifacts(res.run_id, "eff_lr_histograms.npz", str(tmp_path)))
    assert list(arrays["steps"]) == [1, 25, 46]
    assert arrays["bounds"].shape == (3, 1, 2)
    assert arrays["bounds"][0, 0, 1] == pytest.approx(0.1 * (1 + 1 / 1e-3))  # upper(1), hyperbolic, gamma 1e-3


def test_two_runs_of_one_command_get_names_told_apart(mlflow_uri, capsys):
    names = [train(cfg("trainer.max_epochs=1", "logger.experiment=twice")).run_id for _ in range(2)]
    client = MlflowClient(mlflow_uri)
    assert [client.get_run(r).info.run_name for r in names] == ["adam lr=0.001 seed=0", "adam lr=0.001 seed=0 (2)"]
    assert "'adam lr=0.001 seed=0 (2)' trained in" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["beale", "counterexample"])
def test_a_run_has_the_artifacts_the_readme_names(model, mlflow_uri):
    """The README once promised ``trajectory.png`` for every synthetic problem; the counterexample wrote none."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = readme[readme.index("- **artifacts**"):].split("\n- ")[0]
    named = set(re.findall(r"`([a-z_]+\.(?:yaml|npz|png|csv))`", line))
    res = train(cfg("data=synthetic", "data.steps_per_epoch=10", f"model={model}", "trainer.max_epochs=1",
                    "objective=x"))
    assert {a.path for a in MlflowClient(mlflow_uri).list_artifacts(res.run_id)} == named


def test_resume_continues_the_same_trajectory_and_run(mlflow_uri, tmp_path):
    straight = train(cfg("trainer.max_epochs=4", f"checkpoint.dir={tmp_path / 'a'}"))
    first = train(cfg("trainer.max_epochs=2", f"checkpoint.dir={tmp_path / 'b'}"))
    resumed = train(cfg("trainer.max_epochs=4", f"checkpoint.dir={tmp_path / 'c'}",
                        f"ckpt_path={tmp_path / 'b' / 'checkpoints' / 'last.ckpt'}"))
    assert resumed.value == straight.value  # bit-identical: same batches, same optimizer state
    assert resumed.run_id == first.run_id
    client = MlflowClient(mlflow_uri)
    assert len(history(client, resumed.run_id, "val_loss")) == 4
    assert client.get_run(resumed.run_id).info.status == "FINISHED"


def test_no_tracking(mlflow_uri):
    client = MlflowClient(mlflow_uri)
    before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    res = train(cfg("logger=none", "trainer.max_epochs=1"))
    assert res.run_id is None and math.isfinite(res.value)
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == before


def test_default_store_is_sqlite_in_the_working_directory(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    res = train(cfg("trainer.max_epochs=1", "logger.experiment=local"))
    assert res.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    artifacts = tmp_path / "mlartifacts" / "local" / res.run_id / "artifacts"
    assert (artifacts / "eff_lr_heatmap.png").is_file()
    out = capsys.readouterr().out
    assert f"run {res.run_id} 'adam lr=0.001 seed=0' trained in" in out
    assert f"open it with: mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in out
    # the runs table, not the GenAI overview MLflow 3.17's UI opens by default
    experiment_id = MlflowClient(res.tracking_uri).get_run(res.run_id).info.experiment_id
    assert f"then its page /#/experiments/{experiment_id}?workflowType=machine_learning" in out


@pytest.mark.slow
def test_ddp_two_cpu_processes_identical_params_rank0_logs_once(mlflow_uri, tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.max_epochs=2", "logger.experiment=ddp", f"checkpoint.dir={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])  # one run, not two
    assert history(client, run.info.run_id, "ddp/param_max_diff")[-1][1] == 0.0
    steps_per_epoch = math.ceil(math.ceil(1437 / 2) / 64)  # each rank sees half the data
    assert [s for s, _ in history(client, run.info.run_id, "val_loss")] == [steps_per_epoch, 2 * steps_per_epoch]
    assert res.stdout.count("trained in") == 1  # only rank 0 prints the summary
