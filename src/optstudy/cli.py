"""The ``optstudy`` command.

    optstudy study run STUDY.yaml [--storage URL] [--n-trials N] [OVERRIDE ...]
    optstudy study status NAME [--storage URL]
    optstudy study report NAME [--storage URL] [--out DIR]

Storage URLs: see ``optstudy.study.storage`` (default: ``$OPTSTUDY_STORAGE`` or ``optuna.journal`` here).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from optstudy.errors import OptstudyError


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, rest = p.parse_known_args(argv)
    # overrides may come after the options too (argparse stops collecting positionals at the first option)
    if rest and getattr(args, "overrides", None) is not None and not any(r.startswith("-") for r in rest):
        args.overrides += rest
    elif rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args) or 0
    except OptstudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted: completed trials are kept; run the same command to resume", file=sys.stderr)
        return 130


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optstudy", description="Studies of optimizers: Optuna searches over train.py.")
    groups = p.add_subparsers(dest="group", required=True)
    study = groups.add_parser("study", help="run, inspect and report Optuna studies").add_subparsers(
        dest="command", required=True)
    storage = dict(help="Optuna storage: a journal file path (default $OPTSTUDY_STORAGE or ./optuna.journal) or "
                        "a database URL such as postgresql+psycopg://user:pw@host/db")

    run = study.add_parser("run", help="a worker: run trials until the study's budget is spent (resumes)")
    run.add_argument("file", type=Path, help="the study file (studies/*.yaml)")
    run.add_argument("overrides", nargs="*", help="Hydra overrides for every trial, e.g. trainer.max_epochs=1")
    run.add_argument("--storage", **storage)
    run.add_argument("--n-trials", type=int, help="at most this many trials from this worker")
    run.add_argument("--population", type=int, help="ask up to this many trials at once and train them as "
                                                    "populations (default: the study file's population, else 1)")
    run.add_argument("--heartbeat", type=int, default=30, help="seconds between heartbeats (database storages)")
    run.add_argument("--threads", type=int, help="torch threads per trial (default: $OMP_NUM_THREADS, else this "
                                                 "machine's cores shared among the workers training on it)")
    run.set_defaults(func=cmd_run)

    status = study.add_parser("status", help="trials by state and the best so far")
    status.add_argument("name")
    status.add_argument("--storage", **storage)
    status.set_defaults(func=cmd_status)

    report = study.add_parser("report", help="the sensitivity report: HTML and CSV, also logged to MLflow")
    report.add_argument("name")
    report.add_argument("--storage", **storage)
    report.add_argument("--out", type=Path, help="output directory (default: reports/NAME)")
    report.set_defaults(func=cmd_report)
    return p


def cmd_run(args) -> int:
    from optstudy.study import spec
    from optstudy.study.worker import Worker

    if args.population is not None and args.population < 1:
        raise OptstudyError(f"--population must be an integer > 0, got {args.population}")
    worker = Worker(spec.load(args.file), args.storage, tuple(args.overrides), args.heartbeat, args.threads,
                    args.population)
    done = worker.run(args.n_trials)
    print(f"worker done: {done} trial(s) here; {summary(worker.study)}")
    return 0


def load(name: str, storage_url: str | None):
    import optuna

    from optstudy.study.storage import open_storage

    storage, url = open_storage(storage_url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise OptstudyError(f"no study {name!r} in {url}; studies there: {', '.join(names) or 'none'}") from None


def summary(study) -> str:
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name.lower() for t in trials)
    text = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    try:
        best = study.best_trial
    except ValueError:
        return f"{len(trials)} trials ({text}); no completed trial yet"
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    objective = study.user_attrs.get("objective", "value")
    return f"{len(trials)} trials ({text}); best #{best.number}: {objective}={best.value:.6g} with {params}"


def cmd_status(args) -> int:
    study = load(args.name, args.storage)
    print(f"study {study.study_name}: {summary(study)}")
    if study.user_attrs.get("budget"):
        overrides = study.user_attrs.get("overrides") or []
        print(f"budget: {study.user_attrs['budget']}" + (f" (overrides: {' '.join(overrides)})" if overrides else ""))
    return 0


def cmd_report(args) -> int:
    from optstudy.dashboards import report
    from optstudy.study.tracking import log_report

    study = load(args.name, args.storage)
    out = args.out or Path("reports") / args.name
    page = report.write(study, out)
    attrs = study.user_attrs
    if attrs.get("mlflow_parent_run_id"):
        log_report(attrs["tracking_uri"], attrs["mlflow_parent_run_id"], out)
    print(f"report: {page.resolve()} (also in MLflow run {attrs.get('mlflow_parent_run_id')}, under report/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
