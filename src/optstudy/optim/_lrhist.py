"""Histograms of log10 effective learning rates, computed on the parameters' device, returning only counts."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class LRHistogram:
    """Counts of log10 effective learning rates in ``bins`` equal bins over ``[low, high]`` decades.

    Values outside the range (including lr = 0, i.e. -inf) are counted in the end bins; ``min``/``max`` are exact.
    ``clipped_lower``/``clipped_upper`` are the fractions of elements whose step size was raised to AdaBound's lower
    bound or cut to its upper bound (``None`` for unbounded optimizers). Per-group tensors have one row per group.
    """

    edges: torch.Tensor  # (bins + 1,) log10 lr
    counts: torch.Tensor  # (groups, bins) int64
    min: torch.Tensor  # (groups,) log10 lr, +inf for a group that took no step
    max: torch.Tensor  # (groups,)
    clipped_lower: torch.Tensor | None = None  # (groups,)
    clipped_upper: torch.Tensor | None = None

    @property
    def total(self) -> torch.Tensor:
        """Counts over all groups, shape (bins,)."""
        return self.counts.sum(0)

    def quantiles(self, qs, group: int | None = None) -> torch.Tensor:
        """Quantiles of log10 lr estimated from the counts (linear within a bin, clamped to the exact min/max);
        accurate to a bin width. ``group=None``: over all groups."""
        counts = self.total if group is None else self.counts[group]
        lo = self.min.min() if group is None else self.min[group]
        hi = self.max.max() if group is None else self.max[group]
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), counts.double().cumsum(0)])
        n = cdf[-1]
        if n == 0:
            return torch.full((len(qs),), float("nan"), dtype=torch.float64)
        target = torch.as_tensor(qs, dtype=torch.float64) * n
        i = torch.searchsorted(cdf, target, right=False).clamp(1, len(cdf) - 1)
        frac = (target - cdf[i - 1]) / (cdf[i] - cdf[i - 1]).clamp(min=1)
        x = self.edges[i - 1] + frac * (self.edges[i] - self.edges[i - 1])
        return x.clamp(lo.item(), hi.item())


@torch.no_grad()
def lr_histogram(optimizer, bins: int = 160, low: float = -10.0, high: float = 6.0):
    """Bins ``log10`` of ``optimizer``'s effective learning rates of its last step, per param group; for a population
    (``members=K``) a list of K histograms, member k's from its slice of every parameter.

    Each parameter's effective lr is computed, binned and dropped in turn, so memory stays at one parameter's size;
    everything stays on the parameter's device until the final small transfer of counts.
    """
    members = getattr(optimizer, "members", None)
    acc = _Counts(len(optimizer.param_groups), bins, low, high, members)
    bounded = hasattr(optimizer, "clip_counts")
    for gi, group, p, state, s in optimizer.last_step():
        x = optimizer.effective_lr(p, state, group, s).float().log10()
        acc.add(gi, x, optimizer.clip_counts(p, state, group, s) if bounded else None)
    results = [acc.result(k, bounded) for k in range(members or 1)]
    return results if members else results[0]


class _Counts:
    """Running counts, minima, maxima and clipped counts per group, each with a leading member dimension (1 for a
    single model)."""

    def __init__(self, n_groups: int, bins: int, low: float, high: float, members: int | None):
        self.bins, self.low, self.high, self.members = bins, low, high, members
        self.counts = [None] * n_groups
        self.mins = [torch.tensor(float("inf"))] * n_groups
        self.maxs = [torch.tensor(float("-inf"))] * n_groups
        self.clipped = [[0, 0, 0] for _ in range(n_groups)]  # lower, upper, elements per member

    def add(self, gi: int, x: torch.Tensor, clips) -> None:
        x = x.reshape(self.members or 1, -1)
        h = self._binned(x)
        self.counts[gi] = h if self.counts[gi] is None else self.counts[gi] + h
        self.mins[gi] = torch.minimum(self.mins[gi].to(x.device), x.amin(1))
        self.maxs[gi] = torch.maximum(self.maxs[gi].to(x.device), x.amax(1))
        if clips is not None:
            self.clipped[gi][0] = self.clipped[gi][0] + clips[0]
            self.clipped[gi][1] = self.clipped[gi][1] + clips[1]
            self.clipped[gi][2] += x.shape[1]

    def _binned(self, x: torch.Tensor) -> torch.Tensor:
        """(members, bins) counts. One model: ``torch.histc``. A population: all members in one ``bincount``, each
        value's bin found among the edges histc uses (linspace in the values' dtype; histc settles a value near an
        edge by comparing it with them), so that member k's counts are its standalone run's."""
        x = x.clamp(self.low, self.high)
        if not self.members:
            return torch.histc(x, bins=self.bins, min=self.low, max=self.high).long()[None]
        edges = torch.linspace(self.low, self.high, self.bins + 1, dtype=x.dtype, device=x.device)
        index = (torch.bucketize(x, edges, right=True) - 1).clamp_(0, self.bins - 1)
        index += torch.arange(len(x), device=x.device)[:, None] * self.bins
        return torch.bincount(index.flatten(), minlength=len(x) * self.bins).view(len(x), self.bins)

    def result(self, k: int, bounded: bool) -> LRHistogram:
        zero = torch.zeros(self.bins, dtype=torch.long)
        result = LRHistogram(
            edges=torch.linspace(self.low, self.high, self.bins + 1, dtype=torch.float64),
            counts=torch.stack([zero if c is None else c[k].cpu() for c in self.counts]),
            min=torch.stack([m.reshape(-1)[k if m.numel() > 1 else 0].cpu() for m in self.mins]).double(),
            max=torch.stack([m.reshape(-1)[k if m.numel() > 1 else 0].cpu() for m in self.maxs]).double(),
        )
        if bounded:
            frac = [(_member(lo, k) / max(n, 1), _member(hi, k) / max(n, 1)) for lo, hi, n in self.clipped]
            result.clipped_lower = torch.stack([f[0] for f in frac])
            result.clipped_upper = torch.stack([f[1] for f in frac])
        return result


def _member(count, k: int) -> torch.Tensor:
    count = torch.as_tensor(count).cpu().double()
    return count[k] if count.dim() else count
