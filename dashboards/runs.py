"""What the report reads from MLflow: metric histories and the effective-LR histograms of a study's runs.

Every reader returns data or a sentence saying what is missing (``Missing``), never raises for a run, metric or
artifact that is not there: a report of a half-finished study is still a report.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

HISTOGRAMS = "eff_lr_histograms.npz"


class Missing(str):
    """Why a piece of the report is absent; shown on the page as a note."""


def client(uri: str | None) -> MlflowClient | Missing:
    if not uri:
        return Missing("no MLflow tracking URI (neither passed to write() nor in study.user_attrs['tracking_uri'])")
    return MlflowClient(uri)


def history(client: MlflowClient, run_id: str | None, key: str) -> pd.Series | Missing:
    """The metric's values indexed by step (the last value where a step was logged twice)."""
    if not run_id:
        return Missing("no MLflow run id")
    try:
        metrics = client.get_metric_history(run_id, key)
        if not metrics:
            client.get_run(run_id)  # a run that is not there has an empty history too: say which it is
    except MlflowException as exc:
        return Missing(f"run {run_id}: {_short(exc)}")
    if not metrics:
        return Missing(f"run {run_id} has no {key} history")
    metrics = sorted(metrics, key=lambda m: (m.step, m.timestamp))
    return pd.Series({m.step: m.value for m in metrics}, name=run_id, dtype=float).sort_index()


def curves(client: MlflowClient, run_ids: list, key: str) -> tuple[pd.DataFrame, list[str]]:
    """Mean, min, max and count over runs at each step, from the steps any run logged; notes for missing runs."""
    series, notes = [], []
    for run_id in run_ids:
        h = history(client, run_id, key)
        if isinstance(h, Missing):
            notes.append(h)
        else:
            series.append(h)
    if not series:
        return pd.DataFrame(columns=["step", "mean", "min", "max", "runs"]), notes
    wide = pd.concat(series, axis=1)
    table = pd.DataFrame({"mean": wide.mean(axis=1), "min": wide.min(axis=1), "max": wide.max(axis=1),
                          "runs": wide.notna().sum(axis=1)})
    return table.rename_axis("step").reset_index(), notes


def histograms(client: MlflowClient, run_id: str | None) -> dict | Missing:
    """The arrays of a run's ``eff_lr_histograms.npz`` (see ``optstudy.lrlog``)."""
    if not run_id:
        return Missing("no MLflow run id")
    with tempfile.TemporaryDirectory() as tmp, _no_progress_bar():
        try:
            path = Path(client.download_artifacts(run_id, HISTOGRAMS, tmp))
            with np.load(path) as data:
                arrays = {k: data[k] for k in data.files}
        except (MlflowException, OSError, ValueError) as exc:
            return Missing(f"run {run_id}: no readable {HISTOGRAMS} ({type(exc).__name__}: {_short(exc)})")
    if not {"steps", "edges", "counts"} <= set(arrays) or not len(arrays["steps"]):
        return Missing(f"run {run_id}: {HISTOGRAMS} has no records")
    return arrays


def final_distribution(arrays: dict) -> pd.DataFrame:
    """The last record's fraction of elements per log10-lr bin, all param groups together."""
    counts = arrays["counts"][-1].sum(0).astype(float)  # (bins,)
    edges = arrays["edges"]
    frac = counts / max(counts.sum(), 1.0)
    return pd.DataFrame({"step": int(arrays["steps"][-1]), "log10_lr_low": edges[:-1], "log10_lr_high": edges[1:],
                         "fraction": frac})


@contextlib.contextmanager
def _no_progress_bar():
    """MLflow draws a progress bar on stderr for every download; a report downloads one small file per optimizer."""
    key, before = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _short(exc: Exception) -> str:
    text = str(getattr(exc, "message", exc)).splitlines()
    return text[0][:200] if text else ""


class Cached:
    """An MlflowClient that keeps what it read: metric histories and downloaded artifacts, by run. For the live
    dashboard, which draws the same runs' curves and histograms into several views and again on each change of
    another trial; only for runs that are finished (a running run's history still grows)."""

    def __init__(self, client: MlflowClient):
        self.client = client
        self.histories: dict[tuple[str, str], list] = {}
        self.files: dict[tuple[str, str], bytes] = {}

    def get_run(self, run_id: str):
        return self.client.get_run(run_id)

    def get_metric_history(self, run_id: str, key: str):
        if (run_id, key) not in self.histories:
            self.histories[(run_id, key)] = self.client.get_metric_history(run_id, key)
        return self.histories[(run_id, key)]

    def download_artifacts(self, run_id: str, path: str, dst_path: str) -> str:
        if (run_id, path) not in self.files:
            with tempfile.TemporaryDirectory() as tmp:
                self.files[(run_id, path)] = Path(self.client.download_artifacts(run_id, path, tmp)).read_bytes()
        out = Path(dst_path) / path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self.files[(run_id, path)])
        return str(out)
