"""What several items share: composing (``optstudy.config.compose``) and running a config, rounding and writing the
JSON, terminal tables, figures."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a script: files only, no window

import numpy as np
import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parents[2]  # the repository: where the figures and "wrote ..." paths are
FIGURES = ROOT / "docs" / "figures"
SCRATCH = Path(tempfile.gettempdir()) / "optstudy-reproduce"
# twelve colours that stay apart on a contour plot (matplotlib's default cycle has ten)
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf", "#000000", "#b8860b"]


def compose(*overrides: str, logger: str = "none"):
    """``optstudy.config.compose`` (the one way in) with no checkpoint files and no progress bar; ``logger=none``
    unless asked."""
    from optstudy.config import compose as compose_config

    # a run directory outside the repository (Lightning's default_root_dir), unless the caller wants the artifacts
    scratch = [] if any(o.startswith("checkpoint.dir=") for o in overrides) else [f"checkpoint.dir={SCRATCH}"]
    return compose_config(["checkpoint.enabled=false", f"logger={logger}", "trainer.enable_progress_bar=false",
                           *scratch, *overrides])


def optstudy_command() -> list[str]:
    """The ``optstudy`` command of this interpreter's environment (``python -m optstudy.cli`` where none is on disk),
    for the items that run studies in worker processes."""
    exe = Path(sys.executable).with_name("optstudy")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "optstudy.cli"]


def train(cfg, callbacks=()):
    """``optstudy.train.train`` with its per-epoch lines kept off the terminal; ``(result, None)``, or ``(None,
    reason)`` when the run diverged (NaN/Inf loss)."""
    from optstudy.lit import Diverged
    from optstudy.train import train as run

    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return run(cfg, callbacks=list(callbacks)), None
        except Diverged as exc:
            return None, str(exc)


def epochs(steps: int, per: int = 1000) -> list[str]:
    """The experiment files' 1000 steps an epoch where ``steps`` allows it (the stochastic counterexample's noise
    stream depends on the epoch boundaries: the data loader draws a seed from torch's RNG each epoch)."""
    per = per if steps % per == 0 else steps
    return [f"data.steps_per_epoch={per}", f"trainer.max_epochs={steps // per}"]


def sig(x, digits: int = 4):
    """Rounded for the JSON and the tables (the runs are deterministic; more digits would only be noise to read)."""
    if isinstance(x, dict):
        return {k: sig(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [sig(v, digits) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return float(f"{x:.{digits}g}")
    return x


def shown(path: Path) -> Path:
    """``path`` as the "wrote ..." lines print it: relative to the repository when inside it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def write_json(out: Path, name: str, data: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(sig(data), indent=1) + "\n")
    print(f"wrote {shown(path)}")
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain text table for the terminal (the document's tables are written from the JSON)."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(map(_cell, v)) + "]"
    return "" if v is None else str(v)


def figure(nrows=1, ncols=1, **kw):
    """A figure not registered with pyplot (nothing to close), and its axes as a 2-D array."""
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {shown(path)}")
    return path


class Curves(pl.Callback):
    """Each member's val_loss and val_acc after every epoch (``PopulationTask.last``, after the epoch's validation)."""

    def __init__(self):
        self.rows: list[list[dict]] = []

    def on_train_epoch_end(self, trainer, module):
        self.rows.append([dict(module.last[k]) for k in range(module.k)])
