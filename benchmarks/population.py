"""Trials per hour of whole studies (Optuna and MLflow included), one trial at a time against populations of K trials.

    python benchmarks/population.py [--problems digits_mlp mnist1d_mlp digits_cnn] [--studies a b]
                                    [--ks 1 4 16 64 144] [--epochs 5] [--seconds 240] [--quick]

Studies, both grids: (a) Adam at 36 log-spaced learning rates from 1e-5 to 1e2 (DeepOBS's), 4 seeds each: 36
trials of 4 runs; (b) the twelve optimizers at 12 learning rates from 1e-4 to 1, 1 seed: 144 trials. Each cell is
one ``optstudy study run --population K`` worker on a fresh journal file and MLflow SQLite store, stopped after
``--seconds`` if the study is not done by then (K = 1 on the slower problems). A population holds K trials x the
study's seeds; the grouping by optimizer caps study (b)'s populations at 12 trials.

Printed per cell: trials done, wall seconds, trials and runs per hour, the worker's start-up (launch to its first
trial), the seconds in training and validation epochs (the trials' ``train_seconds``), the rest (building models and
data, Optuna, MLflow runs and logging, artifacts), and the worker's peak RSS. The last line is
``population study speedup: <x>x trials/hour at K=<k> (digits mlp)``, study (a)'s best K against K = 1.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _cli  # benchmarks/_cli.py (a script's folder is on sys.path)
import numpy as np
import yaml

from population_train import PROBLEMS  # the same three problems as the training benchmark

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["sgd", "momentum", "nesterov", "adagrad", "adadelta", "rmsprop", "adam", "adamax", "nadam", "amsgrad",
         "adabound", "amsbound"]


def study(which: str, problem: str, epochs: int) -> dict:
    grid = lambda lo, hi, n: [float(f"{x:.3g}") for x in np.logspace(lo, hi, n)]  # noqa: E731
    optimizers = ({"adam": {"lr": grid(-5, 2, 36)}} if which == "a" else {n: {"lr": grid(-4, 0, 12)} for n in NAMES})
    return {"name": f"bench_{which}_{problem}", "objective": "val_loss", "seeds": [0, 1, 2, 3] if which == "a" else [0],
            "sampler": {"name": "grid"}, "pruner": {"name": "none"},
            "overrides": [*PROBLEMS[problem], f"trainer.max_epochs={epochs}"], "optimizers": optimizers}


def cell(which: str, problem: str, k: int, epochs: int, seconds: float) -> dict:
    import optuna

    from optstudy.study.storage import open_storage

    work = Path(tempfile.mkdtemp(prefix=f"optstudy-pop{k}-"))
    spec = study(which, problem, epochs)
    path = work / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "optstudy.cli", "study", "run", str(path), "--storage",
                             str(work / "study.journal"), "--population", str(k)], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    wall = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far, MiB
    trials = optuna.load_study(study_name=spec["name"], storage=open_storage(str(work / "study.journal"))[0]).trials
    done = [t for t in trials if t.state.name in ("COMPLETE", "FAIL") and "worker stopped" not in
            t.user_attrs.get("fail_reason", "")]
    first = min((t.datetime_start.timestamp() for t in trials if t.datetime_start), default=start)
    train = sum(t.user_attrs.get("train_seconds", 0.0) for t in done)
    return dict(trials=len(done), runs=len(done) * len(spec["seeds"]), wall=wall, startup=first - start, train=train,
                peak=peak)


def ceiling(per_run: list[tuple[int, float, float]]) -> str:
    """Why the speedup stops where it does: one run's cost one at a time against the two parts of a member's cost
    at the largest K, the epochs (the arithmetic of its steps in the stack) and the rest (its MLflow run, Optuna,
    set-up), each a bound that no larger K removes."""
    (_, e1, o1), (k, e, o) = per_run[0], per_run[-1]
    return (f"ceiling at K={k}: one at a time {e1 + o1:.0f} ms a run; in the population its epochs take {e:.0f} ms "
            f"(alone they would allow {(e1 + o1) / max(e, 1e-9):.1f}x) and the rest {o:.0f} ms (alone "
            f"{(e1 + o1) / max(o, 1e-9):.1f}x)")


def floor(problem: str, k: int, epochs: int) -> tuple[float, float]:
    """The arithmetic of a population's training, nothing else: the same stacked model (``stack`` of the problem's
    K member models) and the same optimizer stepping on random batches of the problem's shape, no Lightning, data
    loading, validation or tracking, on the threads the population takes. Returns (ms a step, ms a run over
    ``epochs`` epochs): what no K can go below."""
    import torch
    import torch.nn.functional as F

    from optstudy import data, models, optim
    from optstudy.config import compose
    from optstudy.population.stack import stack
    from optstudy.train import set_threads

    cfg = compose(["optimizer=adam", *PROBLEMS[problem], "logger=none"])
    ds = data.load(cfg.data, 0)
    model = stack([models.build(cfg.model, ds) for _ in range(k)])
    torch.set_num_threads(os.cpu_count() or 1)  # a lone worker's share, then set_threads' rule, as train_population
    set_threads(cfg, model)
    opt = optim.build("adam", model.parameters(), members=k, lr=[1e-3] * k)
    batch = int(cfg.data.batch_size)
    x0, _ = ds.train[0]
    x = torch.randn(k, batch, *torch.as_tensor(x0).shape)
    y = torch.randint(0, ds.n_classes, (k, batch))
    steps_per_epoch = -(-len(ds.train) // batch)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").backward()
        opt.step()

    for _ in range(3):
        step()
    n, start = 20, time.perf_counter()
    for _ in range(n):
        step()
    ms = 1e3 * (time.perf_counter() - start) / n
    return ms, ms * steps_per_epoch * epochs / k


def import_seconds() -> float:
    """What a worker's imports take (torch, Lightning with torch._dynamo and torchmetrics, MLflow, Optuna), timed
    in a fresh interpreter: the part of its start-up no change to optstudy's own start-up removes."""
    code = ("import time; t = time.perf_counter(); import optstudy.study.worker, optstudy.population.run; "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def startup_bound(cells: list[tuple[int, dict]], imports: float) -> str:
    """The worker's start-up (imports, the study's parent run: launch to its first trial) is paid once per worker
    whatever K is, so it caps the speed-up of a study this short; a long study (thousands of trials) pays it once."""
    (_, one), (k, big) = cells[0], cells[-1]
    rate = lambda r: r["trials"] / max(r["wall"] - r["startup"], 1e-9)  # noqa: E731
    cap = (big["trials"] / max(big["startup"], 1e-9)) / max(one["trials"] / one["wall"], 1e-9)
    return (f"start-up: {big['startup']:.1f} s a worker before its first trial, whatever K (K=1: "
            f"{one['startup']:.1f} s), {imports:.1f} s of it imports; with nothing else to do, this study's {big['trials']} trials would run "
            f"{cap:.1f}x as fast as K=1; left out (a long study), K={k} runs {rate(big) / max(rate(one), 1e-9):.1f}x "
            f"the trials per hour")


def main() -> None:
    p = _cli.parser(__doc__, "about 45 minutes at the defaults; --quick under 4 minutes")
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS), help="models and data")
    p.add_argument("--studies", nargs="+", default=["a", "b"], choices=["a", "b"],
                   help="(a) Adam x 36 lrs x 4 seeds; (b) 12 optimizers x 12 lrs")
    p.add_argument("--ks", nargs="+", type=int, default=[1, 4, 16, 64, 144], help="trials per population")
    p.add_argument("--epochs", type=int, default=5, help="epochs per run")
    p.add_argument("--seconds", type=float, default=240.0, help="a cell's longest run before the worker is stopped")
    p.add_argument("--quick", action="store_true",
                   help="study (a) on the digits MLP, K = 1, 16, 64, each cell whole (up to 150 s): a cell cut short "
                        "would count its start-up against fewer trials")
    args = p.parse_args()
    if args.quick:
        args.problems, args.studies, args.ks, args.seconds = ["digits_mlp"], ["a"], [1, 16, 64], 150.0
    print(f"{args.epochs} epochs per run; one worker; Optuna journal file, MLflow SQLite; cells stop after "
          f"{args.seconds:.0f} s", flush=True)
    print(f"{'problem':<12} {'study':>5} {'K':>4} {'trials':>6} {'wall s':>7} {'trials/h':>9} {'runs/h':>8} "
          f"{'start-up s':>10} {'epochs s':>9} {'other s':>8} {'peak MiB':>9}", flush=True)
    # a new SQLite store is a copy of an empty one (optstudy._store_template): made here, so that no cell pays for it
    from optstudy import _store_template

    _store_template.seed(f"sqlite:///{Path(tempfile.mkdtemp(prefix='optstudy-pop-')) / 'warm.db'}")
    imports = import_seconds()
    best = {}
    for problem in args.problems:
        for which in args.studies:
            base, per_run, cells = None, [], []
            for k in args.ks:
                r = cell(which, problem, k, args.epochs, args.seconds)
                cells.append((k, r))
                rate = r["trials"] / r["wall"] * 3600
                base = base or rate
                runs = max(r["runs"], 1)
                per_run.append((k, 1e3 * r["train"] / runs, 1e3 * (r["wall"] - r["startup"] - r["train"]) / runs))
                if problem == "digits_mlp" and which == "a" and k > 1:
                    best = max(best, {"x": rate / base, "k": k}, key=lambda b: b.get("x", 0))
                other = r["wall"] - r["startup"] - r["train"]
                print(f"{problem:<12} {which:>5} {k:>4} {r['trials']:>6} {r['wall']:>7.1f} {rate:>9.0f} "
                      f"{r['runs'] / r['wall'] * 3600:>8.0f} {r['startup']:>10.1f} {r['train']:>9.1f} {other:>8.1f} "
                      f"{r['peak']:>9.0f}", flush=True)
            # where a run's time goes (the worker's start-up left out): what a larger K cannot take away
            print("  per run, ms of epochs + rest: " + ", ".join(f"K={k}: {e:.0f} + {o:.0f}" for k, e, o in per_run),
                  flush=True)
            print("  " + ceiling(per_run), flush=True)
            print("  " + startup_bound(cells, imports), flush=True)
            k = args.ks[-1]
            step_ms, run_ms = floor(problem, k, args.epochs)
            one = per_run[0][1] + per_run[0][2]
            print(f"  arithmetic floor at K={k}: the stacked forward, backward and Adam step alone take {step_ms:.1f} "
                  f"ms a step on this machine, {run_ms:.0f} ms a run over {args.epochs} epochs; one at a time a run "
                  f"takes {one:.0f} ms: no population can run more than {one / max(run_ms, 1e-9):.1f}x the runs per "
                  "hour here", flush=True)
    if best:
        print(f"population study speedup: {best['x']:.1f}x trials/hour at K={best['k']} (digits mlp)")


if __name__ == "__main__":
    main()
