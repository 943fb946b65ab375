"""One step's metrics as weighted sums, merged over micro-batches and reduced over ranks.

Every metric is a pair (numerator, denominator): a loss returns e.g. `{"train/entropy": (sum of
token entropies, number of tokens)}`, the pairs of all micro-batches and ranks are added, and the
value is numerator / max(denominator, 1). Denominators are counts (tokens, responses, updates),
so a mean over a whole step is exact however the step was cut into micro-batches and ranks.
Maxima (e.g. the largest engine/trainer log-prob gap) are kept apart and reduced with max.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from dph.distributed import Ranks

Pair = tuple[float, float]


class MetricAccumulator:
    """Weighted sums of a step's metrics. Every rank must declare the same names (`names`, in the
    order the metrics are reported), since the sums are reduced over ranks by name."""

    def __init__(self, names: Iterable[str] = (), maxima: Iterable[str] = ()):
        self.sums: dict[str, list[float]] = {name: [0.0, 0.0] for name in names}
        self.maxima: dict[str, float] = dict.fromkeys(maxima, 0.0)

    def add(self, name: str, numerator: float, denominator: float = 0.0) -> None:
        pair = self.sums.setdefault(name, [0.0, 0.0])
        pair[0] += numerator
        pair[1] += denominator

    def merge(self, metrics: Mapping[str, Pair]) -> None:
        """Add a loss's or a stage's metrics, {name: (numerator, denominator)}; a name declared as a
        maximum keeps the largest numerator instead."""
        for name, (numerator, denominator) in metrics.items():
            if name in self.maxima:
                self.max(name, numerator)
            else:
                self.add(name, numerator, denominator)

    def max(self, name: str, value: float) -> None:
        self.maxima[name] = max(self.maxima.get(name, value), value)

    def reduce(self, ranks: Ranks) -> dict[str, float]:
        """The values over every rank: numerator / max(denominator, 1), and the maxima."""
        flat = {f"{name}\0{i}": pair[i] for name, pair in self.sums.items() for i in (0, 1)}
        totals = ranks.sum(flat)
        out = {name: totals[f"{name}\0{0}"] / max(1.0, totals[f"{name}\0{1}"]) for name in self.sums}
        return {**out, **ranks.max(self.maxima)} if self.maxima else out
