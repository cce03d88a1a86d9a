"""Weighted mixtures of document sources as one random-access view (SFT tasks, pretraining datasets).

A mixture epoch holds `counts[p]` slots of part p, contiguous (the packer shuffles). Slot j of part p
in epoch e reads the part's document (e * counts[p] + j) mod size[p], so a down-sampled part moves
on through all its documents epoch after epoch and an up-sampled one repeats each about
counts / size times an epoch. Everything is arithmetic on the index: deterministic, resumable
(the packer's state is an index) and free of per-epoch bookkeeping.

The view is one mixture epoch long and a Grain dataset, not a plain source: Grain's slice, shuffle
and repeat hand an index past the end on with its epoch (`epoch * len + i`), where a source would
take it modulo its length. So each packing stream shuffles one epoch's slots, reshuffled every
epoch, and every slot of an epoch is drawn once, as in the plain pipeline. (It used to be a source
spanning 1,000 epochs, shuffled at once: within an epoch's worth of training a part's documents
were drawn nearly with replacement, 785 distinct of 1,250 draws.)
"""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import grain
import numpy as np


class Part(NamedTuple):
    """Documents `start` .. `start + size - 1` of `source` (random access by integer id)."""
    source: object
    start: int
    size: int


class MixedDocuments(grain.MapDataset):
    """Random access to a mixture: index -> a document of one part. With `part_key`, each document
    comes back as a dict with the part's number under that key (a transform that differs by part
    dispatches on it). One mixture epoch long; index `e * len + i` is slot i of epoch e."""

    def __init__(self, parts: Sequence[Part], counts: Sequence[int], part_key: str | None = None):
        super().__init__()
        if len(parts) != len(counts) or not parts:
            raise ValueError(f"{len(parts)} parts but {len(counts)} counts")
        if any(int(c) <= 0 for c in counts) or any(int(p.size) <= 0 for p in parts):
            raise ValueError(f"every part needs documents and a positive count: sizes "
                             f"{[int(p.size) for p in parts]}, counts {list(map(int, counts))}")
        self.parts = list(parts)
        self.starts = np.asarray([p.start for p in parts], np.int64)
        self.sizes = np.asarray([p.size for p in parts], np.int64)
        self.counts = np.asarray(counts, np.int64)
        self.bounds = np.cumsum(self.counts)
        self.per_epoch = int(self.bounds[-1])
        self.part_key = part_key

    def __len__(self) -> int:
        return self.per_epoch

    def __str__(self) -> str:
        return f"MixedDocuments({len(self.parts)} parts, {self.per_epoch} slots an epoch)"

    def locate(self, index: int) -> tuple[int, int]:
        """(part, document id in the part's source) of view index `index`."""
        epoch, slot = divmod(int(index), self.per_epoch)
        p = int(np.searchsorted(self.bounds, slot, side="right"))
        j = slot - (int(self.bounds[p - 1]) if p else 0)
        return p, int(self.starts[p] + (epoch * int(self.counts[p]) + j) % int(self.sizes[p]))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if int(index) < 0:
            raise IndexError(f"index {index} < 0")
        p, doc_id = self.locate(index)
        document = self.parts[p].source[doc_id]
        if self.part_key is None:
            return document
        return {**document, self.part_key: np.int32(p)}


def mixing_counts(sizes: Mapping[str, int], weights: Mapping[str, float] | None = None, *,
                  max_upsample: float = math.inf, min_downsample: float = 0.0) -> dict[str, int]:
    """Documents of each part per mixture epoch, an epoch holding as many slots as all parts'
    documents. A part's sampling rate is its requested share (weight / total weight; equal weights
    when none are given) over its natural share (its documents / all documents), clamped to
    [min_downsample, max_upsample] (the CM3Leon SFT recipe: 0.3 and 3; pretraining mixtures: no
    clamp, the shares are the weights). count = round(size * rate), >= 1. Parts with weight 0 or
    no documents get 0."""
    sizes = {k: int(v) for k, v in sizes.items()}
    weights = {k: 1.0 for k in sizes} if not weights else {k: float(weights.get(k, 0.0)) for k in sizes}
    if not all(0 <= w < math.inf for w in weights.values()):   # inf or NaN: no share can be computed
        raise ValueError(f"mixture weights must be >= 0 and finite, got {weights}")
    if not 0 <= min_downsample <= 1 <= max_upsample:
        raise ValueError(f"need 0 <= min_downsample <= 1 <= max_upsample, got {min_downsample}, {max_upsample}")
    live = {k for k in sizes if sizes[k] > 0 and weights[k] > 0}
    if not live:
        raise ValueError(f"no part has both documents and a positive weight: sizes {sizes}, weights {weights}")
    total_size = sum(sizes[k] for k in live)
    total_weight = sum(weights[k] for k in live)
    counts = {}
    for k in sizes:
        if k not in live:
            counts[k] = 0
            continue
        rate = (weights[k] / total_weight) / (sizes[k] / total_size)
        rate = min(max(rate, min_downsample), max_upsample)
        counts[k] = max(1, int(round(sizes[k] * rate)))
    return counts


def parse_weights(spec: str, names: Sequence[str] | None = None, what: str = "NAME") -> list[tuple[str, float]]:
    """"a=2,b=0.5" -> [("a", 2.0), ("b", 0.5)] in order ("" -> []); with `names`, each name must be
    one of them. A malformed item, an unknown name, a name given twice (as a dict, SFT's task weights
    kept the last weight and dropped the first silently) or a weight that is not a finite number >= 0
    is a ValueError naming it. The last "=" splits, so a name may hold one."""
    out = []
    for item in filter(None, (x.strip() for x in str(spec).split(","))):
        name, sep, value = item.rpartition("=")
        name = name.strip()
        if not sep or not name or (names is not None and name not in names):
            allowed = f" with {what} in {tuple(names)}" if names is not None else ""
            raise ValueError(f"bad weight {item!r}: expected {what}=WEIGHT{allowed}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"bad weight {item!r}: {value.strip()!r} is not a number") from None
        if not 0 <= weight < math.inf:   # inf (or "1e400") would make every share NaN in mixing_counts
            raise ValueError(f"bad weight {item!r}: weights must be >= 0 and finite")
        if name in (n for n, _ in out):
            raise ValueError(f"bad weight {item!r}: {name!r} is given a weight more than once; give each {what} one")
        out.append((name, weight))
    return out
