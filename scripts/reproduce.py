#!/usr/bin/env python
"""The papers' claims, reproduced at CPU size: one subcommand per item of docs/reproductions.md.

    python scripts/reproduce.py counterexample   # 1. AMSGrad's counterexample (Reddi et al. 2018)
    python scripts/reproduce.py surfaces         # 2. trajectories on Beale, Rosenbrock and the saddle (Ruder 2016)
    python scripts/reproduce.py sensitivity      # 3. lr / final_lr / gamma sensitivity, as optstudy studies
    python scripts/reproduce.py efflr            # 4. effective learning rates over training (AdaBound's Fig. 1)
    python scripts/reproduce.py bias             # 5. Adam with and without bias correction (Adam's Sec. 6.4)
    python scripts/reproduce.py configs          # 6. the GPU-scale experiment files and what they report
    python scripts/reproduce.py deepobs          # 7. DeepOBS's lr protocol, 12 optimizers x 36 lrs x 10 seeds
    python scripts/reproduce.py curriculum       # 10. curriculum vs shuffled order (Bengio et al. 2009), data.order
    python scripts/reproduce.py early_stopping   # 11. epochs saved by early stopping at equal final quality
    python scripts/reproduce.py staleness        # 12. tolerance to stale gradients (McMahan & Streeter 2014)
    python scripts/reproduce.py gradnoise        # 8. gradient noise and a deep, badly initialised MLP (Neelakantan et al.)
    python scripts/reproduce.py batchnorm        # 9. batch norm and the range of good lrs per optimizer (Ioffe & Szegedy)
    python scripts/reproduce.py all              # every item, in that order (deepobs alone takes 1-2 hours)

Each prints its numbers and writes them, with its figures, into ``--out`` (default ``docs/figures/``): ``<item>.json``
plus PNGs (and GIFs, CSVs). ``--quick`` shrinks every item to seconds (the tests run it); the numbers in the document
come from the full runs. Each item's code, with the experiment or study files it runs, is in
``scripts/reproductions/<item>.py``; this script only parses the command line and dispatches to them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the package beside this script, however it is run

from reproductions import ITEMS
from reproductions._common import FIGURES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("item", choices=(*ITEMS, "all"))
    p.add_argument("--out", type=Path, default=FIGURES, help="where the JSON and figures go (default docs/figures)")
    p.add_argument("--quick", action="store_true", help="seconds per item: the tests' size, not the document's")
    g = p.add_argument_group("counterexample")
    g.add_argument("--steps", type=int, help="steps of the online problem (default 3000; surfaces: cap per surface)")
    g.add_argument("--stochastic-steps", type=int, help="steps of the stochastic problem (default 8000)")
    g.add_argument("--seeds", type=int, help="seeds of the stochastic problem (default 3)")
    g = p.add_argument_group("sensitivity")
    g.add_argument("--workers", type=int, help="optstudy study run processes (default 2; deepobs 1)")
    g = p.add_argument_group("deepobs")
    g.add_argument("--workdir", type=Path, help="where the study's journal and MLflow files go; a finished study "
                                                "there is read back, an unfinished one resumed")
    g.add_argument("--sample", type=int, help="one-at-a-time sample for the estimate (default 24 runs)")
    g = p.add_argument_group("efflr")
    g.add_argument("--epochs", type=int, help="efflr: epochs (default 30); bias: epochs (default 20)")
    g.add_argument("--every", type=int, default=10, help="efflr: steps between histograms (default 10)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    items = ITEMS if args.item == "all" else (args.item,)
    total = time.perf_counter()
    for item in items:
        start = time.perf_counter()
        print(f"=== {item}", flush=True)
        module = importlib.import_module(f"reproductions.{item}")
        item_args = argparse.Namespace(**vars(args))  # each item fills its own sizes, not the next item's
        if hasattr(module, "defaults"):
            module.defaults(item_args)
        module.run(item_args)
        print(f"=== {item}: {time.perf_counter() - start:.0f}s", flush=True)
    if len(items) > 1:
        print(f"all: {time.perf_counter() - total:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
