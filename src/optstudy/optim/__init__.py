"""The optimizer core: twelve optimizers equal to their references, bound schedules, effective learning rates.

    >>> import optstudy.optim as o
    >>> opt = o.build("amsbound", model.parameters(), lr=1e-3, final_lr=0.1, bound="exponential")
    >>> ... opt.step() ...
    >>> lrs = opt.effective_lrs()          # one tensor per stepped parameter
    >>> hist = o.lr_histogram(opt)         # counts of log10 lr per group, clipped fractions

Each class's docstring gives its update rule, defaults and the reference it equals. In a LightningModule,
``configure_optimizers`` returns ``o.build(name, self.parameters(), ...)`` (alone or with a scheduler config);
``optstudy.callbacks`` logs its effective learning rates.
"""

from __future__ import annotations

import difflib

from optstudy.errors import ConfigError
from optstudy.optim._adabound import AdaBound, AMSBound
from optstudy.optim._adam import Adam, Adamax, AMSGrad, NAdam
from optstudy.optim._adaptive import Adadelta, Adagrad, RMSprop
from optstudy.optim._base import CoreOptimizer
from optstudy.optim._lrhist import LRHistogram, lr_histogram
from optstudy.optim._sgd import SGD, Momentum, Nesterov
from optstudy.optim.bounds import SCHEDULES, BoundSchedule, make_bound

REGISTRY: dict[str, type[CoreOptimizer]] = {
    cls.name: cls
    for cls in (SGD, Momentum, Nesterov, Adagrad, Adadelta, RMSprop, Adam, Adamax, NAdam, AMSGrad, AdaBound, AMSBound)
}
NAMES: tuple[str, ...] = tuple(REGISTRY)


def build(name: str, params, **hparams) -> CoreOptimizer:
    """The optimizer ``name`` (one of ``NAMES``) over ``params`` with torch.optim-style keywords.

    ``impl="loop" | "compiled" | "auto"`` picks the eager or ``torch.compile``d step (see ``CoreOptimizer``).
    ``grad_noise={"eta": 0.3, "gamma": 0.55, "seed": 0}`` adds annealed gradient noise ``N(0, η/(1+t)^γ)`` to every
    gradient (Neelakantan et al. 2015; ``optstudy.optim._noise``); off when None or eta is 0.
    Raises ``ConfigError`` for an unknown name or keyword and for values that break a rule.
    """
    return _lookup(name)(params, **hparams)


def check(name: str, **hparams) -> None:
    """Raises the ``ConfigError`` that ``build(name, params, **hparams)`` would for a name, keyword or value."""
    _lookup(name).check(**hparams)


def defaults(name: str) -> dict:
    """The keywords ``name`` accepts, with their reference defaults."""
    return dict(_lookup(name).DEFAULTS)


def _lookup(name: str) -> type[CoreOptimizer]:
    if name not in REGISTRY:
        close = difflib.get_close_matches(str(name), NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown optimizer {name!r}{hint}; valid names: {', '.join(NAMES)}")
    return REGISTRY[name]


__all__ = [
    "NAMES", "REGISTRY", "build", "check", "defaults", "CoreOptimizer", "LRHistogram", "lr_histogram", "BoundSchedule",
    "SCHEDULES", "make_bound", "SGD", "Momentum", "Nesterov", "Adagrad", "Adadelta", "RMSprop", "Adam", "Adamax",
    "NAdam", "AMSGrad", "AdaBound", "AMSBound",
]
