"""K members of one architecture as one module: every parameter and buffer gets a leading member dimension K.

``stack(members)`` takes K modules built alike (``optstudy.models.build`` under K seeds) and returns a ``Stacked``
module whose ``parameters()`` are one ``nn.Parameter`` of shape ``[K, *shape]`` per parameter of the base model, in
its ``named_parameters()`` order (names prefixed ``model.``); buffers are stacked the same way. Member k's slice
``[k]`` of each tensor is a copy of member k's tensor, so an optimizer built with ``members=K`` steps all members at
once, and ``member(k)`` gives member k back as a standalone module.

Two ways run the K forwards, both equal to each member's own forward (``tests/population/test_stack.py``):

- ``torch.func.vmap`` over ``functional_call`` (the reference, any vmappable model): each member sees its own
  ``[B, ...]`` slice, so BatchNorm normalises with per-member batch statistics and updates per-member running stats;
- hand-batched layers (``torch.baddbmm``) for models made only of ``Flatten``, ``Linear``, ``ReLU``, ``Dropout`` and
  ``Identity`` in ``Sequential`` (``mlp``, ``logreg``). For the digits MLP on the 2-core VM a forward+backward takes
  1/3 of vmap's time at K = 1 (vmap's fixed cost per call) and 3/4 at K = 64 (vmap runs a Linear's bias add apart
  from its matmul); ``benchmarks/stack_forward.py`` measures it. A grouped-conv prototype was only ~10% faster than
  vmap on the digits CNN, so convolutions stay on vmap.

Random ops (dropout, an objective's noise) draw independently per member (``vmap(randomness="different")``), but
not the numbers a standalone run would draw: with dropout or noise, a member's losses are not bit-equal to its
standalone run's, only equal in distribution.
"""

from __future__ import annotations

import copy
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from optstudy.errors import OptstudyError

__all__ = ["NotStackable", "Stacked", "stack"]


class NotStackable(OptstudyError):
    """The members cannot run as one stacked module; the message says why in one line."""


# --- building -----------------------------------------------------------------------------------------------------


def stack(members: list[nn.Module]) -> Stacked:
    """K modules of one architecture (same module types, parameter/buffer names, shapes and dtypes, same settings
    such as dropout rates) as one ``Stacked`` module; the members are copied, not shared.

    Objective models (``optstudy.models`` synthetic problems) give a ``StackedObjective``. Raises
    ``NotStackable(reason)`` for models vmap cannot batch (``nn.LSTM`` and the other RNNs; BatchNorm with
    ``momentum=None``) and for members that differ.
    """
    if not members:
        raise NotStackable("no members to stack")
    for k, member in enumerate(members[1:], start=1):
        _check_alike(members[0], member, k)
    _check_vmappable(members[0])
    cls = StackedObjective if _is_objective(members[0]) else Stacked
    return cls(members)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters then buffers by name, each shared tensor once."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _settings(module: nn.Module) -> dict[str, object]:
    """What configures a module besides its tensors: its public attributes (``Dropout.p``, ``Conv2d.stride``,
    ``Counterexample.C``, ``training``), by ``submodule.attribute`` name."""
    return {f"{name}.{key}".lstrip("."): value for name, m in module.named_modules()
            for key, value in vars(m).items() if not key.startswith("_")}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def _check_alike(base: nn.Module, other: nn.Module, k: int) -> None:
    """Member ``k`` has ``base``'s architecture: the same module types, tensors (name, shape, dtype, device,
    requires_grad) and settings. vmap runs every member with member 0's code and settings, so a difference would
    silently give member ``k`` member 0's model."""
    types = [(name, type(m)) for name, m in base.named_modules()]
    if types != [(name, type(m)) for name, m in other.named_modules()]:
        raise NotStackable(f"member {k} has other modules than member 0: {type(other).__name__} vs "
                           f"{type(base).__name__} or different submodules")

    def describe(t):
        return tuple(t.shape), t.dtype, t.device, t.requires_grad

    mine, theirs = _tensors(base), _tensors(other)
    if list(mine) != list(theirs):
        raise NotStackable(f"member {k} has other parameter/buffer names than member 0")
    for name, t in mine.items():
        if describe(t) != describe(theirs[name]):
            raise NotStackable(f"member {k}'s {name} is (shape, dtype, device, requires_grad) "
                               f"{describe(theirs[name])}, member 0's {describe(t)}")
    mine, theirs = _settings(base), _settings(other)
    for key in mine.keys() | theirs.keys():
        if not _same(mine.get(key), theirs.get(key)):
            raise NotStackable(f"member {k}'s {key} is {theirs.get(key)!r}, member 0's {mine.get(key)!r}")


def _check_vmappable(model: nn.Module) -> None:
    """Modules known to fail under vmap, named before the first forward instead of deep inside it."""
    for name, m in model.named_modules():
        where = f" (module {name!r})" if name else ""
        if isinstance(m, nn.RNNBase):
            raise NotStackable(f"nn.{type(m).__name__} has no vmap rule: torch.func has no batching rule for "
                               f"aten::{type(m).__name__.lower()}{where}")
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum is None:
            raise NotStackable(f"BatchNorm with momentum=None reads num_batches_tracked as a Python number, "
                               f"which vmap cannot{where}")


def _is_objective(model: nn.Module) -> bool:
    """An objective model (see ``optstudy.models``): its forward is the loss, and it has these three methods."""
    return all(callable(getattr(model, name, None)) for name in ("val_loss", "metrics", "project_"))


# --- hand-batched layers ------------------------------------------------------------------------------------------


def _linear(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # [K, B, in] @ [K, in, out] + [K, 1, out] -> [K, B, out]: one batched GEMM for all members
    if x.dim() != 3:  # [K, B, ..., in]: the GEMM over the flattened middle dims
        return _linear(m, x.flatten(1, -2)).unflatten(1, x.shape[1:-1])
    w = m.weight.transpose(1, 2)
    return torch.bmm(x, w) if m.bias is None else torch.baddbmm(m.bias.unsqueeze(1), x, w)


def _flatten(m: nn.Flatten, x: torch.Tensor) -> torch.Tensor:
    # the member dim shifts non-negative dims by one: [K, B, C, H, W] -> [K, B, C*H*W]
    start, end = (d + 1 if d >= 0 else d for d in (m.start_dim, m.end_dim))
    return x.flatten(start, end)


LAYERS = {
    nn.Linear: _linear,
    nn.Flatten: _flatten,
    nn.ReLU: lambda m, x: F.relu(x),
    nn.Dropout: lambda m, x: F.dropout(x, m.p, m.training),  # elementwise: a mask per member by construction
    nn.Identity: lambda m, x: x,
}


def _layers(model: nn.Module) -> list[nn.Module] | None:
    """The leaf layers in call order if ``model`` is only ``Sequential`` containers of ``LAYERS`` types (exact
    types: a subclass may override forward), else None."""
    if type(model) in LAYERS:
        return [model]
    if type(model) is not nn.Sequential:
        return None
    leaves = [_layers(child) for child in model]
    return None if any(leaf is None for leaf in leaves) else [layer for leaf in leaves for layer in leaf]


# --- the stacked module -------------------------------------------------------------------------------------------


class _Method(nn.Module):
    """``module.<name>(*args)`` as a forward, so that ``functional_call`` can run any method of ``module``."""

    def __init__(self, module: nn.Module, name: str):
        super().__init__()
        self.module, self.name = module, name

    def forward(self, *args):
        return getattr(self.module, self.name)(*args)


class Stacked(nn.Module):
    """K members of one architecture, run at once. ``members`` is K; ``model`` holds the base model's modules with
    every parameter and buffer stacked to ``[K, *shape]`` (do not call ``model`` itself; call this module).

    ``train()``/``eval()`` act as on each standalone member: BatchNorm uses per-member batch statistics and updates
    per-member running stats in train mode, and per-member running stats in eval mode. Dropout masks differ per
    member but are not those of a standalone run (see the module docstring).
    """

    def __init__(self, members: list[nn.Module]):
        """Use ``stack(members)``, which checks that the members are alike."""
        super().__init__()
        self.members = len(members)
        tensors = [_tensors(m) for m in members]
        memo = {}  # deepcopy's memo: each of member 0's tensors -> all members' stacked, copied once
        for name, t in tensors[0].items():
            stacked = torch.stack([ts[name].detach() for ts in tensors])  # [K, *shape], contiguous
            memo[id(t)] = nn.Parameter(stacked, t.requires_grad) if isinstance(t, nn.Parameter) else stacked
        # a copy of member 0 with the stacked tensors in place: the base's names, order, ties and settings
        self.model = copy.deepcopy(members[0], memo)
        self._leaves = _layers(self.model)  # hand-batched layers where they apply, else vmap

    def extra_repr(self) -> str:
        return f"members={self.members}, path={'batched layers' if self._leaves else 'vmap'}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[K, B, ...]``, member k's own batch in ``x[k]`` -> ``[K, B, ...]`` outputs (logits)."""
        return self._layers_forward(x) if self._leaves else self._vmap_forward(x)

    def _layers_forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._leaves:
            x = LAYERS[type(layer)](layer, x)
        return x

    def _vmap_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._vmap("forward", x)

    def _vmap(self, method: str, *args):
        """``model.<method>(*args)`` of every member under vmap: args and outputs get the member dim 0."""
        call = _Method(self.model, method)

        def one(state, *one_args):  # state: member k's tensors, unstacked
            return functional_call(call, state, one_args)

        return vmap(one, randomness="different")(self._state(), *args)

    def _state(self, k: int | None = None) -> dict[str, torch.Tensor]:
        """The stacked tensors by their names in ``_Method(self.model, ...)``; with ``k``, member k's views."""
        return {f"module.{name}": t if k is None else t[k] for name, t in _tensors(self.model).items()}

    def can_keep_members(self) -> bool:
        """Whether ``keep_members`` can swap every parameter (``torch.utils.swap_tensors`` refuses a tensor with a
        weak reference, e.g. one a compiler holds, or other owners of its storage handle): checked first, so that a
        cut is all or nothing."""
        return all(not weakref.getweakrefs(p) and p._use_count() <= 2 for p in self.model.parameters())

    @torch.no_grad()
    def keep_members(self, keep: list[int]) -> None:
        """Only members ``keep`` (increasing) from now on: every stacked parameter and buffer cut to their rows, in
        place (the same objects, so an optimizer's references stay valid; then call its ``keep_members``)."""
        seen = set()
        for t in _tensors(self.model).values():
            if id(t) in seen:  # a tied tensor once
                continue
            seen.add(id(t))
            if isinstance(t, nn.Parameter):
                # ``p.data = ...`` would keep autograd's record of the old shape (its gradient accumulator): a swap
                # gives the same object a new tensor
                t.grad = None
                torch.utils.swap_tensors(t, nn.Parameter(t.detach()[keep], t.requires_grad))
            else:
                t.data = t.data[keep]
        self.members = len(keep)

    def member(self, k: int) -> nn.Module:
        """A standalone copy of the base architecture holding member ``k``'s current parameters and buffers
        (copies: changing one does not change the other), in this module's train/eval mode."""
        if not 0 <= k < self.members:
            raise IndexError(f"member index {k} out of range for {self.members} members")
        memo = {}
        for t in _tensors(self.model).values():
            one = t[k].detach().clone()
            memo[id(t)] = nn.Parameter(one, t.requires_grad) if isinstance(t, nn.Parameter) else one
        return copy.deepcopy(self.model, memo)


class StackedObjective(Stacked):
    """K objective models (``optstudy.models`` synthetic problems) at once: ``forward`` gives the ``[K]`` losses,
    ``val_loss()`` the ``[K]`` noise-free objectives, ``metrics()`` one dict per member, ``project_()`` projects
    every member. Each member's step counter ``t`` is its own ``[K]`` entry. Noisy objectives (``noisy_quadratic``,
    stochastic ``counterexample``) draw independent noise per member, not a standalone run's numbers.
    """

    def forward(self, batch=None) -> torch.Tensor:
        """``batch``: ``[K, ...]`` each member's batch (the objectives ignore it), or None -> ``[K]`` losses."""
        return self._vmap("forward") if batch is None else self._vmap("forward", batch)

    @torch.no_grad()
    def val_loss(self) -> torch.Tensor:
        return self._vmap("val_loss")  # [K]

    def metrics(self) -> list[dict[str, float]]:
        # metrics() turns tensors into floats (.item()), which vmap cannot: one call per member, on views
        return [functional_call(_Method(self.model, "metrics"), self._state(k), ()) for k in range(self.members)]

    @torch.no_grad()
    def project_(self) -> None:
        def project(state):
            functional_call(_Method(self.model, "project_"), state, ())  # in place, into the stacked tensors
            return torch.zeros(())  # vmap needs a tensor out

        with warnings.catch_warnings():
            # clamp_ has no batching rule; vmap's per-member fallback is right, and cheap for the few numbers here
            warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
            vmap(project)(self._state())
