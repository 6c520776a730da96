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
    n_groups = len(optimizer.param_groups)
    acc = [_Counts(n_groups, bins) for _ in range(members or 1)]
    bounded = hasattr(optimizer, "clip_counts")
    for gi, group, p, state, s in optimizer.last_step():
        x = optimizer.effective_lr(p, state, group, s).float().log10()
        clips = optimizer.clip_counts(p, state, group, s) if bounded else None
        for k, counts in enumerate(acc):
            counts.add(gi, x[k] if members else x, low, high,
                       None if clips is None else [c[k] if members else c for c in clips], p.numel() // len(acc))
    results = [counts.result(bins, low, high, bounded) for counts in acc]
    return results if members else results[0]


class _Counts:
    """One histogram's running counts, minima, maxima and clipped counts, per group."""

    def __init__(self, n_groups: int, bins: int):
        self.bins, self.counts = bins, [None] * n_groups
        self.mins = [torch.tensor(float("inf"))] * n_groups
        self.maxs = [torch.tensor(float("-inf"))] * n_groups
        self.clipped = [[0, 0, 0] for _ in range(n_groups)]  # lower, upper, total elements

    def add(self, gi: int, x: torch.Tensor, low: float, high: float, clips, numel: int) -> None:
        x = x.flatten()
        h = torch.histc(x.clamp(low, high), bins=self.bins, min=low, max=high).long()
        self.counts[gi] = h if self.counts[gi] is None else self.counts[gi] + h
        self.mins[gi] = torch.minimum(self.mins[gi].to(x.device), x.min())
        self.maxs[gi] = torch.maximum(self.maxs[gi].to(x.device), x.max())
        if clips is not None:
            self.clipped[gi][0] = self.clipped[gi][0] + clips[0]
            self.clipped[gi][1] = self.clipped[gi][1] + clips[1]
            self.clipped[gi][2] += numel

    def result(self, bins: int, low: float, high: float, bounded: bool) -> LRHistogram:
        zero = torch.zeros(bins, dtype=torch.long)
        result = LRHistogram(
            edges=torch.linspace(low, high, bins + 1, dtype=torch.float64),
            counts=torch.stack([zero if c is None else c.cpu() for c in self.counts]),
            min=torch.stack([m.cpu() for m in self.mins]).double(),
            max=torch.stack([m.cpu() for m in self.maxs]).double(),
        )
        if bounded:
            frac = [(torch.as_tensor(lo).cpu().double() / max(n, 1), torch.as_tensor(hi).cpu().double() / max(n, 1))
                    for lo, hi, n in self.clipped]
            result.clipped_lower = torch.stack([f[0] for f in frac])
            result.clipped_upper = torch.stack([f[1] for f in frac])
        return result
