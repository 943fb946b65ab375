"""Work split over ranks (accelerate processes): shares of lists and counts, sums and gathers.

Every rank holds the same full lists (prompts, evaluation problems) and takes a contiguous share;
scalars are summed and per-item results gathered so that rank 0 logs the whole batch's metrics.
With one process every call is the identity.
"""

from __future__ import annotations

import torch


class Ranks:
    """The ranks of an ``accelerate.Accelerator``."""

    def __init__(self, accelerator):
        self.acc = accelerator
        self.index, self.count = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process

    def shard(self, items: list) -> list:
        """This rank's contiguous share of a list that every rank holds in full."""
        n, r, k = len(items), self.index, self.count
        return items[r * n // k : (r + 1) * n // k]

    def share(self, n: int) -> int:
        """This rank's share of a count split over ranks."""
        r, k = self.index, self.count
        return (r + 1) * n // k - r * n // k

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum scalars over ranks (one all-reduce)."""
        return self._reduce(values, "sum")

    def max(self, values: dict[str, float]) -> dict[str, float]:
        """The largest value of each scalar over ranks."""
        return self._reduce(values, "max")

    def _reduce(self, values: dict[str, float], op: str) -> dict[str, float]:
        if self.count == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.acc.device)
        if op == "max":
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        else:
            t = self.acc.reduce(t, reduction="sum")
        return dict(zip(keys, t.tolist(), strict=True))

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order (on every rank)."""
        if self.count == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def barrier(self) -> None:
        self.acc.wait_for_everyone()
