"""Trials per hour of a study on this machine, with 1 and 2 workers, and what a trial's time is spent on.

    python benchmarks/study_throughput.py [--study studies/lr_sensitivity.yaml] [--seconds 180] [--workers 1 2]
                                          [-- OVERRIDE ...]

For each worker count: a fresh journal file and MLflow SQLite store in a temporary directory, that many
``optstudy study run`` processes for ``--seconds``, then they are stopped. Reported per worker count:

- trials completed in the window and trials per hour (a trial = one configuration x every seed of the study);
- the worker's start-up (process start, imports, study set-up: launch to its first trial);
- per trial, median seconds: the whole trial, its training epochs (``train_seconds``), and the rest (composing the
  config, building the model and data, creating MLflow runs, logging, artifacts and the heatmap).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _cli  # benchmarks/_cli.py (a script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def measure(study: Path, workers: int, seconds: float, extra: list[str]) -> dict:
    import optuna

    from optstudy.study import spec
    from optstudy.study.storage import open_storage

    work = Path(tempfile.mkdtemp(prefix=f"optstudy-tph{workers}-"))
    storage = str(work / "study.journal")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    launched = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "optstudy.cli", "study", "run", str(study.resolve()),
                               "--storage", storage, *extra], cwd=work, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(workers)]
    time.sleep(seconds)
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
    name = spec.load(study).name
    trials = optuna.load_study(study_name=name, storage=open_storage(storage)[0]).get_trials(deepcopy=False)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    starts = {}
    for t in trials:
        pid = (t.user_attrs.get("worker") or {}).get("pid")
        if pid and t.datetime_start:
            starts[pid] = min(starts.get(pid, t.datetime_start.timestamp()), t.datetime_start.timestamp())
    durations = [t.duration.total_seconds() for t in done]
    train = [t.user_attrs.get("train_seconds", 0.0) for t in done]
    return dict(workers=workers, trials=len(done), per_hour=len(done) / seconds * 3600,
                startup=statistics.median(s - launched for s in starts.values()) if starts else float("nan"),
                trial=statistics.median(durations) if done else float("nan"),
                train=statistics.median(train) if done else float("nan"),
                overhead=statistics.median(d - t for d, t in zip(durations, train)) if done else float("nan"))


def main() -> None:
    parser = _cli.parser(__doc__, "--seconds per worker count plus ~15 s of start-up each: about 7 minutes",
                         overrides=True)
    parser.add_argument("--study", type=Path, default=ROOT / "studies" / "lr_sensitivity.yaml", help="the study file")
    parser.add_argument("--seconds", type=float, default=180, help="how long each worker count runs")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure, in turn")
    args = parser.parse_args()
    extra = args.overrides
    print(f"# {args.study.name}, {args.seconds:.0f} s per worker count, overrides {extra or 'none'}; "
          f"{os.cpu_count()} CPUs", flush=True)
    print(f"{'workers':>7s} {'trials':>6s} {'trials/h':>9s} {'start s':>8s} {'trial s':>8s} {'train s':>8s} "
          f"{'other s':>8s}")
    for n in args.workers:
        r = measure(args.study, n, args.seconds, extra)
        print(f"{r['workers']:7d} {r['trials']:6d} {r['per_hour']:9.0f} {r['startup']:8.1f} {r['trial']:8.2f} "
              f"{r['train']:8.2f} {r['overhead']:8.2f}", flush=True)


if __name__ == "__main__":
    main()
