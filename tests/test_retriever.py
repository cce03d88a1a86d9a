"""The dual-encoder retriever: document-embedding rule, InfoNCE training, query dropout, inputs."""
import json
import os

import numpy as np
import pytest

from cm3leon_jax import retriever as R


def _tiny_config(**overrides):
    values = dict(text_vocab_size=64, num_image_codes=40, image_grid=(4, 4), max_text_len=8, width=32, num_heads=2,
                  text_layers=1, image_layers=1, image_downsample=1, embed_dim=16, batch_size=32, steps=40,
                  learning_rate=3e-3, warmup_steps=4, log_every=10, embed_batch_size=64)
    values.update(overrides)
    return R.retriever_config(**values)


def _paired_corpus(n=320, num_classes=32, seed=0):
    """Text and image both carry the class label (plus noise): the contrastive signal."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    texts = [np.concatenate([[num_classes + c], rng.integers(0, num_classes, rng.integers(1, 6)) + 0]).astype(np.int32)
             for c in labels]
    images = [np.where(rng.random(16) < 0.5, c, rng.integers(num_classes, 40, 16)).astype(np.int32) for c in labels]
    return texts, images, labels


# --------------------------------------------------------------------------- pure functions

def test_document_embedding_rule_exact():
    text = np.array([[3.0, 4.0, 0.0], [3.0, 4.0, 0.0], [9.0, 9.0, 9.0], [1.0, 0.0, 0.0]], np.float32)
    image = np.array([[0.0, 0.0, 2.0], [7.0, 7.0, 7.0], [0.0, 0.0, 5.0], [0.0, 1.0, 0.0]], np.float32)
    has_text = np.array([True, True, False, False])
    has_image = np.array([True, False, True, False])
    out = R.combine_document_embeddings(text, image, has_text, has_image)
    # both: normalise each ([.6,.8,0] and [0,0,1]), average ([.3,.4,.5]), normalise again
    np.testing.assert_allclose(out[0], np.array([0.3, 0.4, 0.5]) / np.sqrt(0.5), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[1], [0.6, 0.8, 0.0], atol=1e-6)      # text only
    np.testing.assert_allclose(out[2], [0.0, 0.0, 1.0], atol=1e-6)      # image only
    np.testing.assert_array_equal(out[3], [0.0, 0.0, 0.0])              # neither: zero row
    assert out.dtype == np.float32
    # averaging normalised vectors, not raw ones: scaling one modality changes nothing
    out2 = R.combine_document_embeddings(text * 100, image, has_text, has_image)
    np.testing.assert_allclose(out2, out, atol=1e-6)


def test_info_nce_symmetric_and_perfect_pairs():
    import jax.numpy as jnp
    e = np.eye(8, dtype=np.float32)
    loss, m = R.info_nce_loss(jnp.asarray(e), jnp.asarray(e), jnp.log(100.0))
    assert float(m["accuracy"]) == 1.0 and float(loss) < 1e-3
    rng = np.random.default_rng(0)
    t = R.l2_normalize(rng.standard_normal((8, 4)).astype(np.float32))
    i = R.l2_normalize(rng.standard_normal((8, 4)).astype(np.float32))
    l1, _ = R.info_nce_loss(jnp.asarray(t), jnp.asarray(i), jnp.log(10.0))
    l2, _ = R.info_nce_loss(jnp.asarray(i), jnp.asarray(t), jnp.log(10.0))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    _, m = R.info_nce_loss(jnp.asarray(e), jnp.asarray(e), jnp.log(1e6), max_logit_scale=100.0)
    np.testing.assert_allclose(float(m["temperature"]), 0.01, rtol=1e-5)  # scale capped at 100
    # a batch larger than the corpus repeats documents: copies are no negatives and count once
    rows = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    repeated, m = R.info_nce_loss(jnp.asarray(t[rows]), jnp.asarray(i[rows]), jnp.log(10.0), row_ids=jnp.asarray(rows))
    distinct, m4 = R.info_nce_loss(jnp.asarray(t[:4]), jnp.asarray(i[:4]), jnp.log(10.0))
    np.testing.assert_allclose(float(repeated), float(distinct), rtol=1e-6)
    np.testing.assert_allclose(float(m["accuracy"]), float(m4["accuracy"]))
    _, m = R.info_nce_loss(jnp.asarray(e[rows]), jnp.asarray(e[rows]), jnp.log(100.0), row_ids=jnp.asarray(rows))
    assert float(m["accuracy"]) == 1.0


def test_temperature_is_clamped_at_its_cap_and_still_learns():
    """CLIP clamps log(1/T) after each step: capping only inside the loss would leave a parameter
    past the cap with zero gradient, frozen there."""
    import jax
    config = _tiny_config()
    texts, images, _ = _paired_corpus()
    text_ids, text_mask = R.pad_text(texts[:32], config)
    codes, _ = R.stack_images(images[:32], config)
    rows = np.arange(32)
    batch = R._batch_from_rows(text_ids, text_mask, codes, rows)
    batch["image_codes"] = batch["image_codes"][::-1].copy()   # mismatched pairs: the loss wants a warmer temperature
    tx, train_step, _ = R.make_train_step(config)
    params = R.init_params(config, 0)
    params["logit_scale"] = jax.numpy.asarray(np.log(config.max_logit_scale) + 1.0)   # past the cap
    state = (params, tx.init(params))
    cap = np.log(config.max_logit_scale)
    for _ in range(20):
        state, metrics = train_step(state, batch)
        assert float(state[0]["logit_scale"]) <= cap + 1e-6
    assert float(state[0]["logit_scale"]) < cap - 1e-3   # moved off the cap


def test_grad_clip_zero_means_no_clipping():
    """grad_clip=0 turns clipping off (as in the LM and VQ trainers); clip_by_global_norm(0) zeroed
    every gradient, so nothing trained."""
    import jax
    config = _tiny_config(grad_clip=0.0, weight_decay=0.0)
    texts, images, _ = _paired_corpus()
    text_ids, text_mask = R.pad_text(texts[:32], config)
    codes, _ = R.stack_images(images[:32], config)
    batch = R._batch_from_rows(text_ids, text_mask, codes, np.arange(32))
    tx, train_step, _ = R.make_train_step(config)
    params = R.init_params(config, 0)
    before = [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]
    state = (params, tx.init(params))
    for _ in range(2):
        state, _ = train_step(state, batch)
    change = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree_util.tree_leaves(state[0]), before))
    assert change > 1e-4


def test_query_dropout_deterministic_and_twenty_percent():
    tokens = np.arange(100, 200)
    a = R.query_token_dropout(tokens, 0.2, seed=3, doc_id=7)
    b = R.query_token_dropout(tokens, 0.2, seed=3, doc_id=7)
    c = R.query_token_dropout(tokens, 0.2, seed=4, doc_id=7)
    d = R.query_token_dropout(tokens, 0.2, seed=3, doc_id=8)
    assert a.shape == (80,)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert np.all(np.diff(a) > 0)                      # order kept, a subsequence
    filled = R.query_token_dropout(tokens, 0.2, seed=3, doc_id=7, fill=-5)
    assert filled.shape == tokens.shape and int((filled == -5).sum()) == 20
    np.testing.assert_array_equal(filled[filled != -5], a)   # same positions dropped either way
    assert R.query_token_dropout(np.array([5]), 0.2, 0).tolist() == [5]           # never empties a query
    assert R.query_token_dropout(np.arange(3), 0.2, 0).size == 2                  # round(0.6) = 1 dropped
    assert R.query_token_dropout(np.array([], np.int32), 0.2, 0).size == 0
    lengths = np.random.default_rng(0).integers(5, 60, 200)
    kept = sum(R.query_token_dropout(np.arange(n), 0.2, 1, i).size for i, n in enumerate(lengths))
    assert abs(1 - kept / lengths.sum() - 0.2) < 0.02
    with pytest.raises(ValueError):
        R.query_token_dropout(tokens, 1.0, 0)


def test_load_embeddings_validates(tmp_path):
    good = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32) * 3
    np.save(tmp_path / "good.npy", good)
    out = R.load_embeddings(str(tmp_path / "good.npy"), 5)
    assert out.shape == (5, 4) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out, good / np.linalg.norm(good, axis=1, keepdims=True), atol=1e-6)
    with pytest.raises(ValueError, match="4 embeddings for 5 documents|5 embeddings for 4"):
        R.load_embeddings(str(tmp_path / "good.npy"), 4)
    np.save(tmp_path / "flat.npy", good.reshape(-1))
    with pytest.raises(ValueError, match="shape"):
        R.load_embeddings(str(tmp_path / "flat.npy"), 20)
    np.save(tmp_path / "cube.npy", good.reshape(5, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        R.load_embeddings(str(tmp_path / "cube.npy"), 5)
    for bad_value in (np.nan, np.inf):
        bad = good.copy()
        bad[2, 1] = bad_value
        np.save(tmp_path / "bad.npy", bad)
        with pytest.raises(ValueError, match="NaN or inf"):
            R.load_embeddings(str(tmp_path / "bad.npy"), 5)
    zero = good.copy()
    zero[3] = 0
    np.save(tmp_path / "zero.npy", zero)
    with pytest.raises(ValueError, match="all-zero"):
        R.load_embeddings(str(tmp_path / "zero.npy"), 5)
    assert np.all(R.load_embeddings(str(tmp_path / "zero.npy"), 5, allow_zero_rows=True)[3] == 0)
    # rows beyond float32's range keep their direction (their squared norm would overflow or vanish)
    extreme = good.astype(np.float64)
    extreme[0] *= 1e20
    extreme[1] *= 1e-25
    extreme[2] *= 1e300
    np.save(tmp_path / "extreme.npy", extreme)
    np.testing.assert_allclose(R.load_embeddings(str(tmp_path / "extreme.npy"), 5, chunk=2), out, atol=1e-6)
    np.savez(tmp_path / "archive.npz", good=good)
    with pytest.raises(ValueError, match="one .num_documents, dim. array saved with np.save"):
        R.load_embeddings(str(tmp_path / "archive.npz"), 5)
    np.save(tmp_path / "ints.npy", np.ones((5, 4), np.int32))
    with pytest.raises(ValueError, match="floating"):
        R.load_embeddings(str(tmp_path / "ints.npy"), 5)
    with pytest.raises(ValueError, match="cannot read"):
        R.load_embeddings(str(tmp_path / "missing.npy"), 5)


def test_input_validation():
    config = _tiny_config()
    with pytest.raises(ValueError, match="image has 15 codes"):
        R.stack_images([np.zeros(15, np.int32)], config)
    with pytest.raises(ValueError, match="image codes"):
        R.stack_images([np.full(16, 40, np.int32)], config)
    with pytest.raises(ValueError, match="text ids"):
        R.pad_text([np.array([64])], config)
    ids, mask = R.pad_text([np.arange(1, 12), np.array([], np.int32)], config)
    assert ids.shape == (2, 8) and mask[0].all() and not mask[1].any()   # truncated to max_text_len
    # unified-vocabulary image ids: the offset is subtracted
    codes, present = R.stack_images([np.arange(16) + 1000, None], _tiny_config(image_code_offset=1000))
    np.testing.assert_array_equal(codes[0], np.arange(16))
    assert present.tolist() == [True, False]
    with pytest.raises(ValueError, match="unknown retriever config"):
        R.retriever_config(nonsense=1)


# --------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    texts, images, labels = _paired_corpus()
    workdir = tmp_path_factory.mktemp("retriever")
    # a few unpaired documents: counted, not used for the contrastive pairs
    docs = [{"text_ids": t, "image_codes": i} for t, i in zip(texts, images)]
    docs += [{"text_ids": texts[0], "image_codes": np.zeros(0, np.int32)},
             {"text_ids": np.zeros(0, np.int32), "image_codes": images[0]}]
    # data parallel over 2 of the 8 fake devices (all 8 on 2 shared cores only adds overhead)
    import jax
    from jax.sharding import Mesh
    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1, 1), ("data", "fsdp", "tensor"),
                axis_types=(jax.sharding.AxisType.Auto,) * 3)
    result = R.train_retriever(_tiny_config(), docs, str(workdir), mesh=mesh)
    return result, texts, images, labels, str(workdir)


def test_training_reduces_infonce_and_beats_chance(trained):
    result, *_ , workdir = trained
    assert result["counts"]["paired"] == 320 and result["counts"]["text_only"] == 1
    assert result["counts"]["image_only"] == 1
    initial, final = result["initial"], result["final"]
    assert final["loss"] < 0.6 * initial["loss"], (initial, final)
    chance = 1.0 / 32
    assert final["accuracy"] > 5 * chance, final
    train_losses = [h["loss"] for h in result["history"] if "loss" in h]
    assert train_losses[-1] < train_losses[0]
    with open(os.path.join(workdir, "retriever", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert any("accuracy" in r and "loss" in r for r in records)
    assert any("eval_accuracy" in r for r in records)


def test_saved_retriever_embeds_documents(trained):
    result, texts, images, labels, workdir = trained
    params, config = R.load_retriever(workdir)
    assert config.embed_dim == 16 and tuple(config.image_grid) == (4, 4)
    texts = texts[:40] + [texts[0], np.zeros(0, np.int32), np.zeros(0, np.int32)]
    images = images[:40] + [np.zeros(0, np.int32), images[1], np.zeros(0, np.int32)]
    doc = R.embed_documents(params, config, texts, images, batch_size=16)
    again = R.embed_documents(result["params"], config, texts, images, batch_size=16)
    other_batch = R.embed_documents(params, config, texts, images, batch_size=64)
    assert doc.shape == (43, 16) and doc.dtype == np.float32
    np.testing.assert_array_equal(doc, again)                  # deterministic, restored params identical
    np.testing.assert_allclose(doc, other_batch, atol=1e-5)    # batching and padding do not leak
    np.testing.assert_allclose(np.linalg.norm(doc[:42], axis=1), 1.0, atol=1e-5)
    assert np.all(doc[42] == 0)                                # nothing to embed
    text_emb = R.embed_text(params, config, texts)
    image_emb = R.embed_images(params, config, images)
    np.testing.assert_allclose(doc[40], text_emb[40], atol=1e-6)    # text-only document
    np.testing.assert_allclose(doc[41], image_emb[41], atol=1e-6)   # image-only document
    np.testing.assert_allclose(doc[:40], R.combine_document_embeddings(text_emb[:40], image_emb[:40],
                                                                      np.ones(40, bool), np.ones(40, bool)), atol=1e-6)
    # trained: a text is closer to the image of its own pair than to the average image
    sims = text_emb[:40] @ image_emb[:40].T
    assert np.mean(np.diag(sims)) > np.mean(sims) + 0.2
    text_q, image_q, has_text, has_image = R.embed_queries(params, config, texts, images, seed=0)
    text_q2, _, _, _ = R.embed_queries(params, config, texts, images, seed=0)
    np.testing.assert_array_equal(text_q, text_q2)
    assert has_text.tolist()[-3:] == [True, False, False] and has_image.tolist()[-3:] == [False, True, False]
    assert np.all(text_q[41] == 0) and np.all(image_q[40] == 0)
    # dropout changes the queries but keeps them near the clean embedding
    cos = np.sum(text_q[:40] * text_emb[:40], axis=1)
    assert np.mean(cos) > 0.5 and not np.allclose(text_q[:40], text_emb[:40])


def test_retraining_in_the_same_directory_starts_its_records_over(tmp_path):
    """The retriever trains from scratch every time (a rerun of a killed `index --stage train`, or a
    retrain with other settings): its metrics.jsonl kept the former run's records, so it read as two
    runs (steps 1, 2, 2, 1, 2, 2); and the same seed gives the same records."""
    import jax
    from jax.sharding import Mesh
    from cm3leon_jax import metrics
    texts, images, _ = _paired_corpus(n=64)
    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1, 1), ("data", "fsdp", "tensor"),
                axis_types=(jax.sharding.AxisType.Auto,) * 3)
    config = _tiny_config(steps=2, log_every=1)
    R.train_retriever(config, {"text_ids": texts, "image_codes": images}, str(tmp_path), mesh=mesh)
    first = metrics.read_records(str(tmp_path / R.RETRIEVER_SUBDIR))
    R.train_retriever(config, {"text_ids": texts, "image_codes": images}, str(tmp_path), mesh=mesh)
    again = metrics.read_records(str(tmp_path / R.RETRIEVER_SUBDIR))
    assert [r["step"] for r in again] == [1, 2, 2]
    drop = ("steps_per_second",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == \
        [{k: v for k, v in r.items() if k not in drop} for r in first]
