"""A model and data of the user's own, named by ``_target_`` (``optstudy.models._target``, ``optstudy.data._target``).

The user's package is ``tests/userpkg`` (a model class, a (train, val) factory, a LightningDataModule), imported as a
user's ``mypkg`` is: from ``PYTHONPATH``. Runs train for real (one epoch of tiny data); mistakes are run as a user
runs them, ``python train.py ...`` in a subprocess: exit 2, one ``error:`` line naming the key, the rule and the
value, no traceback, no MLflow store.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from mlflow import MlflowClient

from optstudy import data, models
from optstudy.config import compose, validate
from optstudy.errors import ConfigError
from optstudy.population.run import train_population
from optstudy.train import train

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
QUICK = ["trainer.max_epochs=1", "checkpoint.enabled=false"]
NET = ["model=custom", "model._target_=userpkg.nets.Net", "+model.shape=${data.shape}",
       "+model.n_classes=${data.n_classes}"]
BLOBS = ["data=custom", "data._target_=userpkg.data.blobs", "data.batch_size=16"]


@pytest.fixture(autouse=True)
def _userpkg_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def train_py(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "PYTHONPATH": str(TESTS)}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300, check=False)
    return proc, db


# --- on the command line --------------------------------------------------------------------------------------------
def test_a_user_model_trains_from_the_command_line(tmp_path):
    proc, db = train_py([*NET, "logger=none", *QUICK], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "epoch 1/1  step 23" in proc.stdout and "val_acc" in proc.stdout
    value = float(proc.stdout.strip().splitlines()[-1].rsplit("val_loss = ", 1)[1])
    assert value < math.log(10)  # one epoch learned something on the 10 digits
    assert not db.exists()


def test_a_user_model_on_user_data_is_tracked_in_mlflow(tmp_path):
    proc, db = train_py([*NET, *BLOBS, "+data.size=64", *QUICK], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.tags["model"] == "userpkg.nets.Net" and run.data.tags["data"] == "userpkg.data.blobs"
    # what the data gave, inferred from its items, reached the model's arguments and the run's params
    params = run.data.params
    assert params["data.n_classes"] == "3" and params["model.n_classes"] == "3"
    assert params["data.shape"] == params["model.shape"] == "[2, 4, 4]"
    assert params["data.task"] == "classification" and params["data.size"] == "64"
    assert "val_acc" in run.data.metrics


MISTAKES = [
    # (overrides, words the one error line must contain)
    (["model=custom"], ["model._target_", "must name an importable callable", "???"]),
    (["model=custom", "model._target_=userpkg.nets.Nett"],
     ["model._target_", "cannot import 'userpkg.nets.Nett'", "did you mean 'Net'"]),
    (["model=custom", "model._target_=nosuchpkg.Net"], ["model._target_", "no module named 'nosuchpkg'", "PYTHONPATH"]),
    (["model=custom", "model._target_=userpkg.nets.NOT_CALLABLE"], ["model._target_", "must name a callable", "int"]),
    (["model=custom", "model._target_=userpkg.nets.Net", "model.task=regression"],
     ["model.task", "must be one of classification, language_model, objective", "'regression'"]),
    (["+model._target_=userpkg.nets.Net"], ["model.name", "'mlp' is a built-in model", "model=custom"]),
    ([*NET[:3], "+model.n_classes=${data.nclasses}"], ["model.n_classes", "'data.nclasses' not found"]),
    # found once the data is loaded: still before any MLflow run
    (["model=custom", "model._target_=userpkg.nets.not_a_module"], ["model._target_", "returned a function",
                                                                     "not a torch.nn.Module"]),
    ([*NET[:3], "+model.n_classes=5"], ["model._target_", "(2, 5)", "(batch, n_classes) = (2, 10)"]),
    (["model=custom", "model._target_=userpkg.nets.Pair", "+model.shape=${data.shape}", "+model.n_classes=10"],
     ["model._target_", "to a tuple", "(2, 10) float logits"]),
    (["model=custom", "model._target_=userpkg.nets.Net", "+model.n_classes=10"],
     ["model._target_: calling userpkg.nets.Net(n_classes=10) failed", "TypeError", "shape"]),
    ([*NET, "data=custom", "data._target_=userpkg.data.one_set"],
     ["data._target_", "returned a TensorDataset", "(train, val) pair"]),
    ([*NET, "data=custom", "data._target_=userpkg.data.strings"],
     ["data.task: cannot infer it", "str", "declare data.task"]),
    ([*NET, *BLOBS, "data.n_classes=2"], ["data.n_classes is 2", "labels go up to 2"]),
    ([*NET, "data=custom", "data._target_=userpkg.data.TrainOnlyModule"],
     ["data._target_", "gives no val_dataloader()", "validates every epoch"]),
    ([*NET, "data=custom", "data._target_=userpkg.data.blobs", "data.task=objective"],
     ["model.task", "userpkg.nets.Net is a classification model", "objective task"]),
]


@pytest.mark.parametrize("overrides,words", MISTAKES, ids=[" ".join(m[0][-2:]) for m in MISTAKES])
def test_a_bad_target_is_one_clear_line_and_records_nothing(overrides, words, tmp_path):
    proc, db = train_py([*overrides, *QUICK], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not db.exists(), "a config error created the MLflow store (and so possibly a run)"


# --- in the library -------------------------------------------------------------------------------------------------
def test_a_pair_of_datasets_is_described_and_recorded_in_the_config():
    cfg = compose([*BLOBS, "+data.size=40", "logger=none"])
    validate(cfg)
    assert cfg.data.shape is None and cfg.data.n_classes is None  # placeholders until the data loads
    loaded = data.load(cfg.data, 0)
    assert (loaded.task, loaded.shape, loaded.n_classes) == ("classification", (2, 4, 4), 3)
    assert len(loaded.train) == 30 and len(loaded.val) == 10  # size=40 reached the factory, and seed=
    assert (cfg.data.task, list(cfg.data.shape), cfg.data.n_classes) == ("classification", [2, 4, 4], 3)


def test_classes_are_counted_from_the_items_when_no_labels_are_at_hand():
    from optstudy.data._target import _from_pair

    items = [(torch.zeros(5), label) for label in (0, 4, 1)]
    described = _from_pair(items, items[:1], "mypkg.make", None, None)
    assert (described.task, described.shape, described.n_classes) == ("classification", (5,), 5)


def test_a_language_model_pair_trains_with_the_vocabulary_inferred():
    overrides = ["model=custom", "model._target_=userpkg.nets.TinyLM", "model.task=language_model",
                 "+model.vocab=${data.n_classes}", "data=custom", "data._target_=userpkg.data.tokens",
                 "data.batch_size=8", "optimizer.lr=0.05", "objective=val_ppl", "logger=none", *QUICK]
    result = train(compose(overrides))
    assert result.metrics["val_ppl"] < 11  # below the uniform guess over the 11 tokens after one epoch
    assert compose(overrides).data.n_classes is None  # the file's null: inferred, largest token 10 + 1


def test_a_user_objective_trains_on_the_synthetic_steps():
    overrides = ["model=custom", "model._target_=userpkg.nets.Bowl", "model.task=objective", "data=synthetic",
                 "optimizer=sgd", "optimizer.lr=0.1", "objective=x0", "logger=none", *QUICK]
    result = train(compose(overrides))
    assert result.value == pytest.approx(3.0, abs=1e-6)  # x0 after 100 steps of lr 0.1 on (x - 3)^2


class Batches(pl.Callback):
    def on_train_end(self, trainer, module):
        self.counts = (trainer.num_training_batches, trainer.num_val_batches[0])


def test_a_lightning_datamodule_trains_with_its_own_loaders():
    batches = Batches()
    overrides = [*NET, "data=custom", "data._target_=userpkg.data.BlobsModule", "+data.size=96", "logger=none",
                 *QUICK]
    result = train(compose(overrides), callbacks=[batches])
    assert batches.counts == (math.ceil(72 / 16), math.ceil(24 / 16))  # its batch_size=16, not data.batch_size=64
    assert math.isfinite(result.value)


def test_a_population_of_a_user_model_runs_stacked_and_each_member_is_its_standalone_run(capsys):
    overrides = [*NET, "optimizer=adam", "logger=none", *QUICK]
    result = train_population(compose([*overrides, "population.lr=[1e-3,1e-2]"]))
    assert not result.sequential and "cannot be stacked" not in capsys.readouterr().out  # vmap, not one by one
    for member, lr in zip(result.members, (1e-3, 1e-2)):
        alone = train(compose([*overrides, f"optimizer.lr={lr}"]))
        assert member.value == pytest.approx(alone.value, rel=1e-5)
    assert result.members[0].value != result.members[1].value


def test_a_population_refuses_a_datamodule():
    overrides = [*NET, "data=custom", "data._target_=userpkg.data.BlobsModule", "population.lr=[1e-3,1e-2]",
                 "logger=none", *QUICK]
    with pytest.raises(ConfigError, match=r"population: data._target_ userpkg.data.BlobsModule is a "
                                          r"LightningDataModule.*return its \(train, val\) Datasets"):
        train_population(compose(overrides))


def test_the_output_check_leaves_the_model_and_the_random_state_alone():
    cfg = compose([*NET, "logger=none"])
    validate(cfg)
    loaded = data.load(cfg.data, 0)
    torch.manual_seed(0)
    model = models.build(cfg.model, loaded)
    after = torch.rand(3)
    torch.manual_seed(0)
    from userpkg.nets import Net

    plain = Net([1, 8, 8], 10)
    assert torch.equal(torch.rand(3), after)  # the check's forward drew nothing from the global RNG
    for mine, theirs in zip(model.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(mine, theirs)
