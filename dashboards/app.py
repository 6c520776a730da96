"""The live dashboard: ``optstudy dashboard`` serves a small page over a JSON API, over the Optuna storage and the
MLflow store that studies write (journal file, SQLite, PostgreSQL, an ``mlflow server``).

Pages: ``/`` lists every study (trials by state, budget, best value); ``/study/NAME`` shows the report's views of one
study, live. The page polls ``/api/study/NAME?since=G`` every few seconds: the server keeps a *generation* per study,
bumped when a refresh sees any trial change (a new trial, a state, a value), and answers with only the trials that
changed after G and the views whose key changed; an unchanged study costs a reply of a few bytes. Figures are PNGs
drawn by ``views`` (the same functions the static report embeds), at ``/api/study/NAME/figure/VIEW.png?v=KEY``:
a view's key is a digest of exactly what it is drawn from, so the browser fetches a figure again only when its
picture can have changed, and the server draws each (view, key) once. Importances (fANOVA, tens of seconds at a few
thousand trials) are computed in a background thread and shown when ready.

Figures are drawn before they are asked for: ``serve`` starts a warmer thread that draws every study's current views
(the views and keys the page will ask for, importances once ready) at start, and again whenever a study's generation
changes; a first visit then finds them drawn (4,320 trials: 28 figures, tens of seconds cold). One figure is drawn at
a time (``DRAWING``: matplotlib's mathtext is not thread-safe); a page's request for a figure being drawn waits for
that drawing, and a page's request for another takes its turn before the warmer's next figure.

A study's trials are read at most every max(REFRESH_S, READ_K x the last read's duration) seconds, however many pages
poll (the home page's summaries use the same read): a slow storage is not read back to back.

Starlette and uvicorn (what MLflow's own server runs on, so nothing new to install); the page is plain HTML and
JavaScript from ``static/``: nothing is fetched from the internet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import optuna
import pandas as pd
from optstudy.dashboards import figures, report, robustness, runs, views
from optstudy.dashboards import trials as tr
from optstudy.dashboards.importance import importances
from optuna.trial import TrialState

STATIC = Path(__file__).parent / "static"
log = logging.getLogger(__name__)
REFRESH_S = 1.0  # at most one read of a study's trials per second, however many browsers poll
# ... and at most one per READ_K times the last read's duration: a slow storage (a loaded PostgreSQL) then spends at
# most 1/READ_K of its time on this dashboard's reads of a study. With the 2 s poll, a new trial is on the page within
# (READ_K + 1) x read + 2 s: within 10 s for reads up to 1.3 s (a 4,320-trial read takes milliseconds once Optuna's
# own cache is filled: journal replay, the RDB storage's finished trials)
READ_K = 5
POLL_MS = 2000  # how often the page asks for changes
IMPORTANCE_EVERY_S = 20.0  # fANOVA is slow: recomputed at most this often while trials land
STATES = ["COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"]
FINISHED = {s.value for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
PER_OPTIMIZER = ("hp", "pairs", "heatmap")  # views named kind:optimizer (Dashboard._views)
STUDY_VIEWS = ("lr", "importances", "curves", "final", "bounds")


def digest(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Links:
    """Where the browser finds the MLflow UI and optuna-dashboard (their addresses as the user's browser sees them)."""

    mlflow: str | None
    optuna_dashboard: str | None

    def run(self, experiment_id, run_id) -> str | None:
        if not (self.mlflow and run_id):
            return None
        return f"{self.mlflow.rstrip('/')}/#/experiments/{experiment_id or 0}/runs/{run_id}"

    def trial(self, study_id: int, number: int) -> str | None:
        if not self.optuna_dashboard:
            return None
        return f"{self.optuna_dashboard.rstrip('/')}/dashboard/studies/{study_id}/trials?numbers={number}"


class Turns:
    """Whose figure is drawn next: one figure at a time (matplotlib's mathtext parser, for log-axis labels, is not
    thread-safe), and a page's request before the background warmer's next figure (the warmer never interrupts a
    drawing, so a request waits for at most the one figure being drawn)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._busy = False
        self.pages = 0  # page requests waiting for their turn

    @contextmanager
    def turn(self, background: bool = False):
        with self._cond:
            if background:
                self._cond.wait_for(lambda: not self._busy and not self.pages)
            else:
                self.pages += 1
                self._cond.notify_all()
                self._cond.wait_for(lambda: not self._busy)
                self.pages -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def queued(self, pages: int, timeout: float | None = None) -> bool:
        """Waits until ``pages`` page requests wait for their turn (for tests)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.pages >= pages, timeout)


DRAWING = Turns()


@dataclass
class Pending:
    """A picture being drawn: who asks for the same (view, key) meanwhile waits for it rather than drawing it too."""

    done: threading.Event = field(default_factory=threading.Event)
    picture: bytes | None = None


@dataclass
class Live:
    """One study as the dashboard holds it: the last snapshot of its trials, the generation at which each trial last
    changed, the tables of the current generation, and the figures drawn so far (by view and key)."""

    study: optuna.Study
    study_id: int
    tracking_uri: str | None
    on_change: Callable[[], None] | None = None  # called (under ``lock``) when the generation is bumped
    generation: int = 0
    signatures: dict = field(default_factory=dict)  # number -> what a change of shows
    changed_at: dict = field(default_factory=dict)  # number -> generation
    trials: list = field(default_factory=list)  # the last read: the page's rows and the summary, read no more often
    refreshed: float = -math.inf  # when the last read began (``clock``)
    read_s: float = 0.0  # how long it took
    reads: int = 0
    clock: Callable[[], float] = time.monotonic  # a seam: tests set the time instead of sleeping
    _tables: tuple | None = None  # (generation, report.Tables)
    pngs: dict = field(default_factory=dict)  # (view, key) -> bytes
    drawing: dict = field(default_factory=dict)  # (view, key) -> Pending
    draws: Counter = field(default_factory=Counter)  # (view, key) -> times drawn (a picture is drawn once: tests)
    imp: dict = field(default_factory=lambda: {"key": None, "table": None, "notes": [], "running": False, "at": 0.0})
    imp_idle: threading.Event = field(default_factory=threading.Event)  # cleared while fANOVA runs
    lock: threading.RLock = field(default_factory=threading.RLock)
    _client: object = None

    def __post_init__(self):
        self.imp_idle.set()

    def interval(self) -> float:
        """Seconds between the starts of two reads: REFRESH_S, or READ_K reads' time when reads are slow."""
        return max(REFRESH_S, READ_K * self.read_s)

    def refresh(self, force: bool = False) -> None:
        """Reads the trials (at most every ``interval()`` seconds) and bumps the generation if any changed."""
        with self.lock:
            start = self.clock()
            if not force and start - self.refreshed < self.interval():
                return
            trials = self.study.get_trials(deepcopy=False)
            changed = []
            for t in trials:
                sig = (t.state.value, t.value, str(t.datetime_complete), bool(t.user_attrs.get("surplus")),
                       len(t.user_attrs))
                if self.signatures.get(t.number) != sig:
                    self.signatures[t.number] = sig
                    changed.append(t.number)
            # the first read fills Optuna's own cache (journal replay, the RDB storage's finished trials); the next
            # ones read only what changed, and they set the pace
            self.read_s = self.clock() - start if self.reads else 0.0
            self.refreshed, self.trials, self.reads = start, trials, self.reads + 1
            if changed:
                self.bump()
                for number in changed:
                    self.changed_at[number] = self.generation

    def bump(self) -> None:
        """A new generation: the page fetches what changed at its next poll, the warmer draws the new figures."""
        with self.lock:
            self.generation += 1
            if self.on_change:
                self.on_change()

    def tables(self) -> report.Tables:
        with self.lock:
            if self._tables is None or self._tables[0] != self.generation:
                self._tables = (self.generation, report.tables(self.study))
            return self._tables[1]

    @property
    def client(self):
        """MLflow, through a cache of what was read (the views draw finished runs: their histories are final)."""
        if self._client is None:
            client = runs.client(self.tracking_uri)
            self._client = client if isinstance(client, runs.Missing) else runs.Cached(client)
        return self._client

    def png(self, view: str, key: str, draw, background: bool = False) -> bytes:
        """The view's picture for ``key``, drawn once: who asks for a picture being drawn (a second browser, or a page
        while the warmer draws it) waits for that drawing. ``background``: the warmer's, drawn after the page's."""
        while True:
            with self.lock:
                cached = self.pngs.get((view, key))
                if cached is not None:
                    return cached
                pending = self.drawing.get((view, key))
                if pending is None:
                    pending = self.drawing[(view, key)] = Pending()
                    break
            pending.done.wait()
            if pending.picture is not None:  # else that drawing was interrupted: draw it here
                return pending.picture
        try:
            with DRAWING.turn(background):
                pending.picture = self._drawn(view, key, draw)
        finally:
            with self.lock:
                del self.drawing[(view, key)]
            pending.done.set()
        return pending.picture

    def _drawn(self, view: str, key: str, draw) -> bytes:
        with self.lock:
            self.draws[(view, key)] += 1
        try:
            picture = draw()
        except Exception as exc:  # the page shows why, the log has the traceback
            log.exception("drawing %s of %s", view, self.study.study_name)
            return figures.message(f"{view} could not be drawn: {type(exc).__name__}: {exc}"[:300])
        with self.lock:
            # the two newest pictures of a view only: a long-running study would otherwise keep every generation's,
            # and the warmer finishing the previous generation's must not evict the one the page just asked for
            self.pngs.pop((view, key), None)
            self.pngs[(view, key)] = picture
            for old in [k for k in self.pngs if k[0] == view][:-2]:
                del self.pngs[old]
        return picture


class Dashboard:
    """The studies of one Optuna storage, read through one storage object (a journal file is replayed once, then
    only its new lines)."""

    def __init__(self, storage_url: str | None, tracking_uri: str | None = None, links: Links | None = None):
        from optstudy.study.storage import open_storage

        self.storage, self.url = open_storage(storage_url)
        self.tracking_uri = tracking_uri
        self.links = links or Links(None, None)
        self.live: dict[str, Live] = {}
        self.lock = threading.Lock()
        self._warm = threading.Condition()  # guards what follows
        self._warmer: threading.Thread | None = None
        self._queue: dict[str, None] = {}  # studies to warm, in order (a dict: a study is queued once)
        self._busy: str | None = None  # the study being warmed

    # --- figures drawn before they are asked for ----------------------------------------------------------------
    def start_warming(self) -> None:
        """Draws every study's current figures in a background thread, now and whenever a study's generation changes,
        so that a page finds them drawn (a cold study of 4,320 trials: 28 figures, tens of seconds)."""
        with self._warm:
            if self._warmer is not None:
                return
            self._busy = ""  # listing the studies: not warmed yet
            self._warmer = threading.Thread(target=self._warm_forever, daemon=True, name="warm figures")
        self._warmer.start()

    def warm(self, name: str) -> None:
        """Queues a study for the warmer (nothing unless it was started)."""
        with self._warm:
            if self._warmer is not None:
                self._queue[name] = None
                self._warm.notify_all()

    def warmed(self, timeout: float | None = None) -> bool:
        """Waits until no study is queued or being warmed: True, or False after ``timeout`` seconds."""
        with self._warm:
            return self._warm.wait_for(lambda: not self._queue and self._busy is None, timeout)

    def _warm_forever(self) -> None:
        try:
            for frozen in sorted(self.storage.get_all_studies(), key=lambda s: s.study_name):
                self.warm(frozen.study_name)
        except Exception:  # the pages still work, drawing on demand
            log.exception("listing the studies to warm")
        while True:
            with self._warm:
                self._busy = None
                self._warm.notify_all()
                self._warm.wait_for(lambda: self._queue)
                self._busy = name = next(iter(self._queue))
                del self._queue[name]
            try:
                self._warm_study(name)
            except Exception:  # tried again at the study's next change; a page draws on demand
                log.exception("warming the figures of %s", name)

    def _warm_study(self, name: str) -> None:
        """One pass over the study's current views, drawing those not drawn yet, after every page's request; then
        waits for its importances (one fANOVA at a time from here), whose end queues the study again for their
        figure."""
        live = self.study(name)
        live.refresh()
        generation, t = live.generation, live.tables()
        self._importances(live, t)
        for v in self._views(live, t):
            if live.generation != generation:
                return  # the study changed: it is queued again, with the new keys
            self.figure(name, v["id"], v["key"], background=True)
        live.imp_idle.wait()

    # --- the home page ------------------------------------------------------------------------------------------
    def studies(self) -> list[dict]:
        out = []
        for frozen in sorted(self.storage.get_all_studies(), key=lambda s: s.study_name):
            live = self.study(frozen.study_name)
            live.refresh()
            out.append(self.summary(frozen.study_name, live))
        return out

    def summary(self, name: str, live: Live) -> dict:
        attrs = live.study.user_attrs
        ident = attrs.get("identity") or {}
        trials = live.trials  # the last refresh's: the home page's polls read no more often than a study page's
        kept = [t for t in trials if not t.user_attrs.get("surplus")]
        s = tr.settings(live.study)
        best = tr.best_trial(trials, s.sign)
        return {"name": name, "url": f"/study/{quote(name, safe='')}", "study_id": live.study_id,
                "trials": len(trials), "states": {st: sum(t.state.name == st for t in kept) for st in STATES},
                "surplus": len(trials) - len(kept), "objective": s.objective, "direction": s.direction,
                "model": ident.get("model.name"), "data": ident.get("data.name"),
                "epochs": ident.get("trainer.max_epochs"), "seeds": s.seeds, "budget": attrs.get("budget"),
                "optimizers": s.optimizers, "best": None if best is None else _num(best.value),
                "best_trial": None if best is None else best.number,
                "best_params": None if best is None else _jsonable(best.params), "generation": live.generation}

    def study(self, name: str) -> Live:
        with self.lock:
            if name not in self.live:
                study = optuna.load_study(study_name=name, storage=self.storage)  # KeyError: no such study
                uri = self.tracking_uri or study.user_attrs.get("tracking_uri")
                self.live[name] = Live(study, self.storage.get_study_id_from_name(name), uri,
                                       on_change=lambda: self.warm(name))
            return self.live[name]

    # --- a study page -------------------------------------------------------------------------------------------
    def state(self, name: str, since: int = -1) -> dict:
        """What changed after generation ``since`` (everything for -1): the trials, the views and their keys."""
        live = self.study(name)
        live.refresh()
        if since == live.generation:
            return {"generation": live.generation, "changed": False}
        t = live.tables()
        numbers = {n for n, g in live.changed_at.items() if g > since}
        experiment_id = live.study.user_attrs.get("mlflow_experiment_id")
        rows = [self._trial_row(trial, live, experiment_id) for trial in live.trials if trial.number in numbers]
        self._importances(live, t)
        return {"generation": live.generation, "changed": True, "summary": self.summary(name, live),
                "trials": rows, "params": sorted({p for r in rows for p in r["params"]}),
                "views": self._views(live, t), "robustness": _records(robustness.table(
                    t.optimizers, t.configs, t.curve, t.trials, t.settings.sign)),
                "importances": {"table": _records(live.imp["table"]) if live.imp["table"] is not None else None,
                                "notes": live.imp["notes"], "running": live.imp["running"]},
                "notes": [f"{o}: {report._absent(t, o)}" for o in t.optimizers if o not in set(t.best["optimizer"])],
                "links": {"mlflow": self.links.mlflow, "optuna_dashboard": self.links.optuna_dashboard,
                          "tracking_uri": report._redacted(live.tracking_uri) if live.tracking_uri else None},
                "poll_ms": POLL_MS}

    def _trial_row(self, trial, live: Live, experiment_id) -> dict:
        attrs = trial.user_attrs
        run_ids = [r for r in attrs.get("mlflow_run_ids") or [attrs.get("mlflow_run_id")] if r]
        reason = attrs.get("fail_reason")
        # a waiting trial has no params yet: the grid point enqueued for it, if any
        params = trial.params or trial.system_attrs.get("fixed_params") or {}
        return {"number": trial.number, "state": trial.state.name, "surplus": bool(attrs.get("surplus")),
                "optimizer": params.get("optimizer"), "value": _num(trial.value),
                "params": _jsonable({k: v for k, v in params.items() if k != "optimizer"}),
                "seed_values": len(attrs.get("seed_values") or []), "runs": len(run_ids),
                "run_url": self.links.run(experiment_id, run_ids[0] if run_ids else None),
                "optuna_url": self.links.trial(live.study_id, trial.number),
                "fail_reason": reason[:300] if reason else None,
                "complete": trial.datetime_complete.isoformat(timespec="seconds") if trial.datetime_complete else None}

    def _views(self, live: Live, t: report.Tables) -> list[dict]:
        """Every view of the study with the key of what it is drawn from (a new key: the browser fetches it)."""
        out = []

        def add(view, title, section, key, caption=None):
            url = f"/api/study/{quote(live.study.study_name, safe='')}/figure/{quote(view, safe='')}.png?v={key}"
            out.append({"id": view, "title": title, "section": section, "key": key, "url": url, "caption": caption})

        for o in t.optimizers:
            mine = t.seeds[t.seeds["optimizer"] == o]
            if not len(mine):
                continue
            key = digest(mine[["trial", "value"]].to_numpy().tolist(), t.kinds)
            add(f"hp:{o}", o, "hyperparameters", key)
            if views.pair_params(t, o):
                add(f"pairs:{o}", f"{o}: 2-D views", "pairs", key)
        if len(t.curve):
            add("lr", "learning-rate sensitivity", "lr", digest(t.curve.to_json(), tr.diverged(t.trials).to_json(),
                                                                t.binned))
        if live.imp["table"] is not None and len(live.imp["table"]):
            add("importances", "importances (fANOVA)", "importances", live.imp["key"])
        best = [(r["optimizer"], r["run_ids"]) for _, r in t.best.iterrows()]
        if best:
            add("curves", "learning curves of the best configurations", "curves", digest(best))
            for o, ids in best:
                add(f"heatmap:{o}", f"{o}: effective learning rates", "eff_lr", digest(ids[:1]),
                    f"{o}, best configuration, first seed's run {ids[0] if ids else '—'}")
            add("final", "effective learning rates at the last record", "eff_lr", digest([ids[:1] for _, ids in best]))
        schedules = views.schedules(t)
        if schedules:
            add("bounds", "bound schedules", "bounds",
                digest({k: (f, repr(s)) for k, (f, s) in schedules.items()}, [ids[:1] for _, ids in best]))
        return out

    def _importances(self, live: Live, t: report.Tables) -> None:
        """Starts fANOVA in the background when the completed trials changed (at most every IMPORTANCE_EVERY_S)."""
        key = digest(t.seeds[["trial", "value"]].to_numpy().tolist()) if len(t.seeds) else "none"
        imp = live.imp
        with live.lock:
            if imp["running"] or imp["key"] == key or (imp["key"] is not None
                                                         and time.monotonic() - imp["at"] < IMPORTANCE_EVERY_S):
                return
            imp["running"], imp["at"] = True, time.monotonic()
            live.imp_idle.clear()

        def work():
            try:
                table, notes = importances(live.study, t.settings, t.optimizers)
            except Exception as exc:  # noqa: BLE001 - shown on the page, and the dashboard goes on
                table, notes = pd.DataFrame(), [f"importances failed: {type(exc).__name__}: {exc}"]
            with live.lock:
                imp.update(key=key, table=table, notes=notes, running=False, at=time.monotonic())
                live.bump()  # the page learns of it at its next poll, the warmer draws the figure
            live.imp_idle.set()

        threading.Thread(target=work, daemon=True, name=f"importances {live.study.study_name}").start()

    def figure(self, name: str, view: str, key: str, background: bool = False) -> bytes:
        """The picture of ``view`` (``lr``, ``hp:adam``, ...); KeyError for a view the study cannot have."""
        live = self.study(name)
        kind, colon, optimizer = view.partition(":")
        per_optimizer = kind in PER_OPTIMIZER
        if kind not in (*PER_OPTIMIZER, *STUDY_VIEWS) or per_optimizer != bool(colon) or \
                (per_optimizer and optimizer not in live.tables().optimizers):
            raise KeyError(view)  # checked here: a KeyError while drawing becomes a picture of the error
        return live.png(view, key, lambda: self._draw(live, view), background)

    def _draw(self, live: Live, view: str) -> bytes:
        t = live.tables()
        kind, _, optimizer = view.partition(":")
        client = live.client
        if kind == "hp":
            return views.hyperparameters(t, optimizer) or figures.message(f"{optimizer}: no completed configuration")
        if kind == "pairs":
            return views.pairs(t, optimizer) or figures.message(f"{optimizer}: only lr varies")
        if kind == "lr":
            return views.lr_sensitivity(t) or figures.message("no completed configuration yet")
        if kind == "importances":
            table = live.imp["table"]
            return views.importances(table) if table is not None and len(table) else figures.message("not yet")
        if kind in ("curves", "heatmap", "final", "bounds") and isinstance(client, runs.Missing):
            return figures.message(str(client))
        if kind == "curves":
            shown, notes = views.best_curves(t, client)
            return views.curves(shown, t) or figures.message("; ".join(notes) or "no learning curves")
        if kind == "heatmap":
            found, notes = views.best_histograms(_only(t, optimizer), client)
            return views.heatmap(found[0][3], optimizer) if found else figures.message("; ".join(notes))
        if kind == "final":
            found, notes = views.best_histograms(t, client)
            return views.final_distributions(found, t)[0] or figures.message("; ".join(notes) or "no histograms")
        found, _ = views.best_histograms(_bounded(t), client)  # bounds
        return views.bound_schedules(t, views.bound_steps(found)) or figures.message("no AdaBound/AMSBound configuration")

    def compare(self, name: str, numbers: list[int]) -> bytes:
        """The learning curves of the chosen trials (mean over each trial's seeds, band min-max)."""
        live = self.study(name)
        t = live.tables()
        if isinstance(live.client, runs.Missing):
            return figures.message(str(live.client))
        if not numbers:
            return figures.message("select trials in the table to compare their learning curves")
        key = digest(numbers, [live.signatures.get(n) for n in numbers])

        finished = all(live.signatures.get(n, (None,))[0] in FINISHED for n in numbers)
        client = live.client if finished else live.client.client  # a running trial's curve still grows

        def draw():
            shown, color, notes = views.trial_curves(t, client, numbers)
            return views.curves(shown, t, color, "chosen trials: mean over seeds, band min-max") or \
                figures.message("; ".join(notes) or "no learning curves")
        return live.png("compare", key, draw)


def _only(t: report.Tables, optimizer: str) -> report.Tables:
    """The tables with only one optimizer's best configuration (a heatmap reads one run, not every optimizer's)."""
    return _with_best(t, t.best[t.best["optimizer"] == optimizer])


def _bounded(t: report.Tables) -> report.Tables:
    return _with_best(t, t.best[t.best["optimizer"].isin(views.BOUNDED)])


def _with_best(t: report.Tables, best: pd.DataFrame) -> report.Tables:
    from dataclasses import replace

    return replace(t, best=best.reset_index(drop=True))


def _num(value):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def _jsonable(params: dict) -> dict:
    return {k: (v if isinstance(v, (str, int, bool)) or v is None else _num(float(v))) for k, v in params.items()}


def _records(table: pd.DataFrame) -> list[dict]:
    """Rows for JSON: NaN as null, NumPy scalars as Python's."""
    return json.loads(table.replace({np.nan: None}).to_json(orient="records")) if len(table) else []


# --- the web app -------------------------------------------------------------------------------------------------
def create_app(dashboard: Dashboard):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    def home(request):
        return FileResponse(STATIC / "index.html")

    def study_page(request):
        return FileResponse(STATIC / "study.html")

    def api_studies(request):
        return JSONResponse({"studies": dashboard.studies(), "storage": report._redacted(str(dashboard.url)),
                             "warming": not dashboard.warmed(0)})  # figures still being drawn in the background

    def _live_or_404(name):
        try:
            return dashboard.study(name)
        except KeyError:
            raise HTTPException(404, f"no study {name!r}") from None

    def api_study(request):
        name = request.path_params["name"]
        _live_or_404(name)
        try:
            since = int(request.query_params.get("since", -1))
        except ValueError:
            raise HTTPException(400, "since must be an integer") from None
        return JSONResponse(dashboard.state(name, since))

    def api_figure(request):
        name, view = request.path_params["name"], request.path_params["view"]
        _live_or_404(name)
        try:
            picture = dashboard.figure(name, view, request.query_params.get("v", ""))
        except KeyError:
            raise HTTPException(404, f"no view {view!r}") from None
        # the URL carries the key of what the picture is drawn from: the same URL is the same picture
        return Response(picture, media_type="image/png", headers={"Cache-Control": "max-age=86400, immutable"})

    def api_compare(request):
        name = request.path_params["name"]
        _live_or_404(name)
        text = request.query_params.get("trials", "")
        try:
            numbers = [int(n) for n in text.split(",") if n.strip()][:20]
        except ValueError:
            raise HTTPException(400, "trials must be trial numbers separated by commas") from None
        return Response(dashboard.compare(name, numbers), media_type="image/png")

    def favicon(request):  # browsers ask for it: an empty answer, not a 404 in the console
        return Response(b"", status_code=204)

    return Starlette(routes=[
        Route("/", home), Route("/study/{name:path}", study_page), Route("/favicon.ico", favicon),
        Route("/api/studies", api_studies), Route("/api/study/{name}/figure/{view}.png", api_figure),
        Route("/api/study/{name}/compare.png", api_compare), Route("/api/study/{name}", api_study),
        Mount("/static", StaticFiles(directory=STATIC), name="static")])


def serve(storage_url: str | None, tracking_uri: str | None, host: str, port: int, mlflow_url: str | None = None,
          optuna_dashboard_url: str | None = None) -> None:
    """Runs the dashboard until interrupted. Links to runs go to ``mlflow_url`` (default: the tracking URI when it
    is an MLflow server, else ``http://127.0.0.1:5000``, where ``mlflow ui`` listens), to trials to
    ``optuna_dashboard_url`` (default ``http://127.0.0.1:8080``, optuna-dashboard's port)."""
    import uvicorn

    if mlflow_url is None:
        mlflow_url = tracking_uri if tracking_uri and tracking_uri.startswith("http") else "http://127.0.0.1:5000"
    dashboard = Dashboard(storage_url, tracking_uri, Links(mlflow_url, optuna_dashboard_url or "http://127.0.0.1:8080"))
    dashboard.start_warming()
    print(f"optstudy dashboard: http://{host}:{port}/ (storage {report._redacted(str(dashboard.url))})", flush=True)
    uvicorn.run(create_app(dashboard), host=host, port=port, log_level="warning")
