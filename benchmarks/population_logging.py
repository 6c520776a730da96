"""What MLflow tracking costs a population of K members, into a local SQLite store, at K = 1, 4, 16, 64.

    python benchmarks/population_logging.py [--sizes 1,4,16,64] [--steps 1000] [--step-ms 20] [--python-share 0.5]

For each K, a ``PopulationLogger`` creates its parent and K member runs (each member's params: the default config,
resolved, as train.py logs it; its tags: train.py's), then a loop of ``--steps`` simulated training steps logs what a
member's run gets: ``train_loss`` every step, ``val_loss``/``val_acc`` every 50 steps (an epoch), 11 effective-LR
quantiles every 25 steps. A simulated step is fixed work, part in torch kernels (which release the GIL) and
``--python-share`` of it in Python (which holds the GIL, as Lightning's loop does around small models), so the sender
thread's contention for the GIL shows in the step time. Reported per K:

- ``create s``: creating the K + 1 runs and logging the members' params;
- ``log ms/step``: time of ``log_member_metrics`` on the training thread, mean over the steps (``max ms``: the worst);
- ``overhead ms/step``: a step's time with logging minus without (the same loop, no logger): the call plus the
  sender's contention for the GIL and the cores;
- ``values/step``: metric values logged per step, all members; ``sender s``: time the sender thread spent in
  ``log_batch`` over the run (``µs/value``: per value); ``close s``: ``close()``, which waits for what is still queued
  and ends the runs.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import _cli  # benchmarks/_cli.py (a script's folder is on sys.path)

EPOCH, EFF_LR_EVERY = 50, 25
QUANTILES = ["p1", "p5", "p25", "p50", "p75", "p95", "p99", "min", "max", "clipped_lower", "clipped_upper"]


class Step:
    """A simulated training step: fixed work (not a fixed time, so that waiting for the GIL makes it longer)."""

    def __init__(self, ms: float, python_share: float):
        import torch

        torch.set_num_threads(1)  # as train.py for small models; the sender gets the other core
        self.a = torch.randn(128, 128)
        self.mm, self.loop = 1, 1000
        for _ in range(3):  # calibrate each part to its share of ms
            self.mm = max(1, round(self.mm * ms * (1 - python_share) / (1000 * self._time(self._torch))))
            self.loop = max(1, round(self.loop * ms * python_share / (1000 * self._time(self._python))))

    def __call__(self) -> None:
        self._torch()
        self._python()

    def _torch(self) -> None:
        for _ in range(self.mm):
            self.a @ self.a

    def _python(self) -> None:
        total = 0
        for i in range(self.loop):
            total += i

    @staticmethod
    def _time(f, n: int = 20) -> float:
        start = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - start) / n


def rows(k_members: int, step: int) -> dict[int, dict[str, float]]:
    """What a member's run gets at ``step``: train.py's curves at train.py's default rates."""
    out = {k: {"train_loss": 1.0 / (step + k)} for k in range(k_members)}
    if step % EPOCH == 0:
        for metrics in out.values():
            metrics.update(val_loss=1.0 / step, val_acc=0.9)
    if step % EFF_LR_EVERY == 0 or step == 1:
        for metrics in out.values():
            metrics.update({f"eff_lr/g0/{q}": -3.0 + i / 10 for i, q in enumerate(QUANTILES)})
    return out


def members(k_members: int) -> list[dict]:
    """The default config, resolved, with lr and seed varied per member; tags as train.py's ``make_logger``."""
    from optstudy.config import compose
    from optstudy.train import _resolved, make_logger

    cfg = compose([])
    base, tags = _resolved(cfg), make_logger(cfg, None).tags
    out = []
    for k in range(k_members):
        params = copy.deepcopy(base)
        params["optimizer"]["lr"], params["seed"] = 1e-3 * 2 ** (k / 8), k
        out.append({"run_name": f"{params['optimizer']['name']} lr={params['optimizer']['lr']:.4g} seed={k}",
                    "tags": tags, "params": params})
    return out


def loop(step: Step, steps: int, log=None, k_members: int = 0) -> tuple[float, list[float], int]:
    """Seconds per step, the seconds of each ``log_member_metrics`` call, and the number of values logged."""
    calls, values = [], 0
    start = time.perf_counter()
    for t in range(1, steps + 1):
        step()
        if log is not None:
            r = rows(k_members, t)  # made by the training code, not by the logger: outside the timing
            before = time.perf_counter()
            log.log_member_metrics(r, t)
            calls.append(time.perf_counter() - before)
            values += sum(map(len, r.values()))
    return (time.perf_counter() - start) / steps, calls, values


def one(uri: str, k_members: int, step: Step, steps: int) -> dict:
    from optstudy.population.tracking import PopulationLogger

    spec = members(k_members)
    start = time.perf_counter()
    log = PopulationLogger(uri, f"population-logging K={k_members}", f"population K={k_members}", {}, spec)
    created = time.perf_counter() - start
    client = log.experiment
    send, busy = client.log_batch, []

    def timed(*args, **kwargs):  # the sender's calls; the same client object
        before = time.perf_counter()
        try:
            return send(*args, **kwargs)
        finally:
            busy.append(time.perf_counter() - before)

    client.log_batch = timed
    per_step, calls, values = loop(step, steps, log, k_members)
    start = time.perf_counter()
    log.close()
    closed = time.perf_counter() - start
    client.log_batch = send
    assert len(client.get_metric_history(log.run_ids[-1], "train_loss")) == steps  # every value arrived
    return {"create": created, "log_ms": 1000 * statistics.mean(calls), "max_ms": 1000 * max(calls),
            "per_step": per_step, "values": values / steps, "sender": sum(busy), "us_value": 1e6 * sum(busy) / values,
            "close": closed}


def main() -> None:
    parser = _cli.parser(__doc__, "about 2.5 minutes (150 s here at the defaults)")
    parser.add_argument("--sizes", default="1,4,16,64", help="population sizes K, comma-separated")
    parser.add_argument("--steps", type=int, default=1000, help="simulated training steps per population")
    parser.add_argument("--step-ms", type=float, default=20.0, help="work of one simulated step without logging, ms")
    parser.add_argument("--python-share", type=float, default=0.5,
                        help="share of a step's work in Python (holding the GIL); the rest in torch kernels")
    args = parser.parse_args()
    sizes = [int(k) for k in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="optstudy-bench-"))
    os.chdir(work)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    from optstudy.population.tracking import PopulationLogger

    PopulationLogger(uri, "warm-up", "warm-up", {}, members(1)).close()  # creates the store's tables: not measured
    step = Step(args.step_ms, args.python_share)
    print(f"# {args.steps} steps of {args.step_ms:g} ms simulated work ({args.python_share:.0%} Python); train_loss every step, val every {EPOCH}, "
          f"{len(QUANTILES)} eff-LR quantiles every {EFF_LR_EVERY}; SQLite store in {work}", flush=True)
    bare = [loop(step, args.steps)[0]]
    results = {}
    for k in sizes:
        results[k] = one(uri, k, step, args.steps)
    bare.append(loop(step, args.steps)[0])  # before and after: the machine's drift
    base = statistics.mean(bare)
    print(f"step without logging: {1000 * base:.2f} ms ({', '.join(f'{1000 * b:.2f}' for b in bare)})")
    print(f"{'K':>3s} {'create s':>9s} {'log ms/step':>12s} {'max ms':>7s} {'overhead ms/step':>17s} "
          f"{'values/step':>12s} {'sender s':>9s} {'µs/value':>9s} {'close s':>8s}")
    for k, r in results.items():
        print(f"{k:3d} {r['create']:9.2f} {r['log_ms']:12.3f} {r['max_ms']:7.2f} "
              f"{1000 * (r['per_step'] - base):17.2f} {r['values']:12.1f} {r['sender']:9.2f} {r['us_value']:9.0f} "
              f"{r['close']:8.2f}")
    if 64 in results:
        print(f"population logging: {results[64]['log_ms']:.3f} ms/step on the training thread at K=64")


if __name__ == "__main__":
    main()
