"""Every script in ``benchmarks/`` documents its flags with their defaults and its expected run time, and refuses a
mistyped flag (it used to become a Hydra override through ``parse_known_args``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_help_gives_every_default_and_the_run_time(script):
    res = _run(script, "--help")
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    flags = [f for f in set(re.findall(r"(--[a-z][a-z-]+)", text)) if f != "--help"]
    assert flags
    assert text.count("(default:") >= len(flags), text  # store_true flags show (default: False)
    assert "Expected run time:" in text


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_a_mistyped_flag_is_refused(script):
    res = _run(script, "--epoch", "3")
    assert res.returncode == 2 and "unrecognized arguments: --epoch" in res.stderr, res.stderr
