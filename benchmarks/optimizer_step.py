"""Time one ``optimizer.step()`` of each optstudy optimizer against torch.optim's fastest implementation.

The parameters have ResNet-18's shapes (62 tensors, 11,689,512 elements), and each one gets a fixed random
gradient. There is no backward pass, so only the step is timed. For each name in ``optstudy.optim.NAMES`` it measures:

- torch.optim's fastest implementation of the same algorithm. That is ``fused=True`` where torch has a CPU fused
  kernel (tried at start-up), else ``foreach=True``. adabound and amsbound use torch's Adam (with ``amsgrad`` for
  amsbound) as the speed baseline;
- ours with ``impl="loop"`` (eager, per tensor) and with ``impl="compiled"`` (``torch.compile``, 8 tensors a call);
- for adabound and amsbound, the authors' reference code as well (PyPI ``adabound`` 0.0.5).

The step is memory-bound: AdaBound reads θ, g, m, v and writes θ, m, v, 7 float32 streams of 11.7M elements
(327 MB); AMSBound adds v̄ (9 streams). For those two the script also times an in-place ``a.add_(b)`` over as many
elements (3 streams), interleaved with the rest, and prints the time their traffic takes at that bandwidth
("floor ms") and the reference's time over it ("ref/floor"): no implementation beats the reference by much more
than that on this machine.

Each timing is the median over ``--repeats`` runs of ``--steps`` consecutive steps, in ms per step. The runs of one
optimizer's implementations are interleaved, so each ratio compares timings taken under the same conditions. The
timed runs start after warm-up steps, so state allocation and compilation are left out. The wall time of the first
step is reported on its own ("first s"); for the compiled path, that is the compile time. Steps keep changing the
parameters and state, which does not affect the timing. Afterwards the script prints each goal as PASS or FAIL and
exits with 0 either way: it is a report, not a test. Other processes on the machine distort the numbers. A note
flags each measurement where they used CPU or where the repeats disagreed; run it again on an idle machine.

Run from the repository root (about a minute on a 2-core CPU)::

    .venv/bin/python benchmarks/optimizer_step.py
    .venv/bin/python benchmarks/optimizer_step.py --names adam,adabound --repeats 3 --steps 3
    .venv/bin/python benchmarks/optimizer_step.py --cold-cache   # "first s" = compile time on a fresh machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from typing import Callable

import torch
from torch._dynamo.utils import counters

import optstudy.optim as o

import _cli  # benchmarks/_cli.py (a script's folder is on sys.path)

COMPILED_MAX_RATIO = 1.5  # goal: compiled step within 1.5x of torch's fastest implementation
REFERENCE_MIN_SPEEDUP = 8.0  # goal: adabound/amsbound compiled >= 8x faster than the reference code
NOISY_SPREAD = 1.5  # flag a measurement whose slowest repeat is this much slower than its fastest
BUSY_CORES = 0.2  # flag a measurement during which other processes kept this many cores busy on average
REFERENCE_NAMES = ("adabound", "amsbound")
STREAMS = {"adabound": 7, "amsbound": 9}  # float tensors read + written per element by one step (see above)

# name -> (torch.optim class, keywords besides lr) of the same algorithm (the speed baseline for adabound/amsbound)
TORCH_EQUIVALENT = {
    "sgd": ("SGD", {}),
    "momentum": ("SGD", {"momentum": 0.9}),
    "nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}),
    "adagrad": ("Adagrad", {}),
    "adadelta": ("Adadelta", {}),
    "rmsprop": ("RMSprop", {}),
    "adam": ("Adam", {}),
    "adamax": ("Adamax", {}),
    "nadam": ("NAdam", {}),
    "amsgrad": ("Adam", {"amsgrad": True}),
    "adabound": ("Adam", {}),
    "amsbound": ("Adam", {"amsgrad": True}),
}


def resnet18_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of torchvision's resnet18 (conv weights have no bias; each BN has a weight and a bias)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    c_in = 64
    for c_out in (64, 128, 256, 512):
        for block in range(2):
            shapes += [(c_out, c_in, 3, 3), (c_out,), (c_out,), (c_out, c_out, 3, 3), (c_out,), (c_out,)]
            if block == 0 and c_in != c_out:  # the 1x1 downsample conv and its BN
                shapes += [(c_out, c_in, 1, 1), (c_out,), (c_out,)]
            c_in = c_out
    return shapes + [(1000, 512), (1000,)]


DEVICE = torch.device("cpu")  # --device


def make_params(shapes, dtype) -> list[torch.Tensor]:
    """Fresh parameters with fixed random gradients (the same seed for every optimizer), on ``DEVICE``."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
        p.grad = torch.randn(shape, generator=gen, dtype=dtype).to(DEVICE)
        params.append(p)
    return params


def torch_baseline(name: str, dtype) -> tuple[str, Callable]:
    """(label, factory) for torch's fastest implementation of ``name``: fused if constructing and stepping a fused
    optimizer works for this dtype on the CPU, else foreach."""
    cls_name, kwargs = TORCH_EQUIVALENT[name]
    cls, lr = getattr(torch.optim, cls_name), o.defaults(name)["lr"]
    try:
        probe = torch.zeros(4, dtype=dtype, device=DEVICE, requires_grad=True)
        probe.grad = torch.ones_like(probe)
        cls([probe], lr=lr, fused=True, **kwargs).step()
        kind = "fused"
    except (TypeError, RuntimeError, ValueError):
        kind = "foreach"
    label = f"{kind} {cls_name}" + (f"({','.join(kwargs)})" if kwargs else "")
    return label, lambda params: cls(params, lr=lr, **kwargs, **{kind: True})


def reference_factory(name: str) -> Callable:
    import adabound

    d = o.defaults(name)  # the same lr, final_lr, gamma, betas, eps as ours
    return lambda params: adabound.AdaBound(params, lr=d["lr"], betas=d["betas"], final_lr=d["final_lr"],
                                            gamma=d["gamma"], eps=d["eps"], amsbound=name == "amsbound")


def machine_cpu_seconds() -> float:
    """CPU seconds that all processes have used so far (Linux /proc/stat); NaN where that is not available."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return float("nan")


def time_steps(opt, steps: int) -> float:
    """Seconds per step over ``steps`` consecutive steps."""
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync()  # the GPU's queue drained: its work is timed, not its launch
    return (time.perf_counter() - t0) / steps


class BandwidthProbe:
    """A "step" that is one in-place ``a.add_(b)`` over the parameters' element count: 3 streams (read a, b; write
    a), what a memory-bound pass reaches on this machine with torch's threads. Timed like the optimizers,
    interleaved with them, so the floor it gives drifts with the machine as they do."""

    def __init__(self, numel: int, dtype):
        self.a, self.b = torch.randn(numel).to(DEVICE, dtype), torch.randn(numel).to(DEVICE, dtype)

    def step(self):
        self.a.add_(self.b, alpha=1e-3)


def bench(name: str, shapes, dtype, args) -> dict:
    """Times torch's baseline, our loop and compiled paths (and the reference code) for ``name``, interleaved: each
    repeat steps every one of them in turn, so that their ratios hold even though the machine's speed drifts (by
    ~1.5x over minutes on a shared VM)."""
    label, torch_factory = torch_baseline(name, dtype)
    factories = {"torch": torch_factory, "loop": lambda params: o.build(name, params, impl="loop"),
                 "compiled": lambda params: o.build(name, params, impl="compiled")}
    if name in REFERENCE_NAMES:
        factories["reference"] = reference_factory(name)
        factories["probe"] = lambda params: BandwidthProbe(sum(p.numel() for p in params), dtype)
    opts = {key: make(make_params(shapes, dtype)) for key, make in factories.items()}
    first_s = {key: time_steps(opt, 1) for key, opt in opts.items()}
    graphs_before = counters["stats"]["unique_graphs"]
    for opt in opts.values():
        time_steps(opt, args.warmup)
    samples = {key: [] for key in opts}
    machine0, own0, wall0 = machine_cpu_seconds(), time.process_time(), time.perf_counter()
    for _ in range(args.repeats):
        for key, opt in opts.items():
            samples[key].append(time_steps(opt, args.steps))
    other_cpu = machine_cpu_seconds() - machine0 - (time.process_time() - own0) - 2 / os.sysconf("SC_CLK_TCK")
    row = dict(name=name, label=label, first_s=first_s["compiled"], impl=opts["compiled"].impl,
               late_graphs=counters["stats"]["unique_graphs"] - graphs_before,
               others=max(other_cpu, 0.0) / (time.perf_counter() - wall0))  # cores; /proc/stat counts whole ticks
    for key, secs in samples.items():
        row[key] = dict(ms=1e3 * statistics.median(secs), spread=max(secs) / min(secs))
    if "probe" in row:  # the time this optimizer's traffic takes at the probe's bandwidth
        row["floor_ms"] = row["probe"]["ms"] * STREAMS[name] / 3
    return row


HEADER = (f"{'name':9} {'torch baseline':28} {'torch ms':>9} {'loop ms':>9} {'comp ms':>9} {'comp/torch':>10} "
          f"{'loop/torch':>10} {'first s':>8} {'ref ms':>9} {'ref/comp':>9} {'floor ms':>9} {'ref/floor':>9}")


def format_row(row: dict) -> str:
    t, loop, comp = row["torch"]["ms"], row["loop"]["ms"], row["compiled"]["ms"]
    ref = row.get("reference")
    ref_cols = (f"{ref['ms']:9.1f} {ref['ms'] / comp:8.1f}x {row['floor_ms']:9.1f} "
                f"{ref['ms'] / row['floor_ms']:8.1f}x" if ref else "")
    return (f"{row['name']:9} {row['label']:28} {t:9.1f} {loop:9.1f} {comp:9.1f} {comp / t:9.2f}x {loop / t:9.2f}x "
            f"{row['first_s']:8.1f} {ref_cols}")


def notes(row: dict) -> list[str]:
    """Anything that makes a timing suspect: a fallback to the loop, compiling during the timed steps, or repeats
    that disagree (other processes competing for the cores)."""
    out = []
    if row["others"] > BUSY_CORES:
        out.append(f"{row['name']}: other processes kept {row['others']:.1f} cores busy; rerun on an idle machine")
    for key in ("torch", "loop", "compiled", "reference"):
        if key in row and row[key]["spread"] > NOISY_SPREAD:
            out.append(f"{row['name']}: {key} repeats varied {row[key]['spread']:.1f}x (slowest/fastest)")
    if row["impl"] != "compiled":
        out.append(f"{row['name']}: the compiled optimizer fell back to impl={row['impl']!r} (torch.compile failed)")
    if row["late_graphs"]:
        out.append(f"{row['name']}: {row['late_graphs']} dynamo graph(s) compiled after the first step (recompiles)")
    return out


def goals(rows: list[dict]) -> list[tuple[bool, str]]:
    """(passed, description) for each goal of the issue."""
    out = []
    for row in rows:
        ratio = row["compiled"]["ms"] / row["torch"]["ms"]
        ok = ratio <= COMPILED_MAX_RATIO and row["impl"] == "compiled"
        out.append((ok, f"{row['name']}: compiled within {COMPILED_MAX_RATIO}x of {row['label']} ({ratio:.2f}x)"))
        if "reference" in row:
            speedup = row["reference"]["ms"] / row["compiled"]["ms"]
            best = row["reference"]["ms"] / row["floor_ms"]
            out.append((speedup >= REFERENCE_MIN_SPEEDUP,
                        f"{row['name']}: compiled >= {REFERENCE_MIN_SPEEDUP:g}x faster than the reference adabound "
                        f"code ({speedup:.1f}x; at this machine's bandwidth no step can be more than {best:.1f}x "
                        f"faster than it)"))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = _cli.parser(__doc__, "about 1 minute (ResNet-18, all twelve optimizers, compiled kernels from "
                                  "inductor's cache; add 1-2 minutes with --cold-cache)")
    parser.add_argument("--names", default=",".join(o.NAMES), help="comma-separated optimizer names")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement; the median is reported")
    parser.add_argument("--steps", type=int, default=5, help="consecutive steps per timed run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first step")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"),
                        help="parameter and state dtype")
    parser.add_argument("--device", default="cpu", help="where the parameters live: cpu or cuda")
    parser.add_argument("--cold-cache", action="store_true",
                        help="compile into an empty inductor cache, so 'first s' is the compile time on a new machine")
    args = parser.parse_args(argv)
    args.names = [n.strip() for n in args.names.split(",") if n.strip()]
    unknown = [n for n in args.names if n not in o.NAMES]
    if unknown:
        parser.error(f"unknown optimizer(s) {', '.join(unknown)}; valid: {', '.join(o.NAMES)}")
    if min(args.repeats, args.steps) < 1 or args.warmup < 0:
        parser.error("--repeats and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="This overload of add", category=UserWarning)  # the reference code
    if args.cold_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    global DEVICE
    DEVICE = torch.device(args.device)
    shapes, dtype = resnet18_shapes(), getattr(torch, args.dtype)
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ResNet-18 shapes: {len(shapes)} tensors, "
          f"{numel:,} parameters, {args.dtype}, on {DEVICE}")
    cache = "an empty inductor cache (--cold-cache)" if args.cold_cache else "inductor's cache as it is"
    print(f"median of {args.repeats} runs x {args.steps} steps after 1 + {args.warmup} warm-up steps; "
          f"'first s' is the compiled path's first step (compile time, from {cache})\n")
    print(HEADER, flush=True)
    start, rows = time.perf_counter(), []
    for name in args.names:
        rows.append(bench(name, shapes, dtype, args))
        print(format_row(rows[-1]), flush=True)
    for line in (n for row in rows for n in notes(row)):
        print("note:", line)
    print("\ngoals:")
    results = goals(rows)
    for ok, text in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    print(f"\n{sum(ok for ok, _ in results)}/{len(results)} goals pass; benchmark took "
          f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
