"""GradualPruning's masks under ZeRO-3: each rank keeps the mask of its own shard, and no rank gathers the model.

ZeRO-3 gives each rank one contiguous part of every flattened parameter (:func:`distributed.shard_range`; the last
part padded). A *shard mask* is the bool mask of that part (True = keep; the padding True). :func:`shard_masks`
computes exactly the shards of what :func:`patterns.compute_masks` computes on the gathered weights:

- ``unstructured``, either scope: nothing is gathered. Each rank scores its own shard, and the ``k`` lowest over
  all ranks are found by :func:`lowest_across_ranks`, a radix selection over the scores' float32 bit patterns:
  four rounds of 256-bin histograms, all-reduced for every ranked group of layers at once (a few KB a round).
- every other pattern: one layer gathered at a time. ``scope="layer"``: the pattern computes that layer's masks and
  each rank keeps its shard. ``scope="global"`` (N:M): a first pass keeps this rank's slice of every layer's unit
  scores (group costs: 1/M of the layer's elements, spread over the ranks), the same selection runs over the slices,
  and a second pass builds each layer's masks from the choice.

Ties at the threshold go to the earliest units in the order the layers are listed, as :func:`patterns.lowest` does
on the gathered weights. Counting them needs one more small all-gather, and, only where a weight stored transposed
(GPT-2's ``Conv1D``) holds some but not all of the tied units, an exchange of those units' positions.

Cost per mask update, per rank: the shard masks (1 byte a weight, over the ranks: a quarter of the rank's fp32
share), one layer gathered at a time (not for unstructured), the N:M slices above; communication of a few KB
(unstructured) or one gather of each layer (other patterns). A pattern that implements only ``masks()`` (no unit
methods) is computed on the gathered model with ``scope="global"``: correct, and as costly as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lightning_compress import distributed
from lightning_compress.pruning.patterns import Pattern, Scope, Unstructured
from lightning_compress.pruning.scoring import magnitude

_ROUNDS = (24, 16, 8, 0)  # the bit offsets of the four 8-bit digits of a 32-bit key, most significant first


def shard_masks(
    pattern: Pattern,
    scope: Scope,
    sparsity: float,
    params: Mapping[str, nn.Parameter],
    masks: Mapping[str, torch.Tensor],
    transposed: set[str],
) -> dict[str, torch.Tensor]:
    """This rank's shard masks of the weights ``params`` (ZeRO-3 partitioned, listed in ranking order) at
    ``sparsity``; ``masks`` are the current shard masks (kept pruned). ``transposed``: the names of weights stored
    ``(in, out)``, whose masks the pattern computes on their transpose. Collective: every rank, the same call."""
    if isinstance(pattern, Unstructured):
        return _unstructured(scope, sparsity, params, masks, transposed)
    layers = _Gathered(params, masks, transposed)
    if scope == "layer":
        return {name: layers.shard(name, pattern.masks("layer", sparsity, *layers.full(name))[name]) for name in params}
    if not pattern.has_units:
        return _whole_model(pattern, sparsity, layers)
    slices: dict[str, torch.Tensor] = {}
    totals: dict[str, int] = {}
    for name in params:
        weights, full_masks = layers.full(name)
        scores = pattern.unit_scores(weights[name], full_masks.get(name))
        slices[name], totals[name] = _own_slice(scores, layers.group), scores.numel()
    count = round(pattern.unit_fraction(sparsity) * sum(totals.values()))
    chosen = lowest_across_ranks(slices, {name: 0 for name in slices}, [count], layers.group)
    result = {}
    for name in params:
        weights, full_masks = layers.full(name)
        units = _unslice(chosen[name], totals[name], layers.group)
        result[name] = layers.shard(name, pattern.masks_for_units(weights[name], full_masks.get(name), units))
    return result


def lowest_across_ranks(
    scores: Mapping[str, torch.Tensor],
    group_of: Mapping[str, int],
    counts: Sequence[int],
    process_group: object = None,
    tie_order: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Which of this rank's units are among the ``counts[g]`` lowest of ranked group ``g``, over every rank.

    ``scores[name]``: 1-D float scores (pruned units ``-1``, live ones ``>= 0``) of this rank's units of layer
    ``name``, in group ``group_of[name]``; it is read once a round, one layer at a time, so a mapping that computes
    it on access keeps one layer's scores in memory. A layer's units lie in rank order (rank 0's first), and the
    layers of a group in the order of ``group_of``: ties at a threshold go to the earliest, as
    :func:`patterns.lowest` chooses on the concatenation. ``tie_order[name]``, where given, is instead the position
    of each local unit within its layer. Collective: every rank, the same layers, groups and counts.
    """
    groups, device = len(counts), _comm_device(process_group)
    names = list(group_of)

    def keys(name: str) -> torch.Tensor:
        return _keys(scores[name].to(device))

    want = [int(c) for c in counts]  # the rank, 1-based, of the threshold among the keys still in the running
    prefix = [0] * groups  # the threshold's key, digit by digit from the most significant
    tied = [0] * groups
    everything = [False] * groups  # more asked for than there are: all of them
    active = [w > 0 for w in want]
    for shift in _ROUNDS:
        histogram = torch.zeros(groups, 256, dtype=torch.int64, device=device)
        for name in names:
            g = group_of[name]
            if active[g]:
                key = keys(name)
                if shift != _ROUNDS[0]:
                    key = key[(key >> (shift + 8)) == (prefix[g] >> (shift + 8))]
                histogram[g] += torch.bincount(_digit(key, shift), minlength=256)
        dist.all_reduce(histogram, group=process_group)
        cumulative = histogram.cpu().cumsum(dim=1)
        for g in range(groups):
            if not active[g]:
                continue
            if want[g] > int(cumulative[g, -1]):
                everything[g], active[g] = True, False
                continue
            digit = int(torch.searchsorted(cumulative[g], torch.tensor([want[g]]))[0])  # the first bin reaching it
            want[g] -= int(cumulative[g, digit - 1]) if digit else 0
            prefix[g] |= (digit - 128 if shift == _ROUNDS[0] else digit) << shift  # the top digit is signed
            tied[g] = int(cumulative[g, digit] - (cumulative[g, digit - 1] if digit else 0))
    partial = {g for g in range(groups) if active[g] and want[g] < tied[g]}
    chosen, ties = {}, {}
    for name in names:
        g, key = group_of[name], keys(name)
        if everything[g]:
            chosen[name] = torch.ones_like(key, dtype=torch.bool)
            continue
        chosen[name] = key < prefix[g] if active[g] else torch.zeros_like(key, dtype=torch.bool)
        if g in partial:
            ties[name] = torch.nonzero(key == prefix[g]).flatten()
        elif active[g]:
            chosen[name] |= key == prefix[g]
    if partial:
        _break_ties(ties, group_of, want, chosen, process_group, tie_order or {})
    return chosen


def _break_ties(
    ties: Mapping[str, torch.Tensor],
    group_of: Mapping[str, int],
    want: list[int],
    chosen: dict[str, torch.Tensor],
    process_group: object,
    tie_order: Mapping[str, torch.Tensor],
) -> None:
    """Add the earliest ``want[g]`` of the tied units ``ties`` (local indices, by layer) of each group to
    ``chosen``: the tie counts of every (layer, rank) travel in one all-gather."""
    names = list(ties)
    device = _comm_device(process_group)
    local = torch.tensor([ties[name].numel() for name in names], dtype=torch.int64, device=device)
    world, rank = dist.get_world_size(group=process_group), dist.get_rank(group=process_group)
    every = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(every, local, group=process_group)
    counts = torch.stack(every).cpu()  # (rank, layer)
    remaining = {group_of[name]: int(want[group_of[name]]) for name in names}
    for column, name in enumerate(names):
        g = group_of[name]
        layer_total = int(counts[:, column].sum())
        take = min(remaining[g], layer_total)
        remaining[g] -= take
        if take == layer_total:
            chosen[name][ties[name]] = True
        elif take and name in tie_order:  # this layer's units are not in rank order: compare positions
            positions = tie_order[name].to(device)[ties[name]].cpu()
            gathered: list[torch.Tensor | None] = [None] * world
            dist.all_gather_object(gathered, positions, group=process_group)
            cutoff = torch.sort(torch.cat(gathered)).values[take - 1]
            chosen[name][ties[name][(positions <= cutoff).to(device)]] = True
        elif take:
            before = int(counts[:rank, column].sum())
            mine = max(0, min(take - before, ties[name].numel()))
            chosen[name][ties[name][:mine]] = True


def _keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys in the scores' order: a float32's bit pattern read as an integer orders the non-negative floats
    as their values do, and every pruned unit (-1.0) falls below them all (one negative key)."""
    return (scores.detach().float() + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes +0.0 (they tie, being equal)


def _digit(key: torch.Tensor, shift: int) -> torch.Tensor:
    """The key's 8-bit digit at ``shift``, in [0, 256) and in the keys' order (the top digit is signed: offset)."""
    if shift == _ROUNDS[0]:
        return (key >> shift).add_(128)
    return (key >> shift) & 255


def _comm_device(process_group: object) -> torch.device:
    """Where the group's collectives take tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------ unstructured


def _unstructured(
    scope: Scope,
    sparsity: float,
    params: Mapping[str, nn.Parameter],
    masks: Mapping[str, torch.Tensor],
    transposed: set[str],
) -> dict[str, torch.Tensor]:
    """Each rank ranks its own shard's magnitudes, one layer at a time: nothing is gathered."""
    tie_order = {}
    for name in transposed & set(params):  # stored (in, out), ranked as (out, in): a unit's place in the layer
        start, count, _ = distributed.shard_range(params[name])
        rows, columns = distributed.full_shape(params[name])
        stored = torch.arange(start, start + count, dtype=torch.int64)
        tie_order[name] = (stored % columns) * rows + stored // columns
    numel = {name: param.ds_numel for name, param in params.items()}
    if scope == "layer":
        group_of = {name: g for g, name in enumerate(params)}
        counts = [round(sparsity * numel[name]) for name in params]
    else:
        group_of = {name: 0 for name in params}
        counts = [round(sparsity * sum(numel.values()))]
    group = next(iter(params.values())).ds_process_group
    chosen = lowest_across_ranks(_ShardScores(params, masks), group_of, counts, group, tie_order)
    result = {}
    for name, param in params.items():
        keep = torch.ones(param.ds_tensor.numel(), dtype=torch.bool, device=chosen[name].device)
        keep[: chosen[name].numel()] = ~chosen[name]
        result[name] = keep.to(param.ds_tensor.device)
    return result


class _ShardScores(Mapping[str, torch.Tensor]):
    """The magnitudes of this rank's shard of each weight (padding left out), computed when read."""

    def __init__(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]) -> None:
        self.params, self.masks = params, masks

    def __getitem__(self, name: str) -> torch.Tensor:
        _, count, _ = distributed.shard_range(self.params[name])
        current = self.masks.get(name)
        return magnitude(self.params[name].ds_tensor[:count], None if current is None else current[:count])

    def __iter__(self):  # noqa: ANN204
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


# ------------------------------------------------------------------------------------------------ layer by layer


class _Gathered:
    """One layer at a time, its full weight (gathered) and mask (all-gathered from the shards), as the pattern
    wants them: ``(out, in, ...)``."""

    def __init__(
        self, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor], transposed: set[str]
    ) -> None:
        self.params, self.masks, self.transposed = params, masks, transposed
        self.group = next(iter(params.values())).ds_process_group

    def full(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        param = self.params[name]
        with distributed.gathered([param]):
            weight = param.detach().clone()
        current = self.masks.get(name)
        masks = {} if current is None else {name: self._out_in(name, distributed.unshard(param, current))}
        return {name: self._out_in(name, weight)}, masks

    def shard(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        return distributed.shard_of(self.params[name], self._out_in(name, mask), pad=True)

    def _out_in(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t().contiguous() if name in self.transposed else tensor


def _whole_model(pattern: Pattern, sparsity: float, layers: _Gathered) -> dict[str, torch.Tensor]:
    """A pattern without unit methods, ranked globally: on the gathered model (every layer at once)."""
    weights, masks = {}, {}
    for name in layers.params:
        one_weight, one_mask = layers.full(name)
        weights.update(one_weight)
        masks.update(one_mask)
    full = pattern.masks("global", sparsity, weights, masks)
    return {name: layers.shard(name, full[name]) for name in layers.params}


def _own_slice(units: torch.Tensor, process_group: object) -> torch.Tensor:
    """This rank's contiguous slice of a layer's units (rank ``r`` holds ``[r * s, (r + 1) * s)``)."""
    world, rank = dist.get_world_size(group=process_group), dist.get_rank(group=process_group)
    size = -(-units.numel() // world)
    return units[rank * size : (rank + 1) * size].clone()


def _unslice(piece: torch.Tensor, total: int, process_group: object) -> torch.Tensor:
    """The whole layer's 1-D bool units from every rank's slice (all-gathered as bytes)."""
    world = dist.get_world_size(group=process_group)
    size = -(-total // world)
    padded = torch.zeros(size, dtype=torch.uint8, device=_comm_device(process_group))
    padded[: piece.numel()] = piece.to(padded.device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=process_group)
    return torch.cat(parts)[:total].to(torch.bool)
