"""Time one forward+backward of a stacked population of K digits MLPs: vmap against hand-batched layers.

``optstudy.population.stack`` runs K members either through ``torch.func.vmap`` over ``functional_call`` (any
vmappable model) or through hand-batched layers (one ``torch.baddbmm`` per Linear for all members; Sequential models
of Flatten/Linear/ReLU/Dropout only). This script measures both on the default problem's model, the digits MLP
(``conf/model/mlp.yaml``: 64 inputs, hidden (64,), 10 classes; batch 64 from ``conf/data/digits.yaml``), and, as the
baseline a population replaces, a loop over the K standalone modules. A step is the forward on ``[K, B, 1, 8, 8]``
random inputs, the sum over members of each member's mean cross-entropy, and its backward. ``stack()`` takes the
batched layers for this model: the measurement below is why.

Each timing is the median over ``--repeats`` runs of ``--steps`` steps, in ms per step, after ``--warmup`` steps; the
three ways are interleaved in each repeat, so their ratios hold while the machine's speed drifts. It prints a table,
and a note where a way's repeats disagree (other processes competing for the cores), and exits 0: a report, not a
test.

Run from the repository root (about 10 seconds on a 2-core CPU)::

    .venv/bin/python benchmarks/stack_forward.py
    .venv/bin/python benchmarks/stack_forward.py --members 1,4,16,64,256 --hidden 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from optstudy import models
from optstudy.data import Data
from optstudy.population.stack import stack

import _cli  # benchmarks/_cli.py (a script's folder is on sys.path)

NOISY_SPREAD = 1.5  # flag a timing whose slowest repeat is this much slower than its fastest
DIGITS = Data(train=None, val=None, task="classification", shape=(1, 8, 8), n_classes=10)


def steps(members, stacked, x, y) -> dict:
    """name -> a function doing one forward+backward of all K members."""
    K, B = y.shape

    def stacked_loss(logits):  # [K, B, classes] -> sum over members of each member's mean loss
        F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(K, B).mean(1).sum().backward()

    def loop():
        for k, m in enumerate(members):
            F.cross_entropy(m(x[k]), y[k]).backward()

    return {"loop": loop, "vmap": lambda: stacked_loss(stacked._vmap_forward(x)),
            "layers": lambda: stacked_loss(stacked._layers_forward(x))}


def time_steps(fn, n: int) -> float:
    """ms per step over ``n`` consecutive steps."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e3 * (time.perf_counter() - t0) / n


def bench(K: int, args) -> dict:
    cfg = OmegaConf.create({"name": "mlp", "hidden": [args.hidden]})
    members = [models.build(cfg, DIGITS) for _ in range(K)]
    stacked = stack(members)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(K, args.batch, *DIGITS.shape, generator=gen), torch.randint(10, (K, args.batch), generator=gen)
    fns = steps(members, stacked, x, y)
    for fn in fns.values():
        time_steps(fn, args.warmup)
    samples = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            samples[name].append(time_steps(fn, args.steps))
    noisy = [name for name, ms in samples.items() if max(ms) > NOISY_SPREAD * min(ms)]
    return {"K": K, "path": stacked.extra_repr().split("path=")[1], "noisy": noisy,
            **{name: statistics.median(ms) for name, ms in samples.items()}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = _cli.parser(__doc__, "about 10 seconds (K = 1, 4, 16, 64)")
    parser.add_argument("--members", default="1,4,16,64", help="comma-separated population sizes K")
    parser.add_argument("--batch", type=int, default=64, help="examples per member per step")
    parser.add_argument("--hidden", type=int, default=64, help="the MLP's hidden width")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per way; the median is reported")
    parser.add_argument("--steps", type=int, default=40, help="steps per timed run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    args = parser.parse_args(argv)
    args.members = [int(k) for k in args.members.split(",")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; digits MLP 64-{args.hidden}-10, "
          f"batch {args.batch}, float32; ms per forward+backward of all K members, median of {args.repeats} x "
          f"{args.steps} steps\n")
    print(f"{'K':>4} {'loop ms':>9} {'vmap ms':>9} {'layers ms':>10} {'vmap/layers':>12} {'loop/layers':>12}  "
          f"stack() takes")
    for K in args.members:
        r = bench(K, args)
        print(f"{K:4d} {r['loop']:9.3f} {r['vmap']:9.3f} {r['layers']:10.3f} {r['vmap'] / r['layers']:11.2f}x "
              f"{r['loop'] / r['layers']:11.2f}x  {r['path']}", flush=True)
        if r["noisy"]:
            print(f"note: K={K}: the repeats of {', '.join(r['noisy'])} varied over {NOISY_SPREAD}x (other "
                  f"processes on the machine?); rerun on an idle machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
