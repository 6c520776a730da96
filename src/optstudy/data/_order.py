"""The order in which training examples are seen: ``data.order`` and ``data.curriculum.*``.

Every epoch draws ``n`` indices (``n`` = training examples, so that every epoch has the same number of steps, which
Lightning and a population's stacked batches need). Which indices, per ``data.order``:

- ``shuffle`` (the default): a fresh permutation of all ``n`` each epoch, ``randperm(n)`` from a generator seeded
  with ``seed * 100_003 + epoch`` (exactly what ``optstudy.lit.EpochShuffle`` always drew).
- ``fixed``: one permutation for every epoch (shuffle's epoch-0 permutation).
- ``curriculum``: easy to hard (Bengio et al. 2009). Examples are ranked by a difficulty score (low = easy); epoch
  ``e`` draws from the pool of the ``m_e = ceil(f_e n)`` easiest, with the "baby steps" pacing
  ``f_e = min(1, start + (1 - start) e / epochs)``: ``data.curriculum.start`` of the set in epoch 0, growing linearly
  until the whole set from epoch ``data.curriculum.epochs`` on (``epochs: 1`` is Bengio et al.'s two-stage switch).
  Within the pool the ``n`` draws are shuffled passes over it (each pool example ``n / m_e`` times, none twice
  before all once).
- ``anti_curriculum``: the same with the ranking reversed: hardest first.
- ``mixed``: Zaremba & Sutskever (2014)'s mix: each of the ``n`` draws is, with probability ``data.curriculum.mix``
  = p, a uniform draw from the whole set (a permutation of it, so no example twice), else the curriculum's draw.
- ``data.curriculum.balanced``: the paced orders rank each example by its difficulty quantile within its own class,
  so that every pool holds the same share of each class (classification only).

The order is a pure function of (seed, epoch, scores): a run resumed from a checkpoint sees the batches of one that
never stopped, and a population member those of its standalone run. The scores come from ``optstudy.data._difficulty``
(``data.curriculum.score``: ``reference``, the per-example loss of a short reference run, cached; or ``dataset``, the
training set's own ``difficulty``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from optstudy.errors import ConfigError

ORDERS = ("shuffle", "fixed", "curriculum", "mixed", "anti_curriculum")
PACED = ("curriculum", "mixed", "anti_curriculum")  # the orders that need difficulty scores
SCORES = ("reference", "dataset")
# what data.curriculum holds when a data config lacks it (train.yaml's defaults)
DEFAULTS = {"start": 0.2, "epochs": 5, "mix": 0.2, "score": "reference", "reference_epochs": 2, "cache_dir": None,
            "balanced": False}


@dataclasses.dataclass(frozen=True, eq=False)  # compared (and hashed) by identity: ``scores`` is a tensor
class Order:
    """One run's ``data.order``; ``scores``: the training examples' difficulty (paced orders only)."""

    name: str = "shuffle"
    scores: torch.Tensor | None = None  # (n,) float, low = easy
    start: float = DEFAULTS["start"]
    epochs: int = DEFAULTS["epochs"]
    mix: float = DEFAULTS["mix"]

    def indices(self, n: int, seed: int, epoch: int) -> torch.Tensor:
        """The ``n`` example indices of ``epoch`` (a long tensor)."""
        return epoch_order(self, n, seed, epoch)

    def fraction(self, epoch: int) -> float:
        """The share of the set in epoch ``epoch``'s pool (the baby-steps pacing)."""
        return min(1.0, self.start + (1.0 - self.start) * epoch / self.epochs)


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)  # EpochShuffle's since the start: keep it


def epoch_order(order: Order, n: int, seed: int, epoch: int) -> torch.Tensor:
    """``order``'s ``n`` indices for ``epoch`` (module docstring: the rules)."""
    if order.name == "shuffle":
        return torch.randperm(n, generator=_generator(seed, epoch))
    if order.name == "fixed":
        return torch.randperm(n, generator=_generator(seed, 0))
    gen = _generator(seed, epoch)
    ranked = ranking(order.scores, hardest_first=order.name == "anti_curriculum")
    pool = ranked[: max(1, math.ceil(order.fraction(epoch) * n - 1e-9))]  # 1e-9: 0.2 * 10 must give 2, not 3
    paced = _passes(pool, n, gen)
    if order.name != "mixed":
        return paced
    uniform = torch.randperm(n, generator=gen)
    return torch.where(torch.rand(n, generator=gen) < order.mix, uniform, paced)


def ranking(scores: torch.Tensor, hardest_first: bool = False) -> torch.Tensor:
    """Example indices from easiest to hardest (or the reverse); ties keep index order (a stable sort)."""
    return torch.argsort(-scores if hardest_first else scores, stable=True)


def within_class(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``data.curriculum.balanced``: each example's quantile of difficulty within its own class, (rank + 0.5) / count,
    so that every pool holds about the same share of each class (a weak reference model finds some classes easy as a
    whole: on MNIST-1D, seed 0, its easiest 20% are 91% digits 0, 3 and 6, which a plain curriculum starts on alone)."""
    out = torch.empty_like(scores, dtype=torch.float64)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        ranks = torch.argsort(torch.argsort(scores[idx], stable=True), stable=True)
        out[idx] = (ranks.double() + 0.5) / len(idx)
    return out


def _passes(pool: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` draws from ``pool``: shuffled passes over it, cut at ``n``."""
    passes = -(-n // len(pool))
    return torch.cat([pool[torch.randperm(len(pool), generator=gen)] for _ in range(passes)])[:n]


# --- from the config --------------------------------------------------------------------------------------------------
def settings(data_cfg) -> tuple[str, dict]:
    """``(data.order, data.curriculum)`` of a data config (a DictConfig or a plain dict), defaults filled in."""
    from omegaconf import OmegaConf

    get = data_cfg.get
    curriculum = get("curriculum") or {}
    if OmegaConf.is_config(curriculum):
        curriculum = OmegaConf.to_container(curriculum, resolve=True)
    if not isinstance(curriculum, dict):
        raise ConfigError(f"data.curriculum must be a mapping of {', '.join(DEFAULTS)}, got {curriculum!r}")
    return get("order", "shuffle"), {**DEFAULTS, **curriculum}


def check(data_cfg) -> None:
    """Every ``data.order`` / ``data.curriculum`` value's rule; a ``ConfigError`` naming the key and the value."""
    name, cur = settings(data_cfg)
    if name not in ORDERS:
        raise ConfigError(f"data.order must be one of {', '.join(ORDERS)}, got {name!r}")
    unknown = sorted(set(cur) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"data.curriculum.{unknown[0]}: not a key of data.curriculum; its keys: "
                          f"{', '.join(DEFAULTS)}")
    if not (_real(cur["start"]) and 0 < cur["start"] <= 1):
        raise ConfigError(f"data.curriculum.start must be a fraction in (0, 1], got {cur['start']!r}")
    if not (_real(cur["mix"]) and 0 <= cur["mix"] <= 1):
        raise ConfigError(f"data.curriculum.mix must be a probability in [0, 1], got {cur['mix']!r}")
    for key in ("epochs", "reference_epochs"):
        if not (isinstance(cur[key], int) and not isinstance(cur[key], bool) and cur[key] >= 1):
            raise ConfigError(f"data.curriculum.{key} must be an integer >= 1, got {cur[key]!r}")
    if cur["score"] not in SCORES:
        raise ConfigError(f"data.curriculum.score must be one of {', '.join(SCORES)}, got {cur['score']!r}")
    if not isinstance(cur["balanced"], bool):
        raise ConfigError(f"data.curriculum.balanced must be true or false, got {cur['balanced']!r}")
    if cur["cache_dir"] is not None and not isinstance(cur["cache_dir"], str):
        raise ConfigError(f"data.curriculum.cache_dir must be a directory path or null, got {cur['cache_dir']!r}")


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def build(data_cfg, data, quiet: bool = False) -> Order | None:
    """The ``Order`` of a run on ``data`` (an ``optstudy.data.Data``), its scores computed or read from the cache;
    None for ``shuffle`` (the sampler's own permutation: nothing changes). A user's LightningDataModule orders its
    own batches: any other ``data.order`` is refused."""
    check(data_cfg)
    name, cur = settings(data_cfg)
    if name == "shuffle":
        return None
    if data.datamodule is not None:
        from optstudy.data import label

        raise ConfigError(f"data.order={name}: data._target_ {label(data_cfg)} is a LightningDataModule, whose own "
                          "train_dataloader() orders the batches; use data.order=shuffle (the default) or return "
                          "its (train, val) Datasets instead")
    scores = None
    if name in PACED:
        from optstudy.data import _difficulty

        scores = _difficulty.scores(data, cur, quiet=quiet)
        if cur["balanced"]:
            scores = within_class(scores, _difficulty.labels(data, "data.curriculum.balanced"))
    return Order(name, scores, float(cur["start"]), int(cur["epochs"]), float(cur["mix"]))


def for_members(data_cfgs: list, datasets: list) -> list[Order | None]:
    """Each population member's ``build``, from its own data config and dataset; members with the same dataset and
    order settings share one ``Order`` (one score computation, one permutation per epoch)."""
    import json

    made: dict = {}
    out = []
    for cfg, data in zip(data_cfgs, datasets):
        name, cur = settings(cfg)
        key = (id(data), name, json.dumps(cur, sort_keys=True, default=str))
        if key not in made:
            made[key] = build(cfg, data)
        out.append(made[key])
    return out
