"""What MLflow tracking costs a training run: seconds per epoch with tracking off and on, in one run.

    python benchmarks/tracking_overhead.py [--epochs 6] [--repeats 3] [--no-server] [-- OVERRIDE ...]

Trains the default problem (digits MLP, 23 steps an epoch) with, in turn:

- ``off``: ``logger=none``;
- ``sqlite``: our batched asynchronous logger into a local SQLite store (the default);
- ``server``: the same logger against an ``mlflow server`` started here (SQLite backend), i.e. over HTTP;
- ``server-sync``: the naive way, one synchronous ``log_metric`` call per value, as the baseline batching beats.

Each configuration runs ``--repeats`` times, interleaved, with ``log_every_n_steps=1`` and effective-LR quantiles
every 5 steps (a heavier logging load than the defaults of 10 and 25). Reported: the median time per epoch after the
first (the first pays for warm-up), the ratio to ``off``, and the fixed cost per run outside the epochs (run creation,
params, artifacts and the heatmap).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _cli  # benchmarks/_cli.py (a script's folder is on sys.path)



def start_server(directory: Path):
    from _services import mlflow_server

    return mlflow_server(f"sqlite:///{directory / 'server.db'}", directory / "server-artifacts")


def naive_logger():
    """The baseline: every metric value is its own synchronous request."""
    from optstudy.tracking import MLflowLogger

    class SyncPerMetric(MLflowLogger):
        def log_metrics(self, metrics, step=None):
            for key, value in metrics.items():
                self.experiment.log_metric(self.run_id, key, float(value), step=step or 0)

    return SyncPerMetric


def one(mode: str, uris: dict, args, extra) -> tuple[float, float]:
    import optstudy.train as t
    from optstudy.study.worker import compose  # the library's: train.py's config as Hydra composes it

    overrides = [f"trainer.max_epochs={args.epochs}", "trainer.log_every_n_steps=1", "checkpoint.enabled=false",
                 *extra]
    if mode == "off":
        overrides.append("logger=none")
    else:
        overrides.append("logger.eff_lr_every_n_steps=5")
        os.environ["MLFLOW_TRACKING_URI"] = uris["server" if mode.startswith("server") else "sqlite"]
    original = t.MLflowLogger
    if mode == "server-sync":
        t.MLflowLogger = naive_logger()
    try:
        start = time.perf_counter()
        res = t.train(compose(overrides))
        total = time.perf_counter() - start
    finally:
        t.MLflowLogger = original
    per_epoch = statistics.median(res.epoch_seconds[1:])
    return per_epoch, total - sum(res.epoch_seconds)


def main() -> None:
    parser = _cli.parser(__doc__, "about 1 minute (62 s here at the defaults)", overrides=True)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, interleaved; medians reported")
    parser.add_argument("--no-server", action="store_true", help="skip the modes that need an mlflow server")
    args = parser.parse_args()
    extra = args.overrides
    work = Path(tempfile.mkdtemp(prefix="optstudy-bench-"))
    os.chdir(work)
    modes = ["off", "sqlite"]
    uris = {"sqlite": f"sqlite:///{work / 'local.db'}"}
    server = None
    if not args.no_server:
        server, uris["server"] = start_server(work)
        modes += ["server", "server-sync"]
    import torch

    print(f"# {args.epochs} epochs x {args.repeats} repeats per mode, torch threads {torch.get_num_threads()}, "
          f"log every step, eff-LR every 5 steps; workdir {work}", flush=True)
    results = {m: [] for m in modes}
    try:
        one("sqlite", uris, argparse.Namespace(epochs=2), extra)  # creates the store's tables: not measured
        for _ in range(args.repeats):
            for mode in modes:
                results[mode].append(one(mode, uris, args, extra))
    finally:
        if server is not None:
            server.terminate()
    base = statistics.median(e for e, _ in results["off"])
    print(f"{'mode':12s} {'s/epoch':>9s} {'x off':>7s} {'fixed s/run':>12s}")
    for mode in modes:
        epoch = statistics.median(e for e, _ in results[mode])
        fixed = statistics.median(f for _, f in results[mode])
        print(f"{mode:12s} {epoch:9.4f} {epoch / base:7.2f} {fixed:12.2f}")


if __name__ == "__main__":
    main()
