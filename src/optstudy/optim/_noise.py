"""Annealed Gaussian gradient noise (Neelakantan et al. 2015, "Adding gradient noise improves learning for very deep
networks"), an option of every core optimizer::

    g ← g + N(0, σ_t²),   σ_t² = η / (1 + t)^γ        (the paper: η ∈ {0.01, 0.3, 1.0}, γ = 0.55)

``optim.build(name, params, grad_noise={"eta": 0.3, "gamma": 0.55, "seed": 0})``. ``t`` counts from 0: it is the
number of steps the parameter took before this one, so the first step draws with variance ``σ_0² = η`` exactly (η is
the initial variance, which is how the paper's values read; counting from 1 would start at η/2^γ). The noise is added
to the gradient the optimizer receives (after gradient clipping, DDP's all-reduce and any delay, before ``maximize``'s
negation and coupled weight decay), then the optimizer steps as usual on the noised gradient: its effective learning
rate is unchanged by definition (the same formula, on moments that saw the noised gradients).

Seeding: at step ``t`` the parameters of a param group that have gradients (of one dtype and device, and at the same
step count: usually all of them) get their noise from one draw, ``z = torch.randn(n, generator=torch.Generator()
.manual_seed(key(seed, i, t)))`` with ``n`` their number of elements and ``i`` the first one's index among the
optimizer's parameters, split in parameter order and scaled by ``σ_t`` (``noises``). It is a pure function of (seed,
i, t), so copies, ``state_dict``s and resumed runs continue the same stream without keeping a generator's state (``t``
is the optimizer's own step count, which is saved), and DDP replicas add the same noise.
In a population (``members=K``) eta, gamma and seed may be K values: member k's noise is drawn with its own seed on
its own slice, so it is bit-equal to member k's standalone run's.

Off (``grad_noise=None``, or ``eta`` None or 0 for every member) the option leaves no trace: no key in the param
groups, the step exactly as without it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np
import torch

from optstudy.errors import ConfigError
from optstudy.optim._rules import fail

KEY = "grad_noise"  # the keyword, and the param-group key holding {"eta", "gamma", "seed"}
DEFAULTS = {"eta": None, "gamma": 0.55, "seed": 0}
_MASK = (1 << 64) - 1


def _number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not (isinstance(x, float) and math.isnan(x))


def _fail(owner: str, key: str, rule: str, value) -> ConfigError:
    """``optimizer adam: grad_noise.eta ...`` from the core; ``optimizer.grad_noise.eta ...`` from a config
    (``owner`` ending in a dot)."""
    if owner.endswith("."):
        return ConfigError(f"{owner}{key} {rule}, got {value!r}")
    return fail(owner, key, rule, value)


def _values(owner: str, key: str, value, members: int | None, ok: Callable, rule: str):
    """One value, or (in a population) K of them as a float64 array; each checked with ``ok``."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple, np.ndarray)):
        if not members or len(value) != members:
            count = f"one per member ({members})" if members else "one value (lists are for populations)"
            raise _fail(owner, f"{KEY}.{key}", f"must be {count}", list(np.asarray(value).tolist()))
        for v in value:
            if not ok(v):
                raise _fail(owner, f"{KEY}.{key}", rule, v)
        return np.asarray(value, dtype=np.float64).copy()
    if not ok(value):
        raise _fail(owner, f"{KEY}.{key}", rule, value)
    return value


def _eta_ok(x) -> bool:
    return x is None or (_number(x) and x >= 0)


def _gamma_ok(x) -> bool:
    return _number(x) and x >= 0


def _seed_ok(x) -> bool:
    return _number(x) and float(x) == int(x) and 0 <= int(x) < 2**32


def normalize(owner: str, value, members: int | None = None) -> dict | None:
    """``grad_noise`` as given (None; a dict of eta, gamma, seed; in a population also a list of K such dicts, as
    ``population.task.member_kwargs`` passes members that differ) -> ``{"eta", "gamma", "seed"}`` with a
    population's per-member values as float64 arrays, or None when it is off. Raises ``ConfigError`` naming the key."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and members and len(value) == members and all(
            isinstance(v, dict) or v is None for v in value):
        rows = [{**DEFAULTS, "eta": 0.0, **(v or {})} for v in value]  # a member without noise: eta 0
        value = {k: [r[k] if not (k == "eta" and r[k] is None) else 0.0 for r in rows] for k in DEFAULTS}
        value = {k: v[0] if all(_same(x, v[0]) for x in v) else v for k, v in value.items()}
    if not isinstance(value, dict):
        raise _fail(owner, KEY, "must be a mapping with eta, gamma, seed (or null)", value)
    unknown = sorted(set(value) - set(DEFAULTS))
    if unknown:
        raise _fail(owner, KEY, f"has no key {unknown[0]!r}; its keys: {', '.join(DEFAULTS)}", value)
    out = {**DEFAULTS, **value}
    out["eta"] = _values(owner, "eta", out["eta"], members, _eta_ok, "must be a number >= 0 or null (off)")
    out["gamma"] = _values(owner, "gamma", out["gamma"], members, _gamma_ok, "must be a number >= 0")
    out["seed"] = _values(owner, "seed", out["seed"], members, _seed_ok, "must be an integer in [0, 2**32 - 1]")
    eta = out["eta"]
    if eta is None or (np.asarray(eta) == 0).all():
        return None
    if not isinstance(out["seed"], np.ndarray):
        out["seed"] = int(out["seed"])
    return out


def from_config(node, seed: int) -> dict | None:
    """``optimizer.grad_noise`` of a config (``{eta, gamma, seed}``, seed null: the run's ``seed``) as the keyword
    ``optim.build`` takes, checked with the config's key names; None if the config has none. Kept when eta is null
    (then ``build`` drops it), so that a population's members that differ in eta all pass one."""
    if node is None:
        return None
    noise = dict(node) if isinstance(node, dict) else node
    if isinstance(noise, dict) and noise.get("seed") is None:
        noise["seed"] = seed
    normalize("optimizer.", noise)
    return noise


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b


def prepare(owner: str, values: dict, members: int | None = None) -> dict:
    """``values`` (an optimizer's keywords or a param group) with ``grad_noise`` normalized, or dropped if off."""
    if KEY not in values:
        return values
    out = dict(values)
    noise = normalize(owner, out.pop(KEY), members)
    if noise is not None:
        out[KEY] = noise
    return out


# --- drawing ------------------------------------------------------------------------------------------------------


def _splitmix(x: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit ints that spreads nearby inputs (seeds 0, 1, ...) apart."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def key(seed: int, index: int, t: int) -> int:
    """The generator seed of parameter ``index``'s noise at step ``t`` (from 0) of a run seeded ``seed``."""
    return _splitmix(_splitmix(_splitmix(int(seed)) ^ int(index)) ^ int(t))


def worker_seed(seed: int, rank: int) -> int:
    """The noise seed of process ``rank`` of a parallel run seeded ``seed``: each process draws its own noise, as each
    gradient of Neelakantan et al. has its own; rank 0 keeps ``seed``, so one process is the plain run."""
    return int(seed) if rank == 0 else (_splitmix(_splitmix(int(seed)) ^ int(rank)) & 0xFFFFFFFF)  # a seed's range


_generators: dict[torch.device, torch.Generator] = {}


def draw(seed: int, index: int, t: int, numel: int, like: torch.Tensor) -> torch.Tensor:
    """``numel`` standard normal numbers (1-D, ``like``'s real dtype and device) from a generator seeded with
    ``key(seed, index, t)``."""
    gen = _generators.get(like.device)
    if gen is None:
        gen = _generators[like.device] = torch.Generator(like.device)
    gen.manual_seed(key(seed, index, t))
    dtype = like.real.dtype if like.is_complex() else like.dtype
    return torch.randn(numel, generator=gen, dtype=dtype, device=like.device)


def sigma(eta: float, gamma: float, t: int) -> float:
    """``σ_t = sqrt(η / (1 + t)^γ)``, the noise's standard deviation at step ``t`` (from 0)."""
    return math.sqrt(eta / (1 + t) ** gamma)


def _real_numel(g: torch.Tensor) -> int:
    return g.numel() * (2 if g.is_complex() else 1)  # a complex element steps as two real ones


def noises(cfg: dict, index: int, t: int, grads: list[torch.Tensor], members: int | None = None) -> list[torch.Tensor]:
    """``σ_t · z`` shaped like each of ``grads`` (the gradients of one group's parameters at step ``t``, of one dtype
    and device, ``index`` the first one's index among the optimizer's parameters): one draw of all their numbers,
    split in order. A complex gradient's real and imaginary parts are each N(0, σ_t²). In a population, member k's
    rows ``[k]`` are drawn as its standalone run draws them (its own eta, gamma and seed; the gradients' member
    slices): K draws, stacked ``[K, total]``, then split."""
    shapes = [g.shape[1:] if members else g.shape for g in grads]
    sizes = [_real_numel(g) // (members or 1) for g in grads]
    total = sum(sizes)
    if not members:
        flat = draw(cfg["seed"], index, t, total, grads[0]) * sigma(cfg["eta"], cfg["gamma"], t)
    else:
        rows = []
        for k in range(members):
            eta, gamma, seed = (_member(cfg[name], k) for name in ("eta", "gamma", "seed"))
            rows.append(draw(seed, index, t, total, grads[0]) * sigma(eta, gamma, t) if eta
                        else torch.zeros(total, dtype=grads[0].real.dtype, device=grads[0].device))
        flat = torch.stack(rows)  # [K, total]
    out = []
    for g, shape, piece in zip(grads, shapes, flat.split(sizes, dim=-1)):
        lead = (members,) if members else ()
        if g.is_complex():
            out.append(torch.view_as_complex(piece.reshape((*lead, *shape, 2))))
        else:
            out.append(piece.reshape((*lead, *shape)))
    return out


def _member(value, k: int):
    return float(value[k]) if isinstance(value, np.ndarray) else value


def _count(state) -> int:
    """The steps a parameter took before this one: its state's count (a number, or a 0-d tensor after steps under
    torch.compile), 0 before its first."""
    return int(state["step"]) if state else 0


def adder(opt, group: dict) -> Callable | None:
    """For the step: ``(i, p, g, state) -> g + noise`` for the i-th parameter of ``group``, or None when ``group`` has
    no noise. The noise of every parameter with a gradient is drawn first, one draw per (step count, dtype, device)
    of the group (a draw per tensor cost ~0.2 ms: 0.65 s a step for 36 members of a 20-layer MLP)."""
    cfg = group.get(KEY)
    if cfg is None:
        return None
    offset = 0  # the parameter's index among all the optimizer's: groups before this one first
    for other in opt.param_groups:
        if other is group:
            break
        offset += len(other["params"])
    buckets: dict[tuple, list[int]] = {}
    params = group["params"]
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise ConfigError(f"optimizer {opt.name}: {KEY} with sparse gradients is not supported (the noise "
                              "is dense); use dense gradients or grad_noise=None")
        t = _count(opt.state.get(p))
        buckets.setdefault((t, p.grad.dtype, p.grad.device), []).append(i)
    drawn: dict[int, torch.Tensor] = {}
    for (t, _, _), index in buckets.items():
        drawn.update(zip(index, noises(cfg, offset + index[0], t, [params[i].grad for i in index], opt.members)))

    def add(i: int, p: torch.Tensor, g: torch.Tensor, state: dict) -> torch.Tensor:
        return g + drawn.pop(i)

    return add


def active(opt) -> bool:
    """Whether any param group of ``opt`` adds noise (a step traced by torch.compile then runs eagerly instead: a
    generator cannot be traced)."""
    return any(group.get(KEY) is not None for group in opt.param_groups)
