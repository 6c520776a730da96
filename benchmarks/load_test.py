"""Reliability under load: workers on one PostgreSQL storage and one MLflow server, killed at random and restarted.

    python benchmarks/load_test.py [--workers 4] [--points 240] [--kill-every 6] [--timeout 1500] [--population 1]

Starts a throwaway PostgreSQL (scripts/postgres.sh; or uses $OPTSTUDY_TEST_POSTGRES_URL and
$OPTSTUDY_TEST_POSTGRES_MLFLOW_URL) and an ``mlflow server`` on it, then runs a grid study of ``--points`` short
trials (sgd and adam over a fine lr grid, 5 training batches each) with ``--workers`` worker processes. Every
``--kill-every`` seconds (on average) one worker, picked at random, is killed (SIGKILL, or SIGTERM one time in three)
and a new one started, until every grid point is done. Reported:

- trials completed, and grid points lost (never completed: must be 0);
- duplicates: grid points completed more than once (must be 0);
- stale trials retried: killed trials failed by heartbeats or on SIGTERM and queued again, and how many of those
  retries completed;
- MLflow against Optuna: FINISHED child runs on the server vs COMPLETE trials (runs of trials killed between the end
  of their run and Optuna's tell are counted apart), and every completed trial's run found.

Exit status 1 when a must-be-zero count is not zero or the records disagree.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

import _cli  # benchmarks/_cli.py (a script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def postgres(work: Path) -> tuple[str, str, Path | None]:
    if os.environ.get("OPTSTUDY_TEST_POSTGRES_URL"):
        return os.environ["OPTSTUDY_TEST_POSTGRES_URL"], os.environ["OPTSTUDY_TEST_POSTGRES_MLFLOW_URL"], None
    pgdir = Path(tempfile.mkdtemp(prefix="optstudy-load-pg-", dir="/tmp"))
    run = lambda *a: subprocess.run([str(ROOT / "scripts" / "postgres.sh"), *a], check=True, capture_output=True,
                                    text=True).stdout.strip().splitlines()[-1]
    run("start", str(pgdir))
    return run("url", str(pgdir), "optuna"), run("url", str(pgdir), "mlflow"), pgdir


def mlflow_server(backend: str, work: Path):
    from _services import mlflow_server as start

    return start(backend, work / "artifacts", workers=2)


def study_file(work: Path, points: int) -> tuple[Path, str]:
    name = f"load{int(time.time())}"
    per = points // 2
    lrs = [float(f"{x:.6g}") for x in np.geomspace(1e-4, 1.0, per)]
    spec = {"name": name, "sampler": {"name": "grid"}, "pruner": {"name": "none"}, "seeds": [0],
            # divergence.factor=null: adam at lr 1 blows up past 100x its first loss, a FAIL by design, and this
            # test counts the grid points that complete (what kills must not lose), so only NaN/inf counts here
            "overrides": ["trainer.max_epochs=1", "trainer.limit_train_batches=5", "trainer.limit_val_batches=2",
                          "logger.eff_lr_every_n_steps=5", "divergence.factor=null"],
            "optimizers": {"sgd": {"lr": lrs}, "adam": {"lr": lrs}}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, name


def start_worker(path: Path, storage: str, env: dict, log, population: int = 1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "optstudy.cli", "study", "run", str(path), "--storage", storage,
                             "--heartbeat", "2", "--population", str(population)], cwd=path.parent, env=env,
                            stdout=log, stderr=log, start_new_session=True)


def study_ready(name: str, storage: str) -> bool:
    import optuna

    from optstudy.study.storage import open_storage

    try:
        return bool(optuna.load_study(study_name=name, storage=open_storage(storage)[0]).user_attrs.get("ready"))
    except KeyError:
        return False


def grid_done(name: str, storage: str, points: int) -> bool:
    import optuna

    from optstudy.study.storage import open_storage

    try:
        trials = optuna.load_study(study_name=name, storage=open_storage(storage)[0]).get_trials(deepcopy=False)
    except KeyError:
        return False
    complete = {(t.params["optimizer"], t.params["lr"]) for t in trials if t.state.name == "COMPLETE"}
    return len(complete) >= points


def main() -> int:
    parser = _cli.parser(__doc__, "until every grid point is done (240 short trials over 4 workers with restarts; "
                                  "not timed here at the defaults), at most --timeout")
    parser.add_argument("--workers", type=int, default=4, help="worker processes kept running")
    parser.add_argument("--points", type=int, default=240, help="grid points (trials) of the study")
    parser.add_argument("--kill-every", type=float, default=6.0, help="mean seconds between kills")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds before giving up")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--population", type=int, default=1,
                        help="trials each worker asks at once and trains as a population (a kill hits all of them)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="optstudy-load-"))
    storage, mlflow_db, pgdir = postgres(work)
    server, url = mlflow_server(mlflow_db, work)
    path, name = study_file(work, args.points)
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "OMP_NUM_THREADS": "1"}
    log = open(work / "workers.log", "w")
    kills = collections.Counter()
    start = time.monotonic()
    workers = [start_worker(path, storage, env, log, args.population) for _ in range(args.workers)]
    try:
        # kills start once the study is set up: a first worker killed while it creates the study leaves it unready
        # (joining workers then say so and stop), a start-up matter outside what this test measures
        while time.monotonic() - start < args.timeout and not study_ready(name, storage):
            time.sleep(0.5)
        while time.monotonic() - start < args.timeout and not grid_done(name, storage, args.points):
            time.sleep(rng.expovariate(1 / args.kill_every))
            victim = rng.randrange(len(workers))
            sig = signal.SIGTERM if rng.random() < 1 / 3 else signal.SIGKILL
            if workers[victim].poll() is None:
                os.killpg(workers[victim].pid, sig)  # the whole group: a worker and anything it started
                kills[sig.name] += 1
            workers[victim].wait()
            workers[victim] = start_worker(path, storage, env, log, args.population)
        for w in workers:  # let the last trials finish: workers stop on their own once the grid is done
            w.wait(timeout=300)
        elapsed = time.monotonic() - start
        return report(name, storage, url, args.points, kills, elapsed, work)
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
        server.terminate()
        if pgdir is not None:
            subprocess.run([str(ROOT / "scripts" / "postgres.sh"), "stop", str(pgdir)], capture_output=True)


def report(name, storage, url, points, kills, elapsed, work) -> int:
    import optuna
    from mlflow import MlflowClient

    from optstudy.study.storage import open_storage

    trials = optuna.load_study(study_name=name, storage=open_storage(storage)[0]).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    per_point = collections.Counter((t.params["optimizer"], t.params["lr"]) for t in complete)
    lost = points - len(per_point)
    duplicates = sum(n - 1 for n in per_point.values())
    failed = [t for t in trials if t.state.name == "FAIL"]
    retried_of = {t.system_attrs.get("failed_trial") for t in trials} | {t.user_attrs.get("retry_of") for t in trials}
    retried = [t for t in failed if t.number in retried_of]
    retries_done = [t for t in complete if t.system_attrs.get("failed_trial") is not None
                    or t.user_attrs.get("retry_of") is not None]
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`optuna.trial` != ''",
                              max_results=50_000)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    run_ids = {r.info.run_id for r in finished}
    missing = [t.number for t in complete if t.user_attrs.get("mlflow_run_id") not in run_ids]
    # a worker killed after its run ended but before Optuna heard of it leaves a finished run of a failed trial
    done_numbers = {str(t.number) for t in complete}
    orphans = [r for r in finished if r.data.tags.get("optuna.trial") not in done_numbers]
    states = collections.Counter(t.state.name for t in trials)
    print(f"# {elapsed:.0f} s, {points} grid points, kills: {dict(kills)}; trials by state: {dict(states)}; "
          f"work dir {work}")
    rows = [("trials completed", len(complete)), ("grid points lost (must be 0)", lost),
            ("duplicates (must be 0)", duplicates), ("stale/stopped trials retried", len(retried)),
            ("  of which the retry completed", len(retries_done)),
            ("MLflow FINISHED child runs", len(finished)),
            ("  of trials that did not complete (killed before tell)", len(orphans)),
            ("completed trials without their run (must be 0)", len(missing))]
    for label, value in rows:
        print(f"{label:56s} {value:6d}")
    agree = len(finished) - len(orphans) == len(complete) and not missing
    print(f"{'MLflow and Optuna agree':56s} {'yes' if agree else 'NO':>6s}")
    return 0 if lost == 0 and duplicates == 0 and agree else 1


if __name__ == "__main__":
    sys.exit(main())
