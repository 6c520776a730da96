"""Optuna on a real PostgreSQL server (the postgres_db_url fixture): worker processes sharing one study, and the
heartbeat failing and retrying the trial of a worker killed mid-trial."""

from __future__ import annotations

import subprocess
import sys
import time

import optuna
import pytest
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

HEARTBEAT, GRACE = 1, 2  # seconds

# A worker: `python -c WORKER URL STUDY N_TRIALS SLEEP` runs N_TRIALS trials of a quadratic, each sleeping SLEEP s,
# printing "running <number>" as each starts.
WORKER = f"""
import sys, time, optuna
url, name, n_trials, sleep = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage = optuna.storages.RDBStorage(url, heartbeat_interval={HEARTBEAT}, grace_period={GRACE},
    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
def objective(trial):
    x = trial.suggest_float("x", -10, 10)
    print("running", trial.number, flush=True)
    time.sleep(sleep)
    return (x - 2) ** 2
optuna.load_study(study_name=name, storage=storage).optimize(objective, n_trials=n_trials)
"""


def storage(url: str) -> RDBStorage:
    return RDBStorage(url, heartbeat_interval=HEARTBEAT, grace_period=GRACE,
                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))


def worker(url: str, study: str, n_trials: int, sleep: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-W", "ignore", "-c", WORKER, url, study, str(n_trials), str(sleep)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_worker_processes_share_a_study(postgres_db_url):
    study = optuna.create_study(study_name="shared", storage=storage(postgres_db_url))
    n = 8
    procs = [worker(postgres_db_url, "shared", n, sleep=0.1) for _ in range(2)]
    outs = [p.communicate(timeout=90) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    numbers = [{int(line.split()[1]) for line in out.splitlines()} for out, _ in outs]

    trials = study.get_trials()
    assert len(trials) == 2 * n and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(2 * n))  # numbered without clashes across processes
    assert [len(s) for s in numbers] == [n, n] and numbers[0] | numbers[1] == set(range(2 * n))
    assert study.best_value == min((t.params["x"] - 2) ** 2 for t in trials)


def test_killed_worker_trial_is_failed_by_heartbeat_and_retried(postgres_db_url):
    study = optuna.create_study(study_name="hb", storage=storage(postgres_db_url))
    proc = worker(postgres_db_url, "hb", 1, sleep=600)
    try:
        if (line := proc.stdout.readline()).split() != ["running", "0"]:
            proc.kill()
            pytest.fail(f"worker printed {line!r}: {proc.communicate()[1]}")
        engine = sqlalchemy.create_engine(postgres_db_url)
        with engine.connect() as conn:  # a trial without a heartbeat is never stale: wait for the first one
            for _ in range(100):
                if conn.execute(sqlalchemy.text("SELECT count(*) FROM trial_heartbeats")).scalar():
                    break
                time.sleep(0.05)
        engine.dispose()
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup, the trial stays RUNNING
        proc.communicate()
    killed_at = time.monotonic()

    fail_stale_trials(study)
    if time.monotonic() - killed_at < 0.9:  # the last heartbeat is < 1 + 0.9 s old: within the grace period
        assert study.trials[0].state == TrialState.RUNNING
    while study.trials[0].state == TrialState.RUNNING and time.monotonic() - killed_at < 15:
        time.sleep(0.25)
        fail_stale_trials(study)  # after the grace period: FAIL, then the callback enqueues a retry

    failed, retry = study.trials
    assert failed.state == TrialState.FAIL
    assert retry.state == TrialState.WAITING and retry.params == failed.params
    assert retry.system_attrs["failed_trial"] == 0
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0
    assert RetryHeartbeatStaleTrialCallback.retry_history(retry) == [0]

    # the next optimize runs the retry, with the killed trial's parameters
    study.optimize(lambda t: (t.suggest_float("x", -10, 10) - 2) ** 2, n_trials=1)
    retry = study.trials[1]
    assert len(study.trials) == 2 and retry.state == TrialState.COMPLETE and retry.params == failed.params
