"""Page load and update time of the live dashboard (``optstudy dashboard``) at the size of the DeepOBS-protocol study.

    python benchmarks/dashboard.py [--source /work/runs/deepobs] [--study deepobs_protocol] [--scales 1 10]
                                   [--updates 3] [--no-browser] [--no-warm] [--synthetic]

The source's ``optuna.journal`` and ``mlflow.db`` are copied to a temporary directory first (the source is never
written; the runs' artifacts are read where the database says they are). Where the source has no journal (or with
``--synthetic``), a study of the same shape is made up instead, in seconds: 12 optimizers x 36 learning rates x 10
seeds, made-up values, about a third diverged, no MLflow runs (the curve and effective-LR views then draw a note).
``--scales``: 1 is the study as it is (432 trials of 10 seeds each: 4,320 runs); 10 is the same 4,320 runs as 4,320
single-seed trials (each seed value a trial of its own, in a journal of its own), so the trial table and every
per-trial pass is ten times longer. For each scale:

- in this process (no HTTP): opening the storage and the first full state (journal replay, tables), the state's JSON
  size; drawing each view once (the slowest named); fANOVA importances; and the server's part of an update: a trial is
  added as a worker tells one, then the poll that returns it and the redrawing of the views whose key changed;
- over HTTP, from a real ``optstudy dashboard`` process on the copies: a poll when nothing changed;
- in headless Chromium (unless ``--no-browser``): the page's load, from navigation until every view's image is decoded
  and the trial table holds its rows (every trial, or the newest 200 of a larger study), on the first visit (right
  after the server answers: figures drawn on demand, or by the background warmer while the page asks) and the second
  (figures cached); then ``--updates`` times a trial is added and the time until its row is on the page and until
  every changed figure is decoded again. The page polls every 2 s, so an update waits 1 s on average for the poll;
- in headless Chromium, unless ``--no-warm``: a second server, left alone until its background warmer has drawn every
  figure (the time from its start is shown), then the page's first visit.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import _cli  # benchmarks/_cli.py (a script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/chromium.py: the browser driver the dashboard's tests use


def copies(source: Path, work: Path) -> tuple[Path, str]:
    shutil.copy(source / "optuna.journal", work / "optuna.journal")
    shutil.copy(source / "mlflow.db", work / "mlflow.db")
    return work / "optuna.journal", f"sqlite:///{work / 'mlflow.db'}"


def storage(path: Path):
    import optuna

    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


OPTIMIZERS = ["sgd", "momentum", "nesterov", "adagrad", "adadelta", "rmsprop", "adam", "adamax", "nadam", "amsgrad",
              "adabound", "amsbound"]
LRS = [float(f"{10 ** (-5 + i / 5):.3g}") for i in range(36)]  # the protocol's grid: 1e-05 .. 100, 5 per decade


def synthetic(work: Path, name: str) -> tuple[Path, str]:
    """A made-up study of the DeepOBS protocol's shape, for where the source is absent: its journal and an empty
    MLflow store. Each optimizer's loss is a parabola in log10(lr) around its own best lr, plus seed noise; past
    1.8 decades above it the trial fails as diverged."""
    import numpy as np
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    rng = np.random.default_rng(0)
    seeds = list(range(10))
    study = optuna.create_study(study_name=name, storage=storage(work / "optuna.journal"), direction="minimize")
    spec = {"name": name, "objective": "val_loss", "direction": "minimize", "seeds": seeds, "sampler": {"name": "grid"},
            "pruner": {"name": "none"}, "optimizers": {o: {"lr": LRS} for o in OPTIMIZERS}}
    for key, value in {"objective": "val_loss", "direction": "minimize", "optimizers": OPTIMIZERS, "seeds": seeds,
                       "spec": spec, "budget": "synthetic: made-up values, no MLflow runs"}.items():
        study.set_user_attr(key, value)
    distributions = {"optimizer": CategoricalDistribution(OPTIMIZERS), "lr": FloatDistribution(1e-5, 100.0, log=True)}
    trials = []
    for i, optimizer in enumerate(OPTIMIZERS):
        for lr in LRS:
            x = math.log10(lr) - (-3.5 + 0.2 * i)  # decades above this optimizer's best lr
            params = {"optimizer": optimizer, "lr": lr}
            if x > 1.8:
                trials.append(create_trial(state=TrialState.FAIL, params=params, distributions=distributions,
                                           user_attrs={"fail_reason": "Diverged: made up"}))
                continue
            values = [float(v) for v in 0.3 + 0.1 * x * x + 0.02 * rng.standard_normal(len(seeds))]
            trials.append(create_trial(params=params, distributions=distributions, value=float(np.mean(values)),
                                       user_attrs={"seed_values": values}))
    study.add_trials(trials)
    return work / "optuna.journal", f"sqlite:///{work / 'mlflow.db'}"


def per_seed(journal: Path, name: str, out: Path) -> str:
    """The study with every seed value as a trial of its own (value, run id), in a new journal: 10x the trials."""
    import optuna
    from optuna.trial import create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=storage(journal))
    big = optuna.create_study(study_name=f"{name}_per_seed", storage=storage(out), direction="minimize")
    for key, value in study.user_attrs.items():
        big.set_user_attr(key, value)
    big.set_user_attr("seeds", [0])
    trials = []
    for t in study.get_trials(deepcopy=False):
        values = t.user_attrs.get("seed_values") or [t.value] * 10
        run_ids = t.user_attrs.get("mlflow_run_ids") or [None] * len(values)
        for value, run_id in zip(values, run_ids):
            attrs = {k: v for k, v in t.user_attrs.items() if k not in ("seed_values", "mlflow_run_ids")}
            if t.state.name == "COMPLETE":
                attrs.update(seed_values=[value], mlflow_run_ids=[run_id], mlflow_run_id=run_id)
            trials.append(create_trial(state=t.state, params=t.params, distributions=t.distributions,
                                       value=value if t.state.name == "COMPLETE" else None, user_attrs=attrs))
    big.add_trials(trials)
    return big.study_name


def add_trial(journal: Path, name: str, k: int) -> int:
    """What a worker's tell writes: a completed copy of a trial with a slightly different value; its number."""
    import optuna
    from optuna.trial import create_trial

    study = optuna.load_study(study_name=name, storage=storage(journal))
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    model = done[(37 * k) % len(done)]
    attrs = dict(model.user_attrs)
    attrs["seed_values"] = [v * (1 + 1e-3 * (k + 1)) for v in attrs.get("seed_values") or [model.value]]
    study.add_trial(create_trial(params=model.params, distributions=model.distributions,
                                 value=model.value * (1 + 1e-3 * (k + 1)), user_attrs=attrs))
    return len(study.trials) - 1


def in_process(journal: Path, name: str, uri: str) -> dict:
    from optstudy.dashboards.app import Dashboard

    out = {}
    start = time.perf_counter()
    dash = Dashboard(str(journal), uri)
    state = dash.state(name)
    out["first_state_s"] = time.perf_counter() - start
    importances_from = time.perf_counter()  # the first state started fANOVA in the background
    out["state_json_kb"] = len(json.dumps(state)) / 1024
    out["trials"] = len(state["trials"])
    live = dash.study(name)
    draws = {}
    for view in state["views"]:
        start = time.perf_counter()
        dash.figure(name, view["id"], view["key"])
        draws[view["id"]] = time.perf_counter() - start
    out["views"] = len(draws)
    out["draw_all_s"] = sum(draws.values())
    out["slowest"] = ", ".join(f"{v} {draws[v]:.1f} s" for v in sorted(draws, key=draws.get, reverse=True)[:4])
    while live.imp["running"]:
        time.sleep(0.05)
    out["importances_s"] = time.perf_counter() - importances_from  # while the views were drawn, on the same cores
    # an update: the poll that returns a new trial, then the views whose key changed, redrawn
    before = {v["id"]: v["key"] for v in dash.state(name)["views"]}
    number = add_trial(journal, name, 99)
    start = time.perf_counter()
    live.refresh(force=True)
    out["read_s"], out["interval_s"] = live.read_s, live.interval()
    changed = dash.state(name, live.generation - 1)
    out["update_poll_s"] = time.perf_counter() - start
    assert any(r["number"] == number for r in changed["trials"])
    redraw = [v for v in changed["views"] if before.get(v["id"]) != v["key"]]
    start = time.perf_counter()
    for view in redraw:
        dash.figure(name, view["id"], view["key"])
    out["update_redraw_s"] = time.perf_counter() - start
    out["update_views"] = len(redraw)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(journal: Path, uri: str, work: Path):
    port = free_port()
    log = (work / f"dashboard-{port}.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "optstudy"), "dashboard", "--storage", str(journal),
                             "--tracking-uri", uri, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/studies", timeout=60).read()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / f"dashboard-{port}.log").read_text()[-2000:]) from None
            time.sleep(0.5)


def warmed(url: str, timeout: float = 1800) -> None:
    """Waits until the server's background warmer has drawn every study's figures."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"{url}/api/studies", timeout=60) as r:
            if not json.load(r).get("warming"):
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"still warming after {timeout:.0f} s")
        time.sleep(0.5)


def http_poll(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/api/study/{name}", timeout=120) as r:
        generation = json.load(r)["generation"]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        with urllib.request.urlopen(f"{url}/api/study/{name}?since={generation}", timeout=60) as r:
            r.read()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


SHOWN = 200  # the page's trial table shows the newest 200 trials until "show all"
LOADED = """(() => { const imgs = [...document.querySelectorAll('figure[data-view] img')];
  return !window.__stale && window.optstudy && window.optstudy.updates > 0 && imgs.length >= %d
    && imgs.every(i => i.complete && i.naturalWidth > 0)
    && document.querySelectorAll('#trial-table tbody tr').length >= %d; })()"""


def browser(url: str, name: str, journal: Path, views: int, trials: int, updates: int, work: Path,
            visits=("first", "second")) -> dict:
    from tests import chromium

    async def scenario(page):
        out = {}
        for visit in visits:
            await page.js("window.__stale = true")  # the condition below must not hold on the page before
            start = time.perf_counter()
            await page.send("Page.navigate", url=f"{url}/study/{name}")
            await page.wait_for(LOADED % (views, min(trials, SHOWN)), timeout=600)
            out[f"load_{visit}_s"] = time.perf_counter() - start
        rows, figures = [], []
        for k in range(updates):
            await asyncio.sleep(2.5)  # the page between polls, as a user finds it
            generation = await page.js("window.optstudy.generation")
            number = add_trial(journal, name, k)
            start = time.perf_counter()
            await page.wait_for(f"document.querySelector('tr[data-trial=\"{number}\"]') !== null", timeout=60)
            rows.append(time.perf_counter() - start)
            await page.wait_for(f"window.optstudy.generation > {generation} && " + LOADED % (views, min(trials + k + 1, SHOWN)),
                                timeout=120)
            figures.append(time.perf_counter() - start)
        if updates:
            out.update(update_row_s=statistics.mean(rows), update_row_max_s=max(rows),
                       update_figures_s=statistics.mean(figures), update_figures_max_s=max(figures))
        out["console_errors"] = len(page.errors)
        return out

    result, _ = chromium.in_browser(work, scenario)
    return result


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


def main() -> None:
    p = _cli.parser(__doc__, "about 12 minutes at the defaults (two scales, the browser included) on the 2-core VM; "
                             "scale 10 alone (--scales 10): about 4 minutes")
    p.add_argument("--source", type=Path, default=Path("/work/runs/deepobs"),
                   help="a directory with optuna.journal and mlflow.db of a finished study (only read)")
    p.add_argument("--study", default="deepobs_protocol", help="the study's name in the journal")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 10], choices=[1, 10],
                   help="1: the study as it is; 10: every seed value a trial of its own")
    p.add_argument("--updates", type=int, default=3, help="trials added while the page is open, one at a time")
    p.add_argument("--no-browser", action="store_true", help="skip the measurements in headless Chromium")
    p.add_argument("--no-warm", action="store_true",
                   help="skip the first visit to a second server left to warm its figures (minutes at scale 10)")
    p.add_argument("--synthetic", action="store_true",
                   help="a made-up study of the same shape, even if --source has one")
    args = p.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="optstudy-dashboard-bench-"))
    try:
        if args.synthetic or not (args.source / "optuna.journal").exists():
            print(f"a synthetic study (no {args.source / 'optuna.journal'}, or --synthetic)", flush=True)
            journal, uri = synthetic(work, args.study)
        else:
            journal, uri = copies(args.source, work)
        for scale in args.scales:
            name, path = args.study, journal
            if scale == 10:
                path = work / "per_seed.journal"
                name = per_seed(journal, args.study, path)
            print(f"\n== {name}: scale {scale} ({load()}) ==", flush=True)
            local = in_process(path, name, uri)
            print(f"trials {local['trials']}; first state (journal replay + tables) {local['first_state_s']:.2f} s, "
                  f"{local['state_json_kb']:.0f} KiB of JSON; {local['views']} views drawn in "
                  f"{local['draw_all_s']:.2f} s (slowest: {local['slowest']}); "
                  f"importances (fANOVA, background) ready after {local['importances_s']:.1f} s", flush=True)
            print(f"update on the server: the poll returning a new trial {local['update_poll_s'] * 1000:.0f} ms, "
                  f"{local['update_views']} changed views redrawn in {local['update_redraw_s']:.2f} s; a read of the "
                  f"trials {local['read_s'] * 1000:.0f} ms (next read after {local['interval_s']:.1f} s)", flush=True)
            trials = local["trials"] + 1  # in_process added one
            views = local["views"]  # importances not among them: they come later, from the background
            proc, url = served(path, uri, work)
            try:
                print(f"HTTP poll with nothing new (median of 5): {http_poll(url, name) * 1000:.1f} ms", flush=True)
                if not args.no_browser:
                    b = browser(url, name, path, views, trials, args.updates, work)
                    trials += args.updates
                    updates = (f"; a new trial's row after {b['update_row_s']:.2f} s "
                               f"(max {b['update_row_max_s']:.2f}), its figures after {b['update_figures_s']:.2f} s "
                               f"(max {b['update_figures_max_s']:.2f})" if args.updates else "")
                    print(f"browser: page load {b['load_first_s']:.2f} s first visit (right after the server "
                          f"answered), {b['load_second_s']:.2f} s second (cached){updates}; console errors "
                          f"{b['console_errors']}", flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
            if not (args.no_browser or args.no_warm):
                start = time.perf_counter()
                proc, url = served(path, uri, work)
                try:
                    warmed(url)
                    warm_s = time.perf_counter() - start
                    b = browser(url, name, path, views, trials, 0, work, visits=("first",))
                    print(f"browser, a second server left to warm its figures ({warm_s:.1f} s from its start, "
                          f"importances included): page load {b['load_first_s']:.2f} s first visit; console errors "
                          f"{b['console_errors']}", flush=True)
                finally:
                    proc.terminate()
                    proc.wait(30)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
