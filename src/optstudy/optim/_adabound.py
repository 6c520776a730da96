"""AdaBound and AMSBound (Luo et al., ICLR 2019): Adam whose per-element step size is clipped into bounds that close
on ``final_lr`` over time, so training moves from Adam-like to SGD-like."""

from __future__ import annotations

import numpy as np
import torch

from optstudy.optim import _members
from optstudy.optim._adam import _AdamBase
from optstudy.optim._base import GROUP_KEYS
from optstudy.optim._pieces import clip_, coupled_decay, ema_, ema_sq_, max_, num, sqrt
from optstudy.optim._rules import fail
from optstudy.optim.bounds import BoundSchedule, make_bound

_SCHEDULES: dict[tuple, BoundSchedule] = {}


def _schedule(params: dict) -> BoundSchedule:
    """The schedule a group's ``bound`` dict describes, built once (``prepare_group`` builds it eagerly, so that a
    step traced by ``torch.compile`` only reads it: dynamo cannot trace the dataclass's construction)."""
    key = tuple(params.items())
    schedule = _SCHEDULES.get(key)
    if schedule is None:
        schedule = _SCHEDULES[key] = make_bound(dict(params))
    return schedule


def _adabound_kernel(p, g, m, v, *v_max, step_size, lo, hi, beta1, beta2, gain1, gain2, eps, wd, decay):
    g = coupled_decay(p, g, wd, decay)
    ema_(m, g, beta1, gain1)
    ema_sq_(v, g, beta2, gain2)
    if v_max:
        v = max_(v_max[0], v)
    # torch computes a number over a tensor as the tensor's reciprocal times the number: written so, a member's
    # per-member step_size (a tensor) rounds as its standalone run's number does
    p.sub_(clip_((v.sqrt() + eps).reciprocal() * step_size, lo, hi) * m)


class AdaBound(_AdamBase):
    r"""AdaBound and, with ``amsbound=True``, AMSBound, as the authors' code (PyPI ``adabound`` 0.0.5) computes them::

        m ← β1·m + (1-β1)·g;  v ← β2·v + (1-β2)·g²;  amsbound: v̄ ← max(v̄, v), v ← v̄
        η* = final_lr·η/η0                     (η0: the group's lr when it was added, kept as ``eta0``)
        s  = clip(η·√bc2 / (bc1·(√v + ε)), η*·lower(t), η*·upper(t))
        θ ← θ - s ⊙ m

    with ``lower``/``upper`` from the ``bound`` schedule (default: the code's hyperbolic ``1 - 1/(γt+1)``,
    ``1 + 1/(γt)``; see ``optstudy.optim.bounds``). Because η* follows η/η0, an LR scheduler moves the bounds too.
    Defaults lr=1e-3, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-3, eps=1e-8. Effective learning rate ``s``;
    direction ``m``.

    Departures from the reference code, all in its failure cases: η0 lives in the param group under ``eta0`` (saved
    by ``state_dict``, set for groups added later, where the code raises or silently skips them); not under
    ``initial_lr``, which torch's LR schedulers write (OneCycleLR sets it to max_lr/div_factor, CyclicLR and LambdaLR
    reset lr from it) while the code's η0 never changes after construction. A state dict without ``eta0`` takes the
    ``initial_lr`` optstudy used to keep it under, else this optimizer's own η0 (the code keeps its own). lr=0 at
    construction (the code divides by zero) and gamma <= 0 are rejected with a ``ConfigError``. ε is added to √v,
    not √v̂ as in torch's Adam, so with ``bound="none"`` this equals ``torch.optim.Adam(eps=0)`` only when ε = 0.
    ``gamma`` configures the hyperbolic schedule; ``bound`` picks another family (``"exponential"``,
    ``{"name": "linear", "horizon": 5000}``, a ``BoundSchedule`` instance, ...); the group keeps it as a dict.
    """

    name = "adabound"
    DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-3, eps=1e-8, weight_decay=0.0,
                    bound=None, decoupled_weight_decay=False, maximize=False)
    FIXED = dict(amsbound=False)
    TORCH_FLAGS = dict(foreach=None, differentiable=False, capturable=False, fused=None)  # Adam's
    GROUP_KEYS = GROUP_KEYS | {"eta0"}
    kernel = staticmethod(_adabound_kernel)

    def prepare_group(self, group):
        super().prepare_group(group)
        group.setdefault("eta0", num(group["lr"]))  # a number: a tensor lr is filled in place by schedulers
        if not group["eta0"] > 0:
            raise fail(f"optimizer {self.name}", "lr", "must be > 0 when the optimizer is built (the bounds scale "
                       "with lr / initial lr)", group["eta0"])
        # kept as a plain dict ({"name": ..., **params}) so that state dicts load with torch.load(weights_only=True)
        group["bound"] = make_bound(group["bound"] or "hyperbolic", gamma=group["gamma"],
                                    beta2=group["betas"][1]).params()
        _schedule(group["bound"])

    def upgrade_group(self, group, old):
        group.setdefault("eta0", group.get("initial_lr", old["eta0"]))

    def buffers(self, group):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsbound"] else ())

    def vectorized(self, group):
        return not _members.varies(group["bound"])

    def bounds(self, group, t: int) -> tuple[float, float]:
        """The (lower, upper) bound on the step size at step ``t`` for this group's current lr; in a population whose
        members differ, two arrays of K."""
        if not self.vectorized(group):
            lower, upper = zip(*(self.bounds(view, t) for view in self._views(group)))
            return np.array(lower), np.array(upper)
        final = group["final_lr"] * group["lr"] / group["eta0"]
        schedule = _schedule(group["bound"])
        return final * schedule.lower(t), final * schedule.upper(t)

    def scalars(self, group, state):
        bc1, bc2 = self.corrections(group, state)
        beta1, beta2 = group["betas"]
        lo, hi = self.bounds(group, state["step"])
        return dict(step_size=group["lr"] * sqrt(bc2) / bc1, lo=lo, hi=hi, beta1=beta1, beta2=beta2,
                    gain1=1 - beta1, gain2=1 - beta2, eps=num(group["eps"]))

    def _raw_lr(self, state, s) -> torch.Tensor:
        v = state.get("max_exp_avg_sq", state["exp_avg_sq"])
        return s["step_size"] / (v.sqrt() + s["eps"])

    def effective_lr(self, p, state, group, s):
        return self._raw_lr(state, s).clamp_(s["lo"], s["hi"])

    def clip_counts(self, p, state, group, s) -> tuple[torch.Tensor, torch.Tensor]:
        """Number of elements of ``p`` whose step size was raised to the lower / cut to the upper bound; in a
        population, per member (shape ``(K,)``)."""
        raw = self._raw_lr(state, s)
        low, high = raw < s["lo"], raw > s["hi"]
        if self.members:
            return low.reshape(len(low), -1).sum(1), high.reshape(len(high), -1).sum(1)
        return low.sum(), high.sum()


class AMSBound(AdaBound):
    __doc__ = AdaBound.__doc__
    name = "amsbound"
    FIXED = dict(amsbound=True)
