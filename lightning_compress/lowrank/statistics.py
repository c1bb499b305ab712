"""What a factorised layer observes of the data it sees while training, for activation-aware rank reduction.

Two sums, each over the rows the layer processed (a Linear's input vectors; a convolution's input patches):

- ``inputs``: the input second-moment matrix ``sum x x^T`` (``[n, n]``), gathered during the calibration window
  before ``start_step``, from which the factors are rebased on the data-whitened SVD;
- ``hidden``: the energy ``sum h_i^2`` of each hidden component ``h = first @ x`` (``[rank]``), gathered while the
  rank falls, from which each component's contribution to the outputs is judged.

The layer adds to a local sum in its forward pass (training mode only); :func:`sync` adds every
rank's local sums into the total (one all-reduce), so that every rank holds the same totals after each batch and a
checkpoint written by rank zero holds what all ranks saw. Totals are float32, so a resumed run adds exactly what an
uninterrupted one adds.
"""

from __future__ import annotations

from typing import Literal

import torch

Kind = Literal["inputs", "hidden"]


class LayerStatistics:
    """Running sums of one kind for one layer, in float64: ``total`` (every rank, synced) and ``rows`` seen.

    ``features`` is the row width: the layer's input size (``inputs``) or its rank (``hidden``).
    """

    def __init__(self, kind: Kind, features: int) -> None:
        self.kind: Kind = kind
        self.features = features
        self.total: torch.Tensor | None = None
        self.rows = 0
        self._local: torch.Tensor | None = None
        self._local_rows = 0

    def add(self, rows: torch.Tensor) -> None:
        """Add a ``[count, features]`` block of inputs (kind ``inputs``) or hidden activations (``hidden``)."""
        rows = rows.detach().float()
        part = (rows.T @ rows if self.kind == "inputs" else rows.square().sum(0)).double()
        self._local = part if self._local is None else self._local + part
        self._local_rows += rows.shape[0]

    def _local_or_zeros(self) -> torch.Tensor:
        if self._local is not None:
            return self._local
        return self._zeros()

    def _add_synced(self, local: torch.Tensor, rows: int) -> None:
        self.total = local.clone() if self.total is None else self.total.to(local.device) + local
        self.rows += rows
        self._local, self._local_rows = None, 0

    def _zeros(self) -> torch.Tensor:
        """This rank saw no row since the last sync: it adds zeros of the shape every rank agrees on."""
        shape = (self.features, self.features) if self.kind == "inputs" else (self.features,)
        device = self.total.device if self.total is not None else None
        return torch.zeros(shape, dtype=torch.float64, device=device)

    def mean(self) -> torch.Tensor:
        """The per-row average of the synced sums."""
        if self.total is None or self.rows == 0:
            raise RuntimeError(f"no {self.kind} statistics were gathered (no training batch passed through the layer)")
        return self.total / self.rows

    def state_dict(self) -> dict[str, object]:
        total = None if self.total is None else self.total.cpu()
        return {"kind": self.kind, "features": self.features, "total": total, "rows": self.rows}

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> LayerStatistics:
        out = cls(state["kind"], int(state["features"]))  # type: ignore[arg-type]
        total = state["total"]
        out.total = None if total is None else torch.as_tensor(total).double()  # older checkpoints: float32
        out.rows = int(state["rows"])  # type: ignore[arg-type]
        return out


def sync(statistics: list[LayerStatistics]) -> None:
    """Add every rank's local sums into each total: one all-reduce for all of ``statistics`` (collective in a process
    group: every rank must call it with the same layers in the same order).

    LowRankRefactoring calls it when the totals are read (the rebase at the window's end, a rank update) and when a
    checkpoint is written, not per batch: the sums are float64 (each batch's float32 products added exactly, in
    practice), so one all-reduce at the end gives the totals a per-batch one would, at a fraction of the traffic."""
    import torch.distributed as dist

    if not statistics:
        return
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        for stats in statistics:
            if stats._local is not None:
                stats._add_synced(stats._local, stats._local_rows)
        return
    locals_ = [stats._local_or_zeros() for stats in statistics]
    device = locals_[0].device
    if dist.get_backend() == "nccl" and device.type == "cpu":
        device = torch.device("cuda", torch.cuda.current_device())
    # float64 on the wire: a sum of float32 values rounds once, the same way on every rank; row counts stay exact
    flat = torch.cat(
        [t.to(device, torch.float64).flatten() for t in locals_]
        + [torch.tensor([float(s._local_rows) for s in statistics], dtype=torch.float64, device=device)]
    )
    dist.all_reduce(flat)
    sizes = [t.numel() for t in locals_] + [len(statistics)]
    *parts, rows = torch.split(flat, sizes)
    for stats, local, part, count in zip(statistics, locals_, parts, rows.tolist(), strict=True):
        stats._add_synced(part.view(local.shape).to(local.device), int(count))
