"""The ``optstudy`` command.

    optstudy train [--config-dir DIR] [OVERRIDE ...]      # = python train.py [OVERRIDE ...], from any directory
    optstudy study run STUDY [--config-dir DIR] [--storage URL] [--n-trials N] [OVERRIDE ...]
    optstudy study status NAME [--storage URL]
    optstudy study report NAME [--storage URL] [--out DIR]
    optstudy dashboard [--storage URL] [--tracking-uri URI] [--host 127.0.0.1] [--port 8050]

STUDY: a study file, or the name of a shipped one (``lr_sensitivity``). ``--config-dir DIR``: the user's config groups
beside ours (``DIR/model/mynet.yaml`` is ``model=mynet``). Storage URLs: see ``optstudy.study.storage`` (default:
``$OPTSTUDY_STORAGE`` or ``optuna.journal`` here).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import optstudy
from optstudy import config
from optstudy.errors import OptstudyError


def main(argv: list[str] | None = None) -> int:
    """The ``optstudy`` command; returns its exit code (2: a mistake in the input, printed as one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _cwd_importable()
    if argv[:1] == ["train"]:  # everything after it is Hydra's (overrides, --help, -m, --cfg job)
        return train_command(argv[1:])
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
    p.add_argument("--version", action="version", version=f"optstudy {optstudy.__version__}")
    groups = p.add_subparsers(dest="group", required=True)
    # listed for --help only: main() hands "train" and what follows to train_command
    groups.add_parser("train", add_help=False, help="train once: optstudy train [--config-dir DIR] [OVERRIDE ...] "
                                                    "(= python train.py; --help lists the config groups)")
    study = groups.add_parser("study", help="run, inspect and report Optuna studies").add_subparsers(
        dest="command", required=True)
    storage = dict(help="Optuna storage: a journal file path (default $OPTSTUDY_STORAGE or ./optuna.journal) or "
                        "a database URL such as postgresql+psycopg://user:pw@host/db")

    run = study.add_parser("run", help="a worker: run trials until the study's budget is spent (resumes)")
    run.add_argument("file", help="a study file, or a shipped study's name (lr_sensitivity, bounds, ...)")
    run.add_argument("--config-dir", help="a directory of your own config groups (model/mynet.yaml: model=mynet), "
                                          "searched before optstudy's for every trial")
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

    dash = groups.add_parser("dashboard", help="the live sensitivity dashboard: every study of a storage, its report's "
                                               "views updating as trials land (optstudy.dashboards.app)")
    dash.add_argument("--storage", **storage)
    dash.add_argument("--tracking-uri", help="MLflow tracking URI to read runs from (default: each study's own)")
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    dash.add_argument("--port", type=int, default=8050, help="port (default 8050)")
    dash.add_argument("--mlflow-url", help="the MLflow UI as your browser reaches it, for links to runs (default: the "
                                           "tracking URI when it is a server, else http://127.0.0.1:5000)")
    dash.add_argument("--optuna-dashboard-url", help="optuna-dashboard as your browser reaches it, for links to "
                                                     "trials (default http://127.0.0.1:8080)")
    dash.set_defaults(func=cmd_dashboard)
    return p


def cmd_run(args) -> int:
    from optstudy.study import spec
    from optstudy.study.worker import Worker

    if args.population is not None and args.population < 1:
        raise OptstudyError(f"--population must be an integer > 0, got {args.population}")
    config_dir = args.config_dir and str(config.user_dir(args.config_dir))  # checked before a storage is opened
    worker = Worker(spec.load(args.file), args.storage, tuple(args.overrides), args.heartbeat, args.threads,
                    args.population, config_dir=config_dir)
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


def cmd_dashboard(args) -> int:
    from optstudy.errors import ConfigError

    if not 0 < args.port < 65536:  # checked before the imports and the storage: a typo answers at once
        raise ConfigError(f"--port: must be an integer in 1..65535, got {args.port}")
    from optstudy.dashboards.app import serve

    serve(args.storage, args.tracking_uri, args.host, args.port, args.mlflow_url, args.optuna_dashboard_url)
    return 0


# --- optstudy train, python train.py -----------------------------------------------------------------------------
def train_command(argv: list[str]) -> int:
    """``optstudy train [--config-dir DIR] [OVERRIDE ...]``, which ``python train.py`` runs too: the whole config
    checked first (a mistake: one line, exit 2, about 2 s, nothing recorded), then Hydra's run (its run directory
    under ./outputs, --help, -m, --cfg) of one training or a population. Returns the exit code."""
    config_dir, args = split_config_dir(argv)
    _cwd_importable()
    try:
        if config_dir is not None:  # it exists and shadows none of ours; absolute
            config_dir = str(config.trees(config_dir)[-1])
        if not any(arg.startswith("-") for arg in args):  # Hydra's own flags (--help, -m, ...) go to Hydra as is
            config.validate(config.compose(args, config_dir), args)
    except OptstudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    _run_hydra(args, config_dir)
    return 0


def split_config_dir(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--config-dir DIR`` (``--config-dir=DIR``, Hydra's ``-cd DIR``) anywhere in ``argv``, and the rest."""
    rest, config_dir, it = [], None, iter(argv)
    for arg in it:
        if arg in ("--config-dir", "-cd"):
            config_dir = next(it, None)
            if config_dir is None:
                raise SystemExit("error: --config-dir needs a directory")
        elif arg.startswith("--config-dir="):
            config_dir = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return config_dir, rest


def _cwd_importable() -> None:
    """The user's own modules (a model's ``_target_``) import from the current directory, as with ``python -m``: the
    ``optstudy`` script's own directory is sys.path[0] instead."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _run_hydra(args: list[str], config_dir: str | None) -> None:
    """Hydra's ``@hydra.main`` run on ``args`` (not ``sys.argv``: Lightning's DDP re-runs ``sys.argv`` as it is),
    on our configs and the user's directory behind them, as ``config.compose`` searches them (Hydra's own
    ``--config-dir`` here, so that ``--help`` lists the user's groups too)."""
    from hydra import version
    from hydra._internal.utils import _run_hydra as run
    from hydra._internal.utils import get_args_parser

    version.setbase("1.3")
    named = any(a.startswith("hydra.job.name=") for a in args)  # DDP's ranks name their own
    hydra_parser = get_args_parser()
    # ours first (a user's trailing --info takes an optional value); intermixed: the overrides on both sides of
    # Hydra's flags (--cfg job, -m) are all collected
    parsed = hydra_parser.parse_intermixed_args([*(["--config-dir", config_dir] if config_dir else []),
                                                 *([] if named else ["hydra.job.name=train"]), *args])
    run(args=parsed, args_parser=hydra_parser, task_function=_train_job, config_path=f"pkg://{config.OURS}",
        config_name="train")


def _train_job(cfg) -> float:
    """One Hydra job: a population when ``population.*`` is set, else one run; exit 2 for a mistake in the input, 3
    for a run that diverged (every member, for a population)."""
    from optstudy.population import members

    try:
        if members.active(cfg):  # population.*: K members trained at once
            from optstudy.population.run import report, train_population

            result = train_population(cfg)
            report(result, cfg)
            return result.value
        from optstudy.train import train, write_result

        result = train(cfg)
    except OptstudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    if cfg.get("result_file"):  # a study that started this process reads the outcome here
        write_result(result, cfg.result_file)
    return result.value


if __name__ == "__main__":
    sys.exit(main())
