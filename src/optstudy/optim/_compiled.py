"""The compiled step: one ``torch.compile``d call updates ``CHUNK`` tensors at once.

A compiled call costs ~40 µs on top of its arithmetic however small its tensors are, and ResNet-18 has 62 of them:
compiling the kernel per tensor left the step 1.6x slower than torch's fused Adam. Compiling it per param group would
make one call, but one graph per model shape, at ~30 s of cold compile each. So the kernel is compiled once for a
chunk of ``CHUNK`` rows (a row = parameter, gradient and state buffers, flattened to 1-D), with every size symbolic,
and each step calls it ``ceil(n / CHUNK)`` times; the last chunk is padded with scratch rows. One graph then serves
every model, every step and every lr, and inductor caches it on disk: 5–13 s to compile on a new machine, 0.2–3 s
in a later process (the first compile of a process pays ~2.5 s of torch.compile's own start-up).

What makes one graph enough:
- the step's floats (lr, bias corrections, bounds, ...) arrive as one tensor ``sc``: a float argument would be
  specialised on (or recompiled for) each value;
- the flags that change the code (``nesterov``, ``centered``, weight decay on/off) are constants of the compiled
  function, so each combination is its own graph;
- rows are 1-D aliases without a view base: a ``view(-1)`` would make dynamo guard on the original shapes;
- duck sizing is off while it compiles, or equal sizes in one chunk would be guarded as equal;
- ``cpp.min_chunk_size=1``: inductor decides from the first call's sizes whether a loop runs on all cores, and a chunk
  of bias vectors would otherwise leave later conv weights on one;
- ``size_asserts=False``: the guards already check what those asserts re-check, at ~12 µs a call.

In a population (``members=K``, see ``_members.py``) rows are 2-D, ``(K, n/K)``, and ``sc`` holds K values per
scalar, each ``(K, 1)`` in the kernel: still one graph per variant, whatever K and whatever varies between members.

Rows it cannot take (fewer than 2 elements, which dynamo specialises; strides that differ within a row; neither
contiguous nor channels-last) run the eager kernel.
"""

from __future__ import annotations

import logging
import numbers
from typing import Callable

import numpy as np
import torch
import torch.fx.experimental._config as fx_config

from optstudy.optim import _members

log = logging.getLogger(__name__)

CHUNK = 8  # rows per compiled call: 8 calls for ResNet-18; a wider chunk compiles longer for little gain

_runners: dict[tuple, Callable] = {}
_pads: dict[tuple, list[list[torch.Tensor]]] = {}


def split_scalars(s: dict, members: int | None = None) -> tuple[tuple[str, ...], tuple, tuple[tuple[str, object], ...]]:
    """(names, values) of the step's numbers, which become one tensor, and the remaining constants (bools, None).
    In a population each value is K numbers (a shared one repeated)."""
    names, values, static = [], [], []
    for key, value in s.items():
        if isinstance(value, np.ndarray):
            names.append(key)
            values.append(value.tolist())
        elif isinstance(value, (numbers.Real, torch.Tensor)) and not isinstance(value, bool):  # never a constant
            names.append(key)
            values.append([float(value)] * members if members else float(value))
        else:
            static.append((key, value))
    return tuple(names), tuple(values), tuple(static)


def flat_row(row: list[torch.Tensor], seen: dict, kept: dict, members: int | None = None) -> list[torch.Tensor] | None:
    """1-D aliases of ``row = [p, g, *buffers]`` (same memory, no view base), or None if it must run eagerly.

    The aliases of ``p`` and the buffers are reused from ``seen`` (last step's) and recorded in ``kept`` (this step's):
    making them costs ~1.3 µs a tensor, a few hundred per step. The gradient's is made fresh: gradients are usually new
    tensors each step, and caching them would keep the old ones alive.
    """
    p, g = row[0], row[1]
    key = (id(p), *map(id, row[2:]))
    entry = seen.get(key)
    if entry is None or entry[0] != p.data_ptr():  # ``p.data = ...`` keeps the object and changes the memory
        entry = _row_entry(row, members)
    kept[key] = entry
    _, n, stride, flats, _ = entry
    if flats is None or g.stride() != stride:
        return None
    return [flats[0], _alias(g, n, members), *flats[1:]]


def _alias(t: torch.Tensor, n: int, members: int | None) -> torch.Tensor:
    if members:
        return t.as_strided((members, n // members), (n // members, 1)).detach()
    return t.as_strided((n,), (1,)).detach()


def _row_entry(row: list[torch.Tensor], members: int | None) -> tuple:
    """(data pointer, numel, stride, aliases of p and buffers or None, p and buffers: kept alive so that their ``id``
    stays theirs). Not the gradient: the entry outlives the step."""
    p, held = row[0], (row[0], *row[2:])
    n, stride = p.numel(), p.stride()
    dense = p.is_contiguous() or (not members and p.is_contiguous(memory_format=torch.channels_last))
    if n < 2 * (members or 1) or not dense or any(t.stride() != stride for t in row[2:]):
        return p.data_ptr(), n, stride, None, held
    flats = [_alias(t, n, members) for t in held]
    return p.data_ptr(), n, stride, flats, held


def _runner(kernel: Callable, width: int, names: tuple[str, ...], static: tuple, members: bool) -> Callable:
    key = (kernel, width, names, static, members)
    if key not in _runners:
        constants = dict(static)

        def run(sc, *tensors):
            # a population's sc is (scalars, K): each value (K, 1), broadcast over the rows' member dimension
            values = dict(zip(names, (sc.unsqueeze(-1) if members else sc).unbind(0)))
            for i in range(0, len(tensors), width):
                kernel(*tensors[i:i + width], **values, **constants)

        # all variants share run's code object, so dynamo keeps their graphs side by side: allow many
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _runners[key] = torch.compile(run, dynamic=True, options={"cpp.min_chunk_size": 1, "size_asserts": False})
    return _runners[key]


def _scalar_dtype(device: torch.device) -> torch.dtype:
    # float64, like the Python floats of the eager kernel (0-d: each op rounds it to the parameters' dtype, as it
    # rounds a number). Scalars computed in float32 (``1 - beta1`` when kernels still computed it) made float32
    # trajectories drift apart by ~1e-4 relative in 20 steps. MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _scalars_on(device: torch.device, values: tuple[float, ...]) -> torch.Tensor:
    if device.type == "cuda":  # a plain copy to the GPU would wait for the backward pass queued before it
        pinned = torch.tensor(values, dtype=_scalar_dtype(device), pin_memory=True)
        return pinned.to(device, non_blocking=True)
    return torch.tensor(values, dtype=_scalar_dtype(device), device=device)


def _padding(like: torch.Tensor, width: int, count: int) -> list[torch.Tensor]:
    """``count`` scratch rows of 2-element tensors (2 per member in a population); each tensor distinct, as dynamo
    guards on inputs that alias."""
    shape = (2,) if like.dim() == 1 else (like.shape[0], 2)
    key = (like.dtype, like.device, width, shape)
    pads = _pads.setdefault(key, [])
    while len(pads) < count:
        pads.append([torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(width)])
    return [t for row in pads[:count] for t in row]


def run_chunks(kernel: Callable, rows: list[list[torch.Tensor]], s: dict, owner: str,
               members: int | None = None) -> bool:
    """Applies ``kernel`` to every row (all of one dtype and device), ``CHUNK`` rows per compiled call.

    Returns False if ``torch.compile`` failed (no C++ compiler, an unsupported backend, ...); the rows it had not
    done were then updated eagerly, so the step is complete and correct either way.
    """
    names, values, static = split_scalars(s, members)
    width = len(rows[0])
    p = rows[0][0]
    sc = _scalars_on(p.device, values)
    duck, fx_config.use_duck_shape = fx_config.use_duck_shape, False  # not .patch(): that costs ~15 µs a call
    try:
        for i in range(0, len(rows), CHUNK):
            chunk = [t for row in rows[i:i + CHUNK] for t in row]
            missing = CHUNK - len(chunk) // width
            try:
                _runner(kernel, width, names, static, bool(members))(sc, *chunk, *(_padding(p, width, missing) if missing else ()))
            except Exception as exc:  # compiling fails before the graph runs: these rows are not updated yet
                log.warning("%s: torch.compile failed (%s); using the eager loop", owner, exc)
                for row in rows[i:]:
                    kernel(*row, **(_members.shaped(s, row[0]) if members else s))
                return False
    finally:
        fx_config.use_duck_shape = duck
    return True
