"""Delayed gradients, simulated exactly in one process: ``trainer.delay``.

Asynchronous training (Hogwild!, Downpour's parameter server) applies gradients computed at parameters that have
moved since. This module reproduces that staleness deterministically, with any core optimizer, on any problem, in
populations, so that each optimizer's tolerance to delay can be measured without the noise of real processes
(McMahan & Streeter 2014, "Delay-tolerant algorithms for asynchronous distributed online learning").

Semantics. Step ``s`` (the s-th training batch, s = 0, 1, ...) computes the gradient ``g_s`` at the current
parameters and gives it a delay ``d_s`` (in steps); ``g_s`` is applied at step ``s + d_s``:

- ``trainer.delay=τ`` (an integer): ``d_s = τ``. Step ``t >= τ`` applies ``g_{t-τ}``; the first ``τ`` steps apply
  nothing (the queue is filling: the optimizer does not step, so its count ``t`` counts applied updates, and Adam's
  bias correction starts with the first gradient it sees). ``τ = 0`` is today's training, bit for bit.
- ``trainer.delay={dist: ..., ...}``: ``d_s`` drawn from a distribution, as a pure function of (seed, s), so a run is
  reproducible and resumes exactly without any RNG state:
  ``uniform`` on {0, ..., max}; ``geometric`` on {0, 1, ...} with mean ``mean`` (success probability 1/(1+mean));
  ``poisson`` with mean ``mean``; ``max`` (optional for the last two) caps a draw (``min(d, max)``). ``seed``: the
  delays' seed (default: the run's ``seed``).
  Gradients may then arrive out of order and several at one step: every gradient is applied exactly once, **as its
  own optimizer step**, in the order (arrival step, computing step), as a parameter server applies each push as it
  comes. Steps where nothing arrives apply nothing.
- Gradients still in flight when training ends are never applied (``delay/dropped``).

Each applied gradient is clipped (``trainer.gradient_clip_val``) by itself, as its worker would before pushing it
(Lightning clips ``p.grad`` just before each optimizer step, when it holds exactly that gradient). An LR scheduler
steps once per training step, as without delay: every update applied at step ``t`` uses step ``t``'s lr.

Staleness. The delay recorded for an applied gradient is its *staleness*: the number of optimizer updates applied
between the read of the parameters it was computed at and its own application (a fixed ``τ``: ``min(s, τ)``, so ``τ``
from the ``τ``-th gradient on). It is the quantity the asynchronous trainers observe, logged under the same names:
``delay/mean``, ``delay/max``, ``delay/p50``, ``delay/p90``, ``delay/p99``, ``delay/applied`` (gradients applied so
far) every ``trainer.log_every_n_steps`` and at the end, with ``delay/dropped`` at the end.

Checkpoints hold the queue of pending gradients and the counts, so a resumed run continues exactly.

Populations: every member has the same delays (a fixed ``τ``, or draws from ``trainer.delay.seed``), so the stacked
optimizer steps all rows together and member k equals its standalone run with the same ``trainer.delay``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from optstudy.errors import ConfigError

DISTS = ("uniform", "geometric", "poisson")
KEYS = ("dist", "mean", "max", "seed")
_SALT = 0xDE1A  # keeps the delays' random stream apart from any other stream seeded with the run's seed
PRECISIONS = ("32-true", "32", 32, "64-true", "64", 64)  # no loss scaling: p.grad is the gradient as it is


@dataclasses.dataclass(frozen=True)
class DelaySpec:
    """``trainer.delay``, validated: a fixed ``tau``, or a distribution ``dist`` with ``mean``/``max`` and ``seed``."""

    tau: int | None = None
    dist: str | None = None
    mean: float | None = None
    max: int | None = None
    seed: int = 0

    def draw(self, step: int) -> int:
        """``d_step``: the delay of the gradient computed at ``step``."""
        if self.tau is not None:
            return self.tau
        rng = np.random.default_rng([self.seed, step, _SALT])  # a pure function of (seed, step)
        if self.dist == "uniform":
            d = int(rng.integers(0, self.max + 1))
        elif self.dist == "geometric":  # numpy's counts trials to the first success (>= 1): failures are d
            d = int(rng.geometric(1.0 / (1.0 + self.mean))) - 1
        else:
            d = int(rng.poisson(self.mean))
        return d if self.max is None else min(d, self.max)

    def label(self) -> str:
        if self.tau is not None:
            return str(self.tau)
        shown = {"mean": self.mean, "max": self.max, "seed": self.seed}
        return f"{self.dist}(" + ", ".join(f"{k}={v}" for k, v in shown.items() if v is not None) + ")"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse(value, run_seed: int = 0) -> DelaySpec | None:
    """``trainer.delay`` as a ``DelaySpec``, or None for 0/null (no delay: today's training). Raises ``ConfigError``
    naming the key, the rule and the value."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None or (_is_int(value) and value == 0):
        return None
    if _is_int(value):
        if value < 0:
            raise ConfigError(f"trainer.delay must be an integer >= 0 (steps) or a distribution, got {value!r}")
        return DelaySpec(tau=int(value))
    if not isinstance(value, dict):
        raise ConfigError(f"trainer.delay must be an integer >= 0 (steps) or a distribution {{dist: "
                          f"{'|'.join(DISTS)}, mean: ..., max: ..., seed: ...}}, got {value!r}")
    unknown = sorted(set(value) - set(KEYS))
    if unknown:
        raise ConfigError(f"trainer.delay.{unknown[0]}: not a key of a delay distribution (keys: {', '.join(KEYS)}), "
                          f"got {value[unknown[0]]!r}")
    dist, mean, cap, seed = (value.get(k) for k in KEYS)
    if dist not in DISTS:
        raise ConfigError(f"trainer.delay.dist must be one of {', '.join(DISTS)}, got {dist!r}")
    if cap is not None and not (_is_int(cap) and cap >= 0):
        raise ConfigError(f"trainer.delay.max must be an integer >= 0 (steps), got {cap!r}")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**63):
        raise ConfigError(f"trainer.delay.seed must be an integer >= 0 or null (the run's seed), got {seed!r}")
    if dist == "uniform":
        if cap is None:
            raise ConfigError("trainer.delay.max must be set for dist=uniform (delays uniform on 0..max), got None")
        if mean is not None:
            raise ConfigError(f"trainer.delay.mean: dist=uniform is set by max alone (mean max/2), got {mean!r}")
    elif not (_is_number(mean) and np.isfinite(mean) and mean >= 0):
        raise ConfigError(f"trainer.delay.mean must be a number >= 0 (steps) for dist={dist}, got {mean!r}")
    return DelaySpec(dist=dist, mean=None if mean is None else float(mean), max=cap,
                     seed=int(run_seed if seed is None else seed))


def check(cfg: DictConfig) -> DelaySpec | None:
    """Validates ``trainer.delay`` and what it cannot be combined with (config.validate calls it)."""
    spec = parse(OmegaConf.select(cfg, "trainer.delay"), OmegaConf.select(cfg, "seed") or 0)
    if spec is None:
        return None
    parallel = OmegaConf.select(cfg, "trainer.name")  # hogwild, downpour, easgd (optstudy.parallel): their own loops
    if parallel is not None:
        raise ConfigError(f"trainer.delay must be 0 with trainer={parallel}, whose delays are real (logged as "
                          f"delay/*); the simulator is for single-process training, got {spec.label()}")
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches")
    if accumulate not in (None, 1):
        raise ConfigError(f"trainer.accumulate_grad_batches must be 1 with trainer.delay={spec.label()} (a delayed "
                          f"gradient is one batch's), got {accumulate!r}")
    precision = OmegaConf.select(cfg, "trainer.precision")
    if precision not in (None, *PRECISIONS):
        raise ConfigError(f"trainer.precision must be 32-true or 64-true with trainer.delay={spec.label()} (mixed "
                          f"precision scales gradients per step), got {precision!r}")
    return spec


def population_line(members: list[dict]) -> DelayLine | None:
    """The ``DelayLine`` of a population (``members``: each member's resolved config). Its members step together, so
    they share one delay sequence: the same ``trainer.delay`` (a study may set it per trial), and with random delays
    and different seeds, ``trainer.delay.seed`` (then each member equals its standalone run)."""
    delays = [m.get("trainer", {}).get("delay", 0) for m in members]
    if any(d != delays[0] for d in delays):
        other = next(d for d in delays if d != delays[0])
        raise ConfigError(f"trainer.delay must be the same for every member of a population (they step together), "
                          f"got {delays[0]!r} and {other!r}")
    seeds = sorted({m["seed"] for m in members})
    spec = parse(delays[0], members[0]["seed"])
    if spec is not None and spec.tau is None and len(seeds) > 1 and delays[0].get("seed") is None:
        raise ConfigError(f"trainer.delay.seed must be set for a population of seeds {seeds} with random delays "
                          f"(dist={spec.dist}): its members share one delay sequence (each then equals its standalone "
                          f"run with that trainer.delay.seed), got None")
    return None if spec is None else DelayLine(spec)


@dataclasses.dataclass
class Pending:
    arrival: int  # the step whose optimizer step applies it: computed + its delay
    computed: int  # the step that computed it
    version: int  # updates applied to the parameters it was computed at
    grads: list  # one tensor (or None: no gradient) per parameter, in param-group order


class DelayLine:
    """The queue of gradients in flight and the staleness of those applied. ``step`` replaces a training step's
    ``optimizer.step(closure)``."""

    def __init__(self, spec: DelaySpec):
        self.spec = spec
        self.pending: list[Pending] = []  # ordered by (arrival, computed)
        self.applied = 0  # optimizer updates applied so far
        self.counts: dict[int, int] = {}  # staleness -> gradients applied with it

    # --- the queue ------------------------------------------------------------------------------------------------
    def push(self, step: int, grads: list) -> None:
        """Queues the gradient computed at ``step`` (copied: autograd and clipping write into ``p.grad``)."""
        item = Pending(step + self.spec.draw(step), step, self.applied,
                       [None if g is None else g.detach().clone() for g in grads])
        # insertion after every item that arrives no later: (arrival, computed) order, computed steps increasing
        at = len(self.pending)
        while at and self.pending[at - 1].arrival > item.arrival:
            at -= 1
        self.pending.insert(at, item)

    def due(self, step: int) -> list[Pending]:
        """Removes and returns the gradients that arrive by ``step``, in application order."""
        n = 0
        while n < len(self.pending) and self.pending[n].arrival <= step:
            n += 1
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def _load(self, params: list[torch.Tensor], item: Pending | None) -> None:
        """``p.grad`` = the gradient ``item`` applies (None everywhere: the optimizer skips the step), and its
        staleness counted."""
        for i, p in enumerate(params):
            p.grad = None if item is None else item.grads[i]
        if item is not None:
            staleness = self.applied - item.version
            self.counts[staleness] = self.counts.get(staleness, 0) + 1
            self.applied += 1

    # --- one training step ------------------------------------------------------------------------------------------
    def step(self, optimizer, closure: Callable, step: int, after: Callable[[], None] = lambda: None):
        """Training step ``step`` with ``optimizer`` (a torch or Lightning optimizer) and Lightning's ``closure``
        (training_step and backward): the fresh gradient is queued, then each gradient due now is applied as its own
        ``optimizer.step``; ``after()`` runs after each (a projection, frozen members). Returns the closure's loss."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        due: list[Pending] = []

        def fresh():
            loss = closure()  # p.grad: g_step at the current parameters
            self.push(step, [p.grad for p in params])
            due.extend(self.due(step))
            self._load(params, due.pop(0) if due else None)
            return loss

        loss = optimizer.step(closure=fresh)
        after()
        while due:
            item = due.pop(0)
            optimizer.step(closure=lambda item=item: self._load(params, item))
            after()
        for p in params:  # nothing of a delayed gradient stays behind in p.grad
            p.grad = None
        return loss

    # --- what it recorded ---------------------------------------------------------------------------------------------
    def metrics(self, final: bool = False) -> dict[str, float]:
        """``delay/*``: staleness of the gradients applied so far (see the module's docstring)."""
        out = {"delay/applied": float(self.applied)}
        if self.counts:
            values = np.array(sorted(self.counts), dtype=np.float64)
            weights = np.array([self.counts[int(v)] for v in values], dtype=np.float64)
            cumulative = np.cumsum(weights) / weights.sum()
            out["delay/mean"] = float((values * weights).sum() / weights.sum())
            out["delay/max"] = float(values[-1])
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):  # nearest rank
                out[f"delay/{name}"] = float(values[np.searchsorted(cumulative, q - 1e-12)])
        if final:
            out["delay/dropped"] = float(len(self.pending))
        return out

    # --- checkpoints and populations ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"spec": self.spec.label(), "applied": self.applied, "counts": dict(self.counts),
                "pending": [dict(vars(item)) for item in self.pending]}  # the tensors themselves: torch.save copies

    def load_state_dict(self, state: dict) -> None:
        if state["spec"] != self.spec.label():
            raise ConfigError(f"trainer.delay must be the checkpoint's ({state['spec']}) to resume it exactly, got "
                              f"{self.spec.label()}")
        self.applied, self.counts = int(state["applied"]), {int(k): int(v) for k, v in state["counts"].items()}
        self.pending = [Pending(**item) for item in state["pending"]]

    def keep_members(self, rows: list[int]) -> None:
        """A population cut to ``rows`` (dim 0 of every parameter): the gradients in flight follow."""
        for item in self.pending:
            item.grads = [None if g is None else g[torch.as_tensor(rows, device=g.device)] for g in item.grads]


def line(cfg: DictConfig) -> DelayLine | None:
    """The run's ``DelayLine``, or None without delay."""
    spec = parse(OmegaConf.select(cfg, "trainer.delay"), OmegaConf.select(cfg, "seed") or 0)
    return None if spec is None else DelayLine(spec)
