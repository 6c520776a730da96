"""The live dashboard (``optstudy dashboard``) in headless Chromium, driven over the DevTools protocol: a real study
(``optstudy study run`` on a journal file, tracked in a SQLite MLflow store, AdaBound over lr × final_lr and Adam over
lr, 2 seeds, 2 epochs), the real command serving it, and a second real worker adding trials while the page is open.

The page must list the study, show every view (each image decoded, not blank), log no console error, request nothing
outside the dashboard, and show a trial the worker finished within 10 s without a reload. Screenshots go to the test's
directory, and to $OPTSTUDY_SCREENSHOTS when set (dash_home.png, dash_study.png, dash_live.png).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from . import chromium

BIN = Path(sys.executable).parent
STUDY = """\
name: live
objective: val_loss
direction: minimize
seeds: [0, 1]
sampler: {name: grid}
pruner: {name: none}
overrides: [trainer.max_epochs=2, logger.eff_lr_every_n_steps=5]
optimizers:
  adabound: {lr: [1.0e-3, 1.0e-2], final_lr: [0.01, 0.1]}
  adam: {lr: [1.0e-3, 1.0e-2, 0.1]}
"""
FIRST = 5  # trials before the page opens: AdaBound's four (lr × final_lr: its 2-D view) and Adam's first
LIVE_S = 10.0  # a finished trial is on the page this soon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(directory: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{directory / 'mlflow.db'}"}
    return subprocess.Popen([str(BIN / "optstudy"), "study", "run", "live.yaml", "--storage", "journal.log", *args],
                            cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("live")
    (directory / "live.yaml").write_text(STUDY)
    proc = worker(directory, "--n-trials", str(FIRST))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert out.count(" val_loss=") >= FIRST
    return directory


@pytest.fixture(scope="module")
def server(study_dir) -> str:
    port = free_port()
    with open(study_dir / "dashboard.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "optstudy"), "dashboard", "--storage", "journal.log", "--port", str(port)],
                                cwd=study_dir, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/studies", timeout=5).read()
                break
            except OSError:
                assert proc.poll() is None, (study_dir / "dashboard.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the dashboard did not answer in 180 s"
                time.sleep(0.5)
        yield url
        proc.terminate()
        proc.wait(timeout=30)


def in_browser(tmp: Path, scenario):
    """``chromium.in_browser``, skipped where Chromium is missing (a failure in CI, which installs it)."""
    try:
        return chromium.in_browser(tmp, scenario)
    except chromium.NoChromium as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def keep(path: Path) -> None:
    if os.environ.get("OPTSTUDY_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["OPTSTUDY_SCREENSHOTS"]) / path.name)


def assert_clean(page: chromium.Page, server: str) -> None:
    assert page.errors == [], page.errors
    foreign = [u for u in page.requests if not u.startswith((server + "/", "data:"))]
    assert foreign == [], foreign  # nothing from the internet: scripts, styles and figures are the dashboard's


def not_blank(pixels: np.ndarray) -> None:
    assert (pixels.min(-1) < 240).mean() > 0.02  # text and figures
    assert ((pixels.max(-1) - pixels.min(-1)) > 60).sum() > 5000  # the figures' colours were decoded and drawn


# --- the pages -----------------------------------------------------------------------------------------------------
def test_home_page_lists_the_study(server, tmp_path):
    async def scenario(page):
        await page.send("Page.navigate", url=server + "/")
        await page.wait_for("document.querySelector('tr[data-study=\"live\"]') !== null")
        cells = await page.js("[...document.querySelectorAll('tr[data-study=\"live\"] td')].map(c => c.textContent)")
        href = await page.js("document.querySelector('tr[data-study=\"live\"] a').getAttribute('href')")
        return cells, href, await page.screenshot(tmp_path / "dash_home.png")

    (cells, href, pixels), page = in_browser(tmp_path, scenario)
    keep(tmp_path / "dash_home.png")
    assert_clean(page, server)
    assert href == "/study/live"
    name, trials, complete, *_, model, data, epochs, seeds, optimizers, _objective, _best, _best_trial = cells
    assert name == "live" and int(complete) == FIRST and int(trials) >= FIRST  # the grid's rest waits
    assert (model, data, epochs, seeds) == ("mlp", "digits", "2", "0, 1")
    assert optimizers == "adabound, adam"
    best = float(cells[-2])
    assert 0 < best < 2.5  # val_loss of a 10-class problem after 2 epochs: below log(10) ≈ 2.30 plus noise
    assert (pixels.min(-1) < 240).mean() > 0.005


VIEWS = {"lr", "hp:adabound", "hp:adam", "pairs:adabound", "importances", "curves", "heatmap:adabound",
         "heatmap:adam", "final", "bounds"}
LOADED = """(() => { const imgs = [...document.querySelectorAll('figure[data-view] img')];
  return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 100) ?
    imgs.map(i => i.closest('figure').dataset.view) : null; })()"""


def test_study_page_shows_every_view(server, tmp_path):
    async def scenario(page):
        await page.send("Page.navigate", url=server + "/study/live")
        await page.wait_for("window.optstudy && window.optstudy.updates > 0")
        # importances come from a background fANOVA: the page shows them at a later poll
        views = await page.wait_for(f"(() => {{ const v = {LOADED}; return v && v.length >= {len(VIEWS)} ? v : null; }})()",
                                    timeout=120)
        rows = await page.js("document.querySelectorAll('#trial-table tbody tr').length")
        tables = await page.js("['robustness-table', 'importances-table', 'state-counts'].map(i => "
                               "document.getElementById(i) && document.getElementById(i).rows.length)")
        links = await page.js("[...document.querySelectorAll('tr[data-trial=\"0\"] a')].map(a => a.href)")
        # choosing two trials compares their curves
        for n in (0, 4):
            await page.js(f"document.querySelector('tr[data-trial=\"{n}\"] input').click()")
        await page.wait_for("(() => { const i = document.getElementById('compare'); return i.src.includes("
                            "'trials=0,4') && i.complete && i.naturalWidth > 100; })()")
        compare = await page.js("document.getElementById('compare').naturalHeight")
        return set(views), rows, tables, links, compare, await page.screenshot(tmp_path / "dash_study.png")

    (views, rows, tables, links, compare, pixels), page = in_browser(tmp_path, scenario)
    keep(tmp_path / "dash_study.png")
    assert_clean(page, server)
    assert views == VIEWS
    assert rows >= FIRST
    assert tables[0] == 1 + 18  # robustness: a header row and a row per quantity
    assert tables[1] > 1 and tables[2] == 2
    assert any("/#/experiments/" in a and "/runs/" in a for a in links)  # the trial's MLflow run
    assert any("/dashboard/studies/" in a and "trials?numbers=0" in a for a in links)  # and optuna-dashboard's page
    assert compare > 100
    not_blank(pixels)


def test_the_report_and_the_app_draw_the_same_pictures(server, study_dir, tmp_path):
    """One figure code: the static report's images are byte for byte the app's, view by view."""
    import base64
    import json
    import re

    import optuna
    from optstudy.dashboards import write

    with urllib.request.urlopen(f"{server}/api/study/live", timeout=120) as r:
        state = json.load(r)
    study = optuna.load_study(study_name="live", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(study_dir / "journal.log"))))
    page = write(study, tmp_path / "report", f"sqlite:///{study_dir / 'mlflow.db'}").read_text()
    images = dict(re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page))
    pairs = {"lr": "learning-rate sensitivity", "hp:adam": "adam: objective per hyperparameter",
             "pairs:adabound": "adabound: lr against each other hyperparameter", "bounds": "bound schedules",
             "curves": "learning curves", "heatmap:adam": "adam heatmap"}
    urls = {v["id"]: v["url"] for v in state["views"]}
    for view, alt in pairs.items():
        with urllib.request.urlopen(server + urls[view], timeout=120) as r:
            assert r.headers["Content-Type"] == "image/png"
            assert r.read() == base64.b64decode(images[alt]), view


def test_a_bad_port_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([str(BIN / "optstudy"), "dashboard", "--port", "70000"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120, check=False)
    assert r.returncode == 2 and r.stderr == "error: --port: must be an integer in 1..65535, got 70000\n"


def test_new_trials_appear_without_reload(server, study_dir, tmp_path):
    """A second worker finishes the grid while the page is open: each trial it tells shows on the page within
    LIVE_S seconds, with no reload (a marker set in the page survives), and the lr view's picture is replaced."""
    done: dict[int, float] = {}
    proc = None

    def follow(p):
        for line in p.stdout:
            if line.startswith("trial ") and " val_loss=" in line:
                done[int(line.split()[1])] = time.monotonic()

    async def scenario(page):
        nonlocal proc
        await page.send("Page.navigate", url=server + "/study/live")
        await page.wait_for("window.optstudy && window.optstudy.updates > 0")
        await page.js("window.__notReloaded = true")
        before = await page.js("document.querySelector('figure[data-view=\"lr\"] img').getAttribute('src')")
        proc = worker(study_dir)
        threading.Thread(target=follow, args=(proc,), daemon=True).start()
        seen: dict[int, float] = {}
        deadline = time.monotonic() + 600
        while proc.poll() is None or len(seen) < len(done):
            assert time.monotonic() < deadline, "the worker did not finish in 600 s"
            shown = await page.js("[...document.querySelectorAll('#trial-table tbody tr')].filter(r => "
                                  "r.querySelector('td.COMPLETE')).map(r => +r.dataset.trial)")
            now = time.monotonic()
            for number, at in list(done.items()):
                if number in shown and number not in seen:
                    seen[number] = now
                assert number in seen or now - at < LIVE_S + 5, f"trial {number} is not on the page"
            await asyncio.sleep(0.2)
        after = await page.js("document.querySelector('figure[data-view=\"lr\"] img').getAttribute('src')")
        await page.wait_for(LOADED)
        same_page = await page.js("window.__notReloaded === true")
        return seen, before, after, same_page, await page.screenshot(tmp_path / "dash_live.png")

    (seen, before, after, same_page, pixels), page = in_browser(tmp_path, scenario)
    keep(tmp_path / "dash_live.png")
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out[-3000:]
    assert len(done) == 2, done  # Adam's last two lrs
    lag = {n: seen[n] - done[n] for n in done}
    assert all(s < LIVE_S for s in lag.values()), lag
    assert same_page
    assert before != after  # the lr sensitivity picture was fetched again, with the new trials' points
    assert_clean(page, server)
    not_blank(pixels)


# --- the server's part: figures drawn before they are asked for, once, and the storage read at a pace ------------
def test_warmed_figures_are_not_drawn_again(study_dir):
    """The warmer draws every view the page will ask for, importances included: the page's requests draw nothing."""
    from optstudy.dashboards.app import Dashboard

    dash = Dashboard(str(study_dir / "journal.log"))
    dash.start_warming()
    assert dash.warmed(timeout=300)
    live = dash.study("live")
    drawn = sum(live.draws.values())
    state = dash.state("live")
    assert {v["id"] for v in state["views"]} == VIEWS
    assert all(live.draws[(v["id"], v["key"])] == 1 for v in state["views"])
    for v in state["views"]:
        assert dash.figure("live", v["id"], v["key"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(live.draws.values()) == drawn


@pytest.mark.parametrize("view", ["nosuch", "hp:nosuch", "hp", "lr:adam", "heatmap:"])
def test_a_view_the_study_cannot_have_is_404(server, view):
    """Not a picture of an error (a KeyError while drawing is one): the URL names no view of this study."""
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{server}/api/study/live/figure/{view}.png?v=x", timeout=60)
    assert err.value.code == 404 and f"no view {view!r}" in err.value.read().decode()
    with urllib.request.urlopen(f"{server}/api/study/live/figure/hp:adam.png?v=x", timeout=60) as r:
        assert r.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_served_dashboard_warms_its_figures(server):
    """``optstudy dashboard`` starts the warmer: /api/studies says so while it draws, and it finishes."""
    import json

    deadline = time.monotonic() + 300
    while True:
        with urllib.request.urlopen(f"{server}/api/studies", timeout=60) as r:
            if json.load(r)["warming"] is False:
                break
        assert time.monotonic() < deadline, "still warming after 300 s"
        time.sleep(0.5)


def test_a_figure_being_drawn_is_drawn_once_and_the_page_goes_first(study_dir):
    """While the warmer draws a figure, a page asking for the same one waits for that drawing (one draw), and a
    page asking for another is drawn before the warmer's next figure."""
    from optstudy.dashboards.app import DRAWING, Dashboard

    dash = Dashboard(str(study_dir / "journal.log"))
    live = dash.study("live")
    started, release, order, got = threading.Event(), threading.Event(), [], {}

    def drawing(view, wait=False):
        def draw():
            order.append(view)
            if wait:  # the warmer's figure, held until the page's requests have arrived
                started.set()
                assert release.wait(60)
            return f"{view} picture".encode()
        return draw

    def ask(who, fn, *args):
        thread = threading.Thread(target=lambda: got.__setitem__(who, fn(*args)), daemon=True)
        thread.start()
        return thread

    threads = [ask("warmer", live.png, "lr", "k1", drawing("lr", wait=True), True)]
    assert started.wait(60)
    threads.append(ask("warmer next", live.png, "hp:adam", "k1", drawing("hp:adam"), True))
    threads.append(ask("page same", dash.figure, "live", "lr", "k1"))  # drawn for real if it were drawn twice
    threads.append(ask("page other", live.png, "curves", "k1", drawing("curves")))
    assert DRAWING.queued(1, timeout=60)  # "page other" waits for its turn
    threads[2].join(0.5)
    assert threads[2].is_alive()  # "page same" waits too: for the warmer's drawing
    release.set()
    for thread in threads:
        thread.join(60)
    assert order == ["lr", "curves", "hp:adam"]
    assert got["page same"] == got["warmer"] == b"lr picture"
    assert live.draws[("lr", "k1")] == 1


def test_a_slow_read_spaces_the_reads(study_dir, tmp_path):
    """The trials are re-read at most every max(REFRESH_S, READ_K x the last read's duration) seconds; a new trial
    is seen at the first read due. The clock is the test's: no sleeping."""
    import optuna
    from optstudy.dashboards.app import POLL_MS, READ_K, REFRESH_S, Dashboard
    from optuna.trial import create_trial

    shutil.copy(study_dir / "journal.log", tmp_path / "journal.log")  # the other tests' study stays as it is
    dash = Dashboard(str(tmp_path / "journal.log"))
    live = dash.study("live")
    now = [1000.0]
    live.clock = lambda: now[0]
    live.refresh()
    assert (live.reads, live.read_s, live.interval()) == (1, 0.0, REFRESH_S)  # the first read fills Optuna's cache
    now[0] += REFRESH_S
    live.refresh()
    assert live.reads == 2 and live.interval() == REFRESH_S  # a read of a few trials: no time on this clock
    live.read_s = 3.0  # the seam: as if that read had taken 3 s (a loaded PostgreSQL)
    assert live.interval() == READ_K * 3.0

    worker = optuna.load_study(study_name="live", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "journal.log"))))
    model = next(t for t in worker.trials if t.state.name == "COMPLETE")
    worker.add_trial(create_trial(params=model.params, distributions=model.distributions, value=model.value,
                                  user_attrs=model.user_attrs))
    generation, start = live.generation, live.refreshed
    for at in (REFRESH_S, READ_K * 3.0 - 0.1):
        now[0] = start + at
        live.refresh()
        assert (live.reads, live.generation) == (2, generation), at  # not read back to back
    now[0] = start + READ_K * 3.0
    live.refresh()
    assert live.reads == 3 and live.generation == generation + 1
    assert live.trials[-1].number == worker.trials[-1].number  # the new trial, read
    # the promise of the page: a new trial within LIVE_S for reads up to 1.3 s (worst case: it lands just after a
    # read began, waits the interval, the next read, and a poll)
    assert READ_K * 1.3 + 1.3 + POLL_MS / 1000 <= LIVE_S
