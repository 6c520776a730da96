"""Time one ``optimizer.step()`` of each optstudy optimizer against torch.optim's fastest implementation.

The parameters have ResNet-18's shapes (62 tensors, 11,689,512 elements), and each one gets a fixed random
gradient. There is no backward pass, so only the step is timed. For each name in ``optstudy.optim.NAMES`` it measures:

- torch.optim's fastest implementation of the same algorithm. That is ``fused=True`` where torch has a CPU fused
  kernel (tried at start-up), else ``foreach=True``. adabound and amsbound use torch's Adam (with ``amsgrad`` for
  amsbound) as the speed baseline;
- ours with ``impl="loop"`` (eager, per tensor) and with ``impl="compiled"`` (``torch.compile`` per tensor);
- for adabound and amsbound, the authors' reference code as well (PyPI ``adabound`` 0.0.5).

Each timing is the median over ``--repeats`` runs of ``--steps`` consecutive steps, in ms per step. The timed runs
start after warm-up steps, so state allocation and compilation are left out. The wall time of the first step is
reported on its own ("first s"); for the compiled path, that is the compile time. Steps keep changing the
parameters and state, which does not affect the timing. Afterwards the script prints each goal as PASS or FAIL and
exits with 0 either way: it is a report, not a test.

Run from the repository root (takes a few minutes on a 2-core CPU)::

    .venv/bin/python benchmarks/optimizer_step.py
    .venv/bin/python benchmarks/optimizer_step.py --names adam,adabound --repeats 3 --steps 3
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings

import torch
from torch._dynamo.utils import counters

import optstudy.optim as o

COMPILED_MAX_RATIO = 1.5  # goal: compiled step within 1.5x of torch's fastest implementation
REFERENCE_MIN_SPEEDUP = 8.0  # goal: adabound/amsbound compiled >= 8x faster than the reference code
NOISY_SPREAD = 1.5  # a measurement whose slowest repeat is this much slower than its fastest is flagged
REFERENCE_NAMES = ("adabound", "amsbound")

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


def make_params(shapes, dtype) -> list[torch.Tensor]:
    """Fresh parameters with fixed random gradients (the same seed for every optimizer)."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen, dtype=dtype).requires_grad_()
        p.grad = torch.randn(shape, generator=gen, dtype=dtype)
        params.append(p)
    return params


def torch_baseline(name: str, dtype) -> tuple[str, callable]:
    """(label, factory) for torch's fastest implementation of ``name``: fused if constructing and stepping a fused
    optimizer works for this dtype on the CPU, else foreach."""
    cls_name, kwargs = TORCH_EQUIVALENT[name]
    cls, lr = getattr(torch.optim, cls_name), o.defaults(name)["lr"]
    flags = "".join(f"({k})" for k, v in kwargs.items() if v is True)
    try:
        probe = torch.zeros(4, dtype=dtype, requires_grad=True)
        probe.grad = torch.ones_like(probe)
        cls([probe], lr=lr, fused=True, **kwargs).step()
        mode = {"fused": True}
    except (TypeError, RuntimeError, ValueError):
        mode = {"foreach": True}
    label = f"{next(iter(mode))} {cls_name}{flags}"
    return label, lambda params: cls(params, lr=lr, **kwargs, **mode)


def reference_factory(name: str) -> callable:
    import adabound

    d = o.defaults(name)  # the same lr, final_lr, gamma, betas, eps as ours
    return lambda params: adabound.AdaBound(params, lr=d["lr"], betas=d["betas"], final_lr=d["final_lr"],
                                            gamma=d["gamma"], eps=d["eps"], amsbound=name == "amsbound")


def measure(factory, shapes, dtype, args) -> dict:
    """First-step seconds, warm-up, then the median ms/step; also the dynamo graphs compiled after the first step."""
    params = make_params(shapes, dtype)
    opt = factory(params)
    t0 = time.perf_counter()
    opt.step()
    first_s = time.perf_counter() - t0
    graphs_before = counters["stats"]["unique_graphs"]
    for _ in range(args.warmup):
        opt.step()
    samples = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            opt.step()
        samples.append((time.perf_counter() - t0) / args.steps)
    result = dict(ms=1e3 * statistics.median(samples), spread=max(samples) / min(samples), first_s=first_s,
                  late_graphs=counters["stats"]["unique_graphs"] - graphs_before, impl=getattr(opt, "impl", None))
    del opt, params
    gc.collect()
    return result


def bench(name: str, shapes, dtype, args) -> dict:
    label, torch_factory = torch_baseline(name, dtype)
    row = dict(name=name, label=label, torch=measure(torch_factory, shapes, dtype, args))
    for impl in ("loop", "compiled"):
        row[impl] = measure(lambda params: o.build(name, params, impl=impl), shapes, dtype, args)
    if name in REFERENCE_NAMES:
        row["reference"] = measure(reference_factory(name), shapes, dtype, args)
    return row


HEADER = (f"{'name':9} {'torch baseline':22} {'torch ms':>9} {'loop ms':>9} {'comp ms':>9} {'comp/torch':>10} "
          f"{'loop/torch':>10} {'first s':>8} {'ref ms':>9} {'ref/comp':>9}")


def format_row(row: dict) -> str:
    t, loop, comp = row["torch"]["ms"], row["loop"]["ms"], row["compiled"]["ms"]
    ref = row.get("reference")
    ref_cols = f"{ref['ms']:9.1f} {ref['ms'] / comp:8.1f}x" if ref else f"{'':9} {'':9}"
    return (f"{row['name']:9} {row['label']:22} {t:9.1f} {loop:9.1f} {comp:9.1f} {comp / t:9.2f}x {loop / t:9.2f}x "
            f"{row['compiled']['first_s']:8.1f} {ref_cols}")


def notes(row: dict) -> list[str]:
    """Anything that makes a timing suspect: a fallback to the loop, compiling during the timed steps, or repeats
    that disagree (other processes competing for the cores)."""
    comp, out = row["compiled"], []
    for key in ("torch", "loop", "compiled", "reference"):
        if key in row and row[key]["spread"] > NOISY_SPREAD:
            out.append(f"{row['name']}: {key} repeats varied {row[key]['spread']:.1f}x (slowest/fastest); the machine "
                       "was probably busy, rerun when it is idle")
    if comp["impl"] != "compiled":
        out.append(f"{row['name']}: the compiled optimizer fell back to impl={comp['impl']!r} (torch.compile failed)")
    if comp["late_graphs"]:
        out.append(f"{row['name']}: {comp['late_graphs']} dynamo graph(s) compiled after the first step (recompiles)")
    return out


def goals(rows: list[dict]) -> list[tuple[bool, str]]:
    """(passed, description) for each goal of the issue."""
    out = []
    for row in rows:
        ratio = row["compiled"]["ms"] / row["torch"]["ms"]
        ok = ratio <= COMPILED_MAX_RATIO and row["compiled"]["impl"] == "compiled"
        out.append((ok, f"{row['name']}: compiled within {COMPILED_MAX_RATIO}x of {row['label']} ({ratio:.2f}x)"))
        if "reference" in row:
            speedup = row["reference"]["ms"] / row["compiled"]["ms"]
            out.append((speedup >= REFERENCE_MIN_SPEEDUP,
                        f"{row['name']}: compiled >= {REFERENCE_MIN_SPEEDUP:g}x faster than the reference adabound "
                        f"code ({speedup:.1f}x)"))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", default=",".join(o.NAMES), help="comma-separated optimizer names (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median is reported")
    parser.add_argument("--steps", type=int, default=5, help="consecutive steps per timed run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first step")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
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
    shapes, dtype = resnet18_shapes(), getattr(torch, args.dtype)
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ResNet-18 shapes: {len(shapes)} tensors, "
          f"{numel:,} parameters, {args.dtype}")
    print(f"median of {args.repeats} runs x {args.steps} steps after 1 + {args.warmup} warm-up steps; "
          f"'first s' is the compiled path's first step (compile time)\n")
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
