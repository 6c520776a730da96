"""Populations: K configurations stacked on dim 0 of every parameter, each member with its own hyperparameters.

``build(name, params, members=K, lr=[...], betas=[(b1, b2), ...], bound={"name": ..., "rate": [...]})``: every float
hyperparameter may be one number (the same for every member) or K of them. A group keeps per-member values as NumPy
float64 arrays of length K, wherever they sit (``lr``, each of ``betas``, a bound schedule's parameters): arrays so
that torch's LR schedulers, which compute ``base_lr * factor``, scale every member's lr; not tensors, which torch's
schedulers fill in place with a single number. Flags (``nesterov``, ``centered``, ...) are shared by the population.

The step computes member k's scalars with the optimizer's own ``scalars`` on a *view* of the group holding member
k's numbers (the same Python floats as member k's standalone run), then stacks the values that differ into tensors
shaped ``(K, 1, ..., 1)`` of the parameters' compute dtype (``compute_dtype``: float32 for float32 parameters, each
number rounded once, as each op of the standalone run rounds its Python float); the kernels, unchanged, broadcast them
over the member dimension.
"""

from __future__ import annotations

import functools
import numbers

import numpy as np
import torch

from optstudy.errors import ConfigError
from optstudy.optim._rules import fail

# keywords that may differ between members (each is a float)
PER_MEMBER = frozenset({"lr", "eps", "weight_decay", "momentum", "dampening", "alpha", "rho", "lr_decay",
                        "initial_accumulator_value", "momentum_decay", "final_lr", "gamma"})
# a step value that is None (switched off) for some members and a number for others: the number that does nothing
NEUTRAL = {"wd": 0.0, "decay": 1.0}


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _floats(owner: str, key: str, value, k: int):
    """One number, or K of them as a float64 array."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or (value.numel() == 1 and k != 1):
            return value
        value = value.detach().cpu().tolist()
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != k or not all(_is_number(x) for x in value):
            raise fail(owner, key, f"must be one number or a list of {k} numbers (one per member)", _shown(value))
        return np.asarray(value, dtype=np.float64).copy()
    return value


def _betas(owner: str, value, k: int):
    """A pair shared by all, or K pairs as a pair of arrays (beta1s, beta2s)."""
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, np.ndarray) for v in value):
        return value  # already per member (a rebuilt optimizer's defaults)
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value):
        return value
    try:
        pairs = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        pairs = None
    if pairs is None or pairs.shape != (k, 2):
        raise fail(owner, "betas", f"must be a pair (beta1, beta2) or a list of {k} pairs (one per member)",
                   _shown(value))
    return (pairs[:, 0].copy(), pairs[:, 1].copy())


def _shown(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


def normalize(owner: str, values: dict, k: int) -> dict:
    """``values`` with per-member lists, tuples and tensors as arrays; a list for a flag is refused."""
    _allow_arrays_in_checkpoints()
    out = dict(values)
    for key, value in values.items():
        if key in PER_MEMBER:
            out[key] = _floats(owner, key, value, k)
        elif key == "betas":
            out[key] = _betas(owner, value, k)
        elif key == "bound" and isinstance(value, dict):
            out[key] = {name: v if name == "name" else _floats(owner, f"bound.{name}", v, k)
                        for name, v in value.items()}
        elif key != "params" and isinstance(value, (list, np.ndarray)):
            raise fail(owner, key, "is shared by the population (one value for every member)", _shown(value))
    return out


@functools.cache
def _allow_arrays_in_checkpoints() -> None:
    """LR schedulers keep a population's lrs (``base_lrs``, ``_last_lr``) as the arrays the group holds, and
    ``torch.load`` (Lightning's resume included) refuses arrays by default: allow float arrays, which are plain
    data (NumPy's array reconstruction and the float64 dtype, nothing that runs code)."""
    reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct  # NumPy 2 renamed it
    torch.serialization.add_safe_globals([reconstruct, np.ndarray, np.dtype, type(np.dtype(np.float64))])


def varies(values: dict) -> bool:
    """Whether any value of a group (or a step's scalars) differs between members."""
    return any(_has_array(v) for key, v in values.items() if key != "params")


def _has_array(value) -> bool:
    if isinstance(value, np.ndarray):
        return True
    if isinstance(value, tuple):
        return any(_has_array(v) for v in value)
    if isinstance(value, dict):
        return any(_has_array(v) for v in value.values())
    return False


def _pick(value, i: int):
    if isinstance(value, np.ndarray):
        return float(value[i])
    if isinstance(value, torch.Tensor) and value.dim() == 1:  # per-member counts under torch.compile
        return value[i]
    if isinstance(value, tuple):
        return tuple(_pick(v, i) for v in value)
    if isinstance(value, dict):
        return {k: _pick(v, i) for k, v in value.items()}
    return value


def views(group: dict, k: int) -> list[dict]:
    """Member i's group: its own numbers where the population has K of them (``params`` left out)."""
    return [{key: _pick(v, i) for key, v in group.items() if key != "params"} for i in range(k)]


def signature(group: dict) -> tuple:
    """What ``views`` depends on: each value's identity, and an array's contents (it may be changed in place)."""
    return tuple((key, id(v), v.tobytes() if isinstance(v, np.ndarray) else _signature(v))
                 for key, v in group.items() if key != "params")


def _signature(value):
    if isinstance(value, tuple):
        return tuple(v.tobytes() if isinstance(v, np.ndarray) else v for v in value)
    if isinstance(value, dict):
        return tuple((k, v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in value.items())
    return None


def state_view(state: dict, keys: tuple[str, ...], i: int) -> dict:
    """Member i's counts (NAdam's ``mu_product`` differs between members with different betas)."""
    if not any(isinstance(state.get(key), (np.ndarray, torch.Tensor)) and np.ndim(state[key]) == 1 for key in keys):
        return state
    return {**state, **{key: _pick(state[key], i) for key in keys}}


def merge(values: list, key: str = "", owner: str = ""):
    """Inverse of ``views`` for one key: one value if all members agree, else K numbers as an array."""
    first = values[0]
    if all(_same(v, first) for v in values[1:]):
        return first
    if isinstance(first, tuple) and all(isinstance(v, tuple) and len(v) == len(first) for v in values):
        return tuple(merge(list(col), key, owner) for col in zip(*values))
    if isinstance(first, dict) and all(isinstance(v, dict) and v.keys() == first.keys() for v in values):
        return {name: merge([v[name] for v in values], f"{key}.{name}", owner) for name in first}
    if key in NEUTRAL:
        values = [NEUTRAL[key] if v is None else v for v in values]
    if all(_is_number(v) for v in values):
        return np.asarray(values, dtype=np.float64)
    if any(isinstance(v, torch.Tensor) for v in values):  # under torch.compile: the step count is a tensor
        return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])
    raise ConfigError(f"{owner}: {key} must be the same for every member of a population, got "
                      f"{[_shown(v) for v in values]}")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def merge_all(rows: list[dict], owner: str) -> dict:
    """Per-member dicts with the same keys -> one dict of merged values."""
    return {key: merge([row[key] for row in rows], key, owner) for key in rows[0]}


def shaped(s: dict, like: torch.Tensor, cache: dict | None = None) -> dict:
    """The step's scalars for a tensor of the population: per-member values as tensors ``(K, 1, ..., 1)`` of
    ``like``'s compute dtype on its device, which broadcast over its member dimension; shared values as they are."""
    key = (like.dim(), like.device, like.dtype)
    if cache is not None and key in cache:
        return cache[key]
    shape = (-1,) + (1,) * (like.dim() - 1)
    dtype = compute_dtype(like)
    out = {}
    for name, v in s.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v).to(like.device, dtype)
        if isinstance(v, torch.Tensor) and v.dim() == 1:
            v = v.to(like.device, dtype).view(shape)
        out[name] = v
    if cache is not None:
        cache[key] = out
    return out


def compute_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype in which an op on ``like`` computes with a Python float, which it rounds to that dtype: float64 for
    float64 (and a complex128's real view), float32 otherwise (float16 and bfloat16 compute in float32; MPS has no
    float64). Per-member values in this dtype round as member k's standalone run rounds its numbers. In float64 they
    made every op of a float32 population compute in float64 and cast back, a third of a K = 144 MNIST-1D Adam step."""
    return torch.float64 if like.dtype == torch.float64 and like.device.type != "mps" else torch.float32


def selected(value, keep: np.ndarray, old: int | None = None):
    """``value`` (a group's, a scheduler's, a step's scalars) for members ``keep`` only: arrays indexed, tuples and
    dicts within; with ``old`` (the population's size before), tensors of ``old`` rows too."""
    if isinstance(value, np.ndarray):
        return value[keep].copy() if value.ndim else value
    if isinstance(value, torch.Tensor) and old is not None and value.dim() and value.shape[0] == old:
        return value.index_select(0, torch.as_tensor(keep, device=value.device))
    if isinstance(value, tuple):
        return tuple(selected(v, keep, old) for v in value)
    if isinstance(value, dict):
        return {k: selected(v, keep, old) for k, v in value.items()}
    return value


def hashable(key: tuple) -> tuple:
    return tuple(tuple(v.tolist()) if isinstance(v, np.ndarray) else v for v in key)


def saveable(value):
    """A state dict's value with arrays as float64 tensors (``torch.load(weights_only=True)`` refuses arrays)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, tuple):
        return tuple(saveable(v) for v in value)
    if isinstance(value, dict):
        return {k: saveable(v) for k, v in value.items()} if varies(value) else value
    return value


def loaded(value, k: int):
    """Inverse of ``saveable``: 1-D tensors of K values as arrays."""
    if isinstance(value, torch.Tensor) and value.dim() == 1 and len(value) == k and value.is_floating_point():
        return value.double().numpy().copy()
    if isinstance(value, tuple):
        return tuple(loaded(v, k) for v in value)
    if isinstance(value, dict):
        return {name: loaded(v, k) for name, v in value.items()}
    return value
