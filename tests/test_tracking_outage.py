"""A real ``mlflow server`` that goes away during a run: training goes on, metrics wait and are delivered when it is
back; one that stays away past ``logger.outage_wait`` fails the run cleanly with every metric kept in a file."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from optstudy.tracking import TrackingUnavailable
from optstudy.train import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _services import mlflow_server  # noqa: E402  (the benchmarks' helper: starts it and waits for /health)

STEPS = 23  # digits MLP: updates per epoch


def cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=["trainer.log_every_n_steps=1", *overrides])


class Outage(pl.Callback):
    """Stops the server after epoch ``stop`` and starts it again, on the same port, after epoch ``back``."""

    def __init__(self, server, backend, artifacts, stop: int, back: int | None):
        self.server, self.backend, self.artifacts, self.stop, self.back = server, backend, artifacts, stop, back
        self.port = None

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == self.stop:
            self.server.terminate()
            self.server.wait()
        elif trainer.current_epoch == self.stop + 1:
            # hand what is buffered to the sender while the server is away: it must not hold training up
            start = time.monotonic()
            trainer.logger.flush()
            self.flush_seconds = time.monotonic() - start
        if trainer.current_epoch == self.back:
            self.server, _ = mlflow_server(self.backend, self.artifacts, port=self.port)


@pytest.fixture
def server(tmp_path):
    backend, artifacts = f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts"
    proc, url = mlflow_server(backend, artifacts)
    yield proc, url, backend, artifacts
    proc.terminate()


def test_metrics_logged_while_the_server_is_away_arrive_when_it_is_back(server, tmp_path):
    proc, url, backend, artifacts = server
    outage = Outage(proc, backend, artifacts, stop=0, back=2)
    outage.port = int(url.rsplit(":", 1)[1])
    res = train(cfg("trainer.max_epochs=4", f"logger.tracking_uri={url}", f"checkpoint.dir={tmp_path / 'run'}"),
                callbacks=[outage])
    try:
        client = MlflowClient(url)
        run = client.get_run(res.run_id)
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(res.run_id, "train_loss"))
        assert steps == list(range(1, 4 * STEPS + 1))  # epochs 2 and 3 were logged while it was away
        assert "eff_lr_heatmap.png" in {a.path for a in client.list_artifacts(res.run_id)}
        assert outage.flush_seconds < 1  # the sender retried in the background
    finally:
        outage.server.terminate()


def test_a_server_away_past_outage_wait_fails_the_run_and_keeps_every_metric(server, tmp_path):
    proc, url, backend, artifacts = server
    with pytest.raises(TrackingUnavailable, match=r"did not answer for 2 s.*undelivered metric values are kept in"):
        train(cfg("trainer.max_epochs=3", f"logger.tracking_uri={url}", "logger.outage_wait=2",
                  f"checkpoint.dir={tmp_path / 'run'}"), callbacks=[Outage(proc, backend, artifacts, 0, None)])
    kept = [json.loads(line) for line in (tmp_path / "run" / "undelivered_metrics.jsonl").read_text().splitlines()]
    steps = {m["step"] for m in kept if m["key"] == "train_loss"}
    assert set(range(2 * STEPS + 1, 3 * STEPS + 1)) <= steps  # the epochs after it went away, at least
    assert TrackingUnavailable.exit_code == 4


def test_a_study_trial_whose_server_stays_away_is_failed_with_its_reason_and_queued_again(server, tmp_path):
    import subprocess

    import optuna
    import yaml
    from optuna.trial import TrialState

    from optstudy.study.storage import open_storage

    proc, url, _, _ = server
    path, storage = tmp_path / "away.yaml", str(tmp_path / "away.journal")
    path.write_text(yaml.safe_dump({
        "name": "away", "n_trials": 1, "seeds": [0], "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"}, "overrides": ["trainer.max_epochs=60", "logger.outage_wait=1"],
        "optimizers": {"adam": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}}}))
    worker = subprocess.Popen([sys.executable, "-m", "optstudy.cli", "study", "run", str(path), "--storage", storage],
                              cwd=tmp_path, env={**__import__("os").environ, "MLFLOW_TRACKING_URI": url},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def trials():
        try:
            return optuna.load_study(study_name="away", storage=open_storage(storage)[0]).get_trials()
        except KeyError:
            return []

    deadline = time.monotonic() + 120
    while not any(t.state == TrialState.RUNNING for t in trials()):
        assert time.monotonic() < deadline and worker.poll() is None, worker.communicate()
        time.sleep(0.2)
    time.sleep(2.5)  # into its training (60 epochs, ~4 s)
    proc.terminate()
    proc.wait()
    out, err = worker.communicate(timeout=300)
    first, retry, again = trials()
    assert first.state == TrialState.FAIL, (out, err)
    assert first.user_attrs["fail_reason"].startswith("TrackingUnavailable: the tracking server did not answer")
    assert "undelivered_metrics.jsonl" in first.user_attrs["fail_reason"]
    # queued again; its retry found the server still away before training and was queued again too, and the worker
    # stopped with the start-up error (every next trial would fail the same way); nothing is lost
    assert retry.user_attrs["retry_of"] == first.number and retry.state == TrialState.FAIL
    assert again.user_attrs["retry_of"] == retry.number and again.state == TrialState.WAITING
    assert worker.returncode == 2 and f"no MLflow tracking server answers at {url}" in err
