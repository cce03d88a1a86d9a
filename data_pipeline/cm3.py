"""CM3Leon per-example transforms: neighbour sampling, retrieval layout, CFG condition dropout and
CM3 causal masking. Pure numpy; every random choice comes from an explicit `np.random.Generator`
that the caller seeds per example, so an example is a pure function of (inputs, seed).

Composition (`example_for_training`), in this order:
  1. `sample_neighbours`: k of the stored candidates at random (paper: 3 of 4), kept in stored order.
  2. `condition_dropout`: with probability ~10% the query's caption becomes one `<mask>` (the null
     condition of classifier-free guidance); its neighbours are then dropped too (see below).
  3. `retrieval_augmented_sequence`: `<eos> neighbour_1 ... neighbour_k query <eos>`.
  4. `cm3_mask`: n ~ Poisson(lambda) spans, each replaced by `<mask:i>` in place and appended at the
     end as `<mask:i> span <eoss>`; spans never contain a protected special (`<break>`, `<eos>`,
     ...) nor cross from one document of the layout into the next.
The result is a document `{"tokens", "weights"}` for `data_pipeline.packing`, where `weights[j]`
is the loss weight of predicting `tokens[j]`: 0 exactly on sentinels, 1 elsewhere.

Decisions (reasons in WORKSPACE.md):
  * Span placement is uniform over all valid configurations of n non-overlapping spans: each
    maskable run (between protected tokens / document boundaries) of length L offers L + 1 span
    boundaries, a configuration is 2n distinct sorted boundaries paired (start, end) with each pair
    inside one run; a small exact DP over runs samples it. n is lowered to what fits (a short
    sequence may hold fewer spans); spans are never adjacent (boundaries are distinct).
  * The infills follow the trailing `<eos>`: `<eos> ... query' <eos> <mask:0> span <eoss> ...`.
  * Input may not contain sentinels or `<eoss>` (then `cm3_unmask` would be ambiguous): ValueError.
    Ingestion should reject captions whose text spells "<mask:i>" / "<eoss>".
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import numpy as np

from cm3leon_jax.vocab import BREAK_ID, EOS_ID, EOSS_ID, MASK_ID, PAD_ID, SENTINEL_OFFSET

DEFAULT_PROTECT = (PAD_ID, EOS_ID, BREAK_ID, EOSS_ID, MASK_ID)
NEIGHBOURS_CUT = "neighbours_cut"   # an example's key: sampled neighbours dropped to fit max_length
EOS_SEGMENT = -1  # segment id of the framing <eos> tokens in a retrieval layout


# ---------------------------------------------------------------------------------------- layout

class RetrievalLayout(NamedTuple):
    tokens: np.ndarray          # `<eos> n_1 ... n_k query <eos>`
    query_span: tuple[int, int]  # tokens[start:end] is the query document
    segments: np.ndarray        # int32 per token: i for neighbour i, k for the query, -1 for <eos>


def _as_tokens(x, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D token array, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer ids, got dtype {arr.dtype}")
    return arr


def retrieval_augmented_sequence(query_tokens, neighbour_token_lists: Sequence = (), eos_id: int = EOS_ID
                                 ) -> RetrievalLayout:
    """The CM3Leon training layout `<eos> neighbour_1 ... neighbour_k query <eos>`.

    Every document is already in `text <break> image <break>` layout; they are concatenated as is.
    The tokens keep the query's dtype (int32 from `Vocabulary.encode_document`).
    """
    query = _as_tokens(query_tokens, "query_tokens")
    if query.size == 0:
        raise ValueError("the query document is empty")
    dtype = query.dtype if query.dtype.kind in "iu" else np.dtype(np.int32)
    neighbours = [_as_tokens(n, f"neighbour {i}") for i, n in enumerate(neighbour_token_lists)]
    eos = np.asarray([eos_id], dtype)
    parts = [eos, *neighbours, query, eos]
    tokens = np.concatenate([p.astype(dtype, copy=False) for p in parts])
    k = len(neighbours)
    segments = np.concatenate([np.full(len(p), s, np.int32)
                               for p, s in zip(parts, [EOS_SEGMENT, *range(k), k, EOS_SEGMENT])])
    end = len(tokens) - 1
    return RetrievalLayout(tokens, (end - len(query), end), segments)


# ------------------------------------------------------------------------------------ neighbours

def sample_neighbours(candidates, k: int, rng: np.random.Generator, exclude: int | None = None) -> np.ndarray:
    """k distinct ids drawn uniformly at random from the valid stored candidates, in stored order.

    Negative entries (-1) are padding; repeated ids (a document retrieved both by text and by image)
    count once; `exclude` (the query's own id) is never chosen. Fewer than k come back when fewer
    are valid. The rng is only consumed when there is a choice to make.
    """
    cand = np.asarray(candidates)
    if cand.ndim != 1:
        raise ValueError(f"candidates must be 1-D, got shape {cand.shape}")
    if cand.size and cand.dtype.kind not in "iu":
        raise ValueError(f"candidates must be integer ids, got dtype {cand.dtype}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    # a row holds a handful of ids: plain Python is several times faster than numpy calls here
    skip = -1 if exclude is None else int(exclude)
    valid = list(dict.fromkeys(c for c in cand.tolist() if c >= 0 and c != skip))
    if len(valid) <= k:
        return np.asarray(valid, np.int64)
    chosen = rng.choice(len(valid), size=k, replace=False)
    return np.asarray(valid, np.int64)[np.sort(chosen)]


# ----------------------------------------------------------------------------- condition dropout

def caption_end(query_tokens, *, image_offset: int, break_id: int = BREAK_ID) -> int:
    """Length of the query's leading caption (text tokens before its first `<break>`), or 0 when the
    query does not start with `caption <break>` (image first, text only, or empty)."""
    q = np.asarray(query_tokens)
    breaks = np.flatnonzero(q == break_id)
    if breaks.size == 0 or breaks[0] == 0:
        return 0
    b = int(breaks[0])
    if (q[:b] >= image_offset).any():
        return 0  # the part before the first <break> is an image
    return b


def condition_dropout(query_tokens, rng: np.random.Generator, *, rate: float = 0.1, image_offset: int,
                      mask_id: int = MASK_ID, break_id: int = BREAK_ID) -> tuple[np.ndarray, bool]:
    """With probability `rate`, the query's caption is replaced by one `<mask>` (the null condition
    of classifier-free guidance): `caption <break> image <break>` -> `<mask> <break> image <break>`,
    the very prefix of the unconditional stream at inference. Returns (tokens, dropped).

    Exactly one uniform is drawn per call, whether or not the query has a caption, so the rest of
    the example's random stream does not depend on the query's layout. `image_offset` (the first
    image id) tells a caption from an image that happens to precede the first `<break>`.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"condition dropout rate must be in [0, 1], got {rate}")
    q = _as_tokens(query_tokens, "query_tokens")
    drop = rng.random() < rate
    end = caption_end(q, image_offset=image_offset, break_id=break_id)
    if not drop or end == 0:
        return q, False
    return np.concatenate([np.asarray([mask_id], q.dtype), q[end:]]), True


# ----------------------------------------------------------------------------------- CM3 masking

def draw_num_spans(rng: np.random.Generator, lam: float = 1.0, max_spans: int = 16, min_spans: int = 0) -> int:
    """n ~ Poisson(lam) clamped to [min_spans, max_spans] (paper: lam 1, [1, 16]; metaseq: [0, 511])."""
    if lam < 0 or not 0 <= min_spans <= max_spans:
        raise ValueError(f"need lam >= 0 and 0 <= min_spans <= max_spans, got {lam}, {min_spans}, {max_spans}")
    return int(min(max(int(rng.poisson(lam)), min_spans), max_spans))


def _check_sentinels(sentinels) -> tuple[int, int]:
    start, count = (int(v) for v in sentinels)
    if start < 0 or count < 0:
        raise ValueError(f"sentinels must be (first id, count) >= 0, got {sentinels}")
    return start, count


def maskable_runs(tokens, *, sentinels, protect=DEFAULT_PROTECT, break_id: int = BREAK_ID,
                  segment_ids=None) -> np.ndarray:
    """(R, 2) array of [start, end) runs of consecutive maskable positions: not protected, not
    `<break>` nor a sentinel, and (with `segment_ids`) all in one segment."""
    t = _as_tokens(tokens, "tokens")
    start, count = _check_sentinels(sentinels)
    table = _protected_table(start, count, (*protect, break_id))
    ok = ~table[np.minimum(t, len(table) - 1)]
    link = ok[:-1] & ok[1:]  # link[i]: token i + 1 continues the run of token i
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        if seg.shape != t.shape:
            raise ValueError(f"segment_ids shape {seg.shape} != tokens shape {t.shape}")
        link &= seg[1:] == seg[:-1]  # runs never cross from one document into the next
    begins = ok.copy()
    begins[1:] &= ~link
    ends = ok.copy()
    ends[:-1] &= ~link
    return np.stack([np.flatnonzero(begins), np.flatnonzero(ends) + 1], axis=1)


@functools.lru_cache(maxsize=16)
def _protected_table(start: int, count: int, protect: tuple[int, ...]) -> np.ndarray:
    """is_protected[id] (sentinels and `protect`); its last entry, False, stands for every id
    beyond (`maskable_runs` clamps ids onto it)."""
    ids = [int(p) for p in protect if int(p) >= 0]
    table = np.zeros(max([start + count, *ids]) + 2, bool)
    table[start:start + count] = True
    table[ids] = True
    return table


def sample_spans(runs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to n non-overlapping [start, end) spans inside the runs, uniform over all configurations.

    A run of length L holds j spans in C(L + 1, 2j) ways (2j distinct sorted boundaries, paired).
    The number of spans per run is drawn from the exact (big-integer) DP over runs, then the
    boundaries uniformly within each run. n is lowered to the most spans the runs can hold.
    Returns an (m, 2) int64 array sorted by position, m = min(n, capacity).
    """
    bounds = np.asarray(runs, np.int64).reshape(-1, 2).tolist()  # Python ints: a few runs, many small steps
    lengths = [e - s for s, e in bounds]
    n = min(int(n), sum((length + 1) // 2 for length in lengths))
    if n <= 0:
        return np.zeros((0, 2), np.int64)
    # ways[r][m]: configurations of m spans in runs[:r]; comb(L + 1, 2j) per run.
    w = [[math.comb(length + 1, 2 * j) for j in range(min(n, (length + 1) // 2) + 1)] for length in lengths]
    ways = [[1] + [0] * n]
    for wr in w:
        prev = ways[-1]
        ways.append([sum(wr[j] * prev[m - j] for j in range(min(m, len(wr) - 1) + 1)) for m in range(n + 1)])
    per_run = [0] * len(lengths)
    m = n
    for r in range(len(lengths) - 1, -1, -1):
        if m == 0:
            break
        total = ways[r + 1][m]
        probs = [w[r][j] * ways[r][m - j] / total for j in range(min(m, len(w[r]) - 1) + 1)]
        u, j, acc = rng.random() * sum(probs), 0, probs[0]
        while j + 1 < len(probs) and (acc <= u or probs[j] == 0):  # never an impossible count
            j += 1
            acc += probs[j]
        per_run[r] = j
        m -= j
    spans = []
    for (s, _), length, j in zip(bounds, lengths, per_run):
        if j:
            cuts = np.sort(rng.choice(length + 1, size=2 * j, replace=False)).reshape(j, 2)
            spans.append(cuts + s)
    return np.concatenate(spans).astype(np.int64) if spans else np.zeros((0, 2), np.int64)


def apply_spans(tokens, spans, *, sentinels, eoss_id: int = EOSS_ID) -> tuple[np.ndarray, np.ndarray]:
    """Span i -> `<mask:i>` in place; `<mask:i> span <eoss>` appended per span in order.
    Weights (float32): 0 on every sentinel token, 1 elsewhere."""
    t = _as_tokens(tokens, "tokens")
    start, count = _check_sentinels(sentinels)
    spans = np.asarray(spans, np.int64).reshape(-1, 2)
    if len(spans) > count:
        raise ValueError(f"{len(spans)} spans but only {count} sentinels")
    if len(spans) and ((spans[:, 0] >= spans[:, 1]).any() or (spans[1:, 0] < spans[:-1, 1]).any()
                       or spans[0, 0] < 0 or spans[-1, 1] > len(t)):
        raise ValueError(f"spans must be non-empty, sorted, non-overlapping and inside the tokens: {spans.tolist()}")
    body, tail, prev = [], [], 0
    for i, (s, e) in enumerate(spans):
        sentinel = np.asarray([start + i], t.dtype)
        body += [t[prev:s], sentinel]
        tail += [sentinel, t[s:e], np.asarray([eoss_id], t.dtype)]
        prev = e
    body.append(t[prev:])
    out = np.concatenate(body + tail).astype(t.dtype, copy=False)
    weights = np.where((out >= start) & (out < start + count), 0.0, 1.0).astype(np.float32)
    return out, weights


def cm3_mask(tokens, rng: np.random.Generator, *, sentinels, break_id: int = BREAK_ID, eoss_id: int = EOSS_ID,
             max_spans: int = 16, min_spans: int = 0, lam: float = 1.0, protect=DEFAULT_PROTECT,
             segment_ids=None, num_spans: int | None = None,
             whole_run: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The CM3 causal-masked objective on one sequence; returns (tokens, weights).

    `sentinels` = (first sentinel id, count). n = `num_spans` if given, else Poisson(lam) clamped to
    [min_spans, max_spans]; lowered to what fits. Spans never contain `<break>`, a protected id
    (default `<pad> <eos> <break> <eoss> <mask>`) or a sentinel, and never cross a change of
    `segment_ids` (one document of a retrieval layout). n = 0 returns the tokens unchanged with
    all-ones weights. The input may contain neither sentinels nor `<eoss>` (ValueError).

    `whole_run=(start, end)`, one maskable run exactly (e.g. the query's caption), is always one of
    the spans (n is raised to at least 1); the other n - 1 are drawn from the remaining runs.
    """
    t = _as_tokens(tokens, "tokens")
    start, count = _check_sentinels(sentinels)
    if max_spans > count:
        raise ValueError(f"max_spans={max_spans} exceeds the {count} sentinels")
    bad = ((t >= start) & (t < start + count)) | (t == eoss_id)
    if bad.any():
        raise ValueError(f"tokens already contain a sentinel or <eoss> at position {int(np.argmax(bad))} "
                         f"(id {int(t[np.argmax(bad)])}); CM3 masking would be ambiguous")
    n = draw_num_spans(rng, lam, max_spans, min_spans) if num_spans is None else int(num_spans)
    if whole_run is not None:
        n = max(n, 1)
    if not 0 <= n <= count:
        raise ValueError(f"num_spans={n} outside [0, {count}]")
    if n == 0:
        return t.copy(), np.ones(len(t), np.float32)
    runs = maskable_runs(t, sentinels=(start, count), protect=protect, break_id=break_id, segment_ids=segment_ids)
    if whole_run is None:
        spans = sample_spans(runs, n, rng)
    else:
        fixed = np.asarray(whole_run, np.int64).reshape(1, 2)
        is_fixed = (runs == fixed).all(axis=1)
        if not is_fixed.any():
            raise ValueError(f"whole_run={tuple(whole_run)} is not one maskable run of the sequence; runs: "
                             f"{runs.tolist()}")
        spans = np.concatenate([sample_spans(runs[~is_fixed], n - 1, rng), fixed])
        spans = spans[np.argsort(spans[:, 0], kind="stable")]
    return apply_spans(t, spans, sentinels=(start, count), eoss_id=eoss_id)


def cm3_split(tokens, *, sentinels, eoss_id: int = EOSS_ID) -> tuple[np.ndarray, list[np.ndarray]]:
    """A CM3-masked sequence -> (body with its in-place sentinels, [infill of span i])."""
    t = _as_tokens(tokens, "tokens")
    start, count = _check_sentinels(sentinels)
    pos = np.flatnonzero((t >= start) & (t < start + count))
    if pos.size % 2:
        raise ValueError(f"odd number of sentinels ({pos.size}): not a CM3-masked sequence")
    n = pos.size // 2
    if n == 0:
        if (t == eoss_id).any():
            raise ValueError("<eoss> without any sentinel")
        return t.copy(), []
    expected = np.arange(start, start + n)
    if not (np.array_equal(t[pos[:n]], expected) and np.array_equal(t[pos[n:]], expected)):
        raise ValueError(f"sentinels out of order: {t[pos].tolist()}")
    body = t[:pos[n]]
    if (body == eoss_id).any():
        raise ValueError("<eoss> before the infills")
    infills = []
    for i in range(n):
        stop = pos[n + i + 1] if i + 1 < n else len(t)
        chunk = t[pos[n + i] + 1:stop]
        if chunk.size < 2 or chunk[-1] != eoss_id or (chunk[:-1] == eoss_id).any():
            raise ValueError(f"infill {i} is not `<mask:{i}> span <eoss>`")
        infills.append(chunk[:-1])
    return body, infills


def cm3_unmask(tokens, *, sentinels, eoss_id: int = EOSS_ID) -> np.ndarray:
    """Inverse of `cm3_mask`: each in-place `<mask:i>` replaced by its infill, the infills removed."""
    body, infills = cm3_split(tokens, sentinels=sentinels, eoss_id=eoss_id)
    if not infills:
        return body
    start = int(sentinels[0])
    pieces, prev = [], 0
    for i, p in enumerate(np.flatnonzero((body >= start) & (body < start + len(infills)))):
        pieces += [body[prev:p], infills[i]]
        prev = p + 1
    pieces.append(body[prev:])
    return np.concatenate(pieces).astype(body.dtype, copy=False)


# ------------------------------------------------------------------------------------ composition

@dataclasses.dataclass(frozen=True)
class CM3Config:
    """Per-example transform settings. `image_offset` is needed only for condition dropout."""
    retrieval: bool = True
    num_neighbours: int = 3                  # k sampled per example (paper: 3 of the 4 stored)
    condition_dropout_rate: float = 0.1      # 0 disables
    drop_neighbours_with_condition: bool = True
    cm3: bool = True
    cm3_lambda: float = 1.0
    min_spans: int = 0                       # paper clamps to [1, 16]; 0 keeps plain causal samples
    max_spans: int = 16
    # share of examples whose query caption is masked as one whole span (moved after the image):
    # Poisson spans with uniform boundaries almost never cover a whole caption, so without this
    # the model never learns to write one from an image (image -> text by infilling)
    caption_span_rate: float = 0.0
    max_length: int | None = None            # drop lowest-ranked neighbours, then spans, until the example fits
    num_sentinels: int = 16
    sentinel_start: int = SENTINEL_OFFSET
    image_offset: int | None = None
    eos_id: int = EOS_ID
    break_id: int = BREAK_ID
    eoss_id: int = EOSS_ID
    mask_id: int = MASK_ID
    protect: tuple[int, ...] = DEFAULT_PROTECT

    def __post_init__(self):
        if self.num_neighbours < 0:
            raise ValueError(f"num_neighbours must be >= 0, got {self.num_neighbours}")
        if not 0.0 <= self.condition_dropout_rate <= 1.0:
            raise ValueError(f"condition_dropout_rate must be in [0, 1], got {self.condition_dropout_rate}")
        if self.condition_dropout_rate > 0 and self.image_offset is None:
            raise ValueError("condition dropout needs image_offset (use CM3Config.from_vocab)")
        if self.cm3 and not 0 <= self.min_spans <= self.max_spans <= self.num_sentinels:
            raise ValueError(f"need 0 <= min_spans <= max_spans <= num_sentinels, got {self.min_spans}, "
                             f"{self.max_spans}, {self.num_sentinels}")
        if not 0 <= self.cm3_lambda < math.inf:   # NaN/inf passed, then failed in NumPy's Poisson at the first batch
            raise ValueError(f"cm3_lambda must be >= 0 and finite, got {self.cm3_lambda}")
        if not 0.0 <= self.caption_span_rate <= 1.0:
            raise ValueError(f"caption_span_rate must be in [0, 1], got {self.caption_span_rate}")
        if self.caption_span_rate > 0 and (not self.cm3 or self.image_offset is None):
            raise ValueError("caption_span_rate needs CM3 masking and image_offset (use CM3Config.from_vocab)")
        if self.caption_span_rate > 0 and self.max_spans < 1:
            raise ValueError(f"caption_span_rate={self.caption_span_rate} masks the caption as a span, but max_spans="
                             f"{self.max_spans} (num_sentinels={self.num_sentinels}) allows none")

    @classmethod
    def from_vocab(cls, vocab, **overrides) -> "CM3Config":
        overrides.setdefault("max_spans", min(cls.max_spans, vocab.num_sentinels))
        return cls(num_sentinels=vocab.num_sentinels, sentinel_start=SENTINEL_OFFSET,
                   image_offset=vocab.image_offset, eos_id=vocab.eos_id, break_id=vocab.break_id,
                   eoss_id=vocab.eoss_id, mask_id=vocab.mask_id, **overrides)

    @property
    def sentinels(self) -> tuple[int, int]:
        return (self.sentinel_start, self.num_sentinels)


def example_for_training(query_tokens, neighbour_token_lists: Sequence, rng: np.random.Generator,
                         config: CM3Config, *, presampled: bool = False) -> dict[str, np.ndarray]:
    """One training document: sample neighbours -> condition dropout -> layout -> CM3 masking.

    `neighbour_token_lists` are the stored candidates' documents (None for a padded slot), from
    which `config.num_neighbours` are sampled; with `presampled=True` they are the neighbours
    already chosen by `sample_neighbours` (so a loader fetches only those) and are used as given.
    Random draws, in order: neighbour choice, condition dropout, span count, whole-caption choice
    (only when `caption_span_rate` > 0), span placement.
    """
    cfg = config
    query = _as_tokens(query_tokens, "query_tokens")
    lists = list(neighbour_token_lists) if cfg.retrieval else []
    if presampled:
        if any(x is None for x in lists):
            raise ValueError("presampled neighbours may not contain None")
        neighbours = lists
    else:
        cand = np.asarray([i if x is not None else -1 for i, x in enumerate(lists)], np.int64)
        neighbours = [lists[i] for i in sample_neighbours(cand, cfg.num_neighbours, rng)]
    dropped = False
    if cfg.condition_dropout_rate > 0:
        query, dropped = condition_dropout(query, rng, rate=cfg.condition_dropout_rate,
                                           image_offset=cfg.image_offset, mask_id=cfg.mask_id,
                                           break_id=cfg.break_id)
        if dropped and cfg.drop_neighbours_with_condition:
            neighbours = []
    n = draw_num_spans(rng, cfg.cm3_lambda, cfg.max_spans, cfg.min_spans) if cfg.cm3 else 0
    caption_len = 0
    if cfg.caption_span_rate > 0 and rng.random() < cfg.caption_span_rate and not dropped:
        caption_len = caption_end(query, image_offset=cfg.image_offset, break_id=cfg.break_id)
        n = max(n, 1) if caption_len else n
    sampled = len(neighbours)
    if cfg.max_length is not None:
        extra = 3 * n  # each span adds one in-place sentinel, an opening sentinel and <eoss>
        while neighbours and 2 + len(query) + sum(len(x) for x in neighbours) + extra > cfg.max_length:
            neighbours = neighbours[:-1]
        # a query that fits only with fewer spans draws fewer (it was skipped whole by the packer);
        # one too long even unmasked is left for the packer to skip and count
        room = cfg.max_length - 2 - len(query) - sum(len(x) for x in neighbours)
        if 0 <= room < extra:
            n = room // 3
            caption_len = caption_len if n else 0
    # counted by the packer (`neighbours_cut`): a seq_len too short for the documents turns retrieval off
    cut = np.int32(sampled - len(neighbours))
    layout = retrieval_augmented_sequence(query, neighbours, cfg.eos_id)
    if not cfg.cm3:
        return {"tokens": layout.tokens, "weights": np.ones(len(layout.tokens), np.float32), NEIGHBOURS_CUT: cut}
    start = layout.query_span[0]
    tokens, weights = cm3_mask(layout.tokens, rng, sentinels=cfg.sentinels, break_id=cfg.break_id,
                               eoss_id=cfg.eoss_id, max_spans=cfg.max_spans, protect=cfg.protect,
                               segment_ids=layout.segments, num_spans=n,
                               whole_run=(start, start + caption_len) if caption_len else None)
    return {"tokens": tokens, "weights": weights, NEIGHBOURS_CUT: cut}


__all__ = [
    "CM3Config", "DEFAULT_PROTECT", "EOS_SEGMENT", "NEIGHBOURS_CUT", "RetrievalLayout", "apply_spans", "caption_end", "cm3_mask",
    "cm3_split", "cm3_unmask", "condition_dropout", "draw_num_spans", "example_for_training", "maskable_runs",
    "retrieval_augmented_sequence", "sample_neighbours", "sample_spans",
]
