"""The DeepOBS protocol's training on one device: ``studies/deepobs_protocol.yaml`` (12 optimizers x 36 lrs x 10 seeds
on the MNIST-1D MLP, 50 epochs) as twelve populations of 360 members in this process, without tracking, against a
one-at-a-time sample on the same device. On a GPU this is the study's training part (no Optuna, no MLflow).

    python benchmarks/deepobs_device.py [--epochs 50] [--optimizers sgd adam ...] [--sample 2] [-- OVERRIDES]

Prints each population's seconds and last epoch line, the total, and the one-at-a-time estimate for every run.
Without CUDA it runs on the CPU (try ``--epochs 1 --optimizers sgd adam``).
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import _cli  # benchmarks/_cli.py (a script's folder is on sys.path)
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = _cli.parser(__doc__, "about 4 minutes on an H100 at the defaults", overrides=True)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--optimizers", nargs="+", help="default: the study's twelve")
    p.add_argument("--sample", type=int, default=2, help="one-at-a-time runs (Adam, lrs from the grid's middle)")
    args = p.parse_args()
    from optstudy.config import compose
    from optstudy.population.run import train_population
    from optstudy.train import train

    spec = yaml.safe_load((ROOT / "studies" / "deepobs_protocol.yaml").read_text())
    names = args.optimizers or list(spec["optimizers"])
    trainer = "trainer=gpu" if torch.cuda.is_available() else "trainer=cpu"
    common = [*spec["overrides"], "logger=none", "checkpoint.enabled=false", f"trainer.max_epochs={args.epochs}",
              trainer, *args.overrides]
    print(f"{trainer}, {args.epochs} epochs, {len(spec['seeds'])} seeds x {len(spec['optimizers']['adam']['lr'])} lrs "
          f"per optimizer; {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}", flush=True)
    start, runs = time.perf_counter(), 0
    for name in names:
        lrs, t0 = spec["optimizers"][name]["lr"], time.perf_counter()
        cfg = compose([*common, f"optimizer={name}", f"population.lr=[{','.join(map(str, lrs))}]",
                       f"population.seed=[{','.join(map(str, spec['seeds']))}]", "trainer.enable_progress_bar=false"])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            result = train_population(cfg)
        last = [line for line in out.getvalue().splitlines() if line.startswith("epoch")][-1:]
        runs += len(result.members)
        print(f"{name:<9} {time.perf_counter() - t0:6.1f} s  {last[0] if last else ''}", flush=True)
    total = time.perf_counter() - start
    print(f"populations: {runs} runs in {total:.1f} s", flush=True)
    t0 = time.perf_counter()
    for lr in [1e-3, 1e-1, 1e-2, 1e-4][:args.sample]:
        with contextlib.redirect_stdout(io.StringIO()):
            train(compose([*common, "optimizer=adam", f"optimizer.lr={lr}", "seed=0"]))
    one = (time.perf_counter() - t0) / max(args.sample, 1)
    print(f"one at a time: {one:.2f} s a run -> {one * runs:.0f} s for {runs} runs; populations "
          f"{one * runs / total:.1f}x faster (peak GPU memory "
          f"{torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0:.2f} GiB)", flush=True)


if __name__ == "__main__":
    main()
