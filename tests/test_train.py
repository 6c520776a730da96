"""``train.py``: Hydra composition of ``conf/`` and a short real training run per optimizer."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

import optstudy.optim as o
from optstudy.errors import ConfigError
from optstudy.train import run

ROOT = Path(__file__).resolve().parents[1]


def cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_one_optimizer_file_per_name_with_the_reference_defaults():
    files = {p.stem for p in (ROOT / "conf" / "optimizer").glob("*.yaml")}
    assert files == set(o.NAMES)
    for name in o.NAMES:
        conf = yaml.safe_load((ROOT / "conf" / "optimizer" / f"{name}.yaml").read_text())
        expected = {k: list(v) if isinstance(v, tuple) else v for k, v in o.defaults(name).items()
                    if k not in ("bound", "gamma")}
        assert conf == {"name": name, **expected}


@pytest.mark.parametrize("name", o.NAMES)
def test_every_optimizer_trains_the_default_problem(name):
    loss = run(cfg(f"optimizer={name}", "trainer.max_epochs=1"))
    assert math.isfinite(loss)


@pytest.mark.parametrize("bound", ["hyperbolic", "paper", "exponential", "linear", "none"])
def test_bound_schedules_compose(bound):
    assert math.isfinite(run(cfg("optimizer=amsbound", f"bound={bound}", "trainer.max_epochs=1")))


def test_training_learns_and_is_deterministic():
    a = run(cfg("optimizer=adam", "optimizer.lr=3e-3", "trainer.max_epochs=3", "seed=3"))
    b = run(cfg("optimizer=adam", "optimizer.lr=3e-3", "trainer.max_epochs=3", "seed=3"))
    assert a == b and a < 1.0  # ln(10) = 2.30 at chance


def test_a_bad_objective_fails_before_training(capsys):
    with pytest.raises(ConfigError, match=r"objective must be one of train_loss, val_loss, val_acc, got 'val_los'"):
        run(cfg("objective=val_los"))
    assert "epoch" not in capsys.readouterr().out


def _train(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_command_line_bad_value_is_one_paragraph_without_traceback():
    res = _train("optimizer=adam", "optimizer.lr=-1")
    assert res.returncode == 2
    assert "error: optimizer adam: lr must be a number >= 0, got -1" in res.stderr
    assert "Traceback" not in res.stderr


def test_command_line_unknown_choice_lists_the_valid_ones():
    res = _train("optimizer=adm")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "optimizer=adm: no such optimizer (did you mean 'adam'?)" in res.stderr and "amsbound" in res.stderr


def test_command_line_help_lists_groups():
    res = _train("--help")
    assert res.returncode == 0
    for group in ("optimizer", "bound", "model", "data", "trainer", "logger", "experiment"):
        assert group in res.stdout
    assert "amsbound" in res.stdout and "exponential" in res.stdout


def test_command_line_divergence_exits_3_with_the_reason(tmp_path):
    res = _train("data=synthetic", "model=rosenbrock", "optimizer=sgd", "optimizer.lr=0.01", f"checkpoint.dir={tmp_path}")
    assert res.returncode == 3 and "Traceback" not in res.stderr
    assert "error: training diverged: the loss is" in res.stderr and "marked FAILED" in res.stderr


def test_a_model_for_another_task_is_named():
    with pytest.raises(ConfigError, match=r"model 'lstm' is for language_model data, but the dataset is a "
                                          r"classification task; models for it: mlp, logreg"):
        run(cfg("model=lstm"))


def test_an_unknown_trainer_key_is_named():
    with pytest.raises(ConfigError, match=r"trainer.max_epoch: not an argument of Lightning's Trainer"):
        run(cfg("+trainer.max_epoch=3"))


def test_a_default_run_prints_one_line_per_epoch_and_a_summary(capsys, tmp_path):
    run(cfg("trainer.max_epochs=2", f"checkpoint.dir={tmp_path / 'run'}", "logger.experiment=summary"))
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert out[0].startswith("epoch 1/2  step 23  ") and "val_acc" in out[0]
    assert out[-1].startswith("run ") and "'adam lr=0.001 seed=0' trained in" in out[-1]
    assert "INFO" not in captured.out + captured.err  # MLflow's start-up lines
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["last.ckpt"]


def test_switching_optimizer_drops_hyperparameters_it_does_not_have(capsys):
    assert math.isfinite(run(cfg("experiment=counterexample", "optimizer=sgd", "trainer.max_epochs=1",
                                 "data.steps_per_epoch=5", "logger=none")))
    assert "note: optimizer sgd has no betas; ignoring optimizer.betas=[0.9, 0.99]" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"optimizer sgd: unknown keyword 'betaz'"):
        run(cfg("optimizer=sgd", "+optimizer.betaz=1", "logger=none"))


def test_a_trainer_this_machine_cannot_run_is_a_config_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: trainer=gpu is valid here")
    with pytest.raises(ConfigError, match=r"trainer \(accelerator=gpu, devices=1, strategy=auto\): Lightning "
                                          r"refuses it on this machine: No supported gpu backend found"):
        run(cfg("trainer=gpu", "logger=none"))


def test_the_readme_states_the_optimizer_defaults_of_the_configs():
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `optimizer` |"))
    adam = yaml.safe_load((ROOT / "conf" / "optimizer" / "adam.yaml").read_text())
    assert f"`optimizer.lr={adam['lr']}`" in row
    assert f"`optimizer.betas=[{adam['betas'][0]},{adam['betas'][1]}]`" in row


def test_train_py_says_the_training_and_the_whole_command_s_time():
    """"finished in 1.8s" for a 15 s command read as the whole command's time."""
    res = _train("trainer.max_epochs=1", "logger=none", "checkpoint.enabled=false")
    assert res.returncode == 0, res.stderr
    assert re.search(r"trained in \d+\.\ds, \d+\.\ds since the process started", res.stdout), res.stdout
