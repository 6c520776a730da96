"""optstudy inside a user's own Lightning code: the example project's scripts run for real, with Lightning's own
MLFlowLogger on the session's SQLite store; OptunaPruning in a real journal-file study; ``optim.build`` from
``configure_optimizers`` under a Lightning scheduler config; EffectiveLR with optstudy's own logger."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import pytorch_lightning as pl
import torch
from mlflow import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from optstudy import ConfigError, optim
from optstudy.callbacks import EffectiveLR
from optstudy.lrlog import QUANTILES
from optstudy.tracking import MLflowLogger

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_project"
N_PARAMS = 64 * 64 + 64 + 64 * 10 + 10  # Net's MLP: every element has one effective lr per record
STEPS_PER_EPOCH = 23  # 1437 training digits in batches of 64


@pytest.fixture
def example(monkeypatch):
    """The example's modules importable as the user's scripts import them (``from mymodel import ...``)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    torch.set_num_threads(1)  # a tiny model on a shared 2-core machine (as the scripts do)
    import mymodel
    import search

    return mymodel, search


def run_script(name: str, *args: str, cwd: Path) -> str:
    """Runs an example script as a user would (``python <script> ...``) from ``cwd``; returns its stdout."""
    out = subprocess.run([sys.executable, str(EXAMPLE / name), *args], cwd=cwd, capture_output=True, text=True,
                         check=False, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]  # its traceback, not CalledProcessError's command line
    return out.stdout


def runs_of(client: MlflowClient, experiment: str) -> list:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def artifact_names(client: MlflowClient, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


def test_train_example_logs_eff_lr_to_lightnings_mlflow_logger(tmp_path, mlflow_uri):
    project = tmp_path / "project"
    project.mkdir()
    out = run_script("train.py", "--epochs", "2", "--every", "5", "--tracking-uri", mlflow_uri, cwd=project)
    assert not list(project.iterdir())  # no ./mlruns, checkpoints or histograms left where it ran
    run_id = re.search(r"MLflow run (\w+):", out).group(1)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["optimizer"] == "adabound"
    # the same metric names as optstudy's own runs, AdaBound's clipped fractions included
    names = {f"eff_lr/g0/{q}" for q in [*QUANTILES, "min", "max", "clipped_lower", "clipped_upper"]}
    assert names <= set(run.data.metrics)
    last = 2 * STEPS_PER_EPOCH
    steps = [m.step for m in client.get_metric_history(run_id, "eff_lr/g0/p50")]
    assert steps == [1, *range(5, last, 5), last]  # after the first step, every 5, and the last
    assert artifact_names(client, run_id) == {"eff_lr_histograms.npz", "eff_lr_heatmap.png"}
    arrays = np.load(client.download_artifacts(run_id, "eff_lr_histograms.npz", str(tmp_path)))
    assert arrays["steps"].tolist() == steps
    assert arrays["counts"].shape == (len(steps), 1, 160) and (arrays["counts"].sum(2) == N_PARAMS).all()
    png = Path(client.download_artifacts(run_id, "eff_lr_heatmap.png", str(tmp_path))).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_example_runs_a_study_in_a_journal_file(tmp_path, mlflow_uri):
    journal = tmp_path / "search.journal"
    out = run_script("search.py", "--trials", "3", "--epochs", "2", "--journal", str(journal),
                     "--tracking-uri", mlflow_uri, cwd=tmp_path)
    study = optuna.load_study(study_name="mymodel", storage=JournalStorage(JournalFileBackend(str(journal))))
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3
    assert f"best: val_loss = {study.best_value:.4f} with {study.best_params}" in out
    # each trial an MLflow run with its effective learning rates
    runs = runs_of(MlflowClient(mlflow_uri), "mymodel-search")
    assert len(runs) == 3 and all("eff_lr/g0/p50" in r.data.metrics for r in runs)


def test_optuna_pruning_stops_a_hopeless_trial(example, tmp_path, mlflow_uri):
    _, search = example
    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(tmp_path / "prune.journal"))),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    study.enqueue_trial({"optimizer": "adam", "lr": 1e-2})  # learns within an epoch
    study.enqueue_trial({"optimizer": "momentum", "lr": 1e-5})  # barely moves: worse than the median at epoch 0
    study.optimize(lambda t: search.objective(t, epochs=3, tracking_uri=mlflow_uri), n_trials=2)
    good, bad = study.trials
    assert good.state == TrialState.COMPLETE and sorted(good.intermediate_values) == [0, 1, 2]
    assert bad.state == TrialState.PRUNED and list(bad.intermediate_values) == [0]  # stopped after its 1st epoch
    assert bad.intermediate_values[0] > good.intermediate_values[0]
    # the pruned trial's run is KILLED and still has the histograms of the steps it took (EffectiveLR.on_exception)
    client = MlflowClient(mlflow_uri)
    run = next(r for r in runs_of(client, "mymodel-search") if r.info.run_name.startswith(f"trial {bad.number}: "
                                                                                          "momentum lr=1e-05"))
    assert run.info.status == "KILLED"
    assert "eff_lr_histograms.npz" in artifact_names(client, run.info.run_id)


def test_optim_build_in_configure_optimizers_follows_a_lightning_scheduler(example, tmp_path, mlflow_uri):
    mymodel, _ = example
    # AdaBound whose lr halves every epoch (ExponentialLR, interval "epoch"), logged through optstudy's own logger
    model = mymodel.Net("adabound", 1e-2, {"final_lr": 0.1}, decay_per_epoch=0.5)
    logger = MLflowLogger(mlflow_uri, "library-scheduled", "adabound halving")
    recorder = EffectiveLR(every=10, dirpath=tmp_path / "eff_lr")
    trainer = pl.Trainer(max_epochs=3, logger=logger, callbacks=[recorder], log_every_n_steps=10,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, mymodel.DigitsData())
    logger.close()
    opt = trainer.optimizers[0]
    group = opt.param_groups[0]
    assert isinstance(opt, optim.AdaBound) and group["lr"] == pytest.approx(1e-2 * 0.5 ** 3)
    assert group["eta0"] == 1e-2  # the scheduler scaled lr only; AdaBound's bounds scale with lr / eta0
    last = 3 * STEPS_PER_EPOCH
    scaled = optim.build("adabound", [torch.zeros(1, requires_grad=True)], lr=1e-2 * 0.5 ** 3, final_lr=0.1 * 0.5 ** 3)
    assert recorder.bounds[-1][0] == pytest.approx(list(scaled.bounds(scaled.param_groups[0], last)))
    # the files stay in dirpath and are in the run too
    assert [p.name for p in recorder.saved] == ["eff_lr_histograms.npz", "eff_lr_heatmap.png"]
    assert all(p.is_file() and p.parent == tmp_path / "eff_lr" for p in recorder.saved)
    client = MlflowClient(mlflow_uri)
    assert artifact_names(client, logger.run_id) == {"eff_lr_histograms.npz", "eff_lr_heatmap.png"}
    assert client.get_metric_history(logger.run_id, "eff_lr/g0/p50")[-1].step == last


class TorchSGDNet(pl.LightningModule):
    """A module whose optimizer is torch's own: it has no per-element effective lr."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def training_step(self, batch, batch_idx):
        return (self.w - batch[0]).pow(2).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 3)), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_effective_lr_refuses_an_optimizer_from_outside_the_core():
    trainer = pl.Trainer(max_epochs=1, logger=False, callbacks=[EffectiveLR()], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match=r"optstudy\.optim.*got SGD"):
        trainer.fit(TorchSGDNet())
