"""K configurations trained as one population against the same K trained one after another, per problem and K.

    python benchmarks/population_train.py [--problems digits_mlp mnist1d_mlp digits_cnn] [--ks 1 4 16 64]
                                          [--epochs 5] [--quick] [-- OVERRIDE ...]

Each cell runs in a fresh process (so its peak memory is its own) and times, inside it, what ``train.py`` does for
the K members: building them (data, model, seeding), training and validating, ``logger=none`` and no checkpoints,
so that the numbers are about training. The K members are Adam at K log-spaced learning rates from 1e-4 to 1e-1
(seed 0). Printed: seconds one after another, seconds as a population, the speed-up, and each process's peak RSS
(and peak GPU memory on CUDA: ``-- trainer=gpu``). ``--sequential-sample N`` times N members one after another once
per problem and scales that to each K (marked ``~``): one by one, K = 1024 would take most of an hour.
The last line is ``population speedup: <x>x at K=<k> (digits mlp)``, the best K of the digits MLP.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import _cli  # benchmarks/_cli.py (a script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = {
    "digits_mlp": ["model=mlp", "data=digits"],
    "mnist1d_mlp": ["experiment=mnist1d_mlp"],
    "digits_cnn": ["model=cnn", "data=digits", "model.channels=[16,16,32]", "model.hidden=64"],
}


def lrs(k: int) -> list[float]:
    return [float(f"{10 ** (-4 + 3 * i / max(k - 1, 1)):.3g}") for i in range(k)]


def cell(problem: str, k: int, mode: str, epochs: int, extra: list[str]) -> dict:
    """One measurement in a child process: ``mode`` is ``population`` or ``sequential``."""
    args = [sys.executable, __file__, "--cell", problem, str(k), mode, str(epochs)]
    args += ["--", *extra] if extra else []
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{problem} K={k} {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cell(problem: str, k: int, mode: str, epochs: int, extra: list[str]) -> None:
    from optstudy.config import compose
    from optstudy.population.members import member_configs

    overrides = ["optimizer=adam", *PROBLEMS[problem], f"trainer.max_epochs={epochs}", "logger=none",
                 "checkpoint.enabled=false", "trainer.enable_progress_bar=false", *extra]
    cfg = compose([*overrides, f"population.lr=[{','.join(map(str, lrs(k)))}]"])
    import contextlib
    import io

    from optstudy.population.run import train_population
    from optstudy.train import train  # imports are the process's, not the members': not timed

    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        if mode == "population":
            train_population(cfg)
        else:
            for member in member_configs(cfg)[0]:
                try:
                    train(member)
                except Exception as exc:  # a diverged member costs what it cost, as in the population
                    if type(exc).__name__ != "Diverged":
                        raise
        seconds = time.perf_counter() - start
    import torch

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "gpu_mib": gpu}))


def main() -> None:
    p = _cli.parser(__doc__, "about 25 minutes at the defaults; --quick about 2 minutes", overrides=True)
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS), help="models and data")
    p.add_argument("--ks", nargs="+", type=int, default=[1, 4, 16, 64], help="population sizes")
    p.add_argument("--epochs", type=int, default=5, help="epochs per member")
    p.add_argument("--quick", action="store_true", help="the digits MLP only, K = 1, 16, 64, 3 epochs")
    p.add_argument("--sequential-sample", type=int, default=0,
                   help="time this many members one by one per problem and scale to K (0: all K, per K)")
    p.add_argument("--cell", nargs=4, metavar=("PROBLEM", "K", "MODE", "EPOCHS"), default=None,
                   help="internal: one measurement, in this process")
    args = p.parse_args()
    if args.cell:
        problem, k, mode, epochs = args.cell
        run_cell(problem, int(k), mode, int(epochs), args.overrides)
        return
    if args.quick:
        args.problems, args.ks, args.epochs = ["digits_mlp"], [1, 16, 64], 3
    print(f"Adam, K learning rates in [1e-4, 1e-1], {args.epochs} epochs each, logger=none; seconds to build and "
          f"train the K members; peak RSS of the process", flush=True)
    print(f"{'problem':<12} {'K':>5} {'one by one s':>13} {'population s':>13} {'speedup':>8} "
          f"{'peak MiB seq':>13} {'peak MiB pop':>13} {'GPU MiB pop':>12}", flush=True)
    best = {}
    for problem in args.problems:
        sample = None
        if args.sequential_sample:
            sample = cell(problem, args.sequential_sample, "sequential", args.epochs, args.overrides)
        for k in args.ks:
            if sample is None:
                seq, mark = cell(problem, k, "sequential", args.epochs, args.overrides), " "
            else:
                seq, mark = {**sample, "seconds": sample["seconds"] * k / args.sequential_sample}, "~"
            pop = cell(problem, k, "population", args.epochs, args.overrides)
            speedup = seq["seconds"] / pop["seconds"]
            best.setdefault(problem, (0.0, 0))
            best[problem] = max(best[problem], (speedup, k))
            print(f"{problem:<12} {k:>5} {mark}{seq['seconds']:>12.2f} {pop['seconds']:>13.2f} {speedup:>7.1f}x "
                  f"{seq['peak_mib']:>13.0f} {pop['peak_mib']:>13.0f} {pop['gpu_mib']:>12.0f}", flush=True)
    if "digits_mlp" in best:
        speedup, k = best["digits_mlp"]
        print(f"population speedup: {speedup:.1f}x at K={k} (digits mlp)")


if __name__ == "__main__":
    main()
