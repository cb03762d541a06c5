"""Per-update metrics and skip counts kept on the device, read back once per log interval.

An update must not wait for the host (a GPU then idles, and CUDA graphs forbid it): its metrics are added to running
sums on the device, and whether it was skipped for a non-finite value is a device flag. Only
`read` moves them to the host, once per `log_every_n_steps` updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StatsReport:
    """What `UpdateStats.read` returns: the means of the taken updates since the last read, the
    counts, and for the last skipped update which metrics and gradients were not finite."""

    means: dict[str, float]
    updates: int  # updates since the last read, taken or skipped
    skipped: int  # skipped since the last read
    skipped_total: int
    consecutive: int  # skipped in a row up to the last update
    bad_metrics: list[str]
    bad_gradients: list[int]  # indices into the gradient list of `add`


class UpdateStats:
    """Running device sums of the metrics of taken updates, and device counters of skipped ones.
    `skipped_total` is the count before this process (a resumed run's)."""

    def __init__(self, skipped_total: int = 0):
        self.names: list[str] | None = None
        self.skipped_total = skipped_total
        self.sums: torch.Tensor | None = None  # None: no update since the last read
        self.consecutive: torch.Tensor | None = None  # skipped in a row; kept across reads

    def add(self, metrics: dict[str, torch.Tensor], taken: torch.Tensor, grad_finite: torch.Tensor) -> None:
        """One update: its scalar metrics, whether it was taken (0-d bool) and, per gradient
        tensor, whether it was finite. Device ops only."""
        names = list(metrics)
        if self.names is not None and names != self.names:
            raise ValueError(f"update metrics changed from {self.names} to {names}")
        self.names = names
        values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()])
        if self.sums is None:
            self.sums, self.count, self.updates, self.skipped = (values.new_zeros(s) for s in (values.shape, (), (), ()))
            self.bad_metrics = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
            self.bad_gradients = torch.zeros(grad_finite.shape, dtype=torch.bool, device=values.device)
        if self.consecutive is None:
            self.consecutive = values.new_zeros(())
        self.sums += torch.where(taken, values, 0.0)
        self.count += taken.float()
        self.updates += 1.0
        self.skipped += (~taken).float()
        self.consecutive = torch.where(taken, 0.0, self.consecutive + 1.0)
        self.bad_metrics = torch.where(taken, self.bad_metrics, ~values.isfinite())
        self.bad_gradients = torch.where(taken, self.bad_gradients, ~grad_finite)

    def skipped_so_far(self) -> int:
        """All skipped updates, including those not read yet (a host sync: for checkpoints)."""
        return self.skipped_total + (int(self.skipped.item()) if self.sums is not None else 0)

    def read(self) -> StatsReport | None:
        """Everything since the last read, in one transfer to the host; None before any update."""
        if self.sums is None:
            return None
        n = len(self.names)
        packed = torch.cat([
            self.sums, torch.stack([self.count, self.updates, self.skipped, self.consecutive]),
            self.bad_metrics.float(), self.bad_gradients.float(),
        ]).tolist()  # the one host sync of a log interval
        sums, (count, updates, skipped, consecutive) = packed[:n], packed[n : n + 4]
        bad_metrics, bad_gradients = packed[n + 4 : 2 * n + 4], packed[2 * n + 4 :]
        self.skipped_total += int(skipped)
        self.sums = None
        return StatsReport(
            {k: v / count for k, v in zip(self.names, sums)} if count else {},
            int(updates), int(skipped), self.skipped_total, int(consecutive),
            [k for k, bad in zip(self.names, bad_metrics) if bad], [i for i, bad in enumerate(bad_gradients) if bad],
        )
