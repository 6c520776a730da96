"""Mistakes a new user makes, run as they would run them: ``python train.py ...`` in a subprocess.

Each config mistake must exit 2 with one ``error:`` line naming the key, the rule and the value, print no traceback,
answer before any data, model or tracking run (the MLflow store is never even created), and do so quickly. The time
bound here (``FAST``) is a guard against the old failure modes (config errors after 8-13 s of imports, a run created
and failed); it is generous for a loaded CI machine, not a benchmark.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = 10.0  # seconds; ~0.3 s for a misspelled key, ~2 s for an optimizer value (torch's import) on an idle machine

MISTAKES = [
    # (overrides, words the one-line message must contain)
    ("optimzer=sgd", ["optimzer", "not a config group or key", "did you mean 'optimizer'"]),
    ("+optimzer=sgd", ["optimzer", "not a config group or key", "did you mean 'optimizer'"]),
    ("optimizer=sgdd", ["optimizer=sgdd", "no such optimizer", "did you mean 'sgd'"]),
    ("optimizer.lrr=0.1", ["optimizer.lrr", "no key 'lrr'", "did you mean 'lr'"]),
    ("optimizer.lr=abc", ["lr", "must be a number >= 0", "'abc'"]),
    ("optimizer.lr=-1", ["lr", "must be a number >= 0", "-1"]),
    ("optimizer=momentum optimizer.momentum=1.5", ["momentum", "must be in [0, 1)", "1.5"]),
    ("optimizer.betas=[0.9,1.2]", ["betas[1]", "must be in [0, 1)", "1.2"]),
    ("seed=-1", ["seed", "integer in [0, 4294967295]", "-1"]),
    ("seed=abc", ["seed", "integer", "'abc'"]),
    ("data.batch_size=0", ["data.batch_size", "integer >= 1", "0"]),
    ("trainer.max_epochs=-2", ["trainer.max_epochs", "integer >= 0", "-2"]),
    ("logger.eff_lr_every_n_steps=0", ["logger.eff_lr_every_n_steps", "integer >= 1", "0"]),
    ("optimizer=adam bound=linear", ["bound=linear", "adam has no learning-rate bounds", "ignored"]),
    ("divergence.factor=0.5", ["divergence.factor", "number > 1", "0.5"]),
    ("optimizer=sgd optimizer.foreach=true", ["optimizer.foreach", "no key", "foreach"]),
    ("optimizer=sgd +optimizer.foreach=true", ["foreach", "cannot be True", "impl="]),
]


def train_py(overrides: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, float, Path]:
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides.split()], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    return proc, time.perf_counter() - start, db


@pytest.mark.parametrize("overrides,words", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_config_mistake_is_one_clear_line_fast_and_records_nothing(overrides, words, tmp_path):
    proc, seconds, db = train_py(overrides, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out and "+optimzer" not in out.replace(overrides, ""), out
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not db.exists(), "a config error created the MLflow store (and so possibly a run)"
    assert not (tmp_path / "outputs").exists()
    assert seconds < FAST, f"{seconds:.1f}s"


def test_a_finite_blow_up_is_a_divergence(tmp_path):
    """``lr=1e6`` used to end at loss 4.8e5 with exit 0 and a FINISHED run."""
    from mlflow import MlflowClient

    proc, _, db = train_py("optimizer=sgd optimizer.lr=1e6 trainer.max_epochs=2", tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "divergence.factor=100" in proc.stderr
    assert "INFO" not in proc.stdout + proc.stderr  # MLflow's lines on creating a new store
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    # the MLflow UI opens it on the runs table, as a training experiment, not on its GenAI overview
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert "over divergence.factor=100 times its first value" in run.data.tags["failure_reason"]


@pytest.fixture
def refusing_server():
    """A loopback HTTP server that answers every request with 503, as a tracking server behind a broken proxy."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_error(503)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.mark.parametrize("server", ["unreachable", "refusing"])
@pytest.mark.parametrize("command", ["train.py", "study run"])
def test_a_tracking_server_that_does_not_answer_is_a_clear_error_at_start(command, server, refusing_server,
                                                                           tmp_path):
    """It used to print urllib3 retries for 4 minutes (train.py) or nothing for 5 (a study), then a traceback."""
    uri = "http://127.0.0.1:1" if server == "unreachable" else refusing_server
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    args = [str(ROOT / "train.py"), "trainer.max_epochs=1"] if command == "train.py" else [
        "-m", "optstudy.cli", "study", "run", str(ROOT / "studies" / "bounds.yaml"), "--storage",
        str(tmp_path / "j.journal")]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"MLFLOW_TRACKING_URI: no MLflow tracking server answers at {uri}" in proc.stderr
    assert ("503" if server == "refusing" else "refused") in proc.stderr
    assert time.perf_counter() - start < 15


@pytest.mark.parametrize("override,words", [("optimzer=sgd", "did you mean 'optimizer'"),
                                             ("optimizer.lr=abc", "must be a number >= 0")])
def test_a_study_with_a_config_mistake_creates_no_study_trial_or_run(override, words, tmp_path):
    journal, db = tmp_path / "j.journal", tmp_path / "mlflow.db"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "optstudy.cli", "study", "run", str(ROOT / "studies" / "bounds.yaml"),
                           override, "--storage", str(journal)], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and words in proc.stderr, proc.stderr
    assert time.perf_counter() - start < FAST
    assert not db.exists()
    import optuna

    from optstudy.study.storage import open_storage

    assert not journal.exists() or optuna.get_all_study_summaries(open_storage(str(journal))[0]) == []
