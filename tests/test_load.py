"""The load test, shortened: workers on PostgreSQL and an mlflow server, killed at random; nothing lost or doubled."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_load_test_loses_nothing_and_duplicates_nothing(postgres_url, tmp_path):
    env = dict(os.environ)
    if "OPTSTUDY_TEST_POSTGRES_URL" not in env:  # the fixture's own server; its mlflow database sits beside
        env["OPTSTUDY_TEST_POSTGRES_URL"] = postgres_url
        env["OPTSTUDY_TEST_POSTGRES_MLFLOW_URL"] = postgres_url.rsplit("/", 1)[0] + "/mlflow"
    env.pop("MLFLOW_TRACKING_URI", None)
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "--workers", "3", "--points",
                          "24", "--kill-every", "3", "--timeout", "400"], capture_output=True, text=True, env=env,
                         timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "grid points lost (must be 0)" in res.stdout and "MLflow and Optuna agree" in res.stdout
