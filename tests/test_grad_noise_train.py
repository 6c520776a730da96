"""``optimizer.grad_noise.*`` through ``train.py``, populations, checkpoints, MLflow and a study (the optimizer-level
tests are in ``tests/optim/test_grad_noise.py``): real Lightning runs on digits, a real SQLite MLflow store, a real
Optuna journal file."""

from __future__ import annotations

import math

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from optstudy.cli import main as cli
from optstudy.config import compose, validate
from optstudy.errors import ConfigError
from optstudy.population.members import member_configs
from optstudy.population.run import train_population
from optstudy.study.storage import open_storage
from optstudy.train import train

QUICK = ["trainer.max_epochs=1", "checkpoint.enabled=false", "trainer.limit_train_batches=6"]
NOISY = ["optimizer=sgd", "optimizer.lr=0.1"]


def val_loss(result) -> float:
    return MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics["val_loss"]


def test_noise_changes_the_run_and_is_reproducible_and_recorded(mlflow_uri):
    off = train(compose([*NOISY, *QUICK]))
    on = train(compose([*NOISY, "optimizer.grad_noise.eta=1.0", *QUICK]))
    again = train(compose([*NOISY, "optimizer.grad_noise.eta=1.0", *QUICK]))
    other_seed = train(compose([*NOISY, "optimizer.grad_noise.eta=1.0", "optimizer.grad_noise.seed=5", *QUICK]))
    assert on.value == again.value  # seeded: bit-identical
    assert on.value != off.value and other_seed.value != on.value
    params = MlflowClient(mlflow_uri).get_run(on.run_id).data.params
    assert params["optimizer.grad_noise.eta"] == "1.0" and params["optimizer.grad_noise.gamma"] == "0.55"
    assert MlflowClient(mlflow_uri).get_run(off.run_id).data.params["optimizer.grad_noise.eta"] == "None"


def test_off_is_todays_run_bit_for_bit():
    """eta 0 and eta null give the same run as each other (the default): the option leaves no trace."""
    null = train(compose([*NOISY, *QUICK, "logger=none"]))
    zero = train(compose([*NOISY, *QUICK, "logger=none", "optimizer.grad_noise.eta=0"]))
    assert null.value == zero.value


def test_population_members_have_their_own_noise_equal_to_their_standalone_runs(mlflow_uri):
    """eta per member (0 = off beside 1.0) and a seed per member: each member's val_loss equals its standalone run's
    at float64 (rel 1e-9)."""
    overrides = [*NOISY, "population.grad_noise.eta=[0,1.0]", "population.seed=[0,1]", "trainer.precision=64-true",
                 *QUICK]
    result = train_population(compose(overrides))
    configs, settings = member_configs(compose(overrides))
    assert [s["optimizer.grad_noise.eta"] for s in settings] == [0, 0, 1.0, 1.0]
    values = [m.value for m in result.members]
    assert len(set(values)) == 4
    for member, cfg in zip(result.members, configs):
        alone = train(cfg)
        assert member.value == pytest.approx(val_loss(alone), rel=1e-9, abs=0)


def test_a_resumed_run_continues_the_same_noise(tmp_path):
    common = [*NOISY, "optimizer.grad_noise.eta=0.3", "logger=none", "trainer.limit_train_batches=6"]
    straight = train(compose([*common, "trainer.max_epochs=2", f"checkpoint.dir={tmp_path / 'a'}"]))
    train(compose([*common, "trainer.max_epochs=1", f"checkpoint.dir={tmp_path / 'b'}"]))
    resumed = train(compose([*common, "trainer.max_epochs=2", f"checkpoint.dir={tmp_path / 'c'}",
                             f"ckpt_path={tmp_path / 'b' / 'checkpoints' / 'last.ckpt'}"]))
    assert resumed.value == straight.value  # bit-identical: the noise is a function of (seed, parameter, step)


@pytest.mark.parametrize("override, message", [
    ("optimizer.grad_noise.eta=-1", r"optimizer.grad_noise.eta must be a number >= 0 or null \(off\), got -1"),
    ("optimizer.grad_noise.gamma=-0.5", r"optimizer.grad_noise.gamma must be a number >= 0, got -0.5"),
    ("optimizer.grad_noise.seed=-3", r"optimizer.grad_noise.seed must be an integer in \[0, 2\*\*32 - 1\], got -3"),
    ("population.grad_noise.eta=[0.1,-1]", r"population member \(grad_noise.eta=-1\).*grad_noise.eta must be"),
])
def test_bad_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(["optimizer=adam", override]))


@pytest.mark.parametrize("population", [1, 2])
def test_a_study_searches_the_noise_as_a_range(tmp_path, mlflow_uri, population):
    """A study file with ``optimizer.grad_noise.eta`` as a log range: each trial's value is in it and reaches its
    MLflow run (one trial at a time, and two trials trained as one population)."""
    name = f"noise{population}"
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "n_trials": 2, "seeds": [0], "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"}, "enqueue_defaults": False, "population": population,
        "overrides": ["trainer.max_epochs=1", "trainer.limit_train_batches=4"],
        "optimizers": {"sgd": {"lr": [0.1], "optimizer.grad_noise.eta": {"low": 0.01, "high": 1.0, "log": True}}}}))
    storage = str(tmp_path / f"{name}.journal")
    assert cli(["study", "run", str(path), "--storage", storage]) == 0
    study = optuna.load_study(study_name=name, storage=open_storage(storage)[0])
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2
    client = MlflowClient(mlflow_uri)
    for trial in done:
        eta = trial.params["optimizer.grad_noise.eta"]
        assert 0.01 <= eta <= 1.0 and math.isfinite(trial.value)
        logged = client.get_run(trial.user_attrs["mlflow_run_id"]).data.params["optimizer.grad_noise.eta"]
        assert float(logged) == pytest.approx(eta, rel=1e-12)
