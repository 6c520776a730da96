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
def lr_histogram(optimizer, bins: int = 160, low: float = -10.0, high: float = 6.0) -> LRHistogram:
    """Bins ``log10`` of ``optimizer``'s effective learning rates of its last step, per param group.

    Each parameter's effective lr is computed, binned and dropped in turn, so memory stays at one parameter's size;
    everything stays on the parameter's device until the final small transfer of counts.
    """
    n_groups = len(optimizer.param_groups)
    counts = [None] * n_groups
    mins = [torch.tensor(float("inf"))] * n_groups
    maxs = [torch.tensor(float("-inf"))] * n_groups
    bounded = hasattr(optimizer, "clip_counts")
    clipped = [[0, 0, 0] for _ in range(n_groups)]  # lower, upper, total elements
    for gi, group, p, state, s in optimizer.last_step():
        x = optimizer.effective_lr(p, state, group, s).float().log10().flatten()
        h = torch.histc(x.clamp(low, high), bins=bins, min=low, max=high).long()
        counts[gi] = h if counts[gi] is None else counts[gi] + h
        mins[gi] = torch.minimum(mins[gi].to(x.device), x.min())
        maxs[gi] = torch.maximum(maxs[gi].to(x.device), x.max())
        if bounded:
            n_lo, n_hi = optimizer.clip_counts(p, state, group, s)
            clipped[gi][0] = clipped[gi][0] + n_lo
            clipped[gi][1] = clipped[gi][1] + n_hi
            clipped[gi][2] += p.numel()
    zero = torch.zeros(bins, dtype=torch.long)
    result = LRHistogram(
        edges=torch.linspace(low, high, bins + 1, dtype=torch.float64),
        counts=torch.stack([zero if c is None else c.cpu() for c in counts]),
        min=torch.stack([m.cpu() for m in mins]).double(),
        max=torch.stack([m.cpu() for m in maxs]).double(),
    )
    if bounded:
        frac = [(torch.as_tensor(lo).cpu().double() / max(n, 1), torch.as_tensor(hi).cpu().double() / max(n, 1))
                for lo, hi, n in clipped]
        result.clipped_lower = torch.stack([f[0] for f in frac])
        result.clipped_upper = torch.stack([f[1] for f in frac])
    return result
