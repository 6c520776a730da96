"""optstudy as an installed tool: the wheel carries the configs and the shipped studies, and ``optstudy`` works from
any directory without the repository.

The wheel is built from a copy of the sources (``pip wheel --no-deps --no-build-isolation``) and installed,
non-editable, into a fresh venv in ``tmp`` that borrows the test venv's dependencies through a ``.pth`` line (a line
adds a directory to ``sys.path`` without running that directory's own ``.pth`` files, so the editable install's
finder stays out). Every command runs from a directory outside the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import optstudy

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "src", "conf", "studies", "dashboards")  # the wheel's sources

pytestmark = pytest.mark.slow  # builds, installs and trains: about a minute


def run(*args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "OPTSTUDY_STORAGE")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd / 'mlflow.db'}"
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert not check or proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """optstudy's wheel, built from a copy of the sources (building in the repository would leave build/ there)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-w", tmp / "wheels",
        cwd=tmp)
    [built] = (tmp / "wheels").glob("optstudy-*.whl")
    return built


def fresh_venv(where: Path, wheel: Path, *requirements: str) -> Path:
    """The bin directory of a new venv at ``where`` holding ``requirements`` (installed by pip first: they come
    before the borrowed dependencies on sys.path) and optstudy installed from ``wheel``, not editable."""
    run(sys.executable, "-m", "venv", "--without-pip", where, cwd=where.parent)
    python = where / "bin" / "python"
    pip = (sys.executable, "-m", "pip", "--python", python, "install", "--quiet")
    if requirements:
        run(*pip, *requirements, cwd=where.parent)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=where.parent).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}  # the test venv's dependencies
    (site / "zz_deps.pth").write_text("\n".join(sorted(ours)) + "\n")  # zz_: after any .pth of its own packages
    # --ignore-installed: the test venv's editable optstudy is on the path too; it is not this venv's to uninstall
    run(*pip, "--no-deps", "--ignore-installed", wheel, cwd=where.parent)
    return where / "bin"


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The bin directory of a fresh venv holding optstudy installed from its wheel (not editable)."""
    return fresh_venv(tmp_path_factory.mktemp("install") / "venv", wheel)


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory outside the repository."""
    assert not tmp_path.is_relative_to(ROOT)
    return tmp_path


def users_project(elsewhere: Path) -> Path:
    """examples/lightning_project copied to ``elsewhere``: a user's project outside the repository."""
    project = elsewhere / "project"
    shutil.copytree(ROOT / "examples" / "lightning_project", project,
                    ignore=shutil.ignore_patterns("__pycache__", "mlflow.db", "mlartifacts", "*.journal"))
    return project


def test_the_installed_package_is_the_wheel_not_the_repository(installed, elsewhere):
    where = run(installed / "python", "-c", "import optstudy, importlib.resources as r; print(optstudy.__file__); "
                "print(r.files('optstudy._conf')); print(r.files('optstudy._studies'))", cwd=elsewhere).stdout
    package, conf, studies = map(Path, where.split())
    for path in (package, conf, studies):
        assert path.is_relative_to(installed.parent) and not path.is_relative_to(ROOT), path
    assert (conf / "train.yaml").is_file() and (conf / "model" / "mlp.yaml").is_file()
    assert (studies / "lr_sensitivity.yaml").is_file()


def test_version(installed, elsewhere):
    assert run(installed / "optstudy", "--version", cwd=elsewhere).stdout.strip() == f"optstudy {optstudy.__version__}"
    wheel = run(installed / "python", "-c", "import importlib.metadata as m; print(m.version('optstudy'))",
                cwd=elsewhere)
    assert wheel.stdout.strip() == optstudy.__version__  # pyproject's version is the package's


def test_train_from_any_directory(installed, elsewhere):
    proc = run(installed / "optstudy", "train", "logger=none", "trainer.max_epochs=1", cwd=elsewhere)
    assert "epoch 1/1" in proc.stdout and "val_loss = " in proc.stdout
    assert list((elsewhere / "outputs").glob("*/*/.hydra/config.yaml"))  # Hydra's run directory, here
    refused = run(installed / "optstudy", "train", "model=mlpp", cwd=elsewhere, check=False)
    assert refused.returncode == 2 and refused.stderr.startswith("error: model=mlpp: no such model")


def test_a_shipped_study_by_name_then_its_report(installed, elsewhere):
    journal = elsewhere / "optuna.journal"
    proc = run(installed / "optstudy", "study", "run", "lr_sensitivity", "--n-trials", "2", "trainer.max_epochs=1",
               "--storage", journal, cwd=elsewhere)
    assert "worker done: 2 trial(s) here; 120 trials (2 complete, 118 waiting)" in proc.stdout  # the grid, queued
    report = run(installed / "optstudy", "study", "report", "lr_sensitivity", "--storage", journal, "--out",
                 elsewhere / "report", cwd=elsewhere)
    assert "report: " in report.stdout and (elsewhere / "report" / "index.html").is_file()
    unknown = run(installed / "optstudy", "study", "run", "lr_sensitivty", "--storage", journal, cwd=elsewhere,
                  check=False)
    assert unknown.returncode == 2 and "lr_sensitivity" in unknown.stderr and "bounds" in unknown.stderr


def test_a_users_project_with_its_own_model_data_configs_and_lightning_code(installed, elsewhere):
    """README "Your own model": a project outside the repository (examples/lightning_project copied there: its own
    nn.Module and data loading in mymodel.py, conf/model/mymodel.yaml and conf/data/mydigits.yaml by _target_,
    studies/mine.yaml) trains, runs a 4-trial study with its report, and runs its own Lightning script, all with the
    installed wheel."""
    project = users_project(elsewhere)
    proc = run(installed / "optstudy", "train", "--config-dir", "conf", "model=mymodel", "data=mydigits",
               "trainer.max_epochs=1", cwd=project)
    assert "val_loss = " in proc.stdout
    proc = run(installed / "optstudy", "study", "run", "studies/mine.yaml", "--config-dir", "conf", cwd=project)
    assert "4 trials (4 complete)" in proc.stdout
    run(installed / "optstudy", "study", "report", "mymodel_lr", "--out", "report", cwd=project)
    assert (project / "report" / "index.html").is_file()
    table = (project / "report" / "lr_sensitivity.csv").read_text()
    assert "adam" in table and "adabound" in table
    proc = run(installed / "python", "train.py", "--epochs", "1", "--every", "5", cwd=project)  # the library
    assert proc.stdout.startswith("MLflow run ") and "val_loss = " in proc.stdout


# PyPI's torchvision 0.28.0 (the release of torch 2.13) is a CUDA build: beside the CPU wheel of torch 2.13 that the
# project installs, its extension does not load ("operator torchvision::nms does not exist"). torch 2.14.1 and
# torchvision 0.29.1, both CUDA builds of the same release, run together on a CPU: a venv of their own holds them.
TORCHVISION = ("torch==2.14.1", "torchvision==0.29.1", "timm==1.0.31")


@pytest.fixture
def with_torchvision(wheel, tmp_path_factory):
    """A fresh venv with torch, torchvision, timm and optstudy's wheel; removed afterwards (it is 5.5 GB)."""
    venv = tmp_path_factory.mktemp("torchvision") / "venv"
    yield fresh_venv(venv, wheel, *TORCHVISION)
    shutil.rmtree(venv, ignore_errors=True)


def test_a_torchvision_model_by_target_in_a_users_project(with_torchvision, elsewhere):
    """README "Your own model": a library's model by _target_ (conf/model/tv_resnet18.yaml: torchvision's ResNet-18,
    num_classes from the data; conf/model/timm_resnet18.yaml: timm's, through timm.create_model with its arguments)
    trains on the project's own data as 3-channel images, from the installed wheel."""
    bin_ = with_torchvision
    project = users_project(elsewhere)
    proc = run(bin_ / "optstudy", "train", "--config-dir", "conf", "model=tv_resnet18", "data=mydigits_rgb",
               "trainer.max_epochs=1", cwd=project)
    assert "val_loss = " in proc.stdout
    versions = run(bin_ / "python", "-c", "import torch, torchvision; print(torch.__version__, torchvision.__version__)",
                   cwd=project).stdout.split()
    assert [v.split("+")[0] for v in versions] == ["2.14.1", "0.29.1"], versions
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    [run_] = client.search_runs([e.experiment_id for e in client.search_experiments()])  # the project's one run
    assert run_.data.params["model._target_"] == "torchvision.models.resnet18"
    assert run_.data.params["model.num_classes"] == "10" and run_.data.params["data.channels"] == "3"

    proc = run(bin_ / "optstudy", "train", "--config-dir", "conf", "model=timm_resnet18", "data=mydigits_rgb",
               "trainer.max_epochs=1", "logger.experiment=timm", cwd=project)
    assert "val_loss = " in proc.stdout
    [run_] = client.search_runs([client.get_experiment_by_name("timm").experiment_id])
    assert run_.data.params["model._target_"] == "timm.create_model"
    assert run_.data.params["model.model_name"] == "resnet18" and run_.data.params["model.in_chans"] == "3"


def test_the_dashboard_is_served_from_the_installed_package(installed, elsewhere):
    """dashboards/ is installed as optstudy.dashboards, its page and scripts with it: `optstudy dashboard` answers."""
    import socket
    import time
    import urllib.request

    where = run(installed / "python", "-c", "import optstudy.dashboards.app as a; print(a.__file__); print(a.STATIC)",
                cwd=elsewhere).stdout.split()
    assert all(Path(w).is_relative_to(installed.parent) for w in where), where
    assert {p.name for p in Path(where[1]).iterdir()} >= {"index.html", "study.html", "dashboard.js", "style.css"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OPTSTUDY_STORAGE")}
    proc = subprocess.Popen([installed / "optstudy", "dashboard", "--storage", elsewhere / "optuna.journal", "--port",
                             str(port)], cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10) as r:
                    assert r.read() and r.status == 200
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/static/dashboard.js", timeout=10) as r:
            assert r.read() == (ROOT / "dashboards" / "static" / "dashboard.js").read_bytes()
    finally:
        proc.terminate()
        proc.wait(30)
