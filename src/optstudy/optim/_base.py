"""The machinery every optimizer of the core shares.

An optimizer is described by three small pieces (see ``_sgd.py``, ``_adam.py``, ...):

- ``buffers(group)``: the names of its state tensors, created lazily as zeros like the parameter;
- ``scalars(group, state)``: this step's numbers (step sizes, bias corrections, bounds) and flags, computed once for
  all the tensors of a group that are at the same step;
- ``kernel(p, g, *buffers, **scalars)``: the update of one tensor, written as plain tensor math, in place.

The same kernel runs eagerly per tensor (``impl="loop"``, the readable reference) or compiled with ``torch.compile``
into one fused pass over several tensors per call (``impl="compiled"``, see ``_compiled.py``): on a 2-core CPU the
eager kernel makes ~8 passes over memory where torch's fused Adam makes one. Compiling costs 5–13 s the first time on
a machine (0.2–3 s in later processes, from inductor's cache), so ``impl="auto"`` (the default) compiles when the
optimizer holds at least ``AUTO_COMPILE_NUMEL`` elements, where a step saves tens of milliseconds, and runs the loop
below that; ``OPTSTUDY_OPTIM_IMPL`` overrides it process-wide.

The effective learning rate of the last step is recomputed on demand from the state (no cost per step).

Everything else behaves as in torch.optim, so code written for it runs unchanged: copies (``copy.deepcopy``, pickle,
``torch.save``) step like the original; ``state_dict``s of torch.optim load both ways, and so do ours from before a
key existed (missing keys take their defaults); complex parameters step as their ``torch.view_as_real``;
``maximize``; ``lr`` as a tensor; sparse gradients where torch takes them (SGD, Adagrad); and a function calling
``step()`` under ``torch.compile`` compiles once (the step count then lives in a tensor, as torch keeps it).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Iterator

import numpy as np
import torch

from optstudy.errors import ConfigError
from optstudy.optim import _compiled, _members, _noise
from optstudy.optim._rules import check_group, fail

log = logging.getLogger(__name__)

IMPLS = ("auto", "loop", "compiled")
# keys a param group may hold besides hyperparameters: torch's and its LR schedulers'
GROUP_KEYS = frozenset({"params", "param_names", "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"})
AUTO_COMPILE_NUMEL = 1 << 20


class CoreOptimizer(torch.optim.Optimizer):
    """Base class: validation, lazy state, the per-tensor step loop and effective learning rates.

    Every optimizer also takes ``grad_noise={"eta": η, "gamma": γ, "seed": s}`` (off by default): annealed Gaussian
    gradient noise (Neelakantan et al. 2015), ``g ← g + N(0, σ_t²)`` with ``σ_t² = η/(1+t)^γ``, ``t`` the parameter's
    step count from 0 (the first step's variance is η). The optimizer then steps on the noised gradient exactly as it
    would on any other: its effective learning rate is unchanged by definition. The noise is a pure function of
    (seed, parameter index, t), so a resumed run continues the same stream; in a population each member draws its own
    (eta, gamma and seed may be K values). See ``_noise.py``.
    """

    name = "core"
    DEFAULTS: dict[str, Any] = {}  # the keywords this optimizer accepts, with the reference defaults
    FIXED: dict[str, Any] = {}  # flags the name fixes (amsgrad for "amsgrad", ...): in every group, not keywords
    # torch.optim's implementation switches this algorithm's torch class accepts (see _rules.IMPL_FLAGS), with
    # torch's defaults; the AdaBound family takes Adam's
    TORCH_FLAGS: dict[str, Any] = dict(foreach=None, differentiable=False)
    SPARSE = False  # takes sparse gradients, as its torch class does
    GROUP_KEYS = GROUP_KEYS

    def __init__(self, params, impl: str | None = None, members: int | None = None, **hparams):
        self._check_keywords(hparams, "")
        self.members = _check_members(self.name, members)
        hparams = _noise.prepare(f"optimizer {self.name}", hparams, self.members)
        if self.members:
            hparams = _members.normalize(f"optimizer {self.name}", hparams, self.members)
        impl = impl or os.environ.get("OPTSTUDY_OPTIM_IMPL", "auto")
        if impl not in IMPLS:
            raise ConfigError(f"optimizer {self.name}: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        self._last: list[tuple[dict, list[tuple[torch.Tensor, dict]]]] = []
        self._aliases: dict[tuple, tuple] = {}  # compiled path: last step's flat aliases of params and state
        self._number_counts = False  # the state may hold counts as numbers (see _traced_step)
        super().__init__(params, {**self.DEFAULTS, **self.TORCH_FLAGS, **hparams, **self.FIXED})
        self.impl = self._resolve_impl(impl)

    @classmethod
    def check(cls, members: int | None = None, **hparams) -> None:
        """Raises the ``ConfigError`` the constructor would for these keywords, without parameters (and without
        torch.optim's constructor, which imports dynamo: ~1 s of a config check)."""
        self = cls.__new__(cls)
        self._check_keywords(hparams, "")
        self.members = _check_members(cls.name, members)
        hparams = _noise.prepare(f"optimizer {cls.name}", hparams, self.members)
        if self.members:
            hparams = _members.normalize(f"optimizer {cls.name}", hparams, self.members)
        self._check_group({**cls.DEFAULTS, **cls.TORCH_FLAGS, **hparams, **cls.FIXED})

    def _check_keywords(self, given: dict, where: str) -> None:
        """Unknown keywords are refused; a flag the name fixes is accepted at its fixed value only, so that
        ``type(opt)(params, **opt.defaults)`` rebuilds the same optimizer, as it does for torch.optim classes."""
        valid = set(self.DEFAULTS) | set(self.TORCH_FLAGS) | {_noise.KEY}
        unknown = set(given) - valid - set(self.FIXED)
        if unknown:
            raise ConfigError(
                f"optimizer {self.name}: unknown keyword {sorted(unknown)[0]!r}{where}; "
                f"valid keywords: {', '.join(sorted(valid))}"
            )
        for key in set(given) & set(self.FIXED):
            if given[key] != self.FIXED[key]:
                others = [c.name for c in _family(type(self)) if c.FIXED.get(key, given[key]) == given[key]]
                raise fail(f"optimizer {self.name}", key, f"is fixed to {self.FIXED[key]!r} by the name "
                           f"{self.name!r}{where}; use {' or '.join(map(repr, others))}", given[key])

    # -- groups -------------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        extra = {k: v for k, v in param_group.items() if k not in self.GROUP_KEYS}
        self._check_keywords(extra, " in a param group")
        param_group = _noise.prepare(f"optimizer {self.name}", param_group, self.members)
        if self.members:
            param_group = _members.normalize(f"optimizer {self.name}", param_group, self.members)
        super().add_param_group(param_group)  # fills defaults
        group = self.param_groups[-1]
        if self.members:
            self._check_member_axis(group)
        self._check_group(group)

    def keep_members(self, keep, schedulers=()) -> None:
        """Only the population's members ``keep`` (increasing indices) from now on, once the parameters were cut
        to them in place (dim 0 of each; ``torch.utils.swap_tensors(p, nn.Parameter(p.detach()[keep]))`` keeps
        autograd's record of the shape right, which ``p.data = ...`` does not): the state, each per-member hyperparameter and the
        ``schedulers``' per-member lrs follow, so that members a study stopped cost nothing more. The kept members
        go on exactly as before (their rows of every tensor and number are unchanged)."""
        keep = np.asarray(keep, dtype=np.int64)
        old = self.members
        if not old or len(keep) == 0 or not (np.diff(keep) > 0).all() or keep[0] < 0 or keep[-1] >= old:
            raise ConfigError(f"optimizer {self.name}: keep_members needs increasing member indices in "
                              f"[0, {old}) of a population, got {keep.tolist()}")
        index = None
        for group in self.param_groups:
            for p in group["params"]:
                if p.shape[:1] != (len(keep),):
                    raise ConfigError(f"optimizer {self.name}: cut the parameters to the kept members first "
                                      f"(dim 0 {len(keep)}), got shape {tuple(p.shape)}")
                index = torch.as_tensor(keep, device=p.device)
                state = self.state.get(p, {})
                for key, value in state.items():  # buffers like p, and per-member counts (NAdam's mu_product)
                    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == old:
                        state[key] = value.index_select(0, index.to(value.device))
                    elif isinstance(value, np.ndarray) and value.ndim and value.shape[0] == old:
                        state[key] = value[keep].copy()
                p.grad = None
            group.update({key: _members.selected(v, keep) for key, v in group.items() if key != "params"})
        self.defaults.update({key: _members.selected(v, keep) for key, v in self.defaults.items()})
        for sched in schedulers:
            for name in ("base_lrs", "_last_lr"):
                if isinstance(getattr(sched, name, None), list):
                    setattr(sched, name, [_members.selected(v, keep) for v in getattr(sched, name)])
        cut = {}  # the last step's scalars (lr_histogram and effective_lrs read them): each dict once
        self._last = [(group, [(p, cut.setdefault(id(s), {k: _members.selected(v, keep, old) for k, v in s.items()}))
                               for p, s in pairs]) for group, pairs in self._last]
        self.members = len(keep)
        self._aliases.clear()  # the compiled path's flat aliases were of the old tensors
        self.__dict__.pop("_view_cache", None)

    def _check_group(self, group: dict) -> None:
        """Validates ``group`` and runs ``prepare_group``: on each member's view where members differ (the message
        names the member), the results merged back."""
        owner = f"optimizer {self.name}"
        if not (self.members and _members.varies(group)):
            check_group(owner, group)
            self.prepare_group(group)
            return
        views = _members.views(group, self.members)
        for i, view in enumerate(views):
            check_group(f"{owner} (member {i} of {self.members})", view)
            self.prepare_group(view)
        group.update(_members.merge_all(views, owner))

    def _check_member_axis(self, group: dict) -> None:
        for i, p in enumerate(group["params"]):
            if p.dim() == 0 or p.shape[0] != self.members:
                raise ConfigError(f"optimizer {self.name}: with members={self.members}, dim 0 of every parameter is "
                                  f"the member axis; parameter {i} of group {len(self.param_groups) - 1} has shape "
                                  f"{tuple(p.shape)}")

    def prepare_group(self, group: dict) -> None:
        """Hook for subclass checks that involve several keys; runs on every group, including ones added later."""
        if group["decoupled_weight_decay"] and group["weight_decay"] == 0:
            log.debug("decoupled_weight_decay=True with weight_decay=0 has no effect")

    def _resolve_impl(self, impl: str) -> str:
        if impl != "auto":
            return impl
        numel = sum(p.numel() for g in self.param_groups for p in g["params"])
        # a population decides as each member's standalone run would: compiling costs seconds once per process,
        # which 64 members of a small model, each saving ~0.05 ms a step, do not win back (digits CNN, K = 64: 2x
        # slower than one member after another)
        return "compiled" if numel // (self.members or 1) >= AUTO_COMPILE_NUMEL else "loop"

    # -- the pieces a subclass defines --------------------------------------------------------------------------
    def buffers(self, group: dict) -> tuple[str, ...]:
        raise NotImplementedError

    def init_state(self, p: torch.Tensor, state: dict, group: dict) -> None:
        state["step"] = 0
        for name in self.buffers(group):
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def scalars(self, group: dict, state: dict) -> dict[str, Any]:
        """This step's numbers (floats, passed to the compiled kernel as one tensor) and flags (bools, constants of
        the compiled code). Must depend on ``state`` only through ``state_key``. Written for numbers and 0-d
        tensors alike (``lr`` may be a tensor; under ``torch.compile`` the step count is one)."""
        raise NotImplementedError

    def state_key(self, state: dict) -> tuple:
        """What ``scalars`` reads from a tensor's state: tensors with equal keys share one ``scalars`` call."""
        return (state["step"],)

    kernel: Callable = staticmethod(lambda *a, **k: None)

    def sparse_step(self, p: torch.Tensor, g: torch.Tensor, state: dict, group: dict, s: dict) -> None:
        """The update for a sparse gradient ``g``, for optimizers with ``SPARSE``."""
        raise NotImplementedError

    def after_kernel(self, state: dict, group: dict, s: dict) -> None:
        """Hook for state bookkeeping after the tensors are updated (e.g. swapping double buffers)."""

    def effective_lr(self, p: torch.Tensor, state: dict, group: dict, s: dict) -> torch.Tensor:
        """Per-element factor ``lr_eff`` of the last step: ``θ_new - θ_old = -lr_eff ⊙ direction``."""
        raise NotImplementedError

    # -- the step -----------------------------------------------------------------------------------------------
    def _weight_decay(self, group: dict) -> dict[str, Any]:
        # coupled: g += λθ inside the kernel; decoupled (AdamW): θ *= 1 - ηλ before the update; None: off (a constant
        # of the compiled kernel, so that the common case costs no pass)
        wd = float(group["weight_decay"])
        if wd == 0:
            return {"wd": None, "decay": None}
        if group["decoupled_weight_decay"]:
            return {"wd": None, "decay": 1.0 - group["lr"] * wd}
        return {"wd": wd, "decay": None}

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            if _noise.active(self):  # grad noise draws from generators, which dynamo cannot trace: step eagerly
                _outside_the_graph(CoreOptimizer.step)(self)
            else:
                self._traced_step()
            return loss
        self._last = []
        seen, self._aliases = self._aliases, {}
        for group in self.param_groups:
            self._last.append((group, self._step_group(group, seen)))
        self._number_counts = True
        return loss

    def _gradients(self, group: dict) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        """``(param, gradient, state)`` for each parameter of ``group`` that has a gradient, its state created and
        its step counted; the gradient negated for ``maximize``, as torch does before weight decay."""
        maximize, states = group["maximize"], self.state
        noisy = _noise.adder(self, group)  # None unless grad_noise is on (_noise.py): g + N(0, σ_t²)
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            state = states[p]
            if not state:
                self._init_state(p, state, group)
            state["step"] += 1
            if noisy is not None:
                g = noisy(i, p, g, state)
            yield p, (-g if maximize else g), state

    def _step_group(self, group: dict, seen: dict) -> list[tuple[torch.Tensor, dict]]:
        scalars = self._scalars_of(group)
        names = self._buffer_names(group)
        stepped, parts = [], {}
        for p, g, state in self._gradients(group):
            if isinstance(state["step"], torch.Tensor):  # after steps under torch.compile: numbers again
                self._numbers(state)
            key = _members.hashable(self.state_key(state))
            if key not in parts:
                parts[key] = (scalars(state), [])
            s, rows = parts[key]
            stepped.append((p, s))
            if g.is_sparse:
                self._sparse(p, g, state, group, s)
                continue
            rows.append(self._row(p, g, state, names))
        for s, rows in parts.values():
            self._run(rows, s, seen)
        if type(self).after_kernel is not CoreOptimizer.after_kernel:
            for p, s in stepped:
                self.after_kernel(self.state[p], group, s)
        return stepped

    def _views(self, group: dict) -> list[dict]:
        """``_members.views`` of ``group``, made again only when one of its values changed (K dicts a step cost
        ~0.4 ms at K = 64)."""
        return self._population_cache(group)[0]

    def _population_cache(self, group: dict) -> tuple[list[dict], dict]:
        """(views, merged weight-decay scalars) of ``group``, kept until one of its values changes."""
        key = _members.signature(group)
        cache = self.__dict__.setdefault("_view_cache", {})
        if cache.get(id(group), (None,))[0] != key:
            views = _members.views(group, self.members)
            decay = _members.merge_all([self._weight_decay(view) for view in views], f"optimizer {self.name}")
            cache[id(group)] = (key, views, decay)
        return cache[id(group)][1:]

    def _buffer_names(self, group: dict) -> tuple[str, ...]:
        """``buffers(group)``; in a population whose members differ, the most any member needs (a member with
        momentum 0 beside others with momentum keeps a buffer, which then steps exactly as without one)."""
        if not (self.members and _members.varies(group)):
            return self.buffers(group)
        return max((self.buffers(view) for view in self._views(group)), key=len)

    def _init_state(self, p: torch.Tensor, state: dict, group: dict) -> None:
        """``init_state``; in a population whose members differ, each member's slice initialised with its own
        values (Adagrad's ``initial_accumulator_value``)."""
        if not (self.members and _members.varies(group)):
            self.init_state(p, state, group)
            return
        views = _members.views(group, self.members)
        self.init_state(p, state, max(views, key=lambda view: len(self.buffers(view))))
        for i, view in enumerate(views):
            own: dict = {}
            self.init_state(p[i], own, view)
            for key, value in own.items():
                if isinstance(value, torch.Tensor):
                    state[key][i].copy_(value)

    def _scalars_of(self, group: dict) -> Callable[[dict], dict]:
        """``state -> the step's scalars`` for ``group``. In a population whose members differ, ``scalars`` runs once
        on the group's per-member arrays (NumPy's float64 arithmetic rounds as Python's floats do: each member's
        numbers are its standalone run's), then per member on views where the bound schedule differs."""
        if not (self.members and _members.varies(group)):
            decay = self._weight_decay(group)
            return lambda state: _as_numbers({**self.scalars(group, state), **decay})
        views, decay = self._population_cache(group)
        if not self.vectorized(group):
            owner, counts = f"optimizer {self.name}", self.TENSOR_COUNTS
            return lambda state: {**_members.merge_all(
                [_as_numbers(self.scalars(view, _members.state_view(state, counts, i))) for i, view in enumerate(views)],
                owner), **decay}
        return lambda state: {**_as_numbers(self.scalars(group, state)), **decay}

    def vectorized(self, group: dict) -> bool:
        """Whether ``scalars`` takes this group's per-member arrays in one call (a bound schedule's parameters per
        member do not: the schedules take numbers)."""
        return True

    @staticmethod
    def _row(p: torch.Tensor, g: torch.Tensor, state: dict, names: tuple[str, ...]) -> list[torch.Tensor]:
        """``[p, g, *buffers]`` for the kernel; complex tensors as their real views (real and imaginary parts are two
        elements, as torch steps them)."""
        try:
            row = [p, g, *[state[b] for b in names]]
        except KeyError:  # a buffer switched on mid-run: OneCycleLR cycles SGD's momentum up from 0, as torch allows
            for b in names:
                state.setdefault(b, torch.zeros_like(p, memory_format=torch.preserve_format))
            row = [p, g, *(state[b] for b in names)]
        if p.is_complex():
            return [torch.view_as_real(t) for t in row]
        if p.dim() == 0 and torch.compiler.is_compiling():  # torch 2.13 there loses in-place updates of 0-d inputs
            return [t.view(1) for t in row]
        return row

    def _sparse(self, p, g, state, group, s) -> None:
        owner = f"optimizer {self.name}"
        if self.members:
            raise ConfigError(f"{owner}: sparse gradients are not supported in a population (members=...)")
        if not self.SPARSE:
            raise ConfigError(f"{owner}: sparse gradients are not supported (torch takes them in SGD, Adagrad and "
                              "SparseAdam; optstudy in sgd, momentum, nesterov and adagrad)")
        if s["wd"] is not None:
            raise fail(owner, "weight_decay", "must be 0 with sparse gradients (as in torch), or use "
                       "decoupled_weight_decay=True", group["weight_decay"])
        if p.is_complex():
            raise ConfigError(f"{owner}: complex parameters with sparse gradients are not supported")
        self.sparse_step(p, g, state, group, s)

    def _run(self, rows: list[list[torch.Tensor]], s: dict, seen: dict) -> None:
        """Applies the kernel to each row ``[p, g, *buffers]``: compiled in chunks where it can, else eagerly."""
        eager = rows
        if self.impl == "compiled":
            eager, chunks = [], {}
            for row in rows:
                flat = _compiled.flat_row(row, seen, self._aliases, self.members)
                if flat is None:
                    eager.append(row)
                else:
                    chunks.setdefault((row[0].dtype, row[0].device), []).append(flat)
            for flats in chunks.values():
                if self.impl != "compiled":  # compiling failed for another dtype or device this step
                    eager += flats
                elif not _compiled.run_chunks(type(self).kernel, flats, s, f"optimizer {self.name}", self.members):
                    self.impl = "loop"  # warned once; this and later steps stay eager
        if eager and self.members and _members.varies(s):
            cache = {}
            for row in eager:
                type(self).kernel(*row, **_members.shaped(s, row[0], cache))
            return
        for row in eager:
            type(self).kernel(*row, **s)

    # -- under torch.compile ------------------------------------------------------------------------------------
    # A function that calls step() compiled from outside: dynamo would specialise on the integer step count and
    # recompile every step (1.6-2.8 s each), then give up. So, as torch.optim does, the count lives in a 0-d tensor
    # there (float64, so bias corrections round as with the number), the scalars are tensor expressions and state is
    # created in ``_init_group``, which dynamo runs eagerly while tracing (its hook for torch.optim's optimizers).
    # The step is then one graph, compiled once; impl="compiled" is not used inside it (inductor fuses the loop).
    def _traced_step(self) -> None:
        if self._number_counts:  # stepped eagerly or loaded before: converted once, at a graph break
            _outside_the_graph(CoreOptimizer._tensor_counts)(self)
        for group in self.param_groups:
            self._init_group(group)
        self._last = []
        for group in self.param_groups:
            scalars, names, stepped = self._traced_scalars(group), self._buffer_names(group), []
            for p, g, state in self._gradients(group):
                s = scalars(state)
                row = self._row(p, g, state, names)
                type(self).kernel(*row, **(_members.shaped(s, row[0]) if self.members else s))
                self.after_kernel(state, group, s)
                stepped.append((p, s))
            self._last.append((group, stepped))

    def _traced_scalars(self, group: dict) -> Callable[[dict], dict]:
        if not (self.members and _members.varies(group)):
            decay = self._weight_decay(group)
            return lambda state: {**self.scalars(group, state), **decay}
        views, owner, counts = self._views(group), f"optimizer {self.name}", self.TENSOR_COUNTS
        decays = [self._weight_decay(view) for view in views]
        return lambda state: _members.merge_all(
            [{**self.scalars(view, _members.state_view(state, counts, i)), **decays[i]}
             for i, view in enumerate(views)], owner)

    def _init_group(self, group: dict) -> None:
        """Creates the state of ``group``'s parameters that have gradients, with the step count as a tensor."""
        for p in group["params"]:
            if p.grad is not None and not self.state[p]:
                self._init_state(p, self.state[p], group)
                self._tensors(self.state[p])

    def _tensor_counts(self) -> None:
        for state in self.state.values():
            if state:
                self._tensors(state)
        self._number_counts = False

    TENSOR_COUNTS = ("step",)  # state entries that are numbers eagerly and 0-d tensors under torch.compile

    def _tensors(self, state: dict) -> None:
        for key in self.TENSOR_COUNTS:
            value = state[key]
            if isinstance(value, np.ndarray):  # a population's per-member counts
                state[key] = torch.from_numpy(value.copy())
            elif self.members and key != "step" and not isinstance(value, torch.Tensor):
                # per member from the start: the traced step updates it in place with each member's factor
                state[key] = torch.full((self.members,), float(value), dtype=torch.float64)
            elif not isinstance(value, torch.Tensor):
                state[key] = torch.tensor(float(value), dtype=torch.float64)

    def _numbers(self, state: dict) -> None:
        """torch keeps counts as tensors (``step``, NAdam's ``mu_product``): numbers here, so that the step's scalars
        round like the reference's Python floats and the compiled path sees values, not new objects."""
        for key in self.TENSOR_COUNTS:
            value = state[key]
            if isinstance(value, torch.Tensor):
                value = value.item() if value.numel() == 1 else value.double().cpu().numpy()
            if isinstance(value, np.ndarray):  # a population's per-member counts
                state[key] = value
            else:
                state[key] = round(value) if key == "step" else float(value)

    # -- effective learning rates -------------------------------------------------------------------------------
    def last_step(self) -> Iterator[tuple[int, dict, torch.Tensor, dict, dict]]:
        """Yields ``(group index, group, param, state, scalars)`` for each tensor the last step updated; a complex
        parameter and its state as their real views, whose elements each have their own effective lr."""
        for gi, (group, stepped) in enumerate(self._last):
            for p, s in stepped:
                state = self.state[p]
                if p.is_complex():
                    p = torch.view_as_real(p)
                    state = {k: torch.view_as_real(v) if torch.is_tensor(v) and v.is_complex() else v
                             for k, v in state.items()}
                yield gi, group, p, state, (_members.shaped(s, p) if _members.varies(s) else _as_numbers(s))

    def iter_effective_lrs(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yields ``(group index, param, effective lr)`` for each tensor of the last step, one at a time."""
        for gi, group, p, state, s in self.last_step():
            yield gi, p, self.effective_lr(p, state, group, s)

    @torch.no_grad()
    def effective_lrs(self) -> list[torch.Tensor]:
        """One tensor per parameter that took part in the last step (param-group order), shaped like it, such that
        ``θ_new - θ_old = -effective_lr ⊙ direction`` (the direction each optimizer's docstring names). A complex
        parameter's is shaped like its ``torch.view_as_real`` (real and imaginary parts step separately).

        Decoupled weight decay (``θ *= 1 - ηλ``) is applied on top and is not part of it. Empty before the first step
        and right after ``load_state_dict``.
        """
        return [lr for _, _, lr in self.iter_effective_lrs()]

    # -- copies and checkpoints ---------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # torch pickles defaults, state and param_groups only: keep the impl; the caches are rebuilt
        return {**super().__getstate__(), "impl": self.impl, "members": self.members}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by load_state_dict, with state and param_groups only
        self._last, self._aliases, self._number_counts = [], {}, True
        if "impl" not in self.__dict__:  # pickled before impl was kept
            self.impl = self._resolve_impl("auto")
        self.__dict__.setdefault("members", None)

    def state_dict(self) -> dict:
        """torch.optim's, with a population's per-member values as float64 tensors of K numbers (arrays would not
        load with ``torch.load(weights_only=True)``)."""
        saved = super().state_dict()
        if self.members:
            saved["param_groups"] = [{k: _members.saveable(v) for k, v in g.items()} for g in saved["param_groups"]]
            saved["state"] = {i: {k: _members.saveable(v) for k, v in st.items()} for i, st in saved["state"].items()}
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads ours, an older one of ours, or a torch.optim one of the same algorithm: a missing group key takes
        its reference default (what the saving code did before the key existed), a count saved as a tensor becomes
        a number, and a buffer torch does not keep is created. The implementation switches (``foreach``, ...)
        stay this optimizer's."""
        before = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        owner = f"optimizer {self.name}"
        for group, old in zip(self.param_groups, before):
            if self.members:
                group.update({k: _members.loaded(v, self.members) for k, v in group.items() if k != "params"})
            for key, value in self.FIXED.items():
                if group.setdefault(key, value) != value:
                    raise fail(owner, key, f"is {value!r} for {self.name!r}, but the state dict was saved with "
                               "another value (load it into the optimizer of that name)", group[key])
            for key, value in self.DEFAULTS.items():
                group.setdefault(key, value)
            group.update({key: old[key] for key in self.TORCH_FLAGS})
            self.upgrade_group(group, old)
            self._check_group(group)
            for p in group["params"]:
                if self.state.get(p):
                    self.upgrade_state(p, self.state[p], group)

    def upgrade_group(self, group: dict, old: dict) -> None:
        """Hook: fill keys of a loaded group that need more than a default (``old``: the group before loading)."""

    def upgrade_state(self, p: torch.Tensor, state: dict, group: dict) -> None:
        """A loaded state in our format: counts as numbers."""
        for key in [k for k, v in state.items() if v is None]:  # torch's SGD: momentum_buffer None before a step
            del state[key]
        # torch's SGD keeps no count: its momentum buffer means it has stepped
        state.setdefault("step", 1 if "momentum_buffer" in state else 0)
        for key in self.TENSOR_COUNTS:
            state.setdefault(key, 1.0)
        self._numbers(state)  # a buffer torch does not keep (Adadelta's second u) is created by the step (_row)



@functools.cache
def _outside_the_graph(fn: Callable) -> Callable:
    """``fn`` run eagerly from a traced step (a graph break); applied on first use, as importing dynamo takes ~1.4 s
    and only a traced step needs it."""
    return torch.compiler.disable(fn)


def _check_members(name: str, members) -> int | None:
    if members is None:
        return None
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise fail(f"optimizer {name}", "members", "must be an integer >= 1 (the size of dim 0 of every parameter)",
                   members)
    return members


def _family(cls: type) -> list[type]:
    """The registered optimizers that share ``cls``'s kernel (sgd/momentum/nesterov, adam/amsgrad, ...)."""
    found, todo = [], [CoreOptimizer]
    while todo:
        c = todo.pop()
        todo += c.__subclasses__()
        if c is not cls and c.kernel is cls.kernel and c.name != "core" and not c.name.startswith("_"):
            found.append(c)
    # by name: a subclass made elsewhere (a test's, a user's wrapper) keeps its parent's name and kernel
    return sorted({c.name: c for c in reversed(found)}.values(), key=lambda c: c.name)


def _as_numbers(s: dict) -> dict:
    """The step's scalars with 0-d tensors (a tensor lr, counts from under torch.compile) as Python numbers."""
    if any(isinstance(v, torch.Tensor) for v in s.values()):
        return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
    return s
