"""Parallel trainers against one process and synchronous DDP: throughput and final loss, per strategy and problem.

    python benchmarks/parallel.py [--problems digits_mlp sparse sparse_dense] [--processes 2] [--repeats 1]
                                  [--quick] [--figure docs/figures/parallel_throughput.png] [-- OVERRIDE ...]

Every cell is ``python train.py <problem> <strategy> logger=none checkpoint.enabled=false +result_file=...`` in a
process of its own, the strategies of one repeat interleaved so that a machine's load drifts over all of them alike.
Strategies, ``--processes N`` (default 2) each except the first:

- ``single``: ``trainer=cpu``, one process with Lightning (the baseline of ``x single``);
- ``loop``: ``trainer=hogwild trainer.processes=1``: one process running the parallel trainers' plain torch loop
  (equal to ``single`` at float64, without Lightning's per-step overhead: the baseline of ``x loop``, which
  separates the gain of N processes from the gain of a lighter loop);
- ``ddp``: ``trainer=ddp trainer.accelerator=cpu trainer.devices=N`` (Lightning's synchronous DDP, gloo);
- ``hogwild``, ``downpour`` (push_every = pull_every = 1; its server is one more process), ``easgd_sync``,
  ``easgd_async`` (alpha 0.25, tau 4; async: one more process).

Throughput: training examples / the run's epoch times (training and validation, as each run reports them) from
its second epoch on (the first holds one-time costs: gloo's connections, lazy initialisations); process start-up and
imports excluded, which ``wall`` (the whole command) includes. Final loss: ``val_loss`` of
the run's result (the shared, server or centre parameters). Every strategy sees the same examples per epoch (each of
N workers one shard), the same optimizer and learning rate. Printed per problem: a row per strategy with the medians
over repeats, and ratios against ``single`` of the same run. Problems:

- ``digits_mlp``: the 2-layer MLP on 8x8 digits, Adam 1e-3, batch 128 (tiny steps: overheads dominate);
- ``sparse``: sparse logistic regression (``data=sparse model=sparse_logreg``: 10 of 10,000 binary features per
  example), SGD lr 1, batch 32, sparse gradients: Hogwild!'s problem;
- ``sparse_dense``: the same with dense gradients (``model.sparse=false``): every step writes all 20,002 weights.

The last line: ``hogwild speedup on sparse: <x>x over the same loop in one process (final val_loss <a> vs <b>)``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _cli  # benchmarks/_cli.py (a script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = {
    "digits_mlp": ["experiment=digits_mlp", "trainer.max_epochs=20"],
    "sparse": ["data=sparse", "model=sparse_logreg", "optimizer=sgd", "optimizer.lr=1.0", "trainer.max_epochs=3"],
    "sparse_dense": ["data=sparse", "model=sparse_logreg", "model.sparse=false", "optimizer=sgd", "optimizer.lr=1.0",
                     "trainer.max_epochs=3"],
}
ASYNC = ["trainer.alpha=0.25", "trainer.tau=4"]


def strategies(n: int) -> dict[str, list[str]]:
    return {
        "single": ["trainer=cpu"],
        "loop": ["trainer=hogwild", "trainer.processes=1"],
        "ddp": ["trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={n}"],
        "hogwild": ["trainer=hogwild", f"trainer.processes={n}"],
        "downpour": ["trainer=downpour", f"trainer.processes={n}"],
        "easgd_sync": ["trainer=easgd", f"trainer.processes={n}", *ASYNC],
        "easgd_async": ["trainer=easgd", "trainer.variant=async", f"trainer.processes={n}", *ASYNC],
    }


def cell(overrides: list[str]) -> dict:
    """One run of train.py in its own process: its result file, plus the process's wall time."""
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as tmp:
        out = Path(tmp) / "result.json"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, "logger=none",
                               "checkpoint.enabled=false", f"checkpoint.dir={tmp}", f"+result_file={out}",
                               f"hydra.run.dir={tmp}/hydra"], cwd=tmp, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not out.is_file():
            return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]}
        result = json.loads(out.read_text())
    # from the second epoch on: the first holds one-time costs (gloo's connections, lazy initialisations), which
    # made the first epoch of a 1-second run take seconds on the 16-core test host
    steady = result["epoch_seconds"][1:] or result["epoch_seconds"]
    return {"seconds": sum(steady), "epochs": len(steady), "wall": wall, "val_loss": result["metrics"]["val_loss"],
            "val_acc": result["metrics"].get("val_acc"), "delay_mean": result["metrics"].get("delay/mean", 0.0),
            "delay_max": result["metrics"].get("delay/max", 0.0)}


def train_size(problem_overrides: list[str]) -> int:
    from optstudy import data
    from optstudy.config import compose

    cfg = compose(problem_overrides)
    return len(data.load(cfg.data, cfg.seed).train)


def main() -> None:
    p = _cli.parser(__doc__, "about 25 min on the 2-core VM under load, 6 min idle; --quick: a third", overrides=True)
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS), help="what to train")
    p.add_argument("--processes", type=int, default=2, help="processes (workers) of each parallel strategy")
    p.add_argument("--repeats", type=int, default=1, help="runs of every cell; the medians are printed")
    p.add_argument("--quick", action="store_true", help="two epochs per problem")
    p.add_argument("--figure", type=Path, help="draw throughput ratios and final losses here (a .png)")
    p.add_argument("--json", type=Path, help="write every cell's numbers here")
    args = p.parse_args()
    table = {}
    for problem in args.problems:
        overrides = PROBLEMS[problem]
        if args.quick:
            overrides = [*overrides, "trainer.max_epochs=2"]
        examples = train_size(overrides)  # per epoch
        runs = {name: [] for name in strategies(args.processes)}
        for _ in range(args.repeats):
            for name, strategy in strategies(args.processes).items():
                runs[name].append(cell([*overrides, *strategy, *args.overrides]))
        table[problem] = _summary(problem, runs, examples, args.processes)
        if args.json:  # after each problem: a run cut short keeps what it measured
            args.json.write_text(json.dumps(table, indent=1))
    if args.figure:
        _figure(table, args.figure, args.processes)
    if {"hogwild", "loop"} <= set(table.get("sparse", {})):
        h, s = table["sparse"]["hogwild"], table["sparse"]["loop"]
        print(f"hogwild speedup on sparse: {h['throughput'] / s['throughput']:.2f}x over the same loop in one process "
              f"(final val_loss {h['val_loss']:.4f} vs {s['val_loss']:.4f})")


def _summary(problem: str, runs: dict, examples: int, n: int) -> dict:
    print(f"\n{problem}: {examples} training examples per epoch, {n} processes; examples/s over epochs 2 and on")
    print(f"{'strategy':<12} {'examples/s':>11} {'x single':>9} {'x loop':>7} {'wall s':>8} {'val_loss':>9} "
          f"{'val_acc':>8} {'delay mean/max':>15}")
    out = {}
    for name, cells in runs.items():
        good = [c for c in cells if "error" not in c]
        if not good:
            print(f"{name:<12} failed: {cells[0]['error'][0][:90]}")
            continue
        out[name] = {"throughput": statistics.median(examples * c["epochs"] / c["seconds"] for c in good),
                     "wall": statistics.median(c["wall"] for c in good),
                     "val_loss": statistics.median(c["val_loss"] for c in good),
                     "val_acc": statistics.median(c["val_acc"] for c in good) if good[0]["val_acc"] is not None
                     else float("nan"), "delay_mean": statistics.median(c["delay_mean"] for c in good),
                     "delay_max": max(c["delay_max"] for c in good), "cells": cells}
    base = out.get("single", {}).get("throughput", float("nan"))
    loop = out.get("loop", {}).get("throughput", float("nan"))
    for name, row in out.items():
        print(f"{name:<12} {row['throughput']:>11.0f} {row['throughput'] / base:>8.2f}x "
              f"{row['throughput'] / loop:>6.2f}x {row['wall']:>8.1f} {row['val_loss']:>9.4f} {row['val_acc']:>8.3f} "
              f"{row['delay_mean']:>9.2f}/{row['delay_max']:<5.0f}", flush=True)
    return out


def _figure(table: dict, path: Path, n: int) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8), dpi=110)
    speed, loss = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    names = [s for s in strategies(n) if s != "loop"]
    width = 0.8 / len(table)
    for i, (problem, rows) in enumerate(table.items()):
        base = rows.get("loop", {}).get("throughput", float("nan"))
        xs = [j + i * width for j in range(len(names))]
        speed.bar(xs, [rows[s]["throughput"] / base if s in rows else 0 for s in names], width, label=problem)
        loss.bar(xs, [rows[s]["val_loss"] if s in rows else 0 for s in names], width, label=problem)
    for ax, label in ((speed, "throughput / the plain loop in one process"), (loss, "final val_loss")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=20, fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    speed.axhline(1, color="grey", lw=0.8, ls="--")
    speed.set_title(f"{n} processes: examples/s against one process")
    loss.set_title("final validation loss (same examples seen)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
