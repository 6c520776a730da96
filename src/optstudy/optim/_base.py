"""The machinery every optimizer of the core shares.

An optimizer is described by three small pieces (see ``_sgd.py``, ``_adam.py``, ...):

- ``buffers(group)``: the names of its state tensors, created lazily as zeros like the parameter;
- ``scalars(group, state)``: the Python floats of this step (step sizes, bias corrections, bounds);
- ``kernel(p, g, *buffers, **scalars)``: the update of one tensor, written as plain tensor math, in place.

``step`` runs the kernel once per tensor. The same kernel runs eagerly (``impl="loop"``, the readable reference) or
compiled with ``torch.compile`` into one fused pass per tensor (``impl="compiled"``): on a 2-core CPU the eager kernel
makes ~8 passes over memory where torch's fused Adam makes one, so compiling closes most of that gap for large models,
at the price of a few seconds of compile time on first use (cached across runs by inductor). ``impl="auto"`` (the
default) compiles when the optimizer holds at least ``AUTO_COMPILE_NUMEL`` elements and runs the loop below that,
where compile time would outweigh the savings; ``OPTSTUDY_OPTIM_IMPL`` overrides it process-wide. Compiled kernels
see 1-D views and unspecialised floats, so one compilation serves every shape and every step.

The effective learning rate of the last step is recomputed on demand from the state (no cost per step).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator

import torch

from optstudy.errors import ConfigError
from optstudy.optim._rules import check_group

log = logging.getLogger(__name__)

IMPLS = ("auto", "loop", "compiled")
AUTO_COMPILE_NUMEL = 1 << 20
BUCKET_NUMEL = 1 << 16  # compiled: tensors smaller than this share one call per step (see _run_bucket)

_compiled: dict[Callable, Callable] = {}


def _compile(kernel: Callable) -> Callable:
    if kernel not in _compiled:
        # one kernel serves several variants (sgd/momentum/nesterov, with and without AMSGrad's buffer), each with a
        # static, a dynamic and a size-1 graph: dynamo's default limit of 8 graphs per function would silently send
        # the later variants back to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled[kernel] = torch.compile(kernel, dynamic=True)
    return _compiled[kernel]


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

    def scalars(self, group: dict, state: dict) -> dict[str, float]:
        raise NotImplementedError

    kernel: Callable = staticmethod(lambda *a, **k: None)

    def after_kernel(self, state: dict, group: dict) -> None:
        """Hook for state bookkeeping after the tensors are updated (e.g. swapping double buffers)."""

    def effective_lr(self, p: torch.Tensor, state: dict, group: dict, s: dict) -> torch.Tensor:
        """Per-element factor ``lr_eff`` of the last step: ``θ_new - θ_old = -lr_eff ⊙ direction``."""
        raise NotImplementedError

    # -- the step -----------------------------------------------------------------------------------------------
    def _weight_decay(self, group: dict) -> dict[str, float]:
        # coupled: g += λθ inside the kernel; decoupled (AdamW): θ *= 1 - ηλ before the update
        wd = float(group["weight_decay"])
        if group["decoupled_weight_decay"]:
            return {"wd": 0.0, "decay": 1.0 - float(group["lr"]) * wd}
        return {"wd": wd, "decay": 1.0}

    def _run_kernel(self, tensors: list[torch.Tensor], s: dict) -> None:
        if self.impl == "compiled" and all(t.is_contiguous() for t in tensors):
            try:
                _compile(type(self).kernel)(*[t.detach().view(-1) for t in tensors], **s)
                return
            except Exception as exc:  # no C++ compiler, unsupported backend, ...: stay correct, warn once
                log.warning("optimizer %s: torch.compile failed (%s); using the eager loop", self.name, exc)
                self.impl = "loop"
        type(self).kernel(*tensors, **s)

    def _run_bucket(self, members: list[list[torch.Tensor]], s: dict) -> None:
        """One compiled call over small tensors concatenated: a compiled call costs ~40 µs however small the tensor,
        so ResNet-18's ~40 bias and norm vectors would cost more than its conv weights. Copies are cheap at this size.
        """
        columns = list(zip(*members))  # p, g, buffers...: each a list over the members
        flats = [torch.cat([t.view(-1) for t in column]) for column in columns]
        self._run_kernel(flats, s)
        sizes = [t.numel() for t in columns[0]]
        for i, (column, flat) in enumerate(zip(columns, flats)):
            if i != 1:  # everything but the gradient was updated
                torch._foreach_copy_([t.view(-1) for t in column], list(flat.split(sizes)))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._last = []
        for group in self.param_groups:
            self._last.append((group, self._step_group(group)))
        return loss

    def _step_group(self, group: dict) -> list[tuple[torch.Tensor, dict]]:
        decay = self._weight_decay(group)
        names = self.buffers(group)
        stepped, buckets = [], {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ConfigError(f"optimizer {self.name}: sparse gradients are not supported")
            state = self.state[p]
            if not state:
                self.init_state(p, state, group)
            state["step"] += 1
            s = {**self.scalars(group, state), **decay}
            tensors = [p, p.grad, *(state[b] for b in names)]
            if self.impl == "compiled" and p.numel() < BUCKET_NUMEL and all(t.is_contiguous() for t in tensors):
                buckets.setdefault((p.dtype, p.device, *s.values()), (s, []))[1].append(tensors)
            else:
                self._run_kernel(tensors, s)
            stepped.append((p, s))
        for s, members in buckets.values():
            self._run_bucket(members, s)
        for p, _ in stepped:
            self.after_kernel(self.state[p], group)
        return stepped

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
        self._last = []
        for group in self.param_groups:
            self.prepare_group(group)
