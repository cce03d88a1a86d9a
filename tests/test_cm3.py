"""CM3Leon per-example transforms: retrieval layout, neighbour sampling, condition dropout, CM3 masking."""
import dataclasses
import itertools

import numpy as np
import pytest

from data_pipeline import cm3

# A fake id layout shaped like cm3leon_jax.vocab: 5 specials, 16 sentinels, text, then image codes.
PAD, EOS, BREAK, EOSS, MASK = 0, 1, 2, 3, 4
SENT0, NSENT = 5, 16
TEXT0, NTEXT = 21, 100
IMG0, NIMG = TEXT0 + NTEXT, 200
N_IMG_TOK = 16
SENTINELS = (SENT0, NSENT)
CFG = cm3.CM3Config(image_offset=IMG0, num_sentinels=NSENT)


def rng(seed):
    return np.random.default_rng(seed)


def text(r, lo=1, hi=12):
    return r.integers(TEXT0, TEXT0 + NTEXT, r.integers(lo, hi + 1))


def image(r):
    return r.integers(IMG0, IMG0 + NIMG, N_IMG_TOK)


def encode(parts):
    """The vocab layout rule: image = codes <break>, preceded by <break> after text."""
    out, prev = [], None
    for kind, toks in parts:
        if kind == "image":
            if prev == "text":
                out.append([BREAK])
            out += [toks, [BREAK]]
        else:
            assert prev != "text"
            out.append(toks)
        prev = kind
    return np.concatenate(out).astype(np.int32)


def caption_image(r):
    return encode([("text", text(r)), ("image", image(r))])


def random_document(r):
    """1-4 parts, text and images in any order (never two texts in a row)."""
    parts, prev = [], None
    for _ in range(r.integers(1, 5)):
        kind = "image" if prev == "text" or r.random() < 0.5 else "text"
        parts.append((kind, image(r) if kind == "image" else text(r)))
        prev = kind
    return encode(parts)


def is_sentinel(t):
    t = np.asarray(t)
    return (t >= SENT0) & (t < SENT0 + NSENT)


def recovered_spans(masked):
    """Original [start, end) of each span, reconstructed from the masked sequence alone."""
    body, infills = cm3.cm3_split(masked, sentinels=SENTINELS)
    spans, shift = [], 0
    for i, p in enumerate(np.flatnonzero(is_sentinel(body))):
        start = p + shift
        spans.append((int(start), int(start + len(infills[i]))))
        shift += len(infills[i]) - 1
    return spans, infills


def check_masked(original, masked, weights, segments=None, protect=(PAD, EOS, BREAK, EOSS, MASK)):
    """Every invariant of one CM3-masked sequence; returns the number of spans."""
    assert masked.dtype == original.dtype and weights.dtype == np.float32 and weights.shape == masked.shape
    np.testing.assert_array_equal(cm3.cm3_unmask(masked, sentinels=SENTINELS), original)
    np.testing.assert_array_equal(weights, np.where(is_sentinel(masked), 0.0, 1.0))
    spans, infills = recovered_spans(masked)
    n = len(spans)
    assert len(masked) == len(original) + 3 * n
    assert is_sentinel(masked).sum() == 2 * n and (masked == EOSS).sum() == n
    tail = masked[len(masked) - sum(len(f) + 2 for f in infills):]
    expected_tail = [[SENT0 + i, *f, EOSS] for i, f in enumerate(infills)]
    assert tail.tolist() == [x for chunk in expected_tail for x in chunk]
    for i, (s, e) in enumerate(spans):
        assert e > s
        np.testing.assert_array_equal(original[s:e], infills[i])  # span reappears after its sentinel
        assert not np.isin(original[s:e], protect).any()  # never crosses <break>/<eos>/...
        if segments is not None:
            assert len(set(segments[s:e].tolist())) == 1  # never crosses into another document
        if i:  # sorted, non-overlapping; adjacent only across a document boundary
            prev_end = spans[i - 1][1]
            assert s > prev_end or (s == prev_end and segments is not None and segments[s] != segments[s - 1])
    return n


# ---------------------------------------------------------------------------------------- layout

def test_layout_puts_documents_in_order_with_segments():
    r = rng(0)
    nbrs = [caption_image(r) for _ in range(3)]
    query = caption_image(r)
    lay = cm3.retrieval_augmented_sequence(query, nbrs, EOS)
    expected = np.concatenate([[EOS], *nbrs, query, [EOS]])
    np.testing.assert_array_equal(lay.tokens, expected)
    assert lay.tokens.dtype == np.int32
    s, e = lay.query_span
    np.testing.assert_array_equal(lay.tokens[s:e], query)
    assert e == len(expected) - 1
    seg = lay.segments
    assert seg[0] == seg[-1] == cm3.EOS_SEGMENT and (seg[s:e] == 3).all()
    offset = 1
    for i, n in enumerate(nbrs):
        assert (seg[offset:offset + len(n)] == i).all()
        np.testing.assert_array_equal(lay.tokens[offset:offset + len(n)], n)
        offset += len(n)
    empty = cm3.retrieval_augmented_sequence(query, [], EOS)
    np.testing.assert_array_equal(empty.tokens, np.r_[EOS, query, EOS])
    with pytest.raises(ValueError):
        cm3.retrieval_augmented_sequence(np.zeros(0, np.int32), nbrs)


# ------------------------------------------------------------------------------------ neighbours

def test_sample_neighbours_valid_distinct_excludes_query():
    cands = np.array([7, -1, 3, 9, 7, 12, -1, 42])  # 7 twice (retrieved by text and by image), 42 = query
    counts = dict.fromkeys([7, 3, 9, 12], 0)
    for seed in range(2000):
        got = cm3.sample_neighbours(cands, 3, rng(seed), exclude=42)
        assert len(got) == 3 and len(set(got.tolist())) == 3
        assert -1 not in got and 42 not in got
        order = [7, 3, 9, 12]
        assert sorted(got.tolist(), key=order.index) == got.tolist()  # stored (rank) order kept
        for g in got:
            counts[int(g)] += 1
    for c in counts.values():  # each of the 4 distinct valid ones is chosen 3/4 of the time
        assert abs(c / 2000 - 0.75) < 0.05
    assert 42 in cm3.sample_neighbours(np.array([42]), 3, rng(0))  # only excluded when asked
    np.testing.assert_array_equal(cm3.sample_neighbours(np.array([-1, 5, -1, 42]), 3, rng(0), exclude=42), [5])
    assert cm3.sample_neighbours(np.array([-1, -1]), 3, rng(0)).size == 0
    assert cm3.sample_neighbours(cands, 0, rng(0)).size == 0
    np.testing.assert_array_equal(cm3.sample_neighbours(cands, 3, rng(5), exclude=42),
                                  cm3.sample_neighbours(cands, 3, rng(5), exclude=42))


# ----------------------------------------------------------------------------- condition dropout

def test_condition_dropout_replaces_exactly_the_caption_at_the_rate():
    r = rng(1)
    caption = text(r, 3, 8)
    img = image(r)
    query = encode([("text", caption), ("image", img), ("text", text(r))])
    dropped = 0
    for seed in range(4000):
        out, was = cm3.condition_dropout(query, rng(seed), rate=0.1, image_offset=IMG0)
        if was:
            dropped += 1
            np.testing.assert_array_equal(out, np.r_[MASK, BREAK, img, BREAK, query[len(caption) + 2 + N_IMG_TOK:]])
            assert out.dtype == query.dtype
        else:
            np.testing.assert_array_equal(out, query)
    assert abs(dropped / 4000 - 0.1) < 0.02
    # No caption to drop: image-first and text-only queries are never changed.
    image_first = encode([("image", img), ("text", caption)])
    text_only = encode([("text", caption)])
    for q in (image_first, text_only):
        out, was = cm3.condition_dropout(q, rng(0), rate=1.0, image_offset=IMG0)
        assert not was
        np.testing.assert_array_equal(out, q)
    out, was = cm3.condition_dropout(query, rng(0), rate=1.0, image_offset=IMG0)
    assert was and out[0] == MASK and out[1] == BREAK
    assert not cm3.condition_dropout(query, rng(0), rate=0.0, image_offset=IMG0)[1]


# ----------------------------------------------------------------------------------- CM3 masking

def test_cm3_mask_invariants_over_random_multimodal_sequences():
    total_spans = 0
    for seed in range(300):
        r = rng(seed)
        nbrs = [random_document(r) for _ in range(r.integers(0, 4))]
        lay = cm3.retrieval_augmented_sequence(random_document(r), nbrs, EOS)
        n_req = int(r.integers(0, NSENT + 1))
        masked, weights = cm3.cm3_mask(lay.tokens, rng(seed + 10_000), sentinels=SENTINELS,
                                       segment_ids=lay.segments, num_spans=n_req)
        n = check_masked(lay.tokens, masked, weights, lay.segments)
        runs = cm3.maskable_runs(lay.tokens, sentinels=SENTINELS, segment_ids=lay.segments)
        capacity = sum((e - s + 1) // 2 for s, e in runs)
        assert n == min(n_req, capacity)  # as many spans as asked, unless they do not fit
        total_spans += n
        # Poisson-drawn count path too.
        masked, weights = cm3.cm3_mask(lay.tokens, rng(seed), sentinels=SENTINELS, lam=2.0)
        check_masked(lay.tokens, masked, weights)
    assert total_spans > 1000


def test_paper_example_layout():
    # "Image of a chameleon: [image]" -> "Image of <mask:0>: [image] <mask:0> a chameleon <eoss>"
    tokens = np.array([30, 31, 32, 33, 34, BREAK, 200, 201, BREAK], np.int32)  # Image of a chameleon :
    masked, weights = cm3.apply_spans(tokens, [[2, 4]], sentinels=SENTINELS)
    assert masked.tolist() == [30, 31, SENT0, 34, BREAK, 200, 201, BREAK, SENT0, 32, 33, EOSS]
    assert weights.tolist() == [1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1]


def test_zero_spans_leaves_the_sequence_causal():
    r = rng(3)
    lay = cm3.retrieval_augmented_sequence(caption_image(r), [caption_image(r)], EOS)
    for kwargs in ({"num_spans": 0}, {"lam": 0.0}, {"max_spans": 0}):
        masked, weights = cm3.cm3_mask(lay.tokens, rng(0), sentinels=SENTINELS, **kwargs)
        np.testing.assert_array_equal(masked, lay.tokens)
        assert masked is not lay.tokens and weights.dtype == np.float32 and (weights == 1).all()
    np.testing.assert_array_equal(cm3.cm3_unmask(lay.tokens, sentinels=SENTINELS), lay.tokens)


def test_span_count_is_clamped_poisson():
    r = rng(4)
    long_doc = cm3.retrieval_augmented_sequence(caption_image(r), [caption_image(r) for _ in range(3)], EOS).tokens
    counts = []
    for seed in range(3000):
        masked, _ = cm3.cm3_mask(long_doc, rng(seed), sentinels=SENTINELS, lam=1.0)
        counts.append(int(is_sentinel(masked).sum()) // 2)
    counts = np.array(counts)
    assert abs(counts.mean() - 1.0) < 0.08
    assert abs((counts == 0).mean() - np.exp(-1)) < 0.04
    assert abs((counts == 2).mean() - np.exp(-1) / 2) < 0.04
    for seed in range(50):
        masked, _ = cm3.cm3_mask(long_doc, rng(seed), sentinels=SENTINELS, lam=50.0, max_spans=4)
        assert is_sentinel(masked).sum() == 8
        masked, _ = cm3.cm3_mask(long_doc, rng(seed), sentinels=SENTINELS, lam=1e-9, min_spans=1)
        assert is_sentinel(masked).sum() == 2
    with pytest.raises(ValueError):
        cm3.cm3_mask(long_doc, rng(0), sentinels=(SENT0, 4), max_spans=16)


def test_span_placement_is_uniform_over_configurations():
    # Runs of length 1 and 3: one span -> 1 + C(4, 2) = 7 configurations; two spans -> 1 * 6 + C(4, 4) = 7.
    runs = np.array([[0, 1], [5, 8]])
    for n in (1, 2):
        seen = {}
        for seed in range(7000):
            key = tuple(map(tuple, cm3.sample_spans(runs, n, rng(seed)).tolist()))
            assert len(key) == n
            seen[key] = seen.get(key, 0) + 1
        assert len(seen) == 7
        for c in seen.values():
            assert abs(c / 7000 - 1 / 7) < 0.02
    assert len(cm3.sample_spans(runs, 16, rng(0))) == 3  # lowered to capacity: 1 + 2


def test_spans_never_cross_documents_or_protected_ids():
    # Text-only documents touch with no <break> between them; only segments keep spans apart.
    docs = [np.arange(TEXT0 + 10 * i, TEXT0 + 10 * i + 4, dtype=np.int32) for i in range(4)]
    lay = cm3.retrieval_augmented_sequence(docs[3], docs[:3], EOS)
    for seed in range(300):
        masked, weights = cm3.cm3_mask(lay.tokens, rng(seed), sentinels=SENTINELS, segment_ids=lay.segments,
                                       num_spans=int(rng(seed).integers(1, 9)))
        check_masked(lay.tokens, masked, weights, lay.segments)
    # A protected id (here <mask>, the null condition) is never inside a span.
    tokens = np.r_[EOS, MASK, BREAK, image(rng(0)), BREAK, EOS].astype(np.int32)
    for seed in range(100):
        masked, weights = cm3.cm3_mask(tokens, rng(seed), sentinels=SENTINELS, num_spans=3)
        assert check_masked(tokens, masked, weights) == 3
        assert masked[1] == MASK


def test_cm3_rejects_ambiguous_input_and_malformed_masks():
    with pytest.raises(ValueError, match="sentinel"):
        cm3.cm3_mask(np.array([EOS, TEXT0, SENT0 + 2, EOS], np.int32), rng(0), sentinels=SENTINELS)
    with pytest.raises(ValueError):
        cm3.cm3_mask(np.array([EOS, TEXT0, EOSS, EOS], np.int32), rng(0), sentinels=SENTINELS)
    for bad in ([TEXT0, SENT0, EOS],                              # sentinel without infill
                [TEXT0, SENT0, EOS, SENT0, TEXT0],                # infill without <eoss>
                [TEXT0, SENT0 + 1, EOS, SENT0 + 1, TEXT0, EOSS],  # numbering must start at 0
                [TEXT0, SENT0, EOS, SENT0, EOSS]):                # empty infill
        with pytest.raises(ValueError):
            cm3.cm3_unmask(np.array(bad, np.int32), sentinels=SENTINELS)


# ------------------------------------------------------------------------------------ composition

def _which_neighbours(unmasked, query_variants, candidates):
    """Index tuples of candidate subsets (stored order) that, with a query variant, form `unmasked`."""
    hits = []
    for size in range(len(candidates) + 1):
        for idx in itertools.combinations(range(len(candidates)), size):
            for q in query_variants:
                lay = cm3.retrieval_augmented_sequence(q, [candidates[i] for i in idx], EOS).tokens
                if np.array_equal(lay, unmasked):
                    hits.append((idx, q is not query_variants[0]))
    return hits


def test_example_for_training_composes_all_steps():
    r = rng(7)
    query = caption_image(r)
    cands = [caption_image(r) for _ in range(4)]
    cands_padded = [cands[0], None, cands[1], cands[2], None, cands[3]]
    caption_len = int(np.argmax(query == BREAK))
    dropped_query = np.r_[MASK, query[caption_len:]].astype(np.int32)
    n_dropped, chosen_counts = 0, np.zeros(4)
    for seed in range(400):
        ex = cm3.example_for_training(query, cands_padded, rng(seed), CFG)
        assert set(ex) == {"tokens", "weights", cm3.NEIGHBOURS_CUT} and ex[cm3.NEIGHBOURS_CUT] == 0   # no budget
        check_masked(cm3.cm3_unmask(ex["tokens"], sentinels=SENTINELS), ex["tokens"], ex["weights"])
        hits = _which_neighbours(cm3.cm3_unmask(ex["tokens"], sentinels=SENTINELS), [query, dropped_query], cands)
        assert len(hits) == 1
        idx, was_dropped = hits[0]
        if was_dropped:
            n_dropped += 1
            assert idx == ()  # the null condition comes without neighbours
        else:
            assert len(idx) == 3
            chosen_counts[list(idx)] += 1
        again = cm3.example_for_training(query, cands_padded, rng(seed), CFG)
        for key in ex:
            np.testing.assert_array_equal(ex[key], again[key])
    assert 15 <= n_dropped <= 70  # ~10% of 400
    assert (abs(chosen_counts / (400 - n_dropped) - 0.75) < 0.1).all()
    outs = {cm3.example_for_training(query, cands, rng(s), CFG)["tokens"].tobytes() for s in range(20)}
    assert len(outs) > 5  # different seeds, different examples


def test_whole_run_is_always_one_span_and_the_rest_are_drawn_elsewhere():
    r = rng(11)
    seq = encode([("text", text(r, 6, 9)), ("image", image(r)), ("text", text(r, 4, 8))])
    caption = (0, int(np.argmax(seq == BREAK)))
    lengths = []
    for seed in range(60):
        masked, weights = cm3.cm3_mask(seq, rng(seed), sentinels=SENTINELS, whole_run=caption)
        n = check_masked(seq, masked, weights)
        spans, _ = recovered_spans(masked)
        assert caption in spans and sum(s < caption[1] for s, _ in spans) == 1  # nothing else in the caption
        lengths.append(n)
    assert min(lengths) == 1 and max(lengths) >= 3  # n raised to >= 1; Poisson extras land elsewhere
    masked, _ = cm3.cm3_mask(seq, rng(0), sentinels=SENTINELS, whole_run=caption, num_spans=0)
    assert recovered_spans(masked)[0] == [caption]
    with pytest.raises(ValueError, match="not one maskable run"):
        cm3.cm3_mask(seq, rng(0), sentinels=SENTINELS, whole_run=(0, caption[1] - 1))


def test_caption_span_rate_masks_the_whole_query_caption():
    r = rng(12)
    query = caption_image(r)
    cands = [caption_image(r) for _ in range(3)]
    caption = query[:int(np.argmax(query == BREAK))]
    config = cm3.CM3Config(image_offset=IMG0, num_sentinels=NSENT, caption_span_rate=0.3, num_neighbours=2)
    whole, dropped = 0, 0
    for seed in range(300):
        ex = cm3.example_for_training(query, cands, rng(seed), config)
        unmasked = cm3.cm3_unmask(ex["tokens"], sentinels=SENTINELS)
        if unmasked[1] == MASK:  # condition dropout: no caption left to mask
            dropped += 1
            continue
        check_masked(unmasked, ex["tokens"], ex["weights"])
        _, infills = cm3.cm3_split(ex["tokens"], sentinels=SENTINELS)
        whole += any(np.array_equal(f, caption) for f in infills)
    # ~30% by the switch, plus the rare Poisson span that happens to cover it
    assert 0.2 < whole / (300 - dropped) < 0.42
    # Every example with a caption, at rate 1; none when the condition is dropped.
    always = cm3.CM3Config(image_offset=IMG0, num_sentinels=NSENT, caption_span_rate=1.0, condition_dropout_rate=0.0)
    for seed in range(20):
        infills = cm3.cm3_split(cm3.example_for_training(query, cands, rng(seed), always)["tokens"],
                                sentinels=SENTINELS)[1]
        assert any(np.array_equal(f, caption) for f in infills)
    no_caption = cm3.CM3Config(image_offset=IMG0, num_sentinels=NSENT, caption_span_rate=1.0,
                               condition_dropout_rate=1.0)
    ex = cm3.example_for_training(query, cands, rng(0), no_caption)
    assert cm3.cm3_unmask(ex["tokens"], sentinels=SENTINELS)[1] == MASK
    with pytest.raises(ValueError, match="caption_span_rate"):
        cm3.CM3Config(image_offset=IMG0, caption_span_rate=1.5)
    with pytest.raises(ValueError, match="caption_span_rate needs CM3"):
        cm3.CM3Config(image_offset=IMG0, caption_span_rate=0.5, cm3=False)
    with pytest.raises(ValueError, match="allows none"):   # no sentinel to mask the caption with
        cm3.CM3Config(image_offset=IMG0, num_sentinels=0, max_spans=0, caption_span_rate=0.5)


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), -1.0])
def test_a_nan_or_infinite_cm3_lambda_is_refused_at_configuration(lam):
    """NaN and inf were accepted, then failed in NumPy's Poisson ("lam value too large") at the first batch."""
    with pytest.raises(ValueError, match="cm3_lambda must be >= 0 and finite"):
        cm3.CM3Config(image_offset=IMG0, cm3_lambda=lam)


def test_example_for_training_switches_and_length_budget():
    r = rng(8)
    query = encode([("text", text(r, 5, 5)), ("image", image(r))])
    cands = [encode([("text", text(r, 5, 5)), ("image", image(r))]) for _ in range(4)]
    plain = cm3.CM3Config(retrieval=False, condition_dropout_rate=0.0, cm3=False)
    ex = cm3.example_for_training(query, cands, rng(0), plain)
    np.testing.assert_array_equal(ex["tokens"], np.r_[EOS, query, EOS])
    assert (ex["weights"] == 1).all()
    keep_nbrs = cm3.CM3Config(image_offset=IMG0, condition_dropout_rate=1.0, drop_neighbours_with_condition=False,
                              cm3=False, num_neighbours=2)
    ex = cm3.example_for_training(query, cands[:2], rng(0), keep_nbrs, presampled=True)
    np.testing.assert_array_equal(ex["tokens"], np.r_[EOS, cands[0], cands[1], MASK,
                                                      query[int(np.argmax(query == BREAK)):], EOS])
    # max_length drops the lowest-ranked neighbours until the masked example fits.
    doc_len = len(query)
    budget = cm3.CM3Config(image_offset=IMG0, condition_dropout_rate=0.0, max_length=2 + 2 * doc_len + 3 * 16,
                           cm3_lambda=50.0)
    for seed in range(20):
        ex = cm3.example_for_training(query, cands, rng(seed), budget)
        assert len(ex["tokens"]) <= budget.max_length
        unmasked = cm3.cm3_unmask(ex["tokens"], sentinels=SENTINELS)
        assert len(unmasked) == 2 + 2 * doc_len  # exactly one neighbour kept
        assert ex[cm3.NEIGHBOURS_CUT] == budget.num_neighbours - 1   # and the others counted as cut
    # A query that fits only with fewer spans draws fewer instead of being skipped by the packer;
    # one too long even unmasked is left whole (the packer skips and counts it).
    for spare_spans in (0, 1, 2):
        tight = dataclasses.replace(budget, max_length=2 + doc_len + 3 * spare_spans + 2, caption_span_rate=1.0)
        for seed in range(10):
            ex = cm3.example_for_training(query, cands, rng(seed), tight)
            assert len(ex["tokens"]) <= tight.max_length
            spans = int(((ex["tokens"] >= SENTINELS[0]) & (ex["tokens"] < SENTINELS[0] + SENTINELS[1])).sum()) // 2
            assert spans == spare_spans   # lambda 50 asks for 16; as many as fit are drawn
            np.testing.assert_array_equal(cm3.cm3_unmask(ex["tokens"], sentinels=SENTINELS), np.r_[EOS, query, EOS])
            assert ex[cm3.NEIGHBOURS_CUT] == budget.num_neighbours
    too_long = dataclasses.replace(budget, max_length=doc_len + 1)
    assert len(cm3.example_for_training(query, cands, rng(0), too_long)["tokens"]) > too_long.max_length
    with pytest.raises(ValueError):
        cm3.CM3Config(condition_dropout_rate=0.1)  # needs image_offset
    with pytest.raises(ValueError):
        cm3.CM3Config(image_offset=IMG0, max_spans=17)


def test_with_the_real_vocabulary(tiny_spm_model):
    from cm3leon_jax import text_tokenizer as tt
    from cm3leon_jax import vocab as vb
    vocab = vb.Vocabulary(tt.TextTokenizer(tiny_spm_model), 64, 16, num_sentinels=8)
    config = cm3.CM3Config.from_vocab(vocab, condition_dropout_rate=0.5, cm3_lambda=3.0)
    assert config.max_spans == 8 and config.image_offset == vocab.image_offset
    r = rng(0)
    docs = [vocab.encode_document([f"a red circle number {i}", r.integers(0, 64, (4, 4))]) for i in range(5)]
    for seed in range(30):
        ex = cm3.example_for_training(docs[0], docs[1:], rng(seed), config)
        unmasked = cm3.cm3_unmask(ex["tokens"], sentinels=config.sentinels)
        np.testing.assert_array_equal(ex["weights"], np.where(vocab.is_sentinel(ex["tokens"]), 0.0, 1.0))
        parts = vocab.decode_document(unmasked)  # still a well-formed document stream
        assert parts[-1].endswith("<eos>") and isinstance(parts[-2], np.ndarray)
    # the trainer's data config reaches the transform
    from cm3leon_jax.config_defaults import base_config
    from data_pipeline import cm3_pipeline
    data = base_config().data
    data.update(caption_span_rate=0.25, num_neighbours=2)
    built = cm3_pipeline.cm3_config(data, vocab)
    assert built.caption_span_rate == 0.25 and built.num_neighbours == 2 and built.image_offset == vocab.image_offset


def test_a_negative_neighbour_count_is_refused_not_read_as_no_retrieval():
    from types import SimpleNamespace
    from cm3leon_jax.config_defaults import base_config
    from data_pipeline import cm3_pipeline
    vocab = SimpleNamespace(num_sentinels=NSENT, image_offset=IMG0, eos_id=EOS, break_id=BREAK, eoss_id=EOSS,
                            mask_id=MASK)
    data = base_config().data
    data.num_neighbours = 0
    assert not cm3_pipeline.cm3_config(data, vocab).retrieval   # 0: no retrieval, on purpose
    data.num_neighbours = -2
    with pytest.raises(ValueError, match="data.num_neighbours=-2 must be >= 0"):
        cm3_pipeline.cm3_config(data, vocab)
