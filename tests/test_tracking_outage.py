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
