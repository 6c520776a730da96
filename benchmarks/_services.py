"""Services the benchmarks start: an ``mlflow server`` on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server(backend: str, artifacts: Path, workers: int = 1, port: int | None = None
                  ) -> tuple[subprocess.Popen, str]:
    """Starts ``mlflow server`` (served artifacts in ``artifacts``) and returns it with its URL once /health answers;
    ``port``: a given one (a server restarted where its clients expect it), else a free one."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri",
         backend, "--artifacts-destination", str(artifacts), "--serve-artifacts", "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # no telemetry retries offline, no job-consumer processes (they spin a core each here)
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start in 120 s")
