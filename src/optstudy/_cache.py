"""Where optstudy keeps what it can make again (reference difficulty scores, an empty MLflow store):
``$OPTSTUDY_CACHE/<name>``, else ``~/.cache/optstudy/<name>``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(name: str) -> Path:
    root = os.environ.get("OPTSTUDY_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "optstudy") / name
