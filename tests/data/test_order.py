"""``data.order``: the exact example indices each order draws per epoch, the difficulty scores and their cache, a
resumed run's batches, a population member's order equal to its standalone run's, config errors, a study searching
``data.order``."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import pytorch_lightning as pl
import torch
import yaml
from mlflow import MlflowClient
from torch.utils.data import TensorDataset

from optstudy import data as datasets
from optstudy.config import compose
from optstudy.data import Data, _difficulty
from optstudy.data._order import Order, build
from optstudy.errors import ConfigError
from optstudy.lit import EpochShuffle, Task
from optstudy.population.members import member_configs
from optstudy.population.run import train_population
from optstudy.population.task import Batches
from optstudy.train import train

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["trainer.max_epochs=1", "checkpoint.enabled=false"]
N = 50
RANKED = torch.arange(N, dtype=torch.float64)  # example i has difficulty i: the easiest are the low indices


def todays(n: int, seed: int, epoch: int) -> list[int]:
    """EpochShuffle's permutation before data.order existed (commit e2a9568), written out."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def drawn(order: Order | None, epoch: int, seed: int = 7, n: int = N) -> list[int]:
    sampler = EpochShuffle(n, seed, order=order)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTSTUDY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "difficulty"


# --- the orders ---------------------------------------------------------------------------------------------------
def test_shuffle_is_todays_permutation_bit_for_bit():
    for epoch in range(4):
        assert drawn(None, epoch) == todays(N, 7, epoch)
        assert drawn(Order("shuffle"), epoch) == todays(N, 7, epoch)
    two = [EpochShuffle(N, 7, rank, 2) for rank in (0, 1)]  # DDP shards: unchanged too
    assert list(two[0]) + list(two[1]) == todays(N, 7, 0)[0::2] + todays(N, 7, 0)[1::2]


def test_the_default_config_builds_no_order_and_the_loader_draws_todays_batches(cache):
    cfg = compose(["logger=none"])
    assert cfg.data.order == "shuffle"
    task = Task(cfg, datasets.load(cfg.data, 0))
    assert task.order is None and not cache.exists()  # nothing computed for the default
    loader = task._loader(task.data.train, shuffle=True)
    loader.sampler.set_epoch(3)
    assert list(loader.sampler) == todays(len(task.data.train), 0, 3)


def test_fixed_is_one_permutation_for_every_epoch():
    first = drawn(Order("fixed"), 0)
    assert first == todays(N, 7, 0) and sorted(first) == list(range(N))
    assert all(drawn(Order("fixed"), e) == first for e in range(1, 5))
    assert drawn(Order("shuffle"), 1) != first


def test_curriculum_draws_from_the_easiest_pool_growing_with_the_pacing():
    order = Order("curriculum", RANKED, start=0.2, epochs=4)
    expected_pool = {0: 10, 1: 20, 2: 30, 3: 40, 4: 50, 9: 50}  # ceil(min(1, 0.2 + 0.8 e / 4) * 50)
    for epoch, size in expected_pool.items():
        idx = drawn(order, epoch)
        assert len(idx) == N  # every epoch has n draws: the same steps per epoch
        assert set(idx) == set(range(size)), epoch  # exactly the `size` easiest, each drawn
        counts = torch.bincount(torch.tensor(idx), minlength=size)[:size]
        assert counts.max() - counts.min() <= 1  # shuffled passes over the pool: none twice before all once
    assert drawn(order, 4) != drawn(order, 5)  # still shuffled within the full pool


def test_curriculum_epochs_1_is_the_two_stage_switch_and_the_pool_has_at_least_one_example():
    order = Order("curriculum", RANKED, start=0.01, epochs=1)
    assert set(drawn(order, 0)) == {0}  # ceil(0.5) = 1 example, drawn n times
    assert sorted(drawn(order, 1)) == list(range(N))


def test_anti_curriculum_is_the_reverse_ranking():
    order = Order("anti_curriculum", RANKED, start=0.2, epochs=4)
    assert set(drawn(order, 0)) == set(range(40, 50))  # the 10 hardest
    assert set(drawn(order, 2)) == set(range(20, 50))
    assert sorted(drawn(order, 4)) == list(range(N))
    tied = torch.tensor([1.0, 0.0, 1.0, 0.0])  # ties keep index order both ways (a stable sort)
    assert set(drawn(Order("curriculum", tied, start=0.5, epochs=2), 0, n=4)) == {1, 3}
    assert set(drawn(Order("curriculum", tied, start=0.25, epochs=2), 0, n=4)) == {1}  # the first of the easiest
    assert set(drawn(Order("anti_curriculum", tied, start=0.25, epochs=2), 0, n=4)) == {0}  # the first of the hardest


def test_mixed_draws_uniformly_with_probability_p():
    n, p, start = 20_000, 0.3, 0.1
    scores = torch.arange(n, dtype=torch.float64)
    idx = torch.tensor(drawn(Order("mixed", scores, start=start, epochs=5, mix=p), 0, n=n))
    outside = (idx >= start * n).double().mean().item()
    # a uniform draw falls outside the pool with probability 1 - start: P(outside) = p (1 - start) = 0.27
    sd = math.sqrt(0.27 * 0.73 / n)
    assert outside == pytest.approx(p * (1 - start), abs=4 * sd)
    assert drawn(Order("mixed", RANKED, 0.2, 4, mix=0.0), 1) == drawn(Order("curriculum", RANKED, 0.2, 4), 1)
    assert sorted(drawn(Order("mixed", RANKED, 0.2, 4, mix=1.0), 0)) == list(range(N))  # all uniform: a permutation


def test_the_order_is_a_pure_function_of_seed_epoch_and_scores():
    a, b = Order("mixed", RANKED.clone(), 0.2, 4, 0.5), Order("mixed", RANKED.clone(), 0.2, 4, 0.5)
    torch.manual_seed(123)  # the global generator plays no part
    first = [drawn(a, e) for e in range(6)]
    torch.manual_seed(456)
    assert [drawn(b, e) for e in reversed(range(6))][::-1] == first  # any epoch, in any order
    assert drawn(a, 0, seed=8) != first[0]


# --- difficulty scores --------------------------------------------------------------------------------------------
def digits_train():
    loaded = datasets.load(compose(["logger=none"]).data, 0)
    return loaded, *loaded.train.tensors


def test_reference_scores_are_the_fixed_logistic_regressions_losses_and_cached(cache):
    _, x, y = digits_train()
    scores, trained, path = _difficulty.cached(x, y, 2)
    assert trained and path.parent == cache and path.is_file()
    again, trained_again, path_again = _difficulty.cached(x, y, 2)
    assert not trained_again and path_again == path and torch.equal(again, scores)  # read, not trained again
    assert _difficulty.cached(x, y, 3)[1]  # other settings: another file
    assert _difficulty.cached(x[:-1], y[:-1], 2)[1]  # other data: another file
    # the reference run, written out independently: 2 epochs of Adam(0.01) from zero on batches of 64 (seed 0)
    inputs = x.reshape(len(x), -1).double()
    w = torch.zeros(64, 10, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    opt, gen = torch.optim.Adam([w, b], lr=0.01), torch.Generator().manual_seed(0)
    for _ in range(2):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(inputs[perm[i:i + 64]] @ w + b, y[perm[i:i + 64]]).backward()
            opt.step()
    with torch.no_grad():
        expected = -torch.log_softmax(inputs @ w + b, 1)[torch.arange(len(y)), y]
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)
    wrong = (inputs @ w + b).argmax(1) != y
    assert scores[wrong].min() > scores[~wrong].median()  # misclassified examples rank hard


def test_a_corrupt_cache_file_is_trained_again(cache):
    _, x, y = digits_train()
    scores, _, path = _difficulty.cached(x, y, 2)
    path.write_bytes(b"not a tensor")
    again, trained, _ = _difficulty.cached(x, y, 2)
    assert trained and torch.equal(again, scores)


def test_build_reads_the_cache_from_the_configured_directory(tmp_path, capsys):
    cfg = compose(["logger=none", "data.order=curriculum", f"data.curriculum.cache_dir={tmp_path / 'mine'}"])
    loaded = datasets.load(cfg.data, 0)
    first = build(cfg.data, loaded)
    assert "trained the reference run, saved to " + str(tmp_path / "mine") in capsys.readouterr().out
    second = build(cfg.data, loaded)
    assert "difficulty: read from " + str(tmp_path / "mine") in capsys.readouterr().out
    assert torch.equal(first.scores, second.scores) and (first.start, first.epochs, first.mix) == (0.2, 5, 0.2)


def test_a_datasets_own_difficulty():
    train_set = TensorDataset(torch.randn(6, 3), torch.arange(6) % 2)
    train_set.difficulty = [5.0, 1.0, 4.0, 0.0, 3.0, 2.0]
    own = Data(train_set, train_set, "classification", (3,), 2)
    order = build({"order": "curriculum", "curriculum": {"score": "dataset", "start": 0.5, "epochs": 2}}, own)
    assert set(drawn(order, 0, n=6)) == {3, 1, 5}  # the three easiest by their own score
    train_set.difficulty = [1.0, 2.0]
    with pytest.raises(ConfigError, match=r"difficulty must be 6 finite numbers \(one per example\), got shape"):
        build({"order": "curriculum", "curriculum": {"score": "dataset"}}, own)
    with pytest.raises(ConfigError, match=r"score=dataset: the training set \(TensorDataset\) has no difficulty"):
        build({"order": "mixed", "curriculum": {"score": "dataset"}},
              Data(TensorDataset(torch.randn(6, 3), torch.arange(6) % 2), train_set, "classification", (3,), 2))


# --- runs ---------------------------------------------------------------------------------------------------------
class Seen(pl.Callback):
    """The training inputs of each epoch, as the model received them."""

    def __init__(self):
        self.epochs: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.epochs.setdefault(trainer.current_epoch, []).append(batch[0].clone())


def test_a_resumed_run_sees_the_batches_of_one_that_never_stopped(tmp_path, cache):
    base = ["logger=none", "data.order=mixed", "data.curriculum.epochs=3", "data.curriculum.mix=0.3"]
    whole, first, rest = Seen(), Seen(), Seen()
    train(compose([*base, "trainer.max_epochs=4", f"checkpoint.dir={tmp_path / 'a'}"]), callbacks=[whole])
    train(compose([*base, "trainer.max_epochs=2", f"checkpoint.dir={tmp_path / 'b'}"]), callbacks=[first])
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    result = train(compose([*base, "trainer.max_epochs=4", f"ckpt_path={ckpt}", f"checkpoint.dir={tmp_path / 'c'}"]),
                   callbacks=[rest])
    assert set(rest.epochs) == {2, 3}
    for epoch, batches in {**first.epochs, **rest.epochs}.items():
        assert all(torch.equal(a, b) for a, b in zip(batches, whole.epochs[epoch], strict=True)), epoch
    assert not torch.equal(whole.epochs[0][0], whole.epochs[1][0])
    assert math.isfinite(result.value)


def test_curriculum_trains_only_on_the_easiest_examples_first(cache):
    cfg = compose(["logger=none", "data.order=curriculum", "data.curriculum.start=0.1", "data.curriculum.epochs=2",
                   "trainer.max_epochs=2", "checkpoint.enabled=false"])
    seen = Seen()
    train(cfg, callbacks=[seen])
    loaded = datasets.load(cfg.data, 0)
    x = loaded.train.tensors[0]
    easiest = torch.argsort(_difficulty.cached(*loaded.train.tensors, 2)[0], stable=True)[:math.ceil(0.1 * len(x))]
    first = torch.cat(seen.epochs[0])
    assert len(first) == len(x)  # a whole epoch's steps
    members = (first[:, None] == x[easiest][None]).flatten(2).all(2).any(1)
    assert members.all()  # every input of epoch 0 is one of the 10% easiest


def standalone_val_loss(cfg) -> float:
    """The run's final val_loss at full precision, as MLflow has it (Lightning's callback_metrics are float32)."""
    result = train(cfg)
    return MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics["val_loss"]


def test_population_members_draw_their_standalone_order(cache):
    """A member's batch indices equal its standalone sampler's; and trained, each member is its standalone run."""
    scores = [RANKED, RANKED.flip(0)]
    orders = [Order("curriculum", scores[0], 0.2, 4), Order("mixed", scores[1], 0.2, 4, 0.5), None]
    xs = torch.arange(N, dtype=torch.float64).repeat(2, 1)[..., None]  # (2 datasets, N, 1): x = the index
    batches = Batches(xs, xs[..., 0].long(), [0, 1, 0], [3, 4, 3], 8, True, lambda: 2, orders)
    got = torch.cat([x[..., 0] for x, _ in batches], 1).long()  # (K=3, N)
    for k, (seed, order) in enumerate(zip([3, 4, 3], orders)):
        assert got[k].tolist() == drawn(order, 2, seed=seed)
    overrides = ["optimizer=adam", "population.lr=[1e-3,3e-2]", "population.seed=[0,1]", "trainer.precision=64-true",
                 "data.order=curriculum", "data.curriculum.start=0.3", "trainer.max_epochs=2",
                 "checkpoint.enabled=false"]
    result = train_population(compose(overrides))
    configs, _ = member_configs(compose(overrides))
    for member, cfg in zip(result.members, configs):
        assert member.value == pytest.approx(standalone_val_loss(cfg), rel=1e-9, abs=0)


def test_population_members_with_different_orders_each_train_as_alone(cache):
    """A study's population stacks trials whose data.order differ: each member still equals its own run."""
    base = ["optimizer=adam", "trainer.precision=64-true", "trainer.max_epochs=2", "checkpoint.enabled=false"]
    names = ["shuffle", "fixed", "curriculum", "anti_curriculum", "mixed"]
    settings = [{"optimizer.lr": 3e-3, "seed": 1, "data.order": name} for name in names]
    result = train_population(compose(base), settings)
    values = [m.value for m in result.members]
    assert len(set(values)) == len(names)
    for value, name in zip(values, names):
        alone = standalone_val_loss(compose([*base, "optimizer.lr=3e-3", "seed=1", f"data.order={name}"]))
        assert value == pytest.approx(alone, rel=1e-9, abs=0), name



def test_population_order_from_the_command_line_gives_each_member_its_order(cache):
    """``population.order=[...]`` crosses data.order with the other lists; each member is its standalone run."""
    base = ["optimizer=adam", "trainer.precision=64-true", "trainer.max_epochs=2", "checkpoint.enabled=false",
            "optimizer.lr=3e-3", "seed=1"]
    overrides = [*base, "population.order=[fixed,anti_curriculum]", "population.lr=[3e-3]"]
    configs, settings = member_configs(compose(overrides))
    assert [c.data.order for c in configs] == ["fixed", "anti_curriculum"]
    assert settings == [{"optimizer.lr": 3e-3, "data.order": name} for name in ("fixed", "anti_curriculum")]
    result = train_population(compose(overrides))
    for member, name in zip(result.members, ("fixed", "anti_curriculum")):
        alone = standalone_val_loss(compose([*base, f"data.order={name}"]))
        assert member.value == pytest.approx(alone, rel=1e-9, abs=0), name


def test_a_bad_population_order_names_the_member():
    with pytest.raises(ConfigError, match=r"population member \(order=random\): data.order must be one of shuffle, "
                                          r"fixed, curriculum, mixed, anti_curriculum, got 'random'"):
        train_population(compose(["logger=none", "population.order=[shuffle,random]", *QUICK]))

# --- mistakes -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("data.order=curicculum", (r"data.order must be one of shuffle, fixed, curriculum, mixed, anti_curriculum, "
                               r"got 'curicculum'")),
    ("data.curriculum.start=0", r"data.curriculum.start must be a fraction in \(0, 1\], got 0"),
    ("data.curriculum.start=1.5", r"data.curriculum.start must be a fraction in \(0, 1\], got 1.5"),
    ("data.curriculum.mix=-0.1", r"data.curriculum.mix must be a probability in \[0, 1\], got -0.1"),
    ("data.curriculum.epochs=0", r"data.curriculum.epochs must be an integer >= 1, got 0"),
    ("data.curriculum.score=loss", r"data.curriculum.score must be one of reference, dataset, got 'loss'"),
    ("+data.curriculum.pace=2", r"data.curriculum.pace: not a key of data.curriculum; its keys: start, epochs"),
])
def test_bad_order_settings_are_config_errors_before_training(override, message):
    with pytest.raises(ConfigError, match=message):
        train(compose(["logger=none", override]))


def test_a_datamodule_with_another_order_is_refused(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))  # userpkg: the tests' user package
    overrides = ["model=custom", "model._target_=userpkg.nets.Net", "+model.shape=${data.shape}",
                 "+model.n_classes=${data.n_classes}", "data=custom", "data._target_=userpkg.data.BlobsModule",
                 "+data.size=96", "logger=none", *QUICK]
    with pytest.raises(ConfigError, match=r"data.order=fixed: data._target_ userpkg.data.BlobsModule is a "
                                          r"LightningDataModule, whose own train_dataloader\(\) orders the batches"):
        train(compose([*overrides, "data.order=fixed"]))


def test_curriculum_of_an_objective_needs_a_dataset_score():
    with pytest.raises(ConfigError, match=r"scores classification data only, this is objective"):
        train(compose(["data=synthetic", "model=rosenbrock", "optimizer=sgd", "logger=none", "data.order=curriculum",
                       *QUICK]))


def test_help_shows_the_order_keys():
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0 and "  order: shuffle\n  curriculum:\n    start: 0.2\n" in res.stdout


# --- studies ------------------------------------------------------------------------------------------------------
def test_a_study_searches_data_order_as_a_categorical(tmp_path, mlflow_uri):
    from optstudy.cli import main as cli

    spec = {"name": "order", "n_trials": 4, "seeds": [0], "sampler": {"name": "grid"}, "pruner": {"name": "none"},
            "overrides": ["trainer.max_epochs=2"],
            "optimizers": {"adam": {"lr": [3e-3], "data.order": ["shuffle", "curriculum", "anti_curriculum", "mixed"]}}}
    path = tmp_path / "order.yaml"
    path.write_text(yaml.safe_dump(spec))
    storage = str(tmp_path / "order.journal")
    assert cli(["study", "run", str(path), "--storage", storage]) == 0
    from optstudy.study.storage import open_storage

    done = optuna.load_study(study_name="order", storage=open_storage(storage)[0]).get_trials()
    assert sorted(t.params["data.order"] for t in done) == ["anti_curriculum", "curriculum", "mixed", "shuffle"]
    for t in done:
        assert t.state == optuna.trial.TrialState.COMPLETE, t.user_attrs.get("fail_reason")
        run = MlflowClient(mlflow_uri).get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.params["data.order"] == t.params["data.order"]
    assert len({t.value for t in done}) == 4  # four orders, four different results
    assert cli(["study", "report", "order", "--storage", storage, "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<td>data.order</td>" in page  # the best trial's params (the per-parameter views are images)
    configs = (tmp_path / "report" / "configurations.csv").read_text()
    assert "params_data.order" in configs and all(o in configs for o in ("anti_curriculum", "mixed", "shuffle"))


def test_a_population_study_searches_data_order(tmp_path, mlflow_uri):
    from optstudy.cli import main as cli

    spec = {"name": "porder", "n_trials": 3, "seeds": [0], "sampler": {"name": "grid"}, "pruner": {"name": "none"},
            "overrides": ["trainer.max_epochs=1"], "population": 3,
            "optimizers": {"sgd": {"lr": [0.1], "data.order": ["fixed", "curriculum", "shuffle"]}}}
    path = tmp_path / "porder.yaml"
    path.write_text(yaml.safe_dump(spec))
    storage = str(tmp_path / "porder.journal")
    assert cli(["study", "run", str(path), "--storage", storage]) == 0
    from optstudy.study.storage import open_storage

    done = optuna.load_study(study_name="porder", storage=open_storage(storage)[0]).get_trials()
    values = {t.params["data.order"]: t.value for t in done}
    assert len(values) == 3
    for name, value in values.items():  # each trial of the population is the order's standalone run
        alone = train(compose(["trainer.max_epochs=1", "optimizer=sgd", "optimizer.lr=0.1", f"data.order={name}",
                               "logger=none", "checkpoint.enabled=false"])).value
        assert value == pytest.approx(alone, rel=1e-5), name


# --- the reproduction ---------------------------------------------------------------------------------------------
def test_the_curriculum_reproduction_runs_quick(tmp_path, cache):
    """``python scripts/reproduce.py curriculum --quick``: every order trained, the numbers and the figure written;
    the shipped JSON (the document's numbers) has the same keys."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    assert reproduce.main(["curriculum", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "curriculum.json").read_text())
    assert [r["order"] for r in data["summary"]] == ["shuffle", "fixed", "curriculum", "anti_curriculum", "mixed",
                                                    "curriculum_balanced"]
    assert all(len(r["val_acc"]) == 2 and not r["diverged"] for r in data["runs"])
    by = {r["order"]: r for r in data["summary"]}
    assert by["shuffle"]["early_vs_shuffle"] == 0 and by["anti_curriculum"]["early_acc"] < by["shuffle"]["early_acc"]
    assert (tmp_path / "curriculum.png").stat().st_size > 10_000
    shipped = ROOT / "docs" / "figures" / "curriculum.json"
    if shipped.is_file():
        assert set(json.loads(shipped.read_text())) == set(data)


def test_balanced_pools_hold_each_class_share(cache):
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 5.0, 6.0, 7.0, 8.0], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])  # class 1 is harder as a whole
    assert set(drawn(Order("curriculum", scores, 0.5, 2), 0, n=8)) == {0, 1, 2, 3}  # plain: class 0 alone
    from optstudy.data._order import within_class

    balanced = within_class(scores, labels)
    assert balanced.tolist() == [0.125, 0.375, 0.625, 0.875] * 2
    assert set(drawn(Order("curriculum", balanced, 0.5, 2), 0, n=8)) == {0, 1, 4, 5}  # the easier half of each
    cfg = compose(["logger=none", "data.order=curriculum", "data.curriculum.balanced=true"])
    loaded = datasets.load(cfg.data, 0)
    order = build(cfg.data, loaded)
    y = loaded.train.tensors[1]
    pool = torch.argsort(order.scores, stable=True)[: len(y) // 5]
    shares = torch.bincount(y[pool], minlength=10) / torch.bincount(y, minlength=10)
    assert shares.min() > 0.18 and shares.max() < 0.22  # ~20% of every class in a 20% pool
    with pytest.raises(ConfigError, match=r"data.curriculum.balanced must be true or false, got 'yes'"):
        compose_check(["data.curriculum.balanced=yes"])


def compose_check(overrides):
    from optstudy.config import validate

    validate(compose(["logger=none", *overrides]))
