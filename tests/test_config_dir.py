"""``--config-dir``: a user's own config groups beside ours, for ``optstudy train`` and every trial of a study.

The user's directory is written in ``tmp_path`` (a model reusing ``mlp`` at other widths, an experiment overlay, a
model of their own named by ``_target_`` from a module in the current directory). Commands run as a user runs them,
``optstudy ...`` in a subprocess from a directory outside the repository; trainings are real (one epoch, digits).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml

from optstudy import cli, config
from optstudy.errors import ConfigError
from optstudy.study import spec as specs
from optstudy.study.storage import open_storage
from optstudy.study.worker import Worker, train_in_subprocess

OPTSTUDY = Path(sys.executable).with_name("optstudy")  # the console script of the venv running the tests
MYNET = {"name": "mlp", "hidden": [16, 8]}  # an existing model by name, at other widths


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A user's config directory: ``model/mynet.yaml`` and ``experiment/mine.yaml``."""
    conf = tmp_path / "myconf"
    (conf / "model").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "model" / "mynet.yaml").write_text(yaml.safe_dump(MYNET))
    (conf / "experiment" / "mine.yaml").write_text("# @package _global_\ntrainer: {max_epochs: 1}\n"
                                                  "data: {batch_size: 32}\n")
    return conf


def optstudy(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.run([str(OPTSTUDY), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a refused command (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# --- composing --------------------------------------------------------------------------------------------------------
def test_their_groups_extend_ours(user_dir):
    choices = config.groups(user_dir)
    assert {"mynet", "mlp", "cnn"} <= set(choices["model"])
    assert {"mine", "digits_mlp"} <= set(choices["experiment"])
    assert "mynet" not in config.groups()["model"]  # without --config-dir: ours only
    cfg = config.compose(["model=mynet", "experiment=mine"], user_dir)
    assert list(cfg.model.hidden) == [16, 8] and cfg.trainer.max_epochs == 1 and cfg.data.batch_size == 32
    assert config.compose(["model=cnn"], user_dir).model.name == "cnn"  # ours stay available


def test_their_file_at_one_of_our_paths_is_refused(user_dir):
    # Hydra reads the first match, ours: their file would be silently ignored
    (user_dir / "model" / "mlp.yaml").write_text(yaml.safe_dump({"name": "mlp", "hidden": [7]}))
    with pytest.raises(ConfigError, match=r"--config-dir: model/mlp.yaml is also one of optstudy's configs.*"
                                          r"e.g. model/my_mlp.yaml"):
        config.compose([], user_dir)


def test_an_unknown_choice_lists_ours_and_theirs(user_dir):
    with pytest.raises(ConfigError, match=r"model=mynte: no such model \(did you mean 'mynet'\?\); choices: .*"
                                          r"\bmlp\b.*\bmynet\b"):
        config.compose(["model=mynte"], user_dir)


def test_a_missing_config_dir_is_one_line_naming_what_exists(tmp_path, user_dir):
    line = error_line(optstudy("train", "--config-dir", str(tmp_path / "myconff"), "model=mynet", cwd=tmp_path))
    assert "--config-dir" in line and "myconff" in line and "does not exist" in line and "myconf" in line


def test_a_study_with_a_missing_config_dir_is_refused(tmp_path, capsys):
    code = cli.main(["study", "run", "lr_sensitivity", "--config-dir", str(tmp_path / "nope"),
                     "--storage", str(tmp_path / "optuna.journal")])
    assert code == 2
    assert "--config-dir" in capsys.readouterr().err and not (tmp_path / "optuna.journal").exists()


# --- training -------------------------------------------------------------------------------------------------------
def test_optstudy_train_with_their_model_from_outside_the_repository(tmp_path, user_dir):
    work = tmp_path / "work"
    work.mkdir()
    proc = optstudy("train", "--config-dir", str(user_dir), "model=mynet", "experiment=mine", "logger=none",
                    cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "epoch 1/1" in proc.stdout and "val_loss = " in proc.stdout
    [run] = list((work / "outputs").glob("*/*"))  # Hydra's run directory, in the current directory
    resolved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert resolved["model"] == MYNET and resolved["data"]["batch_size"] == 32
    assert (run / "train.log").exists()  # the job is named train, as python train.py names it


def test_their_own_model_module_imports_from_the_current_directory(tmp_path, user_dir):
    work = tmp_path / "work"
    work.mkdir()
    (work / "usernets.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def tiny(n_in, n_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_classes))
    """))
    (user_dir / "model" / "tiny.yaml").write_text(yaml.safe_dump(
        {"_target_": "usernets.tiny", "task": "classification", "n_in": 64, "n_classes": "${data.n_classes}"}))
    proc = optstudy("train", "--config-dir", str(user_dir), "model=tiny", "trainer.max_epochs=1", "logger=none",
                    cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "val_loss = " in proc.stdout


# --- studies ----------------------------------------------------------------------------------------------------------
def study_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "n_trials": 2, "seeds": [0], "sampler": {"name": "grid"}, "pruner": {"name": "none"},
        "overrides": ["model=mynet", "experiment=mine"], "optimizers": {"sgd": {"lr": [0.01, 0.1]}}}))
    return path


def test_a_study_run_with_config_dir_completes(tmp_path, user_dir):
    journal = tmp_path / "optuna.journal"
    proc = optstudy("study", "run", str(study_file(tmp_path, "mine")), "--config-dir", str(user_dir),
                    "--storage", str(journal), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study = optuna.load_study(study_name="mine", storage=open_storage(str(journal))[0])
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert study.user_attrs["identity"]["model.hidden"] == "[16, 8]"  # every trial composed their model


def test_a_population_study_and_a_subprocess_trial_compose_with_config_dir(tmp_path, user_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    worker = Worker(specs.load(study_file(tmp_path, "mine_population")), str(tmp_path / "optuna.journal"),
                    population=2, config_dir=str(user_dir))
    assert worker.run() == 2
    assert [t.state.name for t in worker.study.get_trials()] == ["COMPLETE", "COMPLETE"]
    # a multi-device trial's own process (python -m optstudy train), here on one CPU device
    value, _, _ = train_in_subprocess(["model=mynet", "experiment=mine", "logger=none", "checkpoint.enabled=false"],
                                      str(user_dir))
    assert 0 < value < 3  # digits' cross-entropy after an epoch, below log(10) + noise
