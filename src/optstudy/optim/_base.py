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
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator

import torch

from optstudy.errors import ConfigError
from optstudy.optim import _compiled
from optstudy.optim._rules import check_group

log = logging.getLogger(__name__)

IMPLS = ("auto", "loop", "compiled")
AUTO_COMPILE_NUMEL = 1 << 20


class CoreOptimizer(torch.optim.Optimizer):
    """Base class: validation, lazy state, the per-tensor step loop and effective learning rates."""

    name = "core"
    DEFAULTS: dict[str, Any] = {}  # the keywords this optimizer accepts, with the reference defaults
    FIXED: dict[str, Any] = {}  # flags the name fixes (amsgrad for "amsgrad", ...): in every group, not keywords

    def __init__(self, params, impl: str | None = None, **hparams):
        unknown = set(hparams) - set(self.DEFAULTS)
        if unknown:
            raise ConfigError(
                f"optimizer {self.name}: unknown keyword {sorted(unknown)[0]!r}; "
                f"valid keywords: {', '.join(sorted(self.DEFAULTS))}"
            )
        impl = impl or os.environ.get("OPTSTUDY_OPTIM_IMPL", "auto")
        if impl not in IMPLS:
            raise ConfigError(f"optimizer {self.name}: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        self._last: list[tuple[dict, list[tuple[torch.Tensor, dict]]]] = []
        self._aliases: dict[tuple, tuple] = {}  # compiled path: last step's flat aliases of params and state
        super().__init__(params, {**self.DEFAULTS, **hparams, **self.FIXED})
        self.impl = self._resolve_impl(impl)

    # -- groups -------------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        unknown = set(param_group) - set(self.DEFAULTS) - {"params", "param_names", "initial_lr"}
        if unknown:
            raise ConfigError(
                f"optimizer {self.name}: unknown keyword {sorted(unknown)[0]!r} in a param group; "
                f"valid keywords: {', '.join(sorted(self.DEFAULTS))}"
            )
        super().add_param_group(param_group)  # fills defaults
        group = self.param_groups[-1]
        check_group(f"optimizer {self.name}", group)
        self.prepare_group(group)

    def prepare_group(self, group: dict) -> None:
        """Hook for subclass checks that involve several keys; runs on every group, including ones added later."""
        if group["decoupled_weight_decay"] and group["weight_decay"] == 0:
            log.debug("decoupled_weight_decay=True with weight_decay=0 has no effect")

    def _resolve_impl(self, impl: str) -> str:
        if impl != "auto":
            return impl
        numel = sum(p.numel() for g in self.param_groups for p in g["params"])
        return "compiled" if numel >= AUTO_COMPILE_NUMEL else "loop"

    # -- the pieces a subclass defines --------------------------------------------------------------------------
    def buffers(self, group: dict) -> tuple[str, ...]:
        raise NotImplementedError

    def init_state(self, p: torch.Tensor, state: dict, group: dict) -> None:
        state["step"] = 0
        for name in self.buffers(group):
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def scalars(self, group: dict, state: dict) -> dict[str, Any]:
        """This step's numbers (floats, passed to the compiled kernel as one tensor) and flags (bools, constants of
        the compiled code). Must depend on ``state`` only through ``state_key``."""
        raise NotImplementedError

    def state_key(self, state: dict) -> tuple:
        """What ``scalars`` reads from a tensor's state: tensors with equal keys share one ``scalars`` call."""
        return (state["step"],)

    kernel: Callable = staticmethod(lambda *a, **k: None)

    def after_kernel(self, state: dict, group: dict, s: dict) -> None:
        """Hook for state bookkeeping after the tensors are updated (e.g. swapping double buffers)."""

    def effective_lr(self, p: torch.Tensor, state: dict, group: dict, s: dict) -> torch.Tensor:
        """Per-element factor ``lr_eff`` of the last step: ``θ_new - θ_old = -lr_eff ⊙ direction``."""
        raise NotImplementedError

    # -- the step -----------------------------------------------------------------------------------------------
    def _weight_decay(self, group: dict) -> dict[str, float | None]:
        # coupled: g += λθ inside the kernel; decoupled (AdamW): θ *= 1 - ηλ before the update; None: off (a constant
        # of the compiled kernel, so that the common case costs no pass)
        wd = float(group["weight_decay"])
        if wd == 0:
            return {"wd": None, "decay": None}
        if group["decoupled_weight_decay"]:
            return {"wd": None, "decay": 1.0 - float(group["lr"]) * wd}
        return {"wd": wd, "decay": None}

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._last = []
        seen, self._aliases = self._aliases, {}
        for group in self.param_groups:
            self._last.append((group, self._step_group(group, seen)))
        return loss

    def _step_group(self, group: dict, seen: dict) -> list[tuple[torch.Tensor, dict]]:
        decay = self._weight_decay(group)
        names = self.buffers(group)
        stepped, parts = [], {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ConfigError(f"optimizer {self.name}: sparse gradients are not supported")
            state = self.state[p]
            if not state:
                self.init_state(p, state, group)
            state["step"] += 1
            key = self.state_key(state)
            if key not in parts:
                parts[key] = ({**self.scalars(group, state), **decay}, [])
            s, rows = parts[key]
            rows.append([p, p.grad, *(state[b] for b in names)])
            stepped.append((p, s))
        for s, rows in parts.values():
            self._run(rows, s, seen)
        if type(self).after_kernel is not CoreOptimizer.after_kernel:
            for p, s in stepped:
                self.after_kernel(self.state[p], group, s)
        return stepped

    def _run(self, rows: list[list[torch.Tensor]], s: dict, seen: dict) -> None:
        """Applies the kernel to each row ``[p, g, *buffers]``: compiled in chunks where it can, else eagerly."""
        eager = rows
        if self.impl == "compiled":
            eager, chunks = [], {}
            for row in rows:
                flat = _compiled.flat_row(row, seen, self._aliases)
                if flat is None:
                    eager.append(row)
                else:
                    chunks.setdefault((row[0].dtype, row[0].device), []).append(flat)
            for flats in chunks.values():
                if self.impl != "compiled":  # compiling failed for another dtype or device this step
                    eager += flats
                elif not _compiled.run_chunks(type(self).kernel, flats, s, owner=f"optimizer {self.name}"):
                    self.impl = "loop"  # warned once; this and later steps stay eager
        for row in eager:
            type(self).kernel(*row, **s)

    # -- effective learning rates -------------------------------------------------------------------------------
    def last_step(self) -> Iterator[tuple[int, dict, torch.Tensor, dict]]:
        """Yields ``(group index, group, param, scalars)`` for each tensor the last step updated."""
        for gi, (group, stepped) in enumerate(self._last):
            for p, s in stepped:
                yield gi, group, p, s

    def iter_effective_lrs(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yields ``(group index, param, effective lr)`` for each tensor of the last step, one at a time."""
        for gi, group, p, s in self.last_step():
            yield gi, p, self.effective_lr(p, self.state[p], group, s)

    @torch.no_grad()
    def effective_lrs(self) -> list[torch.Tensor]:
        """One tensor per parameter that took part in the last step (param-group order), shaped like it, such that
        ``θ_new - θ_old = -effective_lr ⊙ direction`` (the direction each optimizer's docstring names).

        Decoupled weight decay (``θ *= 1 - ηλ``) is applied on top and is not part of it. Empty before the first step
        and right after ``load_state_dict``.
        """
        return [lr for _, _, lr in self.iter_effective_lrs()]

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._last, self._aliases = [], {}
        for group in self.param_groups:
            self.prepare_group(group)
