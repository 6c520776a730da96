"""Every file in ``conf/experiment/`` (found by globbing, so a new one is tested without being listed): it trains one
batch on CPU with tiny data files, and it is an overlay that only sets keys the config already has."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from optstudy.train import run
from tests.tiny_data import data_root

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "conf" / "experiment").glob("*.yaml"))
HEADER = "# @package _global_"

# one training batch and one validation batch on CPU (trainer=cpu replaces the gpu trainer paper-scale files pick);
# no MLflow run: tracking is tested in test_train.py and costs about a second a run
SHRINK = ["trainer=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
          "checkpoint.enabled=false", "logger=none"]
# per dataset: batches of 2 (the big CIFAR models on CPU); the tiny PTB files hold 8 training and 4 validation tokens;
# MNIST-1D generates data.num_samples signals at load time
SHRINK_DATA = {"synthetic": [], "ptb": ["data.batch_size=2", "data.bptt=2"],
               "mnist1d": ["data.batch_size=2", "data.num_samples=100"]}
# keys an experiment may set although the config it overlays lacks them (each needs a reason here): none so far
NEW_KEYS_ALLOWED: set[str] = set()


def compose_train(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """MNIST, Fashion-MNIST, CIFAR-10 and PTB files under one folder, where ``OPTSTUDY_DATA`` points every
    ``data.root``."""
    return data_root(tmp_path_factory.mktemp("tiny_data"))


def test_experiments_are_found():
    assert EXPERIMENTS, "conf/experiment/ holds no .yaml files"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_trains_a_batch(path, tiny_data, monkeypatch):
    monkeypatch.setenv("OPTSTUDY_DATA", str(tiny_data))
    data_name = compose_train(f"experiment={path.stem}").data.name
    cfg = compose_train(f"experiment={path.stem}", *SHRINK, *SHRINK_DATA.get(data_name, ["data.batch_size=2"]))
    value = run(cfg)
    assert math.isfinite(value), f"{path.stem}: {cfg.objective} = {value}"


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{dotted key: value}`` of the values in ``tree``; a list or an empty mapping is one value."""
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            leaves.update(_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_is_an_overlay_of_existing_keys(path):
    text = path.read_text()
    assert text.splitlines()[0] == HEADER, f"{path.name}: the first line must be {HEADER!r}"
    body = yaml.safe_load(text) or {}
    groups = [next(iter(entry)) for entry in yaml.safe_load((ROOT / "conf" / "train.yaml").read_text())["defaults"]
              if isinstance(entry, dict)]
    choices = []
    for entry in body.pop("defaults", []):
        assert isinstance(entry, dict) and len(entry) == 1, f"{path.name}: defaults entry {entry!r}"
        (key, choice), = entry.items()
        match = re.fullmatch(r"override /(\w+)", key)
        assert match and match[1] in groups, f"{path.name}: {key!r} is not 'override /<group>', group one of {groups}"
        assert (ROOT / "conf" / match[1] / f"{choice}.yaml").is_file(), f"{path.name}: no {match[1]}/{choice}.yaml"
        choices.append(f"{match[1]}={choice}")
    base = compose_train(*choices)  # the experiment's group choices without its values
    leaves, absent = _leaves(body), object()
    new = [key for key in leaves
           if key not in NEW_KEYS_ALLOWED and OmegaConf.select(base, key, default=absent) is absent]
    assert not new, f"{path.name} sets keys that {' '.join(choices) or 'the default config'} does not have: {new}"
    # the values land at the top level: without the header Hydra would put them under `experiment.`
    cfg = compose_train(f"experiment={path.stem}")
    assert "experiment" not in cfg, f"{path.name}: its values landed under `experiment.`"
    for key, value in leaves.items():
        got = OmegaConf.select(cfg, key)
        assert (OmegaConf.to_container(got) if OmegaConf.is_config(got) else got) == value, f"{path.name}: {key}"
